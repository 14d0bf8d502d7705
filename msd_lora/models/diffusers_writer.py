"""Write a PretrainedModel as a diffusers StableDiffusionPipeline folder (safetensors weights).

The folder loads in diffusers (`StableDiffusionPipeline.from_pretrained`) and back in msd-lora. Each file is
written atomically; the folder is complete only once model_index.json exists, which is written last.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from msd_lora.io_utils import atomic_write_text
from msd_lora.models.model_config import ModelConfig
from msd_lora.models.pretrained import PretrainedModel
from msd_lora.models.safetensors_file import write_safetensors

DIFFUSERS_VERSION = "0.39.0"  # the version these configs were checked against
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def _json(path: Path, value: dict) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def scheduler_config(cfg: ModelConfig) -> dict:
    """SD's inference scheduler (PNDM, as the released SD pipelines ship) with this model's training schedule."""
    return {"_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **cfg.schedule,
            "prediction_type": cfg.prediction_type, "set_alpha_to_one": False, "skip_prk_steps": True,
            "steps_offset": 1, "clip_sample": False, "timestep_spacing": "leading"}


def write_diffusers_folder(model: PretrainedModel, cfg: ModelConfig, folder: str | Path,
                           dtype: str | None = None) -> Path:
    """unet/, vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json under `folder`."""
    folder = Path(folder)
    classes = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
               "text_encoder": ("transformers", "CLIPTextModel")}
    for network, (library, cls) in classes.items():
        sub = folder / network
        sub.mkdir(parents=True, exist_ok=True)
        config = dict(model.configs[network])
        if library == "diffusers":
            config.update({"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION})
            weights = sub / "diffusion_pytorch_model.safetensors"
        else:
            config.update({"architectures": [cls], "model_type": "clip_text_model"})
            weights = sub / "model.safetensors"
        _json(sub / "config.json", config)
        write_safetensors(weights, model.state[network], {"format": "pt"}, dtype)
    tokenizer = folder / "tokenizer"
    tokenizer.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(model.tokenizer_dir) / name).is_file():
            shutil.copyfile(Path(model.tokenizer_dir) / name, tokenizer / name)
    _json(folder / "scheduler" / "scheduler_config.json", scheduler_config(cfg))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", "PNDMScheduler"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "feature_extractor": [None, None], "safety_checker": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False, **{n: list(c) for n, c in classes.items()}}
    _json(folder / "model_index.json", index)
    return folder
