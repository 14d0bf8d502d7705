"""peft LoRA on diffusers/transformers modules, with canonical names in and out."""
from __future__ import annotations

import numpy as np
import torch

from msd_lora.lora.core import LoraLayer, LoraWeights, module_key
from msd_lora.lora.spec import LoraSpec

ADAPTER = "default"


def inject(model: torch.nn.Module, spec: LoraSpec, module_names: list[str]) -> None:
    """Add a peft LoRA adapter on exactly `module_names`."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=module_names, lora_dropout=0.0,
                        init_lora_weights=True)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def lora_parameters(model: torch.nn.Module, component: str) -> dict[str, torch.nn.Parameter]:
    """Canonical tensor key ('unet.<module>.lora_A.weight') -> the live parameter."""
    params = {}
    for name, param in model.named_parameters():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.{ADAPTER}.weight"
            if name.endswith(marker):
                params[f"{module_key(component, name[: -len(marker)])}.{part}.weight"] = param
    return params


def read_weights(params: dict[str, torch.Tensor], alpha: float) -> LoraWeights:
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in params})
    return {m: LoraLayer(down=params[f"{m}.lora_A.weight"].detach().float().cpu().numpy().copy(),
                         up=params[f"{m}.lora_B.weight"].detach().float().cpu().numpy().copy(), alpha=alpha)
            for m in modules}


def write_weights(params: dict[str, torch.Tensor], weights: LoraWeights) -> None:
    """Copy weights already checked to fit (`keys.check_lora_fits`) into the parameters."""
    with torch.no_grad():
        for key, layer in weights.items():
            params[f"{key}.lora_A.weight"].copy_(torch.from_numpy(np.asarray(layer.down, np.float32)))
            params[f"{key}.lora_B.weight"].copy_(torch.from_numpy(np.asarray(layer.up, np.float32)))
