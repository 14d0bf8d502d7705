"""What a LoRA is in memory, and its canonical names: the vocabulary every other module speaks.

A LoRA is `LoraWeights`: `"<component>.<module path>" -> LoraLayer(down, up, alpha)`, the update being
`W' = W + (alpha / rank) * up @ down`; convolution LoRAs (LoCon) have 4-D factors. A DoRA layer also has a
`magnitude`: `W' = magnitude * V / ||V||` with `V = W + (alpha / rank) * up @ down`, the norm taken per output
channel (peft's `use_dora`; magnitude shape (out, 1) or (out, 1, 1, 1)) or per input channel (LyCORIS' default
`dora_scale`; shape (1, in) or (1, in, 1, 1)); see `lora.merge`.
In code the two factors are always `down` (A: in -> rank) and `up` (B: rank -> out); `lora_A`/`lora_B` (peft,
diffusers: the canonical file keys `<key>.lora_A.weight`) and `lora_down`/`lora_up` (kohya, mindone) are
spellings of file formats, met only where those are read or written.
Per-layer alpha keeps room for files (kohya) whose layers differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from msd_lora.errors import LoraFormatError, LoraMismatchError

COMPONENTS = ("unet", "text_encoder")
DOWN, UP = "lora_A.weight", "lora_B.weight"
MAGNITUDE = "lora_magnitude_vector"  # peft's DoRA magnitude: (out,) for linear layers, (1, out, 1, 1) for convolutions


@dataclass
class LoraLayer:
    down: np.ndarray  # A: (rank, in_features) or (rank, in, kh, kw)
    up: np.ndarray  # B: (out_features, rank) or (out, rank, 1, 1)
    alpha: float
    magnitude: np.ndarray | None = None  # DoRA: (out, 1[, 1, 1]) per output or (1, in[, 1, 1]) per input channel

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
    """Flatten to canonical safetensors keys; DoRA magnitudes in peft's shape (per output channel only)."""
    tensors = {}
    for key, layer in weights.items():
        tensors[f"{key}.{DOWN}"] = layer.down
        tensors[f"{key}.{UP}"] = layer.up
        if layer.magnitude is not None:
            tensors[f"{key}.{MAGNITUDE}"] = peft_magnitude(key, layer)
    return tensors


def peft_magnitude(key: str, layer: LoraLayer) -> np.ndarray:
    """A DoRA magnitude as peft holds it: (out,) for a linear layer, (1, out, 1, 1) for a convolution."""
    out = layer.up.shape[0]
    if layer.magnitude.shape[0] != out or layer.magnitude.size != out:
        raise LoraFormatError(f"{key}: this DoRA normalises per input channel (LyCORIS' dora_scale of shape "
                              f"{tuple(layer.magnitude.shape)}); peft and diffusers hold only per-output-channel "
                              f"magnitudes: keep it in kohya format (--to kohya)")
    return layer.magnitude.reshape(out) if layer.down.ndim == 2 else layer.magnitude.reshape(1, out, 1, 1)


def magnitude_from_peft(value: np.ndarray, down: np.ndarray) -> np.ndarray:
    """peft's (out,) / (1, out, 1, 1) magnitude in our per-output-channel shape (out, 1[, 1, 1])."""
    value = np.asarray(value)
    return value.reshape(value.size, *[1] * (down.ndim - 1))


def from_tensors(tensors: dict[str, np.ndarray], alphas: dict[str, float] | float | None,
                 source: str = "LoRA file") -> LoraWeights:
    """Group canonical keys into layers; `alphas` per module key, one number, or None (alpha = rank)."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        for part in (DOWN, UP, MAGNITUDE):
            if name.endswith("." + part):
                modules.setdefault(name[: -len(part) - 1], {})[part] = value
                break
        else:
            raise LoraFormatError(f"{source}: {name!r} is not a canonical LoRA key (…{DOWN} / …{UP} / …{MAGNITUDE})")
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
        magnitude = magnitude_from_peft(parts[MAGNITUDE], down) if MAGNITUDE in parts else None
        if magnitude is not None and magnitude.shape[0] != up.shape[0]:
            raise LoraFormatError(f"{source}: {key}.{MAGNITUDE} has {magnitude.shape[0]} values for a layer with "
                                  f"{up.shape[0]} outputs")
        weights[key] = LoraLayer(down=down, up=up, alpha=alpha, magnitude=magnitude)
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
        if (layer.magnitude is None) != (mine.magnitude is None):
            kind = "a DoRA" if layer.magnitude is not None else "a plain LoRA"
            raise LoraMismatchError(f"{key}: {kind} layer, the model's is not: set lora_type to match")
        if layer.magnitude is not None and layer.magnitude.shape != mine.magnitude.shape:
            raise LoraMismatchError(f"{key}: DoRA magnitude of shape {tuple(layer.magnitude.shape)} does not fit the "
                                    f"model's {tuple(mine.magnitude.shape)}")
        if not math.isclose(layer.alpha, mine.alpha, rel_tol=1e-6):
            raise LoraMismatchError(f"{key}: alpha {layer.alpha:g} differs from the model's lora_alpha {mine.alpha:g}, "
                                    f"which would rescale the update by {mine.alpha / layer.alpha:g}: set lora_alpha: "
                                    f"{layer.alpha:g}")
