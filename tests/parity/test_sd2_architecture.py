"""The SD 2.x features the embedded (SD1-shaped) tiny model lacks, on both backends: linear projections in the
transformer blocks, per-block head counts, upcast attention, a gelu (OpenCLIP-style) text encoder and the
v-prediction target. A random tiny network with SD2's configuration keys, written as a diffusers folder and
loaded by both backends through `load_pretrained`."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mindspore")
pytest.importorskip("mindone")

from msd_lora.backends.base import StepBatch
from msd_lora.backends.probe import probe_for
from msd_lora.diffusion.schedule import NoiseSchedule
from msd_lora.lora.spec import LoraSpec, init_lora_weights, select_targets
from msd_lora.models.pretrained import load_model
from msd_lora.tokenizer import PromptTokenizer
from tests.conftest import TINY_MODEL

UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64], "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 64, "attention_head_dim": [2, 4], "use_linear_projection": True, "upcast_attention": True,
        "norm_num_groups": 16}
VAE = {"in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32], "latent_channels": 4,
       "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"] * 2,
       "layers_per_block": 1, "norm_num_groups": 16, "sample_size": 16}
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 64}


def rel(got, want) -> float:
    got = got.asnumpy() if hasattr(got, "asnumpy") else np.asarray(got)
    want = want.detach().numpy() if hasattr(want, "detach") else np.asarray(want)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("tiny_sd2")
    torch.manual_seed(1)
    vocab = PromptTokenizer(TINY_MODEL / "tokenizer")._tok
    text = {**TEXT, "vocab_size": len(vocab), "bos_token_id": vocab.bos_token_id, "eos_token_id": vocab.eos_token_id,
            "pad_token_id": vocab.pad_token_id}
    for name, model in (("unet", UNet2DConditionModel(**UNET)), ("vae", AutoencoderKL(**VAE)),
                        ("text_encoder", CLIPTextModel(CLIPTextConfig(**text)))):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))  # off their initial constants (zero-init out-projections)
        model.save_pretrained(folder / name)
    shutil.copytree(TINY_MODEL / "tokenizer", folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
         "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction"}))
    return folder


@pytest.fixture(scope="module")
def backends(sd2_folder):
    from msd_lora.backends.base import BackendOptions
    from msd_lora.backends.mindspore.backend import MindSporeBackend
    from msd_lora.backends.torch.backend import TorchBackend

    out = []
    for backend in (TorchBackend(BackendOptions(device="cpu")), MindSporeBackend(BackendOptions(device="cpu"))):
        model, config = load_model(sd2_folder)
        assert config.prediction_type == "v_prediction"  # read from the folder's scheduler config
        backend.load_model(model, config.prediction_type)
        spec = LoraSpec(rank=2, alpha=4.0, targets={"unet": ("to_q", "to_v", "proj_in"), "text_encoder": ("q_proj",)})
        shapes = backend.layer_shapes()
        targets = select_targets(spec, shapes)
        weights = init_lora_weights(spec, targets, shapes, seed=3)
        for layer in weights.values():  # a non-zero LoRA, so that it takes part in the comparison
            layer.up = np.random.default_rng(layer.up.size).normal(0, 0.05, layer.up.shape).astype(np.float32)
        backend.add_lora(spec, targets, weights)
        out.append(backend)
    return out


def batch(sd2_folder) -> StepBatch:
    rng = np.random.default_rng(0)
    schedule = NoiseSchedule.from_config(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                         beta_end=0.012, prediction_type="v_prediction")
    timesteps = np.array([100, 900])
    alpha, sigma = schedule.coefficients(timesteps)
    ids = PromptTokenizer(sd2_folder / "tokenizer")(["a red circle", "a blue square on a green background"])
    return StepBatch(latent_mean=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
                     latent_std=rng.uniform(0.01, 0.2, (2, 4, 8, 8)).astype(np.float32), token_ids=ids,
                     posterior_noise=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
                     noise=rng.standard_normal((2, 4, 8, 8)).astype(np.float32), timesteps=timesteps,
                     sqrt_alpha=alpha, sqrt_one_minus_alpha=sigma)


def test_sd2_networks_and_v_prediction_loss_agree(backends, sd2_folder):
    pt, ms_backend = backends
    data = batch(sd2_folder)
    contexts = [b.encode_prompts(data.token_ids) for b in backends]
    assert rel(contexts[1], contexts[0]) <= 1e-4
    latents = np.random.default_rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32)
    preds = [b.denoise(b.tensor(latents), 700, [c])[0] for b, c in zip(backends, contexts)]
    assert rel(preds[1], preds[0]) <= 1e-4
    losses = [probe_for(b).loss(data) for b in backends]
    assert abs(losses[1] - losses[0]) <= 1e-5 * losses[0]
