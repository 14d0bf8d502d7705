"""DDPM noise schedule and the forward (noising) process, backend-neutral.

The schedule itself is plain float64 numpy. The functions ``add_noise`` and ``training_target``
use only arithmetic operators, so they work unchanged on numpy arrays, torch tensors and
MindSpore tensors; the caller converts the float32 coefficients from ``NoiseSchedule.coefficients``
to its backend and passes them in a broadcastable shape (e.g. ``[B, 1, 1, 1]``).

Conventions follow Stable Diffusion / diffusers' ``DDPMScheduler``: ``alphas_cumprod[t]`` is the
signal fraction at integer timestep ``t`` in ``[0, num_train_timesteps)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide / improved-DDPM cosine schedule: betas from alpha_bar(t) = cos^2((t + s)/(1 + s) * pi/2)."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array(
        [min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
        dtype=np.float64,
    )


def make_betas(
    num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float
) -> np.ndarray:
    """float64 betas for one of ``BETA_SCHEDULES``."""
    if beta_schedule == "scaled_linear":  # Stable Diffusion's: linear in sqrt(beta)
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train_timesteps)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Discrete DDPM schedule: float64 ``betas`` and ``alphas_cumprod`` plus the model's prediction type."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {self.prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
            )
        betas = np.asarray(self.betas, dtype=np.float64)
        alphas_cumprod = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if betas.ndim != 1 or betas.shape != alphas_cumprod.shape:
            raise ValueError("betas and alphas_cumprod must be 1-D arrays of the same length")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", alphas_cumprod)

    @classmethod
    def from_config(
        cls,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        prediction_type: str = "epsilon",
    ) -> NoiseSchedule:
        """Build from diffusers-style scheduler config values (defaults: Stable Diffusion 1.x)."""
        betas = make_betas(num_train_timesteps, beta_schedule, beta_start, beta_end)
        return cls(betas=betas, alphas_cumprod=np.cumprod(1.0 - betas), prediction_type=prediction_type)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> NoiseSchedule:
        """Build from a (diffusers ``scheduler_config.json``-like) dict; unrelated keys are ignored."""
        keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
        return cls.from_config(**{k: config[k] for k in keys if k in config})

    def with_prediction_type(self, prediction_type: str) -> NoiseSchedule:
        """The same schedule for a network predicting `prediction_type`."""
        return NoiseSchedule(self.betas, self.alphas_cumprod, prediction_type)

    def with_zero_terminal_snr(self) -> NoiseSchedule:
        """Betas rescaled so the last timestep is pure noise (SNR 0), the first keeping its SNR (Lin et al. 2023,
        "Common Diffusion Noise Schedules and Sample Steps are Flawed"; diffusers' `rescale_betas_zero_snr`):
        sqrt(alphas_cumprod) is shifted to end at 0 and scaled to keep its first value."""
        root = np.sqrt(self.alphas_cumprod)
        first, last = root[0], root[-1]
        root = (root - last) * first / (first - last)
        cumprod = root**2
        alphas = np.concatenate([cumprod[:1], cumprod[1:] / cumprod[:-1]])
        return NoiseSchedule(1.0 - alphas, cumprod, self.prediction_type)

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0.0)

    def for_sampling(self) -> NoiseSchedule:
        """The schedule samplers use: a zero-terminal-SNR schedule's last alphas_cumprod set to 2**-24, as diffusers'
        schedulers do, so the noise level sigma = sqrt((1 - a) / a) stays finite."""
        if not self.zero_terminal_snr:
            return self
        cumprod = self.alphas_cumprod.copy()
        cumprod[-1] = 2.0**-24
        return NoiseSchedule(self.betas, cumprod, self.prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def coefficients(self, t: np.ndarray | int, ndim: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``(sqrt(alphas_cumprod[t]), sqrt(1 - alphas_cumprod[t]))`` as float32 arrays.

        ``t`` holds one integer timestep per sample, shape ``[B]``; the results have shape ``[B]``,
        or ``[B, 1, ..., 1]`` with ``ndim`` dimensions so they broadcast against ``[B, C, H, W]``.
        """
        a = self.alphas_cumprod[self._index(t)]
        shape = (-1,) + (1,) * (ndim - 1)
        return (
            np.sqrt(a).astype(np.float32).reshape(shape),
            np.sqrt(1.0 - a).astype(np.float32).reshape(shape),
        )

    def snr(self, t: np.ndarray | int) -> np.ndarray:
        """Signal-to-noise ratio ``alphas_cumprod / (1 - alphas_cumprod)`` at timesteps ``t`` (float32, ``[B]``)."""
        a = self.alphas_cumprod[self._index(t)]
        with np.errstate(divide="ignore"):  # t = 0 of a schedule whose alphas_cumprod[0] is 1 (none of SD's)
            return (a / (1.0 - a)).astype(np.float32)

    def _index(self, t: np.ndarray | int) -> np.ndarray:
        t = np.atleast_1d(np.asarray(t))
        if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"timesteps must be a 1-D integer array, got dtype {t.dtype} shape {t.shape}")
        if t.size and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps})")
        return t


def add_noise(x0: Any, noise: Any, sqrt_alpha: Any, sqrt_one_minus_alpha: Any) -> Any:
    """Forward process ``x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` (any array/tensor type)."""
    return sqrt_alpha * x0 + sqrt_one_minus_alpha * noise


def training_target(
    x0: Any, noise: Any, sqrt_alpha: Any, sqrt_one_minus_alpha: Any, prediction_type: str
) -> Any:
    """What the network should predict: ``noise`` (epsilon) or ``v = sqrt(a)*noise - sqrt(1-a)*x0``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return sqrt_alpha * noise - sqrt_one_minus_alpha * x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
