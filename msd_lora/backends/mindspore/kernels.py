"""CPU stand-ins for the ops mindone's Stable Diffusion networks call but MindSpore has no (exact) CPU kernel for.

MindSpore 2.10 registers no CPU kernel for several `mint` ops (the "Ext" kernels written for Ascend), so
mindone's UNet2DConditionModel, AutoencoderKL and CLIPTextModel stop on CPU with "kernel ... unregistered" or
"Unsupported op [...] on CPU". One kernel exists but is inexact: float32 `exp` on CPU is off by up to 8e-6
relative (numpy: 1.2e-7), which shifts the sinusoidal timestep features by up to 5e-3 at t = 999 and made
20 AdamW steps drift 4e-3 from torch. `apply_cpu_kernel_substitutes()` rebinds exactly those ops, at the attribute
mindone looks up at call time (`mint.<fn>`, `mint.nn.functional.<fn>`, `<Cell class>.construct`), to the op's
definition written with ops that do have CPU kernels. Cells keep their class, parameters and parameter names,
so no other file needs to know.

Verified against mindspore 2.10.0 and mindone 0.5.0 on CPU, PYNATIVE and GRAPH mode, forward and backward
(tests/mindspore/test_kernels.py); other versions get a warning, not an error. Only the CPU target is patched:
Ascend is what these kernels were written for, and GPU was not checked. Apply before compiling any `ms.jit`
function that runs the networks: a graph compiled earlier keeps the ops it was compiled with.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import mindspore as ms
from mindspore import mint, ops

VERIFIED_VERSIONS = {"mindspore": "2.10.0", "mindone": "0.5.0"}
_applied: list[str] = []
_originals: dict[str, Callable] = {}


# --- the substitutes, each written from the op's definition ------------------------------------------------------

def arange(start=0, end=None, step=1, *, dtype=None) -> ms.Tensor:
    """`mint.arange` (no PYNATIVE kernel): start, start+step, ... below end; `arange(n)` is [0, n)."""
    if end is None:
        start, end = 0, start
    return ops.arange(start, end, step, dtype=dtype)


def exp(input: ms.Tensor) -> ms.Tensor:
    """`mint.exp` computed in float64 and rounded back: the float32 CPU kernel is off by up to 8e-6 relative."""
    return ops.exp(input.astype(ms.float64)).astype(input.dtype)


def conv2d_by_matmul(x: ms.Tensor, weight: ms.Tensor, bias: ms.Tensor | None,
                     padding: tuple[int, int]) -> ms.Tensor:
    """Stride-1 2-D cross-correlation with zero padding as one matmul over the kernel's shifted taps.

    Tap (i, j) of a kh x kw kernel sees the padded input shifted by (i, j); the taps stacked on the channel axis
    form the (n, kh*kw*c, h_out*w_out) patch matrix, which the (out, kh*kw*c) weight matrix multiplies.
    """
    n, c, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    ph, pw = padding
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    if ph or pw:
        x = ops.Pad(((0, 0), (0, 0), (ph, ph), (pw, pw)))(x)  # not ops.pad: see `pad`
    taps = []
    for k in range(kh * kw):  # a plain loop: GRAPH mode accepts one `for` per comprehension only
        i, j = k // kw, k % kw
        taps.append(x[:, :, i:i + ho, j:j + wo])
    patches = mint.cat(taps, dim=1).reshape(n, kh * kw * c, ho * wo)
    weight_matrix = weight.transpose(0, 2, 3, 1).reshape(out_channels, kh * kw * c)
    y = mint.matmul(weight_matrix, patches).reshape(n, out_channels, ho, wo)
    return y if bias is None else y + bias.reshape(1, out_channels, 1, 1)


def conv2d_construct(self, x: ms.Tensor) -> ms.Tensor:
    """`mint.nn.Conv2d.construct` (Conv2DExt has no CPU kernel), for integer zero padding as all SD convs use.

    Stride-1 convs with a kernel larger than 1x1 take the matmul form: in GRAPH mode its forward was 3-8x faster
    than the legacy CPU Conv2D kernel on the tiny UNet's 3x3 convs and 30-45x on SD-sized ones. 1x1 and strided
    convs keep the legacy kernel: it is faster at 1x1, and the matmul form would need strided slices, whose
    gradient (StridedSliceGrad) fails on CPU in PYNATIVE mode.
    """
    if self.stride == (1, 1) and self.kernel_size != (1, 1) and self.dilation == (1, 1) and self.groups == 1:
        return conv2d_by_matmul(x, self.weight, self.bias, self.padding)
    return ops.conv2d(x, self.weight, self.bias, self.stride, "pad", self.padding, self.dilation, self.groups)


def layer_norm(x: ms.Tensor, normalized_shape: tuple[int, ...], weight: ms.Tensor | None,
               bias: ms.Tensor | None, eps: float) -> ms.Tensor:
    """Layer norm: (x - mean) / sqrt(biased variance + eps) over the trailing dims, then weight and bias."""
    axes = tuple(range(-len(normalized_shape), 0))
    centred = x - x.mean(axes, keep_dims=True)
    y = centred * ops.rsqrt((centred * centred).mean(axes, keep_dims=True) + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def layer_norm_construct(self, x: ms.Tensor) -> ms.Tensor:
    """`mint.nn.LayerNorm.construct` (LayerNormExt has no CPU kernel)."""
    return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def gelu(input: ms.Tensor, approximate: str = "none") -> ms.Tensor:
    """`mint.nn.functional.gelu` (GeluExt has no CPU kernel): x * Phi(x), exact (erf) or tanh-approximated.

    The tanh form 0.5 * x * (1 + tanh(u)) is computed as the identical x * sigmoid(2u): MindSpore's CPU tanh
    is off by up to 1e-4.
    """
    x = input
    if approximate == "tanh":
        return x * ops.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x))
    return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))


def pad(input: ms.Tensor, pad: tuple[int, ...], mode: str = "constant", value: float | None = None) -> ms.Tensor:
    """`mint.nn.functional.pad` in constant mode (ConstantPadND has no PYNATIVE CPU kernel); other modes unchanged.

    `pad` lists (before, after) pairs from the last dim backwards. Built on the legacy zero-padding Pad kernel:
    the gradient of ConstantPadND/PadV3 (mint's and `ops.pad`) hangs after a few runs of a compiled graph.
    """
    if mode != "constant":
        return _originals["mint.nn.functional.pad"](input, pad, mode, value)
    ndim, pairs = input.ndim, len(pad) // 2
    zero_pad = ops.Pad(tuple((pad[2 * (ndim - 1 - d)], pad[2 * (ndim - 1 - d) + 1]) if ndim - 1 - d < pairs
                             else (0, 0) for d in range(ndim)))
    padded = zero_pad(input)
    if value:
        padded = padded + value * (1.0 - zero_pad(ops.ones_like(input)))  # value on the border only
    return padded


def mse_loss(input: ms.Tensor, target: ms.Tensor, reduction: str = "mean") -> ms.Tensor:
    """`mint.nn.functional.mse_loss` (MSELossExt has no CPU kernel): (input - target)^2, reduced."""
    squared = (input - target) * (input - target)
    if reduction == "mean":
        return squared.mean()
    return squared.sum() if reduction == "sum" else squared


def geglu_construct(self, hidden_states: ms.Tensor) -> ms.Tensor:
    """mindone `GEGLU.construct`: value * gelu(gate), the projection's two halves taken by slicing.

    mindone splits them with `Tensor.chunk(2, dim=-1)`, which GRAPH mode compiles to the Chunk kernel CPU lacks;
    Tensor methods are dispatched in C++, so the Cell that calls it is the narrowest point Python can patch.
    """
    projected = self.proj(hidden_states)
    half = projected.shape[-1] // 2
    return projected[..., :half] * self.gelu(projected[..., half:])


# --- applying them ------------------------------------------------------------------------------------------------

def _substitutes() -> dict[str, tuple[object, str, Callable]]:
    """name -> (owner, attribute, replacement)."""
    from mindone.diffusers.models.activations import GEGLU

    return {
        "mint.arange": (mint, "arange", arange),
        "mint.exp": (mint, "exp", exp),
        "mint.nn.Conv2d.construct": (mint.nn.Conv2d, "construct", conv2d_construct),
        "mint.nn.LayerNorm.construct": (mint.nn.LayerNorm, "construct", layer_norm_construct),
        "mint.nn.functional.gelu": (mint.nn.functional, "gelu", gelu),
        "mint.nn.functional.pad": (mint.nn.functional, "pad", pad),
        "mint.nn.functional.mse_loss": (mint.nn.functional, "mse_loss", mse_loss),
        "mindone.diffusers GEGLU.construct": (GEGLU, "construct", geglu_construct),
    }


def needs_substitutes(device_target: str) -> bool:
    """Whether to patch on this device target: CPU only (GPU was not checked; Ascend is left untouched)."""
    return device_target == "CPU"


def warn_on_unverified_versions() -> None:
    """Warn when mindspore / mindone differ from the versions the substitutes were verified with."""
    import mindone

    found = {"mindspore": ms.__version__, "mindone": mindone.__version__}
    if found != VERIFIED_VERSIONS:
        warnings.warn(f"CPU kernel substitutes were verified with {VERIFIED_VERSIONS}, found {found}: check that "
                      "tests/mindspore/test_kernels.py still passes", UserWarning, stacklevel=3)


def apply_cpu_kernel_substitutes() -> list[str]:
    """Rebind the ops MindSpore lacks on the current device target; idempotent. Returns the names substituted."""
    if _applied or not needs_substitutes(ms.get_context("device_target")):
        return list(_applied)
    warn_on_unverified_versions()
    for name, (owner, attribute, replacement) in _substitutes().items():
        _originals[name] = getattr(owner, attribute)
        setattr(owner, attribute, replacement)
        _applied.append(name)
    return list(_applied)
