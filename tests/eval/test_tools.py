"""The eval tools as a user runs them: results on good input, exit code 2 and a clear message on bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")

from tests.conftest import TINY_MODEL, tiny_args  # noqa: E402
from tests.eval.conftest import write_images  # noqa: E402
from tools.eval import eval_clip_score, eval_fid, run_eval  # noqa: E402

PT = ["--backend", "pt", "--device", "cpu", "--progress", "False"]


def fid_args(real, gen, weights, *extra):
    return ["--real_dir", str(real), "--gen_dir", str(gen), "--inception_weights", str(weights), *PT, *extra]


def test_eval_fid_with_saved_real_statistics(image_sets, inception_safetensors, tmp_path, capsys):
    stats, out = tmp_path / "real.npz", tmp_path / "fid.json"
    assert eval_fid.main(fid_args(image_sets["real"], image_sets["gen"], inception_safetensors, "--save_stats",
                                  str(stats), "--output_json", str(out))) == 0
    printed = capsys.readouterr()
    result = json.loads(out.read_text())
    assert f"FID: {result['fid']:.4f}  (5 generated vs 5 real images, --resize bilinear = pytorch-fid" in printed.out
    assert "RANDOMLY INITIALISED" in printed.err and result["weights"]["random_init"] is True
    assert result["fid"] > 1.0
    with np.load(stats) as saved:
        assert saved["mu"].shape == (2048,) and saved["sigma"].shape == (2048, 2048)
        assert str(saved["resize"]) == "bilinear"
    again = tmp_path / "again.json"
    assert eval_fid.main(["--real_stats", str(stats), "--gen_dir", str(image_sets["gen"]), "--inception_weights",
                          str(inception_safetensors), "--output_json", str(again), *PT]) == 0
    assert json.loads(again.read_text())["fid"] == pytest.approx(result["fid"], rel=1e-6)
    capsys.readouterr()
    assert eval_fid.main(["--real_stats", str(stats), "--gen_dir", str(image_sets["gen"]), "--resize", "pil_bicubic",
                          "--inception_weights", str(inception_safetensors), *PT]) == 2
    assert "computed with --resize bilinear, this run uses pil_bicubic" in capsys.readouterr().err


def test_eval_fid_of_a_folder_with_itself_is_zero(image_sets, inception_safetensors, tmp_path):
    out = tmp_path / "self.json"
    assert eval_fid.main(fid_args(image_sets["gen"], image_sets["gen"], inception_safetensors, "--resize",
                                  "pil_bicubic", "--output_json", str(out))) == 0
    assert abs(json.loads(out.read_text())["fid"]) <= 1e-6


def test_eval_fid_bad_inputs(image_sets, inception_safetensors, tmp_path, capsys):
    empty, single = tmp_path / "empty", tmp_path / "single"
    empty.mkdir()
    write_images(single, 1, seed=3, tint=(1, 1, 1))
    cases = [
        (fid_args(image_sets["real"], empty, inception_safetensors), "--gen_dir " + str(empty) + " has no images"),
        (fid_args(image_sets["real"], single, inception_safetensors), "FID needs at least 2 images"),
        (fid_args(image_sets["real"], image_sets["gen"], tmp_path / "pt_inception.pth"),
         f"Inception weights file {tmp_path}/pt_inception.pth not found"),
        (["--gen_dir", str(image_sets["gen"]), "--inception_weights", str(inception_safetensors), *PT],
         "give --real_dir DIR or --real_stats FILE.npz (one of them)"),
    ]
    for argv, message in cases:
        assert eval_fid.main(argv) == 2
        assert message in capsys.readouterr().err


def test_eval_fid_reports_conversions_and_skipped_files(image_sets, inception_safetensors, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    shutil.copytree(image_sets["gen"], mixed)
    Image.open(mixed / "00000.png").convert("L").save(mixed / "00000.png")
    Image.open(mixed / "00001.png").convert("RGBA").save(mixed / "00001.png")
    (mixed / "prompts.txt").write_text("x")
    assert eval_fid.main(fid_args(image_sets["real"], mixed, inception_safetensors)) == 0
    err = capsys.readouterr().err
    assert "converted to RGB: 1 L (grayscale, replicated to 3 channels); 1 RGBA (alpha dropped" in err
    assert "skipped 1 non-image file(s) (prompts.txt)" in err


def test_eval_clip_score_writes_per_image_lines(random_clip, tmp_path, capsys):
    images = write_images(tmp_path / "images", 6, seed=4, tint=(1, 1, 1))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "scores.jsonl"
    argv = ["--image_path_or_dir", str(images), "--prompt_or_path", str(prompts), "--ckpt_path", str(random_clip),
            "--output_jsonl", str(out), *PT]
    assert eval_clip_score.main(argv + ["--images_per_prompt", "3"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["a red circle"] * 3 + ["a blue square"] * 3
    mean = np.mean([r["clip_score"] for r in lines])
    assert f"CLIP score: {mean:.4f}  (6 images, 2 prompts, backend torch)" in capsys.readouterr().out
    assert eval_clip_score.main(argv + ["--images_per_prompt", "4"]) == 2
    assert "found 6 images but 2 prompts x 4 images per prompt" in capsys.readouterr().err
    assert eval_clip_score.main([*argv[:-6], "--ckpt_path", str(tmp_path / "none"), *PT]) == 2
    assert f"CLIP model folder {tmp_path}/none not found" in capsys.readouterr().err


def test_run_eval_from_lora_to_table(image_sets, random_networks, tmp_path, capsys):
    from msd_lora.cli.train import main as train_main

    assert train_main(tiny_args(tmp_path / "train", "--max_train_steps", "2", "--validation_steps", "1")) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background in sks style\na yellow square on a green background\n")
    out = tmp_path / "eval"
    argv = ["--pretrained_model_path", str(TINY_MODEL), "--lora_ckpt_path", str(tmp_path / "train/lora.safetensors"),
            "--prompts", str(prompts), "--real_dir", str(image_sets["real"]), "--n_samples", "1", "--n_iter", "2",
            "--sampling_steps", "2", "--inception_weights", str(random_networks / "inception_random.safetensors"),
            "--clip_ckpt_path", str(random_networks / "clip_random"), "--output_path", str(out), *PT]
    assert run_eval.main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "results.json").read_text())
    assert summary["random_feature_networks"] is True
    for key in ("base", "lora"):
        run = summary["results"][key]
        assert len(list((out / f"samples_{key}" / "samples").glob("*.png"))) == 4
        assert run["fid"]["num_gen"] == 4 and run["fid"]["num_real"] == 5 and run["clip"]["num_images"] == 4
    table = (out / "results.md").read_text()
    assert "| Model | Task | Dataset | FID ↓ | CLIP score ↑ |" in table and "RANDOMLY INITIALISED" in table
    lora_row = f"| tiny_sd | LoRA | real | {summary['results']['lora']['fid']['fid']:.2f} |"
    assert lora_row in table
    assert Image.open(out / "results.png").size[0] > 400
    assert run_eval.main([*argv[:2], "--lora_ckpt_path", str(tmp_path / "none.safetensors"), *argv[4:]]) == 2
    assert "none.safetensors not found" in capsys.readouterr().err
