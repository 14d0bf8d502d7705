"""peft LoRA / DoRA on diffusers/transformers modules (linear layers and convolutions), with canonical names in and
out."""
from __future__ import annotations

import re

import numpy as np
import torch

from msd_lora.lora.core import MAGNITUDE, LoraLayer, LoraWeights, magnitude_from_peft, module_key, peft_magnitude
from msd_lora.lora.spec import LoraSpec

ADAPTER = "default"
PARTS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", MAGNITUDE: MAGNITUDE}  # peft's module -> our suffix


def inject(model: torch.nn.Module, spec: LoraSpec, layers: dict[str, LoraLayer]) -> None:
    """Add a peft adapter on exactly the modules `layers` names (module name -> its first LoRA layer), each with that
    layer's rank and alpha; DoRA when the spec says so."""
    from peft import LoraConfig, inject_adapter_in_model

    exact = {re.escape(name): layer for name, layer in layers.items()}  # peft matches pattern keys as regexes
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(layers), lora_dropout=0.0,
                        init_lora_weights=True, use_dora=spec.dora,
                        rank_pattern={k: layer.rank for k, layer in exact.items()},
                        alpha_pattern={k: float(layer.alpha) for k, layer in exact.items()})
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def lora_parameters(model: torch.nn.Module, component: str) -> dict[str, torch.nn.Parameter]:
    """Canonical tensor key ('unet.<module>.lora_A.weight', '...lora_magnitude_vector') -> the live parameter."""
    params = {}
    for name, param in model.named_parameters():
        for part, suffix in PARTS.items():
            marker = f".{part}.{ADAPTER}.weight"
            if name.endswith(marker):
                params[f"{module_key(component, name[: -len(marker)])}.{suffix}"] = param
    return params


def is_lora_parameter(name: str) -> bool:
    return any(f".{part}." in name for part in PARTS)


def read_weights(params: dict[str, torch.Tensor], alphas: dict[str, float]) -> LoraWeights:
    def value(key: str) -> np.ndarray:
        return params[key].detach().float().cpu().numpy().copy()

    weights = {}
    for key, alpha in alphas.items():
        down = value(f"{key}.lora_A.weight")
        magnitude = f"{key}.{MAGNITUDE}"
        weights[key] = LoraLayer(down=down, up=value(f"{key}.lora_B.weight"), alpha=alpha,
                                 magnitude=magnitude_from_peft(value(magnitude), down) if magnitude in params else None)
    return weights


def write_weights(params: dict[str, torch.Tensor], weights: LoraWeights) -> None:
    """Copy weights already checked to fit (`keys.check_lora_fits`) into the parameters."""
    with torch.no_grad():
        for key, layer in weights.items():
            params[f"{key}.lora_A.weight"].copy_(torch.from_numpy(np.asarray(layer.down, np.float32)))
            params[f"{key}.lora_B.weight"].copy_(torch.from_numpy(np.asarray(layer.up, np.float32)))
            if layer.magnitude is not None:
                magnitude = np.asarray(peft_magnitude(key, layer), np.float32)
                params[f"{key}.{MAGNITUDE}"].copy_(torch.from_numpy(magnitude))


class HashDropout(torch.nn.Module):
    """Inverted dropout whose mask is `msd_lora.lora.dropout`'s hash of (the step's seed, `salt`, element index):
    the same mask MindSpore draws. Off while `state.seed` is 0 (evaluation, sampling)."""

    def __init__(self, p: float, salt: int, state):
        super().__init__()
        self.p, self.salt, self.state = p, salt, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from msd_lora.lora.dropout import hashed, layer_seed, threshold

        if not self.state.seed:
            return x
        index = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
        seed = torch.tensor(layer_seed(self.state.seed, self.salt), device=x.device, dtype=torch.int64)
        keep = hashed(index, seed) >= threshold(self.p)
        return x * keep.to(x.dtype) / (1.0 - self.p)


def add_dropout(model: torch.nn.Module, component: str, spec: LoraSpec, layers: list[str], state) -> None:
    """lora_dropout on each LoRA branch's input (peft's slot) and network_dropout on its down projection's output
    (a forward hook, so parameter names stay peft's); `layers` numbers the layers (both backends' order)."""
    modules = dict(model.named_modules())
    for name, module in modules.items():
        key = module_key(component, name)
        if key not in layers or not hasattr(module, "lora_dropout"):
            continue
        number = layers.index(key)
        if spec.dropout:
            module.lora_dropout[ADAPTER] = HashDropout(spec.dropout, 2 * number, state)
        if spec.network_dropout:
            hook = HashDropout(spec.network_dropout, 2 * number + 1, state)
            module.lora_A[ADAPTER].register_forward_hook(
                lambda _m, args, out, hook=hook: out if identity_probe(args[0]) else hook(out))


def identity_probe(x: torch.Tensor) -> bool:
    """True for the identity matrix peft's DoRA passes through lora_A to read B @ A (`get_weight_norm`): that is no
    activation, and dropout must not touch it."""
    return x.ndim == 2 and x.shape[0] == x.shape[1] and bool(torch.equal(x, torch.eye(len(x), dtype=x.dtype,
                                                                                         device=x.device)))
