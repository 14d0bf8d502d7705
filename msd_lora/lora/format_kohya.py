"""kohya sd-scripts / A1111 LoRA files (the civitai format).

    lora_unet_<module path with . -> _>.lora_down.weight   A: (r, in) or (r, in, kh, kw) for conv (LoCon)
    lora_unet_<...>.lora_up.weight                        B: (out, r) or (out, r, 1, 1)
    lora_unet_<...>.alpha                                  scalar; update scale alpha / r (absent: alpha = r)
    lora_unet_<...>.dora_scale                             DoRA magnitude (LyCORIS): (out, 1[, 1, 1]) per output
                                                           channel, as msd-lora and peft train, or (1, in[, 1, 1])
                                                           per input channel (LyCORIS' default, OneTrainer)
    lora_te_<text encoder module path>...                  e.g. lora_te_text_model_encoder_layers_0_self_attn_q_proj
metadata: ss_* strings (ss_network_dim, ss_network_alpha, ss_v2, ...). UNet names are diffusers module paths
(sd-scripts) or LDM cell paths (some A1111-era trainers); both resolve through the ModuleIndex.
"""
from __future__ import annotations

import json

import numpy as np

from msd_lora.errors import LoraFormatError
from msd_lora.lora.core import LoraLayer, LoraWeights, split_module_key
from msd_lora.lora.metadata import most_common
from msd_lora.lora.module_index import ModuleIndex, flat

PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "magnitude"}
NOT_LORA = {"hada_w1_a": "a LyCORIS LoHa", "hada_w1_b": "a LyCORIS LoHa", "lokr_w1": "a LyCORIS LoKr",
            "lokr_w1_a": "a LyCORIS LoKr", "lora_mid.weight": "a LoCon with Tucker decomposition (lora_mid)",
            "diff": "a full-weight difference (LyCORIS 'full')", "diff_b": "a LyCORIS 'full'"}


def is_kohya(keys) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


def _split(name: str) -> tuple[str, str]:
    """'lora_unet_x_y.lora_down.weight' -> ('lora_unet_x_y', 'lora_down.weight')."""
    stem, _, part = name.partition(".")
    return stem, part


def read_kohya(tensors: dict[str, np.ndarray], index: ModuleIndex, source: str) -> LoraWeights:
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in tensors):
        raise LoraFormatError(f"{source} is an SDXL LoRA (lora_te1_ / lora_te2_ keys: two text encoders); "
                              f"it cannot be used with SD 1.x / 2.x models")
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        stem, part = _split(name)
        if part in NOT_LORA:
            raise LoraFormatError(f"{source} is {NOT_LORA[part]} file ({name}), not a LoRA; only LoRA / LoCon "
                                  f"(lora_down / lora_up) files are supported")
        if part not in PARTS or not stem.startswith(tuple(PREFIXES)):
            raise LoraFormatError(f"{source}: key {name!r} is not a kohya LoRA key (lora_unet_* / lora_te_* with "
                                  f".lora_down.weight, .lora_up.weight or .alpha)")
        groups.setdefault(stem, {})[PARTS[part]] = value
    weights: LoraWeights = {}
    unresolved = []
    for stem, parts in sorted(groups.items()):
        if "down" not in parts or "up" not in parts:
            raise LoraFormatError(f"{source}: {stem} has no {'lora_down' if 'down' not in parts else 'lora_up'}.weight")
        prefix = next(p for p in PREFIXES if stem.startswith(p))
        component = PREFIXES[prefix]
        module = index.resolve_flat(component, stem[len(prefix):])
        if module is None:
            unresolved.append(stem)
            continue
        down = parts["down"]
        alpha = float(np.asarray(parts["alpha"], np.float64).reshape(-1)[0]) if "alpha" in parts else float(down.shape[0])
        magnitude = parts.get("magnitude")
        if magnitude is not None:
            magnitude = check_dora_scale(np.asarray(magnitude), down, parts["up"], f"{source}: {stem}.dora_scale")
        weights[f"{component}.{module}"] = LoraLayer(down=down, up=parts["up"], alpha=alpha, magnitude=magnitude)
    if unresolved:
        from msd_lora.lora.diagnose import kohya_cause

        raise LoraFormatError(f"{source}: {len(unresolved)} of {len(groups)} kohya layers name no module of this "
                              f"model, e.g. {', '.join(unresolved[:3])}\n  Likely cause: {kohya_cause(unresolved)}")
    return weights


def check_dora_scale(scale: np.ndarray, down: np.ndarray, up: np.ndarray, where: str) -> np.ndarray:
    """A dora_scale in keepdim form: per output channel (out, 1, ...) or per input channel (1, in, ...)."""
    out, fan_in, ndim = up.shape[0], down.shape[1], down.ndim
    if scale.size == out and scale.shape[0] == out:
        return scale.reshape(out, *[1] * (ndim - 1))
    if scale.size == fan_in and scale.ndim >= 2 and scale.shape[1] == fan_in:
        return scale.reshape(1, fan_in, *[1] * (ndim - 2))
    raise LoraFormatError(f"{where} has shape {tuple(scale.shape)}: a DoRA scale is (out, 1) per output channel or "
                          f"(1, in) per input channel, here out = {out}, in = {fan_in}")


def _sd_version(weights: LoraWeights) -> str:
    widths = {layer.down.shape[1] for key, layer in weights.items() if key.endswith("attn2.to_k")}
    return {768: "sd_v1", 1024: "sd_v2"}.get(widths.pop(), "") if len(widths) == 1 else ""


def write_kohya(weights: LoraWeights, dtype: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) in sd-scripts' layout, diffusers-style module names, alpha per layer."""
    tensors: dict[str, np.ndarray] = {}
    for key, layer in weights.items():
        component, module = split_module_key(key)
        stem = ("lora_unet_" if component == "unet" else "lora_te_") + flat(module)
        cast = (lambda a: a.astype(dtype)) if dtype else (lambda a: a)
        tensors[f"{stem}.lora_down.weight"] = cast(layer.down)
        tensors[f"{stem}.lora_up.weight"] = cast(layer.up)
        tensors[f"{stem}.alpha"] = np.array(layer.alpha, dtype=np.float32)
        if layer.magnitude is not None:
            tensors[f"{stem}.dora_scale"] = cast(layer.magnitude)
    is_linear = lambda layer: layer.down.ndim == 2 or layer.down.shape[2:] == (1, 1)  # noqa: E731
    linear = [layer for layer in weights.values() if is_linear(layer)]
    conv = [layer for layer in weights.values() if not is_linear(layer)]
    version = _sd_version(weights)
    metadata = {"ss_network_module": "networks.lora", "ss_base_model_version": version,
                "ss_v2": str(version == "sd_v2")}
    if any(layer.magnitude is not None for layer in weights.values()):
        metadata["ss_network_module"] = "lycoris.kohya"  # DoRA files come from LyCORIS; sd-scripts trains none
        metadata["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})
    if linear:
        metadata["ss_network_dim"] = str(most_common([layer.rank for layer in linear]))
        metadata["ss_network_alpha"] = repr(most_common([float(layer.alpha) for layer in linear]))
    if conv:
        args = {"conv_dim": str(most_common([layer.rank for layer in conv])),
                "conv_alpha": repr(most_common([float(layer.alpha) for layer in conv]))}
        metadata["ss_network_args"] = json.dumps({**json.loads(metadata.get("ss_network_args", "{}")), **args})
    return tensors, metadata
