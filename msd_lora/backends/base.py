"""The interface every backend implements. The loops in msd_lora.train / msd_lora.sample call only this.

What both frameworks do identically is written here once, on small primitives each backend supplies: the
frozen weights by name (`_base_parameters`, `_read`, `_write`), the model description (`ModelInfo`), the
only-LoRA-trainable check and the order of building and injecting. Arrays cross the boundary as numpy;
tensors handed back (latents, text embeddings, predictions) are the backend's own type and only meet
backend-neutral code through arithmetic operators (the samplers).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from msd_lora.checkpoint import TrainingState, check_training_state
from msd_lora.embeddings.tokens import ROWS_KEY, TOKEN_TABLE
from msd_lora.errors import ConfigError
from msd_lora.lora.core import LoraWeights, check_lora_fits, to_tensors
from msd_lora.lora.spec import LoraSpec
from msd_lora.models.pretrained import PretrainedModel

DEFAULT_VAE_SCALING = 0.18215  # diffusers' AutoencoderKL default, when a config leaves it out


@dataclass(frozen=True)
class ModelInfo:
    latent_channels: int
    vae_scale_factor: int  # image pixels per latent pixel
    scaling_factor: float  # latents fed to the UNet are vae latents * scaling_factor
    base_model: str

    @classmethod
    def of(cls, model: PretrainedModel) -> ModelInfo:
        vae = model.configs["vae"]
        return cls(latent_channels=int(vae.get("latent_channels", 4)),
                   vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
                   scaling_factor=float(vae.get("scaling_factor", DEFAULT_VAE_SCALING)), base_model=model.source)

    def latent_shape(self, batch: int, height: int, width: int | None = None) -> tuple[int, int, int, int]:
        """(batch, channels, h, w) of the latents of `height` x `width` images (square when width is None)."""
        width = height if width is None else width
        return (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)


@dataclass(frozen=True)
class BackendOptions:
    """Where and how a backend runs (the config's system keys)."""

    device: str = "auto"  # auto | cpu | cuda[:N] / gpu | ascend
    mode: int = 0  # MindSpore: 0 graph, 1 pynative
    mixed_precision: str = "no"  # torch autocast on CUDA: no | fp16 | bf16
    enable_flash_attention: bool = False  # MindSpore on Ascend
    dynamic_shapes: bool = False  # MindSpore graph mode: one train-step graph for every image height and width

    @classmethod
    def from_config(cls, cfg, dynamic_shapes: bool = False) -> BackendOptions:
        return cls(device=cfg.device, mode=cfg.mode, mixed_precision=cfg.mixed_precision,
                   enable_flash_attention=cfg.enable_flash_attention, dynamic_shapes=dynamic_shapes)


@dataclass(frozen=True)
class OptimizerSettings:
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    clip_grad: bool
    max_grad_norm: float
    loss_scaler_type: str  # dynamic | static | none
    init_loss_scale: float
    loss_scale_factor: float
    scale_window: int
    use_ema: bool
    ema_decay: float
    lr_scales: tuple[tuple[str, float], ...] = ()  # (component, its learning rate / the step's lr); absent = 1
    optimizer: str = "adamw"  # msd_lora.optimizers.OPTIMIZERS
    d_coef: float = 1.0  # prodigy
    use_bias_correction: bool = False  # prodigy
    safeguard_warmup: bool = False  # prodigy
    rows_weight_decay: float = 0.0  # added token rows (textual inversion): weight_decay_ti
    rows_norm_decay: bool = False  # added token rows: lora_pti's clip_ti_decay after each update

    @classmethod
    def from_config(cls, cfg) -> OptimizerSettings:
        return cls(betas=tuple(cfg.betas), eps=cfg.optim_eps, weight_decay=cfg.weight_decay,
                   clip_grad=cfg.clip_grad, max_grad_norm=cfg.max_grad_norm, loss_scaler_type=cfg.loss_scaler_type,
                   init_loss_scale=cfg.init_loss_scale, loss_scale_factor=cfg.loss_scale_factor,
                   scale_window=cfg.scale_window, use_ema=cfg.use_ema, ema_decay=cfg.ema_decay,
                   lr_scales=learning_rate_scales(cfg), optimizer=cfg.optim, d_coef=cfg.prodigy_d_coef,
                   use_bias_correction=cfg.prodigy_use_bias_correction,
                   safeguard_warmup=cfg.prodigy_safeguard_warmup, rows_weight_decay=cfg.weight_decay_ti,
                   rows_norm_decay=cfg.clip_ti_decay)

    def lr_scale(self, key: str) -> float:
        """The learning-rate multiplier of a LoRA tensor ('<component>.<module>...')."""
        return dict(self.lr_scales).get(key.partition(".")[0], 1.0)


def learning_rate_scales(cfg) -> tuple[tuple[str, float], ...]:
    """Each part's peak learning rate (unet_lr, text_encoder_lr) over start_learning_rate: the step's rate times it is
    the part's rate, so warmup and decay shape every part alike (kohya's meaning)."""
    parts = (("unet", cfg.unet_lr), ("text_encoder", cfg.text_encoder_lr))
    return tuple((part, lr / cfg.start_learning_rate) for part, lr in parts if lr is not None)


@dataclass(frozen=True)
class StepBatch:
    """Everything one micro-batch step needs, drawn by the loop in numpy. The images arrive as their VAE posterior
    (from the latent cache or encoded just before the step); the captions as token ids when the text encoder trains,
    else as its output (from the text cache or encoded just before the step)."""

    latent_mean: np.ndarray  # (B, C, h, w) float32: VAE posterior mean, before the scaling factor
    latent_std: np.ndarray  # (B, C, h, w) float32: VAE posterior standard deviation
    posterior_noise: np.ndarray  # (B, C, h, w) float32: latents = (mean + std * posterior_noise) * scaling
    noise: np.ndarray  # (B, C, h, w) float32: diffusion noise
    timesteps: np.ndarray  # (B,) int64
    sqrt_alpha: np.ndarray  # (B,) float32
    sqrt_one_minus_alpha: np.ndarray  # (B,) float32
    token_ids: np.ndarray | None = None  # (B, chunks * 77) int64, when the text encoder trains
    context: np.ndarray | None = None  # (B, L, D) float32 text-encoder output, when it is frozen
    input_noise: np.ndarray | None = None  # (B, C, h, w): noise the UNet's input is made with; None = `noise`
    loss_weights: np.ndarray | None = None  # (B,) float32 per-sample loss weights; None = ones
    huber_c: np.ndarray | None = None  # (B,) float32 per-sample Huber thresholds, 0 = squared error; None = zeros
    dropout_seed: int = 0  # the LoRA dropout masks' seed (`lora.dropout.step_seed`); 0 = no dropout

    def __post_init__(self) -> None:
        if (self.token_ids is None) == (self.context is None):
            raise ValueError("a StepBatch holds either token_ids (text encoder trained) or context (frozen)")

    def loss_terms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(input noise, weights, thresholds, squared) as the backends' loss takes them (`losses.weighted_loss`)."""
        from msd_lora.diffusion.losses import loss_inputs

        n = len(self.timesteps)
        weights = np.ones(n, np.float32) if self.loss_weights is None else self.loss_weights
        thresholds = np.zeros(n, np.float32) if self.huber_c is None else self.huber_c
        return (self.noise if self.input_noise is None else self.input_noise, *loss_inputs(weights, thresholds))


@dataclass(frozen=True)
class StepResult:
    loss: float  # unscaled loss of this micro-batch
    updated: bool  # an optimizer update was applied
    overflow: bool  # gradients were not finite: the update was skipped
    grad_norm: float | None  # global norm before clipping (on update steps)
    loss_scale: float
    sample_losses: np.ndarray | None = None  # (B,) each sample's weighted loss w_b * L_b; `loss` is their mean


class Backend(ABC):
    """One framework's adapter: model building, LoRA, training step, sampling primitives."""

    name: str
    compiles_graphs = False  # True where the first train step compiles a graph (MindSpore graph mode)
    dynamic_shapes = False  # True where one compiled step serves every image height and width

    def __init__(self, options: BackendOptions):
        self.options = options
        self.info: ModelInfo | None = None
        self.prediction_type = "epsilon"
        self.alphas: dict[str, float] = {}  # LoRA layer key -> its alpha
        self.trains_text_encoder = False  # set by add_lora: then a StepBatch carries token ids, not a context
        self.trains_token_rows = False  # set by add_token_rows(trainable=True)

    # --- model -------------------------------------------------------------------------------
    def load_model(self, model: PretrainedModel, prediction_type: str) -> ModelInfo:
        """Build the networks from `model.configs`, fill them strictly from `model.state` (taken, not copied) and
        freeze them."""
        self.prediction_type = prediction_type
        self.info = ModelInfo.of(model)
        self._build_networks(model)
        return self.info

    @abstractmethod
    def _build_networks(self, model: PretrainedModel) -> None:
        """Build and fill unet / vae / text_encoder, frozen, in eval mode."""

    @abstractmethod
    def layer_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """component -> module name -> weight shape, for every layer a LoRA can wrap: linear layers (out, in) and
        2-D convolutions (out, in, kh, kw)."""

    @abstractmethod
    def _base_parameters(self) -> dict[str, Any]:
        """'<component>.<diffusers param name>' -> the framework's parameter, for every frozen UNet / text-encoder
        weight (a LoRA wrapper's own weights and its renaming of the wrapped layer hidden)."""

    @abstractmethod
    def _read(self, param: Any) -> np.ndarray:
        """A parameter's values as a new float32 numpy array."""

    @abstractmethod
    def _write(self, param: Any, value: np.ndarray) -> None:
        """Copy `value` (shape already checked) into a parameter."""

    def base_shapes(self) -> dict[str, tuple[int, ...]]:
        """'<component>.<param name>' -> shape of every frozen UNet / text-encoder weight."""
        return {n: tuple(p.shape) for n, p in self._base_parameters().items()}

    def base_weights(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Frozen weights as '<component>.<param name>' -> array (all when names is None)."""
        params = self._base_parameters()
        return {n: self._read(params[n]) for n in (params if names is None else names)}

    def set_base_weights(self, values: dict[str, np.ndarray]) -> None:
        params = self._base_parameters()
        for name, value in values.items():
            if tuple(params[name].shape) != tuple(value.shape):
                raise ValueError(f"{name}: shape {value.shape} does not fit {tuple(params[name].shape)}")
            self._write(params[name], np.ascontiguousarray(value, np.float32))

    # --- LoRA --------------------------------------------------------------------------------
    def add_lora(self, spec: LoraSpec, targets: dict[str, list[str]], init: LoraWeights) -> None:
        """Wrap the target layers with trainable LoRA starting at `init` (its ranks and alphas per layer); freeze
        everything else."""
        self.alphas = {key: float(layer.alpha) for key, layer in init.items()}
        self.trains_text_encoder = bool(targets.get("text_encoder"))
        self._inject_lora(spec, targets, init)
        trainable, lora = self._trainable_count(), len(to_tensors(self.lora_weights()))
        if trainable != lora:  # what mindone asserts after injecting LoRA
            raise RuntimeError(f"only the {lora} LoRA parameters may be trainable, found {trainable} trainable")
        self.set_lora_weights(init)

    @abstractmethod
    def _inject_lora(self, spec: LoraSpec, targets: dict[str, list[str]], init: LoraWeights) -> None:
        """Wrap each target layer with a LoRA of `init`'s rank and alpha (DoRA when the spec says so); only the LoRA
        weights are trainable afterwards."""

    @abstractmethod
    def _trainable_count(self) -> int:
        """How many parameters of the three networks are trainable."""

    @abstractmethod
    def lora_weights(self, ema: bool = False) -> LoraWeights: ...

    def set_lora_weights(self, weights: LoraWeights) -> None:
        """Write `weights` into the live LoRA layers, after checking their names, shapes and alphas fit."""
        check_lora_fits(weights, self.lora_weights())
        self._write_lora_weights(weights)

    @abstractmethod
    def _write_lora_weights(self, weights: LoraWeights) -> None:
        """Copy checked weights into the LoRA layers."""

    # --- added token rows (textual inversion) ----------------------------------------------------
    def add_token_rows(self, rows: np.ndarray, trainable: bool = False) -> int:
        """Append `rows` (N, width) to the text encoder's token-embedding table, after its base vocabulary (once per
        backend); returns the id of the first. Trainable rows train beside the LoRA at their own learning rate
        (`train_step`'s `lr_rows`): the text encoder then runs inside the train step. Call before
        `configure_training`."""
        vocab, width = self.base_shapes()[TOKEN_TABLE]
        if rows.ndim != 2 or rows.shape[1] != width:
            raise ValueError(f"token rows must be (N, {width}), got {rows.shape}")
        if trainable:
            self.trains_token_rows = self.trains_text_encoder = True
        self._extend_token_table(np.ascontiguousarray(rows, np.float32), trainable)
        return int(vocab)

    @abstractmethod
    def _extend_token_table(self, rows: np.ndarray, trainable: bool) -> None:
        """Put the text encoder's token embedding behind one that appends `rows` (a parameter, trainable or not); a
        graph backend rebuilds its graphs (the text encoder may run inside the train step now)."""

    @abstractmethod
    def token_rows(self) -> np.ndarray | None:
        """The added rows (N, width), None when none were added."""

    @abstractmethod
    def set_token_rows(self, rows: np.ndarray) -> None: ...

    def trainable_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every trained tensor's shape by key: the LoRA's, and the added token rows (`ROWS_KEY`) when they train."""
        shapes = {k: v.shape for k, v in to_tensors(self.lora_weights()).items()}
        if self.trains_token_rows:
            shapes[ROWS_KEY] = self.token_rows().shape
        return shapes

    # --- training ----------------------------------------------------------------------------
    @abstractmethod
    def configure_training(self, settings: OptimizerSettings) -> None: ...

    @abstractmethod
    def train_step(self, batch: StepBatch, lr: float, update: bool, accumulation: int,
                   lr_rows: float = 0.0) -> StepResult:
        """Forward/backward one micro-batch; apply the optimizer when `update` (after `accumulation` micro-batches):
        the LoRA at `lr` (times each part's scale), trainable token rows at `lr_rows` (with the norm decay after the
        update when the settings ask for it and `lr_rows` > 0)."""

    @abstractmethod
    def enable_gradient_checkpointing(self) -> None:
        """Recompute each UNet ResNet and transformer block (and text-encoder layer) in the backward pass instead of
        keeping its activations: less memory, one more forward per step, the same gradients."""

    @abstractmethod
    def evaluate_loss(self, batch: StepBatch) -> float:
        """The loss of `batch` under the current weights: no gradients, no update, no state changed."""

    @abstractmethod
    def set_lora_enabled(self, enabled: bool) -> None:
        """Switch every LoRA layer's contribution off (the frozen layers alone, exactly) or back on."""

    @abstractmethod
    def training_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, scalars) that resume training exactly: optimizer moments by LoRA key, EMA, and the loss scale
        (`loss_scale`, `scaler_growth_tracker`) only where a dynamic loss scaler is in use."""

    def load_training_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any],
                            source: str = "resume state") -> None:
        """Restore `training_state()` output (possibly the other backend's), checked against this model's LoRA."""
        self._restore_training_state(check_training_state(arrays, scalars, self.trainable_shapes(), self.optimizer_name,
                                                          source))

    @property
    def optimizer_name(self) -> str:
        settings = getattr(self, "settings", None)
        return settings.optimizer if settings is not None else "adamw"

    @abstractmethod
    def _restore_training_state(self, state: TrainingState) -> None:
        """Set moments and step (fresh when absent), EMA (from the weights when absent), and the dynamic loss
        scale (only under a dynamic scaler, and only when the state recorded one)."""

    # --- encoding (before the step, or into a cache) --------------------------------------------
    @abstractmethod
    def encode_moments(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (N, 3, H, W) in [-1, 1] -> the VAE posterior's (mean, std), each (N, C, H/f, W/f) float32."""

    def encode_text(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids (N, chunks * 77) -> the frozen text encoder's output (N, L, D) float32 (`encode_prompts`)."""
        return self.numpy(self.encode_prompts(token_ids))

    # --- sampling ----------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, token_ids: np.ndarray) -> Any:
        """Token ids (N, chunks * 77) -> text-encoder states, long prompts' 77-token chunks joined
        (`tokenizer.join_chunks`)."""

    @abstractmethod
    def denoise(self, latents: Any, t: float, contexts: list[Any]) -> list[Any]:
        """UNet predictions for `latents` under each context, computed in one batched call."""

    @abstractmethod
    def decode(self, latents: Any) -> np.ndarray:
        """Latents as the UNet sees them -> float32 images (N, 3, H, W), nominally in [-1, 1] (not clamped)."""

    @abstractmethod
    def tensor(self, array: np.ndarray) -> Any:
        """A numpy array as this backend's tensor on its device."""

    @abstractmethod
    def numpy(self, tensor: Any) -> np.ndarray:
        """This backend's tensor as a float32 numpy array."""

    def check_batch(self, batch: StepBatch) -> None:
        """A batch must carry token ids exactly when this backend trains the text encoder."""
        if self.trains_text_encoder != (batch.token_ids is not None):
            wanted = "token_ids" if self.trains_text_encoder else "context"
            raise ValueError(f"this backend {'trains' if self.trains_text_encoder else 'freezes'} the text encoder: "
                             f"its StepBatch must carry {wanted}")

    def save_native_lora(self, path: str, weights: LoraWeights, module_index: Any) -> str | None:
        """Also write the LoRA in this framework's own trainer format (mindone's .ckpt); None when there is none."""
        return None


def get_backend(name: str, options: BackendOptions = BackendOptions()) -> Backend:
    """Instantiate a backend by name; framework imports happen only here."""
    if name == "torch":
        from msd_lora.backends.torch.backend import TorchBackend

        return TorchBackend(options)
    if name == "mindspore":
        from msd_lora.backends.mindspore.backend import MindSporeBackend

        return MindSporeBackend(options)
    raise ConfigError(f"unknown backend {name!r}; expected 'torch' or 'mindspore'")


def extend_token_embedding(text_encoder: Any, extended_class: type, rows: np.ndarray, trainable: bool) -> Any:
    """Put `extended_class(current token embedding, rows, trainable)` in place of a (transformers or mindone) CLIP text
    encoder's token embedding, once; returns it."""
    current = text_encoder.get_input_embeddings()
    if isinstance(current, extended_class):
        raise RuntimeError("the text encoder holds added token rows already")
    extended = extended_class(current, rows, trainable)
    text_encoder.set_input_embeddings(extended)
    return extended
