"""Our readers, writers and LoRA maths against torch and diffusers as oracles, on the embedded tiny model."""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch

from msd_lora.files.tensor_file import read_tensor_file
from msd_lora.lora.core import LoraLayer
from msd_lora.lora.formats import read_lora, write_lora
from msd_lora.lora.merge import merge_into_state
from msd_lora.lora.module_index import ModuleIndex
from msd_lora.models.pretrained import load_model
from tests.conftest import REPO, tiny_args


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(tiny_model)


def test_torch_save_checkpoints_read_without_torch(tmp_path):
    """torch.save's zip pickle (Lightning layout, fp16/bf16, shared storages, strided views) read into numpy."""
    base = torch.randn(4, 6)
    state = collections.OrderedDict(
        w=base, half=torch.randn(3, 3).half(), bf16=torch.randn(5).bfloat16(), t=base.t(), col=base[:, 2],
        ints=torch.arange(7), param=torch.nn.Parameter(torch.randn(2, 2)))
    torch.save({"state_dict": state, "global_step": 875000, "epoch": np.int64(3)}, tmp_path / "model.ckpt")
    file = read_tensor_file(tmp_path / "model.ckpt")
    assert file.container == "torch" and file.metadata["global_step"] == "875000"
    assert sorted(file.tensors) == sorted(state)
    for key, value in state.items():
        expected = value.detach().float().numpy() if value.dtype == torch.bfloat16 else value.detach().numpy()
        assert np.array_equal(file.tensors[key], expected), key
    assert file.tensors["half"].dtype == np.float16 and file.tensors["bf16"].dtype == np.float32


def test_diffusers_reads_our_ldm_file_exactly(tiny, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    from msd_lora.models.single_file import write_single_file

    model, _ = tiny
    path = write_single_file(model, tmp_path / "tiny.safetensors", "ldm", "clip")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_model), local_files_only=True)
    for network in ("unet", "vae", "text_encoder"):
        theirs = getattr(pipe, network).state_dict()
        assert set(theirs) == set(model.state[network])
        for key, value in model.state[network].items():
            assert np.array_equal(theirs[key].numpy(), value), key


def test_diffusers_loads_our_diffusers_folder(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    from msd_lora.models.export import save_model

    model, cfg = tiny
    folder = save_model(model, cfg, tmp_path / "copy", "diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    for network in ("unet", "vae", "text_encoder"):
        theirs = getattr(pipe, network).state_dict()
        assert all(np.array_equal(theirs[k].numpy(), v) for k, v in model.state[network].items()), network
    assert pipe.tokenizer("a red circle").input_ids == pipe.tokenizer.__class__.from_pretrained(
        str(folder / "tokenizer")).__call__("a red circle").input_ids


def lora_for(model, rng, leaves, rank=4, alpha=3.0):
    weights = {}
    for network in ("unet", "text_encoder"):
        for name, value in model.state[network].items():
            if name.endswith(leaves):
                up_shape = (value.shape[0], rank) + ((1, 1) if value.ndim == 4 else ())
                weights[f"{network}.{name[:-len('.weight')]}"] = LoraLayer(
                    (rng.standard_normal((rank,) + value.shape[1:]) * 0.1).astype(np.float32),
                    (rng.standard_normal(up_shape) * 0.1).astype(np.float32), alpha)
    return weights


def diffusers_fused(tiny_model, path, scale):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), local_files_only=True)
    pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name)  # a file: offline-safe
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return {n: {k: v.numpy() for k, v in getattr(pipe, n).state_dict().items()} for n in ("unet", "text_encoder")}


@pytest.mark.parametrize("fmt", ["kohya", "diffusers_old", "diffusers"])
def test_diffusers_loader_merges_our_files_like_our_merge(tiny, tiny_model, tmp_path, fmt):
    """kohya with alpha != rank (attention, proj_in 1x1 conv, ff, resnet LoCon, text-encoder MLP), old diffusers, and
    canonical files with per-layer ranks and alphas: diffusers' load_lora_weights + fuse_lora == our numpy merge.

    (diffusers 0.39 renames kohya's text-encoder q/k/v/out_proj LoRAs to `to_q_lora` and then drops them as
    unexpected keys, so the kohya case leaves those out; our reader loads them, see test_formats.)"""
    model, _ = tiny
    rng = np.random.default_rng(0)
    leaves = {"kohya": ("to_q.weight", "to_out.0.weight", "proj_in.weight", "ff.net.2.weight", "conv1.weight",
                        "fc1.weight"),
              "diffusers_old": ("to_q.weight", "to_v.weight", "to_out.0.weight", "q_proj.weight", "out_proj.weight"),
              "diffusers": ("to_k.weight", "to_out.0.weight", "v_proj.weight")}[fmt]
    weights = lora_for(model, rng, leaves, alpha=3.0)
    if fmt == "diffusers":  # per-layer ranks and alphas: diffusers needs rank_pattern / alpha_pattern
        weights.update(lora_for(model, rng, ("to_q.weight",), rank=2, alpha=7.0))
    index = ModuleIndex.from_configs(model.configs)
    path = write_lora(tmp_path / f"{fmt}.safetensors", weights, fmt, index)
    ours = merge_into_state(model.state, [(read_lora(path, index).weights, 0.75)])
    theirs = diffusers_fused(tiny_model, path, 0.75)
    changed = 0
    for network in ("unet", "text_encoder"):
        for key, value in model.state[network].items():
            np.testing.assert_allclose(ours[network][key], theirs[network][key], rtol=1e-5, atol=1e-6, err_msg=key)
            changed += not np.array_equal(ours[network][key], value)
    assert changed == len(weights)


def test_sampling_mixes_loras_of_different_formats(tiny, tiny_model, tmp_path):
    """A kohya and a mindone LoRA, each at its own scale, merge into the torch backend like the numpy merge."""
    from msd_lora.backends.base import BackendOptions
    from msd_lora.backends.torch.backend import TorchBackend
    from msd_lora.cli.sample import main as sample_main
    from msd_lora.sample import merge_loras, read_lora_files

    model, _ = tiny
    index = ModuleIndex.from_configs(model.configs)
    rng = np.random.default_rng(1)
    kohya = write_lora(tmp_path / "a.safetensors", lora_for(model, rng, ("to_q.weight", "conv1.weight")), "kohya", index)
    mindone = write_lora(tmp_path / "b.ckpt", lora_for(model, rng, ("to_q.weight", "to_v.weight"), alpha=4.0),
                         "mindone", index)
    pairs = [(str(kohya), 0.8), (str(mindone), 0.5)]
    backend = TorchBackend(BackendOptions(device="cpu"))
    fresh, _ = load_model(tiny_model)
    backend.load_model(fresh, "epsilon")
    merge_loras(backend, read_lora_files(pairs, index))
    expected = merge_into_state(model.state, [(read_lora(p, index).weights, s) for p, s in pairs])
    actual = backend.base_weights()
    for network in ("unet", "text_encoder"):
        for key, value in expected[network].items():
            np.testing.assert_allclose(actual[f"{network}.{key}"], value, rtol=1e-6, atol=1e-7, err_msg=key)
    code = sample_main(["--prompt", "a red circle", "--pretrained_model_path", str(tiny_model), "--use_lora", "True",
                        "--lora_ckpt_path", str(kohya), "--lora_scale", "0.8", "--lora_ckpt_path", str(mindone),
                        "--lora_scale", "0.5", "--n_samples", "1", "--sampling_steps", "2",
                        "--output_path", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / "samples" / "00000.png").is_file()


def test_training_starts_from_a_kohya_lora(tiny, tmp_path):
    from msd_lora.config import load_train_config
    from msd_lora.lora.merge import delta
    from msd_lora.train import Trainer

    model, _ = tiny
    index = ModuleIndex.from_configs(model.configs)
    start = lora_for(model, np.random.default_rng(2), ("attn1.to_q.weight",), rank=4, alpha=2.0)
    path = write_lora(tmp_path / "start.safetensors", start, "kohya", index)
    cfg = load_train_config(tiny_args(tmp_path / "run", "--init_lora_path", str(path), "--max_train_steps", "1",
                                      "--lora_rank", "4", "--lora_alpha", "8"))
    trainer = Trainer(cfg, show_progress=False)
    live = trainer.backend.lora_weights()
    assert set(start) < set(live)
    for key, layer in start.items():
        np.testing.assert_allclose(delta(live[key]), delta(layer), rtol=1e-5, atol=1e-8)
    assert any("initialised" in note for note in trainer.notes)
    bad = load_train_config(tiny_args(tmp_path / "bad", "--init_lora_path", str(path), "--lora_rank", "8"))
    with pytest.raises(ValueError, match="set lora_rank / conv_rank: 4"):
        Trainer(bad, show_progress=False)


def test_conversion_round_trip_keeps_a_non_standard_tokenizer(tiny_model, tmp_path):
    """tiny (602-token vocabulary) -> LDM single file -> diffusers folder, with a model yaml that names no tokenizer:
    the single file carries the tokenizer, and the result samples exactly like the original."""
    import yaml

    from msd_lora.backends.base import BackendOptions
    from msd_lora.sample import SamplingOptions, generate, load_pipeline
    from tools import convert_model

    config = yaml.safe_load((REPO / "configs/model/tiny.yaml").read_text())
    config["tokenizer"].pop("folder")
    yaml_path = tmp_path / "tiny_no_tokenizer.yaml"
    yaml_path.write_text(yaml.safe_dump(config))
    single, folder = tmp_path / "tiny.safetensors", tmp_path / "tiny_diffusers"
    assert convert_model.main([str(tiny_model), str(single), "--to", "ldm", "--model_config", str(yaml_path)]) == 0
    assert convert_model.main([str(single), str(folder), "--to", "diffusers", "--model_config", str(yaml_path)]) == 0
    options = SamplingOptions(steps=4, height=32, width=32, seed=1)
    images = []
    for path in (tiny_model, folder):
        pipeline, _ = load_pipeline(path, None, "torch", BackendOptions(device="cpu"))
        assert pipeline.tokenizer(["a red circle in sks style"]).tolist() == \
            load_pipeline(tiny_model, None, "torch", BackendOptions(device="cpu"))[0].tokenizer(
                ["a red circle in sks style"]).tolist()
        images.append(generate(pipeline, "a red circle on a blue background", 2, options))
    np.testing.assert_array_equal(images[0], images[1])
