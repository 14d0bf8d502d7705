"""The training methods give the same loss and the same LoRA on both backends (docs/parity.md, docs/training.md).

Loss options that live in the numpy inputs (weights, thresholds, noise) reuse one compiled MindSpore train step:
each option trains 20 steps from the same start on both backends, optimizer state reset in between. The
prediction type is part of the compiled graph, so v-prediction (with zero-terminal SNR) has its own pair.
"""
from __future__ import annotations

import pytest

pytest.importorskip("mindspore")
pytest.importorskip("mindone")

import dataclasses

import numpy as np

from msd_lora.backends.base import OptimizerSettings
from msd_lora.config import load_train_config
from msd_lora.diffusion.losses import LossOptions
from msd_lora.train import Trainer
from tests.conftest import tiny_args
from tests.parity.test_backends_agree import DEVICES, assert_lora_close, lora_error

STEPS = 20
# AdamW's update is lr * m / (sqrt(v) + eps): a LoRA element whose gradient is near eps moves by a fraction of lr that
# float32 noise decides. With eps 1e-8 about 1 % of the tiny model's attn1.to_k LoRA-B gradients are under 1e-7 on
# the first step and differ by ~1e-9 between the frameworks: plain l2 training then differs by 1.6e-2 after one step.
# eps 1e-6 keeps those elements in the linear regime; AdamW at 1e-8 is compared in test_backends_agree.py.
ADAM_EPS = "1e-6"
EPSILON_OPTIONS = {
    "min-SNR gamma 5": LossOptions(snr_gamma=5.0),
    "debiased estimation": LossOptions(debiased_estimation=True),
    "huber (snr schedule)": LossOptions(loss_type="huber", huber_c=0.1),
    "smooth_l1 (exponential schedule)": LossOptions(loss_type="smooth_l1", huber_c=0.1, huber_schedule="exponential"),
    "noise offset, adaptive": LossOptions(noise_offset=0.1, adaptive_noise_scale=0.05),
    "multires noise": LossOptions(multires_noise_iterations=6, multires_noise_discount=0.3),
    "input perturbation": LossOptions(input_perturbation=0.1),
}
V_OPTIONS = {
    "v-prediction, zero terminal SNR, lora_dropout 0.1, min-SNR gamma 5": LossOptions(snr_gamma=5.0),
    "v-prediction, zero terminal SNR, lora_dropout 0.1, debiased estimation": LossOptions(debiased_estimation=True),
}


def make_pair(tmp_path, *flags: str) -> list[Trainer]:
    trainers = []
    for backend in ("torch", "mindspore"):
        args = tiny_args(tmp_path / backend, "--backend", backend, "--device", DEVICES[backend], "--max_train_steps",
                         str(STEPS), "--warmup_steps", "2", "--optim_eps", ADAM_EPS, *flags)
        trainer = Trainer(load_train_config(args), show_progress=False)
        trainer.initial = trainer.backend.lora_weights()
        trainers.append(trainer)
    return trainers


def train_with(trainer: Trainer, options: LossOptions, settings: OptimizerSettings | None = None) -> tuple[float, dict]:
    """(loss of the first step, LoRA after STEPS steps) with `options`, from the run's initial LoRA and fresh
    optimizer state (another optimizer when `settings` are given), through the backend's production train step."""
    backend = trainer.backend
    backend.set_lora_weights(trainer.initial)
    if settings is not None:
        backend.configure_training(settings)
    backend.load_training_state({}, {"optimizer_step": 0})
    dropout = bool(trainer.spec.dropout or trainer.spec.network_dropout)
    inputs = trainer.data.inputs(backend, trainer.info, trainer.schedule, options, dropout=dropout)
    losses = []
    try:
        for step in range(STEPS):  # the first step's loss is the training graph's: no separate loss graph to compile
            result = backend.train_step(inputs(step), trainer.lr_at(step), update=True, accumulation=1)
            assert result.updated, f"step {step} skipped"
            losses.append(result.loss)
    finally:
        inputs.close()
    return losses[0], backend.lora_weights()


def check_option(pair: list[Trainer], name: str, options: LossOptions, measured) -> None:
    (loss_t, lora_t), (loss_m, lora_m) = (train_with(t, options) for t in pair)
    assert measured(f"{name}: loss (relative)", abs(loss_m - loss_t) / abs(loss_t), 1e-5) <= 1e-5
    assert_lora_close(lora_m, lora_t, 1e-3, f"{name}: LoRA after {STEPS} steps", measured)
    if not hasattr(pair[0], "plain_lora"):
        pair[0].plain_lora = train_with(pair[0], LossOptions())[1]
    assert lora_error(lora_t, pair[0].plain_lora) > 1e-2, f"{name} trains the same LoRA as the plain l2 loss"


@pytest.fixture(scope="module")
def epsilon_pair(tmp_path_factory):
    """Attention LoRA with gradient checkpointing on both (MindSpore: recompute), 20 % of the images held out."""
    return make_pair(tmp_path_factory.mktemp("methods_eps"), "--validation_split", "0.2",
                     "--gradient_checkpointing", "True")


@pytest.fixture(scope="module")
def v_pair(tmp_path_factory):
    """v-prediction on zero-terminal-SNR betas, with lora_dropout 0.1 (its masks hashed alike on both backends)."""
    return make_pair(tmp_path_factory.mktemp("methods_v"), "--prediction_type", "v_prediction",
                     "--zero_terminal_snr", "True", "--lora_dropout", "0.1")


@pytest.mark.parametrize("name", list(EPSILON_OPTIONS))
def test_loss_option_trains_alike(epsilon_pair, name, measured):
    check_option(epsilon_pair, name, EPSILON_OPTIONS[name], measured)


@pytest.mark.parametrize("name", list(V_OPTIONS))
def test_v_prediction_options_train_alike(v_pair, name, measured):
    assert all(t.schedule.zero_terminal_snr and t.backend.prediction_type == "v_prediction" for t in v_pair)
    check_option(v_pair, name, V_OPTIONS[name], measured)


@pytest.fixture(scope="module")
def variant_pair(tmp_path_factory):
    """DoRA + rsLoRA + LoCon (kohya's C3Lier targets: attention, feed-forward, proj, ResNet and sampler convs at
    conv_rank 4) on the UNet, DoRA on the text encoder's attention and MLP, network_dropout 0.1 on every layer, and
    per-part learning rates (UNet 4e-3, text encoder 1e-3)."""
    return make_pair(tmp_path_factory.mktemp("methods_variants"), "--lora_type", "dora", "--use_rslora", "True",
                     "--lora_target_modules", "c3lier", "--conv_rank", "4", "--lora_ft_text_encoder", "True",
                     "--lora_te_target_modules", "lierla", "--network_dropout", "0.1", "--unet_lr", "4e-3",
                     "--text_encoder_lr", "1e-3")


def test_dora_rslora_locon_with_network_dropout_train_alike(variant_pair, measured):
    trainer = variant_pair[0]
    layers = trainer.initial
    assert {layer.down.shape[2:] for layer in layers.values() if layer.down.ndim == 4} == {(1, 1), (3, 3)}
    assert all(layer.magnitude is not None for layer in layers.values())
    assert any(k.endswith("mlp.fc1") for k in layers) and any(k.endswith("resnets.0.conv1") for k in layers)
    (loss_t, lora_t), (loss_m, lora_m) = (train_with(t, LossOptions()) for t in variant_pair)
    what = "DoRA + rsLoRA + LoCon + network dropout + per-part rates"
    assert measured(f"{what}: loss (relative)", abs(loss_m - loss_t) / abs(loss_t), 1e-5) <= 1e-5
    assert_lora_close(lora_m, lora_t, 1e-3, f"{what}: LoRA after {STEPS} steps", measured)
    magnitude_error = max(float(abs(lora_m[k].magnitude - lora_t[k].magnitude).max() / abs(lora_t[k].magnitude).max())
                          for k in lora_t)
    assert measured(f"DoRA magnitudes after {STEPS} steps", magnitude_error, 1e-3) <= 1e-3
    moved = max(float(abs(lora_t[k].magnitude - layers[k].magnitude).max()) for k in lora_t)
    assert moved > 1e-4  # the magnitudes trained


def test_validation_loss_agrees_and_switching_the_lora_off_gives_the_base_model(epsilon_pair, measured):
    trained = {k: dataclasses.replace(v, up=v.up + 0.02) for k, v in epsilon_pair[0].initial.items()}
    losses = []
    for trainer in epsilon_pair:
        trainer.backend.set_lora_weights(trainer.initial)
        base = trainer.validation.loss()  # B = 0: the base model
        trainer.backend.set_lora_weights(trained)
        with_lora = trainer.validation.loss()
        trainer.backend.set_lora_enabled(False)
        assert trainer.validation.loss() == base != with_lora  # off is exactly the base model
        trainer.backend.set_lora_enabled(True)
        losses.append(with_lora)
    assert measured("validation loss (relative)", abs(losses[1] - losses[0]) / losses[0], 1e-5) <= 1e-5


@pytest.mark.parametrize("optimizer", ["prodigy", "adafactor"])
def test_optimizers_train_alike(epsilon_pair, optimizer, measured):
    """prodigyopt's Prodigy and transformers' Adafactor on torch against their flat MindSpore forms (prodigy at its
    usual lr 1.0, with bias correction; adafactor at the run's rates; both with weight decay)."""
    settings = dataclasses.replace(OptimizerSettings.from_config(epsilon_pair[0].cfg), optimizer=optimizer,
                                   use_bias_correction=True, weight_decay=0.01)
    scale = 1.0 / epsilon_pair[0].cfg.start_learning_rate if optimizer == "prodigy" else 1.0
    loras, states = [], []
    for trainer in epsilon_pair:
        schedule = trainer.lr_at
        trainer.lr_at = lambda step, schedule=schedule: schedule(step) * scale  # prodigy: lr is d's multiplier
        try:
            loras.append(train_with(trainer, LossOptions(), settings)[1])
            states.append(trainer.backend.training_state())
            assert states[-1][1]["optimizer"] == optimizer and states[-1][1]["optimizer_step"] == STEPS
            if trainer.backend.name == "mindspore":  # the torch state, loaded into MindSpore, comes back unchanged
                trainer.backend.load_training_state(*states[0])
                arrays, scalars = trainer.backend.training_state()
                assert arrays.keys() == states[0][0].keys()
                assert all(np.array_equal(arrays[k], states[0][0][k]) for k in arrays)
                assert scalars["optimizer"] == optimizer  # (MindSpore adds its loss scale)
                assert all(scalars[k] == pytest.approx(v, rel=1e-6) for k, v in states[0][1].items()
                           if k != "optimizer")
        finally:
            trainer.lr_at = schedule
            trainer.backend.configure_training(OptimizerSettings.from_config(trainer.cfg))
    assert_lora_close(loras[1], loras[0], 1e-3, f"{optimizer}: LoRA after {STEPS} steps", measured)
    (torch_arrays, torch_scalars), (ms_arrays, ms_scalars) = states
    assert {k: v.shape for k, v in torch_arrays.items()} == {k: v.shape for k, v in ms_arrays.items()}
    if optimizer == "prodigy":
        assert measured("prodigy's d after 20 steps (relative)", abs(ms_scalars["d"] / torch_scalars["d"] - 1), 1e-3) \
            <= 1e-3
    assert lora_error(loras[0], epsilon_pair[0].initial) > 1e-2


def test_samples_during_training_equal_text_to_image_on_mindspore(epsilon_pair, tmp_path):
    """On MindSpore too, the samples a run draws at a step (LoRA file merged, live LoRA cells switched off) are
    pixel-identical to `text_to_image.py --backend mindspore` sampling that step's file; the live LoRA is untouched."""
    from PIL import Image

    from msd_lora.cli.sample import main as text_to_image

    trainer = epsilon_pair[1]
    prompt = "a white circle on a blue background in sks style"
    trainer.cfg = dataclasses.replace(trainer.cfg, validation_prompts=[prompt], validation_negative_prompt="blurry",
                                      validation_sampler="ddim", validation_steps=4, validation_guidance_scale=3.5,
                                      validation_seed=11, validation_images=2)
    rng = np.random.default_rng(5)
    trainer.backend.set_lora_weights({k: dataclasses.replace(layer, up=0.05 * rng.standard_normal(layer.up.shape)
                                                             .astype(np.float32))
                                      for k, layer in trainer.initial.items()})  # a LoRA that changes the pictures
    live = trainer.backend.lora_weights()
    folder = trainer.sample_during_training(STEPS)
    after = trainer.backend.lora_weights()
    assert all(np.array_equal(live[k].up, after[k].up) and np.array_equal(live[k].down, after[k].down) for k in live)
    assert text_to_image(["--backend", "mindspore", "--device", DEVICES["mindspore"], "--prompt", prompt,
                          "--negative_prompt", "blurry", "--sampler", "ddim", "--sampling_steps", "4", "--scale",
                          "3.5", "--seed", "11", "--n_samples", "2", "--H", "32", "--W", "32", "--model_config",
                          trainer.cfg.model_config, "--lora_ckpt_path",
                          str(trainer.output / "ckpt" / f"lora-{STEPS:06d}.safetensors"),
                          "--output_path", str(tmp_path / "t2i")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "prompt00.png")),
                                  np.asarray(Image.open(tmp_path / "t2i" / "grid-000.png")))
