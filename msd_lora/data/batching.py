"""Deterministic, resumable batch order and per-batch augmentation randomness.

Everything is a pure function of (seed, epoch, batch index): a training loop that saves
(epoch, index) in its checkpoint reproduces the exact same batches, crops and flips on resume,
no matter how many batches were drawn before. Backend-neutral (numpy only).
"""
from __future__ import annotations

import numpy as np

from msd_lora.errors import DatasetError

# Appended to augmentation seeds so their stream never equals the permutation stream:
# SeedSequence pads with zeros, so [seed, epoch] and [seed, epoch, 0] would give the same numbers.
_AUGMENTATION_TAG = 0x61756721


class BatchOrder:
    """Which items make up batch `index` of `epoch`.

    Each epoch is a permutation drawn from ``np.random.default_rng([seed, epoch])`` (or the
    identity when ``shuffle=False``), cut into consecutive batches. With ``drop_last`` the
    leftover items of an epoch are not used in that epoch (they are in others, as the
    permutation changes).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, drop_last: bool = True,
                 shuffle: bool = True) -> None:
        if num_items <= 0:
            raise ValueError(f"num_items must be positive, got {num_items}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if drop_last and num_items < batch_size:
            raise DatasetError(
                f"the dataset has {num_items} items but the batch size is {batch_size}: with "
                f"drop_last every batch must be full, so no batch could be formed; "
                f"set train_batch_size to at most {num_items} or add more images"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle = shuffle
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Number of batches in one epoch."""
        if self.drop_last:
            return self.num_items // self.batch_size
        return -(-self.num_items // self.batch_size)

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of all item indices in `epoch`."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            else:
                order = np.arange(self.num_items)
            self._cached = (epoch, order.astype(np.int64))
        return self._cached[1]

    def batch(self, epoch: int, index: int) -> np.ndarray:
        """Item indices of batch `index` (0-based, < steps_per_epoch) of `epoch`."""
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"batch index {index} out of range: an epoch has {self.steps_per_epoch} batches")
        start = index * self.batch_size
        return self.permutation(epoch)[start:start + self.batch_size].copy()

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch index) of global step `step` (0-based), for resuming from a step count."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        return divmod(step, self.steps_per_epoch)


def augmentation_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Generator for the random crops/flips of batch `index` of `epoch`; independent of the batch order stream."""
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be non-negative, got {seed}, {epoch}, {index}")
    return np.random.default_rng([seed, epoch, index, _AUGMENTATION_TAG])


def collate(items: list[tuple[np.ndarray, str]]) -> tuple[np.ndarray, list[str]]:
    """Stack (CHW image, caption) pairs into an NCHW float32 batch and a caption list."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    shapes = {image.shape for image, _ in items}
    if len(shapes) != 1:
        raise ValueError(f"images in a batch must share one shape, got {sorted(shapes)}")
    images = np.stack([np.asarray(image, dtype=np.float32) for image, _ in items])
    return images, [caption for _, caption in items]
