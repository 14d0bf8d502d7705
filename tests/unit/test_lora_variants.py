"""DoRA, LoCon and rsLoRA in numpy: the merge against the plain formula, target presets, and exact round trips
through the canonical and kohya formats."""
from __future__ import annotations

import math

import numpy as np
import pytest

from msd_lora.errors import LoraFormatError, LoraMismatchError, LoraSpecError
from msd_lora.lora.core import LoraLayer
from msd_lora.lora.format_mindone import refuse_beyond_mindone
from msd_lora.lora.formats import read_lora, write_lora
from msd_lora.lora.merge import merged_weights, unmerged_weights
from msd_lora.lora.module_index import ModuleIndex
from msd_lora.lora.spec import LoraSpec, init_lora_weights, select_targets

RNG = np.random.default_rng(0)
SHAPES = {"unet": {  # SD1-like module names and weight shapes
    "down_blocks.0.attentions.0.proj_in": (8, 8, 1, 1),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (8, 8),
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": (64, 8),
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": (8, 32),
    "down_blocks.0.resnets.0.conv1": (8, 4, 3, 3),
    "down_blocks.0.resnets.0.time_emb_proj": (8, 16),
    "down_blocks.0.resnets.0.conv_shortcut": (8, 4, 1, 1),
    "down_blocks.0.downsamplers.0.conv": (8, 8, 3, 3),
    "conv_in": (4, 4, 3, 3), "time_embedding.linear_1": (16, 4)},
    "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": (8, 8),
                     "text_model.encoder.layers.0.mlp.fc1": (16, 8)}}


def random_layer(shape, rank=2, alpha=3.0, dora=None):
    down = RNG.standard_normal((rank, *shape[1:])).astype(np.float32)
    up = RNG.standard_normal((shape[0], rank, *[1] * (len(shape) - 2))).astype(np.float32)
    magnitude = None
    if dora == "out":
        magnitude = RNG.uniform(0.5, 2, (shape[0], *[1] * (len(shape) - 1))).astype(np.float32)
    elif dora == "in":
        magnitude = RNG.uniform(0.5, 2, (1, shape[1], *[1] * (len(shape) - 2))).astype(np.float32)
    return LoraLayer(down=down, up=up, alpha=alpha, magnitude=magnitude)


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 3, 3)])
@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_dora_merge_is_magnitude_times_normalised_direction(shape, axis, scale):
    layer = random_layer(shape, dora=axis)
    base = RNG.standard_normal(shape).astype(np.float32)
    merged = merged_weights({"unet.m.weight": base}, [({"unet.m": layer}, scale)])["unet.m.weight"]
    v = base.astype(np.float64) + 1.5 * (layer.up.reshape(shape[0], 2) @ layer.down.reshape(2, -1)).reshape(shape)
    want = np.empty_like(v)
    for i in range(shape[0] if axis == "out" else shape[1]):  # one channel at a time
        index = (i,) if axis == "out" else (slice(None), i)
        want[index] = layer.magnitude.reshape(-1)[i] * v[index] / np.sqrt((v[index] ** 2).sum())
    np.testing.assert_allclose(merged, base + scale * (want - base), rtol=1e-5, atol=1e-6)
    with pytest.raises(LoraMismatchError, match="cannot be unmerged"):
        unmerged_weights({"unet.m.weight": merged}, [({"unet.m": layer}, scale)])


def test_fresh_dora_leaves_the_model_unchanged():
    spec = LoraSpec(rank=2, alpha=2.0, dora=True, targets={"unet": ("c3lier",)})
    targets = select_targets(spec, SHAPES)
    base = {f"unet.{n}.weight": RNG.standard_normal(SHAPES["unet"][n]).astype(np.float32) for n in targets["unet"]}
    weights = init_lora_weights(spec, targets, SHAPES, seed=0, base=base)
    merged = merged_weights(base, [(weights, 1.0)])
    for name, value in merged.items():
        np.testing.assert_allclose(value, base[name], rtol=1e-6, atol=1e-6)


def test_presets_pick_kohyas_layers():
    def picked(preset, component="unet"):
        return set(select_targets(LoraSpec(rank=2, alpha=2.0, targets={component: (preset,)}), SHAPES)[component])

    unet = SHAPES["unet"]
    attention = {n for n in unet if n.endswith(("to_q", "to_out.0"))}
    assert picked("attention") == attention
    lierla = attention | {n for n in unet if n.endswith(("proj_in", "ff.net.0.proj", "ff.net.2"))}
    assert picked("lierla") == lierla
    assert picked("c3lier") == lierla | {n for n in unet if ".resnets." in n or ".downsamplers." in n}
    assert "conv_in" not in picked("c3lier") and "time_embedding.linear_1" not in picked("c3lier")
    assert picked("attention", "text_encoder") == {"text_model.encoder.layers.0.self_attn.q_proj"}
    assert picked("lierla", "text_encoder") == set(SHAPES["text_encoder"])


def test_conv_rank_and_rslora_alpha_per_layer():
    spec = LoraSpec(rank=4, alpha=8.0, rslora=True, conv_rank=2, conv_alpha=1.0, targets={"unet": ("c3lier",)})
    weights = init_lora_weights(spec, select_targets(spec, SHAPES), SHAPES, seed=0)
    conv = weights["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.down.shape == (2, 4, 3, 3) and conv.up.shape == (8, 2, 1, 1)
    assert conv.scale == pytest.approx(1.0 / math.sqrt(2))  # conv_alpha / sqrt(conv_rank)
    pointwise = weights["unet.down_blocks.0.resnets.0.conv_shortcut"]
    assert pointwise.rank == 4 and pointwise.scale == pytest.approx(8.0 / 2.0)  # 1x1: lora_rank, alpha / sqrt(4)
    assert np.abs(conv.down).max() <= 1 / math.sqrt(4 * 9)  # kaiming bound of the conv's fan-in


@pytest.mark.parametrize("flags,message", [
    (dict(conv_rank=5), "conv_rank 5 is larger than unet layer down_blocks.0.resnets.0.conv1 .8 out, 4 in"),
    (dict(rank=9), "lora_rank 9 is larger"),
])
def test_ranks_larger_than_the_channels_are_refused(flags, message):
    spec = LoraSpec(**{"rank": 2, "alpha": 2.0, "targets": {"unet": ("c3lier",)}, **flags})
    with pytest.raises(LoraSpecError, match=message):
        select_targets(spec, SHAPES)


def test_targets_that_are_no_linear_or_conv_layer_are_named():
    with pytest.raises(LoraSpecError, match="linear or convolution layer.*presets?: attention, lierla, c3lier"):
        select_targets(LoraSpec(rank=2, alpha=2.0, dora=True, targets={"unet": ("norm1",)}), SHAPES)


def variant_lora(axis="out"):
    return {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": random_layer((8, 8), dora=axis),
            "unet.down_blocks.0.resnets.0.conv1": random_layer((8, 4, 3, 3), rank=3, alpha=1.0, dora=axis),
            "unet.down_blocks.0.attentions.0.proj_in": random_layer((8, 8, 1, 1), dora=axis),
            "text_encoder.text_model.encoder.layers.0.mlp.fc1": random_layer((16, 8), alpha=5.0, dora=axis)}


def assert_same(got, want):
    assert got.keys() == want.keys()
    for key, layer in want.items():
        for part in ("down", "up", "magnitude"):
            np.testing.assert_array_equal(getattr(got[key], part), getattr(layer, part), err_msg=f"{key}.{part}")
        assert got[key].alpha == pytest.approx(layer.alpha, rel=1e-7)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_dora_and_locon_round_trip_exactly(tmp_path, fmt):
    weights = variant_lora()
    path = write_lora(tmp_path / f"{fmt}.safetensors", weights, fmt=fmt)
    back = read_lora(path, ModuleIndex.stable_diffusion())
    assert back.format == fmt
    assert_same(back.weights, weights)


def test_kohya_reads_lycoris_input_axis_dora_and_refuses_to_write_it_for_peft(tmp_path):
    weights = variant_lora(axis="in")
    path = write_lora(tmp_path / "lycoris.safetensors", weights, fmt="kohya")
    back = read_lora(path, ModuleIndex.stable_diffusion())
    assert_same(back.weights, weights)
    assert back.weights["unet.down_blocks.0.resnets.0.conv1"].magnitude.shape == (1, 4, 1, 1)
    with pytest.raises(LoraFormatError, match="per input channel.*kohya format"):
        write_lora(tmp_path / "peft.safetensors", weights)


def test_mindone_format_says_it_cannot_hold_dora():
    with pytest.raises(LoraFormatError, match="cannot hold DoRA layers"):
        refuse_beyond_mindone(variant_lora())
    refuse_beyond_mindone({k: LoraLayer(v.down, v.up, v.alpha) for k, v in variant_lora().items()})  # LoCon: written
