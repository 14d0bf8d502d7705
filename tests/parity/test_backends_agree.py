"""Same weights, data and noise on both backends give the same outputs, losses, gradients, LoRAs and images.

The loop draws every random number in numpy, so the two backends see identical inputs; the tolerances are
the ones in docs/parity.md (fp32 on CPU).
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mindspore")

from msd_lora.config import load_train_config  # noqa: E402
from msd_lora.lora.io import load_lora  # noqa: E402
from msd_lora.train import Trainer  # noqa: E402
from msd_lora.models.pretrained import load_pretrained  # noqa: E402
from tests.conftest import tiny_args  # noqa: E402

STEPS = 20


def max_relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def to_numpy(tensor) -> np.ndarray:
    return tensor.asnumpy() if hasattr(tensor, "asnumpy") else tensor.detach().cpu().numpy()


def trainer(tmp_path, backend: str, *extra: str) -> Trainer:
    args = tiny_args(tmp_path / backend, "--backend", backend, "--max_train_steps", str(STEPS), "--warmup_steps",
                     "2", "--validation_prompts", "[a red circle on a blue background in sks style]",
                     "--validation_steps", "5", *extra)
    return Trainer(load_train_config(args), show_progress=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A torch and a MindSpore trainer on the same config, LoRA initialised identically (numpy)."""
    tmp = tmp_path_factory.mktemp("parity")
    return trainer(tmp, "torch"), trainer(tmp, "mindspore")


def test_networks_agree(pair):
    torch_t, ms_t = pair
    batch = torch_t.micro_batch(0)
    ids = batch.token_ids
    text = [to_numpy(t.backend.encode_prompts(ids)) for t in pair]
    assert max_relative_error(text[1], text[0]) <= 1e-4
    latents = np.random.default_rng(0).standard_normal((len(ids), 4, 16, 16)).astype(np.float32)
    preds = [to_numpy(t.backend.denoise(t.backend.tensor(latents), 500, [t.backend.encode_prompts(ids)])[0])
             for t in pair]
    assert max_relative_error(preds[1], preds[0]) <= 1e-4
    images = [t.backend.decode(t.backend.tensor(latents)) for t in pair]
    assert psnr(images[1], images[0]) >= 40


def test_loss_and_gradients_agree(pair):
    torch_t, ms_t = pair
    batch = torch_t.micro_batch(3)
    losses = [t.backend.eval_loss(batch) for t in pair]
    assert abs(losses[1] - losses[0]) <= 1e-5 * abs(losses[0])
    grads = [t.backend.lora_gradients(batch) for t in pair]
    assert grads[0].keys() == grads[1].keys()
    a = np.concatenate([grads[0][k].ravel() for k in sorted(grads[0])])
    b = np.concatenate([grads[1][k].ravel() for k in sorted(grads[0])])
    assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) >= 0.99999


def test_twenty_adamw_steps_agree_and_cross_load(pair, tiny_model):
    results = [t.run() for t in pair]
    loras = [load_lora(r.lora_path).weights for r in results]
    for key in loras[0]:
        for part in ("down", "up"):
            a, b = getattr(loras[0][key], part), getattr(loras[1][key], part)
            assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max(), (key, part)
    # a LoRA trained on one backend, merged into the other: same images
    from msd_lora.sample import SamplingSettings, generate, merge_loras

    torch_t, ms_t = pair
    settings = SamplingSettings(steps=8, guidance_scale=4.0, height=32, width=32, seed=5)
    images = []
    for t, lora in ((torch_t, loras[1]), (ms_t, loras[0])):
        fresh = type(t.backend)(device="cpu") if t.backend.name == "torch" else t.backend
        info = fresh.load_model(load_pretrained(tiny_model), "epsilon")
        merge_loras(fresh, [(lora, 1.0, "other backend")])
        images.append(generate(fresh, info, t.tokenizer, t.schedule, "a red circle on a blue background in sks style",
                               2, settings))
    assert psnr(images[1], images[0]) >= 40
