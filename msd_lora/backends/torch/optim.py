"""The torch optimizers (the reference implementations: torch's AdamW, prodigyopt's Prodigy, transformers' Adafactor)
and their state as the backend-neutral resume arrays (`msd_lora.optimizers.state_shapes`)."""
from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch

from msd_lora.backends.base import OptimizerSettings
from msd_lora.checkpoint import TrainingState
from msd_lora.optimizers import ADAFACTOR_CLIP_THRESHOLD, ADAFACTOR_DECAY_RATE, ADAFACTOR_EPS, PRODIGY_D0, state_shapes


def make_optimizer(groups: list[dict], settings: OptimizerSettings) -> torch.optim.Optimizer:
    """The optimizer of `settings.optimizer` over param groups (each with its "lr_scale"); rates are set per step."""
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=settings.betas, eps=settings.eps,
                                 weight_decay=settings.weight_decay)
    if settings.optimizer == "prodigy":
        from prodigyopt import Prodigy

        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
            return Prodigy(groups, lr=1.0, betas=settings.betas, eps=settings.eps,
                           weight_decay=settings.weight_decay,
                           decouple=True, use_bias_correction=settings.use_bias_correction,
                           safeguard_warmup=settings.safeguard_warmup, d0=PRODIGY_D0, d_coef=settings.d_coef)
    if settings.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=1e-3, eps=ADAFACTOR_EPS, clip_threshold=ADAFACTOR_CLIP_THRESHOLD,
                         decay_rate=ADAFACTOR_DECAY_RATE, beta1=None, weight_decay=settings.weight_decay,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}")


def _numpy(tensor: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """A state tensor in the resume file's shape (prodigy keeps `s` flat and `p0` as one 0 for an all-zero start)."""
    value = tensor.detach().float().cpu().numpy()
    return np.broadcast_to(value, shape).copy() if value.size == 1 else value.reshape(shape)


def optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter],
                    name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, scalars): `optimizer.<state>.<key>` per LoRA tensor, the step count and the optimizer's scalars."""
    arrays, step = {}, 0
    for key, param in params.items():
        state = optimizer.state.get(param, {})
        if not state:
            continue
        step = int(state["step"])
        for kind, shape in state_shapes(name, tuple(param.shape)).items():
            arrays[f"optimizer.{kind}.{key}"] = _numpy(state[kind], shape)
    scalars: dict[str, Any] = {"optimizer": name, "optimizer_step": step}
    if name == "prodigy":
        group = optimizer.param_groups[0]
        scalars.update(optimizer_step=int(group["k"]), d=float(group["d"]), d_max=float(group["d_max"]),
                       d_numerator=float(group["d_numerator"]))
    return arrays, scalars


def restore_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], name: str,
                            state: TrainingState, tensor) -> None:
    """Put checked resume state (`check_training_state`) back; a fresh optimizer where the state has none."""
    optimizer.state.clear()
    if name == "prodigy":
        for group in optimizer.param_groups:
            if state.optimizer is None:
                group.update(k=0, d=PRODIGY_D0, d_max=PRODIGY_D0, d_numerator=0.0)
            else:
                group.update(k=state.optimizer_step, **state.optimizer_scalars)
    if state.optimizer is None:
        return
    for key, param in params.items():
        entry: dict[str, Any] = {kind: tensor(values[key]) for kind, values in state.optimizer.items()
                                 if key in values}
        if name == "prodigy":
            entry["s"] = entry["s"].flatten()
            entry["p0"] = entry["p0"].flatten()
            entry["step"] = state.optimizer_step
        elif name == "adafactor":
            entry["step"] = state.optimizer_step
            entry["RMS"] = 0
        else:
            entry["step"] = torch.tensor(float(state.optimizer_step))
        optimizer.state[param] = entry
