"""LoRA arithmetic in numpy, once for every backend and tool: W' = W + scale * (alpha / rank) * B @ A (DoRA:
`dora_delta`).

Works on state dicts keyed `<component>.<module>.weight`. Linear LoRAs have A (r, in) and B (out, r);
convolution LoRAs (LoCon, kohya conv_dim) have A (r, in, kh, kw) and B (out, r, 1, 1), and their update is
B @ A.reshape(r, -1) reshaped to the kernel. A linear LoRA on a 1x1 convolution (SD1's proj_in) and the
reverse are the same numbers in another shape. Updates are summed in float64 and cast once, so merging
then unmerging gives the base back to float rounding. `extract_lora` goes the other way: a truncated SVD
of the difference of two models.
"""
from __future__ import annotations

import numpy as np

from msd_lora.errors import LoraMismatchError
from msd_lora.lora.core import LoraLayer, LoraWeights, base_weight_name, split_module_key


def update_shape(layer: LoraLayer) -> tuple[int, ...]:
    """Shape of the weight update: (out, in) for linear LoRAs, (out, in, kh, kw) for convolution LoRAs."""
    return (int(layer.up.shape[0]),) + tuple(int(s) for s in layer.down.shape[1:])


def fits(layer: LoraLayer, base_shape: tuple[int, ...]) -> bool:
    """True when the LoRA's update can be added to a weight of `base_shape` (same numbers, maybe reshaped)."""
    shape = update_shape(layer)
    if layer.up.shape[1] != layer.down.shape[0] or int(np.prod(layer.up.shape[2:])) != 1:
        return False
    if tuple(base_shape) == shape:
        return True
    squeeze = lambda s: tuple(d for i, d in enumerate(s) if i < 2 or d != 1)  # noqa: E731 - 1x1 kernels
    return squeeze(tuple(base_shape)) == squeeze(shape)


def delta(layer: LoraLayer, scale: float = 1.0, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """scale * alpha/rank * B @ A in float64, in `shape` (default: the LoRA's own update shape)."""
    up = layer.up.reshape(layer.up.shape[0], -1).astype(np.float64)
    down = layer.down.reshape(layer.down.shape[0], -1).astype(np.float64)
    return (scale * layer.scale * (up @ down)).reshape(shape or update_shape(layer))


def dora_delta(layer: LoraLayer, base: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The change a DoRA layer makes to `base` (float64, base's shape), at strength `scale`:
    `scale * (magnitude * V / ||V|| - W)` with `V = W + alpha/rank * B @ A`, the norm over every axis but the
    magnitude's (per output channel for peft, per input channel for LyCORIS' default). A strength other than 1
    moves that far along the full change (ComfyUI's and A1111's rule; peft instead rescales B @ A inside the norm)."""
    weight = base.astype(np.float64)
    direction = weight + delta(layer, 1.0, weight.shape)
    magnitude = layer.magnitude.astype(np.float64)
    magnitude = magnitude.reshape(magnitude.shape + (1,) * (weight.ndim - magnitude.ndim))  # a linear LoRA on a 1x1 conv
    axes = tuple(i for i in range(weight.ndim) if magnitude.shape[i] == 1)
    norm = np.sqrt((direction**2).sum(axis=axes, keepdims=True))
    return scale * (magnitude * direction / norm - weight)


def base_name(key: str) -> str:
    """'unet.a.b.to_q' -> 'unet.a.b.to_q.weight': the frozen weight a LoRA layer updates."""
    component, module = split_module_key(key)
    return f"{component}.{base_weight_name(module)}"


def check_fits(weights: LoraWeights, base_shapes: dict[str, tuple[int, ...]], source: str = "LoRA",
               hint: str = "") -> None:
    """Raise LoraMismatchError listing missing layers and shape mismatches (first few of each) and the likely cause."""
    missing, wrong = [], []
    for key, layer in weights.items():
        name = base_name(key)
        if name not in base_shapes:
            missing.append(key)
        elif not fits(layer, tuple(base_shapes[name])):
            wrong.append(f"{key}: LoRA gives {'x'.join(map(str, update_shape(layer)))} (A {tuple(layer.down.shape)}, "
                         f"B {tuple(layer.up.shape)}), model has {'x'.join(map(str, base_shapes[name]))}")
    if missing or wrong:
        from msd_lora.lora.diagnose import likely_cause

        lines = [f"{source} does not fit this model:"]
        if missing:
            lines.append(f"  {len(missing)} of {len(weights)} layers not in the model, e.g. " + ", ".join(missing[:3]))
        if wrong:
            lines.append(f"  {len(wrong)} layers with other shapes, e.g.\n    " + "\n    ".join(wrong[:3]))
        lines.append("  Likely cause: " + (hint or likely_cause(weights, base_shapes)))
        raise LoraMismatchError("\n".join(lines))


def merged_weights(base: dict[str, np.ndarray], loras: list[tuple[LoraWeights, float]],
                   source: str = "LoRA") -> dict[str, np.ndarray]:
    """New values of the base weights touched by one or more (LoRA, scale) pairs; inputs unchanged.

    A negative scale subtracts: `merged_weights(merged, [(lora, -s)])` unmerges `(lora, s)`.
    """
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    for weights, _ in loras:
        check_fits(weights, shapes, source)
    totals: dict[str, np.ndarray] = {}
    for weights, scale in loras:
        for key, layer in weights.items():
            name = base_name(key)
            if layer.magnitude is not None:
                update = dora_delta(layer, base[name], scale)
            else:
                update = delta(layer, scale, shapes[name])
            totals[name] = totals[name] + update if name in totals else update
    return {name: (base[name].astype(np.float64) + total).astype(base[name].dtype) for name, total in totals.items()}


def unmerged_weights(merged: dict[str, np.ndarray], loras: list[tuple[LoraWeights, float]]) -> dict[str, np.ndarray]:
    """The base weights before `loras` were merged at their scales (plain LoRAs only: a DoRA's change depends on
    the weight it was merged into, so undoing it needs that weight, not a subtraction)."""
    if any(layer.magnitude is not None for weights, _ in loras for layer in weights.values()):
        raise LoraMismatchError("a DoRA cannot be unmerged by subtraction: keep the base weights and restore them")
    return merged_weights(merged, [(weights, -scale) for weights, scale in loras])


def merge_into_state(state: dict[str, dict[str, np.ndarray]], loras: list[tuple[LoraWeights, float]],
                     source: str = "LoRA") -> dict[str, dict[str, np.ndarray]]:
    """Apply (LoRA, scale) pairs to a PretrainedModel-style state {network: {param: array}}, returning new arrays."""
    flat = {f"{network}.{name}": value for network in ("unet", "text_encoder") for name, value in state[network].items()}
    new = merged_weights(flat, loras, source)
    out = {network: dict(values) for network, values in state.items()}
    for key, value in new.items():
        network, name = key.split(".", 1)
        out[network][name] = value
    return out


def extractable(name: str, include_conv: bool) -> bool:
    """Weights `extract_lora` considers: attention / MLP linears (+ convolutions with include_conv)."""
    if name.startswith("text_encoder."):
        return ".encoder.layers." in name and name.endswith(("_proj.weight", "fc1.weight", "fc2.weight"))
    if not name.startswith("unet.") or not name.endswith(".weight") or ".norm" in name:
        return False
    if ".attentions." in name:
        return True
    return include_conv and (".resnets." in name or "samplers." in name) and "norm" not in name


def extract_lora(base: dict[str, np.ndarray], tuned: dict[str, np.ndarray], rank: int, include_conv: bool = False,
                 min_change: float = 1e-6) -> LoraWeights:
    """A rank-`rank` LoRA (alpha = rank) approximating tuned - base by truncated SVD, per layer.

    Layers whose largest change is below `min_change` x their largest weight are skipped.
    """
    weights: LoraWeights = {}
    for name in sorted(base):
        if name not in tuned or not extractable(name, include_conv) or base[name].ndim not in (2, 4):
            continue
        if tuned[name].shape != base[name].shape:
            raise LoraMismatchError(f"{name}: tuned {tuned[name].shape} vs base {base[name].shape}; "
                                    f"the two models are not the same architecture")
        diff = tuned[name].astype(np.float64) - base[name].astype(np.float64)
        if np.abs(diff).max() <= min_change * max(np.abs(base[name]).max(), 1e-12):
            continue
        matrix = diff.reshape(diff.shape[0], -1)
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        r = min(rank, len(s))
        up = (u[:, :r] * s[:r]).astype(np.float32)
        down = vt[:r].astype(np.float32)
        if diff.ndim == 4:
            up, down = up.reshape(up.shape[0], r, 1, 1), down.reshape((r,) + diff.shape[1:])
        weights[name[: -len(".weight")]] = LoraLayer(down=down, up=up, alpha=float(r))
    return weights
