"""diffusers LoRA files: canonical peft keys, and the older diffusers layouts.

canonical (peft, diffusers >= 0.24):  unet.<module>.lora_A.weight / .lora_B.weight   (+ raw peft:
                                      base_model.model.<module>...; optional <module>.alpha tensors)
old (diffusers 0.14 - 0.23):          [unet.]<attention>.processor.to_q_lora.down.weight / .up.weight
                                      (to_k, to_v, to_out -> to_out.0), unet.<module>.lora.down.weight,
                                      text_encoder.<module>.lora_linear_layer.down.weight,
                                      text_encoder.<self_attn>.to_q_lora.down.weight (-> q_proj ...)
The old layouts store no alpha (alpha = rank; `<stem>.alpha` tensors some files carry are read); writing
them bakes alpha/rank into `up`.
"""
from __future__ import annotations

import re

import numpy as np

from msd_lora.errors import LoraFormatError
from msd_lora.lora.core import COMPONENTS, DOWN, UP, LoraLayer, LoraWeights, from_tensors, split_module_key
from msd_lora.lora.metadata import alphas_from_metadata


def _component_of(module: str) -> str:
    return "text_encoder" if module.startswith("text_model.") else "unet"


def read_canonical(tensors: dict[str, np.ndarray], metadata: dict[str, str], source: str) -> LoraWeights:
    renamed, alphas = {}, {}
    for name, value in tensors.items():
        if name.startswith("base_model.model."):  # raw peft save: no component prefix
            module = name[len("base_model.model."):]
            name = f"{_component_of(module)}.{module}"
        if name.endswith(".alpha"):
            alphas[name[: -len(".alpha")]] = float(np.asarray(value).reshape(-1)[0])
            continue
        component = name.split(".", 1)[0]
        if component not in COMPONENTS:
            hint = " (an SDXL LoRA: SD 1.x/2.x have one text encoder)" if component == "text_encoder_2" else ""
            raise LoraFormatError(f"{source}: key {name!r} is for component {component!r}{hint}; "
                                  f"expected one of {COMPONENTS}")
        renamed[name] = value
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in renamed})
    declared = alphas_from_metadata(metadata, modules) or {}
    declared.update(alphas)
    return from_tensors(renamed, declared or None, source)


_OLD_UNET_PROC = re.compile(r"^(?:unet\.)?(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_TEXT_PROC = re.compile(r"^text_encoder\.(.+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_MODULE = re.compile(r"^(unet|text_encoder)\.(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
_OLD_TEXT_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def old_key(name: str) -> tuple[str, str] | None:
    """(canonical module key, 'down'|'up') of an old-diffusers tensor name, or None."""
    if match := _OLD_UNET_PROC.match(name):
        proj = "to_out.0" if match[2] == "to_out" else match[2]
        return f"unet.{match[1]}.{proj}", match[3]
    if match := _OLD_TEXT_PROC.match(name):
        return f"text_encoder.{match[1]}.{_OLD_TEXT_NAMES[match[2]]}", match[3]
    if match := _OLD_MODULE.match(name):
        return f"{match[1]}.{match[2]}", match[3]
    return None


def is_old_diffusers(keys) -> bool:
    return any(old_key(k) for k in keys)


def old_alpha_key(stem: str) -> str:
    """Canonical module key of an old-diffusers `<stem>.alpha`: the stem of a LoRA layer
    (`unet.<attn>.processor.to_q_lora`, `text_encoder.<module>.lora_linear_layer`, ...) or a module path."""
    parsed = old_key(f"{stem}.down.weight")
    if parsed:
        return parsed[0]
    return stem if stem.startswith(tuple(f"{c}." for c in COMPONENTS)) else f"unet.{stem}"


def read_old(tensors: dict[str, np.ndarray], source: str) -> LoraWeights:
    canonical, alphas, unknown = {}, {}, []
    for name, value in tensors.items():
        if name.endswith(".alpha"):
            alphas[old_alpha_key(name[: -len(".alpha")])] = float(np.asarray(value).reshape(-1)[0])
            continue
        parsed = old_key(name)
        if parsed is None:
            unknown.append(name)
            continue
        key, part = parsed
        canonical[f"{key}.{DOWN if part == 'down' else UP}"] = value
    if unknown:
        raise LoraFormatError(f"{source}: {len(unknown)} keys are not old-diffusers LoRA keys, e.g. "
                              f"{', '.join(unknown[:3])}")
    weights = from_tensors(canonical, alphas or None, source)
    stray = sorted(set(alphas) - set(weights))
    if stray:
        raise LoraFormatError(f"{source}: {len(stray)} .alpha tensors belong to no LoRA layer, e.g. "
                              f"{', '.join(stray[:3])}")
    return weights


def write_old(weights: LoraWeights) -> dict[str, np.ndarray]:
    """Old diffusers keys; alpha/rank is folded into `up` because the layout has no alpha."""
    out = {}
    for key, layer in weights.items():
        component, module = split_module_key(key)
        up = baked(layer).up
        parent, _, leaf = module.rpartition(".")
        if component == "unet" and parent and leaf in ("to_q", "to_k", "to_v"):
            stem = f"unet.{parent}.processor.{leaf}_lora"
        elif component == "unet" and module.endswith(".to_out.0"):
            stem = f"unet.{module[: -len('.to_out.0')]}.processor.to_out_lora"
        elif component == "unet":
            stem = f"unet.{module}.lora"
        else:
            stem = f"text_encoder.{module}.lora_linear_layer"
        out[f"{stem}.down.weight"], out[f"{stem}.up.weight"] = layer.down, up
    return out


def baked(layer: LoraLayer) -> LoraLayer:
    """The same update with alpha = rank (scale folded into `up`)."""
    if layer.alpha == layer.rank:
        return layer
    up = (layer.up.astype(np.float64) * layer.scale).astype(layer.up.dtype)
    return LoraLayer(down=layer.down, up=up, alpha=float(layer.rank))
