"""The canonical LoRA file's metadata: what msd-lora writes, and the alphas a file declares.

The file is safetensors with diffusers/peft keys (`msd_lora.lora.formats` reads and writes it).

Metadata (all strings, as safetensors requires):
  format: "pt"                         so torch tooling treats it as a torch file
  msd_lora.format_version: "1"
  msd_lora.rank / msd_lora.alpha       one rank and alpha for every layer in files we write
  msd_lora.targets                     json {"unet": [...], "text_encoder": [...]}
  msd_lora.base_model / msd_lora.step  what it was trained on, and for how long
  lora_adapter_metadata                json in diffusers' layout ({"unet.r", "unet.lora_alpha", ...}) so
                                       diffusers' load_lora_weights honours alpha
"""
from __future__ import annotations

import json
import re

from msd_lora.lora.core import LoraWeights, split_module_key

FORMAT_VERSION = "1"


def _targets(weights: LoraWeights) -> dict[str, list[str]]:
    """Suffix-free description: the leaf module names trained per component."""
    found: dict[str, set[str]] = {}
    for key in weights:
        component, module = split_module_key(key)
        leaf = module.rsplit(".", 2)
        found.setdefault(component, set()).add(".".join(leaf[-2:]) if leaf[-1].isdigit() else leaf[-1])
    return {c: sorted(v) for c, v in found.items()}


def most_common(values: list):
    """The value that occurs most often (the smallest of those tied)."""
    return max(sorted(set(values)), key=values.count)


def adapter_metadata(weights: LoraWeights) -> dict:
    """diffusers' `lora_adapter_metadata`: per component r / lora_alpha, with patterns for layers that differ."""
    adapter: dict = {}
    for component, leaves in _targets(weights).items():
        layers = {split_module_key(k)[1]: layer for k, layer in weights.items() if split_module_key(k)[0] == component}
        rank = most_common([layer.rank for layer in layers.values()])
        alpha = most_common([float(layer.alpha) for layer in layers.values()])
        adapter.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                        f"{component}.target_modules": leaves,
                        f"{component}.rank_pattern": {m: l.rank for m, l in layers.items() if l.rank != rank},
                        f"{component}.alpha_pattern": {m: float(l.alpha) for m, l in layers.items()
                                                       if float(l.alpha) != alpha}})
        if any(layer.magnitude is not None for layer in layers.values()):
            adapter[f"{component}.use_dora"] = True
    return adapter


def build_metadata(weights: LoraWeights, base_model: str = "", step: int | None = None,
                   extra: dict[str, str] | None = None) -> dict[str, str]:
    ranks = {layer.rank for layer in weights.values()}
    alphas = {float(layer.alpha) for layer in weights.values()}
    targets = _targets(weights)
    meta = {"format": "pt", "msd_lora.format_version": FORMAT_VERSION,
            "msd_lora.targets": json.dumps(targets), "msd_lora.base_model": base_model}
    if step is not None:
        meta["msd_lora.step"] = str(step)
    if len(ranks) == 1 and len(alphas) == 1:
        meta["msd_lora.rank"], meta["msd_lora.alpha"] = str(ranks.pop()), repr(alphas.pop())
    else:
        meta["msd_lora.alphas"] = json.dumps({k: float(layer.alpha) for k, layer in sorted(weights.items())})
    if weights:
        meta["lora_adapter_metadata"] = json.dumps(adapter_metadata(weights), sort_keys=True)
    meta.update(extra or {})
    return meta


def alphas_from_metadata(meta: dict[str, str], keys: list[str]) -> dict[str, float] | None:
    """Per-layer alphas a canonical (or diffusers-written) file declares; None when it declares none."""
    if "msd_lora.alpha" in meta:
        return {k: float(meta["msd_lora.alpha"]) for k in keys}
    if "msd_lora.alphas" in meta:
        return {k: float(v) for k, v in json.loads(meta["msd_lora.alphas"]).items()}
    if "lora_adapter_metadata" in meta:
        adapter = json.loads(meta["lora_adapter_metadata"])
        alphas = {}
        for key in keys:
            component, module = split_module_key(key)
            pattern = pattern_key(adapter.get(f"{component}.alpha_pattern") or {}, module)
            if pattern is not None:
                alphas[key] = float(adapter[f"{component}.alpha_pattern"][pattern])
            elif f"{component}.lora_alpha" in adapter:
                alphas[key] = float(adapter[f"{component}.lora_alpha"])
        return alphas
    return None


def pattern_key(patterns, module: str) -> str | None:
    """The first of peft's rank/alpha_pattern keys that names `module`, as peft matches them: a regex for the
    whole name or for a suffix after a '.' (`peft.utils.other.get_pattern_key`); None when none does."""
    for pattern in patterns:
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return pattern
        except re.error:
            if module == pattern or module.endswith("." + pattern):
                return pattern
    return None
