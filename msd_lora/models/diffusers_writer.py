"""Write a PretrainedModel as a diffusers StableDiffusionPipeline folder (safetensors weights).

The folder loads in diffusers (`StableDiffusionPipeline.from_pretrained`) and back in msd-lora. It is built
whole in a hidden sibling folder and renamed into place, so a crash never leaves a half-written model, and a
model written over another leaves none of the old files (fp16 variants, shard indexes) behind.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from msd_lora.errors import OutputFolderError
from msd_lora.files.atomic import atomic_write_text
from msd_lora.files.safetensors_file import write_safetensors
from msd_lora.models.model_config import ModelConfig
from msd_lora.models.pretrained import PretrainedModel
from msd_lora.tokenizer import TOKENIZER_FILES

DIFFUSERS_VERSION = "0.39.0"  # the version these configs were checked against


def _json(path: Path, value: dict) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def scheduler_config(cfg: ModelConfig) -> dict:
    """SD's inference scheduler (PNDM, as the released SD pipelines ship) with this model's training schedule."""
    return {"_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **cfg.schedule,
            "prediction_type": cfg.prediction_type, "set_alpha_to_one": False, "skip_prk_steps": True,
            "steps_offset": 1, "clip_sample": False, "timestep_spacing": "leading"}


def write_diffusers_folder(model: PretrainedModel, cfg: ModelConfig, folder: str | Path,
                           dtype: str | None = None) -> Path:
    """unet/, vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json as `folder`, all or nothing.

    An existing diffusers model at `folder` is replaced; any other non-empty folder is refused.
    """
    target = Path(os.path.abspath(folder))  # "out/", "." and "a/../b" name their folder, not its contents
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "new")
    staging.mkdir()
    try:
        _write_contents(model, cfg, staging, dtype)
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Path(folder)


def _sibling(folder: Path, what: str) -> Path:
    return folder.parent / f".{folder.name}.{what}-{uuid.uuid4().hex[:8]}"


def _check_replaceable(folder: Path) -> None:
    if not folder.exists():
        return
    if not folder.is_dir():
        raise OutputFolderError(f"{folder} is a file; a diffusers model is a folder")
    if any(folder.iterdir()) and not (folder / "model_index.json").is_file():
        raise OutputFolderError(f"{folder} is not empty and holds no diffusers model (no model_index.json); "
                                f"it is not overwritten. Choose a new or empty folder.")


def _swap_in(staging: Path, folder: Path) -> None:
    """Rename the finished `staging` folder to `folder`; an old `folder` is moved aside first, then deleted."""
    if not folder.exists():
        os.rename(staging, folder)
        return
    old = _sibling(folder, "old")
    os.rename(folder, old)
    try:
        os.rename(staging, folder)
    except BaseException:
        os.rename(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_contents(model: PretrainedModel, cfg: ModelConfig, folder: Path, dtype: str | None) -> None:
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
