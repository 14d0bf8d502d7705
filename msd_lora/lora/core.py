"""What a LoRA is in memory, and its canonical names: the vocabulary every other module speaks.

A LoRA is `LoraWeights`: `"<component>.<module path>" -> LoraLayer(down, up, alpha)`, the update being
`W' = W + (alpha / rank) * up @ down`. In code the two factors are always `down` (A: in -> rank) and `up`
(B: rank -> out); `lora_A`/`lora_B` (peft, diffusers: the canonical file keys `<key>.lora_A.weight`) and
`lora_down`/`lora_up` (kohya, mindone) are spellings of file formats, met only where those are read or written.
Per-layer alpha keeps room for files (kohya) whose layers differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from msd_lora.errors import LoraFormatError, LoraMismatchError

COMPONENTS = ("unet", "text_encoder")
DOWN, UP = "lora_A.weight", "lora_B.weight"


@dataclass
class LoraLayer:
    down: np.ndarray  # A: (rank, in_features)
    up: np.ndarray  # B: (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


LoraWeights = dict[str, LoraLayer]


def module_key(component: str, module: str) -> str:
    return f"{component}.{module}"


def split_module_key(key: str) -> tuple[str, str]:
    """'unet.down_blocks.0...to_q' -> ('unet', 'down_blocks.0...to_q')."""
    component, _, module = key.partition(".")
    if component not in COMPONENTS or not module:
        raise LoraFormatError(f"LoRA key {key!r} does not start with one of {COMPONENTS}")
    return component, module


def to_tensors(weights: LoraWeights) -> dict[str, np.ndarray]:
    """Flatten to canonical safetensors keys."""
    tensors = {}
    for key, layer in weights.items():
        tensors[f"{key}.{DOWN}"] = layer.down
        tensors[f"{key}.{UP}"] = layer.up
    return tensors


def from_tensors(tensors: dict[str, np.ndarray], alphas: dict[str, float] | float | None,
                 source: str = "LoRA file") -> LoraWeights:
    """Group canonical keys into layers; `alphas` per module key, one number, or None (alpha = rank)."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        for part in (DOWN, UP):
            if name.endswith("." + part):
                modules.setdefault(name[: -len(part) - 1], {})[part] = value
                break
        else:
            raise LoraFormatError(f"{source}: {name!r} is not a canonical LoRA key (…{DOWN} / …{UP})")
    weights = {}
    for key, parts in modules.items():
        if DOWN not in parts or UP not in parts:
            missing = DOWN if DOWN not in parts else UP
            raise LoraFormatError(f"{source}: LoRA layer {key!r} has no {missing}")
        down, up = parts[DOWN], parts[UP]
        if isinstance(alphas, dict):
            alpha = alphas.get(key, float(down.shape[0]))
        else:
            alpha = float(down.shape[0]) if alphas is None else float(alphas)
        weights[key] = LoraLayer(down=down, up=up, alpha=alpha)
    return weights


def base_weight_name(module: str) -> str:
    """Name of the frozen weight a LoRA on `module` updates."""
    return f"{module}.weight"


def check_lora_fits(weights: LoraWeights, model: LoraWeights) -> None:
    """Raise ValueError naming the layers, shapes or alphas where `weights` differ from a model's live LoRA."""
    extra, missing = sorted(set(weights) - set(model)), sorted(set(model) - set(weights))
    if extra or missing:
        raise LoraMismatchError(f"LoRA layers differ from the model's: {len(missing)} missing (e.g. {missing[:2]}), "
                                f"{len(extra)} unexpected (e.g. {extra[:2]}): trained with other lora targets?")
    for key, layer in weights.items():
        mine = model[key]
        for part, given, expected in ((DOWN, layer.down, mine.down), (UP, layer.up, mine.up)):
            if tuple(given.shape) != tuple(expected.shape):
                raise LoraMismatchError(f"{key}.{part}: shape {tuple(given.shape)} does not fit the model's "
                                        f"{tuple(expected.shape)} (rank {layer.rank} here, lora_rank {mine.rank} there)")
        if not math.isclose(layer.alpha, mine.alpha, rel_tol=1e-6):
            raise LoraMismatchError(f"{key}: alpha {layer.alpha:g} differs from the model's lora_alpha {mine.alpha:g}, "
                                    f"which would rescale the update by {mine.alpha / layer.alpha:g}: set lora_alpha: "
                                    f"{layer.alpha:g}")
