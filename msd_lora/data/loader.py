"""Each micro-step's data as a pure function of (seed, step), prepared ahead on background threads.

    make = BatchMaker(dataset, order, CaptionOptions(), seed=42, with_pixels=True)
    with Prefetcher(make, workers=2) as batches:
        batch = batches.get(step)   # HostBatch: items, bucket, crops, captions, pixels

Whatever the worker count, `get(step)` returns exactly `make(step)`: workers only compute ahead (decode, resize,
crop, caption changes), so results are bit-identical and a resumed run continues the same sequence. Threads,
not processes: PIL releases the GIL while it decodes and resizes, and nothing is copied between processes.
Backend-neutral.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from msd_lora.data.batching import BatchOrder, augmentation_rng
from msd_lora.data.captions import CaptionOptions
from msd_lora.data.dataset import CaptionedImageDataset

T = TypeVar("T")


@dataclass(frozen=True)
class HostBatch:
    """One micro-batch on the host, before any network sees it."""

    epoch: int
    index: int  # batch index within the epoch
    items: np.ndarray  # dataset indices
    bucket: tuple[int, int]  # (width, height) of every image
    crops: list[tuple[tuple[int, int, int, int], bool]]  # per item: crop box in the resized image, mirrored
    captions: list[str]  # as trained on (prefix/suffix, dropout, shuffle applied)
    pixels: np.ndarray | None  # (B, 3, H, W) float32 in [-1, 1]; None when latents come from a cache


class BatchMaker:
    """`make(micro_step) -> HostBatch`, every random choice drawn from (seed, epoch, batch index, slot)."""

    def __init__(self, dataset: CaptionedImageDataset, order: BatchOrder, captions: CaptionOptions, seed: int,
                 with_pixels: bool = True):
        self.dataset, self.order, self.captions, self.seed = dataset, order, captions, seed
        self.with_pixels = with_pixels

    def __call__(self, micro_step: int) -> HostBatch:
        epoch, index = self.order.locate(micro_step)
        group, items = self.order.group_batch(epoch, index)
        crops, captions = [], []
        for slot, item in enumerate(items):
            rng = augmentation_rng(self.seed, epoch, index, slot)
            crops.append(self.dataset.choose(int(item), rng))
            captions.append(self.captions.apply(self.dataset.records[int(item)].caption, rng))
        pixels = None
        if self.with_pixels:
            pixels = np.stack([self.dataset.pixels(int(i), box, mirrored) for i, (box, mirrored) in zip(items, crops)])
        bucket = self.dataset.buckets[group]
        return HostBatch(epoch, index, items, bucket, crops, captions, pixels)


class Prefetcher(Generic[T]):
    """`get(step)` = `make(step)`, computed up to `ahead` steps in advance by `workers` threads (0: inline). The
    threads start with the first `get` and stop at `close`; a `get` after `close` starts them again."""

    def __init__(self, make: Callable[[int], T], workers: int, ahead: int | None = None):
        self.make = make
        self.workers = workers
        self.ahead = ahead if ahead is not None else 2 * workers
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}

    def get(self, step: int) -> T:
        if self.workers == 0:
            return self.make(step)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="msd-lora-data")
        for stale in [s for s in self._pending if s < step]:
            self._pending.pop(stale).cancel()
        for ahead in range(step, step + max(1, self.ahead)):
            if ahead not in self._pending:
                self._pending[ahead] = self._pool.submit(self.make, ahead)
        return self._pending.pop(step).result()

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
