"""Our torch FID InceptionV3: pytorch-fid's weight layout loads strictly from .pth and .safetensors; weight-file
errors name the file. (Agreement with pytorch-fid itself: test_xcheck.py; with MindSpore: test_mindspore.py.)"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from msd_lora.backends.torch.inception import FidInceptionV3, TorchInceptionFeatures  # noqa: E402
from msd_lora.eval import inception_arch as arch  # noqa: E402
from msd_lora.eval.weights import (FID_WEIGHTS_NAME, FID_WEIGHTS_URL, WeightsError,  # noqa: E402
                                   read_inception_weights, resolve_inception_weights)
from msd_lora.models.state_check import StateDictError  # noqa: E402


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
    (tmp_path / "torch/hub/checkpoints").mkdir(parents=True)
    (tmp_path / "torch/hub/checkpoints" / FID_WEIGHTS_NAME).write_bytes(b"")  # pytorch-fid's cache is reused
    assert resolve_inception_weights(None) == tmp_path / "torch/hub/checkpoints" / FID_WEIGHTS_NAME


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
