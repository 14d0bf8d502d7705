"""Why a LoRA does not fit a model, in words a user can act on ("an SDXL LoRA on an SD1.5 model").

The widths of cross-attention keys (768 SD1, 1024 SD2, 2048 SDXL) and of the text encoder tell versions
apart; SDXL's block layout (transformer_blocks.1+ in the UNet, input_blocks 4/5/7/8) and Flux/SD3 names
tell families apart.
"""
from __future__ import annotations

import re

from msd_lora.lora.core import LoraWeights

CONTEXT_FAMILY = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
TEXT_FAMILY = {768: "SD 1.x", 1024: "SD 2.x"}
_SDXL_UNET = re.compile(r"(transformer_blocks[._]([1-9]))|(input_blocks[._][4578][._]1[._]transformer_blocks[._][1-9])")
_DIT = ("transformer.", "lora_transformer_", "double_blocks", "single_blocks", "joint_blocks")


def _family(widths: set[int], table: dict[int, str]) -> str | None:
    names = {table.get(w, f"width {w}") for w in widths}
    return names.pop() if len(names) == 1 else None


def _model_family(base_shapes: dict[str, tuple[int, ...]]) -> str | None:
    widths = {s[1] for k, s in base_shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2}
    return _family(widths, CONTEXT_FAMILY)


def likely_cause(weights: LoraWeights, base_shapes: dict[str, tuple[int, ...]]) -> str:
    """A sentence naming the LoRA's family and the model's, or the generic cause."""
    keys = list(weights)
    family = _model_family(base_shapes)
    model = f"an {family} model" if family else "this model"
    if any(k.startswith(_DIT) or any(d in k for d in _DIT[2:]) for k in keys):
        return f"a Flux / SD3 (transformer) LoRA on {model}"
    if any(_SDXL_UNET.search(k) for k in keys if k.startswith("unet.")):
        return f"an SDXL LoRA on {model}"
    context = {layer.down.shape[1] for k, layer in weights.items() if k.endswith("attn2.to_k")}
    lora = _family(context, CONTEXT_FAMILY)
    if lora is None:
        text = {layer.down.shape[1] for k, layer in weights.items() if k.startswith("text_encoder.")
                and k.endswith(("q_proj", "k_proj", "v_proj"))}
        lora = _family(text, TEXT_FAMILY)
    if lora and lora != family:
        return f"an {lora} LoRA on {model}"
    return ("the LoRA was trained on a different base model (e.g. SD2 vs SD1.5, SDXL, or another model size) "
            "or targets layers this model does not have")


def kohya_cause(stems: list[str]) -> str:
    """Why kohya layer names did not resolve."""
    if any(_SDXL_UNET.search(s) for s in stems):
        return "an SDXL LoRA (its UNet has several transformer blocks per attention); SD 1.x/2.x cannot use it"
    if any(s.startswith("lora_unet_") and ("double_blocks" in s or "single_blocks" in s) for s in stems):
        return "a Flux LoRA; SD 1.x/2.x cannot use it"
    return ("layer names of another model layout (SDXL, a custom UNet, or the tiny model: pass --base for the model "
            "the LoRA belongs to)")
