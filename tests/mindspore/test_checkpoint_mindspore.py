"""Our numpy-only MindSpore checkpoint reader/writer against mindspore.load_checkpoint / save_checkpoint."""
from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from msd_lora.files import mindspore_ckpt


def sample_tensors():
    rng = np.random.default_rng(0)
    return {"model.diffusion_model.input_blocks.0.0.conv.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
            "model.diffusion_model.out.0.gamma": rng.standard_normal(8).astype(np.float16),
            "cond_stage_model.transformer.embedding_table": rng.standard_normal((50, 16)).astype(np.float32),
            "lora_rank": np.array(4, np.int64), "counts": np.arange(5, dtype=np.int32)}


def test_mindspore_loads_what_we_write_including_sliced_values(tmp_path, monkeypatch):
    tensors = sample_tensors()
    monkeypatch.setattr(mindspore_ckpt, "SLICE_BYTES", 256)  # several values per large parameter, as MindSpore writes
    path = mindspore_ckpt.write_mindspore_ckpt(tmp_path / "ours.ckpt", tensors)
    loaded = ms.load_checkpoint(str(path))
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        got = loaded[name].asnumpy()
        assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value), name


def test_we_read_what_mindspore_writes(tmp_path):
    tensors = sample_tensors()
    params = [{"name": k, "data": ms.Tensor(v)} for k, v in tensors.items() if k != "lora_rank"]
    ms.save_checkpoint(params, str(tmp_path / "theirs.ckpt"), append_dict={"lora_rank": 4, "note": "text is skipped"})
    read = mindspore_ckpt.read_mindspore_ckpt(tmp_path / "theirs.ckpt")
    assert sorted(read) == sorted(tensors)
    for name, value in tensors.items():
        assert read[name].dtype == value.dtype and np.array_equal(read[name], value), name
    ms.save_checkpoint(params, str(tmp_path / "crc.ckpt"), crc_check=True)
    assert np.array_equal(mindspore_ckpt.read_mindspore_ckpt(tmp_path / "crc.ckpt")["counts"], tensors["counts"])
