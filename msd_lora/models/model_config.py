"""Model yamls under configs/model/: the noise schedule, prediction type and architecture of an SD variant."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msd_lora.diffusion.schedule import NoiseSchedule
from msd_lora.errors import ModelError

REQUIRED = ("name", "image_size", "prediction_type", "schedule")
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
# mindone's model-config names (examples/stable_diffusion_v2/configs) -> the shipped config of the same model
MINDONE_NAMES = {"v1-train.yaml": "v1-inference.yaml", "v1-inference.yaml": "v1-inference.yaml",
                 "v2-train.yaml": "v2-inference.yaml", "v2-inference.yaml": "v2-inference.yaml",
                 "v2-vpred-train.yaml": "v2-inference-v.yaml", "v2-vpred-inference.yaml": "v2-inference-v.yaml",
                 # DreamBooth and textual inversion: the same networks (the prior loss weight is our key)
                 "train_dreambooth_sd_v1.yaml": "v1-inference.yaml", "train_dreambooth_sd_v2.yaml": "v2-inference.yaml",
                 "v1-train-textual-inversion.yaml": "v1-inference.yaml",
                 "v2-train-textual-inversion.yaml": "v2-inference.yaml"}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    image_size: int
    prediction_type: str
    schedule: dict[str, Any]
    architecture: dict[str, dict[str, Any]] = field(default_factory=dict)  # unet / vae / text_encoder / tokenizer
    path: str = ""
    version: str = ""  # v1 | v2-base | v2-v | tiny | "" (unknown)
    note: str = ""  # how the path given was read (a mindone name mapped to ours)
    text_encoder_layout: str = "clip"  # how LDM single files store the text encoder: clip | open_clip

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_config(**self.schedule, prediction_type=self.prediction_type)


def load_model_config(path: str | Path) -> ModelConfig:
    """A model yaml; a mindone model-config name that is not a file here (`configs/v1-train.yaml`, ...) reads the
    shipped config of the same model, with a note saying so."""
    path = Path(path)
    if not path.is_file() and path.name in MINDONE_NAMES:
        ours = SHIPPED_DIR / MINDONE_NAMES[path.name]
        note = f"model_config {path}: mindone's {path.name} is read as {ours.relative_to(SHIPPED_DIR.parents[1])}"
        return dataclasses.replace(load_model_config(ours), note=note)
    if not path.is_file():
        available = ", ".join(sorted(p.name for p in path.parent.glob("*.yaml"))) if path.parent.is_dir() else ""
        hint = f" (available in {path.parent}: {available})" if available else ""
        raise ModelError(f"model_config {path} does not exist{hint}")
    raw = yaml.safe_load(path.read_text()) or {}
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ModelError(f"{path}: missing keys {missing}; see configs/model/tiny.yaml for the layout")
    if raw["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ModelError(f"{path}: prediction_type must be 'epsilon' or 'v_prediction', "
                         f"got {raw['prediction_type']!r}")
    if raw.get("text_encoder_layout", "clip") not in ("clip", "open_clip"):
        raise ModelError(f"{path}: text_encoder_layout must be 'clip' or 'open_clip', "
                         f"got {raw['text_encoder_layout']!r}")
    arch = {k: raw[k] for k in ("unet", "vae", "text_encoder", "tokenizer") if k in raw}
    return ModelConfig(name=raw["name"], image_size=int(raw["image_size"]), prediction_type=raw["prediction_type"],
                       schedule=dict(raw["schedule"]), architecture=arch, path=str(path),
                       version=str(raw.get("version", "")), text_encoder_layout=raw.get("text_encoder_layout", "clip"))


def model_config_from_folder(folder: str | Path, configs: dict[str, dict]) -> ModelConfig:
    """The schedule and prediction type a diffusers folder declares (scheduler/scheduler_config.json)."""
    folder = Path(folder)
    path = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(path.read_text()) if path.is_file() else {}
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
    schedule = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    schedule.update({k: scheduler[k] for k in keys if k in scheduler})
    factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ModelError(f"{path}: prediction_type {prediction!r} is not supported (epsilon, v_prediction)")
    return ModelConfig(name=folder.name, image_size=int(configs["unet"]["sample_size"]) * factor,
                       prediction_type=prediction, schedule=schedule, architecture=dict(configs),
                       path=str(path), version="")
