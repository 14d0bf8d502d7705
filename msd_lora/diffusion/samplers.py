"""Backend-neutral deterministic samplers (DDIM, DPM-Solver++ 2M, Euler).

Every schedule quantity is computed in float64 numpy and handed to the update as a Python float;
the updates on latents use only ``*``, ``+``, ``-`` and ``/``. The same code therefore runs on
numpy arrays, torch tensors and MindSpore tensors.

The caller supplies ``model_fn(latents, t) -> output``: the network's raw prediction (epsilon or v,
as ``schedule.prediction_type`` says), with classifier-free guidance applied inside ``model_fn``.
``t`` is a Python ``int`` for ``ddim`` and ``dpm_solver_pp``; for ``euler`` it is a Python
``float`` that can be fractional (diffusers' Euler uses un-rounded linspace timesteps).

Initial latents are ``noise * init_noise_sigma(name, schedule, num_steps)`` (1.0 except for Euler).

Each sampler reproduces the diffusers scheduler as configured for Stable Diffusion:

* ``ddim``: ``DDIMScheduler(steps_offset=1, set_alpha_to_one=False, clip_sample=False,
  timestep_spacing="leading")`` with eta = 0.
* ``dpm_solver_pp``: ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
  solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace")``.
* ``euler``: ``EulerDiscreteScheduler(timestep_spacing="linspace", interpolation_type="linear")``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from msd_lora.diffusion.schedule import NoiseSchedule

SAMPLERS = ("ddim", "dpm_solver_pp", "euler")
SPACINGS = ("leading", "linspace", "trailing")

Tensor = Any  # numpy array, torch tensor or MindSpore tensor
ModelFn = Callable[[Tensor, Any], Tensor]
Progress = Callable[[int, int], None]


def timesteps(schedule: NoiseSchedule, num_steps: int, spacing: str = "leading") -> np.ndarray:
    """``num_steps`` integer timesteps, descending (int64), following diffusers' DDIM conventions.

    * ``leading``: ``k * (T // n) + 1`` (SD's ``steps_offset=1``), e.g. 981, 961, ..., 1 for n=50.
    * ``linspace``: ``round(linspace(0, T - 1, n))`` reversed, so it starts at T-1 and ends at 0.
    * ``trailing``: ``round(T - k * T / n) - 1``, starting at T-1 (diffusers, minus its extra step).
    """
    n, total = _check_steps(schedule, num_steps)
    if spacing == "leading":
        ts = np.arange(n) * (total // n) + 1
    elif spacing == "linspace":
        ts = np.linspace(0, total - 1, n).round()
    elif spacing == "trailing":
        # np.arange (not k * T / n) to reproduce diffusers' rounding exactly; [:n] drops the spurious
        # extra element (-1) that np.arange yields for some n (e.g. 61) through float error.
        ts = np.round(np.arange(total, 0, -total / n)[:n]) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    ts = ts.astype(np.int64)
    return ts if spacing == "trailing" else ts[::-1].copy()


def sampler_timesteps(name: str, schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """The timesteps the sampler ``name`` passes to ``model_fn``, in order (as diffusers' ``scheduler.timesteps``).

    int64 for ``ddim`` / ``dpm_solver_pp``; float64 (possibly fractional) for ``euler``.
    """
    _check_name(name)
    n, total = _check_steps(schedule, num_steps)
    if name == "ddim":
        return timesteps(schedule, n, "leading")
    if name == "dpm_solver_pp":  # n + 1 rounded linspace points, the final t = 0 dropped
        return np.linspace(0, total - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    return np.linspace(0, total - 1, n)[::-1].copy()  # euler: not rounded


def init_noise_sigma(name: str, schedule: NoiseSchedule, num_steps: int) -> float:
    """Standard deviation the initial Gaussian latents must be scaled to for sampler ``name``."""
    _check_name(name)
    if name != "euler":
        return 1.0
    return float(_euler_sigmas(schedule, num_steps)[0])


def sample(
    name: str,
    schedule: NoiseSchedule,
    model_fn: ModelFn,
    latents: Tensor,
    num_steps: int,
    progress: Progress | None = None,
) -> Tensor:
    """Run sampler ``name`` from ``latents`` (already scaled by ``init_noise_sigma``) down to t = 0.

    ``progress(i, num_steps)`` is called after each step ``i`` (0-based) when given.
    """
    _check_name(name)
    run = {"ddim": _ddim, "dpm_solver_pp": _dpm_solver_pp, "euler": _euler}[name]
    return run(schedule, model_fn, latents, num_steps, progress or (lambda i, n: None))


# --- shared helpers ---------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")


def _check_steps(schedule: NoiseSchedule, num_steps: int) -> tuple[int, int]:
    total = schedule.num_train_timesteps
    if not 1 <= int(num_steps) <= total:
        raise ValueError(f"num_steps must be in [1, {total}], got {num_steps}")
    return int(num_steps), total


def _x0_and_eps(
    output: Tensor, x: Tensor, alpha: float, sigma: float, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """Clean sample and noise estimates for ``x = alpha * x0 + sigma * eps`` (alpha^2 + sigma^2 = 1)."""
    if prediction_type == "epsilon":
        return (x - sigma * output) / alpha, output
    if prediction_type == "v_prediction":  # v = alpha * eps - sigma * x0
        return alpha * x - sigma * output, alpha * output + sigma * x
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def _ve_sigma(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Variance-exploding noise level sigma = sqrt((1 - a) / a) for each alpha_cumprod a."""
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


# --- DDIM -------------------------------------------------------------------------------------


def _ddim(schedule: NoiseSchedule, model_fn: ModelFn, x: Tensor, num_steps: int, progress: Progress) -> Tensor:
    """Deterministic DDIM (eta = 0); the step after the last timestep uses alphas_cumprod[0]."""
    ts = sampler_timesteps("ddim", schedule, num_steps)
    ac = schedule.alphas_cumprod
    for i, t in enumerate(ts):
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]  # set_alpha_to_one=False
        x0, eps = _x0_and_eps(model_fn(x, int(t)), x, math.sqrt(a_t), math.sqrt(1 - a_t), schedule.prediction_type)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        progress(i, len(ts))
    return x


# --- DPM-Solver++ 2M --------------------------------------------------------------------------


def _dpm_solver_pp(
    schedule: NoiseSchedule, model_fn: ModelFn, x: Tensor, num_steps: int, progress: Progress
) -> Tensor:
    """DPM-Solver++(2M), midpoint variant, data prediction; first order on the first and last step.

    In terms of the VE level s = sqrt((1-a)/a): alpha = 1/sqrt(1+s^2), sigma = s*alpha and
    lambda = log(alpha/sigma) = -log(s). The final level is 0, where the step returns the x0 estimate.
    """
    ts = sampler_timesteps("dpm_solver_pp", schedule, num_steps)
    levels = np.append(_ve_sigma(schedule.alphas_cumprod[ts]), 0.0)
    prev_x0, prev_lambda = None, None
    for i, t in enumerate(ts):
        s, s_next = float(levels[i]), float(levels[i + 1])  # python floats: numpy scalars hijack Tensor maths
        alpha, sigma = 1 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s)
        x0, _ = _x0_and_eps(model_fn(x, int(t)), x, alpha, sigma, schedule.prediction_type)
        lam = -math.log(s)
        if s_next == 0.0:  # final step (always first order): alpha_next = 1, sigma_next = 0
            x = x0
        else:
            alpha_n, sigma_n = 1 / math.sqrt(1 + s_next * s_next), s_next / math.sqrt(1 + s_next * s_next)
            h = -math.log(s_next) - lam
            phi = alpha_n * (1 - math.exp(-h))  # = -alpha_next * (exp(-h) - 1)
            if prev_x0 is None:
                x = (sigma_n / sigma) * x + phi * x0
            else:
                r = (lam - prev_lambda) / h
                d = x0 + (0.5 / r) * (x0 - prev_x0)  # D0 + D1/2 with D1 = (m0 - m1) / r
                x = (sigma_n / sigma) * x + phi * d
        prev_x0, prev_lambda = x0, lam
        progress(i, len(ts))
    return x


# --- Euler ------------------------------------------------------------------------------------


def _euler_sigmas(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """VE noise levels at the (fractional) Euler timesteps, linearly interpolated, plus a final 0."""
    ts = sampler_timesteps("euler", schedule, num_steps)
    table = _ve_sigma(schedule.alphas_cumprod)
    return np.append(np.interp(ts, np.arange(len(table)), table), 0.0)


def _euler(schedule: NoiseSchedule, model_fn: ModelFn, x: Tensor, num_steps: int, progress: Progress) -> Tensor:
    """Euler steps of the probability-flow ODE dx/ds = (x - x0(x, s)) / s in the VE parameterisation.

    The network sees the VP-scaled input x / sqrt(s^2 + 1).
    """
    ts = sampler_timesteps("euler", schedule, num_steps)
    levels = _euler_sigmas(schedule, num_steps)
    for i, t in enumerate(ts):
        s, s_next = float(levels[i]), float(levels[i + 1])
        scale = 1 / math.sqrt(s * s + 1)  # = alpha of the VP view; its sigma is s * scale
        x_in = x * scale
        x0, _ = _x0_and_eps(model_fn(x_in, float(t)), x_in, scale, s * scale, schedule.prediction_type)
        x = x + ((x - x0) / s) * (s_next - s)
        progress(i, len(ts))
    return x
