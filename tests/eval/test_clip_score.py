"""CLIP-score arithmetic and the pairing of images with prompts (no framework)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from msd_lora.errors import PairingError
from msd_lora.eval.clip_score import (
    check_against_index,
    clip_scores,
    cosine_similarity,
    prompts_from_index,
    prompts_per_image,
    read_prompts,
)


def test_score_is_100_times_clamped_cosine_per_pair():
    images = np.array([[3.0, 4.0], [1.0, 0.0], [1.0, 1.0]])
    texts = np.array([[6.0, 8.0], [-1.0, 0.2], [0.0, 2.0]])
    np.testing.assert_allclose(cosine_similarity(images, texts), [1.0, -1 / np.sqrt(1.04), 1 / np.sqrt(2)])
    np.testing.assert_allclose(clip_scores(images, texts), [100.0, 0.0, 100 / np.sqrt(2)])  # negative -> 0


def test_scale_of_the_embeddings_does_not_matter():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    np.testing.assert_allclose(clip_scores(a * 7.0, b * 0.01), clip_scores(a, b))


def test_grouping_follows_text_to_image_order_with_n_iter():
    prompts = ["a cat", "a dog", "a fox"]
    n_iter, n_samples = 2, 3  # 6 consecutive images per prompt
    paired = prompts_per_image(18, prompts, n_iter * n_samples)
    assert paired == ["a cat"] * 6 + ["a dog"] * 6 + ["a fox"] * 6
    assert prompts_per_image(18, prompts) == paired  # inferred: 18 / 3


def test_count_mismatch_is_a_clear_error():
    with pytest.raises(PairingError, match=r"found 17 images but 3 prompts x 6 images per prompt .* = 18"):
        prompts_per_image(17, ["a", "b", "c"], 6)
    with pytest.raises(PairingError, match="17 images do not split evenly over 3 prompts"):
        prompts_per_image(17, ["a", "b", "c"])


def test_index_written_by_text_to_image_is_checked(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    files = [samples / f"{i:05d}.png" for i in range(4)]
    rows = [{"file": f"samples/{i:05d}.png", "prompt": p, "prompt_index": i // 2, "iteration": i % 2}
            for i, p in enumerate(["a", "a", "b", "b"])]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recorded = prompts_from_index(tmp_path / "samples.jsonl", files)
    check_against_index(prompts_per_image(4, ["a", "b"]), recorded, tmp_path / "samples.jsonl")
    with pytest.raises(PairingError, match="image 0: the prompts file gives 'b' but .* records 'a'"):
        check_against_index(prompts_per_image(4, ["b", "a"]), recorded, tmp_path / "samples.jsonl")
    with pytest.raises(PairingError, match="not listed in"):
        prompts_from_index(tmp_path / "samples.jsonl", files + [samples / "00004.png"])


def test_prompts_from_a_file_or_a_string(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog  \n")
    assert read_prompts(str(path)) == ["a cat", "a dog"]
    assert read_prompts("a photo of a cat") == ["a photo of a cat"]
    with pytest.raises(FileNotFoundError, match="missing.txt not found"):
        read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(PairingError, match="holds no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
