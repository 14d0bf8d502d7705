"""The MindSpore LoRA training step: one compiled call per micro-batch.

Per call: scaled loss -> gradients of the LoRA weights -> accumulate. On the last micro-batch of an
optimizer step (`update` true) also: unscale -> all-finite check (INFNAN semantics, mindspore.amp.all_finite,
which runs on CPU and Ascend alike) -> global-norm clip -> AdamW applied only when finite -> EMA ->
dynamic loss-scale update (shrink on overflow, grow after `scale_window` clean steps). Nothing is applied
when the gradients overflow; the step reports it and the loop counts it.

Gradients, moments, the accumulation buffer and the EMA are flat vectors over all LoRA weights
(`FlatLayout`), so the update is a handful of graph ops whatever the number of LoRA layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, amp, mint, nn, ops

from msd_lora.backends.base import OptimizerSettings
from msd_lora.backends.mindspore.optim import FlatAdafactor, FlatAdamW, FlatProdigy
from msd_lora.diffusion.losses import sample_losses
from msd_lora.diffusion.schedule import add_noise, training_target
from msd_lora.embeddings.tokens import ROWS_KEY, decay_norms
from msd_lora.optimizers import ADAFACTOR_CLIP_THRESHOLD, ADAFACTOR_DECAY_RATE, ADAFACTOR_EPS, PRODIGY_D0
from msd_lora.tokenizer import join_chunks


@dataclass(frozen=True)
class FlatLayout:
    """Where each named tensor sits in the flat vector: names, shapes and sizes in order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s)) for s in self.shapes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        pieces = np.split(np.asarray(flat), np.cumsum(self.sizes)[:-1])
        return {n: p.reshape(s).copy() for n, p, s in zip(self.names, pieces, self.shapes)}

    def mask(self, name: str) -> np.ndarray:
        """1.0 where tensor `name` sits in the flat vector, else 0.0."""
        return np.concatenate([np.full(size, float(n == name), np.float32) for n, size in zip(self.names, self.sizes)])

    def join(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(arrays[n], np.float32).reshape(-1) for n in self.names])


def flatten(tensors) -> Tensor:
    """One float32 vector of the tensors' values, in order."""
    return ops.cat([t.astype(ms.float32).reshape(-1) for t in tensors])


class EncodeMoments(nn.Cell):
    """Pixels -> the VAE posterior's mean and standard deviation (log-variance clamped as diffusers does)."""

    def __init__(self, vae: nn.Cell):
        super().__init__(auto_prefix=False)
        self.vae = vae

    def construct(self, pixels):
        moments = self.vae.encode(pixels)[0]
        channels = moments.shape[1] // 2
        mean, logvar = moments[:, :channels], ops.clamp(moments[:, channels:], -30.0, 20.0)
        return mean, mint.exp(0.5 * logvar)


class TextStates(nn.Cell):
    """Token ids (N, chunks * 77) -> the text encoder's states, long prompts' chunks joined (`join_chunks`)."""

    def __init__(self, text_encoder: nn.Cell, chunk_length: int):
        super().__init__(auto_prefix=False)
        self.text_encoder, self.chunk_length = text_encoder, chunk_length

    def construct(self, token_ids):
        chunks = token_ids.shape[1] // self.chunk_length
        states = self.text_encoder(token_ids.reshape(-1, self.chunk_length))[0]
        return join_chunks(states, chunks, ops.cat)


class DiffusionLoss(nn.Cell):
    """Each sample's weighted loss (`losses.sample_losses`; the training loss is their mean) between the UNet's
    prediction and the eps / v target. Latents are
    sampled from the VAE posterior given as (mean, std); `text` is token ids run through the text encoder in the
    graph when it trains (`text_states` given), else the frozen encoder's output; the UNet's input is made with
    `input_noise`, the target with `noise`."""

    def __init__(self, unet: nn.Cell, text_states: TextStates | None, scaling_factor: float, prediction_type: str):
        super().__init__(auto_prefix=False)
        self.unet, self.text_states, self.prediction_type = unet, text_states, prediction_type
        self.encode_text = text_states is not None
        self.scaling_factor = scaling_factor

    def construct(self, mean, std, posterior_noise, text, noise, input_noise, timesteps, sqrt_alpha, sqrt_one_minus,
                  weights, thresholds, squared):
        latents = (mean + std * posterior_noise) * self.scaling_factor
        context = self.text_states(text) if self.encode_text else text
        noisy = add_noise(latents, input_noise, sqrt_alpha, sqrt_one_minus)
        pred = self.unet(noisy, timesteps, context)[0].astype(ms.float32)
        target = training_target(latents, noise, sqrt_alpha, sqrt_one_minus, self.prediction_type)
        return sample_losses(pred, target, weights, thresholds, squared)


def flat_optimizer(settings: OptimizerSettings, layout: FlatLayout, initial: np.ndarray) -> nn.Cell:
    """The flat optimizer cell of `settings.optimizer` over the LoRA weights (`initial`: their starting values)."""
    if settings.optimizer == "prodigy":
        return FlatProdigy(layout.total, settings.betas, settings.eps, settings.weight_decay, PRODIGY_D0,
                           settings.d_coef, settings.use_bias_correction, settings.safeguard_warmup,
                           initial.astype(np.float32))
    if settings.optimizer == "adafactor":
        return FlatAdafactor(layout.shapes, settings.weight_decay, ADAFACTOR_EPS[0], ADAFACTOR_DECAY_RATE,
                             ADAFACTOR_CLIP_THRESHOLD)
    decay = settings.weight_decay
    if ROWS_KEY in layout.names:  # added token rows decay at their own rate
        decay = np.where(layout.mask(ROWS_KEY), settings.rows_weight_decay, settings.weight_decay).astype(np.float32)
    return FlatAdamW(layout.total, settings.betas, settings.eps, decay)


class TrainStep(nn.Cell):
    """`step(inv_accumulation, lr, lr_rows, rows_decay, update, dropout_seed, *inputs) -> (loss, finite, grad_norm,
    loss_scale, sample_losses)` where `loss(*inputs)` gives the per-sample losses whose mean is the training loss
    (DiffusionLoss in training; any loss cell, e.g. in the benchmarks, a scalar one too).

    Added token rows (`ROWS_KEY` in the layout, last) train at `lr_rows` instead of `lr` and, after an applied update,
    have their norms decayed by `rows_decay` (`embeddings.tokens.decay_norms`; 0 leaves them bit-identical).

    `dropout_seed` is assigned to the LoRA cells' shared seed parameter inside the graph. Set from the host with
    `set_data` between calls instead, the seed was not seen by the dynamic-shape (bucketed) train graph after its
    first call: MindSpore 2.10 on CPU drew the first step's dropout masks in every step (static graphs saw it)."""

    def __init__(self, loss: nn.Cell, lora_params: list[Parameter], layout: FlatLayout,
                 settings: OptimizerSettings, dropout_seed: Parameter | None = None):
        super().__init__(auto_prefix=False)
        self.loss = loss
        self.dropout_seed = dropout_seed
        self.layout = layout
        self.clip_grad, self.max_grad_norm = settings.clip_grad, float(settings.max_grad_norm)
        self.ema_decay = float(settings.ema_decay)
        self.scale_factor, self.scale_window = float(settings.loss_scale_factor), int(settings.scale_window)
        self.weights = ParameterTuple(lora_params)
        ends = np.cumsum(layout.sizes)
        self.starts, self.ends = tuple(int(e - n) for e, n in zip(ends, layout.sizes)), tuple(int(e) for e in ends)
        self.optimizer = flat_optimizer(settings, layout, np.concatenate([p.asnumpy().reshape(-1) for p in lora_params]))
        scales = np.concatenate([np.full(size, settings.lr_scale(name), np.float32)
                                 for name, size in zip(layout.names, layout.sizes)])
        self.lr_scales = Tensor(scales) if (scales != 1.0).any() else None  # per-part learning rates
        self.train_rows = ROWS_KEY in layout.names
        if self.train_rows:
            if layout.names[-1] != ROWS_KEY:
                raise ValueError(f"{ROWS_KEY} must come last in the flat layout")
            self.rows_mask = Tensor(layout.mask(ROWS_KEY))
            self.rows_start, self.rows_shape = int(layout.total - layout.sizes[-1]), tuple(layout.shapes[-1])
        self.accum = Parameter(Tensor(np.zeros(layout.total, np.float32)), name="accum", requires_grad=False)
        self.use_ema = settings.use_ema
        initial = np.concatenate([p.asnumpy().reshape(-1) for p in lora_params]) if settings.use_ema else np.zeros(1)
        self.ema = Parameter(Tensor(initial.astype(np.float32)), name="ema", requires_grad=False)
        # a tensor, not a Python flag: one compiled graph serves dynamic and static scaling
        self.dynamic = Parameter(Tensor(settings.loss_scaler_type == "dynamic"), name="loss_scale.dynamic",
                                 requires_grad=False)
        initial_scale = 1.0 if settings.loss_scaler_type == "none" else settings.init_loss_scale
        self.loss_scale = Parameter(Tensor(initial_scale, ms.float32), name="loss_scale.value", requires_grad=False)
        self.good_steps = Parameter(Tensor(0, ms.int32), name="loss_scale.good_steps", requires_grad=False)
        self.grad_fn = ms.value_and_grad(self._scaled_loss, None, self.weights, has_aux=True)

    def _scaled_loss(self, weight, *inputs):
        per_sample = self.loss(*inputs)
        loss = per_sample.mean()
        return loss * weight, loss, per_sample

    def construct(self, inv_accumulation, lr, lr_rows, rows_decay, update, dropout_seed, *inputs):
        """`update` (a bool tensor, so one graph serves every micro-batch): apply the optimizer after this one.
        `inputs` are separate tensors (a tuple argument would be a graph constant, recompiled per call)."""
        if self.dropout_seed is not None:
            ops.assign(self.dropout_seed, dropout_seed)
        scale = self.loss_scale + 0.0
        (scaled_loss, loss, per_sample), grads = self.grad_fn(scale * inv_accumulation, *inputs)
        loss = ops.depend(loss, scaled_loss)  # keeps the graph free of a dangling output
        summed = self.accum + flatten(grads)
        ops.assign(self.accum, ops.select(update, ops.zeros_like(summed), summed))
        grads = summed / scale
        finite = amp.all_finite((grads,))
        apply = ops.logical_and(update, finite)
        norm = ops.sqrt((grads * grads).sum())
        if self.clip_grad:
            grads = grads * ops.minimum(self.max_grad_norm / (norm + 1e-6), 1.0)
        if self.lr_scales is not None:
            lr = lr * self.lr_scales
        if self.train_rows:
            lr = lr * (1.0 - self.rows_mask) + lr_rows * self.rows_mask
        params = self.optimizer(flatten(self.weights), grads, lr, apply)
        if self.train_rows:
            rows = params[self.rows_start:].reshape(self.rows_shape)
            strength = rows_decay * apply.astype(ms.float32)
            params = ops.cat([params[:self.rows_start], decay_norms(rows, strength).reshape(-1)])
        if self.use_ema:
            ops.assign(self.ema, ops.select(apply, self.ema + (1.0 - self.ema_decay) * (params - self.ema), self.ema))
        self._write_weights(params)
        self._adjust_scale(update, finite)
        return loss, finite, norm, scale, per_sample

    def _write_weights(self, flat: Tensor) -> None:
        for param, start, end in zip(self.weights, self.starts, self.ends):
            ops.assign(param, flat[start:end].reshape(param.shape))

    def _adjust_scale(self, update, finite):
        """On optimizer steps (dynamic scaler only): shrink the scale on overflow, grow it after `scale_window`
        clean steps in a row. Unlike torch's GradScaler the scale never shrinks below 1 (mindspore.amp's
        DynamicLossScaler does the same): a scale under 1 would only shrink fp16 gradients further."""
        update = ops.logical_and(update, self.dynamic)
        factor = self.scale_factor
        good = ops.select(finite, self.good_steps + 1, ops.zeros_like(self.good_steps))
        grow = good >= self.scale_window
        scale = self.loss_scale + 0.0
        grown = ops.select(ops.isfinite(scale * factor), scale * factor, scale)
        new_scale = ops.select(finite, ops.select(grow, grown, scale), ops.maximum(scale / factor, 1.0))
        ops.assign(self.loss_scale, ops.select(update, new_scale, scale))
        ops.assign(self.good_steps, ops.select(update, ops.select(grow, ops.zeros_like(good), good),
                                               self.good_steps))
