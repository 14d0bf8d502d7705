"""Aspect-ratio buckets (kohya's rule): each image trains at the resolution of about `image_size`² pixels whose
aspect ratio is nearest its own, so nothing is cropped away but a thin margin.

    settings = BucketSettings(image_size=512, min_reso=256, max_reso=1024, step=64)
    table = bucket_table(settings)                    # [(256, 1024), ..., (512, 512), ..., (1024, 256)]
    assign(640, 480, settings, table)                 # Placement(bucket=(576, 448), resize=(597, 448))

Without buckets every image is resized so its short side is `image_size`, then cropped to the square.
Backend-neutral (numpy only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from msd_lora.errors import ConfigError


@dataclass(frozen=True)
class BucketSettings:
    image_size: int  # buckets hold about image_size² pixels
    min_reso: int = 256
    max_reso: int = 1024
    step: int = 64  # every bucket side is a multiple of this
    no_upscale: bool = False  # images smaller than image_size² keep their size (rounded down to `step`)

    @property
    def max_area(self) -> int:
        return self.image_size * self.image_size

    def check(self, side_multiple: int) -> None:
        """Errors for settings no bucket table can satisfy; `side_multiple` is what the model needs of a side."""
        if self.step % side_multiple:
            raise ConfigError(f"bucket_reso_steps {self.step} must be a multiple of {side_multiple} for this model "
                              f"(the VAE and the UNet's downsampling divide each side by {side_multiple})")
        if self.image_size % side_multiple:
            raise ConfigError(f"image_size {self.image_size} must be a multiple of {side_multiple} with buckets (the "
                              f"square bucket and the validation samples use it)")
        if not self.min_reso <= self.image_size <= self.max_reso:
            raise ConfigError(f"image_size {self.image_size} must lie between min_bucket_reso {self.min_reso} and "
                              f"max_bucket_reso {self.max_reso}")
        if self.min_reso % self.step or self.max_reso % self.step:
            raise ConfigError(f"min_bucket_reso {self.min_reso} and max_bucket_reso {self.max_reso} must be multiples "
                              f"of bucket_reso_steps {self.step}")


@dataclass(frozen=True)
class Placement:
    """Where one image trains: the bucket (width, height) and the size it is resized to before cropping to it."""

    bucket: tuple[int, int]
    resize: tuple[int, int]


def bucket_table(settings: BucketSettings) -> list[tuple[int, int]]:
    """All (width, height) buckets: the square of the largest side within max_area, and for every width from min_reso
    to max_reso in `step`s the tallest height that keeps the area within max_area (and both orientations)."""
    step, area = settings.step, settings.max_area
    side = int(math.sqrt(area) // step) * step
    resolutions = {(side, side)}
    for width in range(settings.min_reso, settings.max_reso + 1, step):
        height = min(settings.max_reso, (area // width) // step * step)
        if height >= settings.min_reso:
            resolutions.add((width, height))
            resolutions.add((height, width))
    return sorted(resolutions)


def assign(width: int, height: int, settings: BucketSettings, table: list[tuple[int, int]]) -> Placement:
    """The bucket of an image of `width` x `height`: the table's nearest aspect ratio; with no_upscale, an image
    smaller than max_area keeps its own size, its bucket that size rounded down to `step`."""
    ratio = width / height
    if settings.no_upscale and width * height <= settings.max_area:
        bucket = (width - width % settings.step, height - height % settings.step)
        return Placement(bucket, (width, height))
    if settings.no_upscale:
        resize = _shrink_to_area(width, height, settings)
        return Placement((resize[0] - resize[0] % settings.step, resize[1] - resize[1] % settings.step), resize)
    ratios = np.array([w / h for w, h in table])
    bucket = table[int(np.abs(ratios - ratio).argmin())]
    return Placement(bucket, cover_size(width, height, bucket))


def square_placement(width: int, height: int, size: int) -> Placement:
    """No buckets: the short side resized to `size`, then the centre (or a random) square."""
    if width <= height:
        resize = (size, round(height * size / width))
    else:
        resize = (round(width * size / height), size)
    return Placement((size, size), (max(size, resize[0]), max(size, resize[1])))


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The size an image is resized to so it covers `bucket` with its aspect ratio kept (rounded half up)."""
    scale = max(bucket[0] / width, bucket[1] / height)
    return max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5))


def _shrink_to_area(width: int, height: int, settings: BucketSettings) -> tuple[int, int]:
    """A large image's size scaled to about max_area, rounding the side that keeps the aspect ratio best."""
    ratio, step = width / height, settings.step

    def rounded(x: float) -> int:
        x = int(x + 0.5)
        return x - x % step

    shrunk_width = math.sqrt(settings.max_area * ratio)
    shrunk_height = settings.max_area / shrunk_width
    by_width = rounded(shrunk_width)
    by_height = rounded(shrunk_height)
    width_error = abs(by_width / max(step, rounded(by_width / ratio)) - ratio)
    height_error = abs(max(step, rounded(by_height * ratio)) / by_height - ratio)
    if width_error < height_error:
        return by_width, int(by_width / ratio + 0.5)
    return int(by_height * ratio + 0.5), by_height
