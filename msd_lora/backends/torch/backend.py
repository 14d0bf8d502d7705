"""PyTorch reference backend: diffusers UNet/VAE, transformers CLIP text encoder, peft LoRA, AdamW."""
from __future__ import annotations

import dataclasses
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from msd_lora.backends.base import (
    Backend,
    BackendOptions,
    OptimizerSettings,
    StepBatch,
    StepResult,
    extend_token_embedding,
)
from msd_lora.backends.torch import lora as torch_lora
from msd_lora.backends.torch import token_rows as torch_rows
from msd_lora.backends.torch.networks import build_network, resolve_device
from msd_lora.backends.torch.optim import make_optimizer, optimizer_state, restore_optimizer_state
from msd_lora.checkpoint import TrainingState
from msd_lora.diffusion.losses import sample_losses
from msd_lora.diffusion.schedule import add_noise, training_target
from msd_lora.embeddings.tokens import ROWS_KEY, decay_norms, decay_strength
from msd_lora.lora.core import LoraWeights
from msd_lora.lora.spec import LoraSpec
from msd_lora.models.pretrained import PretrainedModel
from msd_lora.tokenizer import join_chunks

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, options: BackendOptions = BackendOptions()):
        super().__init__(options)
        self.device = resolve_device(options.device)
        self.autocast_dtype = None
        if options.mixed_precision != "no":
            if self.device.type != "cuda":
                warnings.warn(f"mixed_precision '{options.mixed_precision}' needs CUDA; training in float32 on "
                              f"{self.device}", UserWarning, stacklevel=2)
            else:
                self.autocast_dtype = AUTOCAST_DTYPES[options.mixed_precision]
        self.components: dict[str, torch.nn.Module] = {}
        self.lora_params: dict[str, torch.nn.Parameter] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.ema: list[torch.Tensor] | None = None
        self.dropout = SimpleNamespace(seed=0)  # the LoRA dropout masks' seed during a train step; 0: off
        self.extended: torch_rows.ExtendedEmbedding | None = None  # the token embedding with added rows

    # --- model -------------------------------------------------------------------------------
    def _build_networks(self, model: PretrainedModel) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        builders = {"unet": lambda c: UNet2DConditionModel.from_config(c),
                    "vae": lambda c: AutoencoderKL.from_config(c),
                    "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c))}
        networks = {name: build_network(name, builders[name], model.configs[name], model.take_state(name),
                                        model.source) for name in builders}
        for module in networks.values():
            module.to(self.device).eval().requires_grad_(False)
        self.unet, self.vae, self.text_encoder = networks["unet"], networks["vae"], networks["text_encoder"]
        self.components = {"unet": self.unet, "text_encoder": self.text_encoder}

    def layer_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        return {c: {n: tuple(m.weight.shape) for n, m in model.named_modules()
                    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))} for c, model in self.components.items()}

    def _base_parameters(self) -> dict[str, torch.nn.Parameter]:
        params = {}
        for component, model in self.components.items():
            for name, param in model.named_parameters():
                if not torch_lora.is_lora_parameter(name) and not name.endswith(f".{torch_rows.ROWS_PARAMETER}"):
                    params[f"{component}.{name.replace('.base_layer.', '.')}"] = param
        return params

    def _read(self, param: torch.Tensor) -> np.ndarray:
        return param.detach().float().cpu().numpy().copy()

    def _write(self, param: torch.Tensor, value: np.ndarray) -> None:
        with torch.no_grad():
            param.copy_(torch.from_numpy(value))

    # --- LoRA --------------------------------------------------------------------------------
    def _inject_lora(self, spec: LoraSpec, targets: dict[str, list[str]], init: LoraWeights) -> None:
        if spec.fp16:
            warnings.warn("lora_fp16 applies to the MindSpore backend; on torch, mixed_precision: fp16 (CUDA) sets "
                          "the compute dtype of the whole step", UserWarning, stacklevel=3)
        for component, names in targets.items():
            torch_lora.inject(self.components[component], spec, {n: init[f"{component}.{n}"] for n in names})
            self.lora_params.update(torch_lora.lora_parameters(self.components[component], component))
            if spec.dropout or spec.network_dropout:
                torch_lora.add_dropout(self.components[component], component, spec, sorted(init), self.dropout)
        for model in self.components.values():
            model.requires_grad_(False)
        for param in self.lora_params.values():
            param.requires_grad_(True)

    def _trainable_count(self) -> int:
        return sum(p.requires_grad for m in (self.unet, self.text_encoder, self.vae) for p in m.parameters())

    def lora_weights(self, ema: bool = False) -> LoraWeights:
        if ema and self.ema is not None:
            return torch_lora.read_weights(dict(zip(self.lora_params, self.ema)), self.alphas)
        return torch_lora.read_weights(self.lora_params, self.alphas)

    def _write_lora_weights(self, weights: LoraWeights) -> None:
        torch_lora.write_weights(self.lora_params, weights)

    # --- added token rows --------------------------------------------------------------------
    def _extend_token_table(self, rows: np.ndarray, trainable: bool) -> None:
        self.extended = extend_token_embedding(self.text_encoder, torch_rows.ExtendedEmbedding, rows, trainable)

    def token_rows(self) -> np.ndarray | None:
        return None if self.extended is None else self._read(self.extended.rows)

    def set_token_rows(self, rows: np.ndarray) -> None:
        self._write(self.extended.rows, np.ascontiguousarray(rows, np.float32))

    def trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Every trained parameter by key: the LoRA's, then the added token rows when they train."""
        return {**self.lora_params, **({ROWS_KEY: self.extended.rows} if self.trains_token_rows else {})}

    # --- training ----------------------------------------------------------------------------
    def configure_training(self, settings: OptimizerSettings) -> None:
        self.settings = settings
        params = list(self.lora_params.values())
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for key, param in self.lora_params.items():
            groups.setdefault(settings.lr_scale(key), []).append(param)
        param_groups = [{"params": p, "lr_scale": scale} for scale, p in groups.items()]
        if self.trains_token_rows:  # lr_scale None: the group's rate is the step's lr_rows
            param_groups.append({"params": [self.extended.rows], "lr_scale": None,
                                 "weight_decay": settings.rows_weight_decay})
        self.optimizer = make_optimizer(param_groups, settings)
        if self.autocast_dtype == torch.float16 and settings.loss_scaler_type != "none":
            self.scaler = make_scaler(settings, self.device.type)
        self.ema = [p.detach().clone() for p in params] if settings.use_ema else None

    def tensor_batch(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        to = self.tensor
        text = batch.token_ids if self.trains_text_encoder else batch.context
        input_noise, weights, thresholds, squared = batch.loss_terms()
        return {"mean": to(batch.latent_mean), "std": to(batch.latent_std), "text": to(text),
                "posterior_noise": to(batch.posterior_noise), "noise": to(batch.noise),
                "input_noise": to(input_noise), "t": to(batch.timesteps),
                "a": to(batch.sqrt_alpha).view(-1, 1, 1, 1), "s": to(batch.sqrt_one_minus_alpha).view(-1, 1, 1, 1),
                "weights": to(weights), "thresholds": to(thresholds), "squared": to(squared)}

    @torch.no_grad()
    def encode_moments(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        posterior = self.vae.encode(self.tensor(pixels)).latent_dist
        return self.numpy(posterior.mean), self.numpy(posterior.std)

    def _text_states(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The text encoder's states, long prompts' chunks joined."""
        chunk = self.text_encoder.config.max_position_embeddings
        states = self.text_encoder(token_ids.reshape(-1, chunk))[0]
        return join_chunks(states, token_ids.shape[1] // chunk, torch.cat)

    def loss(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a tensor batch (`tensor_batch`): the mean of `sample_losses`."""
        return self.sample_losses(b).mean()

    def sample_losses(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each sample's weighted training loss (B,) of a tensor batch (`tensor_batch`)."""
        latents = (b["mean"] + b["std"] * b["posterior_noise"]) * self.info.scaling_factor
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            context = self._text_states(b["text"]) if self.trains_text_encoder else b["text"]
            noisy = add_noise(latents, b["input_noise"], b["a"], b["s"])
            pred = self.unet(noisy, b["t"], context).sample
        target = training_target(latents, b["noise"], b["a"], b["s"], self.prediction_type)
        return sample_losses(pred.float(), target.float(), b["weights"], b["thresholds"], b["squared"])

    def train_step(self, batch: StepBatch, lr: float, update: bool, accumulation: int,
                   lr_rows: float = 0.0) -> StepResult:
        self.dropout.seed = batch.dropout_seed
        try:
            per_sample = self.sample_losses(self.tensor_batch(batch))
            loss = per_sample.mean()
            scaled = loss / accumulation
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        finally:
            self.dropout.seed = 0
        scale = float(self.scaler.get_scale()) if self.scaler else 1.0
        samples = self.numpy(per_sample)
        if not update:
            return StepResult(loss=loss.item(), updated=False, overflow=False, grad_norm=None, loss_scale=scale,
                              sample_losses=samples)
        return dataclasses.replace(self._apply_update(loss.item(), lr, scale, lr_rows), sample_losses=samples)

    def _apply_update(self, loss: float, lr: float, scale: float, lr_rows: float = 0.0) -> StepResult:
        params = list(self.trained_parameters().values())
        for group in self.optimizer.param_groups:
            group["lr"] = lr_rows if group["lr_scale"] is None else lr * group["lr_scale"]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        limit = self.settings.max_grad_norm if self.settings.clip_grad else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        finite = bool(torch.isfinite(norm))
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the update itself when grads are not finite
            static = self.settings.loss_scaler_type == "static"
            self.scaler.update(self.settings.init_loss_scale if static else None)  # a static scale never moves
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        strength = decay_strength(lr_rows, self.settings.rows_norm_decay)
        if finite and self.trains_token_rows and strength:
            with torch.no_grad():
                self.extended.rows.copy_(decay_norms(self.extended.rows, strength))
        if finite and self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in params], 1.0 - self.settings.ema_decay)
        return StepResult(loss=loss, updated=finite, overflow=not finite, grad_norm=float(norm), loss_scale=scale)

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()  # diffusers: per ResNet and transformer block, when grads are on
        self.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in self.text_encoder.text_model.encoder.layers:
            layer.train()  # transformers checkpoints a layer only in training mode; CLIP's dropout rates are 0

    def evaluate_loss(self, batch: StepBatch) -> float:
        with torch.no_grad():
            return self.loss(self.tensor_batch(batch)).item()

    def set_lora_enabled(self, enabled: bool) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for model in self.components.values():
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.enable_adapters(enabled)

    def training_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, scalars = optimizer_state(self.optimizer, self.trained_parameters(), self.settings.optimizer)
        if self.ema is not None:
            arrays.update({f"ema.{k}": e.float().cpu().numpy() for k, e in zip(self.lora_params, self.ema)})
        if self.scaler and self.settings.loss_scaler_type == "dynamic":
            scalars.update(loss_scale=float(self.scaler.get_scale()),
                           scaler_growth_tracker=int(self.scaler.state_dict()["_growth_tracker"]))
        return arrays, scalars

    def _restore_training_state(self, state: TrainingState) -> None:
        restore_optimizer_state(self.optimizer, self.trained_parameters(), self.settings.optimizer, state, self.tensor)
        if self.ema is not None:
            self.ema = [self.tensor(state.ema[k]) if state.ema is not None else p.detach().clone()
                        for k, p in self.lora_params.items()]
        if self.scaler and self.settings.loss_scaler_type == "dynamic" and state.loss_scale is not None:
            scaler_state = self.scaler.state_dict()
            scaler_state.update(scale=state.loss_scale, _growth_tracker=state.scaler_growth_tracker)
            self.scaler.load_state_dict(scaler_state)

    # --- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, token_ids: np.ndarray) -> torch.Tensor:
        return self._text_states(self.tensor(token_ids))

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, t: float, contexts: list[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.cat([latents] * len(contexts))
        dtype = torch.long if float(t).is_integer() else torch.float32  # euler passes fractional timesteps
        timestep = torch.full((x.shape[0],), t, device=self.device, dtype=dtype)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            pred = self.unet(x, timestep, torch.cat(contexts)).sample.float()
        return list(pred.chunk(len(contexts)))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return self.vae.decode(latents / self.info.scaling_factor).sample.float().cpu().numpy()

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """`array` on this backend's device (on the CPU sharing its memory, unless it is read-only: then a copy)."""
        array = np.asarray(array)
        return torch.from_numpy(np.ascontiguousarray(array) if array.flags.writeable else array.copy()).to(self.device)

    def numpy(self, tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().float().cpu().numpy()


def make_scaler(settings: OptimizerSettings, device_type: str) -> torch.amp.GradScaler:
    """GradScaler for fp16: dynamic (shrink on overflow, grow after `scale_window` clean steps), or static, whose
    scale `_apply_update` sets back after every step, so it stays where the config put it, as on MindSpore."""
    return torch.amp.GradScaler(device_type, init_scale=settings.init_loss_scale,
                                growth_factor=settings.loss_scale_factor,
                                backoff_factor=1.0 / settings.loss_scale_factor, growth_interval=settings.scale_window)
