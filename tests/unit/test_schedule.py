"""NoiseSchedule and the forward process against diffusers' DDPMScheduler."""
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from msd_lora.diffusion.schedule import NoiseSchedule, add_noise, training_target

CONFIGS = {
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
    "linear": dict(beta_start=0.0001, beta_end=0.02),
    "squaredcos_cap_v2": dict(),
}
SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("beta_schedule", sorted(CONFIGS))
def test_schedule_matches_diffusers(beta_schedule):
    ours = NoiseSchedule.from_config(beta_schedule=beta_schedule, **CONFIGS[beta_schedule])
    ref = DDPMScheduler(beta_schedule=beta_schedule, **CONFIGS[beta_schedule])
    assert ours.num_train_timesteps == 1000
    assert ours.betas.dtype == np.float64 and ours.alphas_cumprod.dtype == np.float64
    # diffusers works in float32: betas agree to float32 rounding, the 1000-term cumprod drifts ~5e-7.
    np.testing.assert_allclose(ours.betas, ref.betas.double().numpy(), rtol=3e-7, atol=1e-9)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=0, atol=1.5e-6)


def test_num_train_timesteps_and_defaults_are_stable_diffusion():
    s = NoiseSchedule.from_config(num_train_timesteps=500)
    assert s.num_train_timesteps == 500 and s.prediction_type == "epsilon"
    sd = NoiseSchedule.from_config()
    assert sd.betas[0] == pytest.approx(0.00085) and sd.betas[-1] == pytest.approx(0.012)


def test_unknown_beta_schedule_lists_valid_names():
    with pytest.raises(ValueError, match="scaled_linear.*linear.*squaredcos_cap_v2"):
        NoiseSchedule.from_config(beta_schedule="sigmoid")


def test_unknown_prediction_type_rejected():
    with pytest.raises(ValueError, match="v_prediction"):
        NoiseSchedule.from_config(prediction_type="sample")


def test_coefficients_shape_dtype_and_values():
    s = NoiseSchedule.from_config(**SD)
    t = np.array([0, 10, 999, 500])
    sa, s1a = s.coefficients(t)
    assert sa.shape == (4,) and s1a.shape == (4,)
    assert sa.dtype == np.float32 and s1a.dtype == np.float32
    np.testing.assert_allclose(sa, np.sqrt(s.alphas_cumprod[t]), rtol=1e-6)
    np.testing.assert_allclose(sa**2 + s1a**2, 1.0, rtol=1e-6)
    assert sa[2] < sa[3] < sa[1] < sa[0]  # signal decreases with t
    sa4, s1a4 = s.coefficients(t, ndim=4)
    assert sa4.shape == (4, 1, 1, 1) and s1a4.shape == (4, 1, 1, 1)
    with pytest.raises(ValueError):
        s.coefficients(np.array([1000]))
    with pytest.raises(ValueError):
        s.coefficients(np.array([1.5]))


def test_snr():
    s = NoiseSchedule.from_config(**SD)
    ref = DDPMScheduler(**SD).alphas_cumprod.double().numpy()
    t = np.array([0, 1, 250, 999])
    expected = ref[t] / (1 - ref[t])
    np.testing.assert_allclose(s.snr(t), expected, rtol=2e-4)  # float32 1 - a cancels at small t
    assert np.all(np.diff(s.snr(np.arange(1000))) < 0)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 3, 5, 5, generator=g)
    noise = torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 37, 500, 999])
    return x0, noise, t


def _torch_coefficients(schedule, t):
    return tuple(torch.from_numpy(c) for c in schedule.coefficients(t.numpy(), ndim=4))


def test_add_noise_matches_diffusers():
    s = NoiseSchedule.from_config(**SD)
    x0, noise, t = _batch()
    ours = add_noise(x0, noise, *_torch_coefficients(s, t))
    ref = DDPMScheduler(**SD).add_noise(x0, noise, t)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_add_noise_numpy_equals_torch():
    s = NoiseSchedule.from_config(**SD)
    x0, noise, t = _batch(1)
    ours_t = add_noise(x0, noise, *_torch_coefficients(s, t))
    ours_np = add_noise(x0.numpy(), noise.numpy(), *s.coefficients(t.numpy(), ndim=4))
    assert isinstance(ours_np, np.ndarray) and ours_np.dtype == np.float32
    np.testing.assert_allclose(ours_np, ours_t.numpy(), rtol=1e-6, atol=1e-7)


def test_training_target_epsilon_is_noise():
    s = NoiseSchedule.from_config(**SD)
    x0, noise, t = _batch(2)
    target = training_target(x0, noise, *_torch_coefficients(s, t), "epsilon")
    assert torch.equal(target, noise)


def test_training_target_v_matches_diffusers_velocity():
    s = NoiseSchedule.from_config(**SD, prediction_type="v_prediction")
    x0, noise, t = _batch(3)
    ours = training_target(x0, noise, *_torch_coefficients(s, t), s.prediction_type)
    ref = DDPMScheduler(**SD, prediction_type="v_prediction").get_velocity(x0, noise, t)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, noise, atol=1e-2)


def test_training_target_unknown_type():
    with pytest.raises(ValueError, match="epsilon"):
        training_target(np.zeros(2), np.ones(2), 1.0, 0.0, "sample")
