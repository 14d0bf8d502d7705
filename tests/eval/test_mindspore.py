"""The MindSpore feature networks agree with the torch ones on the same weight files: our InceptionV3 after our name
conversion (features, 1e-4 relative) and mindone's CLIPModel after the gamma/beta/embedding_table map."""
from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
pytest.importorskip("mindone")
torch = pytest.importorskip("torch")

from msd_lora.eval import inception_arch as arch  # noqa: E402
from msd_lora.eval.images import find_images, read_rgb  # noqa: E402
from msd_lora.eval.preprocess import inception_input  # noqa: E402
from msd_lora.eval.weights import read_inception_weights  # noqa: E402
from msd_lora.models.state_check import StateDictError  # noqa: E402

RTOL = 1e-4  # a whole network in float32


@pytest.fixture(autouse=True, scope="module")
def restore_execution_mode():
    """These tests run in PYNATIVE mode (no graph compile for 2 images); later test modules get their mode back."""
    mode = ms.get_context("mode")
    yield
    ms.set_context(mode=mode)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_inception_features_agree_across_backends(inception_pth, image_sets):
    from msd_lora.backends.mindspore.inception import MindSporeInceptionFeatures
    from msd_lora.backends.torch.inception import TorchInceptionFeatures

    state, _ = read_inception_weights(inception_pth)
    files = find_images(image_sets["real"]).files[:2]
    x = inception_input([read_rgb(f)[0] for f in files], "bilinear")
    want = TorchInceptionFeatures(state, "pth", "cpu")(x)
    got = MindSporeInceptionFeatures(state, "pth", mode=1)(x)
    assert got.shape == (2, 2048)
    assert rel_err(got, want) <= RTOL


def test_every_weight_file_name_maps_to_a_mindspore_parameter():
    from msd_lora.backends.mindspore.inception import FidInceptionV3, MindSporeInceptionFeatures, named_parameters

    ms_names = {n: tuple(p.shape) for n, p in named_parameters(FidInceptionV3()).items()}
    assert ms_names == {arch.mindspore_name(n): s for n, s in arch.state_shapes().items()}
    state = arch.random_state(0)
    state["Conv2d_1a_3x3.conv.weight"] = state["Conv2d_1a_3x3.conv.weight"][:16]
    with pytest.raises(StateDictError, match=r"Conv2d_1a_3x3\.conv\.weight: file \(16, 3, 3, 3\), network "
                                             r"\(32, 3, 3, 3\)"):
        MindSporeInceptionFeatures(state, "bad.pth", mode=1)


def test_clip_scores_agree_across_backends(random_clip, image_sets):
    from msd_lora.eval.clip_eval import ClipScorer

    prompts = ["a red circle on a blue background"]
    want = ClipScorer("pt", ckpt_path=str(random_clip), device="cpu", progress=False).score(image_sets["gen"], prompts)
    got = ClipScorer("ms", ckpt_path=str(random_clip), ms_mode=1, progress=False).score(image_sets["gen"], prompts)
    scores = [np.array([r["clip_score"] for r in result["records"]]) for result in (got, want)]
    assert rel_err(*scores) <= RTOL
    assert got["backend"] == "mindspore" and want["backend"] == "torch"
