"""LoRA cells for MindSpore: the network's own linear or convolution layer, held not copied, plus down/up weights
(and a DoRA magnitude).

    linear / conv   y = base(x) + s * up(down(x))                     s = alpha / rank
    DoRA            y = f * (base(x) - bias + s * up(down(x))) + bias,  f = magnitude / ||W + s * up @ down||
with the norm per output channel and not differentiated (peft's rule, after the DoRA paper's section 4.3). A
convolution's down factor is a convolution with the base layer's kernel, stride, padding and dilation, its up factor
a 1x1 convolution. With `fp16` the LoRA matmuls / convolutions run in float16 while the master weights stay
float32 (the optimizer updates them in float32). MindSpore re-prefixes parameter names when cells are re-parented,
so the backend tracks LoRA weights by canonical key, never by `Parameter.name`.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, mint, nn, ops

from msd_lora.backends.mindspore import kernels
from msd_lora.lora.core import DOWN, MAGNITUDE, UP, LoraLayer, LoraWeights, magnitude_from_peft, module_key, peft_magnitude
from msd_lora.lora.dropout import hashed, layer_seed, threshold

ENABLED = "lora_enabled"  # the name suffix of a cell's on/off switch
DROPOUT_SEED = "lora_dropout_seed"
CONVOLUTIONS = (mint.nn.Conv2d,)
LINEARS = (mint.nn.Linear, nn.Dense)


class LoraCell(nn.Cell):
    def __init__(self, base: nn.Cell, layer: LoraLayer, fp16: bool, dora: bool, key: str, number: int = 0,
                 dropout: float = 0.0, network_dropout: float = 0.0, dropout_seed: Parameter | None = None):
        super().__init__(auto_prefix=False)
        self.base = base
        self.conv = isinstance(base, CONVOLUTIONS)
        out_features = base.weight.shape[0]
        self.down = Parameter(Tensor(np.zeros(layer.down.shape, np.float32)), name=f"{key}.{DOWN}")
        self.up = Parameter(Tensor(np.zeros(layer.up.shape, np.float32)), name=f"{key}.{UP}")
        self.scale = float(layer.alpha) / layer.rank
        self.compute_dtype = ms.float16 if fp16 else ms.float32
        self.dora = dora
        magnitude_shape = (1, out_features, 1, 1) if self.conv else (out_features,)  # peft's
        self.magnitude = Parameter(Tensor(np.ones(magnitude_shape, np.float32)), name=f"{key}.{MAGNITUDE}") \
            if dora else None
        self.has_bias = getattr(base, "bias", None) is not None
        # 1: the LoRA adds its update; 0: the base layer alone, exactly (a tensor: one compiled graph for both)
        self.enabled = Parameter(Tensor(1.0, ms.float32), name=f"{key}.{ENABLED}", requires_grad=False)
        # LoRA dropout (msd_lora.lora.dropout): masks hashed from the step's seed, 0 outside train steps; one
        # parameter shared by every LoRA cell (`dropout_seed_parameter`), which the train step assigns in its graph
        self.dropout, self.network_dropout, self.number = float(dropout), float(network_dropout), number
        self.dropout_seed = dropout_seed if dropout or network_dropout else None
        if self.conv:
            self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation
            self.gather = kernels.cpu_substitutes_applied()  # the CPU convolution the base layers use too

    def _convolve(self, x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
        if self.gather:
            return kernels.conv2d_by_gather(x, weight, None, stride, padding, dilation)
        return mint.nn.functional.conv2d(x, weight, None, stride, padding, dilation)

    def _drop(self, t: Tensor, p: float, salt: int) -> Tensor:
        """Inverted dropout with `lora.dropout`'s hashed mask; `t` unchanged while the seed is 0."""
        seed = layer_seed(self.dropout_seed, salt)
        index = ops.arange(0, t.size, 1, dtype=ms.int64).reshape(t.shape)
        keep = (hashed(index, seed) >= threshold(p)).astype(t.dtype)
        return mint.where(self.dropout_seed > 0, t * keep / (1.0 - p), t)

    def _update(self, x: Tensor) -> Tensor:
        """s * up(down(x)) in the compute dtype, with the LoRA dropouts."""
        dtype = self.compute_dtype
        if self.dropout > 0:
            x = self._drop(x, self.dropout, 2 * self.number)
        if self.conv:
            h = self._convolve(x.astype(dtype), self.down.astype(dtype), self.stride, self.padding, self.dilation)
        else:
            h = ops.matmul(x.astype(dtype), self.down.astype(dtype).T)
        if self.network_dropout > 0:
            h = self._drop(h, self.network_dropout, 2 * self.number + 1)
        if self.conv:
            h = self._convolve(h, self.up.astype(dtype), (1, 1), (0, 0), (1, 1))
        else:
            h = ops.matmul(h, self.up.astype(dtype).T)
        return h * self.scale

    def _dora_factor(self) -> Tensor:
        """magnitude / ||W + s * up @ down|| per output channel, the norm a constant of the gradient."""
        weight = self.base.weight.astype(ms.float32)
        out = weight.shape[0]
        delta = ops.matmul(self.up.reshape(out, -1), self.down.reshape(self.down.shape[0], -1)) * self.scale
        norm = ops.sqrt(((weight.reshape(out, -1) + delta) ** 2).sum(axis=1))
        return self.magnitude.reshape(out) / ops.stop_gradient(norm)

    def construct(self, x: Tensor) -> Tensor:
        y = self.base(x)
        h = self._update(x).astype(y.dtype)
        if not self.dora:
            return y + h * self.enabled.astype(y.dtype)
        factor = self._dora_factor().astype(y.dtype)
        if self.conv:
            factor = factor.reshape(1, -1, 1, 1)
        if self.has_bias:
            bias = self.base.bias.astype(y.dtype)
            bias = bias.reshape(1, -1, 1, 1) if self.conv else bias
            out = factor * (y - bias + h) + bias
        else:
            out = factor * (y + h)
        return mint.where(self.enabled > 0.5, out, y)


def _cells_by_name(root: nn.Cell) -> dict[str, nn.Cell]:
    return dict(root.cells_and_names())


def layer_shapes(root: nn.Cell) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of every linear layer and 2-D convolution of `root`."""
    return {n: tuple(cell.weight.shape) for n, cell in root.cells_and_names() if isinstance(cell, LINEARS + CONVOLUTIONS)}


def dropout_seed_parameter(spec) -> Parameter | None:
    """The LoRA dropout masks' seed that every LoRA cell reads, None without LoRA dropout."""
    if not (spec.dropout or spec.network_dropout):
        return None
    return Parameter(Tensor(0, ms.int64), name=DROPOUT_SEED, requires_grad=False)


def inject(root: nn.Cell, component: str, layers: dict[str, LoraLayer], spec, numbers: list[str],
           dropout_seed: Parameter | None = None) -> dict[str, LoraCell]:
    """Replace each named cell of `root` by a LoraCell around it with that layer's rank and alpha (the spec's variant
    and dropouts reading `dropout_seed`; `numbers` orders the layers for the dropout masks); return canonical
    key -> cell."""
    cells = _cells_by_name(root)
    injected = {}
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = cells[parent_name] if parent_name else root
        key = module_key(component, name)
        base_names = {id(p): p.name for p in cells[name].get_parameters()}
        wrapper = LoraCell(cells[name], layer, spec.fp16, spec.dora, key, numbers.index(key), spec.dropout,
                           spec.network_dropout, dropout_seed)
        if isinstance(parent, (nn.CellList, nn.SequentialCell)):
            parent[int(child)] = wrapper
        else:
            setattr(parent, child, wrapper)
        injected[key] = (wrapper, base_names)
    for key, (cell, base_names) in injected.items():
        # re-parenting renamed the parameters after the attribute alone ('to_q.base.weight'), which collide
        # across blocks: keep the base layer's own names and give the LoRA weights their canonical keys
        for param in cell.base.get_parameters():
            param.name = base_names[id(param)]
        for part, param in lora_parts(cell) + [(ENABLED, cell.enabled)]:
            param.name = f"{key}.{part}"
        if cell.dropout_seed is not None:
            cell.dropout_seed.name = DROPOUT_SEED  # re-parenting renamed the shared parameter too
    return {key: cell for key, (cell, _) in injected.items()}


def lora_parts(cell: LoraCell) -> list[tuple[str, Parameter]]:
    """(canonical suffix, parameter) of a cell's trainable weights."""
    parts = [(DOWN, cell.down), (UP, cell.up)]
    return parts + [(MAGNITUDE, cell.magnitude)] if cell.dora else parts


def read_weights(cells: dict[str, LoraCell], alphas: dict[str, float]) -> LoraWeights:
    weights = {}
    for key, cell in cells.items():
        down = cell.down.asnumpy().copy()
        magnitude = magnitude_from_peft(cell.magnitude.asnumpy(), down) if cell.dora else None
        weights[key] = LoraLayer(down=down, up=cell.up.asnumpy().copy(), alpha=alphas[key], magnitude=magnitude)
    return weights


def write_weights(cells: dict[str, LoraCell], weights: LoraWeights) -> None:
    """Copy weights already checked to fit (`keys.check_lora_fits`) into the cells."""
    for key, layer in weights.items():
        cells[key].down.set_data(Tensor(np.asarray(layer.down, np.float32)))
        cells[key].up.set_data(Tensor(np.asarray(layer.up, np.float32)))
        if layer.magnitude is not None:
            cells[key].magnitude.set_data(Tensor(np.asarray(peft_magnitude(key, layer), np.float32)))
