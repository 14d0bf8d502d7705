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

from msd_lora.io_utils import atomic_write, read_safetensors
from msd_lora.lora.keys import LoraWeights, from_tensors, to_tensors

RESUME_FORMAT = "msd_lora.resume/1"
RESUME_NAME = "train_resume.safetensors"


class ResumeError(ValueError):
    """A resume file is missing, unreadable or from another run layout."""


@dataclass
class ResumeState:
    step: int  # optimizer steps completed
    lora: LoraWeights
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # backend training state
    scalars: dict[str, Any] = field(default_factory=dict)  # backend scalars + loop counters


def save_resume(path: str | Path, state: ResumeState) -> None:
    from safetensors.numpy import save_file

    tensors = {f"lora.{k}": np.ascontiguousarray(v, np.float32) for k, v in to_tensors(state.lora).items()}
    tensors.update({k: np.ascontiguousarray(v) for k, v in state.arrays.items()})
    alphas = {k: layer.alpha for k, layer in state.lora.items()}
    meta = {"format": RESUME_FORMAT, "step": str(state.step), "scalars": json.dumps(state.scalars),
            "alphas": json.dumps(alphas)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_resume(path: str | Path) -> ResumeState:
    path = Path(path)
    tensors, meta = read_safetensors(path, ResumeError, "resume file")
    if meta.get("format") != RESUME_FORMAT:
        raise ResumeError(f"{path} is not an msd-lora resume file (format {meta.get('format')!r}, "
                          f"expected {RESUME_FORMAT!r})")
    lora = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
    arrays = {k: v for k, v in tensors.items() if not k.startswith("lora.")}
    return ResumeState(step=int(meta["step"]), lora=from_tensors(lora, json.loads(meta["alphas"])),
                       arrays=arrays, scalars=json.loads(meta["scalars"]))
