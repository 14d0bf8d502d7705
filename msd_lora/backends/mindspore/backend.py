"""MindSpore backend: mindone's SD networks, our LoRA cells, a graph-compiled train step with loss scaling."""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("MS_ASCEND_CHECK_OVERFLOW_MODE", "INFNAN_MODE")  # before MindSpore initialises a device

import mindspore as ms  # noqa: E402
from mindspore import Tensor, mint, nn, ops  # noqa: E402


def _quiet_mindone_import() -> None:
    """Import mindone without the noise it makes with these versions, which says nothing about this run:
    transformers 4.57 prints "Config not found" for each mindone model it lacks (parakeet, ...), mindone still
    imports `mindspore.common.api` (deprecated in 2.9) and calls a deprecated transformers argument."""
    from mindspore import log as ms_log

    deprecation = lambda record: "is deprecated from version" not in record.getMessage()  # noqa: E731
    ms_log._get_logger().addFilter(deprecation)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # mindone loads its modules lazily: import the classes, so that their import happens here
            from mindone.diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
            from mindone.transformers import CLIPTextModel  # noqa: F401
    finally:
        ms_log._get_logger().removeFilter(deprecation)


_quiet_mindone_import()

from msd_lora.backends.base import (Backend, ModelInfo, OptimizerSettings, StepBatch, StepResult,  # noqa: E402
                                    check_only_lora_trainable)
from msd_lora.checkpoint import TrainingState  # noqa: E402
from msd_lora.backends.mindspore import lora as ms_lora  # noqa: E402
from msd_lora.backends.mindspore.kernels import apply_cpu_kernel_substitutes  # noqa: E402
from msd_lora.backends.mindspore.models import build_networks, load_state, named_parameters  # noqa: E402
from msd_lora.backends.mindspore.step import DiffusionLoss, EncodeLatents, FlatLayout, TrainStep  # noqa: E402
from msd_lora.lora.core import DOWN, UP, LoraWeights, to_tensors  # noqa: E402
from msd_lora.lora.spec import LoraSpec  # noqa: E402
from msd_lora.models.pretrained import PretrainedModel  # noqa: E402
from msd_lora.errors import ConfigError

DEVICE_TARGETS = {"cpu": "CPU", "gpu": "GPU", "cuda": "GPU", "ascend": "Ascend"}


def configure_context(mode: int, device: str) -> str:
    """Set the execution mode and device target once per process; substitute missing CPU kernels."""
    if device != "auto":
        if device.lower() not in DEVICE_TARGETS:
            raise ConfigError(f"device '{device}' is not a MindSpore target; use auto, cpu, gpu or ascend")
        target = DEVICE_TARGETS[device.lower()]
        if target != ms.get_context("device_target"):  # MindSpore takes the device once, before it first runs
            ms.set_device(target)
    ms.set_context(mode=ms.GRAPH_MODE if mode == 0 else ms.PYNATIVE_MODE)
    apply_cpu_kernel_substitutes()
    return ms.get_context("device_target")


class _TextEncode(nn.Cell):
    def __init__(self, text_encoder):
        super().__init__(auto_prefix=False)
        self.text_encoder = text_encoder

    def construct(self, token_ids):
        return self.text_encoder(token_ids)[0]


class _Denoise(nn.Cell):
    def __init__(self, unet):
        super().__init__(auto_prefix=False)
        self.unet = unet

    def construct(self, latents, timesteps, context):
        return self.unet(latents, timesteps, context)[0]


class _Decode(nn.Cell):
    def __init__(self, vae, scaling_factor: float):
        super().__init__(auto_prefix=False)
        self.vae, self.scaling_factor = vae, scaling_factor

    def construct(self, latents):
        return self.vae.decode(latents / self.scaling_factor)[0]


class MindSporeBackend(Backend):
    name = "mindspore"

    def __init__(self, mode: int = 0, device: str = "auto", enable_flash_attention: bool = False,
                 mixed_precision: str = "no", **_: Any):
        self.device_target = configure_context(mode, device)
        if mixed_precision != "no":
            warnings.warn(f"mixed_precision '{mixed_precision}' is torch autocast and does nothing on MindSpore: "
                          "use lora_fp16: True for float16 LoRA compute", UserWarning, stacklevel=2)
        if enable_flash_attention and self.device_target != "Ascend":
            raise ConfigError(f"enable_flash_attention needs Ascend (MindSpore's flash-attention kernel exists only "
                             f"there); this run's device target is {self.device_target}. Set "
                             f"enable_flash_attention: False")
        self.flash_attention = enable_flash_attention
        self.components: dict[str, nn.Cell] = {}
        self.lora_cells: dict[str, ms_lora.LoraLinear] = {}
        self.alpha = 1.0
        self.step: TrainStep | None = None
        self._grad_fn = None

    # --- model -------------------------------------------------------------------------------
    def load_model(self, model: PretrainedModel, prediction_type: str) -> ModelInfo:
        networks = build_networks(model.configs)
        for component, network in networks.items():
            load_state(component, network, model.take_state(component), f"{model.source} ({component})")
            network.set_train(False)
            for param in network.get_parameters():
                param.requires_grad = False
        self.unet, self.vae, self.text_encoder = networks["unet"], networks["vae"], networks["text_encoder"]
        if self.flash_attention:  # Ascend only (checked in __init__); the kernel takes fp16, so fp32 inputs are cast
            self.unet.enable_flash_sdp(True)
            self.unet.set_flash_attention_force_cast_dtype(ms.float16)
        self.components = {"unet": self.unet, "text_encoder": self.text_encoder}
        self.prediction_type = prediction_type
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self._build_graphs()
        return ModelInfo(latent_channels=int(self.vae.config.latent_channels),
                         vae_scale_factor=2 ** (len(self.vae.config.block_out_channels) - 1),
                         scaling_factor=self.scaling_factor, base_model=model.source)

    def _build_graphs(self) -> None:
        """Fresh graph cells: a graph compiled before LoRA injection would keep running the network without it."""
        self._text = _TextEncode(self.text_encoder)
        self._denoise = _Denoise(self.unet)
        self._decode = _Decode(self.vae, self.scaling_factor)
        self._encode = EncodeLatents(self.vae, self.scaling_factor)
        self._loss = DiffusionLoss(self.unet, self.text_encoder, self._encode, self.prediction_type)
        self._grad_fn = None

    def linear_shapes(self) -> dict[str, dict[str, tuple[int, int]]]:
        return {c: {n: tuple(cell.weight.shape) for n, cell in model.cells_and_names()
                    if isinstance(cell, (mint.nn.Linear, nn.Dense))} for c, model in self.components.items()}

    def _base_params(self) -> dict[str, ms.Parameter]:
        return {f"{c}.{n}": p for c, model in self.components.items() for n, p in named_parameters(c, model).items()}

    def base_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self._base_params().items()}

    def base_weights(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        params = self._base_params()
        return {n: params[n].asnumpy().copy() for n in (params if names is None else names)}

    def set_base_weights(self, values: dict[str, np.ndarray]) -> None:
        params = self._base_params()
        for name, value in values.items():
            if tuple(params[name].shape) != tuple(value.shape):
                raise ValueError(f"{name}: shape {value.shape} does not fit {tuple(params[name].shape)}")
            params[name].set_data(Tensor(np.asarray(value, np.float32)))

    # --- LoRA --------------------------------------------------------------------------------
    def add_lora(self, spec: LoraSpec, targets: dict[str, list[str]], init: LoraWeights) -> None:
        self.alpha = spec.alpha
        self.step = None  # a train step built before holds the old parameter list
        for component, names in targets.items():
            self.lora_cells.update(ms_lora.inject(self.components[component], component, names, spec))
        lora_params = [p for _, p in self._lora_items()]
        for param in lora_params:
            param.requires_grad = True
        trainable = [p for m in (self.unet, self.text_encoder, self.vae) for p in m.trainable_params()]
        check_only_lora_trainable(len(trainable), len(lora_params))
        self.set_lora_weights(init)
        self._build_graphs()

    def _lora_items(self) -> list[tuple[str, ms.Parameter]]:
        """(canonical tensor key, parameter): MindSpore may rename parameters, our keys stay."""
        return [item for key, cell in self.lora_cells.items()
                for item in ((f"{key}.{DOWN}", cell.down), (f"{key}.{UP}", cell.up))]

    def lora_weights(self, ema: bool = False) -> LoraWeights:
        weights = ms_lora.read_weights(self.lora_cells, self.alpha)
        if ema and self.step is not None and self.step.use_ema:
            averages = self.step.layout.split(self.step.ema.asnumpy())
            for key, layer in weights.items():
                layer.down, layer.up = averages[f"{key}.lora_A.weight"], averages[f"{key}.lora_B.weight"]
        return weights

    def _write_lora_weights(self, weights: LoraWeights) -> None:
        ms_lora.write_weights(self.lora_cells, weights)

    # --- training ----------------------------------------------------------------------------
    def configure_training(self, settings: OptimizerSettings) -> None:
        items = self._lora_items()
        layout = FlatLayout(names=tuple(k for k, _ in items), shapes=tuple(tuple(p.shape) for _, p in items))
        self.step = TrainStep(self._loss, [p for _, p in items], layout, settings)

    def _inputs(self, batch: StepBatch) -> tuple[Tensor, ...]:
        return (Tensor(batch.pixels), Tensor(batch.posterior_noise), Tensor(batch.token_ids), Tensor(batch.noise), Tensor(batch.timesteps),
                Tensor(batch.sqrt_alpha.reshape(-1, 1, 1, 1)), Tensor(batch.sqrt_one_minus_alpha.reshape(-1, 1, 1, 1)))

    def eval_loss(self, batch: StepBatch) -> float:
        if self.step is not None:
            return self._step_gradients(batch)[0]
        return float(self._loss(*self._inputs(batch)).asnumpy())

    def lora_gradients(self, batch: StepBatch) -> dict[str, np.ndarray]:
        if self.step is not None:
            return self._step_gradients(batch)[1]
        items = self._lora_items()
        if self._grad_fn is None:  # built once: each new grad function would be compiled anew
            self._grad_fn = ms.value_and_grad(self._loss, None, ms.ParameterTuple([p for _, p in items]))
        _, grads = self._grad_fn(*self._inputs(batch))
        return {k: g.asnumpy() for (k, _), g in zip(items, grads)}

    def _step_gradients(self, batch: StepBatch) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and LoRA gradients from the compiled train step itself, run as an accumulation-only micro-batch
        (nothing is updated) with its accumulator saved and restored: no second graph to compile, and the
        gradients are exactly the ones training uses."""
        step = self.step
        saved = step.accum.asnumpy().copy()
        step.accum.set_data(Tensor(np.zeros_like(saved)))
        try:
            loss, _, _, scale = step(Tensor(1.0, ms.float32), Tensor(0.0, ms.float32), Tensor(False, ms.bool_),
                                     *self._inputs(batch))
            flat = step.accum.asnumpy() / float(scale.asnumpy())
        finally:
            step.accum.set_data(Tensor(saved))
        return float(loss.asnumpy()), step.layout.split(flat)

    def train_step(self, batch: StepBatch, lr: float, update: bool, accumulation: int) -> StepResult:
        loss, finite, norm, scale = self.step(Tensor(1.0 / accumulation, ms.float32), Tensor(lr, ms.float32),
                                              Tensor(update, ms.bool_), *self._inputs(batch))
        finite = bool(finite.asnumpy())
        return StepResult(loss=float(loss.asnumpy()), updated=update and finite, overflow=update and not finite,
                          grad_norm=float(norm.asnumpy()) if update else None, loss_scale=float(scale.asnumpy()))

    def training_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        step, layout = self.step, self.step.layout
        arrays = {}
        for prefix, flat in (("optimizer.exp_avg", step.optimizer.exp_avg), ("optimizer.exp_avg_sq",
                                                                             step.optimizer.exp_avg_sq)):
            arrays.update({f"{prefix}.{k}": v for k, v in layout.split(flat.asnumpy()).items()})
        if step.use_ema:
            arrays.update({f"ema.{k}": v for k, v in layout.split(step.ema.asnumpy()).items()})
        scalars = {"optimizer_step": int(step.optimizer.step.asnumpy())}
        if bool(step.dynamic.asnumpy()):
            scalars.update(loss_scale=float(step.loss_scale.asnumpy()),
                           scaler_growth_tracker=int(step.good_steps.asnumpy()))
        return arrays, scalars

    def _restore_training_state(self, state: TrainingState) -> None:
        step, layout = self.step, self.step.layout
        moments = (state.exp_avg, state.exp_avg_sq) if state.exp_avg is not None else (None, None)
        for param, values in zip((step.optimizer.exp_avg, step.optimizer.exp_avg_sq), moments):
            param.set_data(Tensor(layout.join(values) if values is not None else np.zeros(layout.total, np.float32)))
        step.optimizer.step.set_data(Tensor(float(state.optimizer_step), ms.float32))
        if step.use_ema:
            step.ema.set_data(Tensor(layout.join(state.ema if state.ema is not None else to_tensors(self.lora_weights()))))
        if bool(step.dynamic.asnumpy()) and state.loss_scale is not None:
            step.loss_scale.set_data(Tensor(state.loss_scale, ms.float32))
            step.good_steps.set_data(Tensor(state.scaler_growth_tracker, ms.int32))

    # --- sampling ----------------------------------------------------------------------------
    def encode_prompts(self, token_ids: np.ndarray) -> Tensor:
        return self._text(Tensor(token_ids))

    def denoise(self, latents: Tensor, t: float, contexts: list[Tensor]) -> list[Tensor]:
        n, k = latents.shape[0], len(contexts)
        x = ops.cat([latents] * k) if k > 1 else latents
        context = ops.cat(contexts) if k > 1 else contexts[0]
        # float32 timesteps for every sampler (integer ones are exact): one compiled graph, not one per dtype
        pred = self._denoise(x, Tensor(np.full((n * k,), t, np.float32)), context)
        return [pred[i * n:(i + 1) * n] for i in range(k)]

    def encode_images(self, pixels: np.ndarray, posterior_noise: np.ndarray) -> Tensor:
        return self._encode(Tensor(pixels), Tensor(posterior_noise))

    def decode(self, latents: Tensor) -> np.ndarray:
        return self._decode(latents).asnumpy().astype(np.float32)

    def tensor(self, array: np.ndarray) -> Tensor:
        return Tensor(np.ascontiguousarray(array))

    def save_native_lora(self, path: str, weights: LoraWeights, module_index: Any) -> str:
        """mindone's LoRA checkpoint (`ms.save_checkpoint`, `lora_rank` appended), written atomically."""
        from msd_lora.lora.format_mindone import write_mindone

        tensors = write_mindone(weights, module_index)
        rank = int(tensors.pop("lora_rank"))
        params = [{"name": name, "data": Tensor(np.ascontiguousarray(value, np.float32))}
                  for name, value in tensors.items()]
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.stem}.partial.ckpt")  # save_checkpoint insists on a .ckpt name
        try:
            ms.save_checkpoint(params, str(temporary), append_dict={"lora_rank": rank})
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        return str(target)
