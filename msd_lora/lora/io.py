"""The canonical LoRA file: safetensors with diffusers/peft keys and self-describing metadata.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msd_lora.io_utils import atomic_write, read_safetensors
from msd_lora.lora.keys import LoraWeights, from_tensors, split_module_key, to_tensors
from msd_lora.errors import LoraFormatError

FORMAT_VERSION = "1"



@dataclass
class LoraFile:
    weights: LoraWeights
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "diffusers"  # the file's format (msd_lora.lora.formats.FORMATS)

    @property
    def step(self) -> int | None:
        value = self.metadata.get("msd_lora.step")
        return int(value) if value is not None else None


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


def save_lora(path: str | Path, weights: LoraWeights, base_model: str = "", step: int | None = None,
              extra: dict[str, str] | None = None) -> Path:
    """Write the canonical file atomically (float32 tensors, contiguous)."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in to_tensors(weights).items()}
    metadata = build_metadata(weights, base_model, step, extra)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return Path(path)


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


def load_lora(path: str | Path) -> LoraFile:
    """Read a canonical LoRA file; clear errors for missing, corrupt or non-LoRA files."""
    path = Path(path)
    tensors, meta = read_safetensors(path, LoraFormatError, "LoRA file")
    try:
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
        weights = from_tensors(tensors, alphas_from_metadata(meta, modules))
    except KeyError as err:
        raise LoraFormatError(f"{path} is not a canonical LoRA file: {err.args[0]}") from err
    if not weights:
        raise LoraFormatError(f"{path} holds no LoRA tensors")
    return LoraFile(weights=weights, metadata=meta)
