"""The MindSpore LoRA training step: one compiled call per micro-batch.

Per call: scaled loss -> gradients of the LoRA weights -> accumulate. On the last micro-batch of an
optimizer step (`update=True`) also: unscale -> all-finite check (INFNAN semantics, mindspore.amp.all_finite,
which runs on CPU and Ascend alike) -> global-norm clip -> AdamW applied only when finite -> EMA ->
dynamic loss-scale update (shrink on overflow, grow after `scale_window` clean steps). Nothing is applied
when the gradients overflow; the step reports it and the loop counts it.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, amp, nn, ops

from msd_lora.backends.base import OptimizerSettings
from msd_lora.backends.mindspore.optim import AdamW
from msd_lora.diffusion.schedule import add_noise, training_target


def _zeros_like(param: Parameter, name: str) -> Parameter:
    return Parameter(Tensor(np.zeros(param.shape, np.float32)), name=name, requires_grad=False)


class DiffusionLoss(nn.Cell):
    """MSE between the UNet's prediction and the eps / v target, with the text encoder in the graph."""

    def __init__(self, unet: nn.Cell, text_encoder: nn.Cell, prediction_type: str):
        super().__init__(auto_prefix=False)
        self.unet, self.text_encoder, self.prediction_type = unet, text_encoder, prediction_type

    def construct(self, latents, token_ids, noise, timesteps, sqrt_alpha, sqrt_one_minus):
        context = self.text_encoder(token_ids)[0]
        noisy = add_noise(latents, noise, sqrt_alpha, sqrt_one_minus)
        pred = self.unet(noisy, timesteps, context)[0].astype(ms.float32)
        target = training_target(latents, noise, sqrt_alpha, sqrt_one_minus, self.prediction_type)
        return ((pred - target) ** 2).mean()


class TrainStep(nn.Cell):
    def __init__(self, loss: DiffusionLoss, lora_params: list[Parameter], names: list[str],
                 settings: OptimizerSettings):
        super().__init__(auto_prefix=False)
        self.loss = loss
        self.clip_grad, self.max_grad_norm = settings.clip_grad, float(settings.max_grad_norm)
        self.ema_decay = float(settings.ema_decay)
        self.scale_factor, self.scale_window = float(settings.loss_scale_factor), int(settings.scale_window)
        self.weights = ParameterTuple(lora_params)
        self.optimizer = AdamW(lora_params, names, settings.betas, settings.eps, settings.weight_decay)
        self.accum = ParameterTuple([_zeros_like(p, f"accum.{n}") for p, n in zip(lora_params, names)])
        self.use_ema = settings.use_ema
        self.ema = ParameterTuple([Parameter(p.value().copy(), name=f"ema.{n}", requires_grad=False)
                                   for p, n in zip(lora_params, names)]) if settings.use_ema else ParameterTuple([])
        self.dynamic = settings.loss_scaler_type == "dynamic"
        initial = 1.0 if settings.loss_scaler_type == "none" else settings.init_loss_scale
        self.loss_scale = Parameter(Tensor(initial, ms.float32), name="loss_scale.value", requires_grad=False)
        self.good_steps = Parameter(Tensor(0, ms.int32), name="loss_scale.good_steps", requires_grad=False)
        self.grad_fn = ms.value_and_grad(self._scaled_loss, None, self.weights, has_aux=True)

    def _scaled_loss(self, latents, token_ids, noise, timesteps, sqrt_alpha, sqrt_one_minus, weight):
        loss = self.loss(latents, token_ids, noise, timesteps, sqrt_alpha, sqrt_one_minus)
        return loss * weight, loss

    def construct(self, latents, token_ids, noise, timesteps, sqrt_alpha, sqrt_one_minus, inv_accumulation, lr,
                  update: bool):
        scale = self.loss_scale + 0.0
        (_, loss), grads = self.grad_fn(latents, token_ids, noise, timesteps, sqrt_alpha, sqrt_one_minus,
                                        scale * inv_accumulation)
        if not update:
            for acc, grad in zip(self.accum, grads):
                ops.assign_add(acc, grad)
            return loss, ops.ones((), ms.bool_), ops.zeros((), ms.float32), scale
        grads = tuple((acc + grad) / scale for acc, grad in zip(self.accum, grads))
        finite = amp.all_finite(grads)
        squares = ops.zeros((), ms.float32)
        for grad in grads:
            squares = squares + (grad * grad).sum()
        norm = ops.sqrt(squares)
        if self.clip_grad:
            coef = ops.minimum(self.max_grad_norm / (norm + 1e-6), 1.0)
            grads = tuple(g * coef for g in grads)
        self.optimizer(grads, lr, finite)
        if self.use_ema:
            for average, param in zip(self.ema, self.weights):
                ops.assign(average, ops.select(finite, average + (1.0 - self.ema_decay) * (param - average), average))
        for acc in self.accum:
            ops.assign(acc, ops.zeros_like(acc))
        self._adjust_scale(finite)
        return loss, finite, norm, scale

    def _adjust_scale(self, finite):
        """Shrink the scale on overflow; grow it after `scale_window` clean steps in a row (dynamic only)."""
        if not self.dynamic:
            return
        factor = self.scale_factor
        good = ops.select(finite, self.good_steps + 1, ops.zeros_like(self.good_steps))
        grow = good >= self.scale_window
        scale = self.loss_scale + 0.0
        grown = ops.select(ops.isfinite(scale * factor), scale * factor, scale)
        new_scale = ops.select(finite, ops.select(grow, grown, scale), ops.maximum(scale / factor, 1.0))
        ops.assign(self.loss_scale, new_scale)
        ops.assign(self.good_steps, ops.select(grow, ops.zeros_like(good), good))
