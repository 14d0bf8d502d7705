"""Original-LDM single-file state dicts <-> the diffusers-named state both backends take.

LDM files hold three networks under prefixes: `model.diffusion_model.` (UNet), `first_stage_model.` (VAE) and
`cond_stage_model.` (text encoder: SD1's `transformer.text_model.*` is transformers' CLIP unchanged, SD2's
`model.*` is OpenCLIP, whose fused `attn.in_proj_weight` is q, k and v stacked). The VAE's attention
projections are 1x1 convolutions there. Tensors with no diffusers counterpart (OpenCLIP's 24th layer and
text_projection, which SD2 never uses) travel as `extras` so LDM -> LDM conversions keep them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from msd_lora.errors import StateDictError, UnsupportedArchitectureError
from msd_lora.models.layout import is_vae_attention_weight, text_encoder_names, unet_names, vae_names

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
CLIP_PREFIX, OPENCLIP_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."
TEXT_LAYOUTS = ("clip", "open_clip")
# Buffers and training leftovers of LDM checkpoints that carry no network weight.
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.", "betas", "alphas_cumprod", "alphas_cumprod_prev",
                    "sqrt_", "log_one_minus_alphas_cumprod", "posterior_", "lvlb_weights", "logvar",
                    "cond_stage_model.transformer.text_model.embeddings.position_ids",
                    "cond_stage_model.transformer.embeddings.position_ids", "cond_stage_model.model.attn_mask")


@dataclass
class Converted:
    state: dict[str, dict[str, np.ndarray]]  # network -> diffusers-named weights
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # file names kept for writing the same layout
    ignored: list[str] = field(default_factory=list)  # file keys that are not weights (schedule buffers, EMA ...)


def openclip_layer_pairs(i: int) -> list[tuple[str, str]]:
    d, l = f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
    pairs = []
    for ours, theirs in (("layer_norm1", "ln_1"), ("self_attn.out_proj", "attn.out_proj"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        pairs += [(f"{d}.{ours}.weight", f"{l}.{theirs}.weight"), (f"{d}.{ours}.bias", f"{l}.{theirs}.bias")]
    return pairs


OPENCLIP_TOP = (("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
                ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
                ("text_model.final_layer_norm.weight", "ln_final.weight"),
                ("text_model.final_layer_norm.bias", "ln_final.bias"))


def qkv_names(i: int, kind: str) -> list[str]:
    """diffusers names of layer i's q, k, v weights (kind 'weight') or biases, in fused (q, k, v) order."""
    return [f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")]


def split_qkv(fused: np.ndarray) -> list[np.ndarray]:
    if fused.shape[0] % 3:
        raise StateDictError(f"a fused q/k/v projection has {fused.shape[0]} rows, not a multiple of 3")
    return list(np.split(fused, 3, axis=0))


def image_networks_to_ldm(state: dict[str, dict[str, np.ndarray]], configs: dict[str, dict]) -> dict[str, np.ndarray]:
    """UNet and VAE weights under their LDM names (VAE attention weights as 1x1 convolutions)."""
    out = {UNET + l: state["unet"][d] for d, l in unet_names(configs["unet"])}
    for d, l in vae_names(configs["vae"]):
        value = state["vae"][d]
        out[VAE + l] = value[:, :, None, None] if is_vae_attention_weight(d) and value.ndim == 2 else value
    return out


def text_encoder_to_ldm(weights: dict[str, np.ndarray], num_layers: int, layout: str) -> dict[str, np.ndarray]:
    if layout == "clip":
        return {CLIP_PREFIX + n: weights[n] for n in text_encoder_names(num_layers)}
    out = {OPENCLIP_PREFIX + l: weights[d] for d, l in OPENCLIP_TOP}
    for i in range(num_layers):
        base = f"{OPENCLIP_PREFIX}transformer.resblocks.{i}.attn."
        out[base + "in_proj_weight"] = np.concatenate([weights[n] for n in qkv_names(i, "weight")])
        out[base + "in_proj_bias"] = np.concatenate([weights[n] for n in qkv_names(i, "bias")])
        out.update({OPENCLIP_PREFIX + l: weights[d] for d, l in openclip_layer_pairs(i)})
    return out


def to_ldm(state: dict[str, dict[str, np.ndarray]], configs: dict[str, dict], text_layout: str,
           extras: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A complete LDM single-file state dict (plus `extras` the source file had, e.g. OpenCLIP's last layer)."""
    out = image_networks_to_ldm(state, configs)
    out.update(text_encoder_to_ldm(state["text_encoder"], int(configs["text_encoder"]["num_hidden_layers"]),
                                   text_layout))
    out.update({k: v for k, v in (extras or {}).items() if k.startswith(OPENCLIP_PREFIX) and text_layout == "open_clip"})
    return out


def _text_from_ldm(tensors: dict[str, np.ndarray], num_layers: int, layout: str, used: set[str]) -> dict:
    if layout == "clip":
        weights = {}
        for name in text_encoder_names(num_layers):
            for key in (CLIP_PREFIX + name, CLIP_PREFIX + name.removeprefix("text_model.")):  # old transformers
                if key in tensors:
                    weights[name] = tensors[key]
                    used.add(key)
                    break
        return weights
    weights = {}
    for d, l in OPENCLIP_TOP:
        if OPENCLIP_PREFIX + l in tensors:
            weights[d] = tensors[OPENCLIP_PREFIX + l]
            used.add(OPENCLIP_PREFIX + l)
    for i in range(num_layers):
        base = f"{OPENCLIP_PREFIX}transformer.resblocks.{i}.attn."
        for kind, key in (("weight", base + "in_proj_weight"), ("bias", base + "in_proj_bias")):
            if key in tensors:
                weights.update(zip(qkv_names(i, kind), split_qkv(tensors[key])))
                used.add(key)
        for d, l in openclip_layer_pairs(i):
            if OPENCLIP_PREFIX + l in tensors:
                weights[d] = tensors[OPENCLIP_PREFIX + l]
                used.add(OPENCLIP_PREFIX + l)
    return weights


def _missing_report(network: str, expected: list[str], got: dict) -> str:
    missing = [n for n in expected if n not in got]
    return f"{network}: {len(missing)} of {len(expected)} weights missing, e.g. {', '.join(missing[:3])}"


def ema_key(ldm_unet_key: str) -> str:
    """LDM's EMA copy of a UNet weight: 'model.diffusion_model.a.b' -> 'model_ema.diffusion_modelab'."""
    return "model_ema." + "".join(ldm_unet_key.split(".")[1:])


def _is_openclip_extra(key: str, num_layers: int) -> bool:
    """OpenCLIP tensors SD never runs: layers past `num_layers` (SD2 uses the penultimate), the projection."""
    name = key[len(OPENCLIP_PREFIX):]
    if name in ("text_projection", "logit_scale"):
        return True
    parts = name.split(".")
    return name.startswith("transformer.resblocks.") and parts[2].isdigit() and int(parts[2]) >= num_layers


def from_ldm(tensors: dict[str, np.ndarray], configs: dict[str, dict], text_layout: str, source: str,
             use_ema: bool = False, architecture: str = "configured") -> Converted:
    """Split an LDM single file into diffusers-named networks; strict about what belongs to the networks."""
    used: set[str] = set()
    state: dict[str, dict[str, np.ndarray]] = {"unet": {}, "vae": {}}
    for d, l in unet_names(configs["unet"]):
        key = UNET + l
        if use_ema and ema_key(key) in tensors:
            state["unet"][d] = tensors[ema_key(key)]
        elif key in tensors:
            state["unet"][d] = tensors[key]
        used.add(key)
    for d, l in vae_names(configs["vae"]):
        if VAE + l in tensors:
            value = tensors[VAE + l]
            state["vae"][d] = value.reshape(value.shape[:2]) if is_vae_attention_weight(d) and value.ndim > 2 else value
        used.add(VAE + l)
    num_layers = int(configs["text_encoder"]["num_hidden_layers"])
    state["text_encoder"] = _text_from_ldm(tensors, num_layers, text_layout, used)
    problems = []
    for network, expected in (("unet", [d for d, _ in unet_names(configs["unet"])]),
                              ("vae", [d for d, _ in vae_names(configs["vae"])]),
                              ("text_encoder", text_encoder_names(num_layers))):
        if len(state[network]) != len(expected):
            problems.append(_missing_report(network, expected, state[network]))
    extras = {k: v for k, v in tensors.items() if text_layout == "open_clip" and k.startswith(OPENCLIP_PREFIX)
              and k not in used and _is_openclip_extra(k, num_layers)}
    rest = [k for k in tensors if k not in used and k not in extras]
    ignored = [k for k in rest if k.startswith(IGNORED_PREFIXES) or not k.startswith((UNET, VAE, TEXT))]
    unexpected = sorted(k for k in rest if k not in ignored)
    if unexpected:
        problems.append(f"{len(unexpected)} weights the architecture does not have, e.g. {', '.join(unexpected[:3])}")
    if problems:
        raise StateDictError(f"{source} does not match the {architecture} architecture:\n  "
                             + "\n  ".join(problems) + "\n  Likely cause: a different model family (SDXL, "
                             "inpainting, ControlNet, ...) or the wrong model_config for this file.")
    return Converted(state=state, extras=extras, ignored=ignored)


def require_layout(text_layout: str) -> str:
    if text_layout not in TEXT_LAYOUTS:
        raise UnsupportedArchitectureError(f"text encoder layout {text_layout!r}; expected one of {TEXT_LAYOUTS}")
    return text_layout
