"""Image transforms shared by the data pipeline: PIL in, float32 CHW in [-1, 1] out (and back).

Pure functions, numpy + PIL only, so both backends (PyTorch, MindSpore) use the same pixels.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# Transparent pixels are composited onto white: scraped PNG/WebP with alpha are mostly logos and
# cut-outs shown on white pages, and black would invent a dark background the caption never mentions.
ALPHA_BACKGROUND = (255, 255, 255)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16 ...) to RGB; alpha is composited onto white."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Resize with bicubic filtering so the shorter side is exactly `size`, keeping the aspect ratio."""
    width, height = img.size
    if min(width, height) == size:
        return img
    if width <= height:
        new_size = (size, round(height * size / width))
    else:
        new_size = (round(width * size / height), size)
    return img.resize(new_size, Image.Resampling.BICUBIC)


def crop(img: Image.Image, size: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Crop a `size`x`size` square: centred when `rng` is None, else at an offset drawn from `rng`."""
    width, height = img.size
    if width < size or height < size:
        raise ValueError(f"cannot crop {size}x{size} from a {width}x{height} image; resize it first")
    if rng is None:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left = int(rng.integers(0, width - size + 1))
        top = int(rng.integers(0, height - size + 1))
    return img.crop((left, top, left + size, top + size))


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
