#!/usr/bin/env python
"""Train-step cost of LoRA against its floor, per backend: JSON into benchmarks/results/.

    python benchmarks/train_step.py --backend torch [--models tiny sd15] [--repeats 10]

For each UNet (the embedded tiny one at 16x16 latents, and an SD1.5-size one, randomly initialised, at
32x32 latents, batch 1) it times, in one process: a frozen forward; a frozen forward+backward (gradients to
the input only: the floor any LoRA step pays); a full LoRA training step (forward, backward, AdamW on the
LoRA weights); and the first LoRA step (graph build / warm-up). Ratios are measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = {  # name -> (model yaml, latent side, batch)
    "tiny": ("configs/model/tiny.yaml", 16, 1),
    "sd15": ("configs/model/v1-inference.yaml", 32, 1),
}
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call ms, median of `repeats` later calls ms)."""
    start = time.perf_counter()
    fn()
    first = (time.perf_counter() - start) * 1000
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return first, statistics.median(times)


def bench_torch(case: str, repeats: int) -> dict:
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    from msd_lora.backends.torch import lora as torch_lora
    from msd_lora.lora.spec import LoraSpec, init_lora_weights, select_targets

    torch.manual_seed(0)
    config_path, side, batch = CASES[case]
    arch = yaml.safe_load((REPO / config_path).read_text())
    unet = UNet2DConditionModel(**arch["unet"]).eval().requires_grad_(False)
    context_dim = arch["unet"]["cross_attention_dim"]
    x = torch.randn(batch, arch["unet"]["in_channels"], side, side)
    context = torch.randn(batch, 77, context_dim)
    t = torch.tensor([500] * batch)

    def forward():
        with torch.no_grad():
            unet(x, t, context)

    def frozen_forward_backward():
        xi = x.clone().requires_grad_(True)
        unet(xi, t, context).sample.float().pow(2).mean().backward()

    base_params = sum(p.numel() for p in unet.parameters())
    _, forward_ms = timed(forward, repeats)
    _, floor_ms = timed(frozen_forward_backward, repeats)
    spec = LoraSpec(rank=4, alpha=4.0, targets={"unet": UNET_TARGETS})
    shapes = {"unet": {n: (m.out_features, m.in_features) for n, m in unet.named_modules()
                       if isinstance(m, torch.nn.Linear)}}
    targets = select_targets(spec, shapes)
    torch_lora.inject(unet, spec, targets["unet"])
    params = torch_lora.lora_parameters(unet, "unet")
    torch_lora.write_weights(params, init_lora_weights(spec, targets, shapes, 0))
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4)
    target = torch.randn_like(x)

    def lora_step():
        loss = torch.nn.functional.mse_loss(unet(x, t, context).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first_ms, step_ms = timed(lora_step, repeats)
    return {"model": case, "latent_side": side, "batch": batch, "unet_params": base_params,
            "lora_params": int(sum(np.prod(p.shape) for p in params.values())), "forward_ms": round(forward_ms, 2),
            "frozen_forward_backward_ms": round(floor_ms, 2), "lora_step_ms": round(step_ms, 2),
            "first_lora_step_ms": round(first_ms, 2),
            "lora_step_over_frozen_forward_backward": round(step_ms / floor_ms, 3),
            "lora_step_over_forward": round(step_ms / forward_ms, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="torch", choices=("torch", "mindspore"))
    p.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = p.parse_args()
    if args.backend != "torch":
        raise SystemExit("error: only the torch backend exists in this version")
    import torch

    results = [bench_torch(case, args.repeats) for case in args.models]
    report = {"benchmark": "train_step", "backend": args.backend, "device": "cpu", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "repeats": args.repeats, "cases": results}
    out = Path(args.out) / f"train_step_{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
