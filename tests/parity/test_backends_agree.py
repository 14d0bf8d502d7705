"""Same weights, data and noise on both backends give the same outputs, losses, gradients, LoRAs and images.

The loop draws every random number in numpy, so the two backends see identical inputs. Tolerances are the ones
in docs/parity.md (fp32 on CPU). One torch and one MindSpore trainer serve the whole module, in test order:
MindSpore compiles each graph once (train step, text encoder, UNet, VAE) and every test reuses it.
"""
from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np
import pytest

pytest.importorskip("mindspore")
pytest.importorskip("mindone")

from msd_lora.backends.base import BackendOptions
from msd_lora.backends.probe import probe_for
from msd_lora.checkpoint import RESUME_NAME, load_resume
from msd_lora.config import load_train_config
from msd_lora.lora.core import LoraLayer
from msd_lora.lora.formats import read_lora
from msd_lora.sample import SamplingOptions, generate, merge_loras
from msd_lora.train import Trainer
from tests.conftest import tiny_args

STEPS = 20
# The devices compared (docs/parity.md): CPU for both by default; e.g. MSD_LORA_PARITY_MS_DEVICE=ascend on a 910.
DEVICES = {"torch": os.environ.get("MSD_LORA_PARITY_TORCH_DEVICE", "cpu"),
           "mindspore": os.environ.get("MSD_LORA_PARITY_MS_DEVICE", "cpu")}
PROMPT = "a red circle on a blue background in sks style"


def max_relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: the error relative to the tensor's scale."""
    return float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def to_numpy(tensor) -> np.ndarray:
    return tensor.asnumpy() if hasattr(tensor, "asnumpy") else tensor.detach().cpu().numpy()


def flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([arrays[k].ravel() for k in sorted(arrays)])


def lora_error(got, want) -> float:
    """The worst max_relative_error over all LoRA tensors (A and B of every layer)."""
    assert got.keys() == want.keys()
    return max(max_relative_error(getattr(got[k], part), getattr(want[k], part)) for k in want for part in ("down", "up"))


def assert_lora_close(got, want, tolerance: float, what: str, measured=None) -> None:
    error = lora_error(got, want)
    if measured is not None:
        measured(what, error, tolerance)
    assert error <= tolerance, f"{what}: LoRA tensors differ by up to {error:.2e} relative"


def trainer(tmp_path, backend: str) -> Trainer:
    args = tiny_args(tmp_path / backend, "--backend", backend, "--device", DEVICES[backend],
                     "--max_train_steps", str(STEPS), "--warmup_steps", "2",
                     "--lora_ft_text_encoder", "True", "--use_ema", "True", "--ema_decay", "0.9",
                     "--scale_window", "3", "--validation_prompts", PROMPT, "--validation_steps", "5",
                     "--overwrite", "True")  # test_loop_counts_and_logs_skipped_steps runs the MindSpore loop again
    return Trainer(load_train_config(args), show_progress=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A torch and a MindSpore trainer on the same config: UNet + text-encoder LoRA initialised identically."""
    tmp = tmp_path_factory.mktemp("parity")
    return trainer(tmp, "torch"), trainer(tmp, "mindspore")


@pytest.fixture(scope="module")
def runs(pair):
    """Both trainers' 20-step runs (the loop, checkpoints, validation samples, LoRA files)."""
    return [t.run() for t in pair]


def test_networks_agree(pair, measured):
    torch_t, ms_t = pair
    host = torch_t.inputs.batches.get(0)  # the images and captions of the first step
    token_ids = torch_t.tokenizer(host.captions)
    text = [to_numpy(t.backend.encode_prompts(token_ids)) for t in pair]
    assert measured("text encoder output", max_relative_error(text[1], text[0]), 1e-4) <= 1e-4
    posterior_noise = torch_t.micro_batch(0).posterior_noise
    latents = [probe_for(t.backend).encode_images(host.pixels, posterior_noise) for t in pair]
    assert measured("VAE encode (latents)", max_relative_error(latents[1], latents[0]), 1e-4) <= 1e-4
    noisy = np.random.default_rng(0).standard_normal(latents[0].shape).astype(np.float32)
    preds = [to_numpy(t.backend.denoise(t.backend.tensor(noisy), 500, [t.backend.encode_prompts(token_ids)])[0])
             for t in pair]
    assert measured("UNet prediction", max_relative_error(preds[1], preds[0]), 1e-4) <= 1e-4
    images = [t.backend.decode(t.backend.tensor(latents[0])) for t in pair]
    assert measured("VAE decode (pixels)", max_relative_error(images[1], images[0]), 1e-4) <= 1e-4


def test_loss_and_gradients_agree(pair, measured):
    torch_t, ms_t = pair
    batch = torch_t.micro_batch(3)
    losses = [probe_for(t.backend).loss(batch) for t in pair]
    assert measured("loss (relative)", abs(losses[1] - losses[0]) / abs(losses[0]), 1e-5) <= 1e-5
    grads = [probe_for(t.backend).lora_gradients(batch) for t in pair]
    assert grads[0].keys() == grads[1].keys()
    assert any(k.startswith("text_encoder.") for k in grads[0])  # text-encoder LoRA is in the comparison
    a, b = flat(grads[0]).astype(np.float64), flat(grads[1]).astype(np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert measured("LoRA gradients cosine", cosine, 0.99999, ">=") >= 0.99999
    measured("LoRA gradients, worst tensor (relative)", max(max_relative_error(grads[1][k], grads[0][k])
                                                             for k in grads[0]), None, "info")


def test_twenty_adamw_steps_agree(pair, runs, measured):
    live = [load_resume(r.output_path / "ckpt" / RESUME_NAME).lora for r in runs]  # the weights AdamW produced
    assert_lora_close(live[1], live[0], 1e-3, "LoRA after 20 AdamW steps", measured)
    saved = [read_lora(r.lora_path).weights for r in runs]  # use_ema: the files hold the EMA
    assert_lora_close(saved[1], saved[0], 1e-3, "EMA of the LoRA after 20 steps", measured)
    logs = [list(csv.DictReader(open(r.output_path / "train_log.csv"))) for r in runs]
    assert len(logs[0]) == len(logs[1]) == STEPS
    for row_torch, row_ms in zip(*logs):
        assert abs(float(row_ms["loss"]) - float(row_torch["loss"])) <= 1e-3 * float(row_torch["loss"]), row_ms["step"]
    assert runs[1].skipped_steps == 0 and float(logs[1][-1]["loss_scale"]) > 65536  # grew every 3 clean steps


def test_mindone_lora_checkpoint_is_written(pair, runs):
    import mindspore as ms

    path = runs[1].output_path / "lora_mindone.ckpt"
    raw = ms.load_checkpoint(str(path))
    assert int(raw["lora_rank"].asnumpy()) == 8
    assert any(k.startswith("model.diffusion_model.") for k in raw)
    assert any(k.startswith("cond_stage_model.") for k in raw)
    back = read_lora(path, pair[1].module_index).weights
    saved = read_lora(runs[1].lora_path).weights
    merged_delta = {k: (layer.up @ layer.down) * layer.scale for k, layer in back.items()}
    for key, layer in saved.items():
        want = (layer.up.astype(np.float64) @ layer.down) * layer.scale
        assert max_relative_error(merged_delta[key], want) <= 1e-5, key


def test_accumulation_ema_and_cross_backend_resume_agree(pair, runs):
    """Torch's optimizer state loaded into MindSpore (the resume file is backend-neutral), then one optimizer step
    accumulated over two micro-batches on both: same weights, moments and EMA."""
    torch_t, ms_t = pair
    arrays, scalars = torch_t.backend.training_state()
    ms_t.backend.set_lora_weights(torch_t.backend.lora_weights())
    assert "loss_scale" not in scalars  # torch on CPU runs no scaler: MindSpore keeps its own dynamic scale
    scale = float(ms_t.backend.step.loss_scale.asnumpy())
    ms_t.backend.load_training_state(arrays, scalars)
    assert float(ms_t.backend.step.loss_scale.asnumpy()) == scale
    for t in pair:
        for k in range(2):
            result = t.backend.train_step(t.micro_batch(40 + k), 1e-3, update=k == 1, accumulation=2)
        assert result.updated and not result.overflow
    assert_lora_close(ms_t.backend.lora_weights(), torch_t.backend.lora_weights(), 1e-4, "after accumulation")
    assert_lora_close(ms_t.backend.lora_weights(ema=True), torch_t.backend.lora_weights(ema=True), 1e-4, "EMA")
    states = [t.backend.training_state() for t in pair]
    assert states[0][1]["optimizer_step"] == states[1][1]["optimizer_step"] == scalars["optimizer_step"] + 1
    for key in ("optimizer.exp_avg.", "optimizer.exp_avg_sq."):
        a = flat({k: v for k, v in states[0][0].items() if k.startswith(key)})
        b = flat({k: v for k, v in states[1][0].items() if k.startswith(key)})
        assert max_relative_error(b, a) <= 1e-4, key


def poisoned(batch, value: float):
    """The batch with one non-finite number in its diffusion noise: every gradient becomes inf or nan."""
    noise = batch.noise.copy()
    noise.flat[7] = value
    return dataclasses.replace(batch, noise=noise)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_overflow_skips_the_update_and_shrinks_the_scale(pair, runs, value):
    import mindspore as ms

    ms_t = pair[1]
    backend, step = ms_t.backend, ms_t.backend.step
    step.dynamic.set_data(ms.Tensor(True))
    step.loss_scale.set_data(ms.Tensor(4096.0, ms.float32))
    step.good_steps.set_data(ms.Tensor(0, ms.int32))
    before_weights, (before_arrays, before_scalars) = backend.lora_weights(), backend.training_state()
    result = backend.train_step(poisoned(ms_t.micro_batch(0), value), 1e-3, update=True, accumulation=1)
    assert result.overflow and not result.updated
    after_weights, (after_arrays, after_scalars) = backend.lora_weights(), backend.training_state()
    for key in before_weights:  # bit-identical: nothing of the poisoned step was applied
        assert np.array_equal(before_weights[key].down, after_weights[key].down)
        assert np.array_equal(before_weights[key].up, after_weights[key].up)
    for key in before_arrays:
        assert np.array_equal(before_arrays[key], after_arrays[key]), key
    assert after_scalars["optimizer_step"] == before_scalars["optimizer_step"]
    assert after_scalars["loss_scale"] == 2048.0  # divided by loss_scale_factor
    for i in range(3):  # training goes on; scale_window (3) clean steps later the scale grows back
        result = backend.train_step(ms_t.micro_batch(i), 1e-3, update=True, accumulation=1)
        assert result.updated and result.loss_scale == 2048.0
    assert backend.training_state()[1]["loss_scale"] == 4096.0
    assert backend.training_state()[1]["optimizer_step"] == before_scalars["optimizer_step"] + 3


def test_static_scaler_skips_overflow_but_keeps_its_scale(pair, runs):
    import mindspore as ms

    backend, step = pair[1].backend, pair[1].backend.step
    step.dynamic.set_data(ms.Tensor(False))
    step.loss_scale.set_data(ms.Tensor(1024.0, ms.float32))
    before = backend.lora_weights()
    result = backend.train_step(poisoned(pair[1].micro_batch(1), np.inf), 1e-3, update=True, accumulation=1)
    assert result.overflow and float(step.loss_scale.asnumpy()) == 1024.0
    assert "loss_scale" not in backend.training_state()[1]  # a static scale comes from the config, not the file
    assert all(np.array_equal(before[k].up, v.up) for k, v in backend.lora_weights().items())
    for i in range(4):
        backend.train_step(pair[1].micro_batch(i), 1e-3, update=True, accumulation=1)
    assert float(step.loss_scale.asnumpy()) == 1024.0
    step.dynamic.set_data(ms.Tensor(True))


def test_loop_counts_and_logs_skipped_steps(pair, runs, capsys):
    """The training loop reports an overflowed step in its log and its count, and finishes the run."""
    ms_t = pair[1]
    clean = ms_t.micro_batch
    ms_t.micro_batch = lambda i: poisoned(clean(i), np.nan) if i == 4 else clean(i)
    try:
        result = ms_t.run()
    finally:
        ms_t.micro_batch = clean
    rows = list(csv.DictReader(open(result.output_path / "train_log.csv")))
    assert result.skipped_steps == 1 and rows[-1]["skipped_steps"] == "1"
    assert [r["step"] for r in rows if r["overflow"] == "1"] == ["5"]
    printed = capsys.readouterr()
    assert "step 5: gradients not finite, update skipped" in printed.out + printed.err
    assert "also saved in mindone's LoRA format" in printed.out  # logged before the log closes, not after


def test_fp16_lora_compute_stays_close_to_fp32(pair, runs, tiny_model, measured):
    """lora_fp16 on MindSpore (LoRA matmuls in float16) against fp32 torch, with the trained, non-zero LoRA."""
    from msd_lora.backends.mindspore.backend import MindSporeBackend
    from msd_lora.lora.spec import select_targets
    from msd_lora.models.pretrained import load_pretrained

    torch_t, ms_t = pair
    weights = torch_t.backend.lora_weights()
    fp16 = MindSporeBackend(BackendOptions(device=DEVICES["mindspore"]))
    fp16.load_model(load_pretrained(tiny_model), "epsilon")
    spec = dataclasses.replace(ms_t.spec, fp16=True)
    fp16.add_lora(spec, select_targets(spec, fp16.layer_shapes()), weights)
    batch = torch_t.micro_batch(5)
    reference, half = probe_for(torch_t.backend).loss(batch), probe_for(fp16).loss(batch)
    assert measured("loss, lora_fp16 vs fp32 torch (relative)", abs(half - reference) / reference, 1e-2) <= 1e-2
    assert half != reference  # the fp16 path really ran


def test_sampling_and_cross_loaded_loras_agree(pair, runs, measured):
    """Same latents and sampler: same images on both backends, for the base model and for each backend's trained
    LoRA file merged into both (a LoRA trained on one backend gives the same samples on the other)."""
    torch_t, ms_t = pair
    live = torch_t.backend.lora_weights()
    zero = {k: LoraLayer(down=v.down, up=np.zeros_like(v.up), alpha=v.alpha) for k, v in live.items()}
    for t in pair:
        t.backend.set_lora_weights(zero)  # the live LoRA off: the networks are the base model again
    for sampler in ("ddim", "dpm_solver_pp", "euler"):
        options = SamplingOptions(sampler=sampler, steps=8, guidance_scale=4.0, height=32, width=32, seed=5)
        images = [generate(t.pipeline, PROMPT, 4, options) for t in pair]
        assert measured(f"samples, {sampler} (PSNR dB)", psnr(images[1], images[0]), 40, ">=") >= 40, sampler
    options = SamplingOptions(steps=8, guidance_scale=4.0, height=32, width=32, seed=5)
    base = generate(ms_t.pipeline, PROMPT, 4, options)
    for run, trained_on in zip(runs, ("torch", "MindSpore")):
        lora = read_lora(run.lora_path).weights
        for t in pair:
            merge_loras(t.backend, [(lora, 1.0, f"trained on {trained_on}")])
        images = [generate(t.pipeline, PROMPT, 4, options) for t in pair]
        value = psnr(images[1], images[0])
        assert measured(f"samples, LoRA trained on {trained_on} (PSNR dB)", value, 40, ">=") >= 40, trained_on
        assert psnr(images[1], base) < 30  # the LoRA changed the images: the comparison is not of the base model
        for t in pair:
            merge_loras(t.backend, [(lora, -1.0, "undo")])
