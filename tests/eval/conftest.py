"""Fixtures for evaluation tests: small image folders, randomly initialised feature networks written in the
standard layouts, and no downloads (MSD_LORA_OFFLINE / HF_HUB_OFFLINE are set for every test)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

XCHECK_PYTHON = REPO / ".venv-xcheck" / "bin" / "python"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("MSD_LORA_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def smooth_image(rng: np.random.Generator, size: int, tint: tuple[float, float, float]) -> np.ndarray:
    """A low-frequency random picture (upsampled 5x5 noise) in a colour cast, uint8 (size, size, 3)."""
    coarse = rng.uniform(0, 1, (5, 5, 3))
    picture = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR))
    return np.clip(picture * np.asarray(tint) + rng.normal(0, 6, picture.shape), 0, 255).astype(np.uint8)


def write_images(folder: Path, count: int, seed: int, tint: tuple[float, float, float], size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(smooth_image(rng, size, tint)).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="session")
def image_sets(tmp_path_factory) -> dict[str, Path]:
    """Two folders of 5 RGB 40x40 PNGs each, with different colour statistics."""
    root = tmp_path_factory.mktemp("images")
    return {"real": write_images(root / "real", 5, seed=1, tint=(1.0, 0.8, 0.6)),
            "gen": write_images(root / "gen", 5, seed=2, tint=(0.6, 0.9, 1.0))}


@pytest.fixture(scope="session")
def random_networks(tmp_path_factory) -> Path:
    """What `make eval` uses, written by the same tool: random InceptionV3 (safetensors) and a random CLIP folder."""
    from tools.eval.make_random_feature_networks import main

    out = tmp_path_factory.mktemp("random_networks")
    assert main(["--output_path", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def inception_safetensors(random_networks) -> Path:
    return random_networks / "inception_random.safetensors"


@pytest.fixture(scope="session")
def random_clip(random_networks) -> Path:
    return random_networks / "clip_random"


@pytest.fixture(scope="session")
def inception_pth(tmp_path_factory) -> Path:
    """The same random weights (seed 0) as a torch .pth in pytorch-fid's layout: a plain state dict."""
    torch = pytest.importorskip("torch")
    from msd_lora.eval.inception_arch import random_state

    path = tmp_path_factory.mktemp("weights_pth") / "pt_inception-random.pth"
    torch.save({k: torch.from_numpy(v) for k, v in random_state(0).items()}, path)
    return path
