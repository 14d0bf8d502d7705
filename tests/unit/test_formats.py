"""LoRA file formats: detection, exact round trips, alpha handling, merge maths, and errors users can act on."""
import json

import numpy as np
import pytest

from msd_lora.errors import LoraFormatError, LoraMismatchError
from msd_lora.files.safetensors_file import write_safetensors
from msd_lora.lora.core import LoraLayer
from msd_lora.lora.formats import detect_format, read_lora, write_lora
from msd_lora.lora.init_from import start_from_file
from msd_lora.lora.merge import check_fits, delta, extract_lora, merge_into_state, merged_weights, unmerged_weights
from msd_lora.lora.module_index import ModuleIndex
from msd_lora.models.pretrained import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model):
    model, _ = load_model(tiny_model)
    return model


@pytest.fixture(scope="module")
def index(tiny):
    return ModuleIndex.from_configs(tiny.configs)


LORA_LEAVES = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "proj_in.weight", "ff.net.2.weight",
               "conv1.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "fc1.weight")


def random_lora(model, rng, rank=4, alpha=lambda rng: 8.0, leaves=LORA_LEAVES, shared_qkv=False):
    """LoRA layers on the tiny model's attention, MLP, proj_in (1x1 conv) and resnet conv (LoCon) weights."""
    weights = {}
    for network in ("unet", "text_encoder"):
        for name, value in model.state[network].items():
            if not name.endswith(leaves):
                continue
            down = (rng.standard_normal((rank,) + value.shape[1:]) * 0.1).astype(np.float32)
            up_shape = (value.shape[0], rank) + ((1, 1) if value.ndim == 4 else ())
            weights[f"{network}.{name[:-len('.weight')]}"] = LoraLayer(
                down, (rng.standard_normal(up_shape) * 0.1).astype(np.float32), float(alpha(rng)))
    if shared_qkv:
        for key in [k for k in weights if k.endswith("self_attn.q_proj")]:
            for other in ("k_proj", "v_proj"):
                weights[key.replace("q_proj", other)].down = weights[key].down
    return weights


def assert_exact(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].down.dtype == b[key].down.dtype
        np.testing.assert_array_equal(a[key].down, b[key].down, err_msg=key)
        np.testing.assert_array_equal(a[key].up, b[key].up, err_msg=key)
        assert a[key].alpha == b[key].alpha, key


def assert_same_update(a, b, rtol=1e-6):
    assert sorted(a) == sorted(b)
    for key in a:
        expected = delta(a[key])
        np.testing.assert_allclose(delta(b[key]), expected, rtol=rtol, atol=rtol * np.abs(expected).max(), err_msg=key)


@pytest.mark.parametrize("fmt,name", [("diffusers", "a.safetensors"), ("kohya", "b.safetensors")])
def test_diffusers_and_kohya_round_trips_are_exact_with_any_alpha(tiny, index, tmp_path, fmt, name):
    lora = random_lora(tiny, np.random.default_rng(0), alpha=lambda rng: float(rng.choice([1.0, 2.0, 8.0, 0.5])))
    assert {layer.alpha for layer in lora.values()} != {4.0}  # alpha != rank, and not uniform
    path = write_lora(tmp_path / name, lora, fmt, index)
    back = read_lora(path, index)
    assert back.format == fmt
    assert_exact(lora, back.weights)
    kohya_again = read_lora(write_lora(tmp_path / "again.safetensors", back.weights, "kohya", index), index)
    canonical = read_lora(write_lora(tmp_path / "canon.safetensors", kohya_again.weights, "diffusers", index), index)
    assert_exact(lora, canonical.weights)  # canonical -> kohya -> canonical


def test_kohya_file_layout_and_metadata(tiny, index, tmp_path):
    lora = random_lora(tiny, np.random.default_rng(1), alpha=lambda rng: 2.0)
    path = write_lora(tmp_path / "k.safetensors", lora, "kohya", index)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight" in keys
    assert alpha.shape == () and float(alpha) == 2.0
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "4"


def test_kohya_ldm_style_names_resolve_to_the_same_layers(tiny, index, tmp_path):
    """A1111-era files name UNet layers by LDM cell path (lora_unet_input_blocks_...)."""
    lora = random_lora(tiny, np.random.default_rng(2), leaves=("to_q.weight", "conv1.weight"))
    tensors = {}
    for key, layer in lora.items():
        component, module = key.split(".", 1)
        name = index.unet_ldm[module] if component == "unet" else module
        stem = ("lora_unet_" if component == "unet" else "lora_te_") + name.replace(".", "_")
        tensors.update({f"{stem}.lora_down.weight": layer.down, f"{stem}.lora_up.weight": layer.up,
                        f"{stem}.alpha": np.array(layer.alpha, np.float32)})
    assert any("input_blocks" in k for k in tensors)
    write_safetensors(tmp_path / "ldm_kohya.safetensors", tensors)
    assert_exact(lora, read_lora(tmp_path / "ldm_kohya.safetensors", index).weights)


def test_mindone_round_trip_exact_for_mindone_style_loras(tiny, index, tmp_path):
    """alpha = rank and shared q/k/v A (what mindone trains): canonical -> mindone -> canonical is exact."""
    lora = random_lora(tiny, np.random.default_rng(3), alpha=lambda rng: 4.0, shared_qkv=True,
                       leaves=("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "q_proj.weight",
                               "k_proj.weight", "v_proj.weight", "out_proj.weight", "ff.net.2.weight"))
    with pytest.warns(UserWarning, match=r"\d+ layers are not attention projections \(e\.g\. .*ff\.net\.2"):
        path = write_lora(tmp_path / "m.ckpt", lora, "mindone", index)  # mindone's loader skips ff.net.2
    from msd_lora.files.mindspore_ckpt import read_mindspore_ckpt

    raw = read_mindspore_ckpt(path)
    assert int(raw["lora_rank"]) == 4
    fused = "cond_stage_model.transformer.transformer_layer.resblocks.0.attn.attn.in_proj.lora_up.weight"
    assert raw[fused].shape == (3 * 64, 4)
    assert "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_out.0.lora_down.weight" in raw
    back = read_lora(path, index)
    assert back.format == "mindone"
    assert_exact(lora, back.weights)


def test_mindone_and_old_diffusers_fold_alpha_and_keep_the_update(tiny, index, tmp_path):
    lora = random_lora(tiny, np.random.default_rng(4), alpha=lambda rng: 3.0)  # separate q/k/v A, LoCon
    with pytest.warns(UserWarning, match=r"rank other than lora_rank 4, e\.g\. a q/k/v LoRA .*in_proj"):
        write_lora(tmp_path / "m.ckpt", lora, "mindone", index)
    for fmt, name in (("mindone", "m.ckpt"), ("diffusers_old", "o.safetensors")):
        back = read_lora(tmp_path / name if fmt == "mindone" else write_lora(tmp_path / name, lora, fmt, index), index)
        assert back.format == fmt and {layer.alpha for layer in back.weights.values()} == {
            float(layer.rank) for layer in back.weights.values()}
        assert_same_update(lora, back.weights)


def test_mindone_style_loras_write_without_a_warning(tiny, index, tmp_path):
    import warnings

    lora = random_lora(tiny, np.random.default_rng(3), alpha=lambda rng: 4.0, shared_qkv=True,
                       leaves=("to_q.weight", "to_v.weight", "to_out.0.weight", "q_proj.weight", "k_proj.weight",
                               "v_proj.weight", "out_proj.weight"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_lora(tmp_path / "m.ckpt", lora, "mindone", index)


def test_mindone_in_proj_that_is_not_three_blocks_is_named(tmp_path):
    from msd_lora.files.mindspore_ckpt import write_mindspore_ckpt

    cell = "cond_stage_model.transformer.transformer_layer.resblocks.0.attn.attn.in_proj"
    write_mindspore_ckpt(tmp_path / "odd.ckpt", {f"{cell}.lora_down.weight": np.zeros((4, 32), np.float32),
                                                  f"{cell}.lora_up.weight": np.zeros((64, 4), np.float32)})
    with pytest.raises(LoraFormatError, match=r"odd\.ckpt: .*in_proj\.lora_up\.weight has shape \(64, 4\).*3 x width"):
        read_lora(tmp_path / "odd.ckpt")


def test_alpha_patterns_match_as_peft_matches_them(tmp_path):
    """peft.utils.other.get_pattern_key: a key is a regex for the module name or for a suffix after a '.'."""
    modules = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 16.0,
               "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 16.0,
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": 2.0,
               "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": 4.0,
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": 8.0,  # 'proj' is no '.'-suffix of it
               "text_encoder.text_model.encoder.layers.0.mlp.fc1": 3.0}
    adapter = {"unet.lora_alpha": 4.0, "unet.alpha_pattern": {"attn1.to_q": 16.0, r"down_blocks\.1\..*to_k": 2.0},
               "text_encoder.lora_alpha": 8.0, "text_encoder.alpha_pattern": {"proj": 1.0, "mlp.fc1": 3.0}}
    tensors = {}
    for key in modules:
        tensors[f"{key}.lora_A.weight"] = np.ones((2, 8), np.float32)
        tensors[f"{key}.lora_B.weight"] = np.ones((8, 2), np.float32)
    write_safetensors(tmp_path / "peft.safetensors", tensors, {"lora_adapter_metadata": json.dumps(adapter)})
    weights = read_lora(tmp_path / "peft.safetensors").weights
    assert {key: layer.alpha for key, layer in weights.items()} == modules


def test_old_diffusers_alpha_tensors_apply_to_their_layers(tiny, index, tmp_path):
    from msd_lora.files.tensor_file import read_tensor_file

    leaves = ("to_q.weight", "to_k.weight", "conv1.weight", "q_proj.weight", "fc1.weight")
    lora = random_lora(tiny, np.random.default_rng(7), alpha=lambda rng: 4.0, leaves=leaves)
    tensors = dict(read_tensor_file(write_lora(tmp_path / "old.safetensors", lora, "diffusers_old", index)).tensors)
    stems = {name[: -len(".down.weight")] for name in tensors if name.endswith(".down.weight")}
    to_k = next(s for s in stems if s.endswith("attn1.processor.to_k_lora"))
    for stem in stems:  # alpha 2 under each naming a file may use; one UNet stem without its `unet.` prefix
        tensors[f"{stem.removeprefix('unet.') if stem == to_k else stem}.alpha"] = np.array(2.0, np.float32)
    write_safetensors(tmp_path / "alphas.safetensors", tensors)
    back = read_lora(tmp_path / "alphas.safetensors", index)
    assert back.format == "diffusers_old" and {layer.alpha for layer in back.weights.values()} == {2.0}
    tensors["unet.no_such_block.to_q.alpha"] = np.array(2.0, np.float32)
    write_safetensors(tmp_path / "stray.safetensors", tensors)
    with pytest.raises(LoraFormatError, match=r"stray\.safetensors: 1 \.alpha tensors belong to no LoRA layer"):
        read_lora(tmp_path / "stray.safetensors", index)


def test_merge_into_state_checks_the_fit_once(tiny, monkeypatch):
    from msd_lora.lora import merge

    calls = []
    monkeypatch.setattr(merge, "check_fits", lambda *args, **kwargs: calls.append(args[2:]))
    merge_into_state(tiny.state, [(random_lora(tiny, np.random.default_rng(8)), 1.0)], source="x.safetensors")
    assert calls == [("x.safetensors",)]


def test_old_diffusers_attention_processor_names(tiny, index, tmp_path):
    lora = random_lora(tiny, np.random.default_rng(5), alpha=lambda rng: 4.0, leaves=("to_out.0.weight", "q_proj.weight"))
    path = write_lora(tmp_path / "old.safetensors", lora, "diffusers_old", index)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        keys = set(f.keys())
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight" in keys
    assert_exact(lora, read_lora(path, index).weights)


def test_format_detection():
    assert detect_format(["lora_unet_a.lora_down.weight"]) == "kohya"
    assert detect_format(["unet.a.to_q.lora_A.weight"]) == "diffusers"
    assert detect_format(["model.diffusion_model.a.to_q.lora_down.weight", "lora_rank"]) == "mindone"
    assert detect_format(["a.processor.to_q_lora.down.weight"]) == "diffusers_old"
    assert detect_format(["model.diffusion_model.input_blocks.0.0.weight"]) is None


@pytest.mark.parametrize("keys,message", [
    ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768)}, "SDXL LoRA"),
    ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a": (4, 8)}, "LoHa"),
    ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale": (1, 8)},
     "has no lora_down.weight"),  # a DoRA scale alone
    ({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (4, 8),
      "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": (8, 4)}, "SDXL LoRA"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "full model checkpoint"),
])
def test_lora_files_that_cannot_be_used_say_why(tmp_path, keys, message):
    path = write_safetensors(tmp_path / "x.safetensors", {k: np.zeros(s, np.float32) for k, s in keys.items()})
    with pytest.raises(LoraFormatError, match=message):
        read_lora(path)


def test_kohya_layers_of_another_layout_are_listed_with_a_cause(index, tmp_path):
    """An SDXL-style kohya file (several transformer blocks per attention) on the SD layout."""
    stems = [f"lora_unet_down_blocks_1_attentions_0_transformer_blocks_{i}_attn1_to_q" for i in range(3)]
    tensors = {}
    for stem in stems:
        tensors[f"{stem}.lora_down.weight"] = np.zeros((4, 640), np.float32)
        tensors[f"{stem}.lora_up.weight"] = np.zeros((640, 4), np.float32)
    path = write_safetensors(tmp_path / "xl.safetensors", tensors)
    with pytest.raises(LoraFormatError, match=r"(?s)2 of 3 kohya layers name no module.*transformer_blocks_1.*SDXL"):
        read_lora(path)  # the SD 1.x/2.x index: transformer_blocks_0 resolves, 1 and 2 do not


def test_truncated_and_foreign_lora_files_are_clear_errors(tiny, index, tmp_path):
    path = write_lora(tmp_path / "ok.safetensors", random_lora(tiny, np.random.default_rng(6)), "kohya", index)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFormatError, match=r"cut\.safetensors is truncated"):
        read_lora(tmp_path / "cut.safetensors", index)
    (tmp_path / "page.safetensors").write_bytes(b"<!DOCTYPE html><html>404</html>")
    with pytest.raises(LoraFormatError, match=r"page\.safetensors: unknown file format"):
        read_lora(tmp_path / "page.safetensors", index)


def test_mismatch_names_the_families():
    """An SD2 LoRA (cross-attention width 1024) on an SD1.5 model (768)."""
    to_k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    base = {f"unet.{to_k}.weight": (320, 768)}
    lora = {f"unet.{to_k}": LoraLayer(np.zeros((4, 1024), np.float32), np.zeros((320, 4), np.float32), 4.0)}
    with pytest.raises(LoraMismatchError, match=r"(?s)sd2\.safetensors does not fit.*an SD 2\.x LoRA on an SD 1\.x model"):
        check_fits(lora, base, source="sd2.safetensors")
    sdxl = {"unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q":
            LoraLayer(np.zeros((4, 640), np.float32), np.zeros((640, 4), np.float32), 4.0)}
    with pytest.raises(LoraMismatchError, match=r"(?s)1 of 1 layers not in the model.*an SDXL LoRA on an SD 1\.x model"):
        check_fits(sdxl, base, source="xl.safetensors")


def test_merge_then_unmerge_restores_the_base(tiny):
    rng = np.random.default_rng(7)
    a, b = random_lora(tiny, rng, alpha=lambda rng: 2.0), random_lora(tiny, rng, rank=2, alpha=lambda rng: 5.0)
    state = {n: {k: np.asarray(v, np.float32) for k, v in tiny.state[n].items()} for n in ("unet", "text_encoder")}
    merged = merge_into_state(state, [(a, 0.75), (b, 0.5)])
    touched = [k for k in state["unet"] if not np.array_equal(state["unet"][k], merged["unet"][k])]
    assert any(k.endswith("conv1.weight") for k in touched) and any(k.endswith("proj_in.weight") for k in touched)
    restored = merge_into_state(merged, [(a, -0.75), (b, -0.5)])
    for network in state:
        for name, value in state[network].items():
            error = np.abs(restored[network][name].astype(np.float64) - value).max()
            assert error <= 1e-6 * max(np.abs(value).max(), 1e-12), (name, error)


def test_merge_equals_the_formula_and_sums_several_loras():
    rng = np.random.default_rng(8)
    base = {"unet.x.weight": rng.standard_normal((6, 5)).astype(np.float32),
            "unet.c.weight": rng.standard_normal((6, 5, 1, 1)).astype(np.float32)}
    lin = LoraLayer(rng.standard_normal((2, 5)).astype(np.float32), rng.standard_normal((6, 2)).astype(np.float32), 3.0)
    a = {"unet.x": lin, "unet.c": lin}  # a linear LoRA on a 1x1 convolution is the same numbers
    out = merged_weights(base, [(a, 0.5), (a, 0.25)])
    update = 0.75 * (3.0 / 2) * lin.up.astype(np.float64) @ lin.down
    np.testing.assert_allclose(out["unet.x.weight"], base["unet.x.weight"] + update, rtol=1e-6)
    np.testing.assert_allclose(out["unet.c.weight"][:, :, 0, 0], base["unet.c.weight"][:, :, 0, 0] + update, rtol=1e-6)
    back = unmerged_weights(out, [(a, 0.5), (a, 0.25)])
    np.testing.assert_allclose(back["unet.x.weight"], base["unet.x.weight"], rtol=1e-6, atol=1e-7)


def test_svd_extraction_recovers_a_low_rank_difference(tiny):
    rng = np.random.default_rng(9)
    lora = random_lora(tiny, rng, rank=3, alpha=lambda rng: 3.0)
    flat = {f"{n}.{k}": np.asarray(v, np.float32) for n in ("unet", "text_encoder") for k, v in tiny.state[n].items()}
    tuned = dict(flat)
    tuned.update(merged_weights(flat, [(lora, 1.0)]))
    extracted = extract_lora(flat, tuned, rank=3, include_conv=True)
    assert set(extracted) == set(lora)
    for key, layer in extracted.items():
        assert layer.rank == 3
        np.testing.assert_allclose(delta(layer), delta(lora[key]), atol=1e-5 * np.abs(delta(lora[key])).max() + 1e-7)
    assert not any(k.endswith("conv1") for k in extract_lora(flat, tuned, rank=3, include_conv=False))


def test_init_from_file_keeps_the_update_and_checks_the_fit(tiny, index, tmp_path):
    rng = np.random.default_rng(10)
    file_lora = random_lora(tiny, rng, rank=4, alpha=lambda rng: 2.0, leaves=("to_q.weight", "to_v.weight"))
    path = write_lora(tmp_path / "init.safetensors", file_lora, "kohya", index)
    fresh = random_lora(tiny, rng, rank=4, alpha=lambda rng: 8.0, leaves=("to_q.weight", "to_k.weight", "to_v.weight"))
    fresh = {k: v for k, v in fresh.items() if k.startswith("unet.")}
    start, message = start_from_file(path, fresh, index)
    assert "from" in message and "kohya" in message and "start fresh" in message
    for key in file_lora:
        assert start[key].alpha == 8.0
        np.testing.assert_allclose(delta(start[key]), delta(file_lora[key]), rtol=1e-6, atol=1e-9)
    assert all(start[k] is fresh[k] for k in fresh if k.endswith("to_k"))
    rank_2 = random_lora(tiny, rng, rank=2, alpha=lambda rng: 2.0, leaves=("to_q.weight", "to_k.weight", "to_v.weight"))
    rank_2 = {k: v for k, v in rank_2.items() if k.startswith("unet.")}
    with pytest.raises(LoraFormatError, match=r"rank 4, this run trains rank 2 \(set lora_rank / conv_rank: 4\)"):
        start_from_file(path, rank_2, index)
    only_q = {k: v for k, v in fresh.items() if k.endswith("to_q")}
    with pytest.raises(LoraFormatError, match=r"not trained by this run.*\(to_v\)"):
        start_from_file(path, only_q, index)


def test_module_index_names_every_layer_once(index):
    flat_unet = [m.replace(".", "_") for m in index.unet]
    assert len(set(flat_unet)) == len(flat_unet)
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert index.resolve_flat("unet", module.replace(".", "_")) == module
    assert index.resolve_flat("unet", index.unet_ldm[module].replace(".", "_")) == module
    sd = ModuleIndex.stable_diffusion()
    assert sd.resolve_flat("text_encoder", "text_model_encoder_layers_22_mlp_fc2") == "text_model.encoder.layers.22.mlp.fc2"
    assert sd.unet_ldm["up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0"] == \
        "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0"
