"""The training loss and its options, backend-neutral: what kohya sd-scripts and diffusers call min-SNR weighting,
debiased estimation, Huber losses, noise offset, multi-resolution (pyramid) noise and input perturbation.

Everything that depends on the timestep or on random numbers is computed here in numpy by the loop, per sample:
a loss weight, a Huber threshold, the noise and the noise the network's input is made with. The backends then
compute one formula, `weighted_loss`, written with arithmetic operators only, so numpy arrays, torch tensors and
MindSpore tensors (inside a compiled graph) all run the same code and one compiled graph serves every option:

    per-sample loss  L_b = mean over (C, h, w) of  l(pred - target; c_b)
    loss             = mean over b of  w_b * L_b
    l(d; 0)          = d^2                                 (l2)
    l(d; c)          = 2 c (sqrt(d^2 + c^2) - c)           (pseudo-Huber, c > 0)
and smooth_l1 is the pseudo-Huber loss divided by c, which `LossOptions` folds into w_b.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from msd_lora.diffusion.schedule import NoiseSchedule
from msd_lora.errors import ConfigError

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
DEBIASED_SNR_LIMIT = 1000.0  # kohya clips the SNR here before 1/sqrt(SNR): t = 0 has a huge SNR


@dataclass(frozen=True)
class LossOptions:
    """The loss settings of a run (the config's keys of the same names)."""

    snr_gamma: float = 0.0  # min-SNR-gamma weighting; 0 = off
    debiased_estimation: bool = False
    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    noise_offset: float = 0.0
    adaptive_noise_scale: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    input_perturbation: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> LossOptions:
        return cls(snr_gamma=cfg.snr_gamma or 0.0, debiased_estimation=cfg.debiased_estimation, loss_type=cfg.loss_type,
                   huber_c=cfg.huber_c, huber_schedule=cfg.huber_schedule, noise_offset=cfg.noise_offset,
                   adaptive_noise_scale=cfg.adaptive_noise_scale,
                   multires_noise_iterations=cfg.multires_noise_iterations,
                   multires_noise_discount=cfg.multires_noise_discount, input_perturbation=cfg.input_perturbation)

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise ConfigError(f"huber_schedule {self.huber_schedule!r} is not one of {', '.join(HUBER_SCHEDULES)}")

    # --- per-sample loss terms ----------------------------------------------------------------------------------
    def weights(self, schedule: NoiseSchedule, timesteps: np.ndarray) -> np.ndarray:
        """Per-sample loss weights w_b (float32): min-SNR-gamma, debiased estimation and the smooth_l1 1/c."""
        weights = np.ones(len(timesteps), np.float64)
        snr = schedule.snr(timesteps).astype(np.float64)
        v_prediction = schedule.prediction_type == "v_prediction"
        if self.snr_gamma > 0:
            weights *= min_snr_weights(snr, self.snr_gamma, v_prediction)
        if self.debiased_estimation:
            weights *= debiased_weights(snr, v_prediction)
        if self.loss_type == "smooth_l1":
            weights /= self.thresholds(schedule, timesteps)
        return weights.astype(np.float32)

    def thresholds(self, schedule: NoiseSchedule, timesteps: np.ndarray) -> np.ndarray:
        """Per-sample Huber thresholds c_b (float32); 0 for the l2 loss."""
        if self.loss_type == "l2":
            return np.zeros(len(timesteps), np.float32)
        return huber_thresholds(schedule, timesteps, self.huber_c, self.huber_schedule).astype(np.float32)

    # --- noise ----------------------------------------------------------------------------------------------------
    def noise(self, noise: np.ndarray, latents: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        """The diffusion noise after the noise offset and the pyramid noise (kohya's order). `latents` (the training
        latents, float32) are only read by the adaptive noise offset."""
        if self.noise_offset > 0:
            noise = offset_noise(noise, rng, self.noise_offset, latents if self.adaptive_noise_scale else None,
                                 self.adaptive_noise_scale)
        if self.multires_noise_iterations > 0:
            noise = pyramid_noise(noise, rng, self.multires_noise_iterations, self.multires_noise_discount)
        return noise

    def input_noise(self, noise: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The noise the network's input is made with: `noise` plus `input_perturbation` times fresh noise (the
        target stays `noise`)."""
        if self.input_perturbation <= 0:
            return noise
        extra = rng.standard_normal(noise.shape, dtype=np.float32)
        return (noise + np.float32(self.input_perturbation) * extra).astype(np.float32)

    @property
    def needs_latents(self) -> bool:
        return self.noise_offset > 0 and self.adaptive_noise_scale != 0


def min_snr_weights(snr: np.ndarray, gamma: float, v_prediction: bool) -> np.ndarray:
    """min(SNR, gamma) / SNR for epsilon targets, min(SNR, gamma) / (SNR + 1) for v targets (Hang et al. 2023)."""
    clipped = np.minimum(snr, gamma)
    if v_prediction:
        return clipped / (snr + 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return clipped / snr


def debiased_weights(snr: np.ndarray, v_prediction: bool) -> np.ndarray:
    """1 / sqrt(SNR) for epsilon targets, 1 / (SNR + 1) for v targets, SNR clipped at 1000 (kohya's rule)."""
    snr = np.minimum(snr, DEBIASED_SNR_LIMIT)
    if v_prediction:
        return 1.0 / (snr + 1.0)
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(snr)


def huber_thresholds(schedule: NoiseSchedule, timesteps: np.ndarray, c: float, kind: str) -> np.ndarray:
    """kohya's Huber threshold per timestep: constant c; exponential c^(t / T); snr (1 - c) / (1 + sigma_t)^2 + c with
    sigma_t = sqrt((1 - a_t) / a_t), so noisy timesteps get c and clean ones 1."""
    t = np.asarray(timesteps, np.float64)
    if kind == "constant":
        return np.full(t.shape, c)
    if kind == "exponential":
        return np.exp(math.log(c) * t / schedule.num_train_timesteps)
    a = schedule.alphas_cumprod[np.asarray(timesteps)]
    with np.errstate(divide="ignore"):
        sigma = np.sqrt((1.0 - a) / a)
    return (1.0 - c) / (1.0 + sigma) ** 2 + c


def offset_noise(noise: np.ndarray, rng: np.random.Generator, offset: float, latents: np.ndarray | None = None,
                 adaptive_scale: float = 0.0) -> np.ndarray:
    """noise + strength * N(0, 1) per (sample, channel) (Guttenberg's noise offset). With adaptive_scale (kohya):
    strength = max(0, offset + adaptive_scale * |mean of the latent channel|)."""
    b, c = noise.shape[:2]
    strength = np.full((b, c, 1, 1), offset, np.float64)
    if latents is not None:
        channel_mean = np.abs(latents.astype(np.float64).mean(axis=(2, 3), keepdims=True))
        strength = np.maximum(strength + adaptive_scale * channel_mean, 0.0)
    shift = rng.standard_normal((b, c, 1, 1))
    return (noise + strength * shift).astype(np.float32)


def pyramid_noise(noise: np.ndarray, rng: np.random.Generator, iterations: int, discount: float) -> np.ndarray:
    """Multi-resolution noise (kohya's `pyramid_noise_like`): at level i a random factor r in [2, 4) gives noise of
    size (h, w) / r^i, bilinearly upsampled and added with weight discount^i (level 0 is full size); the levels
    stop at a side of 1; the sum is divided by its (unbiased) standard deviation over the whole batch."""
    b, c, h, w = noise.shape
    total = noise.astype(np.float64)
    for level in range(iterations):
        r = rng.random() * 2 + 2
        hn, wn = max(1, int(h / r**level)), max(1, int(w / r**level))
        total = total + resize_bilinear(rng.standard_normal((b, c, hn, wn)), h, w) * discount**level
        if hn == 1 or wn == 1:
            break
    return (total / total.std(ddof=1)).astype(np.float32)


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of the last two axes, half-pixel centres (torch's `interpolate(mode="bilinear",
    align_corners=False)`)."""

    def weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
        low = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
        return low, np.minimum(low + 1, size_in - 1), src - low

    low, high, frac = weights(x.shape[-2], height)
    x = x[..., low, :] * (1 - frac)[:, None] + x[..., high, :] * frac[:, None]
    low, high, frac = weights(x.shape[-1], width)
    return x[..., low] * (1 - frac) + x[..., high] * frac


def loss_inputs(loss_weights: np.ndarray, huber_c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights, thresholds, squared) as (B, 1, 1, 1) float32 for `weighted_loss`: thresholds of the l2 samples are set
    to 1 (so no square root of 0 is differentiated) and `squared` is 1 exactly for them."""
    squared = (huber_c == 0).astype(np.float32)
    shape = (-1, 1, 1, 1)
    return (loss_weights.astype(np.float32).reshape(shape), (huber_c + squared).astype(np.float32).reshape(shape),
            squared.reshape(shape))


def sample_losses(pred: Any, target: Any, weights: Any, thresholds: Any, squared: Any) -> Any:
    """w_b * mean_(C,h,w) l(pred - target; c_b) per sample b, from `loss_inputs`'s arrays as the backend's tensors;
    any array type (only operators, `reshape` and `mean`). The training loss is their mean (`weighted_loss`)."""
    d2 = (pred - target) ** 2
    huber = 2.0 * thresholds * ((d2 + thresholds * thresholds) ** 0.5 - thresholds)
    elementwise = squared * d2 + (1.0 - squared) * huber
    return (weights * elementwise).reshape(elementwise.shape[0], -1).mean(-1)


def weighted_loss(pred: Any, target: Any, weights: Any, thresholds: Any, squared: Any) -> Any:
    """mean_b w_b * mean_(C,h,w) l(pred - target; c_b): the mean of `sample_losses`."""
    return sample_losses(pred, target, weights, thresholds, squared).mean()
