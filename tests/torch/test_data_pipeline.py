"""The data pipeline inside real torch training runs on the tiny model: caches, workers, buckets, long captions."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msd_lora.backends.probe import probe_for
from msd_lora.config import load_train_config
from msd_lora.lora.core import to_tensors
from msd_lora.lora.formats import read_lora
from msd_lora.models.model_config import load_model_config
from msd_lora.tokenizer import PromptTokenizer
from msd_lora.train import Trainer
from msd_lora.train_inputs import CacheSettings, TrainingInputs
from tests.conftest import REPO, TINY_DATA, TINY_MODEL, tiny_args

SIZES = [(32, 32), (48, 32), (32, 48), (64, 24), (24, 64), (40, 32), (36, 36), (56, 28)]
BUCKETS = ("--enable_bucket", "True", "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps", "8")


def kohya_copy(folder: Path, sizes=SIZES) -> Path:
    """The tiny dataset's first images as a kohya folder (3 repeats), resized to several aspect ratios."""
    with open(TINY_DATA / "img_txt.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    target = folder / "3_sks style"
    target.mkdir(parents=True)
    for row, size in zip(rows, sizes):
        stem = Path(row["dir"]).stem
        Image.open(TINY_DATA / row["dir"]).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(
            target / f"{stem}.png")
        (target / f"{stem}.txt").write_text(row["text"])
    return folder


def make(tmp_path: Path, name: str, *extra: str) -> Trainer:
    cfg = load_train_config(tiny_args(tmp_path / name, "--data_path", str(tmp_path / "data"), "--train_batch_size",
                                      "2", "--validation_steps", "2", *BUCKETS, *extra))
    return Trainer(cfg, show_progress=False)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return kohya_copy(tmp_path / "data")


def losses(run_folder: Path) -> list[float]:
    with open(run_folder / "train_log.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_cached_and_uncached_runs_train_alike(tmp_path: Path, data: Path) -> None:
    """Buckets, flips and caption dropout on: the caches hold the posterior and the text states, so every step sees
    the same numbers (up to the VAE's batch composition) and the losses agree step by step."""
    common = ("--flip", "True", "--caption_dropout_rate", "0.3", "--max_train_steps", "8")
    plain = make(tmp_path, "plain", *common)
    cached = make(tmp_path, "cached", *common, "--cache_latents", "True", "--cache_text_embeddings", "True")
    assert len(plain.dataset.buckets) >= 4
    for step in (0, 5, 11):
        a, b = plain.micro_batch(step), cached.micro_batch(step)
        np.testing.assert_allclose(b.latent_mean, a.latent_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.latent_std, a.latent_std, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.context, a.context, rtol=1e-5, atol=1e-5)
        assert np.array_equal(a.noise, b.noise) and np.array_equal(a.timesteps, b.timesteps)
    plain.run()
    cached.run()
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(tmp_path / "plain"), rtol=1e-4)
    buckets = (tmp_path / "cached" / "buckets.json").read_text()
    assert '"enable_bucket": true' in buckets and '"with_repeats": 3' in buckets


def test_disk_cache_invalidates_exactly_what_changed(tmp_path: Path, data: Path) -> None:
    args = ("--cache_latents", "True", "--cache_text_embeddings", "True", "--cache_to_disk", "True", "--cache_dir",
            str(tmp_path / "cache"), "--flip", "True")
    trainer = make(tmp_path, "a", *args)
    distinct = len(set(trainer.dataset.captions))
    assert trainer.inputs.fill_caches(lambda what, total: lambda n: None) == \
        {"latents": (0, 16), "text": (0, distinct)}  # 8 images x 2 flips
    assert make(tmp_path, "b", *args).inputs.fill_caches(lambda what, total: lambda n: None) == \
        {"latents": (16, 0), "text": (distinct, 0)}
    changed = next((data / "3_sks style").glob("*.png"))
    Image.open(changed).transpose(Image.Transpose.ROTATE_180).save(changed)
    (data / "3_sks style" / f"{changed.stem}.txt").write_text("a new caption in sks style")
    changed_run = make(tmp_path, "c", *args)
    assert changed_run.inputs.fill_caches(lambda what, total: lambda n: None) == \
        {"latents": (14, 2), "text": (len(set(changed_run.dataset.captions)) - 1, 1)}
    # another VAE (one weight changed): no entry of the first model is read
    trainer = make(tmp_path, "d", *args)
    other = CacheSettings(latents=True, folder=str(tmp_path / "cache"), vae_identity="another-vae")
    inputs = TrainingInputs(trainer.dataset, trainer.order, trainer.captions, trainer.tokenizer, trainer.backend,
                            trainer.info, trainer.schedule, 42, caches=other)
    assert inputs.fill_caches(lambda what, total: lambda n: None) == {"latents": (0, 16)}


def test_worker_count_does_not_change_the_lora(tmp_path: Path, data: Path) -> None:
    common = ("--random_crop", "True", "--flip", "True", "--shuffle_caption", "True", "--caption_dropout_rate", "0.2",
              "--max_train_steps", "6")
    results = [make(tmp_path, f"w{n}", *common, "--dataloader_num_workers", str(n)).run() for n in (0, 2)]
    weights = [to_tensors(read_lora(r.lora_path).weights) for r in results]
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_resume_inside_an_epoch_with_buckets_is_exact(tmp_path: Path, data: Path) -> None:
    common = ("--max_train_steps", "10", "--ckpt_save_interval", "3", "--step_mode", "True")
    whole = make(tmp_path, "whole", *common).run()
    part = make(tmp_path, "part", *common)
    part.plan = type(part.plan)(part.plan.micro_steps_per_epoch, part.plan.accumulation, 6)  # stop after step 6
    part.run()
    resumed = Trainer(load_train_config(tiny_args(tmp_path / "part", "--data_path", str(data), "--train_batch_size",
                                                  "2", "--validation_steps", "2", *BUCKETS, *common, "--resume",
                                                  "True")), show_progress=False).run()
    assert part.plan.micro_steps_per_epoch == 14  # 5 buckets, ceil(n / 2) batches each: step 6 is inside epoch 0
    a, b = to_tensors(read_lora(whole.lora_path).weights), to_tensors(read_lora(resumed.lora_path).weights)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_long_captions_are_chunked_or_truncated_with_a_note(tmp_path: Path, data: Path) -> None:
    tokenizer = PromptTokenizer(TINY_MODEL / "tokenizer")
    words = [w for w in "a red circle on blue green square yellow triangle".split() if tokenizer.token_counts([w]) == [1]]
    long = " ".join(words[i % len(words)] for i in range(200))
    assert tokenizer.token_counts([long]) == [200]
    caption_file = next((data / "3_sks style").glob("*.txt"))
    caption_file.write_text(long)
    short = make(tmp_path, "short")
    assert any(re.search(r"warning: 1 of \d+ captions are longer than max_token_length 75 tokens \(the longest has "
                         r"200\).*max_token_length 225", n) for n in short.notes), short.notes
    wide = make(tmp_path, "wide", "--max_token_length", "225")
    assert not any("longer than max_token_length" in n for n in wide.notes)
    ids = wide.tokenizer([long])
    assert ids.shape == (1, 231) and wide.tokenizer.token_counts([long]) == [200]
    states = wide.backend.encode_text(ids)
    assert states.shape[:2] == (1, 227)
    # the first chunk's states equal a plain 77-token encoding of the caption's first 75 tokens
    first = short.backend.encode_text(short.tokenizer([long]))
    np.testing.assert_allclose(states[:, :76], first[:, :76], rtol=1e-5, atol=1e-6)
    batch = wide.micro_batch(0)
    assert batch.context.shape[1] == 227 and np.isfinite(probe_for(wide.backend).loss(batch))


MINDONE = (("v1", "v1-inference.yaml", "epsilon", 200), ("v2", "v2-inference.yaml", "epsilon", 200),
           ("v2_vpred", "v2-inference-v.yaml", "v_prediction", 256))


@pytest.mark.parametrize("name,ours,prediction,filter_size", MINDONE)
def test_mindone_lora_configs_train_through_the_cli(tmp_path: Path, name, ours, prediction, filter_size) -> None:
    """mindone's shipped LoRA yamls with only their paths changed load as they are (num_workers, image_filter_size,
    mode, decay_steps, mindone's model-config names). The embedded tiny model is not SD-sized, so the run through the
    CLI adds the tiny model's own architecture, size and rank as flags."""
    text = (REPO / "tests" / "fixtures" / "mindone" / f"train_config_lora_{name}.yaml").read_text()
    text = text.replace('"/path/to/data"', f'"{TINY_DATA}"').replace(
        '"/path/to/pretrained_model"', f'"{TINY_MODEL}"').replace('"/path/to/save/output_data"', f'"{tmp_path / "o"}"')
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    cfg = load_train_config(["--train_config", str(path)])
    assert (cfg.dataloader_num_workers, cfg.min_image_size, cfg.mode, cfg.decay_steps) == (1, filter_size, 0, 0)
    model_config = load_model_config(cfg.model_config)
    assert Path(model_config.path).name == ours and model_config.prediction_type == prediction
    assert "mindone's" in model_config.note
    out = subprocess.run(
        [sys.executable, "train_text_to_image.py", "--train_config", str(path), "--model_config",
         "configs/model/tiny.yaml", "--image_size", "32", "--image_filter_size", "0", "--lora_rank", "4",
         "--max_train_steps", "2", "--validation_steps", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "o" / "lora.safetensors").is_file()


def test_sampling_warns_on_truncation_and_takes_long_prompts() -> None:
    import warnings

    from msd_lora.backends.base import BackendOptions
    from msd_lora.sample import SamplingOptions, generate, load_pipeline

    pipeline, _ = load_pipeline(TINY_MODEL, None, "torch", BackendOptions(device="cpu"))
    words = "a red circle on blue green square yellow".split()
    prompt = " ".join(words[i % len(words)] for i in range(120))
    options = SamplingOptions(steps=2, height=32, width=32, n_samples=1)
    with pytest.warns(UserWarning, match=r"prompt of \d+ tokens truncated to max_token_length 75.*150 or 225"):
        short = generate(pipeline, prompt, 1, options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = generate(pipeline, prompt, 1, SamplingOptions(steps=2, height=32, width=32, n_samples=1,
                                                             max_token_length=225))
    assert short.shape == full.shape == (1, 32, 32, 3) and not np.array_equal(short, full)
