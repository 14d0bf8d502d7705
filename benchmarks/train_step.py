#!/usr/bin/env python
"""Train-step cost of LoRA against its floor, per backend: JSON into benchmarks/results/.

    python benchmarks/train_step.py --backend torch [--models tiny sd15] [--repeats 10]
    python benchmarks/train_step.py --backend mindspore      # MindSpore, and torch in the same run for the ratio

For each UNet (the embedded tiny one at 16x16 latents, and an SD1.5-size one, randomly initialised, at
32x32 latents, batch 1) it times: a frozen forward; a frozen forward+backward (gradients to the input only:
the floor any LoRA step pays); a full LoRA training step (forward, backward, AdamW on the LoRA weights:
torch.optim.AdamW on torch, our compiled TrainStep with loss scaling and the overflow check on MindSpore);
and the first call of each (on MindSpore it includes graph compilation, reported as compile time).

Each measurement runs in a fresh worker process (same inputs, one after the other), so memory peaks are
comparable and no graph or allocator state carries over; the report gives each one's peak resident memory.
With --backend mindspore the torch reference runs in the same invocation, and the JSON holds the
MindSpore/torch ratio of every time.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = {  # name -> (model yaml, latent side, batch)
    "tiny": ("configs/model/tiny.yaml", 16, 1),
    "sd15": ("configs/model/v1-inference.yaml", 32, 1),
}
MEASUREMENTS = ("forward", "frozen_forward_backward", "lora_step")
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
RANK = 4


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


def unet_config(case: str) -> dict:
    return yaml.safe_load((REPO / CASES[case][0]).read_text())["unet"]


def inputs(case: str) -> dict[str, np.ndarray]:
    """The same numbers for both backends: latents, timestep, text context, regression target."""
    _, side, batch = CASES[case]
    config = unet_config(case)
    rng = np.random.default_rng(0)
    shape = (batch, config["in_channels"], side, side)
    return {"x": rng.standard_normal(shape).astype(np.float32), "t": np.full(batch, 500, np.int64),
            "context": rng.standard_normal((batch, 77, config["cross_attention_dim"])).astype(np.float32),
            "target": rng.standard_normal(shape).astype(np.float32)}


def lora_setup(linear_shapes: dict[str, tuple[int, int]]):
    from msd_lora.lora.spec import LoraSpec, init_lora_weights, select_targets

    spec = LoraSpec(rank=RANK, alpha=float(RANK), targets={"unet": UNET_TARGETS})
    shapes = {"unet": linear_shapes}
    targets = select_targets(spec, shapes)
    return spec, targets, init_lora_weights(spec, targets, shapes, 0)


# --- torch ------------------------------------------------------------------------------------------------------

def torch_measurement(case: str, measurement: str) -> tuple:
    """(callable to time, UNet parameter count, LoRA parameter count)."""
    import torch
    from diffusers import UNet2DConditionModel

    from msd_lora.backends.torch import lora as torch_lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(case)).eval().requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    data = {k: torch.from_numpy(v) for k, v in inputs(case).items()}
    x, t, context = data["x"], data["t"], data["context"]
    if measurement == "forward":
        def forward():
            with torch.no_grad():
                unet(x, t, context)
        return forward, params, 0
    if measurement == "frozen_forward_backward":
        def frozen_forward_backward():
            xi = x.clone().requires_grad_(True)
            unet(xi, t, context).sample.float().pow(2).mean().backward()
        return frozen_forward_backward, params, 0
    spec, targets, init = lora_setup({n: (m.out_features, m.in_features) for n, m in unet.named_modules()
                                      if isinstance(m, torch.nn.Linear)})
    torch_lora.inject(unet, spec, targets["unet"])
    lora = torch_lora.lora_parameters(unet, "unet")
    torch_lora.write_weights(lora, init)
    for p in lora.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-4)

    def lora_step():
        loss = torch.nn.functional.mse_loss(unet(x, t, context).sample, data["target"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return lora_step, params, int(sum(p.numel() for p in lora.values()))


# --- MindSpore --------------------------------------------------------------------------------------------------

def mindspore_measurement(case: str, measurement: str) -> tuple:
    """(callable to time, UNet parameter count, LoRA parameter count), on mindone's UNet and our train step."""
    import mindspore as ms
    from mindone.diffusers import UNet2DConditionModel
    from mindspore import Tensor, mint, nn

    from msd_lora.backends.base import OptimizerSettings
    from msd_lora.backends.mindspore import lora as ms_lora
    from msd_lora.backends.mindspore.backend import configure_context
    from msd_lora.backends.mindspore.step import FlatLayout, TrainStep

    configure_context(0, "cpu")
    unet = UNet2DConditionModel.from_config(unet_config(case))
    unet.set_train(False)
    rng = np.random.default_rng(0)
    for param in unet.get_parameters():  # finite, SD-like magnitudes; the values do not matter for timing
        param.set_data(Tensor(rng.standard_normal(param.shape, np.float32) * 0.02))
        param.requires_grad = False
    params = sum(int(np.prod(p.shape)) for p in unet.get_parameters())
    data = {k: Tensor(v) for k, v in inputs(case).items()}
    x, t, context = data["x"], data["t"].astype(ms.float32), data["context"]

    class Forward(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.unet = unet

        def construct(self, x, t, context):
            return self.unet(x, t, context)[0]

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.forward = Forward()

        def construct(self, x, t, context, target):
            return ((self.forward(x, t, context) - target) ** 2).mean()

    if measurement == "forward":
        forward = Forward()
        return (lambda: forward(x, t, context).asnumpy()), params, 0
    if measurement == "frozen_forward_backward":
        forward = Forward()

        def frozen_objective(x, t, context):
            return (forward(x, t, context) ** 2).mean()
        gradient = ms.jit(ms.grad(frozen_objective, 0))
        return (lambda: gradient(x, t, context).asnumpy()), params, 0
    spec, targets, init = lora_setup({n: tuple(c.weight.shape) for n, c in unet.cells_and_names()
                                      if isinstance(c, (mint.nn.Linear, nn.Dense))})
    cells = ms_lora.inject(unet, "unet", targets["unet"], spec)
    ms_lora.write_weights(cells, init)
    items = [(f"{k}.lora_{p}.weight", getattr(c, "lora_down" if p == "A" else "lora_up"))
             for k, c in cells.items() for p in "AB"]
    for _, param in items:
        param.requires_grad = True
    settings = OptimizerSettings(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, clip_grad=False, max_grad_norm=1.0,
                                 loss_scaler_type="dynamic", init_loss_scale=65536.0, loss_scale_factor=2.0,
                                 scale_window=1000, use_ema=False, ema_decay=0.9999)
    layout = FlatLayout(names=tuple(k for k, _ in items), shapes=tuple(tuple(p.shape) for _, p in items))
    step = TrainStep(Loss(), [p for _, p in items], layout, settings)
    one, lr, update = Tensor(1.0, ms.float32), Tensor(1e-4, ms.float32), Tensor(True)
    lora_params = int(sum(np.prod(p.shape) for _, p in items))
    return (lambda: step(one, lr, update, x, t, context, data["target"])[0].asnumpy()), params, lora_params


def worker(backend: str, case: str, measurement: str, repeats: int) -> dict:
    build = torch_measurement if backend == "torch" else mindspore_measurement
    fn, params, lora_params = build(case, measurement)
    first, median = timed(fn, repeats)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"first_ms": round(first, 1), "median_ms": round(median, 2), "peak_rss_mb": round(peak_mb),
            "unet_params": params, "lora_params": lora_params}


def run_worker(backend: str, case: str, measurement: str, repeats: int) -> dict:
    command = [sys.executable, __file__, "--worker", backend, case, measurement, "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{backend} {case} {measurement} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_case(backend: str, case: str, repeats: int) -> dict:
    runs = {m: run_worker(backend, case, m, repeats) for m in MEASUREMENTS}
    _, side, batch = CASES[case]
    ms = {m: runs[m]["median_ms"] for m in MEASUREMENTS}
    result = {"model": case, "latent_side": side, "batch": batch, "unet_params": runs["forward"]["unet_params"],
              "lora_params": runs["lora_step"]["lora_params"], "forward_ms": ms["forward"],
              "frozen_forward_backward_ms": ms["frozen_forward_backward"], "lora_step_ms": ms["lora_step"],
              "first_lora_step_ms": runs["lora_step"]["first_ms"],
              "lora_step_over_frozen_forward_backward": round(ms["lora_step"] / ms["frozen_forward_backward"], 3),
              "lora_step_over_forward": round(ms["lora_step"] / ms["forward"], 3),
              "peak_rss_mb": {m: runs[m]["peak_rss_mb"] for m in MEASUREMENTS}}
    if backend == "mindspore":
        result["compile_ms"] = {m: round(runs[m]["first_ms"] - runs[m]["median_ms"], 1) for m in MEASUREMENTS}
    return result


def ratios(ours: dict, reference: dict) -> dict:
    keys = ("forward_ms", "frozen_forward_backward_ms", "lora_step_ms")
    return {k[: -len("_ms")]: round(ours[k] / reference[k], 3) for k in keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="torch", choices=("torch", "mindspore"))
    p.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(REPO / "benchmarks/results"))
    p.add_argument("--worker", nargs=3, metavar=("BACKEND", "CASE", "MEASUREMENT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats)))
        return
    import torch

    report = {"benchmark": "train_step", "backend": args.backend, "device": "cpu", "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "repeats": args.repeats, "lora": {"rank": RANK, "targets": list(UNET_TARGETS)}}
    if args.backend == "mindspore":
        import mindspore

        report["mindspore"] = mindspore.__version__
    cases = []
    for case in args.models:
        reference = measure_case("torch", case, args.repeats)
        if args.backend == "torch":
            cases.append(reference)
            continue
        ours = measure_case("mindspore", case, args.repeats)
        cases.append({"model": case, "mindspore": ours, "torch": reference,
                      "mindspore_over_torch": ratios(ours, reference)})
    report["cases"] = cases
    out = Path(args.out) / f"train_step_{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
