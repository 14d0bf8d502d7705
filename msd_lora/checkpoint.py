"""Resume state: LoRA weights, optimizer moments, EMA, loss scale and loop position in one safetensors file.

Arrays are keyed by canonical LoRA names, so the file is backend-neutral; scalars live in the metadata
as json. Written atomically: a run killed while saving keeps its previous state.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from msd_lora.errors import ResumeError, TensorFileError
from msd_lora.files.safetensors_file import read_safetensors, write_safetensors
from msd_lora.lora.core import LoraWeights, from_tensors, to_tensors

RESUME_FORMAT = "msd_lora.resume/1"
RESUME_NAME = "train_resume.safetensors"


@dataclass
class ResumeState:
    step: int  # optimizer steps completed
    lora: LoraWeights
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # backend training state
    scalars: dict[str, Any] = field(default_factory=dict)  # backend scalars + loop counters


MOMENTS = ("optimizer.exp_avg", "optimizer.exp_avg_sq")
EMA = "ema"


@dataclass(frozen=True)
class TrainingState:
    """A resume file's backend state after `check_training_state`: every array of a kind present, or none."""

    optimizer_step: int
    exp_avg: dict[str, np.ndarray] | None  # AdamW moments by canonical LoRA tensor key; None: fresh optimizer
    exp_avg_sq: dict[str, np.ndarray] | None
    ema: dict[str, np.ndarray] | None  # None: the EMA starts from the weights
    loss_scale: float | None  # the dynamic scaler's scale; None: not recorded (keep init_loss_scale)
    scaler_growth_tracker: int


def check_training_state(arrays: dict[str, np.ndarray], scalars: dict[str, Any],
                         shapes: dict[str, tuple[int, ...]], source: str = "resume state") -> TrainingState:
    """Check backend arrays (`optimizer.exp_avg.<key>`, `optimizer.exp_avg_sq.<key>`, `ema.<key>`) against the
    model's LoRA tensor shapes: no unknown keys, no wrong shapes, each kind complete or absent."""
    groups: dict[str, dict[str, np.ndarray]] = {prefix: {} for prefix in (*MOMENTS, EMA)}
    unknown = []
    for name, value in arrays.items():
        prefix = next((p for p in groups if name.startswith(p + ".")), None)
        key = name[len(prefix) + 1:] if prefix else None
        if key not in shapes:
            unknown.append(name)
            continue
        if tuple(value.shape) != tuple(shapes[key]):
            raise ResumeError(f"{source}: {name} has shape {tuple(value.shape)}, the model's LoRA tensor "
                              f"{tuple(shapes[key])}: it was written with another lora_rank")
        groups[prefix][key] = value
    if unknown:
        raise ResumeError(f"{source}: {len(unknown)} arrays fit no LoRA tensor of this model (e.g. {unknown[:2]}): "
                          "it was written for other lora targets or another model")
    for prefix, found in groups.items():
        if found and len(found) != len(shapes):
            missing = sorted(set(shapes) - set(found))
            raise ResumeError(f"{source}: {prefix} holds {len(found)} of the {len(shapes)} LoRA tensors (missing "
                              f"e.g. {missing[:2]}): the file is incomplete")
    step = int(scalars.get("optimizer_step", 0))
    exp_avg, exp_avg_sq = (groups[p] or None for p in MOMENTS)
    if step > 0 and (exp_avg is None or exp_avg_sq is None):
        raise ResumeError(f"{source}: optimizer step {step} without both AdamW moments: the file is incomplete")
    loss_scale = scalars.get("loss_scale")
    return TrainingState(optimizer_step=step, exp_avg=exp_avg if step else None,
                         exp_avg_sq=exp_avg_sq if step else None, ema=groups[EMA] or None,
                         loss_scale=None if loss_scale is None else float(loss_scale),
                         scaler_growth_tracker=int(scalars.get("scaler_growth_tracker", 0)))


def save_resume(path: str | Path, state: ResumeState) -> None:
    tensors = {f"lora.{k}": np.ascontiguousarray(v, np.float32) for k, v in to_tensors(state.lora).items()}
    tensors.update({k: np.ascontiguousarray(v) for k, v in state.arrays.items()})
    alphas = {k: layer.alpha for k, layer in state.lora.items()}
    meta = {"format": RESUME_FORMAT, "step": str(state.step), "scalars": json.dumps(state.scalars),
            "alphas": json.dumps(alphas)}
    write_safetensors(path, tensors, meta)


def load_resume(path: str | Path) -> ResumeState:
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"resume file {path} does not exist")
    try:
        mapped, meta = read_safetensors(path)
    except TensorFileError as err:
        raise ResumeError(f"resume file {err}") from err
    tensors = {k: np.array(v) for k, v in mapped.items()}  # in memory: training updates them in place
    if meta.get("format") != RESUME_FORMAT:
        raise ResumeError(f"{path} is not an msd-lora resume file (format {meta.get('format')!r}, "
                          f"expected {RESUME_FORMAT!r})")
    lora = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
    arrays = {k: v for k, v in tensors.items() if not k.startswith("lora.")}
    return ResumeState(step=int(meta["step"]), lora=from_tensors(lora, json.loads(meta["alphas"]), str(path)),
                       arrays=arrays, scalars=json.loads(meta["scalars"]))
