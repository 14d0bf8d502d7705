"""What a new user's probing found, each case run as they ran it: the old input, and what msd-lora does now.

Garbage is refused (exit 2, one line naming flag or key and value) before any model loads; nothing silently
changes the input; no run's results are lost or mixed with another's; tools say what to do; Ctrl-C saves and
says how to resume.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msd_lora.cli.sample import main as sample_main
from msd_lora.cli.train import main as train_main
from tests.conftest import REPO, TINY_MODEL, tiny_args

QUICK = ("--max_train_steps", "2", "--validation_steps", "2", "--validation_prompts", "a red circle")
PROMPT = ["--prompt", "a red circle on a blue background", "--sampling_steps", "3", "--n_samples", "2"]
NO_MODEL = ["--pretrained_model_path", "/nonexistent/model"]  # an error about it would mean the model loaded first


def error_of(main, argv, capsys) -> str:
    capsys.readouterr()  # earlier output is not this call's
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    """A canonical LoRA with large random B, so that every scale visibly changes the images."""
    from msd_lora.backends.base import BackendOptions
    from msd_lora.lora.formats import write_lora
    from msd_lora.lora.spec import LoraSpec, init_lora_weights, select_targets
    from msd_lora.sample import load_pipeline

    pipeline, _ = load_pipeline(TINY_MODEL, None, "torch", BackendOptions(device="cpu"))
    spec = LoraSpec(rank=4, alpha=4.0, targets={"unet": ("to_q", "to_k", "to_v", "to_out.0")})
    shapes = pipeline.backend.layer_shapes()
    weights = init_lora_weights(spec, select_targets(spec, shapes), shapes, seed=1)
    rng = np.random.default_rng(2)
    for layer in weights.values():
        layer.up = (rng.standard_normal(layer.up.shape) * 0.3).astype(np.float32)
    return write_lora(tmp_path_factory.mktemp("lora") / "lora.safetensors", weights)


def sample_pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted((folder / "samples").glob("*.png"))])


# --- garbage accepted, run reported as success ------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--scale", "nan"], r"command line: 'guidance_scale' must be float, got 'nan' \(not a finite number\)"),
    (["--sampling_steps", "0"], r"'steps' is 0; it must be in \[1, 1000\]"),
    (["--n_samples", "0"], r"'n_samples' is 0; it must be in \[1, 256\]"),
    (["--n_samples", "-1"], r"'n_samples' is -1"),
    (["--n_iter", "0"], r"'n_iter' is 0; it must be >= 1"),
    (["--use_lora", "True", "--lora_ckpt_path", "x.safetensors", "--lora_scale", "nan"],
     r"--lora_scale must be a finite number, got 'nan'"),
])
def test_bad_sampling_arguments_are_refused_before_the_model_loads(flags, message, capsys):
    import re

    assert re.search(message, error_of(sample_main, PROMPT + NO_MODEL + flags, capsys))


@pytest.mark.parametrize("flags,message", [
    (["--start_learning_rate", "nan"], "'start_learning_rate' must be float, got 'nan'"),
    (["--end_learning_rate", "inf"], "'end_learning_rate' must be float, got 'inf'"),
    (["--ema_decay", "1.5"], "'ema_decay' is 1.5; it must be in [0, 1]"),
    (["--lora_alpha", "0"], "'lora_alpha' is 0.0; it must be > 0"),
    (["--lora_alpha", "-8"], "'lora_alpha' is -8.0; it must be > 0"),
    (["--validation_sampler", "foo"], "'validation_sampler' is 'foo'; choose one of"),
])
def test_bad_training_values_are_refused_before_training(flags, message, tmp_path, capsys):
    assert message in error_of(train_main, tiny_args(tmp_path / "run", *flags), capsys)
    assert not (tmp_path / "run").exists()


# --- silently changed input -------------------------------------------------------------------------------------
def test_a_lora_path_without_use_lora_is_used(lora_file, tmp_path, capsys):
    """--lora_ckpt_path alone used to be ignored ("loras": []): now it is merged, as --use_lora True would."""
    base = ["--pretrained_model_path", str(TINY_MODEL), *PROMPT]
    assert sample_main(base + ["--output_path", str(tmp_path / "base")]) == 0
    assert sample_main(base + ["--lora_ckpt_path", str(lora_file), "--output_path", str(tmp_path / "lora")]) == 0
    record = json.loads((tmp_path / "lora" / "samples.jsonl").read_text().splitlines()[0])
    assert record["loras"] == [[str(lora_file), 1.0]]
    assert not np.array_equal(sample_pixels(tmp_path / "base"), sample_pixels(tmp_path / "lora"))
    assert "drop one of them" in error_of(sample_main, base + ["--use_lora", "False", "--lora_ckpt_path",
                                                               str(lora_file)], capsys)


def test_lora_scale_zero_is_the_base_model_and_other_scales_change_the_images(lora_file, tmp_path):
    base = ["--pretrained_model_path", str(TINY_MODEL), *PROMPT]
    assert sample_main(base + ["--output_path", str(tmp_path / "base")]) == 0
    pixels = {}
    for scale in ("0", "0.25", "0.5"):
        out = tmp_path / f"scale_{scale}"
        assert sample_main(base + ["--lora_ckpt_path", str(lora_file), "--lora_scale", scale,
                                   "--output_path", str(out)]) == 0
        pixels[scale] = sample_pixels(out)
    np.testing.assert_array_equal(pixels["0"], sample_pixels(tmp_path / "base"))
    assert not np.array_equal(pixels["0.25"], pixels["0"]) and not np.array_equal(pixels["0.5"], pixels["0.25"])


# --- lost or mixed results ---------------------------------------------------------------------------------------
def test_a_finished_runs_folder_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(tiny_args(run, *QUICK)) == 0
    first = (run / "lora.safetensors").read_bytes()
    message = error_of(train_main, tiny_args(run, *QUICK, "--lora_rank", "2"), capsys)
    assert "holds a previous training run" in message and "--overwrite True" in message
    assert (run / "lora.safetensors").read_bytes() == first  # the first LoRA is kept
    (run / "ckpt" / "lora-000099.safetensors").write_bytes(b"stale")
    assert train_main(tiny_args(run, *QUICK, "--lora_rank", "2", "--overwrite", "True")) == 0
    out = capsys.readouterr()
    assert f"replacing the previous run in {run}" in out.out + out.err
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["lora-000002.safetensors", "train_resume.safetensors"]
    assert (run / "lora.safetensors").read_bytes() != first


def test_a_link_planted_in_the_run_folder_is_not_written_through(tmp_path, capsys):
    run, victim = tmp_path / "run", tmp_path / "victim.csv"
    run.mkdir()
    victim.write_text("precious")
    (run / "train_log.csv").symlink_to(victim)
    assert "does not write through links" in error_of(train_main, tiny_args(run, *QUICK, "--resume", "True"), capsys)
    assert victim.read_text() == "precious"


def test_sampling_into_a_used_folder_starts_clean_or_is_refused(tmp_path, capsys):
    out = tmp_path / "samples"
    argv = ["--pretrained_model_path", str(TINY_MODEL), *PROMPT, "--output_path", str(out)]
    assert sample_main(argv) == 0
    stale = out / "samples" / "00099.png"
    Image.new("RGB", (32, 32)).save(stale)
    assert "holds a previous sampling run" in error_of(sample_main, argv, capsys)
    assert sample_main(argv + ["--overwrite", "True"]) == 0
    assert not stale.exists() and len(list((out / "samples").glob("*.png"))) == 2  # FID would have counted it


# --- data loss in a tool ------------------------------------------------------------------------------------------
def test_merge_ratio_that_is_not_a_number_is_named(tmp_path, capsys):
    from tools import merge_lora

    message = error_of(merge_lora.main, ["--base", str(TINY_MODEL), "--lora", "a.safetensors:abc", "--out",
                                         str(tmp_path / "m")], capsys)
    assert "--lora a.safetensors:abc: 'abc' is not a ratio" in message


def test_convert_to_mindone_without_base_hints_at_base(lora_file, tmp_path, capsys):
    from tools import convert_lora

    message = error_of(convert_lora.main, [str(lora_file), str(tmp_path / "x.ckpt"), "--to", "mindone"], capsys)
    assert "pass that model with --base" in message
    assert convert_lora.main([str(lora_file), str(tmp_path / "x.ckpt"), "--to", "mindone", "--base",
                              str(TINY_MODEL)]) == 0


# --- late or cryptic errors -----------------------------------------------------------------------------------------
def test_an_empty_yaml_says_data_path_is_not_set(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    message = error_of(train_main, ["--train_config", str(empty), "--output_path", str(tmp_path / "o")], capsys)
    assert "data_path is not set" in message


def test_latin1_csv_and_prompts_name_the_file(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32)).save(data / "a.png")
    (data / "img_txt.csv").write_bytes("dir,text\na.png,un caf\xe9 rouge\n".encode("latin-1"))
    message = error_of(train_main, tiny_args(tmp_path / "o", "--data_path", str(data)), capsys)
    assert f"{data / 'img_txt.csv'} is not UTF-8 text" in message
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("un caf\xe9\n".encode("latin-1"))
    message = error_of(sample_main, ["--data_path", str(prompts), *NO_MODEL], capsys)
    assert f"{prompts} is not UTF-8 text" in message


def test_a_csv_with_other_headers_says_to_rename_them(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32)).save(data / "a.png")
    (data / "img_txt.csv").write_text("image,caption\na.png,a red circle\n")
    message = error_of(train_main, tiny_args(tmp_path / "o", "--data_path", str(data)), capsys)
    assert "columns found: ['image', 'caption']" in message and "rename them" in message
    assert "image_column" not in message  # no such key to set


def test_a_refused_fid_pickle_gives_no_advice_to_load_it_anyway(tmp_path):
    import torch

    from msd_lora.errors import WeightsError
    from msd_lora.eval.weights import read_inception_weights

    torch.save({"w": CallsPrint()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="refused without running it: it asks for print") as err:
        read_inception_weights(tmp_path / "evil.pth")
    assert "weights_only" not in str(err.value) and "safe_globals" not in str(err.value)


class CallsPrint:
    """Pickles as a call of print: a harmless stand-in for code a pickle could run."""

    def __reduce__(self):
        return print, ("a pickle ran code",)


# --- interruption -----------------------------------------------------------------------------------------------
def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_exits_130(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "train_text_to_image.py"),
                                *tiny_args(run, "--max_train_steps", "400", "--ckpt_save_interval", "1000",
                                           "--log_interval", "1")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = run / "train_log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "to continue, run the same command with --resume True" in out + err
    from msd_lora.checkpoint import load_resume

    state = load_resume(run / "ckpt" / "train_resume.safetensors")
    rows = log.read_text().splitlines()
    assert state.step == int(rows[-1].split(",")[0]) >= 3  # the checkpoint is the last logged step
