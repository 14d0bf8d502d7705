"""Training methods on the torch reference: per-part learning rates, the loss options through the loop, and a
v-prediction LoRA sampled the way it was trained."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from msd_lora.backends.probe import probe_for
from msd_lora.config import load_train_config
from msd_lora.lora.formats import read_lora
from msd_lora.sample import SamplingOptions, follow_lora_training, generate, load_pipeline, merge_loras, read_lora_files
from msd_lora.train import Trainer
from tests.conftest import TINY_MODEL, interrupt_on_call, tiny_args


def make_trainer(tmp_path, *extra: str) -> Trainer:
    """A tiny-config trainer writing into `tmp_path` (replacing what is there unless the flags resume)."""
    replace = () if "--resume" in extra else ("--overwrite", "True")
    return Trainer(load_train_config(tiny_args(tmp_path, *replace, *extra)), show_progress=False)


def test_each_part_follows_its_own_learning_rate(tmp_path):
    trainer = make_trainer(tmp_path, "--lora_ft_text_encoder", "True", "--max_train_steps", "4", "--unet_lr", "2e-3",
                           "--text_encoder_lr", "0", "--warmup_steps", "2")
    initial = trainer.backend.lora_weights()
    result = trainer.run()
    final = trainer.backend.lora_weights()
    text = [k for k in final if k.startswith("text_encoder.")]
    assert text and all(np.array_equal(final[k].up, initial[k].up) for k in text)  # lr 0: untouched, decay too
    assert all(np.abs(final[k].up).max() > 0 for k in final if k.startswith("unet."))
    rows = list(csv.DictReader(open(result.output_path / "train_log.csv")))
    for step, row in enumerate(rows):
        assert float(row["lr"]) == pytest.approx(trainer.lr_at(step) * 2e-3 / 5e-3)  # the schedule's shape, scaled
        assert float(row["lr_text_encoder"]) == 0.0


def test_first_adam_step_moves_each_part_by_its_rate(tmp_path):
    """Adam's first update is lr * g / (|g| + eps) ~ lr * sign(g): the largest LoRA-B change of each part is its rate."""
    trainer = make_trainer(tmp_path, "--lora_ft_text_encoder", "True", "--max_train_steps", "1", "--unet_lr", "4e-3",
                           "--text_encoder_lr", "1e-3", "--scheduler", "constant", "--weight_decay", "0",
                           "--clip_grad", "False", "--warmup_steps", "0")
    trainer.run()
    final = trainer.backend.lora_weights()
    for part, rate in (("unet.", 4e-3), ("text_encoder.", 1e-3)):
        biggest = max(float(np.abs(layer.up).max()) for key, layer in final.items() if key.startswith(part))
        assert biggest == pytest.approx(rate, rel=1e-3)


def test_loss_options_run_through_the_loop(tmp_path):
    trainer = make_trainer(tmp_path, "--max_train_steps", "2", "--snr_gamma", "5", "--loss_type", "huber",
                           "--noise_offset", "0.05", "--multires_noise_iterations", "4", "--input_perturbation", "0.1")
    batch = trainer.micro_batch(1)
    assert batch.huber_c.min() > 0 and not np.array_equal(batch.input_noise, batch.noise)
    assert np.isfinite(trainer.run().final_loss)


def test_a_v_prediction_lora_samples_as_trained(tmp_path):
    """An epsilon model trained to predict v on a zero-terminal-SNR schedule: the LoRA says so, and sampling with it
    from the command line's code path follows, giving the in-training pipeline's images."""
    trainer = make_trainer(tmp_path / "run", "--max_train_steps", "3", "--prediction_type", "v_prediction",
                           "--zero_terminal_snr", "True", "--snr_gamma", "5")
    result = trainer.run()
    metadata = read_lora(result.lora_path).metadata
    assert (metadata["msd_lora.prediction_type"], metadata["msd_lora.zero_terminal_snr"]) == ("v_prediction", "True")
    options = SamplingOptions(steps=4, n_samples=1, height=32, width=32, seed=3)
    during = generate(trainer.pipeline, "a red circle", 1, options)
    pipeline, _ = load_pipeline(TINY_MODEL, trainer.cfg.model_config)
    merge_loras(pipeline.backend, read_lora_files([(str(result.lora_path), 1.0)], pipeline.module_index))
    plain = generate(pipeline, "a red circle", 1, options)
    notes = follow_lora_training(pipeline, [str(result.lora_path)])
    assert notes and "v_prediction" in notes[0] and pipeline.schedule.prediction_type == "v_prediction"
    # merged weights against the trainer's live LoRA side path: float rounding may move a pixel by one level
    assert np.abs(generate(pipeline, "a red circle", 1, options).astype(int) - during).max() <= 1
    assert np.abs(plain.astype(int) - during).max() > 32  # sampled as epsilon, the same weights give other images


def test_zero_terminal_snr_on_an_epsilon_model_asks_for_v_prediction(tmp_path):
    from msd_lora.errors import ConfigError

    with pytest.raises(ConfigError, match="set prediction_type: v_prediction"):
        make_trainer(tmp_path, "--zero_terminal_snr", "True")


def test_samples_during_training_equal_text_to_image_from_the_saved_checkpoint(tmp_path):
    """Samples drawn at step 4 (sample_every_n_steps) are pixel-identical to `text_to_image.py` sampling the
    checkpoint file of step 4, negative prompt, sampler, steps, CFG and seed included; training goes on unchanged."""
    from PIL import Image

    from msd_lora.cli.sample import main as text_to_image

    prompt = "a red circle on a blue background in sks style"
    settings = ["--validation_prompts", prompt, "--validation_negative_prompt", "blurry", "--validation_sampler", "ddim",
                "--validation_steps", "6", "--validation_guidance_scale", "3.5", "--validation_seed", "11",
                "--validation_images", "2", "--use_ema", "True", "--ema_decay", "0.5"]
    trainer = make_trainer(tmp_path / "run", "--max_train_steps", "6", "--sample_every_n_steps", "4", *settings)
    result = trainer.run()
    grid = np.asarray(Image.open(result.output_path / "samples" / "step-000004" / "prompt00.png"))
    checkpoint = result.output_path / "ckpt" / "lora-000004.safetensors"
    assert text_to_image(["--prompt", prompt, "--negative_prompt", "blurry", "--sampler", "ddim",
                          "--sampling_steps", "6", "--scale", "3.5", "--seed", "11", "--n_samples", "2", "--H", "32",
                          "--W", "32", "--model_config", trainer.cfg.model_config, "--lora_ckpt_path",
                          str(checkpoint), "--output_path", str(tmp_path / "t2i")]) == 0
    np.testing.assert_array_equal(grid, np.asarray(Image.open(tmp_path / "t2i" / "grid-000.png")))
    reference = make_trainer(tmp_path / "plain", "--max_train_steps", "6", *settings).run()  # no samples drawn
    plain, sampled = read_lora(reference.lora_path).weights, read_lora(result.lora_path).weights
    assert all(np.array_equal(plain[k].up, sampled[k].up) and np.array_equal(plain[k].down, sampled[k].down)
               for k in plain)


def test_validation_loss_is_logged_on_held_out_images(tmp_path):
    trainer = make_trainer(tmp_path, "--max_train_steps", "6", "--validation_split", "0.2",
                           "--validate_every_n_steps", "3")
    held = trainer.data.held_out.items
    assert len(held) == 4  # 20 % of 20 images
    trained = {int(i) for group in trainer.order.groups for i in group}
    assert trained.isdisjoint(held) and len(trained) == 16
    before = trainer.validation.loss()
    assert trainer.validation.loss() == before  # fixed timesteps and noise: the same number twice
    result = trainer.run()
    rows = list(csv.DictReader(open(result.output_path / "train_log.csv")))
    logged = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    assert [s for s, _ in logged] == [3, 6]
    assert logged[-1][1] == pytest.approx(trainer.validation.loss())
    assert (result.output_path / "loss.png").is_file()


def test_validation_loss_follows_the_lora(tmp_path):
    """The held-out loss changes with the weights and only with them: zeroing the LoRA gives the base model's."""
    trainer = make_trainer(tmp_path, "--max_train_steps", "1", "--validation_split", "0.2")
    base = trainer.validation.loss()
    trained = {k: type(v)(v.down, v.up + 0.05, v.alpha) for k, v in trainer.backend.lora_weights().items()}
    trainer.backend.set_lora_weights(trained)
    assert trainer.validation.loss() != base
    trainer.backend.set_lora_enabled(False)
    assert trainer.validation.loss() == base


def test_gradient_checkpointing_trains_the_same_lora(tmp_path):
    flags = ["--max_train_steps", "3", "--lora_ft_text_encoder", "True", "--lora_target_modules", "c3lier"]
    plain = make_trainer(tmp_path / "plain", *flags)
    checkpointed = make_trainer(tmp_path / "ckpt", *flags, "--gradient_checkpointing", "True")
    assert checkpointed.backend.unet.is_gradient_checkpointing
    assert checkpointed.backend.text_encoder.text_model.encoder.gradient_checkpointing
    for trainer, runs in ((plain, 1), (checkpointed, 2)):  # a checkpointed block runs again in the backward pass
        calls = []
        for first_op in (trainer.backend.unet.down_blocks[0].resnets[0].norm1,  # recomputation stops once it has
                         trainer.backend.text_encoder.text_model.encoder.layers[0].layer_norm1):  # what it needs
            first_op.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        trainer.backend.evaluate_loss(trainer.micro_batch(0))
        calls.clear()
        probe_for(trainer.backend).lora_gradients(trainer.micro_batch(0))
        assert len(calls) == 2 * runs
    plain.run(), checkpointed.run()
    want, got = plain.backend.lora_weights(), checkpointed.backend.lora_weights()
    worst = max(float(np.abs(got[k].up - want[k].up).max() / np.abs(want[k].up).max()) for k in want)
    assert worst <= 1e-5


@pytest.mark.parametrize("optimizer", ["prodigy", "adafactor"])
def test_a_resumed_run_of_each_optimizer_equals_an_uninterrupted_one(tmp_path, optimizer):
    """The optimizer's whole state (prodigy's d, d_max, numerator, s and p0; adafactor's factored moments) goes into
    the resume file: 2 steps + resume + 2 steps is bit-identical to 4 steps; DoRA + LoCon layers included."""
    args = ("--max_train_steps", "4", "--step_mode", "True", "--ckpt_save_interval", "2", "--optim", optimizer,
            "--lora_type", "dora", "--lora_target_modules", "c3lier", "--conv_rank", "2",
            *(("--start_learning_rate", "1.0") if optimizer == "prodigy" else ()))
    straight = make_trainer(tmp_path / "straight", *args).run()
    first = make_trainer(tmp_path / "resumed", *args)
    interrupt_on_call(first.backend, 3)  # in step 3, after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        first.run()
    resumed = make_trainer(tmp_path / "resumed", *args, "--resume", "True").run()
    a, b = read_lora(straight.lora_path).weights, read_lora(resumed.lora_path).weights
    for key in a:
        for part in ("up", "down", "magnitude"):
            np.testing.assert_array_equal(getattr(a[key], part), getattr(b[key], part), err_msg=f"{key}.{part}")


def test_resuming_with_another_optimizer_is_refused(tmp_path):
    from msd_lora.errors import ResumeError

    args = ("--max_train_steps", "2", "--step_mode", "True", "--ckpt_save_interval", "1")
    make_trainer(tmp_path, *args, "--optim", "adafactor").run()
    with pytest.raises(ResumeError, match="holds adafactor's state at optimizer step 2; this run uses adamw"):
        make_trainer(tmp_path, *args, "--max_train_steps", "4", "--resume", "True").run()


@pytest.mark.parametrize("flags,message", [
    (("--optim", "adamW"), "'optim' is 'adamW'; choose one of .* Did you mean 'adamw'"),
    (("--optim", "prodigi"), "Did you mean 'prodigy'"),
    (("--optim", "prodigy", "--unet_lr", "1e-4"), "prodigy estimates one step size"),
    (("--lora_type", "lora", "--lora_target_modules", "norm1"), "no unet linear or convolution layer matches"),
    (("--lora_type", "dora", "--lora_target_modules", "time_embedding"), "LoRA and DoRA wrap those layer types only"),
    (("--conv_rank", "100000", "--lora_target_modules", "c3lier"), "conv_rank 100000 is larger than unet layer"),
    (("--conv_alpha", "4"), "conv_alpha is set but conv_rank is not"),
    (("--lora_type", "dora", "--lora_dropout", "0.1"), "lora_dropout with lora_type dora is not offered"),
    (("--validation_split", "0.1", "--validation_data_path", "x"), "both give held-out images: set one of them"),
    (("--validate_every_n_steps", "5"), "there are no held-out images: set validation_split"),
    (("--optim", "prodigy", "--decay_steps", "3", "--end_learning_rate", "0"), "prodigy the learning rate must stay"),
])
def test_bad_training_method_settings_are_clear_errors(tmp_path, flags, message):
    from msd_lora.errors import ConfigError, LoraSpecError

    with pytest.raises((ConfigError, LoraSpecError), match=message):
        make_trainer(tmp_path, *flags)


def test_lora_dropout_masks_are_hashed_alike_and_act_only_in_train_steps(tmp_path):
    """The masks are `lora.dropout`'s hash (numpy and torch give the same integers); they drop about p of the LoRA
    input (lora_dropout) and of the down projection's output (network_dropout) in a train step and nothing in
    evaluation or sampling."""
    import torch

    from msd_lora.lora.dropout import hashed, layer_seed, threshold

    index = np.arange(200_000, dtype=np.int64)
    seed = layer_seed(123456, 7)
    assert np.array_equal(hashed(index, np.int64(seed)), hashed(torch.from_numpy(index), torch.tensor(seed)).numpy())
    keep = hashed(index, np.int64(seed)) >= threshold(0.3)
    assert abs(keep.mean() - 0.7) < 0.005 and abs(np.corrcoef(keep[:-1], keep[1:])[0, 1]) < 0.01
    other = hashed(index, np.int64(layer_seed(123456, 8))) >= threshold(0.3)
    assert abs(np.corrcoef(keep, other)[0, 1]) < 0.01

    plain = make_trainer(tmp_path / "plain", "--max_train_steps", "1")
    dropped = make_trainer(tmp_path / "dropped", "--max_train_steps", "1", "--lora_dropout", "0.5",
                           "--network_dropout", "0.5")
    batch = dropped.micro_batch(0)
    assert batch.dropout_seed > 0 and plain.micro_batch(0).dropout_seed == 0
    trained = {k: type(v)(v.down, v.up + 0.05, v.alpha) for k, v in plain.backend.lora_weights().items()}
    for trainer in (plain, dropped):
        trainer.backend.set_lora_weights(trained)
    assert dropped.backend.evaluate_loss(batch) == plain.backend.evaluate_loss(batch)  # no dropout outside steps
    inputs, outputs = [], []
    module = next(m for m in dropped.backend.unet.modules() if hasattr(m, "lora_A"))
    module.lora_A["default"].register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    module.lora_A["default"].register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))  # after dropout
    dropped.backend.train_step(batch, 0.0, update=False, accumulation=1)
    for seen in (inputs, outputs):
        assert 0.45 < float((seen[0] == 0).float().mean()) < 0.55  # half of each dropped
    inputs.clear(), outputs.clear()
    dropped.backend.evaluate_loss(batch)
    assert float((inputs[0] == 0).float().mean()) == float((outputs[0] == 0).float().mean()) == 0.0
