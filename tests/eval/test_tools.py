"""The eval tools as a user runs them: results on good input, exit code 2 and a clear message on bad input."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from tests.conftest import TINY_MODEL, tiny_args
from tests.eval.conftest import write_images
from tools.eval import eval_clip_score, eval_fid, run_eval

PT = ["--backend", "pt", "--device", "cpu", "--progress", "False"]


def fid_args(real, gen, weights, *extra):
    return ["--real_dir", str(real), "--gen_dir", str(gen), "--inception_weights", str(weights), *PT, *extra]


def textbook_fid(weights, image_sets) -> float:
    """FID the textbook way with scipy's sqrtm, on our pool3 features (checked against pytorch-fid's in
    test_golden_pool3): |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    from scipy import linalg

    from msd_lora.eval.fid import FidEvaluator

    evaluator = FidEvaluator("pt", str(weights), "bilinear", device="cpu", progress=False)
    real, gen = (evaluator.folder_features(image_sets[k], k).features.astype(np.float64) for k in ("real", "gen"))
    mu1, mu2, s1, s2 = real.mean(0), gen.mean(0), np.cov(real, rowvar=False), np.cov(gen, rowvar=False)
    with warnings.catch_warnings():  # 5 images: the covariances are singular, which sqrtm mentions; its root holds
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_eval_fid_with_saved_real_statistics(image_sets, inception_safetensors, tmp_path, capsys):
    stats, out = tmp_path / "real.npz", tmp_path / "fid.json"
    assert eval_fid.main(fid_args(image_sets["real"], image_sets["gen"], inception_safetensors, "--save_stats",
                                  str(stats), "--output_json", str(out))) == 0
    printed = capsys.readouterr()
    result = json.loads(out.read_text())
    assert f"FID: {result['fid']:.4f}  (5 generated vs 5 real images, --resize bilinear = pytorch-fid" in printed.out
    assert "RANDOMLY INITIALISED" in printed.err and result["weights"]["random_init"] is True
    assert result["fid"] == pytest.approx(textbook_fid(inception_safetensors, image_sets), rel=1e-5)
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
        records = [json.loads(line) for line in Path(run["clip"]["records"]).read_text().splitlines()]
        assert run["clip"]["records"] == str(out / f"clip_scores_{key}.jsonl") and len(records) == 4
        assert np.mean([r["clip_score"] for r in records]) == pytest.approx(run["clip"]["clip_score"])
    assert summary["standard_fid_weights"] is False
    table = (out / "results.md").read_text()
    assert "| Model | Task | Dataset | FID ↓ | CLIP score ↑ |" in table and "RANDOMLY INITIALISED" in table
    lora_row = f"| tiny_sd | LoRA | real | {summary['results']['lora']['fid']['fid']:.2f} |"
    assert lora_row in table
    assert Image.open(out / "results.png").size[0] > 400
    assert run_eval.main([*argv[:2], "--lora_ckpt_path", str(tmp_path / "none.safetensors"), *argv[4:]]) == 2
    assert "none.safetensors not found" in capsys.readouterr().err


def test_statistics_saved_with_the_pth_are_accepted_with_its_safetensors_copy(inception_pth, inception_safetensors,
                                                                               tmp_path, capsys):
    """The torch machine saves statistics with the .pth, the MindSpore machine reads them with the converted copy."""
    from msd_lora.eval.fid import FidEvaluator
    from tools.eval.convert_inception_weights import main as convert

    two = write_images(tmp_path / "two", 2, seed=9, tint=(1, 1, 1), size=24)
    stats, out = tmp_path / "real.npz", tmp_path / "fid.json"
    torch_machine = FidEvaluator("pt", str(inception_pth), device="cpu", progress=False)
    assert torch_machine.weights["standard"] is False  # random values, but neither pytorch-fid's nor marked random
    assert any("are not the standard FID weights" in n for n in torch_machine.notes)
    torch_machine.real_statistics(two, save_stats=stats)
    assert convert([str(inception_pth), str(tmp_path / "copy.safetensors")]) == 0
    reuse = ["--real_stats", str(stats), "--gen_dir", str(two), *PT, "--inception_weights"]
    assert eval_fid.main([*reuse, str(tmp_path / "copy.safetensors"), "--output_json", str(out)]) == 0
    assert abs(json.loads(out.read_text())["fid"]) <= 1e-6  # the same two images
    assert "are not the standard FID weights" in capsys.readouterr().err
    assert eval_fid.main([*reuse, str(inception_safetensors)]) == 2  # same values, but other weights by identity
    assert "computed with other Inception weights" in capsys.readouterr().err


def test_pytorch_fid_statistics_are_noted_and_count_unknown(inception_safetensors, tmp_path, capsys):
    plain, out = tmp_path / "pytorch_fid.npz", tmp_path / "fid.json"
    np.savez(plain, mu=np.zeros(2048), sigma=np.eye(2048))  # the layout pytorch-fid --save-stats writes
    two = write_images(tmp_path / "two", 2, seed=9, tint=(1, 1, 1), size=24)
    assert eval_fid.main(["--real_stats", str(plain), "--gen_dir", str(two), "--inception_weights",
                          str(inception_safetensors), "--output_json", str(out), "--resize", "pil_bicubic", *PT]) == 0
    printed = capsys.readouterr()
    assert "(2 generated vs unknown real images" in printed.out and json.loads(out.read_text())["num_real"] is None
    assert (f"{plain} does not record its preprocessing (--resize) or Inception weights, so this run cannot check "
            f"them (pytorch-fid's own .npz files are --resize bilinear with its standard weights): compare only "
            f"with --resize bilinear, not this run's --resize pil_bicubic") in printed.err


def test_eval_fid_statistics_and_weights_errors_come_first(image_sets, inception_pth, tmp_path, capsys,
                                                           monkeypatch):
    """Bad --save_stats / --real_stats fail before the weights are even looked for (none.pth does not exist)."""
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(inception_pth.read_bytes()[:100_000])
    gen = ["--gen_dir", str(image_sets["gen"])]
    cases = [
        (fid_args(image_sets["real"], image_sets["gen"], tmp_path / "none.pth", "--save_stats", "real.stats"),
         "--save_stats real.stats: the statistics file must end in .npz"),
        (["--real_stats", str(tmp_path / "missing.npz"), *gen, "--inception_weights", "none.pth", *PT],
         f"statistics file {tmp_path}/missing.npz not found"),
        (["--real_stats", str(tmp_path / "broken.npz"), *gen, "--inception_weights", "none.pth", *PT],
         f"statistics file {tmp_path}/broken.npz cannot be read as an .npz"),
        (fid_args(image_sets["real"], image_sets["gen"], truncated),
         f"Inception weights file {truncated} cannot be read"),
    ]
    for argv, message in cases:
        assert eval_fid.main(argv) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "gpu"):
        argv = fid_args(image_sets["real"], image_sets["gen"], inception_pth) + ["--device", device]
        assert eval_fid.main(argv) == 2
        assert f"device '{device}' was asked for, but torch sees no CUDA GPU" in capsys.readouterr().err


def test_run_eval_caption_flags_non_standard_fid_weights():
    assert "RANDOMLY INITIALISED" in run_eval.weights_caption({"random_init": True, "standard": False}, False)
    assert "RANDOMLY INITIALISED" in run_eval.weights_caption({"random_init": False, "standard": True}, True)
    caption = run_eval.weights_caption({"file": "mine.pth", "random_init": False, "standard": False}, False)
    assert "(mine.pth) are not the standard FID weights" in caption and "not comparable to published FID" in caption
    assert run_eval.weights_caption({"random_init": False, "standard": True}, False) == ""
