"""PyTorch reference backend: diffusers UNet/VAE, transformers CLIP text encoder, peft LoRA, AdamW."""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from msd_lora.backends.base import (Backend, ModelInfo, OptimizerSettings, StepBatch, StepResult,
                                    check_only_lora_trainable)
from msd_lora.backends.torch import lora as torch_lora
from msd_lora.checkpoint import TrainingState
from msd_lora.diffusion.schedule import add_noise, training_target
from msd_lora.lora.core import LoraWeights
from msd_lora.lora.spec import LoraSpec
from msd_lora.models.pretrained import PretrainedModel
from msd_lora.models.state_check import check_state_fits
from msd_lora.errors import ConfigError

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


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


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str = "auto", mixed_precision: str = "no", **_: Any):
        self.device = resolve_device(device)
        self.autocast_dtype = None
        if mixed_precision != "no":
            if self.device.type != "cuda":
                warnings.warn(f"mixed_precision '{mixed_precision}' needs CUDA; training in float32 on {self.device}")
            else:
                self.autocast_dtype = AUTOCAST_DTYPES[mixed_precision]
        self.components: dict[str, torch.nn.Module] = {}
        self.lora_params: dict[str, torch.nn.Parameter] = {}
        self.alpha = 1.0
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.ema: list[torch.Tensor] | None = None

    # --- model -------------------------------------------------------------------------------
    def load_model(self, model: PretrainedModel, prediction_type: str) -> ModelInfo:
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
        self.prediction_type = prediction_type
        self.scaling_factor = float(self.vae.config.scaling_factor)
        return ModelInfo(latent_channels=int(self.vae.config.latent_channels),
                         vae_scale_factor=2 ** (len(self.vae.config.block_out_channels) - 1),
                         scaling_factor=self.scaling_factor, base_model=model.source)

    def linear_shapes(self) -> dict[str, dict[str, tuple[int, int]]]:
        return {c: {n: (m.out_features, m.in_features) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear)} for c, model in self.components.items()}

    def _base_params(self) -> dict[str, torch.nn.Parameter]:
        """'<component>.<name>' -> frozen parameter, with peft's '.base_layer' hidden."""
        params = {}
        for component, model in self.components.items():
            for name, param in model.named_parameters():
                if ".lora_A." not in name and ".lora_B." not in name:
                    params[f"{component}.{name.replace('.base_layer.', '.')}"] = param
        return params

    def base_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self._base_params().items()}

    def base_weights(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        params = self._base_params()
        return {n: params[n].detach().float().cpu().numpy().copy() for n in (params if names is None else names)}

    def set_base_weights(self, values: dict[str, np.ndarray]) -> None:
        params = self._base_params()
        with torch.no_grad():
            for name, value in values.items():
                if tuple(params[name].shape) != value.shape:
                    raise ValueError(f"{name}: shape {value.shape} does not fit {tuple(params[name].shape)}")
                params[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))

    # --- LoRA --------------------------------------------------------------------------------
    def add_lora(self, spec: LoraSpec, targets: dict[str, list[str]], init: LoraWeights) -> None:
        if spec.fp16:
            warnings.warn("lora_fp16 applies to the MindSpore backend; on torch, mixed_precision: fp16 (CUDA) sets "
                          "the compute dtype of the whole step", UserWarning, stacklevel=2)
        self.alpha = spec.alpha
        for component, names in targets.items():
            torch_lora.inject(self.components[component], spec, names)
            self.lora_params.update(torch_lora.lora_parameters(self.components[component], component))
        for model in self.components.values():
            model.requires_grad_(False)
        for param in self.lora_params.values():
            param.requires_grad_(True)
        trainable = [p for m in (self.unet, self.text_encoder, self.vae) for p in m.parameters() if p.requires_grad]
        check_only_lora_trainable(len(trainable), len(self.lora_params))
        self.set_lora_weights(init)

    def lora_weights(self, ema: bool = False) -> LoraWeights:
        if ema and self.ema is not None:
            return torch_lora.read_weights(dict(zip(self.lora_params, self.ema)), self.alpha)
        return torch_lora.read_weights(self.lora_params, self.alpha)

    def _write_lora_weights(self, weights: LoraWeights) -> None:
        torch_lora.write_weights(self.lora_params, weights)

    # --- training ----------------------------------------------------------------------------
    def configure_training(self, settings: OptimizerSettings) -> None:
        self.settings = settings
        params = list(self.lora_params.values())
        self.optimizer = torch.optim.AdamW(params, lr=0.0, betas=settings.betas, eps=settings.eps,
                                           weight_decay=settings.weight_decay)
        if self.autocast_dtype == torch.float16 and settings.loss_scaler_type != "none":
            dynamic = settings.loss_scaler_type == "dynamic"
            self.scaler = torch.amp.GradScaler(
                "cuda", init_scale=settings.init_loss_scale,
                growth_factor=settings.loss_scale_factor if dynamic else 1.0 + 1e-7,
                backoff_factor=1.0 / settings.loss_scale_factor if dynamic else 1.0 - 1e-7,
                growth_interval=settings.scale_window)
        self.ema = [p.detach().clone() for p in params] if settings.use_ema else None

    def _tensor_batch(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        return {"pixels": to(batch.pixels), "ids": to(batch.token_ids), "posterior_noise": to(batch.posterior_noise),
                "noise": to(batch.noise), "t": to(batch.timesteps),
                "a": to(batch.sqrt_alpha).view(-1, 1, 1, 1), "s": to(batch.sqrt_one_minus_alpha).view(-1, 1, 1, 1)}

    @torch.no_grad()
    def _encode_latents(self, pixels: torch.Tensor, posterior_noise: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(pixels).latent_dist
        return (posterior.mean + posterior.std * posterior_noise) * self.scaling_factor

    def _loss(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        latents = self._encode_latents(b["pixels"], b["posterior_noise"])
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            context = self.text_encoder(b["ids"])[0]
            noisy = add_noise(latents, b["noise"], b["a"], b["s"])
            pred = self.unet(noisy, b["t"], context).sample
        target = training_target(latents, b["noise"], b["a"], b["s"], self.prediction_type)
        return F.mse_loss(pred.float(), target.float())

    @torch.no_grad()
    def eval_loss(self, batch: StepBatch) -> float:
        return self._loss(self._tensor_batch(batch)).item()

    def lora_gradients(self, batch: StepBatch) -> dict[str, np.ndarray]:
        params = list(self.lora_params.values())
        grads = torch.autograd.grad(self._loss(self._tensor_batch(batch)), params)
        return {k: g.float().cpu().numpy() for k, g in zip(self.lora_params, grads)}

    def train_step(self, batch: StepBatch, lr: float, update: bool, accumulation: int) -> StepResult:
        loss = self._loss(self._tensor_batch(batch))
        scaled = loss / accumulation
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        scale = float(self.scaler.get_scale()) if self.scaler else 1.0
        if not update:
            return StepResult(loss=loss.item(), updated=False, overflow=False, grad_norm=None, loss_scale=scale)
        return self._apply_update(loss.item(), lr, scale)

    def _apply_update(self, loss: float, lr: float, scale: float) -> StepResult:
        params = list(self.lora_params.values())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        limit = self.settings.max_grad_norm if self.settings.clip_grad else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        finite = bool(torch.isfinite(norm))
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the update itself when grads are not finite
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite and self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in params], 1.0 - self.settings.ema_decay)
        return StepResult(loss=loss, updated=finite, overflow=not finite, grad_norm=float(norm), loss_scale=scale)

    def training_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, step = {}, 0
        for key, param in self.lora_params.items():
            state = self.optimizer.state.get(param, {})
            if state:
                step = int(state["step"])
                arrays[f"optimizer.exp_avg.{key}"] = state["exp_avg"].float().cpu().numpy()
                arrays[f"optimizer.exp_avg_sq.{key}"] = state["exp_avg_sq"].float().cpu().numpy()
        if self.ema is not None:
            arrays.update({f"ema.{k}": e.float().cpu().numpy() for k, e in zip(self.lora_params, self.ema)})
        scalars = {"optimizer_step": step}
        if self.scaler and self.settings.loss_scaler_type == "dynamic":
            scalars.update(loss_scale=float(self.scaler.get_scale()),
                           scaler_growth_tracker=int(self.scaler.state_dict()["_growth_tracker"]))
        return arrays, scalars

    def _restore_training_state(self, state: TrainingState) -> None:
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        self.optimizer.state.clear()
        if state.exp_avg is not None:
            for key, param in self.lora_params.items():
                self.optimizer.state[param] = {"step": torch.tensor(float(state.optimizer_step)),
                                               "exp_avg": to(state.exp_avg[key]), "exp_avg_sq": to(state.exp_avg_sq[key])}
        if self.ema is not None:
            self.ema = [to(state.ema[k]) if state.ema is not None else p.detach().clone()
                        for k, p in self.lora_params.items()]
        if self.scaler and self.settings.loss_scaler_type == "dynamic" and state.loss_scale is not None:
            scaler_state = self.scaler.state_dict()
            scaler_state.update(scale=state.loss_scale, _growth_tracker=state.scaler_growth_tracker)
            self.scaler.load_state_dict(scaler_state)

    # --- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, token_ids: np.ndarray) -> torch.Tensor:
        return self.text_encoder(self.tensor(token_ids))[0]

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
    def encode_images(self, pixels: np.ndarray, posterior_noise: np.ndarray) -> torch.Tensor:
        return self._encode_latents(self.tensor(pixels), self.tensor(posterior_noise))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return self.vae.decode(latents / self.scaling_factor).sample.float().cpu().numpy()

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
