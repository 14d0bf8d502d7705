"""Our torch FID InceptionV3: pytorch-fid's weight layout loads strictly from .pth and .safetensors; weight-file
errors name the file. (Agreement with pytorch-fid itself: test_xcheck.py; with MindSpore: test_mindspore.py.)"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from msd_lora.backends.torch.inception import FidInceptionV3, TorchInceptionFeatures
from msd_lora.errors import (
    StateDictError,
    WeightsError,
)
from msd_lora.eval import inception_arch as arch
from msd_lora.eval.weights import FID_WEIGHTS_NAME, FID_WEIGHTS_URL, read_inception_weights, resolve_inception_weights


def test_architecture_description_is_the_weight_files_layout():
    state = {k: tuple(v.shape) for k, v in FidInceptionV3().state_dict().items() if "num_batches" not in k}
    assert state == arch.state_shapes()
    assert len(state) == 472  # 94 BasicConv2d x (conv + 4 batch-norm tensors) + fc weight and bias


def test_pth_and_safetensors_give_the_same_features(inception_pth, inception_safetensors, image_sets):
    from_pth, _ = read_inception_weights(inception_pth)
    from_st, meta = read_inception_weights(inception_safetensors)
    assert meta["msd_lora_random_init"] == "seed=0"
    assert from_pth.keys() == from_st.keys()
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 299, 299)).astype(np.float32)
    a = TorchInceptionFeatures(from_pth, str(inception_pth), "cpu")(x)
    b = TorchInceptionFeatures(from_st, str(inception_safetensors), "cpu")(x)
    assert a.shape == (2, 2048) and np.isfinite(a).all() and a.std() > 0.1  # activations neither vanish nor blow up
    np.testing.assert_array_equal(a, b)


def test_wrong_weight_file_names_what_does_not_fit(tmp_path):
    state = arch.random_state(0)
    del state["Mixed_7c.branch_pool.conv.weight"]
    state["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    with pytest.raises(StateDictError, match=r"(?s)mine\.pth does not fit the FID InceptionV3.*1 missing, e\.g\. "
                                             r"Mixed_7c\.branch_pool\.conv\.weight.*1 unexpected, e\.g\. AuxLogits"):
        TorchInceptionFeatures(state, "mine.pth", "cpu")


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match=rf"Inception weights file {tmp_path}/none.pth not found"):
        resolve_inception_weights(tmp_path / "none.pth")


def test_no_cached_standard_weights_offline_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MSD_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as err:
        resolve_inception_weights(None)
    message = str(err.value)
    assert f"{tmp_path}/cache/{FID_WEIGHTS_NAME}" in message and f"{tmp_path}/torch/hub/checkpoints" in message
    assert FID_WEIGHTS_URL in message and "Downloads are off" in message


def test_cached_weights_are_hash_checked(tmp_path, monkeypatch):
    import msd_lora.eval.weights as weights

    monkeypatch.setenv("MSD_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch/hub/checkpoints" / FID_WEIGHTS_NAME  # pytorch-fid's cache is reused
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")  # an interrupted download
    with pytest.raises(WeightsError, match=rf"cached FID Inception weights {cached} is empty: .*Delete it and run "
                                           rf"again"):
        resolve_inception_weights(None)
    cached.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(WeightsError, match=r"has sha256 [0-9a-f]{64} \(25 bytes\), not 6726825d.*Delete it"):
        resolve_inception_weights(None)
    monkeypatch.setattr(weights, "FID_WEIGHTS_SHA256_PREFIX", weights.sha256_of(cached)[:8])  # as if standard
    assert resolve_inception_weights(None) == cached


def test_unreadable_weight_files_are_named(inception_pth, tmp_path):
    data = inception_pth.read_bytes()
    files = {"truncated.pth": data[: len(data) // 2], "empty.pth": b"", "text.pth": b"not a pickle",
             "empty.safetensors": b"", "text.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WeightsError, match=rf"Inception weights file {tmp_path}/{name} cannot be read .*"
                                               rf"truncated, corrupt or not a weight file.*{FID_WEIGHTS_NAME}"):
            read_inception_weights(tmp_path / name)
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="list.pth cannot be read .*holds a list, not a state dict"):
        read_inception_weights(tmp_path / "list.pth")


def test_converted_copy_keeps_the_weights_identity(inception_pth, inception_safetensors, tmp_path):
    from msd_lora.eval.weights import describe_weights, sha256_of
    from tools.eval.convert_inception_weights import main

    assert main([str(inception_pth), str(tmp_path / "copy.safetensors")]) == 0
    assert main([str(tmp_path / "copy.safetensors"), str(tmp_path / "copy2.safetensors")]) == 0  # copy of a copy
    original = describe_weights(inception_pth, read_inception_weights(inception_pth)[1])
    assert original == {"file": str(inception_pth), "sha256": sha256_of(inception_pth), "random_init": False,
                        "standard": False}  # random values, but not marked: not the standard weights either
    for copy in ("copy.safetensors", "copy2.safetensors"):
        described = describe_weights(tmp_path / copy, read_inception_weights(tmp_path / copy)[1])
        assert described["sha256"] == original["sha256"] and not described["random_init"]
    assert main([str(inception_safetensors), str(tmp_path / "random.safetensors")]) == 0
    random_copy = tmp_path / "random.safetensors"
    marked = describe_weights(random_copy, read_inception_weights(random_copy)[1])
    assert marked["random_init"] and marked["sha256"] == sha256_of(inception_safetensors)


@pytest.mark.parametrize("device", ["gpu", "cuda", "cuda:1"])
def test_cuda_device_without_a_gpu_is_a_clear_error(device, monkeypatch):
    from msd_lora.backends.torch.clip_score import TorchClipEmbedder

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for build in (lambda: TorchInceptionFeatures({}, "x", device), lambda: TorchClipEmbedder({}, {}, "x", device)):
        with pytest.raises(ValueError, match=rf"device '{device}' was asked for, but torch sees no CUDA GPU"):
            build()
    with pytest.raises(ValueError, match="device 'tpu0' is not a torch device"):
        TorchInceptionFeatures({}, "x", "tpu0")


def test_converter_writes_a_safetensors_copy(inception_pth, tmp_path, capsys):
    from tools.eval.convert_inception_weights import main

    target = tmp_path / "fid_inception.safetensors"
    assert main([str(inception_pth), str(target)]) == 0
    original, _ = read_inception_weights(inception_pth)
    copy, metadata = read_inception_weights(target)
    assert metadata["source"] == inception_pth.name and len(metadata["source_sha256"]) == 64
    assert all(np.array_equal(original[k], copy[k]) for k in original) and copy.keys() == original.keys()
    assert main([str(tmp_path / "missing.pth"), str(target)]) == 2
    assert "missing.pth not found" in capsys.readouterr().err
