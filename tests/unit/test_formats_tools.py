"""tools/convert_model.py, tools/convert_lora.py and tools/merge_lora.py end to end on the tiny model."""
import numpy as np
import pytest
import yaml

from msd_lora.lora.core import LoraLayer
from msd_lora.lora.formats import read_lora, write_lora
from msd_lora.lora.merge import delta
from msd_lora.lora.module_index import ModuleIndex
from msd_lora.models.pretrained import load_model
from tools import convert_lora, convert_model, merge_lora


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(tiny_model)[0]


@pytest.fixture(scope="module")
def tiny_yaml(tiny, tiny_model, tmp_path_factory):
    raw = {"name": "tiny-full", "image_size": 32, "prediction_type": "epsilon", "text_encoder_layout": "clip",
           "schedule": {"num_train_timesteps": 1000}, **{n: tiny.configs[n] for n in ("unet", "vae", "text_encoder")},
           "tokenizer": {"folder": str(tiny_model / "tokenizer")}}
    path = tmp_path_factory.mktemp("yaml") / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def lora_file(tiny, path, fmt, seed, alpha=2.0):
    rng = np.random.default_rng(seed)
    weights = {}
    for name, value in tiny.state["unet"].items():
        if name.endswith(("attn2.to_k.weight", "to_out.0.weight", "conv2.weight")):
            up_shape = (value.shape[0], 4) + ((1, 1) if value.ndim == 4 else ())
            weights[f"unet.{name[:-7]}"] = LoraLayer((rng.standard_normal((4,) + value.shape[1:]) * .1).astype(np.float32),
                                                     (rng.standard_normal(up_shape) * .1).astype(np.float32), alpha)
    write_lora(path, weights, fmt, ModuleIndex.from_configs(tiny.configs))
    return weights


def test_convert_model_between_layouts(tiny, tiny_model, tiny_yaml, tmp_path, capsys):
    assert convert_model.main([str(tiny_model), str(tmp_path / "t.safetensors"), "--to", "ldm", "--dtype", "fp16"]) == 0
    assert convert_model.main([str(tmp_path / "t.safetensors"), str(tmp_path / "t.ckpt"), "--to", "mindone",
                               "--model_config", str(tiny_yaml)]) == 0
    assert convert_model.main([str(tmp_path / "t.ckpt"), str(tmp_path / "back"), "--to", "diffusers",
                               "--model_config", str(tiny_yaml)]) == 0
    back, _ = load_model(tmp_path / "back")
    for network, tensors in tiny.state.items():
        for key, value in tensors.items():
            assert back.state[network][key].dtype == np.float16
            assert np.array_equal(back.state[network][key], value.astype(np.float16)), key
    assert convert_model.main([str(tmp_path / "t.safetensors"), str(tmp_path / "x"), "--to", "diffusers"]) == 2
    assert "unknown architecture" in capsys.readouterr().err  # the tiny model is no SD version: needs its yaml
    assert convert_model.main([str(tiny_model), str(tmp_path / "t.ckpt"), "--to", "ldm"]) == 2
    assert "written as .safetensors" in capsys.readouterr().err
    assert convert_model.main([str(tiny_model), str(tmp_path), "--to", "diffusers"]) == 2  # holds t.ckpt, ...
    assert "is not empty and holds no diffusers model" in capsys.readouterr().err
    assert (tmp_path / "t.ckpt").is_file()


def test_convert_lora_needs_the_models_layout_for_kohya_names(tiny, tiny_model, tmp_path, capsys):
    weights = lora_file(tiny, tmp_path / "k.safetensors", "kohya", 0)
    args = [str(tmp_path / "k.safetensors"), str(tmp_path / "c.safetensors"), "--to", "diffusers"]
    assert convert_lora.main(args) == 2  # the tiny UNet has layers the SD layout lacks (up_blocks.0.attentions)
    assert "pass --base" in capsys.readouterr().err
    assert convert_lora.main(args + ["--base", str(tiny_model)]) == 0
    assert "kohya -> diffusers" in capsys.readouterr().out
    back = read_lora(tmp_path / "c.safetensors")
    assert sorted(back.weights) == sorted(weights)
    assert all(np.array_equal(back.weights[k].up, w.up) and back.weights[k].alpha == 2.0 for k, w in weights.items())


def test_merge_then_unmerge_with_the_tool(tiny, tiny_model, tiny_yaml, tmp_path, capsys):
    lora_file(tiny, tmp_path / "a.safetensors", "kohya", 1, alpha=8.0)
    with pytest.warns(UserWarning, match="not attention projections"):  # its conv2 LoCons: mindone would skip them
        lora_file(tiny, tmp_path / "b.ckpt", "mindone", 2)
    merged, restored = tmp_path / "merged.safetensors", tmp_path / "restored"
    loras = ["--lora", f"{tmp_path / 'a.safetensors'}:0.5", "--lora", str(tmp_path / "b.ckpt")]  # b: default 0.75
    assert merge_lora.main(["--base", str(tiny_model), *loras, "--out", str(merged), "--to", "ldm"]) == 0
    assert "b.ckpt:0.75" in capsys.readouterr().out
    assert merge_lora.main(["--base", str(merged), "--model_config", str(tiny_yaml), *loras, "--unmerge",
                            "--out", str(restored)]) == 0
    merged_model, _ = load_model(merged, tiny_yaml)
    back, _ = load_model(restored)
    changed = 0
    for network, tensors in tiny.state.items():
        for key, value in tensors.items():
            changed += not np.array_equal(merged_model.state[network][key], value)
            error = np.abs(back.state[network][key].astype(np.float64) - value).max()
            assert error <= 1e-6 * max(np.abs(value).max(), 1e-12), (key, error)
    assert changed > 0
    assert merge_lora.main(["--base", str(tiny_model), "--out", str(tmp_path / "n")]) == 2
    assert "at least one --lora" in capsys.readouterr().err


def test_extract_recovers_a_merged_lora(tiny, tiny_model, tmp_path):
    weights = lora_file(tiny, tmp_path / "a.safetensors", "diffusers", 3)
    assert merge_lora.main(["--base", str(tiny_model), "--lora", f"{tmp_path / 'a.safetensors'}:1.0",
                            "--out", str(tmp_path / "tuned"), "--to", "diffusers"]) == 0
    assert merge_lora.main(["--extract", "--base", str(tiny_model), "--tuned", str(tmp_path / "tuned"), "--rank", "4",
                            "--conv", "--out", str(tmp_path / "x.safetensors"), "--lora_format", "kohya"]) == 0
    extracted = read_lora(tmp_path / "x.safetensors", ModuleIndex.from_configs(tiny.configs))
    assert extracted.format == "kohya" and sorted(extracted.weights) == sorted(weights)
    for key, layer in weights.items():
        expected = delta(layer)
        np.testing.assert_allclose(delta(extracted.weights[key]), expected, atol=1e-5 * np.abs(expected).max())


def test_convert_lora_keeps_bundled_embeddings(tiny, tiny_model, tmp_path, capsys):
    """A LoRA file carrying embeddings (bundle_emb.*) keeps them, bit for bit, through every safetensors format;
    mindone's ckpt, which cannot hold them, is refused rather than written without them."""
    from msd_lora.embeddings.files import bundle_tensors, read_embeddings
    from msd_lora.embeddings.tokens import Embedding

    embedding = Embedding("<sks>", np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32))
    weights = lora_file(tiny, tmp_path / "plain.safetensors", "diffusers", 2)
    write_lora(tmp_path / "d.safetensors", weights, embeddings=bundle_tensors([embedding]))
    source = tmp_path / "d.safetensors"
    for fmt in ("kohya", "diffusers_old", "diffusers"):
        target = tmp_path / f"{fmt}.safetensors"
        assert convert_lora.main([str(source), str(target), "--to", fmt, "--base", str(tiny_model)]) == 0
        (back,) = read_embeddings(target)
        assert back.name == "<sks>" and np.array_equal(back.vectors, embedding.vectors), fmt
        assert sorted(read_lora(target, ModuleIndex.from_configs(tiny.configs)).weights) == sorted(weights)
        source = target
    assert convert_lora.main([str(source), str(tmp_path / "m.ckpt"), "--to", "mindone", "--base",
                              str(tiny_model)]) == 2
    assert "holds no embeddings" in capsys.readouterr().err
