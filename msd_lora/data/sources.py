"""Where a dataset's images and captions are listed: the four layouts users arrive with.

    listing = list_images("datasets/dog")           # detected from the folder's contents
    listing.kind, len(listing.records)              # 'kohya', 42
    listing.records[0]                              # ImageRecord(path, caption, repeats)

- ``mindone_csv``: ``img_txt.csv`` with a header row ``dir,text`` (mindone's SD examples).
- ``kohya``: subfolders ``N_name`` (N = how many times each image is seen per epoch); a caption per image in a
  sidecar file (``caption_extension``; by default ``.caption``, then ``.txt``), the folder's ``name`` for images
  without one (kohya's class-token rule).
- ``imagefolder``: Hugging Face's ``metadata.jsonl`` (or ``metadata.csv``) with ``file_name`` and a caption column.
- ``instance``: a plain folder of images, every one captioned ``instance_prompt``.

Every path a listing names stays inside ``data_path``. Backend-neutral (standard library only).
"""
from __future__ import annotations

import csv
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from msd_lora.errors import DatasetError
from msd_lora.files.plain import read_utf8

CSV_NAME = "img_txt.csv"
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")  # the eval tools read the same
DEFAULT_CAPTION_EXTENSIONS = (".caption", ".txt")
SOURCE_KINDS = ("auto", "mindone_csv", "kohya", "imagefolder", "instance")
KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")
LAYOUTS = (
    f"mindone: {CSV_NAME} with a header row 'dir,text'; kohya: subfolders named N_name (N = repeats) with images "
    f"and .caption/.txt files; imagefolder: metadata.jsonl or metadata.csv with file_name and a caption column; "
    f"or a folder of images with instance_prompt set"
)


class IgnoredFoldersWarning(UserWarning):
    """Subfolders of a kohya dataset whose names don't start with a repeat count were left out."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str
    repeats: int = 1  # times the image is seen per epoch


@dataclass(frozen=True)
class SourceListing:
    kind: str
    records: list[ImageRecord]
    listed_in: Path  # the file or folder that lists them, for messages

    @property
    def images_per_epoch(self) -> int:
        return sum(r.repeats for r in self.records)


def list_images(data_path: str | Path, dataset_type: str = "auto", caption_extension: str = "",
                caption_column: str = "text", instance_prompt: str = "") -> SourceListing:
    """The records of the dataset at `data_path`, in a fixed order (the batch order is drawn over it)."""
    root = Path(data_path)
    if not root.is_dir():
        state = "is not a directory" if root.exists() else "does not exist"
        raise DatasetError(f"data_path {root} {state}; expected one of: {LAYOUTS}")
    kind = detect_source(root, instance_prompt) if dataset_type == "auto" else dataset_type
    if kind == "mindone_csv":
        records = read_csv_listing(root, root / CSV_NAME, "dir", caption_column)
        return SourceListing(kind, records, root / CSV_NAME)
    if kind == "imagefolder":
        return read_imagefolder(root, caption_column)
    if kind == "kohya":
        return SourceListing(kind, read_kohya_folders(root, caption_extension), root)
    if kind == "instance":
        return SourceListing(kind, read_instance_folder(root, instance_prompt), root)
    raise DatasetError(f"dataset_type {dataset_type!r} is not one of {', '.join(SOURCE_KINDS)}")


def detect_source(root: Path, instance_prompt: str = "") -> str:
    """The layout of `root`, or an error when it has none or more than one."""
    found = []
    if (root / CSV_NAME).is_file():
        found.append(("mindone_csv", CSV_NAME))
    metadata = [name for name in METADATA_NAMES if (root / name).is_file()]
    if metadata:
        found.append(("imagefolder", metadata[0]))
    kohya = [p.name for p in _subfolders(root) if KOHYA_FOLDER.match(p.name)]
    if kohya:
        found.append(("kohya", f"{len(kohya)} N_name folders ({kohya[0]}, ...)"))
    if len(found) > 1:
        listed = "; ".join(f"{kind} ({what})" for kind, what in found)
        raise DatasetError(f"data_path {root} matches more than one dataset layout: {listed}. Set dataset_type to "
                           f"the one to use, or move the other files away")
    if found:
        return found[0][0]
    if _images_in(root):
        if not instance_prompt:
            raise DatasetError(f"data_path {root} is a folder of images without captions: set instance_prompt (the "
                               f"caption of every image), or use one of: {LAYOUTS}")
        return "instance"
    raise DatasetError(f"data_path {root} holds no dataset: expected one of: {LAYOUTS}")


# --- mindone csv and imagefolder metadata -----------------------------------------------------------------------
def read_csv_listing(root: Path, csv_path: Path, image_column: str, caption_column: str) -> list[ImageRecord]:
    """(image, caption) of every row of a csv with a header; a row with more fields than the header (an unquoted
    comma in a caption) is an error, never a silently shortened caption."""
    if not csv_path.is_file():
        raise DatasetError(f"missing {csv_path}; expected a header row '{image_column},{caption_column}' and one "
                           f"row per image")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise DatasetError(f"{csv_path} is empty; expected a header row '{image_column},{caption_column}'")
            reader.fieldnames = [name.strip() for name in reader.fieldnames]
            for role, column in (("image", image_column), ("caption", caption_column)):
                if column not in reader.fieldnames:
                    raise DatasetError(
                        f"{csv_path} has no {role} column {column!r}; columns found: {reader.fieldnames}. The header "
                        f"row names the columns {image_column},{caption_column} (the image path, then its caption): "
                        f"rename them there")
            records = []
            for row in reader:
                if None in row:
                    raise DatasetError(
                        f"{csv_path} line {reader.line_num}: {len(reader.fieldnames) + len(row[None])} fields but the "
                        f"header has {len(reader.fieldnames)}; a caption holding a comma must be quoted "
                        f"(\"a dog, running\")")
                records.append(_csv_record(row, reader.line_num, csv_path, root, image_column, caption_column))
    except UnicodeDecodeError as err:
        raise DatasetError(f"{csv_path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8 "
                           f"(e.g. iconv -f latin1 -t utf-8)") from err
    if not records:
        raise DatasetError(f"{csv_path} has a header but no rows; list at least one image")
    return records


def _csv_record(row: dict, line: int, csv_path: Path, root: Path, image_column: str,
                caption_column: str) -> ImageRecord:
    relative, caption = row.get(image_column), row.get(caption_column)
    if not relative or not relative.strip() or caption is None:
        raise DatasetError(f"{csv_path} line {line}: empty {image_column!r} or missing {caption_column!r} value")
    return ImageRecord(root / safe_relative(relative.strip(), csv_path, line), caption)


def read_imagefolder(root: Path, caption_column: str) -> SourceListing:
    """Hugging Face imagefolder: metadata.jsonl (one JSON object per line) or metadata.csv, `file_name` relative to
    the folder."""
    jsonl = root / "metadata.jsonl"
    if not jsonl.is_file():
        csv_path = root / "metadata.csv"
        return SourceListing("imagefolder", read_csv_listing(root, csv_path, "file_name", caption_column), csv_path)
    records = []
    lines = read_utf8(jsonl, "metadata file", DatasetError).splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{jsonl} line {number}: not a JSON object ({err.msg})") from err
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise DatasetError(f"{jsonl} line {number}: needs a \"file_name\" string")
        caption = entry.get(caption_column)
        if not isinstance(caption, str):
            raise DatasetError(f"{jsonl} line {number}: no caption column {caption_column!r} (keys: "
                               f"{sorted(entry)}); set caption_column to the key holding the caption")
        records.append(ImageRecord(root / safe_relative(entry["file_name"].strip(), jsonl, number), caption))
    if not records:
        raise DatasetError(f"{jsonl} lists no images")
    return SourceListing("imagefolder", records, jsonl)


def safe_relative(relative: str, listed_in: Path, line: int) -> str:
    """`relative` normalised, or an error if it is absolute or escapes the dataset folder."""
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute() \
            or PureWindowsPath(relative).drive:
        raise DatasetError(f"{listed_in} line {line}: image path {relative!r} is absolute; "
                           f"paths must be relative to {listed_in.parent}")
    normal = os.path.normpath(relative)
    if Path(normal).parts[:1] == ("..",):
        raise DatasetError(f"{listed_in} line {line}: image path {relative!r} leaves the dataset folder "
                           f"{listed_in.parent}; move the image inside it")
    return normal


# --- folders ------------------------------------------------------------------------------------------------------
def read_kohya_folders(root: Path, caption_extension: str = "") -> list[ImageRecord]:
    """Images of every `N_name` subfolder, each seen N times per epoch; captions from sidecar files, else `name`."""
    records, ignored = [], []
    for folder in _subfolders(root):
        match = KOHYA_FOLDER.match(folder.name)
        if not match:
            ignored.append(folder.name)
            continue
        repeats, class_caption = int(match.group(1)), match.group(2).strip()
        if repeats < 1:
            raise DatasetError(f"{folder}: the repeat count in the folder name must be at least 1 (e.g. 10_"
                               f"{class_caption or 'name'})")
        images = _images_in(folder)
        if not images:
            warnings.warn(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); left out", UserWarning,
                          stacklevel=3)
        for image in images:
            caption = read_caption(image, caption_extension)
            records.append(ImageRecord(image, class_caption if caption is None else caption, repeats))
    if ignored:
        warnings.warn(f"{root}: subfolders {ignored[:5]} don't start with a repeat count (N_name) and were left out",
                      IgnoredFoldersWarning, stacklevel=3)
    if not records:
        raise DatasetError(f"{root}: the N_name subfolders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return records


def read_instance_folder(root: Path, instance_prompt: str) -> list[ImageRecord]:
    if not instance_prompt:
        raise DatasetError(f"dataset_type 'instance' needs instance_prompt: the caption of every image in {root}")
    images = _images_in(root)
    if not images:
        raise DatasetError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [ImageRecord(image, instance_prompt) for image in images]


def read_caption(image: Path, caption_extension: str = "") -> str | None:
    """The first non-empty line of the image's sidecar caption file, or None when it has none."""
    extensions = (caption_extension,) if caption_extension else DEFAULT_CAPTION_EXTENSIONS
    for extension in extensions:
        sidecar = image.with_suffix(extension)
        if sidecar.is_file():
            lines = [line.strip() for line in read_utf8(sidecar, "caption file", DatasetError).splitlines()
                     if line.strip()]
            return lines[0] if lines else ""
    return None


def _subfolders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())
