"""The parity probe of the MindSpore backend: its training loss, LoRA gradients and VAE latents.

Once a train step exists, loss and gradients come from that compiled step itself, run as an accumulation-only
micro-batch (nothing is updated) with its accumulator saved and restored: no second graph to compile, and the
gradients are exactly the ones training uses. Before (a backend never configured for training) a value-and-grad
function of the same loss cell is compiled once.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from msd_lora.backends.base import StepBatch
from msd_lora.backends.mindspore.backend import MindSporeBackend
from msd_lora.backends.probe import training_latents


class MeanLoss(nn.Cell):
    """The training loss: the mean of the loss cell's per-sample losses."""

    def __init__(self, loss: nn.Cell):
        super().__init__()
        self.loss = loss

    def construct(self, *inputs):
        return self.loss(*inputs).mean()


class MindSporeProbe:
    def __init__(self, backend: MindSporeBackend):
        self.backend = backend
        self._grad_fn = None

    def loss(self, batch: StepBatch) -> float:
        if self.backend.step is not None:
            return self._step_gradients(batch)[0]
        return float(self.backend.loss(*self.backend.step_inputs(batch)).asnumpy().mean())

    def lora_gradients(self, batch: StepBatch) -> dict[str, np.ndarray]:
        if self.backend.step is not None:
            return self._step_gradients(batch)[1]
        items = self.backend.lora_items()
        if self._grad_fn is None:  # built once: each new grad function would be compiled anew
            self._grad_fn = ms.value_and_grad(MeanLoss(self.backend.loss), None,
                                              ms.ParameterTuple([p for _, p in items]))
        _, grads = self._grad_fn(*self.backend.step_inputs(batch))
        return {k: g.asnumpy() for (k, _), g in zip(items, grads)}

    def encode_images(self, pixels: np.ndarray, posterior_noise: np.ndarray) -> np.ndarray:
        return training_latents(self.backend, pixels, posterior_noise)

    def _step_gradients(self, batch: StepBatch) -> tuple[float, dict[str, np.ndarray]]:
        step = self.backend.step
        saved = step.accum.asnumpy().copy()
        step.accum.set_data(Tensor(np.zeros_like(saved)))
        try:
            # the training graph itself (dynamic-shape where training declares it), no dropout, nothing updated
            loss, _, _, scale, _ = step(*self.backend.step_arguments(batch, 0.0, False, 1, 0))
            flat = step.accum.asnumpy() / float(scale.asnumpy())
        finally:
            step.accum.set_data(Tensor(saved))
        return float(loss.asnumpy()), step.layout.split(flat)
