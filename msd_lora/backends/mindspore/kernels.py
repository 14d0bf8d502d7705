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
from collections.abc import Callable

import mindspore as ms
from mindspore import mint, ops

VERIFIED_VERSIONS = {"mindspore": "2.10.0", "mindone": "0.5.0"}
_applied: list[str] = []
_originals: dict[str, Callable] = {}
_dynamic_shapes = False  # set by apply_dynamic_shape_substitutes


# --- the substitutes, each written from the op's definition ------------------------------------------------------

def arange(start=0, end=None, step=1, *, dtype=None) -> ms.Tensor:
    """`mint.arange` (no PYNATIVE kernel): start, start+step, ... below end; `arange(n)` is [0, n)."""
    if end is None:
        start, end = 0, start
    return ops.arange(start, end, step, dtype=dtype)


def exp(input: ms.Tensor) -> ms.Tensor:
    """`mint.exp` computed in float64 and rounded back: the float32 CPU kernel is off by up to 8e-6 relative."""
    return ops.exp(input.astype(ms.float64)).astype(input.dtype)


def _tap_indices(h: int, w: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int]) -> tuple[ms.Tensor, int, int]:
    """Flat input positions each kernel tap reads for each output pixel; `h * w` (a zero slot) where it reads padding.

    Returns (indices of shape (kh * kw * h_out * w_out,), h_out, w_out). Built from shape constants only.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = ops.arange(0, kh, 1, dtype=ms.int32).reshape(kh, 1) * dh + ops.arange(0, ho, 1, dtype=ms.int32) * sh - ph
    cols = ops.arange(0, kw, 1, dtype=ms.int32).reshape(kw, 1) * dw + ops.arange(0, wo, 1, dtype=ms.int32) * sw - pw
    rows, cols = rows.reshape(kh, 1, ho, 1), cols.reshape(1, kw, 1, wo)
    inside = ops.logical_and(ops.logical_and(rows >= 0, rows < h), ops.logical_and(cols >= 0, cols < w))
    flat = ops.select(inside, rows * w + cols, ops.full_like(rows * w + cols, h * w))
    return flat.reshape(-1), ho, wo


def conv2d_by_gather(x: ms.Tensor, weight: ms.Tensor, bias: ms.Tensor | None, stride: tuple[int, int],
                     padding: tuple[int, int], dilation: tuple[int, int]) -> ms.Tensor:
    """2-D cross-correlation with zero padding as one gather (im2col) and one matmul.

    The input, flattened per channel and followed by one zero (the padding slot), is gathered at the positions
    every tap of every output pixel reads: an (n, c * kh * kw, h_out * w_out) patch matrix whose row order
    matches the weight's (out, c, kh, kw) layout, so the weight multiplies it reshaped, untransposed.
    Where the output has fewer pixels than channels (SD's deep, low-resolution blocks) the patches are turned
    to rows and multiplied as a dense layer instead: there the weight is the large operand, and the batched
    form's backward held about three weight-sized buffers (SD1.5-size: 2x faster, a quarter of the memory).
    """
    n, c, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    if (kh, kw) == (1, 1) and stride == (1, 1) and padding == (0, 0):
        patches, ho, wo = x.reshape(n, c, h * w), h, w
    else:
        index, ho, wo = _tap_indices(h, w, (kh, kw), stride, padding, dilation)
        flat = mint.cat([x.reshape(n, c, h * w), ops.zeros((n, c, 1), x.dtype)], dim=2)
        patches = ops.gather(flat, index, 2).reshape(n, c * kh * kw, ho * wo)
    weight_matrix = weight.reshape(out_channels, c * kh * kw)
    if not _dynamic_shapes and n * ho * wo <= out_channels:  # a shape-dependent branch only where shapes are static
        rows = patches.transpose(0, 2, 1).reshape(n * ho * wo, c * kh * kw)
        y = ops.dense(rows, weight_matrix).reshape(n, ho * wo, out_channels).transpose(0, 2, 1)
    else:
        y = mint.matmul(weight_matrix, patches)
    y = y.reshape(n, out_channels, ho, wo)
    return y if bias is None else y + bias.reshape(1, out_channels, 1, 1)


def conv2d_construct(self, x: ms.Tensor) -> ms.Tensor:
    """`mint.nn.Conv2d.construct` (Conv2DExt has no CPU kernel), for the integer zero padding all SD convs use.

    Ungrouped convs take the gather + matmul form: in GRAPH mode, forward+backward of a 3x3 conv took 14 ms
    against 147 ms for the legacy CPU Conv2D kernel (64 channels, 16x16, batch 4) and 106 ms against 3314 ms
    (320 channels, 32x32, batch 1), equal to 1e-6 relative. Convs SD never uses (grouped, string or non-zero
    padding modes) keep the legacy kernel, with zero padding.
    """
    if self.groups == 1 and self.padding_mode == "zeros" and not isinstance(self.padding, str):
        return conv2d_by_gather(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
    if self.padding_mode != "zeros":
        raise NotImplementedError(f"padding_mode {self.padding_mode!r} has no CPU substitute")
    if isinstance(self.padding, str):
        return ops.conv2d(x, self.weight, self.bias, self.stride, self.padding, 0, self.dilation, self.groups)
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


def upsample2d_construct(self, hidden_states: ms.Tensor, output_size=None) -> ms.Tensor:
    """mindone's `Upsample2D.construct` for graphs with dynamic height and width: norm, nearest 2x, conv. mindone's
    own makes the tensor contiguous under a size test (`numel() * 2 > 2**31`), a branch on a runtime value that a
    dynamic-shape graph cannot compile ("Failed to find input ... PrimFunc_Contiguous"); contiguity changes no
    value, so the test is dropped. `output_size` is always 2x here: buckets' sides are multiples of the UNet's
    whole downsampling factor, the only case where the UNet passes none."""
    if self.norm is not None:
        hidden_states = self.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if self.use_conv_transpose:
        return self.conv(hidden_states)
    if self.interpolate:
        _, _, h, w = hidden_states.shape
        hidden_states = mint.nn.functional.interpolate(hidden_states, size=(h * 2, w * 2), mode="nearest")
    if self.use_conv:
        hidden_states = self.conv(hidden_states) if self.name == "conv" else self.Conv2d_0(hidden_states)
    return hidden_states


def apply_dynamic_shape_substitutes() -> list[str]:  # noqa: PLW0603 (one switch, set once per process)
    """What graphs with dynamic height and width need, on any device target: the upsampler above, and convolutions
    in one form for every size (`conv2d_by_gather` otherwise picks its form by the output's size). Idempotent."""
    global _dynamic_shapes
    if not _dynamic_shapes:
        from mindone.diffusers.models.upsampling import Upsample2D

        _originals["Upsample2D.construct"] = Upsample2D.construct
        Upsample2D.construct = upsample2d_construct
        _dynamic_shapes = True
    return ["mindone.diffusers Upsample2D.construct", "conv2d_by_gather: one form"]


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


def cpu_substitutes_applied() -> bool:
    """True once `apply_cpu_kernel_substitutes` has rebound ops (the CPU target)."""
    return bool(_applied)


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
