"""Model yamls under configs/model/: the noise schedule, prediction type and architecture of an SD variant."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msd_lora.diffusion.schedule import NoiseSchedule

REQUIRED = ("name", "image_size", "prediction_type", "schedule")


class ModelConfigError(ValueError):
    """A model yaml is missing or malformed."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    image_size: int
    prediction_type: str
    schedule: dict[str, Any]
    architecture: dict[str, dict[str, Any]] = field(default_factory=dict)  # unet / vae / text_encoder / tokenizer
    path: str = ""

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_config(**self.schedule, prediction_type=self.prediction_type)


def load_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_file():
        available = ", ".join(sorted(p.name for p in path.parent.glob("*.yaml"))) if path.parent.is_dir() else ""
        hint = f" (available in {path.parent}: {available})" if available else ""
        raise ModelConfigError(f"model_config {path} does not exist{hint}")
    raw = yaml.safe_load(path.read_text()) or {}
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ModelConfigError(f"{path}: missing keys {missing}; see configs/model/tiny.yaml for the layout")
    if raw["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ModelConfigError(f"{path}: prediction_type must be 'epsilon' or 'v_prediction', "
                               f"got {raw['prediction_type']!r}")
    arch = {k: raw[k] for k in ("unet", "vae", "text_encoder", "tokenizer") if k in raw}
    return ModelConfig(name=raw["name"], image_size=int(raw["image_size"]), prediction_type=raw["prediction_type"],
                       schedule=dict(raw["schedule"]), architecture=arch, path=str(path))
