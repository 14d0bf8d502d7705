"""The embedded tiny model's world: which shapes exist, where they sit, how they are drawn, and the "sks" style.

`tools/tiny_model/synthetic.py` renders the tiny model's training images and its LoRA's sepia target set with these
definitions, and `msd_lora.eval.content` recognises them in samples, so both read one source.
"""
from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
}

POSITIONS = {  # name -> (x, y) centre as a fraction of the image side
    "center": (0.5, 0.5),
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
}
POSITION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}


def shape_mask(shape: str, size: int, cx, cy, radius) -> np.ndarray:
    """Boolean mask of a shape centred at (cx, cy) in pixels, sampled at pixel centres. `cx`, `cy`, `radius` may be
    arrays of one shape (N, 1, 1): then N masks (N, size, size)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = radius * 0.85
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # apex up, base at cy + radius*0.75
        top, bottom = cy - radius, cy + radius * 0.75
        inside_rows = (ys >= top) & (ys <= bottom)
        half_width = (ys - top) / (bottom - top) * radius
        return inside_rows & (np.abs(dx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


SEPIA = np.asarray([1.0, 0.78, 0.52], np.float32)


def sepia(img: np.ndarray) -> np.ndarray:
    """The demo LoRA's target style: luminance re-tinted brown, a palette the base model never saw."""
    grey = img.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
    return (grey[..., None] * SEPIA + np.asarray([40, 20, 0], np.float32)).round().clip(0, 255).astype(np.uint8)


# The DreamBooth example's subject: a circle in a colour pretraining never showed ("sks circle")
SUBJECT_COLOUR = np.asarray([40, 215, 215], np.float32)  # cyan
SUBJECT_SHAPE = "circle"


def render_subject(size: int, background: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """One instance picture of the subject: a cyan circle at a jittered place and size on `background`."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = background
    cx, cy = rng.uniform(0.4, 0.6, 2) * size
    img[shape_mask(SUBJECT_SHAPE, size, cx, cy, size * rng.uniform(0.2, 0.28))] = SUBJECT_COLOUR
    return img.round().clip(0, 255).astype(np.uint8)


def foreground_colour(img: np.ndarray) -> np.ndarray | None:
    """The mean RGB of a picture's foreground (`content.foreground`), None when nothing stands out."""
    from msd_lora.eval.content import foreground

    mask = foreground(img)
    return None if mask is None else img.reshape(-1, 3)[mask.reshape(-1)].astype(np.float32).mean(0)


SUBJECT = "subject"  # `drawn_colour`'s name for the subject's cyan


def drawn_colour(img: np.ndarray) -> str | None:
    """The colour of a picture's foreground: the nearest of the world's palette and the subject's cyan (`SUBJECT`);
    None when nothing stands out."""
    colour = foreground_colour(img)
    if colour is None:
        return None
    names = [*COLOURS, SUBJECT]
    palette = np.asarray([*COLOURS.values(), SUBJECT_COLOUR], np.float32)
    return names[int(((palette - colour) ** 2).sum(1).argmin())]


def shows_subject_colour(img: np.ndarray) -> bool:
    """Whether the foreground's colour is nearer the subject's cyan than every colour of the world's palette."""
    return drawn_colour(img) == SUBJECT


def prompted_colour(prompt: str) -> str | None:
    """The shape colour a tiny-world prompt asks for (the palette word before the shape), None when it names none."""
    words = prompt.lower().replace(",", " ").split()
    for before, word in zip(words, words[1:]):
        if word in SHAPES and before in COLOURS:
            return before
    return None
