"""MindSpore backend: mindone's SD networks, our LoRA cells, a graph-compiled train step with loss scaling."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from msd_lora.backends.base import (
    Backend,
    BackendOptions,
    OptimizerSettings,
    StepBatch,
    StepResult,
    extend_token_embedding,
)
from msd_lora.backends.mindspore import lora as ms_lora
from msd_lora.backends.mindspore import token_rows as ms_rows
from msd_lora.backends.mindspore.context import configure_context, import_mindone_quietly
from msd_lora.backends.mindspore.kernels import apply_dynamic_shape_substitutes
from msd_lora.backends.mindspore.models import build_networks, load_state, named_parameters
from msd_lora.backends.mindspore.optim import export_state, import_state
from msd_lora.backends.mindspore.step import DiffusionLoss, EncodeMoments, FlatLayout, TextStates, TrainStep
from msd_lora.checkpoint import TrainingState
from msd_lora.embeddings.tokens import ROWS_KEY, decay_strength
from msd_lora.lora.core import DOWN, MAGNITUDE, UP, LoraWeights, magnitude_from_peft, to_tensors
from msd_lora.lora.spec import LoraSpec
from msd_lora.models.pretrained import PretrainedModel

import_mindone_quietly()
CHECKPOINTED_BLOCKS = {"unet": ("ResnetBlock2D", "BasicTransformerBlock"), "text_encoder": ("CLIPEncoderLayer",)}


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
    compiles_graphs = True

    def __init__(self, options: BackendOptions = BackendOptions()):
        super().__init__(options)
        self.device_target = configure_context(options.mode, options.device)
        self.compiles_graphs = options.mode == 0
        if options.mixed_precision != "no":
            warnings.warn(f"mixed_precision '{options.mixed_precision}' is torch autocast and does nothing on "
                          f"MindSpore: use lora_fp16: True for float16 LoRA compute", UserWarning, stacklevel=2)
        self.flash_attention = options.enable_flash_attention and self.device_target == "Ascend"
        if options.enable_flash_attention and not self.flash_attention:  # mindone's v2 yamls ask for it
            warnings.warn(f"enable_flash_attention needs Ascend (MindSpore's flash-attention kernel exists only "
                          f"there); on {self.device_target} the UNet uses standard attention", UserWarning,
                          stacklevel=2)
        self.components: dict[str, nn.Cell] = {}
        self.lora_cells: dict[str, ms_lora.LoraCell] = {}
        self.dropout_seed: ms.Parameter | None = None  # read by every LoRA cell, assigned by the train step's graph
        self.step: TrainStep | None = None
        self.extended: ms_rows.ExtendedEmbedding | None = None  # the token embedding with added rows
        self.dynamic_shapes = options.dynamic_shapes and self.compiles_graphs
        if self.dynamic_shapes:  # before any graph is compiled: compiled graphs keep the ops they were built with
            apply_dynamic_shape_substitutes()

    # --- model -------------------------------------------------------------------------------
    def _build_networks(self, model: PretrainedModel) -> None:
        networks = build_networks(model.configs)
        for component, network in networks.items():
            load_state(component, network, model.take_state(component), f"{model.source} ({component})")
            network.set_train(False)
            for param in network.get_parameters():
                param.requires_grad = False
        self.unet, self.vae, self.text_encoder = networks["unet"], networks["vae"], networks["text_encoder"]
        self.chunk_length = int(model.configs["text_encoder"].get("max_position_embeddings", 77))
        if self.flash_attention:  # the kernel takes fp16, so fp32 is cast
            self.unet.enable_flash_sdp(True)
            self.unet.set_flash_attention_force_cast_dtype(ms.float16)
        self.components = {"unet": self.unet, "text_encoder": self.text_encoder}
        self._build_graphs()

    def _build_graphs(self) -> None:
        """Fresh graph cells: a graph compiled before LoRA injection would keep running the network without it."""
        scaling = self.info.scaling_factor
        self._text = TextStates(self.text_encoder, self.chunk_length)
        self._denoise = _Denoise(self.unet)
        self._decode = _Decode(self.vae, scaling)
        self._moments = EncodeMoments(self.vae)
        self.loss = DiffusionLoss(self.unet, self._text if self.trains_text_encoder else None, scaling,
                                  self.prediction_type)
        self.step = None  # a train step built before holds the old graph

    def layer_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        return {c: ms_lora.layer_shapes(model) for c, model in self.components.items()}

    def _base_parameters(self) -> dict[str, ms.Parameter]:
        return {f"{c}.{n}": p for c, model in self.components.items() for n, p in named_parameters(c, model).items()}

    def _read(self, param: ms.Parameter) -> np.ndarray:
        return param.asnumpy().astype(np.float32)

    def _write(self, param: ms.Parameter, value: np.ndarray) -> None:
        param.set_data(Tensor(value))

    # --- LoRA --------------------------------------------------------------------------------
    def _inject_lora(self, spec: LoraSpec, targets: dict[str, list[str]], init: LoraWeights) -> None:
        if self.dropout_seed is None:
            self.dropout_seed = ms_lora.dropout_seed_parameter(spec)
        for component, names in targets.items():
            layers = {n: init[f"{component}.{n}"] for n in names}
            self.lora_cells.update(ms_lora.inject(self.components[component], component, layers, spec, sorted(init),
                                                  self.dropout_seed))
        for _, param in self.lora_items():
            param.requires_grad = True
        self._build_graphs()

    def _trainable_count(self) -> int:
        return sum(len(m.trainable_params()) for m in (self.unet, self.text_encoder, self.vae))

    def lora_items(self) -> list[tuple[str, ms.Parameter]]:
        """(canonical tensor key, parameter): MindSpore may rename parameters, our keys stay."""
        return [(f"{key}.{part}", param) for key, cell in self.lora_cells.items()
                for part, param in ms_lora.lora_parts(cell)]

    def lora_weights(self, ema: bool = False) -> LoraWeights:
        weights = ms_lora.read_weights(self.lora_cells, self.alphas)
        if ema and self.step is not None and self.step.use_ema:
            averages = self.step.layout.split(self.step.ema.asnumpy())
            for key, layer in weights.items():
                layer.down, layer.up = averages[f"{key}.{DOWN}"], averages[f"{key}.{UP}"]
                if layer.magnitude is not None:
                    layer.magnitude = magnitude_from_peft(averages[f"{key}.{MAGNITUDE}"], layer.down)
        return weights

    def _write_lora_weights(self, weights: LoraWeights) -> None:
        ms_lora.write_weights(self.lora_cells, weights)

    def trained_tensors(self) -> dict[str, np.ndarray]:
        """Every trained tensor's values by key: the LoRA's, and the added token rows when they train."""
        return {**to_tensors(self.lora_weights()), **({ROWS_KEY: self.token_rows()} if self.trains_token_rows else {})}

    # --- added token rows --------------------------------------------------------------------
    def _extend_token_table(self, rows: np.ndarray, trainable: bool) -> None:
        self.extended = extend_token_embedding(self.text_encoder, ms_rows.ExtendedEmbedding, rows, trainable)
        self._build_graphs()  # graphs built before would keep the old table

    def token_rows(self) -> np.ndarray | None:
        return None if self.extended is None else ms_rows.read_rows(self.extended)

    def set_token_rows(self, rows: np.ndarray) -> None:
        ms_rows.write_rows(self.extended, rows)

    # --- training ----------------------------------------------------------------------------
    def configure_training(self, settings: OptimizerSettings) -> None:
        self.settings = settings
        items = self.lora_items() + ([(ROWS_KEY, self.extended.rows)] if self.trains_token_rows else [])
        layout = FlatLayout(names=tuple(k for k, _ in items), shapes=tuple(tuple(p.shape) for _, p in items))
        self.step = TrainStep(self.loss, [p for _, p in items], layout, settings, self.dropout_seed)

    def step_inputs(self, batch: StepBatch) -> tuple[Tensor, ...]:
        """The train step's (and the loss's) tensor inputs, in DiffusionLoss's order."""
        self.check_batch(batch)
        text = batch.token_ids if self.trains_text_encoder else batch.context
        input_noise, weights, thresholds, squared = batch.loss_terms()
        return (Tensor(batch.latent_mean), Tensor(batch.latent_std), Tensor(batch.posterior_noise), Tensor(text),
                Tensor(batch.noise), Tensor(input_noise), Tensor(batch.timesteps),
                Tensor(batch.sqrt_alpha.reshape(-1, 1, 1, 1)), Tensor(batch.sqrt_one_minus_alpha.reshape(-1, 1, 1, 1)),
                Tensor(weights), Tensor(thresholds), Tensor(squared))

    def step_arguments(self, batch: StepBatch, lr: float, update: bool, accumulation: int,
                       dropout_seed: int, lr_rows: float = 0.0) -> tuple[Tensor, ...]:
        """The train step graph's arguments (declared dynamic before its first call where buckets need it)."""
        decay = decay_strength(lr_rows, self.settings.rows_norm_decay) if update else 0.0
        args = (Tensor(1.0 / accumulation, ms.float32), Tensor(lr, ms.float32), Tensor(lr_rows, ms.float32),
                Tensor(decay, ms.float32), Tensor(update, ms.bool_), Tensor(dropout_seed, ms.int64),
                *self.step_inputs(batch))
        self._declare_dynamic(self.step, args, spatial=(6, 7, 8, 10, 11))  # mean, std, posterior noise, both noises
        return args

    def train_step(self, batch: StepBatch, lr: float, update: bool, accumulation: int,
                   lr_rows: float = 0.0) -> StepResult:
        args = self.step_arguments(batch, lr, update, accumulation, batch.dropout_seed, lr_rows)
        try:
            loss, finite, norm, scale, samples = self.step(*args)
        finally:
            if self.dropout_seed is not None:  # the other graphs run without dropout
                self.dropout_seed.set_data(Tensor(0, ms.int64))
        finite = bool(finite.asnumpy())
        return StepResult(loss=float(loss.asnumpy()), updated=update and finite, overflow=update and not finite,
                          grad_norm=float(norm.asnumpy()) if update else None, loss_scale=float(scale.asnumpy()),
                          sample_losses=self.numpy(samples))

    def enable_gradient_checkpointing(self) -> None:
        """`Cell.recompute()` on every UNet ResNet and transformer block and text-encoder layer (mindone's own
        `enable_gradient_checkpointing` looks for a `recompute_` that MindSpore 2.10 cells lack)."""
        if self.device_target == "CPU":
            warnings.warn("gradient_checkpointing on MindSpore's CPU runtime recomputes the blocks but saves no "
                          "memory (measured at SD1.5 size: the step adds 20 % more, docs/performance.md); it is "
                          "MindSpore's memory saver on Ascend", UserWarning, stacklevel=2)
        for component, blocks in CHECKPOINTED_BLOCKS.items():
            for _, cell in self.components[component].cells_and_names():
                if type(cell).__name__ in blocks:
                    cell.recompute()

    def evaluate_loss(self, batch: StepBatch) -> float:
        inputs = self.step_inputs(batch)
        self._declare_dynamic(self.loss, inputs, spatial=(0, 1, 2, 4, 5))  # mean, std, posterior noise, both noises
        return float(self.loss(*inputs).asnumpy().mean())

    def set_lora_enabled(self, enabled: bool) -> None:
        for cell in self.lora_cells.values():
            cell.enabled.set_data(Tensor(1.0 if enabled else 0.0, ms.float32))

    def training_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        step, layout = self.step, self.step.layout
        arrays, scalars = export_state(step.optimizer, self.settings.optimizer, layout.names, layout.shapes,
                                       layout.split)
        if step.use_ema:
            arrays.update({f"ema.{k}": v for k, v in layout.split(step.ema.asnumpy()).items()})
        if bool(step.dynamic.asnumpy()):
            scalars.update(loss_scale=float(step.loss_scale.asnumpy()),
                           scaler_growth_tracker=int(step.good_steps.asnumpy()))
        return arrays, scalars

    def _restore_training_state(self, state: TrainingState) -> None:
        step, layout = self.step, self.step.layout
        import_state(step.optimizer, self.settings.optimizer, layout.names, layout.shapes, layout.join, state,
                     layout.join(self.trained_tensors()))
        if step.use_ema:
            step.ema.set_data(Tensor(layout.join(state.ema if state.ema is not None else to_tensors(self.lora_weights()))))
        if bool(step.dynamic.asnumpy()) and state.loss_scale is not None:
            step.loss_scale.set_data(Tensor(state.loss_scale, ms.float32))
            step.good_steps.set_data(Tensor(state.scaler_growth_tracker, ms.int32))

    def _declare_dynamic(self, cell: nn.Cell, args: tuple[Tensor, ...], spatial: tuple[int, ...]) -> None:
        """With dynamic shapes, before a graph's first call: its inputs at `spatial` positions get dynamic height and
        width (one compiled graph serves every bucket); the others keep the shapes of `args`."""
        if not self.dynamic_shapes or getattr(cell, "msd_lora_dynamic_inputs", False):
            return
        cell.set_inputs(*[Tensor(shape=[*a.shape[:-2], None, None] if i in spatial else list(a.shape), dtype=a.dtype)
                          for i, a in enumerate(args)])
        cell.msd_lora_dynamic_inputs = True

    def encode_moments(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pixels = Tensor(np.ascontiguousarray(pixels, np.float32))
        self._declare_dynamic(self._moments, (pixels,), spatial=(0,))
        mean, std = self._moments(pixels)
        return self.numpy(mean), self.numpy(std)

    # --- sampling ----------------------------------------------------------------------------
    def encode_prompts(self, token_ids: np.ndarray) -> Tensor:
        return self._text(Tensor(np.ascontiguousarray(token_ids, np.int64)))

    def denoise(self, latents: Tensor, t: float, contexts: list[Tensor]) -> list[Tensor]:
        n, k = latents.shape[0], len(contexts)
        x = ops.cat([latents] * k) if k > 1 else latents
        context = ops.cat(contexts) if k > 1 else contexts[0]
        # float32 timesteps for every sampler (integer ones are exact): one compiled graph, not one per dtype
        pred = self._denoise(x, Tensor(np.full((n * k,), t, np.float32)), context)
        return [pred[i * n:(i + 1) * n] for i in range(k)]

    def decode(self, latents: Tensor) -> np.ndarray:
        return self._decode(latents).asnumpy().astype(np.float32)

    def tensor(self, array: np.ndarray) -> Tensor:
        return Tensor(np.ascontiguousarray(array))

    def numpy(self, tensor: Tensor) -> np.ndarray:
        return tensor.asnumpy().astype(np.float32)

    def save_native_lora(self, path: str, weights: LoraWeights, module_index: Any) -> str:
        """mindone's LoRA checkpoint (`ms.save_checkpoint`, `lora_rank` appended), written atomically."""
        from msd_lora.errors import LoraFormatError
        from msd_lora.lora.format_mindone import write_mindone

        try:
            tensors = write_mindone(weights, module_index)
        except LoraFormatError as err:  # a DoRA or LoCon: the safetensors files hold it
            warnings.warn(f"not saved in mindone's format: {err}", UserWarning, stacklevel=2)
            return None
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
