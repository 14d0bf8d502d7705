"""The feature networks by backend name; framework imports happen only here, on demand."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from msd_lora.errors import ConfigError

BACKENDS = {"pt": "torch", "torch": "torch", "ms": "mindspore", "mindspore": "mindspore"}


def backend_name(name: str) -> str:
    """'pt'/'torch' -> 'torch', 'ms'/'mindspore' -> 'mindspore'."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose pt (torch) or ms (mindspore)")
    return BACKENDS[name]


def inception_features(backend: str, state: dict[str, np.ndarray], source: str, device: str = "auto",
                       ms_mode: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """(N, 3, 299, 299) float32 -> (N, 2048) pool3 features, on the given backend."""
    if backend_name(backend) == "torch":
        from msd_lora.backends.torch.inception import TorchInceptionFeatures

        return TorchInceptionFeatures(state, source, device)
    from msd_lora.backends.mindspore.inception import MindSporeInceptionFeatures

    return MindSporeInceptionFeatures(state, source, device, mode=ms_mode)


def clip_embedder(backend: str, config: dict, state: dict[str, np.ndarray], source: str, device: str = "auto",
                  ms_mode: int = 0) -> Any:
    """An object with image_embeddings(pixel_values) and text_embeddings(input_ids, attention_mask)."""
    if backend_name(backend) == "torch":
        from msd_lora.backends.torch.clip_score import TorchClipEmbedder

        return TorchClipEmbedder(config, state, source, device)
    from msd_lora.backends.mindspore.clip_score import MindSporeClipEmbedder

    return MindSporeClipEmbedder(config, state, source, device, mode=ms_mode)
