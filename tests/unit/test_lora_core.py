import json

import numpy as np
import pytest

from msd_lora.errors import LoraFormatError, LoraMismatchError, LoraSpecError, MissingPathError
from msd_lora.lora.core import LoraLayer, from_tensors, to_tensors
from msd_lora.lora.formats import read_lora, write_lora
from msd_lora.lora.merge import check_fits, delta, merged_weights
from msd_lora.lora.spec import LoraSpec, init_lora_weights, matches, select_targets

SHAPES = {"unet": {"down.0.attn1.to_q": (64, 32), "down.0.attn1.to_out.0": (64, 64), "down.0.ff.net.2": (32, 128)},
          "text_encoder": {"layers.0.self_attn.q_proj": (32, 32)}}


def spec(rank=4, alpha=8.0, init="kaiming", text_encoder=False):
    targets = {"unet": ("to_q", "to_out.0")}
    if text_encoder:
        targets["text_encoder"] = ("q_proj",)
    return LoraSpec(rank=rank, alpha=alpha, targets=targets, init=init)


def random_lora(rng, shapes=SHAPES["unet"], rank=4, alpha=8.0):
    return {f"unet.{n}": LoraLayer(rng.standard_normal((rank, i)).astype(np.float32),
                                   rng.standard_normal((o, rank)).astype(np.float32), alpha)
            for n, (o, i) in shapes.items()}


def test_suffix_matching_follows_module_boundaries():
    assert matches("a.attn1.to_out.0", ("to_out.0",))
    assert not matches("a.attn1.xto_q", ("to_q",))


def test_select_targets_and_errors():
    assert select_targets(spec(text_encoder=True), SHAPES) == {
        "unet": ["down.0.attn1.to_out.0", "down.0.attn1.to_q"], "text_encoder": ["layers.0.self_attn.q_proj"]}
    with pytest.raises(LoraSpecError, match=r"lora_rank 40 is larger than .*to_q \(64 out, 32 in channels\)"):
        select_targets(spec(rank=40), SHAPES)
    bad = LoraSpec(rank=4, alpha=4, targets={"unet": ("query",)})
    with pytest.raises(LoraSpecError, match=r"no unet linear or convolution layer matches targets \['query'\].*to_q"):
        select_targets(bad, SHAPES)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_init_starts_as_identity_and_is_seeded(init):
    s = spec(init=init)
    targets = select_targets(s, SHAPES)
    a, b = init_lora_weights(s, targets, SHAPES, 1), init_lora_weights(s, targets, SHAPES, 1)
    layer = a["unet.down.0.attn1.to_q"]
    assert layer.down.shape == (4, 32) and layer.up.shape == (64, 4) and not layer.up.any()
    assert np.array_equal(layer.down, b["unet.down.0.attn1.to_q"].down)
    bound = 1 / np.sqrt(32)
    if init == "kaiming":
        assert np.abs(layer.down).max() <= bound
    else:
        assert abs(layer.down.std() - 1 / 4) < 0.05
    assert not np.array_equal(layer.down, init_lora_weights(s, targets, SHAPES, 2)["unet.down.0.attn1.to_q"].down)


def test_delta_and_merge_maths():
    rng = np.random.default_rng(0)
    lora = random_lora(rng)
    layer = lora["unet.down.0.attn1.to_q"]
    expected = 0.5 * (8.0 / 4) * layer.up.astype(np.float64) @ layer.down.astype(np.float64)
    np.testing.assert_allclose(delta(layer, 0.5), expected, rtol=1e-6, atol=1e-6)
    base = {f"unet.{n}.weight": rng.standard_normal(s).astype(np.float32) for n, s in SHAPES["unet"].items()}
    merged = merged_weights(base, [(lora, 1.0), (lora, -1.0)])
    for name, value in merged.items():
        np.testing.assert_allclose(value, base[name], atol=1e-4)  # +LoRA then -LoRA restores the base


def test_check_fits_names_missing_keys_and_shapes():
    rng = np.random.default_rng(0)
    base_shapes = {"unet.down.0.attn1.to_q.weight": (64, 32), "unet.down.0.attn1.to_out.0.weight": (64, 64)}
    lora = random_lora(rng, {"down.0.attn1.to_q": (128, 32), "mid.attn.to_k": (64, 64)})
    with pytest.raises(LoraMismatchError) as err:
        check_fits(lora, base_shapes, source="x.safetensors")
    text = str(err.value)
    assert "x.safetensors does not fit" in text and "unet.mid.attn.to_k" in text
    assert "unet.down.0.attn1.to_q: LoRA gives 128x32" in text and "model has 64x32" in text


def test_file_round_trip_keeps_values_alpha_and_metadata(tmp_path):
    rng = np.random.default_rng(1)
    lora = random_lora(rng, alpha=2.0)
    path = write_lora(tmp_path / "l.safetensors", lora, base_model="tiny", step=7)
    loaded = read_lora(path)
    assert loaded.step == 7 and loaded.metadata["msd_lora.base_model"] == "tiny"
    adapter = json.loads(loaded.metadata["lora_adapter_metadata"])
    assert adapter["unet.r"] == 4 and adapter["unet.lora_alpha"] == 2.0
    for key, layer in lora.items():
        np.testing.assert_array_equal(loaded.weights[key].down, layer.down)
        np.testing.assert_array_equal(loaded.weights[key].up, layer.up)
        assert loaded.weights[key].alpha == 2.0
    assert not list(tmp_path.glob("*.tmp"))


def test_tensor_keys_are_diffusers_peft_names():
    lora = random_lora(np.random.default_rng(0), {"a.to_q": (8, 8)})
    assert sorted(to_tensors(lora)) == ["unet.a.to_q.lora_A.weight", "unet.a.to_q.lora_B.weight"]
    assert from_tensors(to_tensors(lora), None)["unet.a.to_q"].alpha == 4.0  # no alpha stored: alpha = rank


@pytest.mark.parametrize("content,message", [
    (b"", r"LoRA file .*bad\.safetensors is empty"),
    (b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}",
     r"LoRA file .*bad\.safetensors: header length 8 does not fit a 15-byte file"),
])
def test_corrupt_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoraFormatError, match=message):
        read_lora(path)


def test_truncated_file_and_missing_file(tmp_path):
    path = write_lora(tmp_path / "l.safetensors", random_lora(np.random.default_rng(0)))
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(LoraFormatError, match="truncated"):
        read_lora(path)
    with pytest.raises(MissingPathError, match="LoRA file .*nope.safetensors does not exist"):
        read_lora(tmp_path / "nope.safetensors")


def test_non_lora_safetensors_is_rejected(tmp_path):
    from safetensors.numpy import save_file

    save_file({"conv.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(LoraFormatError, match="holds no LoRA in a known format"):
        read_lora(tmp_path / "model.safetensors")


def test_weights_written_into_a_live_lora_must_fit_names_shapes_and_alpha():
    from msd_lora.lora.core import check_lora_fits

    def lora(rank, alpha, key="unet.a.to_q"):
        return {key: LoraLayer(down=np.zeros((rank, 6), np.float32), up=np.zeros((5, rank), np.float32), alpha=alpha)}

    check_lora_fits(lora(2, 2.0), lora(2, 2.0))
    with pytest.raises(ValueError, match=r"1 missing \(e.g. \['unet.a.to_q'\]\), 1 unexpected \(e.g. \['unet.b"):
        check_lora_fits(lora(2, 2.0, "unet.b.to_q"), lora(2, 2.0))
    with pytest.raises(ValueError, match=r"unet.a.to_q.lora_A.weight: shape \(4, 6\) does not fit the model's \(2, 6\)"):
        check_lora_fits(lora(4, 2.0), lora(2, 2.0))
    with pytest.raises(ValueError, match=r"unet.a.to_q: alpha 1 differs from the model's lora_alpha 2, which would "
                                         r"rescale the update by 2: set lora_alpha: 1"):
        check_lora_fits(lora(2, 1.0), lora(2, 2.0))
