"""pytorch-fid's FID InceptionV3, described once as data; the torch and MindSpore networks are built from it.

The FID network is torchvision's Inception3 with the blocks TensorFlow's graph had (`FIDInceptionA/C/E_1/E_2`:
average pools that ignore padding, a max pool in the last block) and a 1008-class fc layer. Parameter names are those
of pytorch-fid's weight file `pt_inception-2015-12-05-6726825d.pth` (`Mixed_5b.branch1x1.conv.weight`, ...).
Features are pool3: the global average of the last block's output, 2048 values. The fc layer is in the file and in
the networks (so loading is strict) but takes no part in pool3 features.

Each `Conv` is torchvision's BasicConv2d: convolution without bias -> batch norm (eps 0.001, running statistics)
-> ReLU. A `Mixed` block runs its branches on the same input and concatenates their outputs on the channel axis;
inside a branch, a `Fork` runs two convolutions on the same input and concatenates them.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

BN_EPS = 1e-3
POOL3_FEATURES = 2048
NUM_CLASSES = 1008


@dataclass(frozen=True)
class Conv:
    name: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Pool:
    kind: str  # "max" (padding, if any, never wins) | "avg" (padding excluded from the count, as TensorFlow does)
    kernel: int
    stride: int
    padding: int = 0


@dataclass(frozen=True)
class Fork:
    left: Conv
    right: Conv


Op = Conv | Pool | Fork


@dataclass(frozen=True)
class Mixed:
    name: str
    branches: tuple[tuple[Op, ...], ...]


Layer = Conv | Pool | Mixed


def _conv(name: str, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
          padding: int | tuple[int, int] = 0) -> Conv:
    pair = (lambda v: (v, v) if isinstance(v, int) else tuple(v))
    return Conv(name, cin, cout, pair(kernel), stride, pair(padding))


AVG_SAME = Pool("avg", 3, 1, 1)
MAX_SAME = Pool("max", 3, 1, 1)
MAX_REDUCE = Pool("max", 3, 2)


def inception_a(name: str, cin: int, pool_features: int) -> Mixed:
    return Mixed(name, (
        (_conv("branch1x1", cin, 64, 1),),
        (_conv("branch5x5_1", cin, 48, 1), _conv("branch5x5_2", 48, 64, 5, padding=2)),
        (_conv("branch3x3dbl_1", cin, 64, 1), _conv("branch3x3dbl_2", 64, 96, 3, padding=1),
         _conv("branch3x3dbl_3", 96, 96, 3, padding=1)),
        (AVG_SAME, _conv("branch_pool", cin, pool_features, 1)),
    ))


def inception_b(name: str, cin: int) -> Mixed:
    return Mixed(name, (
        (_conv("branch3x3", cin, 384, 3, stride=2),),
        (_conv("branch3x3dbl_1", cin, 64, 1), _conv("branch3x3dbl_2", 64, 96, 3, padding=1),
         _conv("branch3x3dbl_3", 96, 96, 3, stride=2)),
        (MAX_REDUCE,),
    ))


def inception_c(name: str, cin: int, c7: int) -> Mixed:
    return Mixed(name, (
        (_conv("branch1x1", cin, 192, 1),),
        (_conv("branch7x7_1", cin, c7, 1), _conv("branch7x7_2", c7, c7, (1, 7), padding=(0, 3)),
         _conv("branch7x7_3", c7, 192, (7, 1), padding=(3, 0))),
        (_conv("branch7x7dbl_1", cin, c7, 1), _conv("branch7x7dbl_2", c7, c7, (7, 1), padding=(3, 0)),
         _conv("branch7x7dbl_3", c7, c7, (1, 7), padding=(0, 3)),
         _conv("branch7x7dbl_4", c7, c7, (7, 1), padding=(3, 0)),
         _conv("branch7x7dbl_5", c7, 192, (1, 7), padding=(0, 3))),
        (AVG_SAME, _conv("branch_pool", cin, 192, 1)),
    ))


def inception_d(name: str, cin: int) -> Mixed:
    return Mixed(name, (
        (_conv("branch3x3_1", cin, 192, 1), _conv("branch3x3_2", 192, 320, 3, stride=2)),
        (_conv("branch7x7x3_1", cin, 192, 1), _conv("branch7x7x3_2", 192, 192, (1, 7), padding=(0, 3)),
         _conv("branch7x7x3_3", 192, 192, (7, 1), padding=(3, 0)), _conv("branch7x7x3_4", 192, 192, 3, stride=2)),
        (MAX_REDUCE,),
    ))


def inception_e(name: str, cin: int, pool: Pool) -> Mixed:
    """E_1 (Mixed_7b) pools by average, E_2 (Mixed_7c) by max: the FID graph's quirk."""
    return Mixed(name, (
        (_conv("branch1x1", cin, 320, 1),),
        (_conv("branch3x3_1", cin, 384, 1), Fork(_conv("branch3x3_2a", 384, 384, (1, 3), padding=(0, 1)),
                                                  _conv("branch3x3_2b", 384, 384, (3, 1), padding=(1, 0)))),
        (_conv("branch3x3dbl_1", cin, 448, 1), _conv("branch3x3dbl_2", 448, 384, 3, padding=1),
         Fork(_conv("branch3x3dbl_3a", 384, 384, (1, 3), padding=(0, 1)),
              _conv("branch3x3dbl_3b", 384, 384, (3, 1), padding=(1, 0)))),
        (pool, _conv("branch_pool", cin, 192, 1)),
    ))


# Input (N, 3, 299, 299) in [-1, 1] -> ... -> (N, 2048, 8, 8) -> global average -> pool3 (N, 2048).
FID_INCEPTION_V3: tuple[Layer, ...] = (
    _conv("Conv2d_1a_3x3", 3, 32, 3, stride=2),
    _conv("Conv2d_2a_3x3", 32, 32, 3),
    _conv("Conv2d_2b_3x3", 32, 64, 3, padding=1),
    MAX_REDUCE,
    _conv("Conv2d_3b_1x1", 64, 80, 1),
    _conv("Conv2d_4a_3x3", 80, 192, 3),
    MAX_REDUCE,
    inception_a("Mixed_5b", 192, 32),
    inception_a("Mixed_5c", 256, 64),
    inception_a("Mixed_5d", 288, 64),
    inception_b("Mixed_6a", 288),
    inception_c("Mixed_6b", 768, 128),
    inception_c("Mixed_6c", 768, 160),
    inception_c("Mixed_6d", 768, 160),
    inception_c("Mixed_6e", 768, 192),
    inception_d("Mixed_7a", 768),
    inception_e("Mixed_7b", 1280, AVG_SAME),
    inception_e("Mixed_7c", 2048, MAX_SAME),
)


def branch_convs(branch: tuple[Op, ...]) -> Iterator[Conv]:
    for op in branch:
        if isinstance(op, Conv):
            yield op
        elif isinstance(op, Fork):
            yield op.left
            yield op.right


def named_convs(layers: tuple[Layer, ...] = FID_INCEPTION_V3) -> Iterator[tuple[str, Conv]]:
    """(module path, conv) for every BasicConv2d, in network order."""
    for layer in layers:
        if isinstance(layer, Conv):
            yield layer.name, layer
        elif isinstance(layer, Mixed):
            for branch in layer.branches:
                for conv in branch_convs(branch):
                    yield f"{layer.name}.{conv.name}", conv


BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


def state_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of pytorch-fid's weight file: name -> shape (BatchNorm's `num_batches_tracked` is not used)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, conv in named_convs():
        shapes[f"{path}.conv.weight"] = (conv.out_channels, conv.in_channels, *conv.kernel)
        shapes.update({f"{path}.bn.{p}": (conv.out_channels,) for p in BN_PARAMS})
    shapes["fc.weight"] = (NUM_CLASSES, POOL3_FEATURES)
    shapes["fc.bias"] = (NUM_CLASSES,)
    return shapes


MINDSPORE_BN_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                      "running_var": "moving_variance"}


def mindspore_name(name: str) -> str:
    """Our MindSpore network's parameter name for a weight-file name (nn.BatchNorm2d calls them differently)."""
    stem, _, leaf = name.rpartition(".")
    if stem.endswith(".bn"):
        return f"{stem}.{MINDSPORE_BN_NAMES[leaf]}"
    return name


def random_state(seed: int = 0) -> dict[str, np.ndarray]:
    """A randomly initialised weight set in the file's layout, scaled so activations stay O(1) through the net:
    He-normal convolutions, batch-norm statistics near identity. Not a trained network: for tests and demos."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for name, shape in state_shapes().items():
        if name.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif name.endswith("bn.weight"):
            value = rng.uniform(0.8, 1.2, shape)
        elif name.endswith("bn.running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(("bn.bias", "bn.running_mean")):
            value = rng.normal(0.0, 0.1, shape)
        else:  # fc
            value = rng.normal(0.0, 0.01, shape)
        state[name] = value.astype(np.float32)
    return state
