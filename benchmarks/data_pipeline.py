#!/usr/bin/env python
"""Data-pipeline costs, measured on the real Trainer: JSON into benchmarks/results/data_pipeline.json.

    python benchmarks/data_pipeline.py                       # everything below
    python benchmarks/data_pipeline.py --parts epochs --cases tiny --backends torch

`epochs`: seconds per epoch without and with cache_latents + cache_text_embeddings, per backend, on the embedded
tiny model (its 20 images at 32 px, batch 4) and on an SD1.5-size model (random weights, 8 images at 256 px,
batch 1; torch only by default: a 24 GB CPU host barely holds MindSpore's SD1.5-size graphs, see docs/data.md;
`--sd15_mindspore` adds it). The second epoch is timed (the first holds MindSpore's compiles); the time to fill the
caches is reported apart, as it is paid once (and not at all when a disk cache is reused).
`buckets`: MindSpore graph-mode compile cost on the tiny model for 1 shape (no buckets) and for 5 bucket shapes, with
one static graph per shape (`bucket_graphs: per_shape`) and with one dynamic-shape graph (`dynamic`): for each
bucket, its first step minus its steady step time, split into the data side (the VAE-encoder graph) and the train
step, and the steady step time; the two 5-shape runs' losses are compared step by step.
Each run is a fresh worker process.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.train_step import write_random_model  # noqa: E402

CASES = {  # name -> (model yaml, image side, images, batch)
    "tiny": ("configs/model/tiny.yaml", 32, 20, 4),
    "sd15": ("configs/model/v1-inference.yaml", 256, 8, 1),
}
BUCKET_SIZES = [(32, 32), (48, 32), (32, 48), (64, 24), (24, 64), (40, 32), (36, 36), (56, 28)]  # 5 buckets


def write_dataset(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """Random-texture images of the given sizes with captions, as an mindone img_txt.csv folder."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((w, h), Image.Resampling.BICUBIC).save(folder / f"{i:03d}.png")
        rows.append((f"{i:03d}.png", f"a red circle number {i} on a blue background"))
    with open(folder / "img_txt.csv", "w", newline="") as f:
        csv.writer(f).writerows([("dir", "text"), *rows])
    return folder


def trainer_for(backend: str, model: Path, model_yaml: str, data: Path, side: int, batch: int, extra: list[str]):
    from msd_lora.config import load_train_config
    from msd_lora.train import Trainer

    cfg = load_train_config(["--train_config", str(REPO / "configs/train/lora_tiny.yaml"), "--backend", backend,
                             "--pretrained_model_path", str(model), "--model_config", str(REPO / model_yaml),
                             "--data_path", str(data), "--output_path", str(data.parent / "run"), "--overwrite",
                             "True", "--image_size", str(side), "--train_batch_size", str(batch), "--lora_rank", "4",
                             "--lora_alpha", "4", "--dataloader_num_workers", "1", *extra])
    return Trainer(cfg, show_progress=False)


def timed_steps(trainer, steps: int) -> list[dict]:
    """Per step: its bucket, seconds for the data (prefetched batch + encoders or cache reads) and for the step."""
    rows = []
    for step in range(steps):
        epoch, index = trainer.order.locate(step)
        group, _ = trainer.order.group_batch(epoch, index)
        start = time.perf_counter()
        batch = trainer.micro_batch(step)
        middle = time.perf_counter()
        result = trainer.backend.train_step(batch, 1e-4, update=True, accumulation=1)
        rows.append({"bucket": list(trainer.dataset.buckets[group]), "data_s": middle - start,
                     "step_s": time.perf_counter() - middle, "loss": result.loss})
    return rows


def epoch_worker(backend: str, case: str, model: Path, scratch: Path, cached: bool) -> dict:
    model_yaml, side, images, batch = CASES[case]
    data = write_dataset(scratch / f"data_{case}", [(side, side)] * images)
    extra = ["--cache_latents", "True", "--cache_text_embeddings", "True"] if cached else []
    trainer = trainer_for(backend, model, model_yaml, data, side, batch, extra)
    start = time.perf_counter()
    trainer.inputs.fill_caches(lambda what, total: lambda n: None)
    fill = time.perf_counter() - start
    per_epoch = trainer.order.steps_per_epoch
    rows = timed_steps(trainer, 2 * per_epoch)
    second = rows[per_epoch:]
    trainer.inputs.close()
    return {"cache_fill_s": round(fill, 3) if cached else 0.0, "steps_per_epoch": per_epoch,
            "first_epoch_s": round(sum(r["data_s"] + r["step_s"] for r in rows[:per_epoch]), 3),
            "epoch_s": round(sum(r["data_s"] + r["step_s"] for r in second), 3),
            "data_s_per_epoch": round(sum(r["data_s"] for r in second), 3)}


def bucket_worker(scratch: Path, buckets: bool, graphs: str) -> dict:
    data = write_dataset(scratch / "data_buckets", BUCKET_SIZES if buckets else [(32, 32)] * len(BUCKET_SIZES))
    extra = ["--enable_bucket", "True", "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps",
             "8", "--bucket_graphs", graphs] if buckets else []
    trainer = trainer_for("mindspore", REPO / "msd_lora/assets/tiny_sd", "configs/model/tiny.yaml", data, 32, 2,
                          extra)
    rows = timed_steps(trainer, 3 * trainer.order.steps_per_epoch)
    trainer.inputs.close()
    first: dict[str, dict] = {}
    later: dict[str, list[dict]] = {}
    for row in rows:
        key = "x".join(map(str, row["bucket"]))
        if key in first:
            later.setdefault(key, []).append(row)
        else:
            first[key] = row
    result = {}
    for key, row in first.items():
        steady_data = statistics.median(r["data_s"] for r in later[key])
        steady_step = statistics.median(r["step_s"] for r in later[key])
        result[key] = {"encoder_compile_s": round(row["data_s"] - steady_data, 2),
                       "step_compile_s": round(row["step_s"] - steady_step, 2),
                       "steady_step_s": round(steady_step, 3)}
    steady = [r["step_s"] for rows_of in later.values() for r in rows_of]
    return {"shapes": len(result), "per_shape": result, "median_steady_step_s": round(statistics.median(steady), 3),
            "total_compile_s": round(sum(v["encoder_compile_s"] + v["step_compile_s"] for v in result.values()), 1),
            "losses": [r["loss"] for r in rows]}


def run_worker(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker {args} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["epochs", "buckets"], choices=("epochs", "buckets"))
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--backends", nargs="+", default=["torch", "mindspore"], choices=("torch", "mindspore"))
    p.add_argument("--sd15_mindspore", action="store_true", help="also time MindSpore epochs at SD1.5 size")
    p.add_argument("--out", default=str(REPO / "benchmarks/results"))
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "epoch":
            backend, case, model, scratch, cached = rest
            print(json.dumps(epoch_worker(backend, case, Path(model), Path(scratch), cached == "1")))
        else:
            print(json.dumps(bucket_worker(Path(rest[0]), rest[1] == "1", rest[2])))
        return
    import mindspore
    import torch

    report = {"benchmark": "data_pipeline", "device": "cpu", "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "mindspore": mindspore.__version__, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="msd_lora_data_bench_") as scratch:
        scratch = Path(scratch)
        if "epochs" in args.parts:
            epochs = []
            for case in args.cases:
                model = REPO / "msd_lora/assets/tiny_sd" if case == "tiny" else write_random_model(case, scratch / case)
                for backend in args.backends:
                    if case == "sd15" and backend == "mindspore" and not args.sd15_mindspore:
                        continue
                    runs = {name: run_worker("epoch", backend, case, str(model), str(scratch), flag)
                            for name, flag in (("uncached", "0"), ("cached", "1"))}
                    epochs.append({"model": case, "backend": backend, "image_side": CASES[case][1],
                                   "images": CASES[case][2], "batch": CASES[case][3], **runs,
                                   "uncached_over_cached": round(runs["uncached"]["epoch_s"] /
                                                                 runs["cached"]["epoch_s"], 3)})
                    print(json.dumps(epochs[-1]), flush=True)
            report["seconds_per_epoch"] = epochs
        if "buckets" in args.parts:
            runs = {"one_shape": run_worker("buckets", str(scratch), "0", "per_shape"),
                    "five_shapes_per_shape_graphs": run_worker("buckets", str(scratch), "1", "per_shape"),
                    "five_shapes_dynamic_graph": run_worker("buckets", str(scratch), "1", "dynamic")}
            static, dynamic = (runs[k].pop("losses") for k in ("five_shapes_per_shape_graphs",
                                                                "five_shapes_dynamic_graph"))
            runs["one_shape"].pop("losses")
            runs["dynamic_vs_per_shape_max_loss_difference"] = float(max(abs(a - b) / abs(a)
                                                                         for a, b in zip(static, dynamic)))
            report["mindspore_compile"] = runs
            print(json.dumps(runs), flush=True)
    out = Path(args.out) / "data_pipeline.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
