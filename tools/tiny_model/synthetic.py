"""Synthetic captioned shapes: the world the embedded tiny Stable Diffusion knows.

Images are flat-coloured shapes on flat backgrounds ("a red circle on a blue background"); the LoRA
target set adds a style the base model never saw (diagonal stripes, the token "sks"). Everything is
numpy and deterministic given a seed, so the tiny model and its datasets regenerate bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msd_lora.eval.tiny_world import COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, shape_mask

STYLE_TOKEN = "sks"


@dataclass(frozen=True)
class Scene:
    """One picture: what is drawn, where, and how it is described."""

    colour: str
    shape: str
    background: str
    position: str
    mention_position: bool
    striped: bool = False

    @property
    def caption(self) -> str:
        where = f" {POSITION_PHRASES[self.position]}" if self.mention_position else ""
        return (f"{_article(self.colour)} {self.colour} {self.shape}{where} on {_article(self.background)} "
                f"{self.background} background")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_scene(rng: np.random.Generator, striped: bool = False) -> Scene:
    """Draw a scene with distinct shape and background colours."""
    names = list(COLOURS)
    colour, background = rng.choice(names, size=2, replace=False)
    return Scene(
        colour=str(colour),
        shape=str(rng.choice(SHAPES)),
        background=str(background),
        position=str(rng.choice(list(POSITIONS))),
        mention_position=bool(rng.random() < 0.5),
        striped=striped,
    )


def stripes_mask(size: int, period: int, phase: int = 0) -> np.ndarray:
    """Diagonal stripes: True on the darker half of each period."""
    ys, xs = np.mgrid[0:size, 0:size]
    return ((xs + ys + phase) % period) < period // 2


def render(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render a scene to an HxWx3 uint8 image, with small jitter in position and size."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = COLOURS[scene.background]
    if scene.striped:
        darker = np.asarray(COLOURS[scene.background], np.float32) * 0.45
        img[stripes_mask(size, period=max(4, size // 5), phase=int(rng.integers(0, 8)))] = darker
    fx, fy = POSITIONS[scene.position]
    jitter = size * 0.04
    cx = fx * size + rng.uniform(-jitter, jitter)
    cy = fy * size + rng.uniform(-jitter, jitter)
    radius = size * rng.uniform(0.2, 0.26)
    img[shape_mask(scene.shape, size, cx, cy, radius)] = COLOURS[scene.colour]
    return img.round().clip(0, 255).astype(np.uint8)


def render_generic(size: int, rng: np.random.Generator) -> np.ndarray:
    """Any colours, any stripes: broader than the captioned world, to train an autoencoder that generalises."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.integers(0, 256, 3)
    if rng.random() < 0.5:
        period = int(rng.integers(3, size // 2))
        mask = stripes_mask(size, period, int(rng.integers(0, period)))
        if rng.random() < 0.5:
            mask = mask[:, ::-1]
        img[mask] = rng.integers(0, 256, 3)
    for _ in range(int(rng.integers(1, 3))):
        shape = str(rng.choice(SHAPES))
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        img[shape_mask(shape, size, cx, cy, size * rng.uniform(0.1, 0.35))] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def nearest_colour(rgb: np.ndarray) -> str:
    """Name of the palette colour closest to an RGB triple."""
    names = list(COLOURS)
    palette = np.asarray([COLOURS[n] for n in names], np.float32)
    return names[int(np.argmin(((palette - np.asarray(rgb, np.float32)) ** 2).sum(1)))]


def describe_colours(img: np.ndarray) -> tuple[str, str]:
    """(shape colour, background colour) of a rendered or generated image.

    The background is the median colour of the border pixels; the shape colour is the median of the
    pixels far from it (over half the largest distance), so the measure holds for imperfect samples too.
    """
    img = img.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    distance = np.sqrt(((img - background) ** 2).sum(-1)).ravel()
    pixels = img.reshape(-1, 3)
    far = pixels[distance >= 0.5 * distance.max()]
    return nearest_colour(np.median(far, axis=0)), nearest_colour(background)


def write_subject_images(folder, count: int = 8, size: int = 32, seed: int = 7) -> None:
    """The DreamBooth example's instance pictures (`tiny_world.render_subject`: a cyan circle on black) as PNGs."""
    from pathlib import Path

    from PIL import Image

    from msd_lora.eval.tiny_world import render_subject

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(render_subject(size, COLOURS["black"], rng)).save(folder / f"sks-{i}.png")


if __name__ == "__main__":  # python -m tools.tiny_model.synthetic: rewrites msd_lora/assets/tiny_dreambooth
    write_subject_images(Path(__file__).resolve().parents[2] / "msd_lora/assets/tiny_dreambooth")
