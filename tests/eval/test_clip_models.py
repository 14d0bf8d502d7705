"""CLIP score through transformers' CLIPModel (random weights, ViT-L/14's structure at reduced width) equals a hand
computation; images pair with prompts in text_to_image.py's order; model-folder errors name the missing file."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from msd_lora.errors import (
    PairingError,
    WeightsError,
)
from msd_lora.eval.clip_eval import ClipScorer
from msd_lora.eval.clip_model import load_clip_files, resolve_clip_folder
from tests.eval.conftest import write_images

OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711])
PROMPTS = ["a red circle on a blue background", "a yellow square in sks style"]


def hand_clip_scores(folder, files, prompts_of_images):
    """Independent of msd_lora.eval: PIL bicubic to 224 (square images), CLIP's mean/std, the towers' pooled
    outputs times the projection matrices in numpy, cosine, 100 * max(cos, 0)."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    pixels = np.stack([((np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BICUBIC)) / 255.0
                         - OPENAI_MEAN) / OPENAI_STD).transpose(2, 0, 1) for f in files]).astype(np.float32)
    ids = tokenizer(prompts_of_images, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        pooled_image = model.vision_model(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
        pooled_text = model.text_model(**ids).pooler_output.numpy()
    image = pooled_image.astype(np.float64) @ model.visual_projection.weight.detach().numpy().T.astype(np.float64)
    text = pooled_text.astype(np.float64) @ model.text_projection.weight.detach().numpy().T.astype(np.float64)
    cos = (image * text).sum(1) / np.linalg.norm(image, axis=1) / np.linalg.norm(text, axis=1)
    return 100 * np.maximum(cos, 0)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """A folder shaped like text_to_image.py's output: 2 prompts x n_iter 2 x n_samples 2, with samples.jsonl."""
    out = tmp_path_factory.mktemp("t2i")
    write_images(out / "samples", 8, seed=5, tint=(1.0, 0.9, 0.7), size=40)
    rows = [{"file": f"samples/{i:05d}.png", "prompt": PROMPTS[i // 4], "prompt_index": i // 4,
             "iteration": (i // 2) % 2} for i in range(8)]
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def torch_scorer(random_clip):
    return ClipScorer("pt", ckpt_path=str(random_clip), batch_size=3, device="cpu", progress=False)


def test_clip_score_equals_hand_computation(torch_scorer, random_clip, sample_run):
    result = torch_scorer.score(sample_run, PROMPTS, images_per_prompt=4)
    files = sorted((sample_run / "samples").glob("*.png"))
    want = hand_clip_scores(random_clip, files, [PROMPTS[i // 4] for i in range(8)])
    got = np.array([r["clip_score"] for r in result["records"]])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert result["clip_score"] == pytest.approx(want.mean(), rel=1e-5)
    assert any("randomly initialised" in n for n in result["notes"])


def test_grouping_with_n_iter_follows_the_sampling_order(torch_scorer, sample_run):
    result = torch_scorer.score(sample_run, PROMPTS, images_per_prompt=4)
    assert [r["prompt_index"] for r in result["records"]] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [r["file"][-9:] for r in result["records"]] == [f"{i:05d}.png" for i in range(8)]
    assert any("pairing checked against" in n for n in result["notes"])
    with pytest.raises(PairingError, match="found 8 images but 2 prompts x 3 images per prompt"):
        torch_scorer.score(sample_run, PROMPTS, images_per_prompt=3)
    with pytest.raises(PairingError, match="records 'a red circle"):
        torch_scorer.score(sample_run, PROMPTS[::-1])


def test_model_folder_errors_name_the_file(random_clip, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants

    broken = tmp_path / "clip"
    shutil.copytree(random_clip, broken)
    (broken / "preprocessor_config.json").unlink()
    (broken / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="clip is missing preprocessor_config.json, model.safetensors"):
        load_clip_files(broken)
    with pytest.raises(WeightsError, match="CLIP model folder .*nowhere not found"):
        resolve_clip_folder(tmp_path / "nowhere")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))  # not the user's
    with pytest.raises(WeightsError, match="not in the Hugging Face cache and downloads are off"):
        resolve_clip_folder(None, "openai/clip-vit-large-patch14")


def fake_hub(monkeypatch, folder, etag: str):
    """snapshot_download: nothing cached, `folder` when downloading; the Hub's metadata answers `etag`."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **_):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url: type("Meta", (), {"etag": etag}))


def test_download_says_what_was_verified(random_clip, monkeypatch, capsys):
    from msd_lora.eval.weights import sha256_of

    digest = sha256_of(random_clip / "model.safetensors")
    fake_hub(monkeypatch, random_clip, f'"{digest}"')
    assert resolve_clip_folder(None, "someone/tiny-clip", download=True) == random_clip
    err = capsys.readouterr().err
    assert "downloading CLIP model someone/tiny-clip from the Hugging Face Hub" in err and "1.7 GB" not in err
    size = (random_clip / "model.safetensors").stat().st_size / 1e6
    assert f"model.safetensors: {size:.1f} MB, sha256 {digest} verified against the hub" in err
    fake_hub(monkeypatch, random_clip, '"W/abc123"')  # not an LFS file: the etag is no sha256
    resolve_clip_folder(None, "someone/tiny-clip", download=True)
    err = capsys.readouterr().err
    assert f"sha256 {digest} not verifiable (no sha256 from the hub)" in err and "verified" not in err
    fake_hub(monkeypatch, random_clip, "0" * 64)
    with pytest.raises(WeightsError, match=f"sha256 {digest} differs from the Hub's {'0' * 64}; delete it"):
        resolve_clip_folder(None, "someone/tiny-clip", download=True)


def test_tokenizer_without_max_length_is_capped_at_the_text_positions(random_clip, tmp_path):
    import shutil

    folder = tmp_path / "clip"
    shutil.copytree(random_clip, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["model_max_length"]  # transformers then assumes 1e30
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    scorer = ClipScorer("pt", ckpt_path=str(folder), device="cpu", progress=False)
    assert scorer.tokenizer.model_max_length > 1e20 and scorer.max_length == 77
    images = write_images(tmp_path / "images", 2, seed=6, tint=(1, 1, 1), size=24)
    result = scorer.score(images, ["a cat " * 100])
    assert result["num_images"] == 2 and "1 prompt(s) longer than 77 tokens were truncated" in result["notes"]


def test_pairing_follows_numeric_order_past_five_digits(torch_scorer, tmp_path):
    """From 100,000 images on, text_to_image.py's names get a sixth digit; 100000.png still follows 99999.png."""
    numbers = (99998, 99999, 100000, 100001)
    write_images(tmp_path / "samples", 4, seed=7, tint=(1, 1, 1), size=16)
    for i, n in enumerate(numbers):
        (tmp_path / "samples" / f"{i:05d}.png").rename(tmp_path / "samples" / f"{n:05d}.png")
    rows = [{"file": f"samples/{n:05d}.png", "prompt": PROMPTS[i // 2]} for i, n in enumerate(numbers)]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = torch_scorer.score(tmp_path, PROMPTS, images_per_prompt=2)  # checked against samples.jsonl
    assert [r["file"].rsplit("/", 1)[1] for r in result["records"]] == [f"{n:05d}.png" for n in numbers]
    assert [r["prompt"] for r in result["records"]] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2


def test_torch_clip_is_built_without_random_init(random_clip, monkeypatch):
    """The weights come from the file: transformers' _init_weights must not run first (ViT-L/14: slow, twice the
    memory)."""
    from transformers.models.clip.modeling_clip import CLIPPreTrainedModel

    from msd_lora.backends.torch.clip_score import TorchClipEmbedder

    calls = []
    monkeypatch.setattr(CLIPPreTrainedModel, "_init_weights", lambda self, module: calls.append(module))
    files = load_clip_files(random_clip)
    embedder = TorchClipEmbedder(files.config, dict(files.state), str(random_clip), "cpu")
    assert calls == []
    want = load_clip_files(random_clip).state["visual_projection.weight"]
    np.testing.assert_array_equal(embedder.model.visual_projection.weight.detach().numpy(), want)


def test_parameter_list_matches_full_size_vit_l14():
    """The random CLIP writer's parameter list is transformers' at ViT-L/14's real widths too (meta device: no
    memory, no compute)."""
    from transformers import CLIPConfig, CLIPModel

    from msd_lora.eval.random_clip import clip_state_shapes

    config = {"projection_dim": 768,
              "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                              "num_hidden_layers": 12, "vocab_size": 49408, "max_position_embeddings": 77},
              "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                "num_hidden_layers": 24, "image_size": 224, "patch_size": 14}}
    with torch.device("meta"):
        model = CLIPModel(CLIPConfig.from_dict(config))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert clip_state_shapes(config) == want
    assert sum(np.prod(s) for s in want.values()) > 4e8  # ViT-L/14: 428M parameters
