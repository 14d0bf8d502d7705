"""Image transforms shared by the data pipeline: PIL in, float32 CHW in [-1, 1] out (and back).

Pure functions, numpy + PIL only, so both backends (PyTorch, MindSpore) use the same pixels.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# Transparent pixels are composited onto white: scraped PNG/WebP with alpha are mostly logos and
# cut-outs shown on white pages, and black would invent a dark background the caption never mentions.
ALPHA_BACKGROUND = (255, 255, 255)


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale PNG/TIFF open in one of these


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, 16-bit greyscale ...) to RGB; alpha is composited onto white.

    16-bit greyscale is scaled to 8 bits (PIL's own conversion clips every value above 255 to white)."""
    if img.mode in SIXTEEN_BIT_MODES:
        levels = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(levels.round(), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":  # 32-bit float greyscale, by convention in [0, 1]
        levels = np.asarray(img, dtype=np.float64) * 255.0
        return Image.fromarray(np.clip(levels.round(), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def crop_box(size: tuple[int, int], target: tuple[int, int],
             rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a `target` (width, height) window in an image of `size`: centred when `rng` is
    None, else at an offset drawn from `rng`."""
    (width, height), (tw, th) = size, target
    if width < tw or height < th:
        raise ValueError(f"cannot crop {tw}x{th} from a {width}x{height} image; resize it first")
    if rng is None:
        left, top = (width - tw) // 2, (height - th) // 2
    else:
        left = int(rng.integers(0, width - tw + 1))
        top = int(rng.integers(0, height - th + 1))
    return left, top, left + tw, top + th


def hflip(img: Image.Image) -> Image.Image:
    """Mirror left to right."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 CHW array in [-1, 1] (x / 127.5 - 1)."""
    hwc = np.asarray(img, dtype=np.float32)
    if hwc.ndim != 3:
        raise ValueError(f"expected a multi-channel image, got mode {img.mode!r}; call to_rgb first")
    return np.ascontiguousarray((hwc / 127.5 - 1.0).transpose(2, 0, 1))


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Inverse of to_array: CHW (or NCHW) floats in [-1, 1] -> HWC (or NHWC) uint8, clipped and rounded."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim not in (3, 4):
        raise ValueError(f"expected CHW or NCHW, got shape {x.shape}")
    pixels = np.clip((x + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(pixels, -3, -1))
