"""Training configuration: mindone's flat yaml keys, defaults < yaml < explicit CLI flags, validated once.

    cfg = load_train_config(["--train_config", "configs/train/lora_tiny.yaml", "--lora_rank", "8"])
    cfg.lora_rank  # 8

Relative paths in a yaml resolve against the yaml's folder, then the repository root; relative paths on
the command line resolve against the working directory. Unknown keys are errors that name the file and
suggest the closest valid key.
"""
from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml
from msd_lora.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]



@dataclass(frozen=True)
class Option:
    default: Any
    kind: type  # bool, int, float, str or list
    help: str
    choices: tuple | None = None
    path: bool = False  # resolved against the yaml's folder / the repo / the cwd
    minimum: float | None = None
    optional: bool = False  # None allowed


def _opt(default, kind, help, **kw) -> Option:
    return Option(default, kind, help, **kw)


OPTIONS: dict[str, Option] = {
    # system
    "backend": _opt("torch", str, "training backend", choices=("torch", "mindspore")),
    "mode": _opt(0, int, "MindSpore execution mode: 0 graph, 1 pynative", choices=(0, 1)),
    "device": _opt("auto", str, "torch device: auto (cuda when present), cpu, cuda, cuda:N"),
    "mixed_precision": _opt("no", str, "torch autocast on CUDA", choices=("no", "fp16", "bf16")),
    "enable_flash_attention": _opt(False, bool, "MindSpore on Ascend: flash attention in the UNet (fp16 kernel)"),
    "seed": _opt(3407, int, "seed for LoRA init, data order, noise and timesteps"),
    "use_parallel": _opt(False, bool, "data-parallel training (not available yet; must stay False)"),
    # model and paths
    "model_config": _opt("", str, "architecture + schedule yaml; empty = the diffusers folder's own configs, or the "
                         "SD version detected from a single file's weights", path=True),
    "pretrained_model_path": _opt("msd_lora/assets/tiny_sd", str, "base model: a diffusers folder, an LDM single "
                                  "file (.safetensors / .ckpt) or a mindone .ckpt", path=True),
    "data_path": _opt("", str, "dataset folder with img_txt.csv (dir,text)", path=True),
    "output_path": _opt("output/", str, "where checkpoints, logs and samples go", path=True),
    "resume": _opt(False, str, "False, True (output_path/ckpt/train_resume.safetensors) or a resume file"),
    # data
    "train_batch_size": _opt(4, int, "images per micro-batch", minimum=1),
    "image_size": _opt(512, int, "training resolution (square)", minimum=8),
    "random_crop": _opt(False, bool, "random instead of center crop"),
    "flip": _opt(False, bool, "random horizontal flip"),
    # schedule of the run
    "epochs": _opt(10, int, "passes over the dataset (ignored when max_train_steps > 0)", minimum=1),
    "max_train_steps": _opt(0, int, "optimizer steps to run; 0 = epochs x steps per epoch", minimum=0),
    "gradient_accumulation_steps": _opt(1, int, "micro-batches per optimizer step", minimum=1),
    "ckpt_save_interval": _opt(1, int, "save a LoRA checkpoint every N epochs (or steps with step_mode)", minimum=1),
    "step_mode": _opt(False, bool, "count ckpt_save_interval in steps instead of epochs"),
    "log_interval": _opt(1, int, "write a log row every N optimizer steps", minimum=1),
    # learning rate
    "scheduler": _opt("cosine_decay", str, "lr schedule", choices=("constant", "cosine_decay", "linear_decay")),
    "start_learning_rate": _opt(1e-4, float, "peak learning rate", minimum=0.0),
    "end_learning_rate": _opt(0.0, float, "final learning rate of a decaying schedule", minimum=0.0),
    "warmup_steps": _opt(0, int, "linear warmup steps", minimum=0),
    "decay_steps": _opt(0, int, "decay length after warmup; 0 = until the last step", minimum=0),
    # optimizer
    "optim": _opt("adamw", str, "optimizer", choices=("adamw",)),
    "betas": _opt([0.9, 0.999], list, "AdamW betas [beta1, beta2]"),
    "weight_decay": _opt(1e-2, float, "decoupled weight decay", minimum=0.0),
    "optim_eps": _opt(1e-8, float, "AdamW epsilon", minimum=0.0),
    "clip_grad": _opt(False, bool, "clip the global gradient norm"),
    "max_grad_norm": _opt(1.0, float, "global norm for clip_grad", minimum=0.0),
    # loss scaling (MindSpore fp16; torch uses GradScaler on CUDA fp16)
    "loss_scaler_type": _opt("dynamic", str, "loss scaler", choices=("dynamic", "static", "none")),
    "init_loss_scale": _opt(65536.0, float, "initial loss scale", minimum=1.0),
    "loss_scale_factor": _opt(2.0, float, "scale divisor on overflow / multiplier after a clean window", minimum=1.0),
    "scale_window": _opt(1000, int, "clean steps before the loss scale grows", minimum=1),
    # EMA
    "use_ema": _opt(False, bool, "keep an exponential moving average of the LoRA weights"),
    "ema_decay": _opt(0.9999, float, "EMA decay", minimum=0.0),
    # LoRA
    "use_lora": _opt(True, bool, "LoRA fine-tuning (full fine-tuning is not offered)"),
    "lora_rank": _opt(4, int, "LoRA rank r", minimum=1),
    "lora_alpha": _opt(None, float, "LoRA alpha; update scale is alpha/r (default: alpha = r)", optional=True),
    "lora_ft_unet": _opt(True, bool, "LoRA on the UNet"),
    "lora_ft_text_encoder": _opt(False, bool, "LoRA on the text encoder"),
    "lora_fp16": _opt(False, bool, "MindSpore: LoRA matmuls in float16, float32 master weights"),
    "lora_init": _opt("kaiming", str, "init of lora_A (lora_B starts at zero)", choices=("kaiming", "gaussian")),
    "init_lora_path": _opt("", str, "start from this LoRA file (diffusers, kohya/A1111 or mindone); its layers must "
                           "be among the targets, with rank lora_rank", path=True),
    "lora_target_modules": _opt(["to_q", "to_k", "to_v", "to_out.0"], list, "UNet module names for LoRA"),
    "lora_te_target_modules": _opt(["q_proj", "k_proj", "v_proj", "out_proj"], list,
                                   "text-encoder module names for LoRA"),
    # validation
    "validation_prompts": _opt([], list, "prompts sampled at the end of training"),
    "validation_steps": _opt(25, int, "sampler steps for validation images", minimum=1),
    "validation_sampler": _opt("dpm_solver_pp", str, "sampler for validation images"),
    "validation_guidance_scale": _opt(5.0, float, "classifier-free guidance for validation images"),
}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def str_to_bool(text: str) -> bool:
    """argparse type for mindone-style boolean flags (True/False, 1/0, yes/no)."""
    value = str(text).strip().lower()
    if value not in _TRUE | _FALSE:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return value in _TRUE


class Config(Mapping):
    """Read-only, attribute-accessible view of validated options."""

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only; use cfg.replace(key=value)")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def replace(self, **changes: Any) -> "Config":
        unknown_key_check(changes, source="replace()")
        return validate({**self._values, **changes}, source="replace()")

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)


def suggest(key: str, valid: Sequence[str]) -> str:
    """' Did you mean ...?' for the closest valid key, or an empty string."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_key_check(values: Mapping[str, Any], source: str) -> None:
    for key in values:
        if key not in OPTIONS:
            raise ConfigError(f"{source}: unknown key '{key}'.{suggest(key, list(OPTIONS))}"
                              f" Valid keys are listed in docs/configs.md.")


def _coerce(key: str, value: Any, source: str) -> Any:
    """Convert a yaml or CLI value to the option's type, or raise a ConfigError naming key and value."""
    opt = OPTIONS[key]
    if value is None:
        if opt.optional:
            return None
        raise ConfigError(f"{source}: '{key}' may not be empty")
    try:
        if key == "resume":
            return _coerce_resume(value)
        if opt.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError
        if opt.kind is list:
            if isinstance(value, str):
                parsed = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
                value = [v.strip() if isinstance(v, str) else v for v in parsed]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return list(value)
        if opt.kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if opt.kind in (int, float) and isinstance(value, bool):
            raise ValueError
        if opt.kind is int:
            return int(float(value)) if isinstance(value, str) else int(value)
        return opt.kind(value)
    except (TypeError, ValueError, yaml.YAMLError):
        raise ConfigError(f"{source}: '{key}' must be {opt.kind.__name__}, got {value!r}") from None


def _coerce_resume(value: Any) -> bool | str:
    if isinstance(value, bool):
        return value
    text = str(value).strip()
    if text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    return text


def resolve_path(value: str, base: Path | None) -> str:
    """Absolute path for a config path value.

    From a yaml (`base` = its folder): where the path exists, first beside the yaml, then under the
    repository root; a path that exists nowhere yet (an output folder) goes under the repository root
    for the shipped configs (yamls inside the repo) and beside the yaml otherwise.
    From the command line (`base` None): the working directory.
    """
    if not value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if base is None:
        return str(Path.cwd() / path)
    for root in (base, REPO_ROOT):
        if (root / path).exists():
            return str((root / path).resolve())
    home = REPO_ROOT if base.resolve().is_relative_to(REPO_ROOT) else base
    return str((home / path).resolve())


def validate(values: Mapping[str, Any], source: str) -> Config:
    """Check types, choices and ranges of a complete option mapping."""
    checked = {}
    for key, opt in OPTIONS.items():
        value = _coerce(key, values[key], source)
        if opt.choices and value not in opt.choices:
            raise ConfigError(f"{source}: '{key}' is {value!r}; choose one of {list(opt.choices)}")
        if opt.minimum is not None and value is not None and value < opt.minimum:
            raise ConfigError(f"{source}: '{key}' is {value!r}; it must be >= {opt.minimum}")
        checked[key] = value
    if len(checked["betas"]) != 2 or not all(0 <= float(b) < 1 for b in checked["betas"]):
        raise ConfigError(f"{source}: 'betas' must be two numbers in [0, 1), got {checked['betas']}")
    checked["betas"] = [float(b) for b in checked["betas"]]
    if not checked["use_lora"]:
        raise ConfigError(f"{source}: 'use_lora' is False, but msd-lora trains LoRAs only; set use_lora: True")
    if checked["use_parallel"]:
        raise ConfigError(f"{source}: 'use_parallel' (data-parallel training) is not available yet; "
                          f"set use_parallel: False")
    if not (checked["lora_ft_unet"] or checked["lora_ft_text_encoder"]):
        raise ConfigError(f"{source}: nothing to train: set lora_ft_unet or lora_ft_text_encoder to True")
    if checked["lora_alpha"] is None:
        checked["lora_alpha"] = float(checked["lora_rank"])
    return Config(checked)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a flat train yaml with paths resolved against its folder."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train config {path} does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    except Exception as err:  # omegaconf raises several parser error types
        raise ConfigError(f"{path}: not valid yaml: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    unknown_key_check(raw, source=str(path))
    return {k: resolve_path(v, path.parent.resolve()) if OPTIONS[k].path and isinstance(v, str) else v
            for k, v in raw.items()}


def build_parser(description: str = "Train a Stable Diffusion LoRA.") -> argparse.ArgumentParser:
    """CLI with one flag per option; defaults are suppressed so only explicit flags override the yaml."""
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                     allow_abbrev=False)
    parser.add_argument("--train_config", help="yaml with any of the keys below")
    for key, opt in OPTIONS.items():
        shown = f" (default: {opt.default!r})"
        extra = f" {{{', '.join(map(str, opt.choices))}}}" if opt.choices else ""
        parser.add_argument(f"--{key}", metavar=opt.kind.__name__.upper(), help=opt.help + extra + shown)
    return parser


def load_train_config(argv: Sequence[str] | None = None) -> Config:
    """defaults < yaml (--train_config) < explicit CLI flags → validated Config."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].lstrip("-").split("=")[0]
        raise ConfigError(f"command line: unknown flag '{unknown[0]}'.{suggest(flag, list(OPTIONS))}")
    explicit = vars(args)
    values = {k: o.default for k, o in OPTIONS.items()}
    values.update({k: resolve_path(v, REPO_ROOT) for k, v in values.items()
                   if OPTIONS[k].path and isinstance(v, str)})
    source = "defaults"
    if "train_config" in explicit:
        source = explicit.pop("train_config")
        values.update(read_yaml(source))
    for key, value in explicit.items():
        values[key] = resolve_path(value, None) if OPTIONS[key].path else value
    if explicit:
        source = f"{source} + command line"
    return validate(values, source=source)


def write_config(cfg: Config, path: str | Path) -> None:
    """Write the merged config as yaml, atomically."""
    from msd_lora.files.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
