"""The embedded tiny Stable Diffusion: it draws what it is asked for, and it regenerates deterministically."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tools.tiny_model.synthetic import COLOURS, SHAPES, describe_colours


def test_samples_follow_the_prompted_colours(tiny_model):
    from msd_lora.backends.base import BackendOptions
    from msd_lora.sample import SamplingOptions, generate, load_pipeline

    pipeline, _ = load_pipeline(tiny_model, REPO / "configs/model/tiny.yaml", "torch", BackendOptions(device="cpu"))
    options = SamplingOptions(steps=20, guidance_scale=5.0, height=32, width=32, seed=123)
    names = list(COLOURS)
    shape_hits = background_hits = total = 0
    for i, colour in enumerate(names):
        background = names[(i + 3) % len(names)]
        prompt = f"a {colour} {SHAPES[i % len(SHAPES)]} on a {background} background"
        for image in generate(pipeline, prompt, 5, options, i):
            got_shape, got_background = describe_colours(image)
            shape_hits += got_shape == colour
            background_hits += got_background == background
            total += 1
    assert shape_hits / total >= 0.9, f"shape colour right in {shape_hits}/{total}"
    assert background_hits / total >= 0.9, f"background colour right in {background_hits}/{total}"


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "pretrain_summary.json"}  # has wall time


def test_make_tiny_model_is_deterministic(tmp_path):
    """Two short regenerations with one seed give byte-identical weights, tokenizer and dataset."""
    def build(name: str) -> tuple[dict, dict]:
        out, data = tmp_path / name / "model", tmp_path / name / "data"
        subprocess.run([sys.executable, str(REPO / "tools/make_tiny_model.py"), "--out", str(out),
                        "--data_out", str(data), "--log", str(tmp_path / name / "log.csv"), "--vae_steps", "2",
                        "--unet_steps", "2", "--num_scenes", "64", "--batch_size", "4", "--lora_images", "3"],
                       check=True, capture_output=True)
        return _digest(out), _digest(data)

    first, second = build("a"), build("b")
    assert first == second
    assert any(k.endswith("diffusion_pytorch_model.safetensors") for k in first[0])
    assert len(first[1]) == 4  # 3 images + img_txt.csv
