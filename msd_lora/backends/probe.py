"""What the parity tests measure inside a backend, kept out of the training interface (`Backend`).

    probe = probe_for(trainer.backend)
    probe.loss(batch), probe.lora_gradients(batch), probe.encode_images(pixels, posterior_noise)

Each backend's probe reads the same computation its train step runs (on MindSpore, the compiled step itself).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from msd_lora.backends.base import Backend, StepBatch


class Probe(Protocol):
    def loss(self, batch: StepBatch) -> float:
        """The training loss of a batch, changing no weights or optimizer state."""

    def lora_gradients(self, batch: StepBatch) -> dict[str, np.ndarray]:
        """d(loss)/d(LoRA weight) by canonical tensor key, without touching optimizer state."""

    def encode_images(self, pixels: np.ndarray, posterior_noise: np.ndarray) -> np.ndarray:
        """Pixels (N, 3, H, W) in [-1, 1] -> latents as the UNet sees them: (mean + std * noise) * scaling factor."""


def training_latents(backend: Backend, pixels: np.ndarray, posterior_noise: np.ndarray) -> np.ndarray:
    """The latents a train step computes from `pixels` and the posterior noise, through the backend's VAE."""
    mean, std = backend.encode_moments(pixels)
    return (mean + std * posterior_noise) * backend.info.scaling_factor


def probe_for(backend: Backend) -> Probe:
    if backend.name == "torch":
        from msd_lora.backends.torch.probe import TorchProbe

        return TorchProbe(backend)
    from msd_lora.backends.mindspore.probe import MindSporeProbe

    return MindSporeProbe(backend)
