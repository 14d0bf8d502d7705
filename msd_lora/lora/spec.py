"""What a LoRA is: rank, alpha, which layers, how it starts. Backend-neutral.

A backend lists its linear layers (`name -> (out_features, in_features)`); `select_targets` picks the
ones a spec names, and `init_lora_weights` draws their first values in numpy, so both backends start
from the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from msd_lora.errors import LoraSpecError
from msd_lora.lora.core import COMPONENTS, LoraLayer, LoraWeights, module_key


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: dict[str, tuple[str, ...]]  # component ("unet", "text_encoder") -> module name suffixes
    init: str = "kaiming"  # "kaiming" (uniform, bound 1/sqrt(fan_in)) or "gaussian" (std 1/rank)
    fp16: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, cfg) -> LoraSpec:
        targets = {}
        if cfg.lora_ft_unet:
            targets["unet"] = tuple(cfg.lora_target_modules)
        if cfg.lora_ft_text_encoder:
            targets["text_encoder"] = tuple(cfg.lora_te_target_modules)
        return cls(rank=cfg.lora_rank, alpha=float(cfg.lora_alpha), targets=targets, init=cfg.lora_init,
                   fp16=cfg.lora_fp16)


def matches(module_name: str, suffixes: tuple[str, ...]) -> bool:
    """True when the module's dotted name is, or ends with, one of the suffixes (peft's rule)."""
    return any(module_name == s or module_name.endswith("." + s) for s in suffixes)


def select_targets(spec: LoraSpec, linear_shapes: dict[str, dict[str, tuple[int, int]]]) -> dict[str, list[str]]:
    """Module names per component that get a LoRA; raise when a target list matches nothing or r is too big."""
    selected: dict[str, list[str]] = {}
    for component, suffixes in spec.targets.items():
        if component not in COMPONENTS:
            raise LoraSpecError(f"unknown component {component!r}; expected one of {COMPONENTS}")
        shapes = linear_shapes[component]
        names = sorted(n for n in shapes if matches(n, suffixes))
        if not names:
            examples = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in shapes})[:12])
            raise LoraSpecError(f"no {component} linear layer matches targets {list(suffixes)}; "
                                f"layer names end with e.g. {examples}")
        for name in names:
            out_f, in_f = shapes[name]
            if spec.rank > min(out_f, in_f):
                raise LoraSpecError(f"lora_rank {spec.rank} is larger than {component} layer {name} "
                                    f"({out_f}x{in_f}); use lora_rank <= {min(out_f, in_f)}")
        selected[component] = names
    return selected


def init_lora_weights(spec: LoraSpec, targets: dict[str, list[str]],
                      linear_shapes: dict[str, dict[str, tuple[int, int]]], seed: int) -> LoraWeights:
    """First LoRA weights: lora_A random (per spec.init), lora_B zero, so the model starts unchanged."""
    rng = np.random.default_rng([seed, 0x10AA])
    weights: LoraWeights = {}
    for component in sorted(targets):
        for name in targets[component]:
            out_f, in_f = linear_shapes[component][name]
            if spec.init == "gaussian":
                down = rng.normal(0.0, 1.0 / spec.rank, (spec.rank, in_f))
            elif spec.init == "kaiming":
                bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform with a=sqrt(5), as nn.Linear and peft use
                down = rng.uniform(-bound, bound, (spec.rank, in_f))
            else:
                raise LoraSpecError(f"unknown lora_init {spec.init!r}; expected 'kaiming' or 'gaussian'")
            weights[module_key(component, name)] = LoraLayer(
                down=down.astype(np.float32), up=np.zeros((out_f, spec.rank), np.float32), alpha=spec.alpha)
    return weights
