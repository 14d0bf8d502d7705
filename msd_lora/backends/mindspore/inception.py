"""pytorch-fid's FID InceptionV3 in MindSpore, built from msd_lora.eval.inception_arch with mint.nn.Conv2d,
nn.BatchNorm2d (inference statistics) and nn pooling cells. On CPU, mint.nn.Conv2d has no kernel (Conv2DExt): its
construct is the backend's substitute (gather + matmul, msd_lora/backends/mindspore/kernels.py), which
`configure_context` applies before the network is built; batch norm and pooling have CPU kernels. Weight-file names
map to ours by `inception_arch.mindspore_name` (batch norm: gamma, beta, moving_mean, moving_variance)."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, mint, nn, ops

from msd_lora.backends.mindspore.context import configure_context
from msd_lora.eval import inception_arch as arch
from msd_lora.models.state_check import check_state_fits


class BasicConv2d(nn.Cell):
    def __init__(self, spec: arch.Conv):
        super().__init__()
        self.conv = mint.nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel, stride=spec.stride,
                                   padding=spec.padding, bias=False)
        self.bn = nn.BatchNorm2d(spec.out_channels, eps=arch.BN_EPS, use_batch_statistics=False)
        self.relu = nn.ReLU()

    def construct(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


def pool_cell(spec: arch.Pool) -> nn.Cell:
    """3x3 pools: stride 2 unpadded, or stride 1 'same' (TensorFlow's padding: ignored by max, excluded from the
    average's count, which is pytorch-fid's count_include_pad=False)."""
    if spec.padding:
        assert spec.stride == 1 and spec.padding == spec.kernel // 2, spec
    pad_mode = "same" if spec.padding else "valid"
    cls = nn.MaxPool2d if spec.kind == "max" else nn.AvgPool2d
    return cls(kernel_size=spec.kernel, stride=spec.stride, pad_mode=pad_mode)


class Fork(nn.Cell):
    def __init__(self, left: nn.Cell, right: nn.Cell):
        super().__init__(auto_prefix=False)
        self.left, self.right = left, right

    def construct(self, x: Tensor) -> Tensor:
        return ops.cat((self.left(x), self.right(x)), 1)


class Mixed(nn.Cell):
    """Branches as SequentialCells of the named convs (parameter names stay `<block>.<conv>.conv.weight`)."""

    def __init__(self, spec: arch.Mixed):
        super().__init__()
        for branch in spec.branches:
            for conv in arch.branch_convs(branch):
                self.insert_child_to_cell(conv.name, BasicConv2d(conv))
        self.branches = nn.CellList([nn.SequentialCell([self._op(op) for op in branch]) for branch in spec.branches])
        for branch in self.branches:
            branch.auto_prefix = False  # parameters are named after the convs above, not the branch position

    def _op(self, op: arch.Op) -> nn.Cell:
        if isinstance(op, arch.Pool):
            return pool_cell(op)
        if isinstance(op, arch.Fork):
            return Fork(getattr(self, op.left.name), getattr(self, op.right.name))
        return getattr(self, op.name)

    def construct(self, x: Tensor) -> Tensor:
        return ops.cat([branch(x) for branch in self.branches], 1)


class FidInceptionV3(nn.Cell):
    def __init__(self, layers: tuple[arch.Layer, ...] = arch.FID_INCEPTION_V3):
        super().__init__()
        cells = []
        for layer in layers:
            if isinstance(layer, arch.Pool):
                cells.append(pool_cell(layer))
                continue
            cell = BasicConv2d(layer) if isinstance(layer, arch.Conv) else Mixed(layer)
            self.insert_child_to_cell(layer.name, cell)
            cells.append(cell)
        self.body = nn.SequentialCell(cells)
        self.body.auto_prefix = False
        self.fc = nn.Dense(arch.POOL3_FEATURES, arch.NUM_CLASSES)  # in the weight file; unused by pool3

    def construct(self, x: Tensor) -> Tensor:
        return self.body(x).mean(axis=(2, 3))


def named_parameters(network: nn.Cell) -> dict[str, ms.Parameter]:
    return {name: param for name, param in network.parameters_and_names()}


class MindSporeInceptionFeatures:
    """Callable: (N, 3, 299, 299) float32 numpy -> (N, 2048) float32 pool3 features."""

    def __init__(self, state: dict[str, np.ndarray], source: str, device: str = "auto", mode: int = 1):
        configure_context(mode, device)
        self.network = FidInceptionV3()
        self.network.set_train(False)
        params = named_parameters(self.network)
        state = {arch.mindspore_name(k): v for k, v in state.items()}
        check_state_fits(state, {n: tuple(p.shape) for n, p in params.items()}, source,
                         "the FID InceptionV3 (MindSpore)")
        for name, param in params.items():
            param.set_data(Tensor(np.asarray(state[name], np.float32)))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.network(Tensor(np.ascontiguousarray(images, np.float32))).asnumpy()
