"""Each loss option against a plain implementation of its formula (loops over samples, torch where torch defines
the operation), and the config's checks of the loss keys."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msd_lora.config import load_train_config
from msd_lora.diffusion import losses
from msd_lora.diffusion.losses import LossOptions
from msd_lora.diffusion.schedule import NoiseSchedule
from msd_lora.errors import ConfigError

SD = NoiseSchedule.from_config()  # SD 1.x: scaled_linear 0.00085 .. 0.012
T = np.array([0, 1, 10, 250, 500, 999], np.int64)


def plain_snr(schedule: NoiseSchedule, t: int) -> float:
    a = float(np.prod(1.0 - schedule.betas[: t + 1]))
    return a / (1.0 - a)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_min_snr_gamma_over_snr(prediction):
    schedule, gamma = SD.with_prediction_type(prediction), 5.0
    got = LossOptions(snr_gamma=gamma).weights(schedule, T)
    for t, w in zip(T, got):
        snr = plain_snr(schedule, int(t))
        want = min(snr, gamma) / (snr + 1 if prediction == "v_prediction" else snr)
        assert w == pytest.approx(want, rel=1e-5)
    assert got[-1] == pytest.approx(1.0 if prediction == "epsilon" else plain_snr(schedule, 999) / (
        plain_snr(schedule, 999) + 1), rel=1e-5)  # noisy timesteps keep weight 1 (eps)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_debiased_estimation_weights(prediction):
    schedule = SD.with_prediction_type(prediction)
    got = LossOptions(debiased_estimation=True).weights(schedule, T)
    for t, w in zip(T, got):
        snr = min(plain_snr(schedule, int(t)), 1000.0)
        assert w == pytest.approx(1 / (snr + 1) if prediction == "v_prediction" else 1 / math.sqrt(snr), rel=1e-5)


def test_weights_multiply_and_smooth_l1_divides_by_the_threshold():
    options = LossOptions(snr_gamma=1.0, debiased_estimation=True, loss_type="smooth_l1", huber_c=0.2,
                          huber_schedule="constant")
    snr = np.array([plain_snr(SD, int(t)) for t in T])
    want = np.minimum(snr, 1.0) / snr / np.sqrt(np.minimum(snr, 1000)) / 0.2
    np.testing.assert_allclose(options.weights(SD, T), want, rtol=1e-5)


def test_huber_threshold_schedules_as_kohya_defines_them():
    c = 0.1
    for t in T:
        a = float(SD.alphas_cumprod[t])
        sigma = math.sqrt((1 - a) / a)
        assert losses.huber_thresholds(SD, np.array([t]), c, "snr")[0] == pytest.approx((1 - c) / (1 + sigma) ** 2 + c)
        alpha = -math.log(c) / 1000
        assert losses.huber_thresholds(SD, np.array([t]), c, "exponential")[0] == pytest.approx(math.exp(-alpha * t))
        assert losses.huber_thresholds(SD, np.array([t]), c, "constant")[0] == c
    assert not LossOptions().thresholds(SD, T).any()  # l2: no threshold


def plain_loss(pred, target, weights, c, kind):
    """The per-sample loops: l2 = mean d^2; huber = mean 2c(sqrt(d^2+c^2)-c); smooth_l1 = mean 2(sqrt(d^2+c^2)-c)."""
    total = 0.0
    for b in range(len(pred)):
        d = (pred[b] - target[b]).astype(np.float64)
        if kind == "l2":
            value = np.mean(d**2)
        elif kind == "huber":
            value = np.mean(2 * c[b] * (np.sqrt(d**2 + c[b] ** 2) - c[b]))
        else:
            value = np.mean(2 * (np.sqrt(d**2 + c[b] ** 2) - c[b]))
        total += weights[b] * value
    return total / len(pred)


@pytest.mark.parametrize("kind", ["l2", "huber", "smooth_l1"])
@pytest.mark.parametrize("array", ["numpy", "torch"])
def test_weighted_loss_is_the_per_sample_formula(kind, array):
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((2, 4, 4, 8, 8)).astype(np.float32)
    options = LossOptions(loss_type=kind, snr_gamma=5.0, huber_schedule="snr")
    weights, c = options.weights(SD, T[:4]), options.thresholds(SD, T[:4])
    unfolded = weights * (c if kind == "smooth_l1" else 1)  # the plain formula divides by c itself
    want = plain_loss(pred, target, unfolded, c, kind)
    arrays = losses.loss_inputs(weights, c)
    to = torch.from_numpy if array == "torch" else np.asarray
    got = losses.weighted_loss(to(pred), to(target), *map(to, arrays))
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_unweighted_l2_is_mse():
    rng = np.random.default_rng(1)
    pred, target = (torch.from_numpy(a) for a in rng.standard_normal((2, 3, 4, 8, 8)).astype(np.float32))
    terms = [torch.from_numpy(a) for a in losses.loss_inputs(np.ones(3, np.float32), np.zeros(3, np.float32))]
    assert float(losses.weighted_loss(pred, target, *terms)) == pytest.approx(float(F.mse_loss(pred, target)), rel=1e-6)


def test_huber_gradient_is_finite_where_prediction_equals_target():
    pred = torch.zeros(2, 1, 2, 2, requires_grad=True)
    terms = [torch.from_numpy(a) for a in losses.loss_inputs(np.ones(2, np.float32), np.array([0.0, 0.1], np.float32))]
    losses.weighted_loss(pred, torch.zeros(2, 1, 2, 2), *terms).backward()
    assert torch.isfinite(pred.grad).all()


def test_offset_noise_adds_one_draw_per_channel():
    noise = np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)
    got = LossOptions(noise_offset=0.1).noise(noise, None, np.random.default_rng(3))
    shift = np.random.default_rng(3).standard_normal((2, 4, 1, 1))
    np.testing.assert_allclose(got, noise + 0.1 * shift, rtol=1e-6, atol=1e-7)


def test_adaptive_noise_offset_follows_the_latent_channel_means():
    rng = np.random.default_rng(4)
    noise, latents = rng.standard_normal((2, 2, 4, 4, 4)).astype(np.float32)
    latents[0, 0] += 3.0
    got = LossOptions(noise_offset=0.05, adaptive_noise_scale=0.1).noise(noise, latents, np.random.default_rng(5))
    shift = np.random.default_rng(5).standard_normal((2, 4, 1, 1))
    for b in range(2):
        for c in range(4):
            strength = max(0.0, 0.05 + 0.1 * abs(float(latents[b, c].astype(np.float64).mean())))
            np.testing.assert_allclose(got[b, c], noise[b, c] + strength * shift[b, c, 0, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size_in,size_out", [((1, 1), (8, 8)), ((3, 2), (8, 8)), ((5, 7), (16, 12)), ((8, 8), (8, 8))])
def test_bilinear_resize_matches_torch_interpolate(size_in, size_out):
    x = np.random.default_rng(6).standard_normal((2, 3, *size_in))
    want = F.interpolate(torch.from_numpy(x), size=size_out, mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(losses.resize_bilinear(x, *size_out), want, rtol=1e-10, atol=1e-12)


def test_pyramid_noise_is_kohyas_sum_of_upsampled_levels():
    noise = np.random.default_rng(7).standard_normal((2, 4, 16, 16)).astype(np.float32)
    got = LossOptions(multires_noise_iterations=6, multires_noise_discount=0.3).noise(noise, None,
                                                                                     np.random.default_rng(8))
    rng, total = np.random.default_rng(8), torch.from_numpy(noise.astype(np.float64))
    for i in range(6):  # kohya's loop, torch's upsampling
        r = rng.random() * 2 + 2
        hn, wn = max(1, int(16 / r**i)), max(1, int(16 / r**i))
        level = torch.from_numpy(rng.standard_normal((2, 4, hn, wn)))
        total += F.interpolate(level, size=(16, 16), mode="bilinear") * 0.3**i
        if hn == 1 or wn == 1:
            break
    np.testing.assert_allclose(got, (total / total.std()).numpy(), rtol=1e-5, atol=1e-6)
    assert got.std() == pytest.approx(1.0, rel=1e-3)


def test_input_perturbation_changes_only_the_input_noise():
    noise = np.random.default_rng(9).standard_normal((2, 4, 8, 8)).astype(np.float32)
    options = LossOptions(input_perturbation=0.1)
    assert options.noise(noise, None, np.random.default_rng(0)) is noise  # the target's noise is untouched
    got = options.input_noise(noise, np.random.default_rng(10))
    extra = np.random.default_rng(10).standard_normal((2, 4, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(got, noise + 0.1 * extra, rtol=1e-6)
    assert LossOptions().input_noise(noise, np.random.default_rng(0)) is noise


def test_zero_terminal_snr_matches_diffusers_rescale():
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              rescale_betas_zero_snr=True)
    rescaled = SD.with_zero_terminal_snr()
    # diffusers rescales in float32: the betas (ratios of neighbours) carry its rounding, alphas_cumprod does not
    np.testing.assert_allclose(rescaled.alphas_cumprod, reference.alphas_cumprod.double().numpy(), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(rescaled.betas, reference.betas.double().numpy(), rtol=1e-3)
    assert rescaled.alphas_cumprod[-1] == 0.0 and rescaled.zero_terminal_snr
    assert rescaled.alphas_cumprod[0] == pytest.approx(SD.alphas_cumprod[0], rel=1e-12)  # the first SNR kept
    sampling = rescaled.for_sampling()
    assert sampling.alphas_cumprod[-1] == 2.0**-24 and np.isfinite(np.sqrt(1 / sampling.alphas_cumprod - 1)).all()
    assert SD.for_sampling() is SD


# --- config ------------------------------------------------------------------------------------------------------
def config(*flags: str):
    return load_train_config(["--data_path", "x", *flags])


@pytest.mark.parametrize("flags,message", [
    (("--snr_gamma", "0"), "'snr_gamma'"), (("--snr_gamma", "-1"), "'snr_gamma'"),
    (("--loss_type", "l1"), "'loss_type'"), (("--huber_c", "0"), "'huber_c'"),
    (("--adaptive_noise_scale", "0.1"), "adaptive_noise_scale adjusts noise_offset"),
    (("--zero_terminal_snr", "True", "--prediction_type", "epsilon"), "zero_terminal_snr needs prediction_type"),
    (("--prediction_type", "sample"), "'prediction_type'"), (("--multires_noise_discount", "0"), "discount"),
])
def test_bad_loss_settings_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        config(*flags)


def test_kohya_names_are_read():
    cfg = config("--min_snr_gamma", "5", "--ip_noise_gamma", "0.1", "--debiased_estimation_loss", "True")
    assert (cfg.snr_gamma, cfg.input_perturbation, cfg.debiased_estimation) == (5.0, 0.1, True)
