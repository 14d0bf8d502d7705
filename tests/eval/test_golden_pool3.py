"""Our FID InceptionV3 (torch and MindSpore) against pool3 features computed by pytorch-fid itself, stored in a
committed golden file, so the main environment checks the network without the cross-check venv (.venv-xcheck).

The golden file was written by pytorch-fid's own pipeline (PNG files -> `get_activations`, dims 2048, cpu) with the
randomly initialised weights `inception_arch.random_state(0)` in place of its download:

    PYTHONPATH=/work/main .venv-xcheck/bin/python tests/eval/make_golden_pool3.py tests/eval/golden/pool3_pytorch_fid.npz

It guards what pytorch-fid fixes and our code reimplements: the pooling layers (max vs average, average pools that
exclude padding, the final global average), padding, the bilinear resize to 299x299 (square and non-square inputs)
and the [-1, 1] input normalisation. A missing backend fails these tests; it does not skip them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

GOLDEN = Path(__file__).parent / "golden" / "pool3_pytorch_fid.npz"
FEATURE_RTOL = 1e-4  # a whole network in float32, on another implementation


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> dict:
    """The golden features, and a folder holding the golden images as PNGs in the same order."""
    folder = tmp_path_factory.mktemp("golden_images")
    with np.load(GOLDEN, allow_pickle=False) as npz:
        features, about = npz["features"], str(npz["about"])
        count = sum(name.startswith("image_") for name in npz.files)
        for i in range(count):
            Image.fromarray(npz[f"image_{i}"]).save(folder / f"image_{i:02d}.png")
    assert features.shape == (count, 2048) and count >= 2, (features.shape, count)
    return {"features": features, "about": about, "folder": folder}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """The golden file's weights: random_state(0), as our safetensors."""
    from msd_lora.eval.weights import write_random_inception

    return str(write_random_inception(tmp_path_factory.mktemp("golden_weights") / "inception_seed0.safetensors", 0))


def check_against_golden(evaluator, golden: dict) -> None:
    got = evaluator.folder_features(golden["folder"], "golden").features
    assert got.shape == golden["features"].shape
    err = rel_err(got, golden["features"])
    assert err <= FEATURE_RTOL, f"{evaluator.backend}: max relative error {err:.3g} > {FEATURE_RTOL} vs {golden['about']}"


def test_torch_inception_matches_pytorch_fid_golden(golden, weights):
    from msd_lora.eval.fid import FidEvaluator

    check_against_golden(FidEvaluator("pt", weights, "bilinear", device="cpu", progress=False), golden)


def test_mindspore_inception_matches_pytorch_fid_golden(golden, weights):
    """PyNative mode (ms_mode=1): the same features as GRAPH mode (tests/eval/test_mindspore.py) without a compile."""
    import mindspore as ms

    from msd_lora.eval.fid import FidEvaluator

    mode = ms.get_context("mode")
    try:
        check_against_golden(FidEvaluator("ms", weights, "bilinear", ms_mode=1, progress=False), golden)
    finally:
        ms.set_context(mode=mode)
