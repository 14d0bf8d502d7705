"""Held-out validation loss: images the run never trains on, evaluated at fixed timesteps and fixed noise.

The held-out images are either a seeded share of the dataset (`validation_split`, kept out of the training order)
or another dataset (`validation_data_path`). Their batches are built once: centre crop, no flip, the caption
without dropout or shuffling (prefix and suffix kept), one draw of the VAE posterior and of the diffusion noise
from a fixed seed, at each of kohya's validation timesteps (10, 350, 500, 650, 990 of 1000). Every evaluation then
runs the same inputs through the current LoRA, so the curve moves only because the weights do: a rising validation
loss under a falling training loss is over-fitting.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from msd_lora.backends.base import Backend, ModelInfo, StepBatch
from msd_lora.data.captions import CaptionOptions
from msd_lora.data.dataset import CaptionedImageDataset
from msd_lora.data.transforms import crop_box
from msd_lora.diffusion.losses import LossOptions
from msd_lora.diffusion.schedule import NoiseSchedule
from msd_lora.tokenizer import PromptTokenizer

VALIDATION_STREAM = 0x7A11
KOHYA_TIMESTEPS = (10, 350, 500, 650, 990)  # of 1000 training timesteps


def split_items(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training items, held-out items) of a dataset of `count` images: a seeded `fraction` (at least one image, at
    most all but one) is held out."""
    if fraction <= 0:
        return list(range(count)), []
    held = min(max(1, round(count * fraction)), count - 1)
    order = np.random.default_rng([seed, VALIDATION_STREAM]).permutation(count)
    return sorted(int(i) for i in order[held:]), sorted(int(i) for i in order[:held])


def validation_timesteps(schedule: NoiseSchedule) -> np.ndarray:
    return np.array([t * schedule.num_train_timesteps // 1000 for t in KOHYA_TIMESTEPS], np.int64)


@dataclass
class HeldOut:
    """The held-out images (`items` of `dataset`) and how their batches are made."""

    dataset: CaptionedImageDataset
    items: list[int]
    batch_size: int
    captions: CaptionOptions
    seed: int

    def batches(self) -> list[tuple[list[int], int]]:
        """(items, real count) per batch: per bucket, in item order; a last short batch is filled with its own first
        items (so every batch has the training batch's shape), whose copies get weight 0."""
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for item in self.items:
            by_bucket.setdefault(self.dataset.placements[item].bucket, []).append(item)
        out = []
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                out.append((list(np.resize(chunk, self.batch_size)), len(chunk)))
        return out


class ValidationLoss:
    """`loss()`: the mean held-out loss of the backend's current LoRA (the run's loss type and weighting, without the
    noise options), over every held-out image and validation timestep."""

    def __init__(self, held_out: HeldOut, tokenizer: PromptTokenizer, backend: Backend, info: ModelInfo,
                 schedule: NoiseSchedule, loss: LossOptions):
        self.held_out, self.tokenizer, self.backend, self.info = held_out, tokenizer, backend, info
        self.schedule = schedule
        self.loss_options = replace(loss, noise_offset=0.0, adaptive_noise_scale=0.0, multires_noise_iterations=0,
                                    input_perturbation=0.0)
        self._batches: list[StepBatch] | None = None
        self._images: list[int] = []  # real images per batch: the weights of the mean

    @property
    def images(self) -> int:
        return len(self.held_out.items)

    def batches(self) -> list[StepBatch]:
        """The fixed inputs, built on first use (the frozen VAE and text encoder run once)."""
        if self._batches is None:
            self._batches = []
            for index, (items, real) in enumerate(self.held_out.batches()):
                made = self._step_batches(index, items, real)
                self._batches += made
                self._images += [real] * len(made)
        return self._batches

    def _step_batches(self, index: int, items: list[int], real: int) -> list[StepBatch]:
        dataset, backend = self.held_out.dataset, self.backend
        pixels = np.stack([dataset.pixels(i, crop_box(dataset.placements[i].resize, dataset.placements[i].bucket),
                                          False) for i in items])
        mean, std = backend.encode_moments(pixels)
        token_ids = self.tokenizer([self.held_out.captions.fixed(dataset.captions[i]) for i in items])
        text = {"token_ids": token_ids} if backend.trains_text_encoder else {"context": backend.encode_text(token_ids)}
        scale = np.where(np.arange(len(items)) < real, len(items) / real, 0.0).astype(np.float32)
        out = []
        for k, t in enumerate(validation_timesteps(self.schedule)):
            rng = np.random.default_rng([self.held_out.seed, VALIDATION_STREAM, index, k])
            noise = rng.standard_normal(mean.shape, dtype=np.float32)
            posterior_noise = rng.standard_normal(mean.shape, dtype=np.float32)
            timesteps = np.full(len(items), t, np.int64)
            sqrt_alpha, sqrt_one_minus = self.schedule.coefficients(timesteps)
            weights = self.loss_options.weights(self.schedule, timesteps) * scale
            out.append(StepBatch(latent_mean=mean, latent_std=std, posterior_noise=posterior_noise, noise=noise,
                                 timesteps=timesteps, sqrt_alpha=sqrt_alpha, sqrt_one_minus_alpha=sqrt_one_minus,
                                 loss_weights=weights, huber_c=self.loss_options.thresholds(self.schedule, timesteps),
                                 **text))
        return out

    def loss(self) -> float:
        values = [self.backend.evaluate_loss(batch) for batch in self.batches()]
        return float(np.average(values, weights=self._images))
