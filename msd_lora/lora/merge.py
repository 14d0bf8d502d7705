"""LoRA arithmetic in numpy: W' = W + scale * (alpha / rank) * B @ A, merge and check fit.

Works on any state dict of numpy arrays whose keys are `<component>.<module>.weight`.
"""
from __future__ import annotations

import numpy as np

from msd_lora.lora.keys import LoraLayer, LoraWeights, base_weight_name, split_module_key


class LoraMismatchError(ValueError):
    """A LoRA names layers the model lacks, or its shapes don't fit the model's."""


def delta(layer: LoraLayer, scale: float = 1.0) -> np.ndarray:
    """The weight update of one layer, float32, in the base weight's (out, in) shape."""
    up = layer.up.astype(np.float64)
    down = layer.down.astype(np.float64)
    return (scale * layer.scale * (up @ down)).astype(np.float32)


def check_fits(weights: LoraWeights, base_shapes: dict[str, tuple[int, ...]], source: str = "LoRA") -> None:
    """Raise LoraMismatchError listing missing layers and shape mismatches (first few of each)."""
    missing, wrong = [], []
    for key, layer in weights.items():
        component, module = split_module_key(key)
        name = f"{component}.{base_weight_name(module)}"
        if name not in base_shapes:
            missing.append(key)
            continue
        expected = tuple(base_shapes[name][:2])
        got = (layer.up.shape[0], layer.down.shape[1])
        if expected != got or layer.up.shape[1] != layer.down.shape[0]:
            wrong.append(f"{key}: LoRA gives {got[0]}x{got[1]} (A {tuple(layer.down.shape)}, "
                         f"B {tuple(layer.up.shape)}), model has {expected[0]}x{expected[1]}")
    if missing or wrong:
        lines = [f"{source} does not fit this model:"]
        if missing:
            lines.append(f"  {len(missing)} of {len(weights)} layers not in the model, e.g. "
                         + ", ".join(missing[:3]))
        if wrong:
            lines.append(f"  {len(wrong)} layers with other shapes, e.g.\n    " + "\n    ".join(wrong[:3]))
        lines.append("  Likely cause: the LoRA was trained on a different base model "
                     "(e.g. SD2 vs SD1.5, or another model size).")
        raise LoraMismatchError("\n".join(lines))


def merged_weights(base: dict[str, np.ndarray], loras: list[tuple[LoraWeights, float]]) -> dict[str, np.ndarray]:
    """New values of the base weights touched by one or more (LoRA, scale) pairs; inputs unchanged."""
    shapes = {k: v.shape for k, v in base.items()}
    for weights, _ in loras:
        check_fits(weights, shapes)
    out: dict[str, np.ndarray] = {}
    for weights, scale in loras:
        for key, layer in weights.items():
            component, module = split_module_key(key)
            name = f"{component}.{base_weight_name(module)}"
            current = out.get(name, base[name])
            out[name] = (current.astype(np.float32) + delta(layer, scale)).astype(base[name].dtype)
    return out
