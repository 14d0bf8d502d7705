#!/usr/bin/env python
"""Train-step cost of LoRA against its floor, per backend: JSON into benchmarks/results/.

    python benchmarks/train_step.py --backend torch [--models tiny sd15] [--repeats 10]
    python benchmarks/train_step.py --backend mindspore      # MindSpore, and torch in the same run for the ratio

The step timed is the one users run: the backend is built by `get_backend`, the model loaded by `load_model` from a
diffusers folder, the LoRA chosen and initialised by `msd_lora.lora.spec` and injected by `Backend.add_lora`, the
optimizer set by `configure_training`, and each step is what an uncached run does: the VAE posterior and the text
states encoded (`encode_moments`, `encode_text`), then `Backend.train_step` (UNet forward and backward, AdamW; on
MindSpore the compiled TrainStep with loss scaling and the overflow check). `cached_train_step` is the step alone,
what a run with cache_latents and cache_text_embeddings pays. Cases: the embedded tiny model at its 32-px images
(16x16 latents), and an SD1.5-size model (randomly initialised, written once as a diffusers folder into a temporary
folder) at 256 px (32x32 latents); batch 1.

The floor beside it: `encode` (VAE posterior and text encoder, no gradient: every step pays it) and
`frozen_forward_backward` (the UNet forward and backward with gradients to its input only: what any LoRA step pays
on top); `forward` is the UNet forward alone (`Backend.denoise`, as sampling runs it). Each measurement runs in a
fresh worker process (same inputs, one after the other), so memory peaks are comparable and no graph or allocator
state carries over; the first call's time (on MindSpore: graph compilation) is reported apart."""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CASES = {  # name -> (model yaml, image side, batch)
    "tiny": ("configs/model/tiny.yaml", 32, 1),
    "sd15": ("configs/model/v1-inference.yaml", 256, 1),
}
MEASUREMENTS = ("forward", "encode", "frozen_forward_backward", "train_step", "cached_train_step")
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


def write_random_model(case: str, folder: Path) -> Path:
    """A diffusers folder of the case's architecture with random weights of SD-like magnitude (torch's init)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from msd_lora.models.diffusers_writer import write_diffusers_folder
    from msd_lora.models.model_config import load_model_config
    from msd_lora.models.pretrained import PretrainedModel
    from msd_lora.models.single_file import network_configs, tokenizer_for

    torch.manual_seed(0)
    cfg = load_model_config(REPO / CASES[case][0])
    configs = network_configs(cfg)
    networks = {"unet": UNet2DConditionModel(**configs["unet"]), "vae": AutoencoderKL(**configs["vae"]),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))}
    state = {n: {k: v.numpy() for k, v in m.state_dict().items() if not k.endswith("position_ids")}
             for n, m in networks.items()}
    model = PretrainedModel(source=case, configs=configs, state=state, tokenizer_dir=tokenizer_for(cfg))
    return write_diffusers_folder(model, cfg, folder)


def model_path(case: str, scratch: Path) -> Path:
    return REPO / "msd_lora/assets/tiny_sd" if case == "tiny" else scratch / case


def setup(backend_name: str, case: str, path: Path, side: int | None = None, checkpointing: bool = False):
    """(backend with the LoRA injected and training configured, the step's numpy inputs, UNet parameter count), the
    way the Trainer builds them; `side` overrides the case's image side, `checkpointing` turns gradient
    checkpointing on."""
    from msd_lora.backends.base import BackendOptions, OptimizerSettings, get_backend
    from msd_lora.lora.spec import LoraSpec, init_lora_weights, select_targets
    from msd_lora.models.pretrained import load_model
    from msd_lora.tokenizer import PromptTokenizer

    pretrained, cfg = load_model(path, REPO / CASES[case][0])
    tokenizer = PromptTokenizer(pretrained.tokenizer_dir)
    unet_params = int(sum(np.prod(v.shape) for v in pretrained.state["unet"].values()))
    backend = get_backend(backend_name, BackendOptions(device="cpu"))
    info = backend.load_model(pretrained, cfg.prediction_type)
    spec = LoraSpec(rank=RANK, alpha=float(RANK), targets={"unet": UNET_TARGETS})
    shapes = backend.layer_shapes()
    targets = select_targets(spec, shapes)
    backend.add_lora(spec, targets, init_lora_weights(spec, targets, shapes, 0))
    if checkpointing:
        backend.enable_gradient_checkpointing()
    backend.configure_training(OptimizerSettings(
        betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, clip_grad=False, max_grad_norm=1.0,
        loss_scaler_type="dynamic", init_loss_scale=65536.0, loss_scale_factor=2.0, scale_window=1000,
        use_ema=False, ema_decay=0.9999))
    _, case_side, batch = CASES[case]
    side = side or case_side
    rng = np.random.default_rng(0)
    latent = info.latent_shape(batch, side)
    timesteps = np.full(batch, 500, np.int64)
    sqrt_alpha, sqrt_one_minus = cfg.noise_schedule().coefficients(timesteps)
    data = {"pixels": np.tanh(rng.standard_normal((batch, 3, side, side))).astype(np.float32),
            "token_ids": tokenizer(["a red circle on a blue background"] * batch),
            "posterior_noise": rng.standard_normal(latent).astype(np.float32),
            "noise": rng.standard_normal(latent).astype(np.float32), "timesteps": timesteps,
            "sqrt_alpha": sqrt_alpha, "sqrt_one_minus_alpha": sqrt_one_minus}
    return backend, data, unet_params


def step_batch(backend, data: dict, encoded=None):
    """The StepBatch of `data`: the images and prompt encoded now, or `encoded` (mean, std, context) from a cache."""
    from msd_lora.backends.base import StepBatch

    mean, std = encoded[:2] if encoded else backend.encode_moments(data["pixels"])
    context = encoded[2] if encoded else backend.encode_text(data["token_ids"])
    rest = {k: data[k] for k in ("posterior_noise", "noise", "timesteps", "sqrt_alpha", "sqrt_one_minus_alpha")}
    return StepBatch(latent_mean=mean, latent_std=std, context=context, **rest)


def unet_forward_backward(backend, latents: np.ndarray, context):
    """The UNet forward and backward with gradients to its input only (no LoRA gradient): the floor."""
    if backend.name == "torch":
        x = backend.tensor(latents)
        t = backend.tensor(np.full(len(latents), 500, np.int64))

        def step():
            xi = x.clone().requires_grad_(True)
            backend.unet(xi, t, context).sample.float().pow(2).mean().backward()
        return step
    import mindspore as ms

    x, t = ms.Tensor(latents), ms.Tensor(np.full(len(latents), 500, np.float32))

    def objective(x, t, context):
        return (backend.unet(x, t, context)[0] ** 2).mean()

    grad = ms.jit(ms.grad(objective, 0))
    return lambda: grad(x, t, context).asnumpy()


def measurement(backend_name: str, case: str, name: str, path: Path):
    """(callable to time, UNet parameter count, LoRA parameter count)."""
    from msd_lora.backends.probe import probe_for
    from msd_lora.lora.core import to_tensors

    backend, data, unet_params = setup(backend_name, case, path)
    lora_params = int(sum(v.size for v in to_tensors(backend.lora_weights()).values()))
    context = backend.encode_prompts(data["token_ids"])
    latents = data["noise"]
    if name == "forward":
        fn = lambda: backend.numpy(backend.denoise(backend.tensor(latents), 500, [context])[0])  # noqa: E731
    elif name == "encode":
        probe = probe_for(backend)
        fn = lambda: (probe.encode_images(data["pixels"], data["posterior_noise"]),  # noqa: E731
                      backend.encode_text(data["token_ids"]))
    elif name == "frozen_forward_backward":
        fn = unet_forward_backward(backend, latents, context)
    elif name == "cached_train_step":
        encoded = (*backend.encode_moments(data["pixels"]), backend.encode_text(data["token_ids"]))
        fn = lambda: backend.train_step(step_batch(backend, data, encoded), 1e-4, update=True,  # noqa: E731
                                        accumulation=1)
    else:
        fn = lambda: backend.train_step(step_batch(backend, data), 1e-4, update=True, accumulation=1)  # noqa: E731
    return fn, unet_params, lora_params


def worker(backend: str, case: str, name: str, path: str, repeats: int) -> dict:
    fn, params, lora_params = measurement(backend, case, name, Path(path))
    first, median = timed(fn, repeats)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"first_ms": round(first, 1), "median_ms": round(median, 2), "peak_rss_mb": round(peak_mb),
            "unet_params": params, "lora_params": lora_params}


def run_worker(backend: str, case: str, name: str, path: Path, repeats: int) -> dict:
    command = [sys.executable, __file__, "--worker", backend, case, name, str(path), "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{backend} {case} {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_case(backend: str, case: str, path: Path, repeats: int) -> dict:
    runs = {m: run_worker(backend, case, m, path, repeats) for m in MEASUREMENTS}
    _, side, batch = CASES[case]
    ms = {m: runs[m]["median_ms"] for m in MEASUREMENTS}
    floor = ms["encode"] + ms["frozen_forward_backward"]
    result = {"model": case, "image_side": side, "batch": batch, "unet_params": runs["forward"]["unet_params"],
              "lora_params": runs["train_step"]["lora_params"], **{f"{m}_ms": ms[m] for m in MEASUREMENTS},
              "first_train_step_ms": runs["train_step"]["first_ms"],
              "train_step_over_floor": round(ms["train_step"] / floor, 3),
              "peak_rss_mb": {m: runs[m]["peak_rss_mb"] for m in MEASUREMENTS}}
    if backend == "mindspore":
        result["compile_ms"] = {m: round(runs[m]["first_ms"] - runs[m]["median_ms"], 1) for m in MEASUREMENTS}
    return result


def ratios(ours: dict, reference: dict) -> dict:
    return {m: round(ours[f"{m}_ms"] / reference[f"{m}_ms"], 3) for m in MEASUREMENTS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="torch", choices=("torch", "mindspore"))
    p.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(REPO / "benchmarks/results"))
    p.add_argument("--worker", nargs=4, metavar=("BACKEND", "CASE", "MEASUREMENT", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats)))
        return
    import torch

    report = {"benchmark": "train_step", "backend": args.backend, "device": "cpu", "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "repeats": args.repeats, "lora": {"rank": RANK, "targets": list(UNET_TARGETS)},
              "floor": "encode + frozen_forward_backward"}
    if args.backend == "mindspore":
        import mindspore

        report["mindspore"] = mindspore.__version__
    cases = []
    with tempfile.TemporaryDirectory(prefix="msd_lora_bench_") as scratch:
        for case in args.models:
            path = model_path(case, Path(scratch))
            if case != "tiny":
                write_random_model(case, path)
            reference = measure_case("torch", case, path, args.repeats)
            if args.backend == "torch":
                cases.append(reference)
                continue
            ours = measure_case("mindspore", case, path, args.repeats)
            cases.append({"model": case, "mindspore": ours, "torch": reference,
                          "mindspore_over_torch": ratios(ours, reference)})
    report["cases"] = cases
    out = Path(args.out) / f"train_step_{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
