"""Which Stable Diffusion a checkpoint is, read from its weights, and the shipped model yaml that builds it.

    version, note = detect_version(tensors, metadata)     # "v1" | "v2-base" | "v2-v"
    cfg = shipped_config(version)                         # configs/model/<...>.yaml

Signals: the cross-attention width (768 SD1, 1024 SD2), the text encoder's layout and width, the UNet's
input channels and first block width. SD2-base and SD2-v share every weight shape; like diffusers, a file
is taken as 512-px epsilon SD2-base only when its `global_step` is 875000 (the released 2.x-base) and as
768-px v-prediction otherwise; `note` says so, and `model_config` overrides it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msd_lora.errors import UnsupportedArchitectureError
from msd_lora.models.model_config import ModelConfig, load_model_config

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
SHIPPED = {"v1": "v1-inference.yaml", "v2-base": "v2-inference.yaml", "v2-v": "v2-inference-v.yaml"}
SD2_BASE_GLOBAL_STEP = "875000"
CLIP_VOCAB = 49408  # transformers' CLIPTextConfig default, SD 1.x and 2.x alike
_ATTN2_K = re.compile(r"^model\.diffusion_model\.(input_blocks|middle_block)\..*attn2\.to_k\.weight$")


def shipped_config(version: str) -> ModelConfig:
    if version not in SHIPPED:
        raise ValueError(f"unknown SD version {version!r}; expected one of {list(SHIPPED)}")
    return load_model_config(MODEL_CONFIG_DIR / SHIPPED[version])


@dataclass(frozen=True)
class Signature:
    """What a single-file checkpoint's weights say about its architecture."""

    layout: str  # ldm | mindone
    text: str  # clip | open_clip | mindone
    context_dim: int
    in_channels: int
    first_channels: int
    text_width: int
    text_layers: int
    text_vocab: int  # rows of the token embedding

    def describe(self) -> str:
        return (f"{self.layout} file, UNet with {self.in_channels} input channels, first block {self.first_channels}, "
                f"cross-attention width {self.context_dim}; {self.text} text encoder, width {self.text_width}, "
                f"{self.text_layers} layers")


def _family_hint(keys: list[str]) -> str | None:
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "an SDXL checkpoint (conditioner.embedders.*)"
    if any(k.startswith(("model.diffusion_model.joint_blocks.", "model.diffusion_model.double_blocks.",
                         "double_blocks.", "joint_blocks.")) for k in keys):
        return "an SD3 / Flux transformer checkpoint"
    if any(k.startswith("control_model.") for k in keys):
        return "a ControlNet checkpoint (control_model.*)"
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        if any(k.startswith(("down_blocks.", "unet.")) for k in keys):
            return "a diffusers component file (give the whole diffusers folder instead)"
        return "not a Stable Diffusion single-file checkpoint (no model.diffusion_model.* weights)"
    return None


def _layer_count(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.search(pattern, k))}
    return max(found) + 1 if found else 0


def signature_of(tensors: dict[str, np.ndarray], source: str) -> Signature:
    keys = list(tensors)
    hint = _family_hint(keys)
    if hint:
        raise UnsupportedArchitectureError(f"{source} is {hint}; only Stable Diffusion 1.x / 2.x are supported")
    mindone = "model.diffusion_model.input_blocks.0.0.conv.weight" in tensors
    conv_in = tensors.get("model.diffusion_model.input_blocks.0.0.conv.weight" if mindone else
                          "model.diffusion_model.input_blocks.0.0.weight")
    attn = next((k for k in keys if _ATTN2_K.match(k)), None)
    if conv_in is None or attn is None:
        raise UnsupportedArchitectureError(f"{source}: no UNet input convolution or cross-attention found; "
                                           f"not a Stable Diffusion 1.x / 2.x UNet")
    if "cond_stage_model.transformer.embedding_table" in tensors:
        text, token = "mindone", tensors["cond_stage_model.transformer.embedding_table"]
        layers = _layer_count(keys, r"^cond_stage_model\.transformer\.transformer_layer\.resblocks\.(\d+)\.")
    elif "cond_stage_model.model.token_embedding.weight" in tensors:
        text, token = "open_clip", tensors["cond_stage_model.model.token_embedding.weight"]
        layers = _layer_count(keys, r"^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.")
    else:
        token_key = next((k for k in keys if k.startswith("cond_stage_model.transformer.")
                          and k.endswith("embeddings.token_embedding.weight")), None)
        if token_key is None:
            raise UnsupportedArchitectureError(f"{source}: no text encoder (cond_stage_model.*) found; "
                                               f"the file holds only part of a Stable Diffusion model")
        text, token = "clip", tensors[token_key]
        layers = _layer_count(keys, r"^cond_stage_model\.transformer\.(?:text_model\.)?encoder\.layers\.(\d+)\.")
    return Signature(layout="mindone" if mindone else "ldm", text=text, context_dim=int(tensors[attn].shape[1]),
                     in_channels=int(conv_in.shape[1]), first_channels=int(conv_in.shape[0]),
                     text_width=int(token.shape[1]), text_layers=layers, text_vocab=int(token.shape[0]))


def mismatches(cfg: ModelConfig, sig: Signature) -> list[str]:
    """How a model yaml's architecture disagrees with a file's signature (empty when it fits)."""
    unet, text = cfg.architecture.get("unet", {}), cfg.architecture.get("text_encoder", {})
    checks = [("cross-attention width", unet.get("cross_attention_dim"), sig.context_dim),
              ("UNet input channels", unet.get("in_channels", 4), sig.in_channels),
              ("first UNet block width", (unet.get("block_out_channels") or [None])[0], sig.first_channels),
              ("text encoder width", text.get("hidden_size"), sig.text_width),
              ("text encoder vocabulary", text.get("vocab_size", CLIP_VOCAB), sig.text_vocab)]
    problems = [f"{what}: config {want}, file {got}" for what, want, got in checks if want is not None and want != got]
    layers = text.get("num_hidden_layers")
    if layers is not None and sig.text_layers < int(layers):
        problems.append(f"text encoder layers: config {layers}, file {sig.text_layers}")
    expected_text = {"clip": ("clip",), "open_clip": ("open_clip",)}[cfg.text_encoder_layout]
    if sig.text != "mindone" and sig.text not in expected_text:
        problems.append(f"text encoder layout: config {cfg.text_encoder_layout}, file {sig.text}")
    return problems


def _guess_family(sig: Signature) -> str:
    if sig.in_channels == 9:
        return "an inpainting model (9 UNet input channels)"
    if sig.in_channels != 4:
        return f"a model with {sig.in_channels} UNet input channels (upscaler / pix2pix?)"
    if sig.context_dim == 2048:
        return "an SDXL UNet (cross-attention width 2048)"
    return f"an unknown architecture ({sig.describe()})"


def detect_version(tensors: dict[str, np.ndarray], metadata: dict[str, str], source: str) -> tuple[str, Signature, str]:
    """(version, signature, note) of a single-file SD checkpoint; raise for anything else."""
    sig = signature_of(tensors, source)
    fitting = [v for v in SHIPPED if not mismatches(shipped_config(v), sig)]
    if not fitting:
        raise UnsupportedArchitectureError(f"{source} is {_guess_family(sig)}; only SD 1.x and 2.x are supported. "
                                           f"If it is a custom SD variant, describe it in a model yaml and pass "
                                           f"--model_config.")
    if fitting == ["v1"]:
        return "v1", sig, ""
    if metadata.get("global_step") == SD2_BASE_GLOBAL_STEP:
        return "v2-base", sig, "SD2-base (global_step 875000)"
    name = Path(source).name.lower()
    if "768" in name:
        return "v2-v", sig, f"SD2 768-px v-prediction (from the file name {Path(source).name})"
    if "512" in name or "base" in name:
        return "v2-base", sig, (f"SD2-base, 512-px epsilon (from the file name {Path(source).name}); for a "
                                f"v-prediction model pass --model_config configs/model/v2-inference-v.yaml")
    return "v2-v", sig, ("SD2 weights cannot tell 512-px epsilon (2.x-base) from 768-px v-prediction models; "
                         "assumed v-prediction as diffusers does. For a 2.x-base model pass "
                         "--model_config configs/model/v2-inference.yaml")


def check_folder_fits(cfg: ModelConfig, configs: dict[str, dict], source: str) -> None:
    """A model yaml given with a diffusers folder must describe the same networks."""
    problems = []
    for network in ("unet", "vae", "text_encoder"):
        ours = cfg.architecture.get(network, {})
        for key in ("cross_attention_dim", "block_out_channels", "layers_per_block", "hidden_size",
                    "num_hidden_layers", "latent_channels"):
            if key in ours and key in configs[network] and ours[key] != configs[network][key]:
                problems.append(f"{network}.{key}: {cfg.path} says {ours[key]}, the folder {configs[network][key]}")
    if problems:
        raise UnsupportedArchitectureError(f"model_config {cfg.path} does not describe {source}:\n  "
                                           + "\n  ".join(problems) + "\n  Leave model_config empty to use the "
                                           "folder's own configs, or pick the yaml of this model's version.")
