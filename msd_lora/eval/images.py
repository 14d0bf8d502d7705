"""Finding and reading evaluation images.

Accepted extensions (case-insensitive): IMAGE_EXTENSIONS. Folders are searched recursively and files are taken in
natural path order, digit runs compared as numbers (so text_to_image.py's `samples/00000.png, ..., 99999.png,
100000.png` keep the order it wrote them in, where plain sorting would put 100000.png before 10001.png). Other files
are skipped and reported. Every image becomes 8-bit RGB the way pytorch-fid and clean-fid do it, PIL's
`convert("RGB")`: grayscale is replicated to three channels, palette images are expanded, and an alpha channel is
dropped (not composited on a background); what was converted is reported.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msd_lora.data.sources import IMAGE_EXTENSIONS
from msd_lora.errors import ImageInputError

CONVERSIONS = {  # PIL mode -> what convert("RGB") does to it
    "L": "grayscale, replicated to 3 channels",
    "LA": "grayscale + alpha, replicated to 3 channels, alpha dropped",
    "1": "1-bit, replicated to 3 channels",
    "P": "palette, expanded to RGB (any transparency dropped)",
    "PA": "palette + alpha, expanded to RGB, alpha dropped",
    "RGBA": "alpha dropped, not composited",
    "RGBa": "premultiplied alpha dropped",
    "CMYK": "CMYK converted to RGB by PIL",
    "YCbCr": "YCbCr converted to RGB by PIL",
    "I;16": "16-bit grayscale clipped to 8 bits by PIL, replicated",
    "I": "32-bit integer grayscale clipped to 8 bits by PIL, replicated",
    "F": "float grayscale clipped to 8 bits by PIL, replicated",
}


@dataclass
class ImageSet:
    """The image files of one folder (or one file), plus what was skipped."""

    root: Path
    files: list[Path]
    skipped: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def describe_skipped(self) -> str:
        if not self.skipped:
            return ""
        names = ", ".join(str(p.relative_to(self.root)) for p in self.skipped[:5])
        more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
        return (f"{self.root}: skipped {len(self.skipped)} non-image file(s) ({names}{more}); "
                f"images are {', '.join(IMAGE_EXTENSIONS)}")


def natural_key(path: Path) -> tuple:
    """Sort key comparing each path part's digit runs as numbers: 99999.png < 100000.png, img2 < img10."""
    parts = [re.split(r"(\d+)", part) for part in path.parts]  # digit runs at the odd positions
    return [[int(c) if i % 2 else c for i, c in enumerate(chunks)] for chunks in parts], str(path)


def find_images(path: str | Path, what: str = "image folder") -> ImageSet:
    """All images under `path` (a folder, searched recursively, or one image file), in natural path order."""
    root = Path(path)
    if not root.exists():
        raise ImageInputError(f"{what} {root} does not exist")
    if root.is_file():
        if root.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ImageInputError(f"{what} {root} is not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        return ImageSet(root.parent, [root])
    files, skipped = [], []
    for p in sorted((q for q in root.rglob("*") if q.is_file()), key=natural_key):
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue  # hidden files and folders (.ipynb_checkpoints, .DS_Store)
        (files if p.suffix.lower() in IMAGE_EXTENSIONS else skipped).append(p)
    if not files:
        found = f"; it holds {len(skipped)} other file(s)" if skipped else " (it is empty)"
        raise ImageInputError(f"{what} {root} has no images ({', '.join(IMAGE_EXTENSIONS)}, searched recursively)"
                              f"{found}")
    return ImageSet(root, files, skipped)


def sample_folder(path: str | Path) -> Path:
    """A text_to_image.py output folder (samples.jsonl + samples/) means its samples/ subfolder; else `path`."""
    path = Path(path)
    if (path / "samples.jsonl").is_file() and (path / "samples").is_dir():
        return path / "samples"
    return path


def read_rgb(path: Path) -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 RGB pixels and the source mode (PIL's name, e.g. 'RGB', 'L', 'RGBA')."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mode = image.mode
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageInputError(f"{path} is not a readable image: {err}") from err
    return pixels, mode


def prompted_samples(folder: Path) -> tuple[list[np.ndarray], list[str]] | None:
    """(images, their prompts) of a folder text_to_image.py wrote (its samples.jsonl), None for other folders."""
    index = folder / "samples.jsonl"
    if not index.is_file():
        return None
    entries = [json.loads(line) for line in index.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [read_rgb(folder / entry["file"])[0] for entry in entries], [entry["prompt"] for entry in entries]


def read_rgb_batch(paths: list[Path], log: ConversionLog) -> list[np.ndarray]:
    """Several images as uint8 RGB, their source modes counted in `log`."""
    pixels = []
    for path in paths:
        rgb, mode = read_rgb(path)
        log.add(mode)
        pixels.append(rgb)
    return pixels


class ConversionLog:
    """Counts which images were converted to RGB, to report once per folder."""

    def __init__(self) -> None:
        self.modes: Counter[str] = Counter()

    def add(self, mode: str) -> None:
        if mode != "RGB":
            self.modes[mode] += 1

    def summary(self, root: Path) -> str:
        if not self.modes:
            return ""
        parts = [f"{n} {mode} ({CONVERSIONS.get(mode, 'converted by PIL')})" for mode, n in sorted(self.modes.items())]
        return f"{root}: converted to RGB: " + "; ".join(parts)
