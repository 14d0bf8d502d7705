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
    """Which items make up batch `index` of `epoch`, with one image shape per batch.

    `groups` holds the items of each bucket (an image with repeats appears that many times). Each epoch, drawn
    from ``np.random.default_rng([seed, epoch])``: every group is permuted and cut into batches; a group's last,
    partial batch is filled up with the first items of its own permutation (so every item is seen each epoch and
    every batch is full and of one shape); then the order of all batches is permuted. With ``shuffle=False`` items
    and batches keep their order. Steps per epoch = the sum over groups of ceil(items / batch_size) — the count
    kohya uses.
    """

    def __init__(self, groups: list[np.ndarray] | int, batch_size: int, seed: int, shuffle: bool = True) -> None:
        if isinstance(groups, int):
            groups = [np.arange(groups)]
        groups = [np.asarray(g, dtype=np.int64) for g in groups if len(g)]
        if not groups:
            raise DatasetError("the dataset has no items to train on")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.groups = groups
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._cached: tuple[int, list[tuple[int, np.ndarray]]] | None = None

    @property
    def num_items(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def steps_per_epoch(self) -> int:
        """Number of batches in one epoch."""
        return sum(-(-len(g) // self.batch_size) for g in self.groups)

    def batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(group, item indices) of every batch of `epoch`, in order."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        cached = self._cached  # one read: loader threads may replace it meanwhile
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            batches = []
            for g, items in enumerate(self.groups):
                order = rng.permutation(items) if self.shuffle else items
                count = -(-len(order) // self.batch_size)
                filled = np.resize(order, count * self.batch_size)  # np.resize repeats from the start
                batches += [(g, filled[i * self.batch_size:(i + 1) * self.batch_size]) for i in range(count)]
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            cached = self._cached = (epoch, batches)
        return cached[1]

    def batch(self, epoch: int, index: int) -> np.ndarray:
        """Item indices of batch `index` (0-based, < steps_per_epoch) of `epoch`."""
        return self.group_batch(epoch, index)[1]

    def group_batch(self, epoch: int, index: int) -> tuple[int, np.ndarray]:
        """(group, item indices) of batch `index` of `epoch`."""
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"batch index {index} out of range: an epoch has {self.steps_per_epoch} batches")
        group, items = self.batches(epoch)[index]
        return group, items.copy()

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch index) of global step `step` (0-based), for resuming from a step count."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        return divmod(step, self.steps_per_epoch)


def augmentation_rng(seed: int, epoch: int, index: int, slot: int | None = None) -> np.random.Generator:
    """Generator for the random crops, flips and caption changes of batch `index` of `epoch` (of its item `slot`
    when given); independent of the batch order stream and of the other items."""
    key = (seed, epoch, index) if slot is None else (seed, epoch, index, slot)
    if min(key) < 0:
        raise ValueError(f"seed, epoch, index and slot must be non-negative, got {key}")
    return np.random.default_rng([*key, _AUGMENTATION_TAG])
