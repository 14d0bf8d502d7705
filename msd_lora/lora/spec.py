"""What a LoRA is: rank, alpha, which layers, its variant, how it starts. Backend-neutral.

A backend lists the layers a LoRA can wrap (`name -> weight shape`: (out, in) for linear layers, (out, in, kh,
kw) for convolutions); `select_targets` picks the ones a spec names (module-name suffixes, or a preset), and
`init_lora_weights` draws their first values in numpy, so both backends start from the same numbers.

Presets (`lora_target_modules: <name>`), after kohya sd-scripts' network types:
  attention   the attention projections (to_q, to_k, to_v, to_out.0; text encoder q/k/v/out_proj)
  lierla      kohya's LoRA-LierLa: every linear and 1x1 convolution of the UNet's transformer blocks (attention,
              feed-forward, proj_in / proj_out); text encoder attention + MLP (fc1, fc2)
  c3lier      kohya's LoRA-C3Lier: lierla plus every layer of the ResNet blocks (conv1, conv2, conv_shortcut,
              time_emb_proj) and the down/up-sampling convolutions
Convolutions with a kernel larger than 1x1 take `conv_rank` / `conv_alpha` (default: lora_rank / lora_alpha);
every other layer lora_rank / lora_alpha. With rsLoRA the update scale is alpha / sqrt(rank) instead of alpha / rank:
stored as the per-layer alpha `alpha * sqrt(rank)`, so every file format and tool reads it right.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from msd_lora.errors import LoraSpecError
from msd_lora.lora.core import COMPONENTS, LoraLayer, LoraWeights, module_key

PRESETS = ("attention", "lierla", "c3lier")
ATTENTION = {"unet": ("to_q", "to_k", "to_v", "to_out.0"), "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj")}
LayerShapes = dict[str, dict[str, tuple[int, ...]]]  # component -> module name -> weight shape


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: dict[str, tuple[str, ...]]  # component ("unet", "text_encoder") -> module name suffixes, or a preset
    init: str = "kaiming"  # "kaiming" (uniform, bound 1/sqrt(fan_in)) or "gaussian" (std 1/rank)
    fp16: bool = False
    dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output channel
    rslora: bool = False  # update scale alpha / sqrt(rank)
    conv_rank: int | None = None  # rank of convolutions larger than 1x1 (default: rank)
    conv_alpha: float | None = None  # their alpha (default: alpha)
    dropout: float = 0.0  # lora_dropout: on the LoRA branch's input (peft)
    network_dropout: float = 0.0  # on the down projection's output (kohya)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, cfg) -> LoraSpec:
        targets = {}
        if cfg.lora_ft_unet:
            targets["unet"] = tuple(cfg.lora_target_modules)
        if cfg.lora_ft_text_encoder:
            targets["text_encoder"] = tuple(cfg.lora_te_target_modules)
        return cls(rank=cfg.lora_rank, alpha=float(cfg.lora_alpha), targets=targets, init=cfg.lora_init,
                   fp16=cfg.lora_fp16, dora=cfg.lora_type == "dora", rslora=cfg.use_rslora, conv_rank=cfg.conv_rank,
                   conv_alpha=cfg.conv_alpha, dropout=cfg.lora_dropout, network_dropout=cfg.network_dropout)

    def rank_and_alpha(self, shape: tuple[int, ...]) -> tuple[int, float]:
        """(rank, stored alpha) of a layer with weight `shape`: conv_rank / conv_alpha for kernels above 1x1, and
        with rsLoRA the alpha that gives the scale alpha / sqrt(rank)."""
        spatial = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        rank = (self.conv_rank or self.rank) if spatial else self.rank
        alpha = (self.conv_alpha or (self.alpha if self.conv_rank is None else float(self.conv_rank))) if spatial \
            else self.alpha
        return rank, alpha * math.sqrt(rank) if self.rslora else alpha


def matches(module_name: str, suffixes: tuple[str, ...]) -> bool:
    """True when the module's dotted name is, or ends with, one of the suffixes (peft's rule)."""
    return any(module_name == s or module_name.endswith("." + s) for s in suffixes)


def in_preset(preset: str, component: str, name: str, shape: tuple[int, ...]) -> bool:
    """True when module `name` (weight `shape`) of `component` belongs to `preset` (see the module docstring)."""
    if preset == "attention" or component == "text_encoder":
        if preset == "attention":
            return matches(name, ATTENTION[component])
        return ".self_attn." in name or ".mlp." in name
    pointwise = len(shape) == 2 or tuple(shape[2:]) == (1, 1)
    if ".attentions." in name and pointwise:
        return True
    return preset == "c3lier" and any(part in name for part in (".resnets.", ".downsamplers.", ".upsamplers."))


def select_targets(spec: LoraSpec, layer_shapes: LayerShapes) -> dict[str, list[str]]:
    """Module names per component that get a LoRA; raise when a target list matches nothing or a rank is too big."""
    selected: dict[str, list[str]] = {}
    for component, suffixes in spec.targets.items():
        if component not in COMPONENTS:
            raise LoraSpecError(f"unknown component {component!r}; expected one of {COMPONENTS}")
        shapes = layer_shapes[component]
        if len(suffixes) == 1 and suffixes[0] in PRESETS:
            names = sorted(n for n, shape in shapes.items() if in_preset(suffixes[0], component, n, shape))
        else:
            names = sorted(n for n in shapes if matches(n, suffixes))
        if not names:
            examples = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in shapes})[:12])
            raise LoraSpecError(f"no {component} linear or convolution layer matches targets {list(suffixes)} (LoRA "
                                f"and DoRA wrap those layer types only); layer names end with e.g. {examples}, or "
                                f"use a preset: {', '.join(PRESETS)}")
        for name in names:
            shape = shapes[name]
            rank, _ = spec.rank_and_alpha(shape)
            limit = min(shape[0], shape[1])
            if rank > limit:
                spatial = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
                setting = "conv_rank" if spatial and spec.conv_rank else "lora_rank"
                raise LoraSpecError(f"{setting} {rank} is larger than {component} layer {name} ({shape[0]} out, "
                                    f"{shape[1]} in channels); use {setting} <= {limit}")
        selected[component] = names
    return selected


def init_lora_weights(spec: LoraSpec, targets: dict[str, list[str]], layer_shapes: LayerShapes, seed: int,
                      base: dict[str, np.ndarray] | None = None) -> LoraWeights:
    """First LoRA weights: lora_A random (per spec.init), lora_B zero, so the model starts unchanged; a DoRA's
    magnitude is the norm of each output channel of the base weight ('<component>.<module>.weight' in `base`)."""
    rng = np.random.default_rng([seed, 0x10AA])
    weights: LoraWeights = {}
    for component in sorted(targets):
        for name in targets[component]:
            shape = tuple(layer_shapes[component][name])
            rank, alpha = spec.rank_and_alpha(shape)
            out_f, fan_in = shape[0], int(np.prod(shape[1:]))
            down_shape = (rank, *shape[1:])
            if spec.init == "gaussian":
                down = rng.normal(0.0, 1.0 / rank, down_shape)
            elif spec.init == "kaiming":
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform with a=sqrt(5), as nn.Linear / nn.Conv2d and peft
                down = rng.uniform(-bound, bound, down_shape)
            else:
                raise LoraSpecError(f"unknown lora_init {spec.init!r}; expected 'kaiming' or 'gaussian'")
            up = np.zeros((out_f, rank, *[1] * (len(shape) - 2)), np.float32)
            key = module_key(component, name)
            magnitude = None
            if spec.dora:
                weight = np.asarray(base[f"{key}.weight"], np.float64).reshape(out_f, -1)
                magnitude = np.sqrt((weight**2).sum(axis=1)).astype(np.float32).reshape(out_f, *[1] * (len(shape) - 1))
            weights[key] = LoraLayer(down=down.astype(np.float32), up=up, alpha=alpha, magnitude=magnitude)
    return weights
