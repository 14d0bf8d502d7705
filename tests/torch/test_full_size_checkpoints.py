"""Full-size SD 1.5 and SD 2 networks through every base-model layout, compared tensor by tensor.

The networks' names and shapes come from the real classes (diffusers UNet2DConditionModel / AutoencoderKL,
transformers CLIPTextModel, built on the meta device from configs/model/*.yaml); their values are random
float16 bit patterns, so every tensor and every position is distinguishable and compared bit for bit.
One model is alive at a time (module-scoped, parametrised): about 2.6 GB in memory, fp16 on disk.
"""
from __future__ import annotations

import gc
import shutil
import warnings

import numpy as np
import pytest
import torch

from msd_lora.models.export import save_model
from msd_lora.models.pretrained import PretrainedModel, load_model
from msd_lora.models.single_file import network_configs
from msd_lora.models.versions import shipped_config

PARAMS = {"v1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
          "v2-v": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}}


def meta_shapes(configs: dict[str, dict]) -> dict[str, dict[str, tuple[int, ...]]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        networks = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                    "vae": AutoencoderKL.from_config(configs["vae"]),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))}
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in networks.items()}
    return {n: {k: tuple(v.shape) for k, v in m.state_dict().items()} for n, m in networks.items()}, counts


def random_fp16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random float16 bit patterns, all finite: the lowest exponent bit is cleared, so the exponent is never 31."""
    bits = rng.integers(0, 1 << 16, shape, dtype=np.uint16)
    np.bitwise_and(bits, 0xFBFF, out=bits)
    return bits.view(np.float16)


@pytest.fixture(scope="module", params=list(PARAMS))
def full(request, tmp_path_factory):
    import os

    from msd_lora.models.single_file import tokenizer_for

    os.environ["MSD_LORA_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # the CLIP tokenizer files go there
    cfg = shipped_config(request.param)
    configs = network_configs(cfg)
    shapes, counts = meta_shapes(configs)
    rng = np.random.default_rng(5)
    state = {network: {name: random_fp16(rng, shape) for name, shape in names.items()}
             for network, names in shapes.items()}
    model = PretrainedModel(source=f"random {cfg.name}", configs=configs, state=state, tokenizer_dir=tokenizer_for(cfg),
                            metadata={"version": cfg.version})
    folder = tmp_path_factory.mktemp(f"full_{request.param}")
    yield request.param, cfg, model, counts, folder
    model.state.clear()  # free this model before the next one is built
    gc.collect()
    shutil.rmtree(folder, ignore_errors=True)
    os.environ.pop("MSD_LORA_CACHE", None)


def assert_bitwise_equal(expected: dict[str, dict[str, np.ndarray]], got: dict[str, dict[str, np.ndarray]]) -> None:
    for network, tensors in expected.items():
        assert sorted(got[network]) == sorted(tensors), network
        for name, value in tensors.items():
            other = np.asarray(got[network][name])
            assert other.shape == value.shape and other.dtype == value.dtype, (network, name)
            assert np.array_equal(other.view(np.uint16), value.view(np.uint16)), (network, name)


def test_networks_have_the_published_parameter_counts(full):
    version, _, model, counts, _ = full
    assert counts == PARAMS[version]
    assert {n: sum(v.size for v in model.state[n].values()) for n in model.state} == PARAMS[version]


def test_ldm_single_file_round_trip(full):
    version, cfg, model, _, folder = full
    path = save_model(model, cfg, folder / "model.safetensors", "ldm")
    back, back_cfg = load_model(path)  # the version is detected from the weights
    assert back_cfg.version == version and back.metadata["format"] == "ldm"
    assert_bitwise_equal(model.state, back.state)
    if version == "v2-v":  # SD2 weights do not say 512-eps vs 768-v: the note says how to choose
        assert "v2-inference.yaml" in back.metadata["note"]
        _, base_cfg = load_model(path, shipped_config("v2-base"))
        assert (base_cfg.prediction_type, base_cfg.image_size) == ("epsilon", 512)
    del back
    path.unlink()


def test_diffusers_converters_agree_with_our_ldm_file(full):
    """diffusers' own LDM -> diffusers conversion of the file we wrote gives back the original tensors."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from msd_lora.files.tensor_file import read_tensor_file

    _, cfg, model, _, folder = full
    path = save_model(model, cfg, folder / "oracle.safetensors", "ldm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that memory-mapped arrays are read-only
        checkpoint = {k: torch.from_numpy(v) for k, v in read_tensor_file(path).tensors.items()}
    theirs = {"unet": convert_ldm_unet_checkpoint(checkpoint, model.configs["unet"]),
              "vae": convert_ldm_vae_checkpoint(checkpoint, model.configs["vae"])}
    if cfg.text_encoder_layout == "clip":
        theirs["text_encoder"] = convert_ldm_clip_checkpoint(checkpoint)
    else:
        with torch.device("meta"):
            text_model = CLIPTextModel(CLIPTextConfig(**model.configs["text_encoder"]))
        theirs["text_encoder"] = convert_open_clip_checkpoint(text_model, checkpoint)
    assert_bitwise_equal(model.state, {n: {k: v.numpy() for k, v in t.items()} for n, t in theirs.items()})
    del checkpoint, theirs
    path.unlink()


def test_diffusers_folder_round_trip(full):
    version, cfg, model, _, folder = full
    out = save_model(model, cfg, folder / "diffusers", "diffusers")
    back, back_cfg = load_model(out)
    assert back_cfg.prediction_type == cfg.prediction_type and back_cfg.image_size == cfg.image_size
    assert_bitwise_equal(model.state, back.state)
    shutil.rmtree(out)


def test_mindone_checkpoint_round_trip(full):
    version, cfg, model, _, folder = full
    path = save_model(model, cfg, folder / "mindone.ckpt", "mindone")
    back, back_cfg = load_model(path, cfg)
    assert back.metadata["format"] == "mindone" and back.metadata["container"] == "mindspore"
    assert_bitwise_equal(model.state, back.state)
    path.unlink()
