"""mindone's Stable Diffusion checkpoints (examples/stable_diffusion_v2) <-> diffusers-named state.

mindone keeps LDM's cell paths with MindSpore's idioms: convolutions wrapped one level deeper
(`in_layers_conv.conv.weight`, `op.conv.weight`, `skip_connection.conv.weight`, `input_blocks.0.0.conv.weight`),
UNet norms as `gamma`/`beta` (newer mindone releases renamed them back to `weight`/`bias`; both read), and
its own CLIP port for SD1 and SD2 alike: `cond_stage_model.transformer.embedding_table`,
`transformer_layer.resblocks.N.attn.attn.in_proj` (q, k, v fused), `c_fc`, `c_proj`, `ln_1`, `ln_final`.
The VAE keeps LDM's names. Everything is derived from the LDM names in `layout`, so nothing is listed twice.
"""
from __future__ import annotations

import re

import numpy as np

from msd_lora.errors import StateDictError
from msd_lora.models.layout import is_vae_attention_weight, unet_names, vae_names
from msd_lora.models.ldm import IGNORED_PREFIXES, UNET, VAE, Converted, qkv_names, split_qkv

TEXT = "cond_stage_model.transformer."
STYLES = ("gamma", "weight")  # how UNet / text norms name their parameters
_NORM_PARAM = {"weight": "gamma", "bias": "beta"}


def _norm(param: str, style: str) -> str:
    return _NORM_PARAM[param] if style == "gamma" else param


_UNET_RULES = (  # (pattern on the LDM name, replacement); '{n}' marks a norm parameter
    (re.compile(r"^input_blocks\.0\.0\.(weight|bias)$"), r"input_blocks.0.0.conv.\1"),
    (re.compile(r"\.in_layers\.0\.(weight|bias)$"), r".in_layers_norm.{n}"),
    (re.compile(r"\.in_layers\.2\."), r".in_layers_conv.conv."),
    (re.compile(r"\.out_layers\.0\.(weight|bias)$"), r".out_layers_norm.{n}"),
    (re.compile(r"\.out_layers\.3\."), r".out_layers_conv.conv."),
    (re.compile(r"\.skip_connection\."), r".skip_connection.conv."),
    (re.compile(r"\.op\."), r".op.conv."),
    (re.compile(r"^(output_blocks\.\d+\.\d+)\.conv\.(weight|bias)$"), r"\1.conv.conv.\2"),
    (re.compile(r"^out\.0\.(weight|bias)$"), r"out.0.{n}"),
    (re.compile(r"^out\.2\."), r"out.2.conv."),
    (re.compile(r"\.(norm|norm1|norm2|norm3)\.(weight|bias)$"), r".\1.{n}"),
)


def unet_name(ldm_name: str, style: str = "gamma") -> str:
    """mindone's name of a UNet parameter, from its LDM name (without the `model.diffusion_model.` prefix)."""
    for pattern, replacement in _UNET_RULES:
        match = pattern.search(ldm_name)
        if match:
            param = ldm_name.rsplit(".", 1)[1]
            return pattern.sub(replacement.replace("{n}", _norm(param, style)), ldm_name)
    return ldm_name


def text_pairs(num_layers: int, style: str = "gamma") -> list[tuple[list[str], str]]:
    """([diffusers names], mindone name) of the text encoder; three names where mindone fuses q, k, v."""
    top = "text_model."
    pairs = [([f"{top}embeddings.token_embedding.weight"], f"{TEXT}embedding_table"),
             ([f"{top}embeddings.position_embedding.weight"], f"{TEXT}positional_embedding")]
    for i in range(num_layers):
        d, m = f"{top}encoder.layers.{i}", f"{TEXT}transformer_layer.resblocks.{i}"
        pairs += [(qkv_names(i, "weight"), f"{m}.attn.attn.in_proj.weight"),
                  (qkv_names(i, "bias"), f"{m}.attn.attn.in_proj.bias")]
        for ours, theirs, is_norm in (("self_attn.out_proj", "attn.attn.out_proj", False), ("layer_norm1", "ln_1", True),
                                      ("mlp.fc1", "c_fc", False), ("mlp.fc2", "c_proj", False),
                                      ("layer_norm2", "ln_2", True)):
            for param in ("weight", "bias"):
                pairs.append(([f"{d}.{ours}.{param}"], f"{m}.{theirs}.{_norm(param, style) if is_norm else param}"))
    for param in ("weight", "bias"):
        pairs.append(([f"{top}final_layer_norm.{param}"], f"{TEXT}ln_final.{_norm(param, style)}"))
    return pairs


def to_mindone(state: dict[str, dict[str, np.ndarray]], configs: dict[str, dict], style: str = "gamma") -> dict:
    """A mindone SD checkpoint's tensors (UNet, VAE, text encoder) from diffusers-named state."""
    out = {UNET + unet_name(l, style): state["unet"][d] for d, l in unet_names(configs["unet"])}
    for d, l in vae_names(configs["vae"]):
        value = state["vae"][d]
        out[VAE + l] = value[:, :, None, None] if is_vae_attention_weight(d) and value.ndim == 2 else value
    for names, name in text_pairs(int(configs["text_encoder"]["num_hidden_layers"]), style):
        parts = [state["text_encoder"][n] for n in names]
        out[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out


def detect_style(keys) -> str:
    return "gamma" if any(k.endswith(".gamma") for k in keys) else "weight"


def from_mindone(tensors: dict[str, np.ndarray], configs: dict[str, dict], source: str,
                 architecture: str = "configured") -> Converted:
    """diffusers-named networks from a mindone SD checkpoint; strict about missing and unknown weights."""
    style = detect_style(tensors)
    state: dict[str, dict[str, np.ndarray]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    used, missing = set(), []
    for d, l in unet_names(configs["unet"]):
        key = UNET + unet_name(l, style)
        if key in tensors:
            state["unet"][d] = tensors[key]
        else:
            missing.append(key)
        used.add(key)
    for d, l in vae_names(configs["vae"]):
        key = VAE + l
        if key in tensors:
            value = tensors[key]
            state["vae"][d] = value.reshape(value.shape[:2]) if is_vae_attention_weight(d) and value.ndim > 2 else value
        else:
            missing.append(key)
        used.add(key)
    for names, key in text_pairs(int(configs["text_encoder"]["num_hidden_layers"]), style):
        if key not in tensors:
            missing.append(key)
        else:
            parts = [tensors[key]] if len(names) == 1 else split_qkv(tensors[key])
            state["text_encoder"].update(zip(names, parts))
        used.add(key)
    unexpected = sorted(k for k in tensors if k not in used and "." in k and not k.startswith(IGNORED_PREFIXES))
    if missing or unexpected:
        lines = [f"{source} does not match the {architecture} architecture as a mindone checkpoint:"]
        if missing:
            lines.append(f"  {len(missing)} weights missing, e.g. {', '.join(missing[:3])}")
        if unexpected:
            lines.append(f"  {len(unexpected)} weights the architecture does not have, e.g. {', '.join(unexpected[:3])}")
        lines.append("  Likely cause: another SD version than the model_config says, or not a mindone SD checkpoint.")
        raise StateDictError("\n".join(lines))
    ignored = [k for k in tensors if k not in used]
    return Converted(state=state, ignored=ignored)
