"""LoRA cells for MindSpore: the network's own linear layer, held not copied, plus down/up weights.

`y = base(x) + (alpha / r) * (x @ A^T) @ B^T`; with `fp16` the two LoRA matmuls run in float16 while the
master A/B stay float32 (the optimizer updates them in float32). MindSpore re-prefixes parameter names when
cells are re-parented, so the backend tracks LoRA weights by canonical key, never by `Parameter.name`.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from msd_lora.lora.core import DOWN, UP, LoraLayer, LoraWeights, module_key
from msd_lora.lora.spec import LoraSpec


class LoraLinear(nn.Cell):
    def __init__(self, base: nn.Cell, rank: int, alpha: float, fp16: bool, key: str):
        super().__init__(auto_prefix=False)
        out_features, in_features = base.weight.shape
        self.base = base
        self.down = Parameter(Tensor(np.zeros((rank, in_features), np.float32)), name=f"{key}.{DOWN}")
        self.up = Parameter(Tensor(np.zeros((out_features, rank), np.float32)), name=f"{key}.{UP}")
        self.scale = alpha / rank
        self.compute_dtype = ms.float16 if fp16 else ms.float32

    def construct(self, x: Tensor) -> Tensor:
        y = self.base(x)
        dtype = self.compute_dtype
        h = ops.matmul(x.astype(dtype), self.down.astype(dtype).T)
        h = ops.matmul(h, self.up.astype(dtype).T) * self.scale
        return y + h.astype(y.dtype)


def _cells_by_name(root: nn.Cell) -> dict[str, nn.Cell]:
    return dict(root.cells_and_names())


def inject(root: nn.Cell, component: str, module_names: list[str], spec: LoraSpec) -> dict[str, LoraLinear]:
    """Replace each named linear cell of `root` by a LoraLinear around it; return canonical key -> cell."""
    cells = _cells_by_name(root)
    injected = {}
    for name in module_names:
        parent_name, _, child = name.rpartition(".")
        parent = cells[parent_name] if parent_name else root
        key = module_key(component, name)
        base_names = {id(p): p.name for p in cells[name].get_parameters()}
        wrapper = LoraLinear(cells[name], spec.rank, spec.alpha, spec.fp16, key)
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
        cell.down.name, cell.up.name = f"{key}.{DOWN}", f"{key}.{UP}"
    return {key: cell for key, (cell, _) in injected.items()}


def read_weights(cells: dict[str, LoraLinear], alpha: float) -> LoraWeights:
    return {k: LoraLayer(down=c.down.asnumpy().copy(), up=c.up.asnumpy().copy(), alpha=alpha)
            for k, c in cells.items()}


def write_weights(cells: dict[str, LoraLinear], weights: LoraWeights) -> None:
    """Copy weights already checked to fit (`keys.check_lora_fits`) into the cells."""
    for key, layer in weights.items():
        cells[key].down.set_data(Tensor(np.asarray(layer.down, np.float32)))
        cells[key].up.set_data(Tensor(np.asarray(layer.up, np.float32)))
