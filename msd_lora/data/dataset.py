"""A dataset ready to train on: the listed images checked once, each placed in its bucket, loaded as float32 CHW
arrays in [-1, 1] at that bucket's size. Backend-neutral: numpy + PIL only.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from msd_lora.data import transforms
from msd_lora.data.buckets import BucketSettings, Placement, assign, bucket_table, square_placement
from msd_lora.data.sources import ImageRecord, list_images
from msd_lora.errors import DatasetError

_WARN_EXAMPLES = 5
EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


class SkippedImagesWarning(UserWarning):
    """Some listed images were missing, undecodable, too large to be safe or too small, and were left out."""


class CaptionedImageDataset:
    """The images and captions of `data_path` (any layout `sources.list_images` reads), checked and bucketed.

    Policy for bad images: a listed file that is missing, fails PIL's ``verify()`` (a check of headers and
    structure, cheap next to decoding), trips PIL's decompression-bomb guard or has a side shorter than
    `min_image_size` is skipped at construction, recorded in ``skipped`` with the reason, and reported in one
    ``SkippedImagesWarning`` with the count and the first few names. One bad file in a scraped dataset should not
    kill a long run, but the user must see it; deciding at construction keeps the item list, hence the batch
    order, fixed for exact resume. If nothing is left, or a file that passed ``verify()`` fails to decode in
    ``load``, a ``DatasetError`` names it. A malformed listing is always an error.

    Images are EXIF-rotated, converted to RGB (transparency composited onto white, 16-bit scaled to 8), resized to
    cover their bucket (bicubic), cropped to it (centred, or at a random offset when ``random_crop``), optionally
    mirrored with probability 0.5 (``flip``), and scaled to float32 CHW in [-1, 1]. Without ``buckets`` every
    image trains at ``image_size`` x ``image_size``.
    """

    def __init__(self, data_path: str | Path, image_size: int, random_crop: bool = False, flip: bool = False,
                 caption_column: str = "text", *, dataset_type: str = "auto", caption_extension: str = "",
                 instance_prompt: str = "", buckets: BucketSettings | None = None, min_image_size: int = 0) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.data_path = Path(data_path)
        self.image_size = image_size
        self.random_crop = random_crop
        self.flip = flip
        self.bucket_settings = buckets
        self.listing = list_images(self.data_path, dataset_type, caption_extension, caption_column, instance_prompt)
        table = bucket_table(buckets) if buckets else []
        self.records: list[ImageRecord] = []
        self.placements: list[Placement] = []
        self.skipped: list[tuple[Path, str]] = []
        for record in self.listing.records:
            size, problem = inspect_image(record.path)
            if problem is None and min(size) < min_image_size:
                problem = f"{size[0]}x{size[1]}, smaller than min_image_size {min_image_size}"
            if problem is None:
                placement = assign(*size, buckets, table) if buckets else square_placement(*size, image_size)
                if min(placement.bucket) <= 0:
                    problem = f"{size[0]}x{size[1]}, smaller than bucket_reso_steps {buckets.step}"
            if problem is None:
                self.records.append(record)
                self.placements.append(placement)
            else:
                self.skipped.append((record.path, problem))
        self._report_skipped(len(self.listing.records))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_paths(self) -> list[Path]:
        return [r.path for r in self.records]

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.records]

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """The (width, height) of every bucket in use, sorted."""
        return sorted({p.bucket for p in self.placements})

    def groups(self, items: set[int] | None = None) -> list[np.ndarray]:
        """The items of one epoch, per bucket (in `buckets` order): record indices (all, or those in `items`), each
        repeated `repeats` times."""
        index = {bucket: i for i, bucket in enumerate(self.buckets)}
        groups: list[list[int]] = [[] for _ in index]
        for i, (record, placement) in enumerate(zip(self.records, self.placements)):
            if items is None or i in items:
                groups[index[placement.bucket]] += [i] * record.repeats
        return [np.asarray(g, dtype=np.int64) for g in groups]

    def bucket_counts(self) -> dict[tuple[int, int], tuple[int, int]]:
        """bucket -> (images, images x repeats)."""
        counts: dict[tuple[int, int], tuple[int, int]] = {}
        for record, placement in zip(self.records, self.placements):
            images, seen = counts.get(placement.bucket, (0, 0))
            counts[placement.bucket] = (images + 1, seen + record.repeats)
        return dict(sorted(counts.items()))

    def choose(self, index: int, rng: np.random.Generator | None) -> tuple[tuple[int, int, int, int], bool]:
        """(crop box in the resized image, mirrored) of one use of image `index`, drawn from `rng` where random."""
        if (self.random_crop or self.flip) and rng is None:
            raise ValueError("random_crop/flip need an rng; pass batching.augmentation_rng(seed, epoch, index)")
        placement = self.placements[index]
        box = transforms.crop_box(placement.resize, placement.bucket, rng if self.random_crop else None)
        return box, bool(self.flip and rng.random() < 0.5)

    def pixels(self, index: int, box: tuple[int, int, int, int], mirrored: bool) -> np.ndarray:
        """Image `index` resized to its placement, cropped to `box`, mirrored when asked: float32 CHW in [-1, 1]."""
        placement = self.placements[index]
        img = transforms.to_rgb(decode(self.records[index].path))
        if img.size != placement.resize:
            img = img.resize(placement.resize, Image.Resampling.BICUBIC)
        img = img.crop(box)
        if mirrored:
            img = transforms.hflip(img)
        return transforms.to_array(img)

    def load(self, index: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, str]:
        """Image `index` as float32 CHW in [-1, 1] and its caption.

        `rng` drives random crop and flip and is required when either is enabled; pass
        ``batching.augmentation_rng(seed, epoch, batch_index, slot)`` so resumed runs augment identically.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        return self.pixels(index, *self.choose(index, rng)), self.records[index].caption

    def _report_skipped(self, listed: int) -> None:
        if not self.skipped:
            return
        examples = "; ".join(f"{p.name} ({why})" for p, why in self.skipped[:_WARN_EXAMPLES])
        more = len(self.skipped) - _WARN_EXAMPLES
        summary = (f"skipped {len(self.skipped)} of {listed} images listed in {self.listing.listed_in}: "
                   f"{examples}" + (f"; and {more} more (see .skipped)" if more > 0 else ""))
        if not self.records:
            raise DatasetError(f"no usable images: {summary}")
        warnings.warn(summary, SkippedImagesWarning, stacklevel=3)


def inspect_image(path: Path) -> tuple[tuple[int, int], str | None]:
    """((width, height) as displayed, after EXIF rotation; None) for a readable image, else ((0, 0), why not)."""
    if not path.is_file():
        return (0, 0), "file not found" if not path.exists() else "not a regular file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if img.getexif().get(EXIF_ORIENTATION) in _SWAPS_SIDES:
                    width, height = height, width
            with Image.open(path) as img:
                img.verify()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        return (0, 0), f"decompression-bomb guard: {exc}"
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error ...) for bad files
        return (0, 0), f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return (width, height), None


def decode(path: Path) -> Image.Image:
    """Fully decode `path` (EXIF orientation applied), or raise a DatasetError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except Exception as exc:  # see inspect_image
        raise DatasetError(f"{path} passed the header check but failed to decode: "
                           f"{type(exc).__name__}: {exc}") from exc
