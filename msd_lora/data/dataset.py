"""Captioned image folders in mindone's Stable Diffusion layout (img_txt.csv + images).

Backend-neutral: numpy + PIL only. Images come out as float32 CHW arrays in [-1, 1].
"""
from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, ImageOps

from msd_lora.data import transforms
from msd_lora.errors import DatasetError

CSV_NAME = "img_txt.csv"
LAYOUT_HINT = (
    f"expected a folder containing {CSV_NAME} with a header row 'dir,text' "
    "(dir = image path relative to the folder, text = caption) and the images it lists"
)
_WARN_EXAMPLES = 5


class SkippedImagesWarning(UserWarning):
    """Some images listed in the csv were missing or undecodable and were left out."""


class CaptionedImageDataset:
    """Images and captions listed in ``<data_path>/img_txt.csv`` (columns ``dir``, ``text``).

    Policy for bad images: a listed file that is missing or fails PIL's ``verify()`` (a check of
    headers and structure, cheap next to decoding) is skipped at construction, recorded in
    ``skipped`` with the reason, and reported in one ``SkippedImagesWarning`` with the count and
    the first few names. One bad file in a scraped dataset should not kill a long run, but the
    user must see it; deciding at construction keeps the item list, hence the batch order, fixed
    for exact resume. If nothing is left, or a file that passed ``verify()`` fails to decode in
    ``load``, a ``DatasetError`` names it. A malformed csv (missing folder/file/column, no rows,
    empty image path, a path leaving ``data_path``) is always an error.

    Images are EXIF-rotated, converted to RGB (transparency composited onto white), resized so
    the short side is ``image_size`` (bicubic), cropped to a square (centred, or at a random
    offset when ``random_crop``), optionally mirrored with probability 0.5 (``flip``), and
    scaled to float32 CHW in [-1, 1].
    """

    def __init__(self, data_path: str | Path, image_size: int, random_crop: bool = False,
                 flip: bool = False, caption_column: str = "text", image_column: str = "dir") -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.data_path = Path(data_path)
        self.image_size = image_size
        self.random_crop = random_crop
        self.flip = flip
        self.csv_path = self.data_path / CSV_NAME
        rows = _read_rows(self.data_path, self.csv_path, image_column, caption_column)
        self.image_paths: list[Path] = []
        self.captions: list[str] = []
        self.skipped: list[tuple[Path, str]] = []
        for path, caption in rows:
            problem = _check_image(path)
            if problem is None:
                self.image_paths.append(path)
                self.captions.append(caption)
            else:
                self.skipped.append((path, problem))
        self._report_skipped(len(rows))

    def __len__(self) -> int:
        return len(self.image_paths)

    def load(self, index: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, str]:
        """Image `index` as float32 CHW in [-1, 1] and its caption.

        `rng` drives random crop and flip and is required when either is enabled; pass
        ``batching.augmentation_rng(seed, epoch, batch_index)`` so resumed runs augment identically.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        if (self.random_crop or self.flip) and rng is None:
            raise ValueError("random_crop/flip need an rng; pass batching.augmentation_rng(seed, epoch, index)")
        img = transforms.to_rgb(_decode(self.image_paths[index]))
        img = transforms.resize_short_side(img, self.image_size)
        img = transforms.crop(img, self.image_size, rng if self.random_crop else None)
        if self.flip and rng.random() < 0.5:
            img = transforms.hflip(img)
        return transforms.to_array(img), self.captions[index]

    def _report_skipped(self, listed: int) -> None:
        if not self.skipped:
            return
        examples = "; ".join(f"{p.name} ({why})" for p, why in self.skipped[:_WARN_EXAMPLES])
        more = len(self.skipped) - _WARN_EXAMPLES
        summary = (f"skipped {len(self.skipped)} of {listed} images listed in {self.csv_path}: "
                   f"{examples}" + (f"; and {more} more (see .skipped)" if more > 0 else ""))
        if not self.image_paths:
            raise DatasetError(f"no usable images: {summary}")
        warnings.warn(summary, SkippedImagesWarning, stacklevel=3)


def _read_rows(data_path: Path, csv_path: Path, image_column: str,
               caption_column: str) -> list[tuple[Path, str]]:
    """(image path, caption) for every csv row, with the layout and the paths validated."""
    if not data_path.is_dir():
        state = "is not a directory" if data_path.exists() else "does not exist"
        raise DatasetError(f"data_path {data_path} {state}; {LAYOUT_HINT}")
    if not csv_path.is_file():
        raise DatasetError(f"missing {csv_path}; {LAYOUT_HINT}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise DatasetError(f"{csv_path} is empty; {LAYOUT_HINT}")
            reader.fieldnames = [name.strip() for name in reader.fieldnames]
            for role, column in (("image", image_column), ("caption", caption_column)):
                if column not in reader.fieldnames:
                    raise DatasetError(
                        f"{csv_path} has no {role} column {column!r}; columns found: {reader.fieldnames}. The header "
                        f"row names the columns {image_column},{caption_column} (the image path, then its caption): "
                        f"rename them there")
            rows = [_parse_row(row, reader.line_num, csv_path, data_path, image_column, caption_column)
                    for row in reader]
    except UnicodeDecodeError as err:
        raise DatasetError(f"{csv_path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8 "
                           f"(e.g. iconv -f latin1 -t utf-8)") from err
    if not rows:
        raise DatasetError(f"{csv_path} has a header but no rows; list at least one image")
    return rows


def _parse_row(row: dict, line: int, csv_path: Path, data_path: Path, image_column: str,
               caption_column: str) -> tuple[Path, str]:
    relative, caption = row.get(image_column), row.get(caption_column)
    if not relative or not relative.strip() or caption is None:
        raise DatasetError(f"{csv_path} line {line}: empty {image_column!r} or missing {caption_column!r} value")
    return data_path / _safe_relative(relative.strip(), csv_path, line), caption


def _safe_relative(relative: str, csv_path: Path, line: int) -> str:
    """`relative` normalised, or an error if it is absolute or escapes the dataset folder."""
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute() \
            or PureWindowsPath(relative).drive:
        raise DatasetError(f"{csv_path} line {line}: image path {relative!r} is absolute; "
                           f"paths must be relative to {csv_path.parent}")
    normal = os.path.normpath(relative)
    if Path(normal).parts[:1] == ("..",):
        raise DatasetError(f"{csv_path} line {line}: image path {relative!r} leaves the dataset folder "
                           f"{csv_path.parent}; move the image inside it")
    return normal


def _check_image(path: Path) -> str | None:
    """None if `path` looks like a readable image, else why not."""
    if not path.is_file():
        return "file not found" if not path.exists() else "not a regular file"
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error ...) for bad files
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


def _decode(path: Path) -> Image.Image:
    """Fully decode `path` (EXIF orientation applied), or raise a DatasetError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except Exception as exc:  # see _check_image
        raise DatasetError(f"{path} passed the header check but failed to decode: "
                           f"{type(exc).__name__}: {exc}") from exc
