#!/usr/bin/env python
"""Peak memory and step time of the LoRA train step with and without gradient checkpointing, per backend.

    python benchmarks/gradient_checkpointing.py --backend torch --side 512
    python benchmarks/gradient_checkpointing.py --backend mindspore --side 256

The step is `benchmarks/train_step.py`'s `cached_train_step` (the production `Backend.train_step` on cached
latents and text states, UNet attention LoRA rank 4, batch 1) on an SD1.5-size UNet with random weights, built the
way the Trainer builds it, `gradient_checkpointing` on or off. Each variant runs in a fresh process: its peak RSS
(weights included; on this CPU machine the device memory is the process memory) and the median of `--repeats`
steps after the first (on MindSpore the first compiles the graph). JSON into benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.train_step import REPO, model_path, setup, step_batch, timed, write_random_model  # noqa: E402


def worker(backend_name: str, case: str, path: str, side: int, checkpointing: bool, repeats: int) -> dict:
    backend, data, _ = setup(backend_name, case, Path(path), side, checkpointing)
    encoded = (*backend.encode_moments(data["pixels"]), backend.encode_text(data["token_ids"]))
    first, median = timed(lambda: backend.train_step(step_batch(backend, data, encoded), 1e-4, update=True,
                                                     accumulation=1), repeats)
    return {"first_ms": round(first, 1), "median_ms": round(median, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def run_worker(backend: str, case: str, path: Path, side: int, checkpointing: bool, repeats: int) -> dict:
    command = [sys.executable, __file__, "--worker", backend, case, str(path), str(side), str(int(checkpointing)),
               "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{backend} checkpointing={checkpointing} failed (exit {done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="torch", choices=("torch", "mindspore"))
    p.add_argument("--model", default="sd15", choices=("tiny", "sd15"))
    p.add_argument("--side", type=int, default=512, help="image side in pixels (latents: side / 8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks/results"))
    p.add_argument("--worker", nargs=5, metavar=("BACKEND", "CASE", "MODEL", "SIDE", "CHECKPOINTING"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        backend, case, path, side, checkpointing = args.worker
        print(json.dumps(worker(backend, case, path, int(side), checkpointing == "1", args.repeats)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        path = model_path(args.model, Path(scratch))
        if args.model != "tiny":
            write_random_model(args.model, path)
        runs = {name: run_worker(args.backend, args.model, path, args.side, on, args.repeats)
                for name, on in (("plain", False), ("checkpointing", True))}
    import mindspore
    import torch

    result = {"machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__,
              "mindspore": mindspore.__version__, "backend": args.backend, "model": args.model,
              "image_side": args.side, "latent_side": args.side // 8, "batch": 1, **runs,
              "peak_rss_saved_mb": runs["plain"]["peak_rss_mb"] - runs["checkpointing"]["peak_rss_mb"],
              "step_time_ratio": round(runs["checkpointing"]["median_ms"] / runs["plain"]["median_ms"], 3)}
    out = Path(args.out) / f"gradient_checkpointing_{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'variant':<15} {'peak RSS MB':>12} {'step ms':>10}")
    for name, run in runs.items():
        print(f"{name:<15} {run['peak_rss_mb']:>12} {run['median_ms']:>10}")
    print(f"saved {result['peak_rss_saved_mb']} MB, step time x{result['step_time_ratio']}; wrote {out}")


if __name__ == "__main__":
    main()
