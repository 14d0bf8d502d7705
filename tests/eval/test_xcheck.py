"""Cross-checks against the reference tools (pytorch-fid, torchmetrics, clean-fid) run in the separate
environment .venv-xcheck (`make xcheck-env`; they need torchvision, which must stay out of .venv). Same randomly
initialised weight file (pytorch-fid's layout, .pth) and same images on both sides; skipped when that environment
is absent."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from msd_lora.eval.frechet import feature_statistics, frechet_distance, gaussian_distance
from msd_lora.eval.images import find_images, read_rgb
from msd_lora.eval.preprocess import resize_pil_float
from tests.conftest import XCHECK_READY
from tests.eval.conftest import XCHECK_PYTHON

pytestmark = pytest.mark.skipif(not XCHECK_READY.exists(), reason=(
    f"cross-check environment {XCHECK_PYTHON.parent.parent.name} not found: `make xcheck-env` builds it "
    f"(pytorch-fid, clean-fid, torchmetrics, torch 2.14.1 + torchvision 0.29.1; about 1-2 minutes, 5.8 GB)"))
FID_RTOL = 1e-3  # the acceptance bound; the observed agreement is reported by the assertions' numbers
FEATURE_RTOL = 1e-4


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def reference(image_sets, inception_pth, tmp_path_factory):
    root = tmp_path_factory.mktemp("xcheck")
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(300, 64)), rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.2
    stats = {"mu1": a.mean(0), "sigma1": np.cov(a, rowvar=False), "mu2": b.mean(0), "sigma2": np.cov(b, rowvar=False)}
    np.savez(root / "stats.npz", **stats)
    job = {"weights_pth": str(inception_pth), "real_dir": str(image_sets["real"]), "gen_dir": str(image_sets["gen"]),
           "stats_npz": str(root / "stats.npz")}
    (root / "job.json").write_text(json.dumps(job))
    script = __file__.replace("test_xcheck.py", "xcheck_reference.py")
    done = subprocess.run([str(XCHECK_PYTHON), script, str(root / "job.json"), str(root / "out.npz")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(root / "out.npz") as out:
        return {"stats": stats, **{k: out[k] for k in out.files}}


@pytest.fixture(scope="module")
def ours(inception_pth):
    from msd_lora.eval.fid import FidEvaluator

    return {resize: FidEvaluator("pt", str(inception_pth), resize, device="cpu", progress=False)
            for resize in ("bilinear", "pil_bilinear")}


def test_xcheck_features_and_fid_equal_pytorch_fids(reference, ours, image_sets):
    evaluator = ours["bilinear"]
    real = evaluator.folder_features(image_sets["real"], "real").features
    gen = evaluator.folder_features(image_sets["gen"], "gen").features
    assert rel_err(real, reference["pytorch_fid_real"]) <= FEATURE_RTOL
    assert rel_err(gen, reference["pytorch_fid_gen"]) <= FEATURE_RTOL
    fid = gaussian_distance(feature_statistics(real), feature_statistics(gen))
    assert fid == pytest.approx(float(reference["pytorch_fid_fid"]), rel=FID_RTOL)


def test_xcheck_pil_bilinear_fid_equals_torchmetrics(reference, ours, image_sets):
    evaluator = ours["pil_bilinear"]
    real = evaluator.folder_features(image_sets["real"], "real").features
    gen = evaluator.folder_features(image_sets["gen"], "gen").features
    assert rel_err(real, reference["torchmetrics_real"]) <= FEATURE_RTOL
    fid = gaussian_distance(feature_statistics(real), feature_statistics(gen))
    assert fid == pytest.approx(float(reference["torchmetrics_fid"]), rel=FID_RTOL)


def test_xcheck_pil_bicubic_resize_equals_clean_fids(reference, image_sets):
    ours = np.stack([resize_pil_float(read_rgb(f)[0], 299, "bicubic") for f in find_images(image_sets["real"]).files])
    np.testing.assert_allclose(ours, reference["clean_fid_resized"], atol=1e-3)  # grey levels, of 255


def test_xcheck_frechet_maths_equals_pytorch_fid_and_torchmetrics(reference):
    s = reference["stats"]
    ours = frechet_distance(s["mu1"], s["sigma1"], s["mu2"], s["sigma2"])
    assert ours == pytest.approx(float(reference["maths_pytorch_fid"]), rel=1e-6)
    assert ours == pytest.approx(float(reference["maths_torchmetrics"]), rel=1e-6)
