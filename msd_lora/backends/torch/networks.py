"""Torch devices and networks built from numpy state: shared by the training backend and the evaluation networks."""
from __future__ import annotations

import numpy as np
import torch

from msd_lora.errors import ConfigError
from msd_lora.models.state_check import check_state_fits


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when present), `cpu`, `cuda[:N]`, or MindSpore's name `gpu`; a device torch cannot use here is a
    ValueError naming it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = "cuda" if device.lower() == "gpu" else device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' was asked for, but torch sees no CUDA GPU; use device: cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device '{device}' is not a torch device ({err})") from err


def build_network(name: str, build, config: dict, state: dict[str, np.ndarray], source: str) -> torch.nn.Module:
    """Construct a network without random init (its weights come next) and fill it strictly from `state`."""
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        module = build(config)
    targets = module.state_dict(keep_vars=True)
    check_state_fits(state, {k: tuple(v.shape) for k, v in targets.items()}, f"{source} ({name})", f"the torch {name}")
    with torch.no_grad():
        for key in list(state):  # one tensor at a time: never a second full copy of the model in memory
            targets[key].copy_(torch.from_numpy(np.array(state.pop(key), np.float32)))
    return module
