"""From a LoRA to a results table: sample the prompts without and with the LoRA, then FID against the real images
and CLIP score against the prompts for both; writes results.json, results.md (mindone's table shape),
results.png (a bar chart) and the per-image CLIP scores (clip_scores_{base,lora}.jsonl) under --output_path.

    python tools/eval/run_eval.py --config configs/train/lora_v1.yaml --lora_ckpt_path runs/x/lora.safetensors \
        --prompts prompts.txt --real_dir data/train_images --output_path runs/x/eval

Sampling is text_to_image.py's (msd_lora.cli.sample), so the images are exactly those it would write. See
docs/evaluation.md for the protocol.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from msd_lora.cli.errors import exits_on_user_error  # noqa: E402
from msd_lora.eval.clip_model import DEFAULT_CLIP_MODEL  # noqa: E402
from msd_lora.eval.preprocess import DEFAULT_RESIZE, PROTOCOLS  # noqa: E402
from msd_lora.eval.weights import FID_WEIGHTS_NAME  # noqa: E402
from tools.eval._common import (add_backend_args, check_statistics_args, print_notes, write_json,  # noqa: E402
                                write_jsonl)
from msd_lora.errors import ConfigError, MissingPathError  # noqa: E402

CONDITIONS = (("base", "no LoRA"), ("lora", "LoRA"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample with and without a LoRA; FID and CLIP score for both.")
    p.add_argument("--config", default="configs/train/lora_tiny.yaml",
                   help="the training yaml: its pretrained_model_path and model_config are used")
    p.add_argument("--pretrained_model_path", default=None, help="override the config's base model folder")
    p.add_argument("--model_config", default=None, help="override the config's model yaml")
    p.add_argument("--lora_ckpt_path", required=True, help="the LoRA file to evaluate")
    p.add_argument("--lora_scale", type=float, default=1.0)
    p.add_argument("--prompts", required=True, help="a .txt file, one prompt per line")
    p.add_argument("--real_dir", default=None, help="real images for FID (e.g. the training images)")
    p.add_argument("--real_stats", default=None, help="saved real-set statistics (.npz) instead of --real_dir")
    p.add_argument("--output_path", default="output/eval")
    sampling = p.add_argument_group("sampling (text_to_image.py's arguments)")
    sampling.add_argument("--n_samples", type=int, default=4)
    sampling.add_argument("--n_iter", type=int, default=2)
    sampling.add_argument("--sampling_steps", type=int, default=25)
    sampling.add_argument("--sampler", default="dpm_solver_pp")
    sampling.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    sampling.add_argument("--negative_prompt", default="")
    sampling.add_argument("--seed", type=int, default=42)
    sampling.add_argument("--H", type=int, default=None)
    sampling.add_argument("--W", type=int, default=None)
    metrics = p.add_argument_group("metrics")
    metrics.add_argument("--inception_weights", default=None, help="FID InceptionV3 weights (see eval_fid.py)")
    metrics.add_argument("--resize", default=DEFAULT_RESIZE, choices=tuple(PROTOCOLS))
    metrics.add_argument("--clip_ckpt_path", default=None, help="local CLIP folder (see eval_clip_score.py)")
    metrics.add_argument("--clip_model_name", default=DEFAULT_CLIP_MODEL)
    metrics.add_argument("--batch_size", type=int, default=16)
    add_backend_args(p)
    return p


def sampling_device(args: argparse.Namespace) -> str:
    """--device for text_to_image.py: MindSpore's name `gpu` is `cuda` to its torch backend (as for the metrics)."""
    from msd_lora.eval.networks import backend_name

    return "cuda" if backend_name(args.backend) == "torch" and args.device.lower() == "gpu" else args.device


def sample(args: argparse.Namespace, base: Path, model_cfg: str, output: Path, lora: bool) -> Path:
    """text_to_image.py for the prompts file, without or with the LoRA; returns its output folder."""
    from msd_lora.cli import sample as t2i
    from msd_lora.eval.networks import backend_name

    argv = ["--data_path", args.prompts, "--pretrained_model_path", str(base), "--model_config", model_cfg,
            "--n_samples", str(args.n_samples), "--n_iter", str(args.n_iter), "--sampling_steps",
            str(args.sampling_steps), "--sampler", args.sampler, "--scale", str(args.scale), "--negative_prompt",
            args.negative_prompt, "--seed", str(args.seed), "--output_path", str(output),
            "--backend", backend_name(args.backend), "--device", sampling_device(args)]
    argv += ["--H", str(args.H)] if args.H else []
    argv += ["--W", str(args.W)] if args.W else []
    if lora:
        argv += ["--use_lora", "True", "--lora_ckpt_path", args.lora_ckpt_path, "--lora_scale", str(args.lora_scale)]
    return t2i.run(t2i.build_parser().parse_args(argv))


def weights_caption(fid_weights: dict, clip_random: bool) -> str:
    """The table caption's warning: random feature networks, or FID weights that are not the standard ones."""
    if fid_weights["random_init"] or clip_random:
        return (" **Feature networks are RANDOMLY INITIALISED: these numbers test the pipeline and are not "
                "comparable to published FID / CLIP scores.**")
    if not fid_weights["standard"]:
        return (f" **The FID InceptionV3 weights ({fid_weights['file']}) are not the standard FID weights "
                f"(pytorch-fid's {FID_WEIGHTS_NAME}): FID is not comparable to published FID.**")
    return ""


def run(args: argparse.Namespace) -> dict:
    from msd_lora.config import load_train_config
    from msd_lora.eval.clip_eval import ClipScorer
    from msd_lora.eval.clip_score import read_prompts
    from msd_lora.eval.fid import FidEvaluator
    from msd_lora.eval.report import bar_chart, markdown_table

    if not Path(args.lora_ckpt_path).is_file():
        raise MissingPathError(f"--lora_ckpt_path {args.lora_ckpt_path} not found")
    if bool(args.real_dir) == bool(args.real_stats):
        raise ConfigError("give --real_dir DIR or --real_stats FILE.npz (one of them)")
    check_statistics_args(args.real_stats)
    cfg = load_train_config(["--train_config", args.config])
    base = Path(args.pretrained_model_path or cfg.pretrained_model_path)
    model_cfg = args.model_config or cfg.model_config
    prompts, out = read_prompts(args.prompts), Path(args.output_path)
    # load the metric networks first: a missing weights file fails before minutes of sampling
    fid = FidEvaluator(args.backend, args.inception_weights, args.resize, args.batch_size, args.device, args.ms_mode,
                       args.progress)
    clip = ClipScorer(args.backend, args.clip_ckpt_path, args.clip_model_name, args.batch_size, args.device,
                      args.ms_mode, args.progress)
    real = fid.real_statistics(args.real_dir, args.real_stats)
    results, rows = {}, []
    for key, task in CONDITIONS:
        folder = sample(args, base, model_cfg, out / f"samples_{key}", lora=key == "lora")
        scores = clip.score(folder, prompts, args.n_iter * args.n_samples)
        records = write_jsonl(out / f"clip_scores_{key}.jsonl", scores.pop("records"))
        results[key] = {"samples": str(folder), "fid": fid.fid(real, folder), "clip": {**scores, "records": records}}
        rows.append({"model": base.name, "task": task, "dataset": Path(args.real_dir or args.real_stats).name,
                     "label": key, "fid": results[key]["fid"]["fid"], "clip_score": results[key]["clip"]["clip_score"]})
    random_init = fid.weights["random_init"] or clip.model["random_init"]
    caption = (f"{len(prompts)} prompts x {args.n_iter * args.n_samples} images per run, FID --resize {args.resize} "
               f"({fid.protocol.reproduces}), backend {fid.backend}, LoRA {args.lora_ckpt_path} "
               f"(scale {args.lora_scale}).") + weights_caption(fid.weights, clip.model["random_init"])
    summary = {"config": args.config, "pretrained_model_path": str(base), "lora_ckpt_path": args.lora_ckpt_path,
               "prompts": prompts, "real": args.real_dir or args.real_stats, "random_feature_networks": random_init,
               "standard_fid_weights": fid.weights["standard"],
               "sampling": {k: getattr(args, k) for k in ("n_samples", "n_iter", "sampling_steps", "sampler",
                                                          "scale", "seed")},
               "results": results, "table": rows}
    write_json(out / "results.json", summary)
    (out / "results.md").write_text(markdown_table(rows, caption), encoding="utf-8")
    bar_chart(rows, out / "results.png", title=f"{base.name}: no LoRA vs LoRA"
              + (" (RANDOM feature networks)" if random_init else ""))
    return summary


@exits_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = run(args)
    for key, _ in CONDITIONS:
        print_notes(summary["results"][key]["fid"]["notes"] + summary["results"][key]["clip"]["notes"])
    print((Path(args.output_path) / "results.md").read_text(encoding="utf-8"))
    print(f"written: {Path(args.output_path) / 'results.json'}, results.md, results.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
