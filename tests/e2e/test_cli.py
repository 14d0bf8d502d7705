"""The two entry points as a user runs them: train, then sample with the result; bad input exits 2 with a message."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from msd_lora.cli.sample import main as sample_main
from msd_lora.cli.train import main as train_main
from tests.conftest import tiny_args

QUICK = ("--max_train_steps", "3", "--validation_steps", "2")


def test_train_then_sample_with_two_loras(tmp_path, tiny_model, capsys):
    assert train_main(tiny_args(tmp_path / "run", *QUICK)) == 0
    lora = tmp_path / "run" / "lora.safetensors"
    assert lora.is_file() and (tmp_path / "run" / "ckpt" / "train_resume.safetensors").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n\na green square on a white background in sks style\n")
    out = tmp_path / "samples"
    code = sample_main(["--data_path", str(prompts), "--pretrained_model_path", str(tiny_model), "--use_lora", "True",
                        "--lora_ckpt_path", str(lora), "--lora_scale", "0.5", "--lora_ckpt_path", str(lora),
                        "--lora_scale", "0.25", "--n_samples", "2", "--n_iter", "2", "--sampling_steps", "3",
                        "--sampler", "ddim", "--output_path", str(out)])
    assert code == 0, capsys.readouterr().err
    files = sorted((out / "samples").glob("*.png"))
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(8)]
    assert Image.open(files[0]).size == (32, 32)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt_index"] for r in rows] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert rows[0]["loras"] == [[str(lora), 0.5], [str(lora), 0.25]]
    assert np.asarray(Image.open(out / "grid-001.png")).shape == (64, 64, 3)


def test_sampling_is_seeded(tmp_path, tiny_model):
    def run(seed: str, name: str) -> np.ndarray:
        assert sample_main(["--prompt", "a red circle on a blue background", "--pretrained_model_path",
                            str(tiny_model), "--n_samples", "1", "--sampling_steps", "3", "--seed", seed,
                            "--output_path", str(tmp_path / name), "--overwrite", "True"]) == 0
        return np.asarray(Image.open(tmp_path / name / "samples" / "00000.png"))

    assert np.array_equal(run("1", "a"), run("1", "b"))
    assert not np.array_equal(run("1", "a"), run("2", "c"))


def test_unknown_key_exits_2_with_suggestion(tmp_path, capsys):
    assert train_main(tiny_args(tmp_path, "--lora_rnak", "4")) == 2
    assert "unknown flag '--lora_rnak'. Did you mean 'lora_rank'?" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rnk: 4\n")
    assert train_main(["--train_config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: unknown key 'lora_rnk'" in err and "Did you mean 'lora_rank'" in err


def test_csv_without_text_column(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32)).save(data / "a.png")
    (data / "img_txt.csv").write_text("dir,caption\na.png,a red circle\n")
    assert train_main(tiny_args(tmp_path / "out", "--data_path", str(data))) == 2
    err = capsys.readouterr().err
    assert "text" in err and "caption" in err and "img_txt.csv" in err


def test_unwritable_output_path(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert train_main(tiny_args(blocker / "out")) == 2
    assert "output_path" in capsys.readouterr().err


def test_sample_errors_are_clear(tmp_path, tiny_model, capsys):
    base = ["--prompt", "x", "--pretrained_model_path", str(tiny_model), "--output_path", str(tmp_path)]
    assert sample_main(base + ["--use_lora", "True"]) == 2
    assert "--use_lora True needs --lora_ckpt_path" in capsys.readouterr().err
    assert sample_main(base + ["--use_lora", "True", "--lora_ckpt_path", str(tmp_path / "none.safetensors")]) == 2
    assert "none.safetensors does not exist" in capsys.readouterr().err
    assert sample_main(["--prompt", "x", "--pretrained_model_path", str(tmp_path / "nomodel")]) == 2
    assert "nomodel' does not exist" in capsys.readouterr().err


def test_help_lists_every_option(capsys):
    from msd_lora.config import TrainConfig
    from msd_lora.options import fields_of

    assert train_main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(f"--{key}" in text for key in fields_of(TrainConfig)) and "--debug" in text
