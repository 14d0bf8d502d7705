#!/usr/bin/env python
"""Train-step cost of LoRA against its floor, per backend: JSON into benchmarks/results/.

    python benchmarks/train_step.py --backend torch [--models tiny sd15] [--repeats 10]
    python benchmarks/train_step.py --backend mindspore      # MindSpore, and torch in the same run for the ratio

For each UNet (the embedded tiny one at 16x16 latents, and an SD1.5-size one, randomly initialised, at
32x32 latents, batch 1) it times, in one process: a frozen forward; a frozen forward+backward (gradients to
the input only: the floor any LoRA step pays); a full LoRA training step (forward, backward, AdamW on the
LoRA weights: torch.optim.AdamW on torch, our compiled TrainStep with loss scaling and the overflow check on
MindSpore); and the first LoRA step (on MindSpore: graph compilation, reported as compile time).
With --backend mindspore the torch reference runs on the same inputs in the same process, and the JSON holds
the MindSpore/torch ratio of each measurement.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
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


def report(case: str, params: int, lora_params: int, forward: float, floor: float, first: float,
           step: float) -> dict:
    _, side, batch = CASES[case]
    return {"model": case, "latent_side": side, "batch": batch, "unet_params": params, "lora_params": lora_params,
            "forward_ms": round(forward, 2), "frozen_forward_backward_ms": round(floor, 2),
            "lora_step_ms": round(step, 2), "first_lora_step_ms": round(first, 2),
            "lora_step_over_frozen_forward_backward": round(step / floor, 3),
            "lora_step_over_forward": round(step / forward, 3)}


def bench_torch(case: str, repeats: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from msd_lora.backends.torch import lora as torch_lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(case)).eval().requires_grad_(False)
    data = {k: torch.from_numpy(v) for k, v in inputs(case).items()}
    x, t, context = data["x"], data["t"], data["context"]

    def forward():
        with torch.no_grad():
            unet(x, t, context)

    def frozen_forward_backward():
        xi = x.clone().requires_grad_(True)
        unet(xi, t, context).sample.float().pow(2).mean().backward()

    base_params = sum(p.numel() for p in unet.parameters())
    _, forward_ms = timed(forward, repeats)
    _, floor_ms = timed(frozen_forward_backward, repeats)
    spec, targets, init = lora_setup({n: (m.out_features, m.in_features) for n, m in unet.named_modules()
                                      if isinstance(m, torch.nn.Linear)})
    torch_lora.inject(unet, spec, targets["unet"])
    params = torch_lora.lora_parameters(unet, "unet")
    torch_lora.write_weights(params, init)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4)

    def lora_step():
        loss = torch.nn.functional.mse_loss(unet(x, t, context).sample, data["target"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first_ms, step_ms = timed(lora_step, repeats)
    lora_params = int(sum(np.prod(p.shape) for p in params.values()))
    return report(case, base_params, lora_params, forward_ms, floor_ms, first_ms, step_ms)


def bench_mindspore(case: str, repeats: int) -> dict:
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
        param.set_data(Tensor((rng.standard_normal(param.shape, np.float32) * 0.02)))
        param.requires_grad = False
    data = {k: Tensor(v) for k, v in inputs(case).items()}
    data["t"] = data["t"].astype(ms.float32)

    class Forward(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.unet = unet

        def construct(self, x, t, context):
            return self.unet(x, t, context)[0]

    class Loss(nn.Cell):
        def __init__(self, forward):
            super().__init__(auto_prefix=False)
            self.forward = forward

        def construct(self, x, t, context, target):
            return ((self.forward(x, t, context) - target) ** 2).mean()

    forward_cell = Forward()

    def frozen_objective(x, t, context):
        return (forward_cell(x, t, context) ** 2).mean()

    floor_fn = ms.jit(ms.grad(frozen_objective, 0))
    base_params = sum(int(np.prod(p.shape)) for p in unet.get_parameters())
    forward_first, forward_ms = timed(lambda: forward_cell(data["x"], data["t"], data["context"]).asnumpy(), repeats)
    floor_first, floor_ms = timed(lambda: floor_fn(data["x"], data["t"], data["context"]).asnumpy(), repeats)
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
    step = TrainStep(Loss(Forward()), [p for _, p in items], layout, settings)
    batch = (data["x"], data["t"], data["context"], data["target"])
    one, lr, update = Tensor(1.0, ms.float32), Tensor(1e-4, ms.float32), Tensor(True)
    first_ms, step_ms = timed(lambda: step(one, lr, update, *batch)[0].asnumpy(), repeats)
    result = report(case, base_params, int(sum(np.prod(p.shape) for _, p in items)), forward_ms, floor_ms,
                    first_ms, step_ms)
    result.update({"compile_ms": {"forward": round(forward_first - forward_ms, 1),
                                  "frozen_forward_backward": round(floor_first - floor_ms, 1),
                                  "lora_step": round(first_ms - step_ms, 1)}})
    return result


def ratios(ours: dict, reference: dict) -> dict:
    keys = ("forward_ms", "frozen_forward_backward_ms", "lora_step_ms")
    return {k.replace("_ms", ""): round(ours[k] / reference[k], 3) for k in keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="torch", choices=("torch", "mindspore"))
    p.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = p.parse_args()
    import torch

    report_ = {"benchmark": "train_step", "backend": args.backend, "device": "cpu", "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
               "repeats": args.repeats, "lora": {"rank": RANK, "targets": list(UNET_TARGETS)}}
    cases = []
    for case in args.models:
        reference = bench_torch(case, args.repeats)
        if args.backend == "torch":
            cases.append(reference)
            continue
        ours = bench_mindspore(case, args.repeats)
        cases.append({"model": case, "mindspore": ours, "torch": reference, "mindspore_over_torch": ratios(ours,
                                                                                                         reference)})
    if args.backend == "mindspore":
        import mindspore

        report_["mindspore"] = mindspore.__version__
    report_["cases"] = cases
    out = Path(args.out) / f"train_step_{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report_, indent=2) + "\n")
    print(json.dumps(report_, indent=2))


if __name__ == "__main__":
    main()
