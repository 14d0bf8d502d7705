"""From a LoRA to a results table: sample the prompts without and with the LoRA, then FID against the real images
and CLIP score against the prompts for both; writes results.json, results.md (mindone's table shape),
results.png (a bar chart) and the per-image CLIP scores (clip_scores_{base,lora}.jsonl) under --output_path.

    python tools/eval/run_eval.py --config configs/train/lora_v1.yaml --lora_ckpt_path runs/x/lora.safetensors \
        --prompts prompts.txt --real_dir data/train_images --output_path runs/x/eval

Sampling is msd_lora.sample's, as in text_to_image.py (the same flags, declared once), so the images are
exactly those it would write. See docs/evaluation.md for the protocol.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from msd_lora.cli.errors import exits_on_user_error
from msd_lora.cli.eval_common import add_backend_args, check_statistics_args, print_notes, write_json, write_jsonl
from msd_lora.cli.sample import add_sampling_arguments, sampling_options
from msd_lora.errors import ConfigError, MissingPathError
from msd_lora.eval.clip_model import DEFAULT_CLIP_MODEL
from msd_lora.eval.clip_score import read_prompts
from msd_lora.eval.preprocess import DEFAULT_RESIZE, PROTOCOLS
from msd_lora.eval.weights import FID_WEIGHTS_NAME
from msd_lora.options import str_to_bool

CONDITIONS = (("base", "no LoRA"), ("lora", "LoRA"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample with and without a LoRA; FID and CLIP score for both.")
    p.add_argument("--config", default="configs/train/lora_tiny.yaml",
                   help="the training yaml: its pretrained_model_path and model_config are used")
    p.add_argument("--pretrained_model_path", default=None, help="override the config's base model folder")
    p.add_argument("--model_config", default=None, help="override the config's model yaml")
    p.add_argument("--lora_ckpt_path", required=True, help="the LoRA file to evaluate")
    p.add_argument("--lora_scale", type=float, default=1.0, help="strength of the LoRA (W' = W + scale*alpha/r*B@A)")
    p.add_argument("--prompts", required=True, help="a .txt file, one prompt per line")
    p.add_argument("--real_dir", default=None, help="real images for FID (e.g. the training images)")
    p.add_argument("--real_stats", default=None, help="saved real-set statistics (.npz) instead of --real_dir")
    p.add_argument("--output_path", default="output/eval")
    add_sampling_arguments(p)
    p.add_argument("--overwrite", type=str_to_bool, default=False,
                   help="replace the sample folders of an earlier run in output_path (otherwise they are refused)")
    metrics = p.add_argument_group("metrics")
    metrics.add_argument("--inception_weights", default=None, help="FID InceptionV3 weights (see eval_fid.py)")
    metrics.add_argument("--resize", default=DEFAULT_RESIZE, choices=tuple(PROTOCOLS))
    metrics.add_argument("--clip_ckpt_path", default=None, help="local CLIP folder (see eval_clip_score.py)")
    metrics.add_argument("--clip_model_name", default=DEFAULT_CLIP_MODEL)
    metrics.add_argument("--batch_size", type=int, default=16)
    add_backend_args(p)
    return p


def sampling_device(args: argparse.Namespace) -> str:
    """The sampling backend's device: MindSpore's name `gpu` is `cuda` to torch (as for the metrics)."""
    from msd_lora.eval.networks import backend_name

    return "cuda" if backend_name(args.backend) == "torch" and args.device.lower() == "gpu" else args.device


def sample_folders(args: argparse.Namespace) -> dict:
    """Each condition's sample folder (OutputFolder), checked: a folder of an earlier run is refused unless
    --overwrite, before anything loads."""
    from msd_lora.output_folder import OutputFolder
    from msd_lora.sample import SAMPLE_OUTPUTS

    folders = {key: OutputFolder(Path(args.output_path) / f"samples_{key}", SAMPLE_OUTPUTS, "sampling run",
                                 overwrite=args.overwrite) for key, _ in CONDITIONS}
    for folder in folders.values():
        folder.check()
    return folders


def sample_with_and_without(args: argparse.Namespace, options, prompts: list[str], base: Path, model_cfg: str,
                            folders: dict) -> dict[str, Path]:
    """The prompts sampled without, then with the LoRA (msd_lora.sample: exactly what text_to_image.py writes), from
    one loaded model; returns each condition's folder."""
    from msd_lora.backends.base import BackendOptions
    from msd_lora.eval.networks import backend_name
    from msd_lora.sample import load_pipeline, merge_loras, read_lora_files, write_samples

    pipeline, notes = load_pipeline(base, model_cfg, backend_name(args.backend),
                                    BackendOptions(device=sampling_device(args)))
    print_notes(notes)
    pipeline.check(options)
    loras = [(args.lora_ckpt_path, args.lora_scale)]
    for key, _ in CONDITIONS:
        if key == "lora":
            merge_loras(pipeline.backend, read_lora_files(loras, pipeline.module_index))
        with folders[key].claimed() as folder:
            write_samples(pipeline, prompts, options, folder, loras if key == "lora" else [],
                          show_progress=args.progress)
    return {key: folder.path for key, folder in folders.items()}


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
    from msd_lora.eval.fid import FidEvaluator
    from msd_lora.eval.report import bar_chart, markdown_table

    if not Path(args.lora_ckpt_path).exists():
        raise MissingPathError(f"--lora_ckpt_path {args.lora_ckpt_path} not found")
    if bool(args.real_dir) == bool(args.real_stats):
        raise ConfigError("give --real_dir DIR or --real_stats FILE.npz (one of them)")
    check_statistics_args(args.real_stats)
    cfg = load_train_config(["--train_config", args.config])
    base = Path(args.pretrained_model_path or cfg.pretrained_model_path)
    model_cfg = args.model_config or cfg.model_config
    prompts, out, options = read_prompts(args.prompts), Path(args.output_path), sampling_options(args)
    folders = sample_folders(args)
    # load the metric networks first: a missing weights file fails before minutes of sampling
    fid = FidEvaluator(args.backend, args.inception_weights, args.resize, args.batch_size, args.device, args.ms_mode,
                       args.progress)
    clip = ClipScorer(args.backend, args.clip_ckpt_path, args.clip_model_name, args.batch_size, args.device,
                      args.ms_mode, args.progress)
    real = fid.real_statistics(args.real_dir, args.real_stats)
    samples = sample_with_and_without(args, options, prompts, base, model_cfg, folders)
    results, rows = {}, []
    for key, task in CONDITIONS:
        folder = samples[key]
        scores = clip.score(folder, prompts, options.n_iter * options.n_samples)
        records = write_jsonl(out / f"clip_scores_{key}.jsonl", scores.pop("records"))
        results[key] = {"samples": str(folder), "fid": fid.fid(real, folder), "clip": {**scores, "records": records}}
        rows.append({"model": base.name, "task": task, "dataset": Path(args.real_dir or args.real_stats).name,
                     "label": key, "fid": results[key]["fid"]["fid"], "clip_score": results[key]["clip"]["clip_score"]})
    random_init = fid.weights["random_init"] or clip.model["random_init"]
    caption = (f"{len(prompts)} prompts x {options.n_iter * options.n_samples} images per run, FID --resize "
               f"{args.resize} ({fid.protocol.reproduces}), backend {fid.backend}, LoRA {args.lora_ckpt_path} "
               f"(scale {args.lora_scale}).") + weights_caption(fid.weights, clip.model["random_init"])
    summary = {"config": args.config, "pretrained_model_path": str(base), "lora_ckpt_path": args.lora_ckpt_path,
               "prompts": prompts, "real": args.real_dir or args.real_stats, "random_feature_networks": random_init,
               "standard_fid_weights": fid.weights["standard"],
               "sampling": {k: getattr(options, k) for k in ("n_samples", "n_iter", "steps", "sampler",
                                                             "guidance_scale", "seed")},
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
