"""Samplers against the diffusers scheduler step loops they reproduce."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from msd_lora.diffusion.samplers import SAMPLERS, init_noise_sigma, sample, sampler_timesteps, timesteps
from msd_lora.diffusion.schedule import NoiseSchedule

SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_fake_model(tanh):
    """Deterministic stand-in for a UNet; strongly t-dependent so timestep mistakes show up."""

    def model_fn(x, t):
        t = float(t)
        return 0.5 * tanh(x) * math.cos(t / 70) + 0.1 * math.sin(t / 45) + 0.01 * t / 1000

    return model_fn


torch_model = make_fake_model(torch.tanh)
numpy_model = make_fake_model(np.tanh)


def diffusers_scheduler(name, prediction_type):
    if name == "ddim":
        return DDIMScheduler(
            **SD, prediction_type=prediction_type, steps_offset=1, clip_sample=False,
            set_alpha_to_one=False, timestep_spacing="leading",
        )
    if name == "dpm_solver_pp":
        return DPMSolverMultistepScheduler(
            **SD, prediction_type=prediction_type, algorithm_type="dpmsolver++", solver_order=2,
            solver_type="midpoint", lower_order_final=True, euler_at_final=False,
            use_karras_sigmas=False, final_sigmas_type="zero", timestep_spacing="linspace",
        )
    assert name == "euler"
    return EulerDiscreteScheduler(
        **SD, prediction_type=prediction_type, timestep_spacing="linspace", interpolation_type="linear"
    )


def diffusers_sample(scheduler, noise, num_steps):
    scheduler.set_timesteps(num_steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = torch_model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x).prev_sample
    return x


def initial_noise(seed=0):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def ours(name, schedule, noise, num_steps, model_fn=torch_model):
    return sample(name, schedule, model_fn, noise * init_noise_sigma(name, schedule, num_steps), num_steps)


def max_rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_matches_diffusers(name, prediction_type, num_steps):
    schedule = NoiseSchedule.from_config(**SD, prediction_type=prediction_type)
    scheduler = diffusers_scheduler(name, prediction_type)
    noise = initial_noise()
    expected = diffusers_sample(scheduler, noise, num_steps)

    ts = sampler_timesteps(name, schedule, num_steps)
    np.testing.assert_array_equal(ts.astype(np.float32) if name == "euler" else ts, scheduler.timesteps.numpy())
    assert init_noise_sigma(name, schedule, num_steps) == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-6)

    got = ours(name, schedule, noise, num_steps)
    assert got.dtype == torch.float32 and got.shape == noise.shape
    assert max_rel_err(got, expected) <= 1e-5
    # the comparison is meaningful: sampling moved the latents by > 1000x the tolerance
    assert max_rel_err(got, noise * float(scheduler.init_noise_sigma)) > 1e-2


@pytest.mark.parametrize("name", SAMPLERS)
def test_numpy_backend_matches_torch(name):
    schedule = NoiseSchedule.from_config(**SD, prediction_type="v_prediction")
    noise = initial_noise(1)
    with_torch = ours(name, schedule, noise, 12)
    with_numpy = ours(name, schedule, noise.numpy(), 12, model_fn=numpy_model)
    assert isinstance(with_numpy, np.ndarray) and with_numpy.dtype == np.float32
    assert max_rel_err(with_numpy, with_torch) <= 1e-5


def test_samplers_differ_from_each_other():
    schedule = NoiseSchedule.from_config(**SD)
    noise = initial_noise(2)
    results = {name: ours(name, schedule, noise, 10) for name in SAMPLERS}
    assert max_rel_err(results["ddim"], results["dpm_solver_pp"]) > 1e-3
    assert max_rel_err(results["euler"], results["dpm_solver_pp"]) > 1e-3


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("num_steps", [1, 7, 20, 48, 50, 61])
def test_timesteps_match_ddim_scheduler(spacing, num_steps):
    schedule = NoiseSchedule.from_config(**SD)
    scheduler = DDIMScheduler(**SD, steps_offset=1, timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    ts = timesteps(schedule, num_steps, spacing)
    assert ts.dtype == np.int64 and len(ts) == num_steps
    # diffusers' "trailing" can append a spurious -1 (e.g. n=61); we compare the first num_steps
    np.testing.assert_array_equal(ts, scheduler.timesteps.numpy()[:num_steps])
    assert np.all(np.diff(ts) < 0) and ts.min() >= 0 and ts.max() <= 999


def test_leading_spacing_is_stable_diffusions():
    ts = timesteps(NoiseSchedule.from_config(**SD), 50, "leading")
    assert ts[0] == 981 and ts[-1] == 1 and np.all(np.diff(ts) == -20)


def test_progress_called_once_per_step():
    calls = []
    schedule = NoiseSchedule.from_config(**SD)
    sample("ddim", schedule, numpy_model, np.zeros((1, 2), np.float32), 5, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 5) for i in range(5)]


def test_model_fn_receives_sampler_timesteps():
    schedule = NoiseSchedule.from_config(**SD)
    for name in SAMPLERS:
        seen = []

        def model_fn(x, t, seen=seen):
            seen.append(t)
            return x * 0.0

        sample(name, schedule, model_fn, np.ones((1, 2), np.float32), 25)
        assert seen == list(sampler_timesteps(name, schedule, 25))
        assert all(isinstance(t, int if name != "euler" else float) for t in seen)


def test_invalid_arguments():
    schedule = NoiseSchedule.from_config(**SD)
    with pytest.raises(ValueError, match="ddim.*dpm_solver_pp.*euler"):
        sample("heun", schedule, numpy_model, np.zeros(2), 10)
    with pytest.raises(ValueError, match="ddim"):
        init_noise_sigma("pndm", schedule, 10)
    with pytest.raises(ValueError, match="leading"):
        timesteps(schedule, 10, "karras")
    with pytest.raises(ValueError):
        timesteps(schedule, 0, "leading")
    with pytest.raises(ValueError):
        sample("ddim", schedule, numpy_model, np.zeros(2), 1001)
