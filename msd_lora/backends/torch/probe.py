"""The parity probe of the torch backend: its training loss, LoRA gradients and VAE latents, read off the step."""
from __future__ import annotations

import numpy as np
import torch

from msd_lora.backends.base import StepBatch
from msd_lora.backends.probe import training_latents
from msd_lora.backends.torch.backend import TorchBackend


class TorchProbe:
    def __init__(self, backend: TorchBackend):
        self.backend = backend

    @torch.no_grad()
    def loss(self, batch: StepBatch) -> float:
        return self.backend.loss(self.backend.tensor_batch(batch)).item()

    def lora_gradients(self, batch: StepBatch) -> dict[str, np.ndarray]:
        params = list(self.backend.lora_params.values())
        grads = torch.autograd.grad(self.backend.loss(self.backend.tensor_batch(batch)), params)
        return {k: g.float().cpu().numpy() for k, g in zip(self.backend.lora_params, grads)}

    def encode_images(self, pixels: np.ndarray, posterior_noise: np.ndarray) -> np.ndarray:
        return training_latents(self.backend, pixels, posterior_noise)
