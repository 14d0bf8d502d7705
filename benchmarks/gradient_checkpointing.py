#!/usr/bin/env python
"""Peak memory and step time of the LoRA train step with and without gradient checkpointing, per backend.

    python benchmarks/gradient_checkpointing.py --backend torch --side 512
    python benchmarks/gradient_checkpointing.py --backend mindspore --side 256

The step is `benchmarks/train_step.py`'s `cached_train_step` (the production `Backend.train_step` on cached
latents and text states, UNet attention LoRA rank 4, batch 1) on an SD1.5-size UNet with random weights, built the
way the Trainer builds it, `gradient_checkpointing` on or off. Each variant runs in a fresh process. Memory: the
resident set before the steps (weights, inputs) and its peak during the steps (Linux's VmHWM, reset just before
them through /proc/self/clear_refs: loading the model peaks higher than a step, so the process's lifetime peak
would hide the difference); their difference is what the step adds (activations, gradients, optimizer; on this
CPU machine device memory is process memory). Time: the median of `--repeats` steps after the first (on MindSpore
the first compiles the graph). JSON into benchmarks/results/.
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


def memory_mb(field: str) -> float:
    """A /proc/self/status memory line (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(backend_name: str, case: str, path: str, side: int, checkpointing: bool, repeats: int) -> dict:
    backend, data, _ = setup(backend_name, case, Path(path), side, checkpointing)
    encoded = (*backend.encode_moments(data["pixels"]), backend.encode_text(data["token_ids"]))
    import gc

    gc.collect()
    before = memory_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    first, median = timed(lambda: backend.train_step(step_batch(backend, data, encoded), 1e-4, update=True,
                                                     accumulation=1), repeats)
    peak = memory_mb("VmHWM")
    return {"first_ms": round(first, 1), "median_ms": round(median, 1), "rss_before_steps_mb": round(before),
            "step_peak_rss_mb": round(peak), "step_adds_mb": round(peak - before),
            "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


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
              "step_memory_saved_mb": runs["plain"]["step_adds_mb"] - runs["checkpointing"]["step_adds_mb"],
              "step_memory_ratio": round(runs["checkpointing"]["step_adds_mb"] / runs["plain"]["step_adds_mb"], 3),
              "step_time_ratio": round(runs["checkpointing"]["median_ms"] / runs["plain"]["median_ms"], 3)}
    out = Path(args.out) / f"gradient_checkpointing_{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'variant':<15} {'RSS before MB':>14} {'step peak MB':>13} {'step adds MB':>13} {'step ms':>10}")
    for name, run in runs.items():
        print(f"{name:<15} {run['rss_before_steps_mb']:>14} {run['step_peak_rss_mb']:>13} {run['step_adds_mb']:>13} "
              f"{run['median_ms']:>10}")
    print(f"checkpointing: the step adds {result['step_memory_ratio']:.0%} of the memory, saves "
          f"{result['step_memory_saved_mb']} MB, takes x{result['step_time_ratio']} the time; wrote {out}")


if __name__ == "__main__":
    main()
