"""The optimizers a run can use and the state each keeps, backend-neutral.

    adamw      torch.optim.AdamW's maths (bias-corrected moments, decoupled weight decay)
    prodigy    Prodigy (Mishchenko & Defazio 2023), as the `prodigyopt` package computes it: AdamW whose step size
               d * lr is estimated from the gradients; lr stays a multiplier (1.0 usual), d starts at d0 = 1e-6
    adafactor  Adafactor as `transformers.optimization.Adafactor` with kohya's LoRA settings (relative_step,
               scale_parameter and warmup_init off, no first moment, decay_rate -0.8, clip_threshold 1.0,
               eps (1e-30, 1e-3)): factored second moments, the learning rate from the run's schedule

A backend's optimizer state crosses the resume file as per-LoRA-tensor arrays `optimizer.<name>.<tensor key>` of the
shapes `state_shapes` gives, plus scalars; the file records which optimizer wrote it, so a resume with another one
is refused instead of misread.
"""
from __future__ import annotations

OPTIMIZERS = ("adamw", "prodigy", "adafactor")
SCALARS = {"adamw": ("optimizer_step",), "prodigy": ("optimizer_step", "d", "d_max", "d_numerator"),
           "adafactor": ("optimizer_step",)}
PRODIGY_D0 = 1e-6
ADAFACTOR_EPS = (1e-30, 1e-3)
ADAFACTOR_DECAY_RATE = -0.8
ADAFACTOR_CLIP_THRESHOLD = 1.0


def factored(shape: tuple[int, ...]) -> bool:
    """Adafactor keeps row and column statistics for tensors of 2+ dimensions (transformers' rule)."""
    return len(shape) >= 2


def state_shapes(optimizer: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The optimizer's per-tensor state arrays (name -> shape) for a LoRA tensor of `shape`."""
    shape = tuple(shape)
    if optimizer == "adamw":
        return {"exp_avg": shape, "exp_avg_sq": shape}
    if optimizer == "prodigy":
        return {"exp_avg": shape, "exp_avg_sq": shape, "s": shape, "p0": shape}
    if optimizer == "adafactor":
        if factored(shape):
            return {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
        return {"exp_avg_sq": shape}
    raise ValueError(f"unknown optimizer {optimizer!r}")
