"""The MindSpore feature networks agree with the torch ones on the same weight files: our InceptionV3 after our name
conversion (features, 1e-4 relative) and mindone's CLIPModel after the gamma/beta/embedding_table map."""
from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
pytest.importorskip("mindone")
torch = pytest.importorskip("torch")

from msd_lora.errors import StateDictError
from msd_lora.eval import inception_arch as arch
from msd_lora.eval.images import find_images, read_rgb
from msd_lora.eval.preprocess import inception_input
from msd_lora.eval.weights import read_inception_weights

RTOL = 1e-4  # a whole network in float32


@pytest.fixture(autouse=True, scope="module")
def restore_execution_mode():
    """Most tests run in PYNATIVE mode (no graph compile for 2 images), one in GRAPH mode (the CLI's default
    --ms_mode 0); later test modules get their mode back."""
    mode = ms.get_context("mode")
    yield
    ms.set_context(mode=mode)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def inception_case(inception_pth, image_sets):
    """(weights, network input of 2 images, torch's features of it)."""
    from msd_lora.backends.torch.inception import TorchInceptionFeatures

    state, _ = read_inception_weights(inception_pth)
    files = find_images(image_sets["real"]).files[:2]
    x = inception_input([read_rgb(f)[0] for f in files], "bilinear")
    return state, x, TorchInceptionFeatures(state, "pth", "cpu")(x)


def test_inception_features_agree_across_backends(inception_case):
    from msd_lora.backends.mindspore.inception import MindSporeInceptionFeatures

    state, x, want = inception_case
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


def test_graph_mode_agrees_with_torch(inception_case, random_clip):
    """--ms_mode 0 (GRAPH, the CLI default), 2 small inputs: Inception features, and CLIP scores through the embedders
    of a 2-layer CLIP (the graph compile of the 36-layer test CLIP alone would cost ~10 s)."""
    from transformers import CLIPTokenizer

    from msd_lora.backends.mindspore.clip_score import MindSporeClipEmbedder
    from msd_lora.backends.mindspore.inception import MindSporeInceptionFeatures
    from msd_lora.backends.torch.clip_score import TorchClipEmbedder
    from msd_lora.eval.clip_score import clip_scores
    from msd_lora.eval.random_clip import random_clip_config, random_clip_state

    state, x, want = inception_case
    got = MindSporeInceptionFeatures(state, "pth", mode=0)(x)
    assert ms.get_context("mode") == ms.GRAPH_MODE
    assert rel_err(got, want) <= RTOL

    config = random_clip_config(random_clip)
    config["text_config"]["num_hidden_layers"] = config["vision_config"]["num_hidden_layers"] = 2
    tokens = CLIPTokenizer.from_pretrained(str(random_clip))(["a red circle", "a blue square"], padding="max_length",
                                                              max_length=77, return_tensors="np")
    pixels = np.random.default_rng(1).normal(size=(2, 3, 224, 224)).astype(np.float32)
    scores = []
    for embedder in (MindSporeClipEmbedder(config, random_clip_state(config, seed=3), "random", mode=0),
                     TorchClipEmbedder(config, random_clip_state(config, seed=3), "random", "cpu")):
        text = embedder.text_embeddings(tokens.input_ids, tokens.attention_mask)
        scores.append(clip_scores(embedder.image_embeddings(pixels), text))
    assert ms.get_context("mode") == ms.GRAPH_MODE
    assert scores[1].min() > 0 and rel_err(*scores) <= RTOL
