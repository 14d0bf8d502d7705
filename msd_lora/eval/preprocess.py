"""FID preprocessing: an 8-bit RGB image -> the InceptionV3 input, (3, 299, 299) float32 in about [-1, 1].

Three protocols, named by their resize (`--resize`); each fixes the resize filter and the input scaling of the
tool it reproduces, because both move FID. All resize float values to 299x299:

- `bilinear` (default) reproduces pytorch-fid: torch `interpolate(bilinear, align_corners=False)` without
  antialias, on x/255; input 2*(x/255) - 1.
- `pil_bicubic` reproduces clean-fid's "clean" mode: PIL bicubic with antialias, each channel as a float ('F')
  image, clipped to [0, 255]; input (x - 128) / 128.
- `pil_bilinear` reproduces torchmetrics' FrechetInceptionDistance (antialias=True, its default): PIL bilinear
  with antialias, per channel in float; input (x - 128) / 128.

No protocol re-quantises to uint8 after resizing. Generated images are read back from the PNG files sampling writes
(uint8), so real and generated images take the same path. Images already 299x299 are not resampled by any of them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from msd_lora.errors import ConfigError

INCEPTION_SIZE = 299


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bilinear (align_corners=False), in float32 as torch computes them:
    src = (dst + 0.5) * (in/out) - 0.5, clamped at 0; the upper neighbour is clamped at the edge."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    lower = np.minimum(src.astype(np.int64), n_in - 1)
    upper = np.minimum(lower + 1, n_in - 1)
    weight_upper = (src - lower.astype(np.float32)).astype(np.float32)
    return lower, upper, np.float32(1) - weight_upper, weight_upper


def resize_bilinear_torch(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """(H, W, C) float -> (size, size, C) float32, as torch.nn.functional.interpolate(mode='bilinear',
    align_corners=False, antialias=False) computes it (no low-pass filter when shrinking: that is pytorch-fid)."""
    x = np.asarray(image, np.float32)
    top, bottom, w_top, w_bottom = _linear_taps(x.shape[0], size)
    left, right, w_left, w_right = _linear_taps(x.shape[1], size)
    w_top, w_bottom, w_left, w_right = w_top[:, None, None], w_bottom[:, None, None], w_left[None, :, None], \
        w_right[None, :, None]
    rows_top, rows_bottom = x[top], x[bottom]
    return (w_top * (w_left * rows_top[:, left] + w_right * rows_top[:, right])
            + w_bottom * (w_left * rows_bottom[:, left] + w_right * rows_bottom[:, right]))


def resize_pil_float(image: np.ndarray, size: int, filter_name: str) -> np.ndarray:
    """(H, W, 3) -> (size, size, 3) float32: each channel resized as a float ('F' mode) PIL image, clipped to
    [0, 255] (clean-fid's `make_resizer("PIL", quantize_after=False, ...)`)."""
    from PIL import Image

    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[filter_name]
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c], np.float32), mode="F")
                           .resize((size, size), resample=resample)) for c in range(image.shape[2])]
    return np.clip(np.stack(channels, axis=2), 0, 255).astype(np.float32)


def _pytorch_fid(image: np.ndarray) -> np.ndarray:
    x = resize_bilinear_torch(image.astype(np.float32) / np.float32(255.0))
    return np.float32(2.0) * x - np.float32(1.0)


def _clean_fid(image: np.ndarray) -> np.ndarray:
    return (resize_pil_float(image, INCEPTION_SIZE, "bicubic") - np.float32(128.0)) / np.float32(128.0)


def _torchmetrics(image: np.ndarray) -> np.ndarray:
    return (resize_pil_float(image, INCEPTION_SIZE, "bilinear") - np.float32(128.0)) / np.float32(128.0)


@dataclass(frozen=True)
class Protocol:
    name: str
    reproduces: str
    prepare: Callable[[np.ndarray], np.ndarray]  # (H, W, 3) uint8 -> (299, 299, 3) float32 network input


PROTOCOLS = {
    "bilinear": Protocol("bilinear", "pytorch-fid", _pytorch_fid),
    "pil_bicubic": Protocol("pil_bicubic", "clean-fid (clean mode)", _clean_fid),
    "pil_bilinear": Protocol("pil_bilinear", "torchmetrics FrechetInceptionDistance (antialias=True)", _torchmetrics),
}
DEFAULT_RESIZE = "bilinear"


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown resize {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def inception_input(images: list[np.ndarray], resize: str = DEFAULT_RESIZE) -> np.ndarray:
    """uint8 (H, W, 3) images of any sizes -> (N, 3, 299, 299) float32 network input."""
    prepare = get_protocol(resize).prepare
    return np.stack([prepare(im).transpose(2, 0, 1) for im in images]).astype(np.float32)
