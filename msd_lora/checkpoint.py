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
from msd_lora.optimizers import SCALARS, state_shapes

RESUME_FORMAT = "msd_lora.resume/1"
RESUME_NAME = "train_resume.safetensors"


@dataclass
class ResumeState:
    step: int  # optimizer steps completed
    lora: LoraWeights
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # backend training state
    scalars: dict[str, Any] = field(default_factory=dict)  # backend scalars + loop counters


OPTIMIZER, EMA = "optimizer", "ema"


@dataclass(frozen=True)
class TrainingState:
    """A resume file's backend state after `check_training_state`: every array of a kind present, or none."""

    optimizer_step: int
    optimizer: dict[str, dict[str, np.ndarray]] | None  # state name -> LoRA tensor key -> array; None: fresh
    optimizer_scalars: dict[str, float]  # prodigy's d, d_max, d_numerator (`optimizers.SCALARS`)
    ema: dict[str, np.ndarray] | None  # None: the EMA starts from the weights
    loss_scale: float | None  # the dynamic scaler's scale; None: not recorded (keep init_loss_scale)
    scaler_growth_tracker: int


def check_training_state(arrays: dict[str, np.ndarray], scalars: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                         optimizer: str = "adamw", source: str = "resume state") -> TrainingState:
    """Check backend arrays (`optimizer.<state>.<key>` as `optimizers.state_shapes` says for `optimizer`,
    `ema.<key>`) against the model's LoRA tensor shapes: no unknown keys, no wrong shapes, each kind complete or
    absent, written by the same optimizer."""
    written_by = scalars.get("optimizer", "adamw")  # files from before other optimizers existed are AdamW's
    step = int(scalars.get("optimizer_step", 0))
    if step > 0 and written_by != optimizer:
        raise ResumeError(f"{source} holds {written_by}'s state at optimizer step {step}; this run uses {optimizer}: "
                          f"set optim: {written_by} to resume it")
    expected = {key: state_shapes(optimizer, shape) for key, shape in shapes.items()}
    found: dict[str, dict[str, np.ndarray]] = {}
    ema: dict[str, np.ndarray] = {}
    unknown = []
    for name, value in arrays.items():
        if name.startswith(EMA + "."):
            key, kind, want = name[len(EMA) + 1:], EMA, shapes.get(name[len(EMA) + 1:])
        elif name.startswith(OPTIMIZER + "."):
            kind, _, key = name[len(OPTIMIZER) + 1:].partition(".")
            want = expected.get(key, {}).get(kind)
        else:
            key, kind, want = "", "", None
        if want is None:
            unknown.append(name)
            continue
        if tuple(value.shape) != tuple(want):
            raise ResumeError(f"{source}: {name} has shape {tuple(value.shape)}, this run's LoRA needs {tuple(want)}: "
                              f"it was written with another lora_rank")
        (ema if kind == EMA else found.setdefault(kind, {}))[key] = value
    if unknown:
        raise ResumeError(f"{source}: {len(unknown)} arrays fit no LoRA tensor of this model (e.g. {unknown[:2]}): "
                          "it was written for other lora targets or another model")
    if ema and len(ema) != len(shapes):
        raise ResumeError(f"{source}: ema holds {len(ema)} of the {len(shapes)} LoRA tensors (missing e.g. "
                          f"{sorted(set(shapes) - set(ema))[:2]}): the file is incomplete")
    wanted = {(kind, key) for key, kinds in expected.items() for kind in kinds}
    present = {(kind, key) for kind, values in found.items() for key in values}
    if (present or step > 0) and present != wanted:
        missing = sorted(f"{OPTIMIZER}.{kind}.{key}" for kind, key in wanted - present)
        raise ResumeError(f"{source}: {len(missing)} of {optimizer}'s {len(wanted)} state arrays are missing (e.g. "
                          f"{missing[:2]}) at optimizer step {step}: the file is incomplete")
    names = [n for n in SCALARS[optimizer] if n != "optimizer_step"]
    if step > 0 and any(n not in scalars for n in names):
        raise ResumeError(f"{source}: {optimizer}'s scalars {names} are missing: the file is incomplete")
    loss_scale = scalars.get("loss_scale")
    return TrainingState(optimizer_step=step, optimizer=found if step else None,
                         optimizer_scalars={n: float(scalars[n]) for n in names} if step else {},
                         ema=ema or None, loss_scale=None if loss_scale is None else float(loss_scale),
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
