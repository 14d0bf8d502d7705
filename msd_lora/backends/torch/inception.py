"""pytorch-fid's FID InceptionV3 in torch, built from msd_lora.eval.inception_arch; parameter names are the weight
file's, so its state dict loads unchanged. Input: (N, 3, 299, 299) float32 already scaled (msd_lora.eval.preprocess);
output: pool3 features (N, 2048)."""
from __future__ import annotations

import pickle
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msd_lora.backends.torch.networks import resolve_device
from msd_lora.eval import inception_arch as arch
from msd_lora.models.state_check import check_state_fits


class BasicConv2d(nn.Module):
    def __init__(self, spec: arch.Conv):
        super().__init__()
        self.conv = nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel, spec.stride, spec.padding, bias=False)
        self.bn = nn.BatchNorm2d(spec.out_channels, eps=arch.BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def pool(spec: arch.Pool, x: torch.Tensor) -> torch.Tensor:
    if spec.kind == "max":
        return F.max_pool2d(x, spec.kernel, spec.stride, spec.padding)
    return F.avg_pool2d(x, spec.kernel, spec.stride, spec.padding, count_include_pad=False)


class Mixed(nn.Module):
    def __init__(self, spec: arch.Mixed):
        super().__init__()
        self.spec = spec
        for branch in spec.branches:
            for conv in arch.branch_convs(branch):
                self.add_module(conv.name, BasicConv2d(conv))

    def _op(self, op: arch.Op, x: torch.Tensor) -> torch.Tensor:
        if isinstance(op, arch.Pool):
            return pool(op, x)
        if isinstance(op, arch.Fork):
            return torch.cat([self._op(op.left, x), self._op(op.right, x)], 1)
        return getattr(self, op.name)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for branch in self.spec.branches:
            y = x
            for op in branch:
                y = self._op(op, y)
            outputs.append(y)
        return torch.cat(outputs, 1)


class FidInceptionV3(nn.Module):
    def __init__(self, layers: tuple[arch.Layer, ...] = arch.FID_INCEPTION_V3):
        super().__init__()
        self.layers = layers
        for layer in layers:
            if isinstance(layer, arch.Conv):
                self.add_module(layer.name, BasicConv2d(layer))
            elif isinstance(layer, arch.Mixed):
                self.add_module(layer.name, Mixed(layer))
        self.fc = nn.Linear(arch.POOL3_FEATURES, arch.NUM_CLASSES)  # in the weight file; unused by pool3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = pool(layer, x) if isinstance(layer, arch.Pool) else getattr(self, layer.name)(x)
        return x.mean(dim=(2, 3))


class TorchInceptionFeatures:
    """Callable: (N, 3, 299, 299) float32 numpy -> (N, 2048) float32 pool3 features."""

    def __init__(self, state: dict[str, np.ndarray], source: str, device: str = "auto"):
        self.device = resolve_device(device)
        self.network = FidInceptionV3().eval()
        check_state_fits(state, arch.state_shapes(), source, "the FID InceptionV3")
        buffers = {n: b for n, b in self.network.state_dict().items() if n.endswith("num_batches_tracked")}
        self.network.load_state_dict({**buffers, **{n: torch.from_numpy(np.array(v, np.float32))
                                                    for n, v in state.items()}}, strict=True)
        self.network.to(self.device)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(self.device)
        return self.network(x).float().cpu().numpy()


def read_pth_state(path: str) -> dict[str, np.ndarray]:
    """A torch state-dict file (.pth) as numpy arrays, read with `torch.load(weights_only=True)`: no code runs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's text goes on to advise allow-listing the global: not repeated
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        asked = f"it asks for {found.group(1)}, which is no tensor or plain container" if found else \
            "it holds objects that are no tensors or plain containers"
        raise ValueError(f"refused without running it: {asked}, and a pickle can run code") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a state dict")
    return {k: v.detach().cpu().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}
