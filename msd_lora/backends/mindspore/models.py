"""mindone's Stable Diffusion networks, built from diffusers configs and filled from numpy state dicts.

Weights cross backends by name: mindone's UNet and VAE use diffusers' parameter names unchanged; its CLIP text
model names LayerNorm weights `gamma`/`beta` and embeddings `embedding_table`, mapped here. Loading is strict
(`Parameter.set_data` would silently take a wrong shape): missing, unexpected and mis-shaped names are errors.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from msd_lora.lora.core import DOWN, MAGNITUDE, UP
from msd_lora.models.state_check import check_state_fits


def build_networks(configs: dict[str, dict]) -> dict[str, nn.Cell]:
    """unet / vae / text_encoder from diffusers / transformers config dicts, weights not yet loaded."""
    from mindone.diffusers import AutoencoderKL, UNet2DConditionModel
    from mindone.transformers import CLIPTextModel
    from transformers import CLIPTextConfig

    return {"unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))}


def diffusers_name(component: str, ms_name: str) -> str:
    """The diffusers/transformers name of a mindone parameter."""
    if component != "text_encoder":
        return ms_name
    if ms_name.endswith(".embedding_table"):
        return ms_name[: -len("embedding_table")] + "weight"
    if ".layer_norm" in ms_name or ms_name.startswith("text_model.final_layer_norm"):
        if ms_name.endswith(".gamma"):
            return ms_name[: -len("gamma")] + "weight"
        if ms_name.endswith(".beta"):
            return ms_name[: -len("beta")] + "bias"
    return ms_name


def named_parameters(component: str, network: nn.Cell) -> dict[str, ms.Parameter]:
    """diffusers name -> parameter, for the network's own (non-LoRA) parameters; a LoRA cell's `.base.` is hidden
    (its own parameters carry their canonical key as name: `<key>.lora_A.weight`, `<key>.lora_enabled`, ...)."""
    return {diffusers_name(component, n.replace(".base.", ".")): p for n, p in network.parameters_and_names()
            if not p.name.endswith((f".{DOWN}", f".{UP}", f".{MAGNITUDE}", ".lora_enabled", "lora_dropout_seed",
                                                 "token_rows"))}


def load_state(component: str, network: nn.Cell, state: dict[str, np.ndarray], source: str) -> None:
    """Copy a diffusers-named numpy state dict into the network, strictly (names and shapes)."""
    params = named_parameters(component, network)
    check_state_fits(state, {n: tuple(p.shape) for n, p in params.items()}, source, f"mindone's {component}")
    for name, param in params.items():  # one tensor at a time: never a second full copy in memory
        param.set_data(Tensor(np.array(state.pop(name), dtype=np.float32)))
