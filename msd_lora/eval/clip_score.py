"""CLIP score arithmetic and the pairing of images with prompts.

    CLIPScore(image, prompt) = 100 * max(cos(E_image, E_text), 0)

E are CLIP's projected embeddings (`get_image_features` / `get_text_features`); the cosine is taken in float64.
The clamp is per pair, as in the CLIPScore paper (Hessel et al. 2021, with w = 100 instead of 2.5): a pair whose
cosine is negative counts 0, and the reported score is the mean over pairs. torchmetrics' CLIPScore instead clamps
the mean (max(mean(100 cos), 0)); the two agree whenever no pair is negative, which is the case for real CLIP
models on real prompts.

Images pair with prompts in the order text_to_image.py writes them: prompt p owns images
[p*k, (p+1)*k) with k = n_iter * n_samples.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from msd_lora.data.prompts import read_prompts_file
from msd_lora.errors import PairingError


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (N, D) arrays, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def clip_scores(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Per-pair 100 * max(cos, 0)."""
    return 100.0 * np.maximum(cosine_similarity(image_embeds, text_embeds), 0.0)


def read_prompts(prompt_or_path: str) -> list[str]:
    """A .txt file (one prompt per non-empty line, as text_to_image.py --data_path reads it) or one prompt."""
    path = Path(prompt_or_path)
    if path.suffix == ".txt" or path.is_file():
        return read_prompts_file(path, error=PairingError)
    if not prompt_or_path.strip():
        raise PairingError("the prompt is empty")
    return [prompt_or_path]


def prompts_per_image(n_images: int, prompts: list[str], images_per_prompt: int | None = None) -> list[str]:
    """The prompt of each image: k consecutive images per prompt, k = images_per_prompt (n_iter * n_samples) or,
    when not given, n_images / len(prompts) (which must divide evenly)."""
    if images_per_prompt is None:
        if n_images % len(prompts):
            raise PairingError(f"{n_images} images do not split evenly over {len(prompts)} prompts: expected "
                               f"n_iter*n_samples consecutive images per prompt, in prompt order")
        images_per_prompt = n_images // len(prompts)
    if images_per_prompt < 1 or n_images != len(prompts) * images_per_prompt:
        raise PairingError(f"found {n_images} images but {len(prompts)} prompts x {images_per_prompt} images per "
                           f"prompt (n_iter*n_samples) = {len(prompts) * images_per_prompt}: evaluate the folder "
                           f"text_to_image.py wrote for exactly these prompts")
    return [prompt for prompt in prompts for _ in range(images_per_prompt)]


def prompts_from_index(index_path: Path, files: list[Path]) -> list[str]:
    """The prompt of each file from text_to_image.py's samples.jsonl; every file must be listed there."""
    recorded = {}
    for line in index_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            recorded[(index_path.parent / entry["file"]).resolve()] = entry["prompt"]
    unlisted = [f for f in files if f.resolve() not in recorded]
    if unlisted:
        raise PairingError(f"{len(unlisted)} image(s) are not listed in {index_path}, e.g. {unlisted[0]}")
    return [recorded[f.resolve()] for f in files]


def check_against_index(expected: list[str], recorded: list[str], index_path: Path) -> None:
    """The prompt order derived from the prompts file must be the one samples.jsonl recorded."""
    for i, (want, got) in enumerate(zip(expected, recorded)):
        if want != got:
            raise PairingError(f"image {i}: the prompts file gives {want!r} but {index_path} records {got!r}; "
                               f"the images were sampled from other prompts or in another order")
