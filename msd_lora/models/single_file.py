"""Single-file SD checkpoints: original LDM (`.ckpt` / `.safetensors`) and mindone (`.ckpt`), read and written.

    model, cfg = read_single_file("v1-5-pruned-emaonly.safetensors")      # version detected
    write_single_file(model, "sd15.safetensors", layout="ldm")              # or layout="mindone", *.ckpt

The architecture comes from a model yaml (detected, or the one given). LDM files carry no tokenizer: it comes from
the shipped CLIP BPE merges (or the yaml's `tokenizer.folder`) — except in the files msd-lora writes for a model
whose tokenizer is not the standard CLIP one (a closed vocabulary, added tokens): their metadata holds its files
(`msd_lora.tokenizer`), so a conversion round trip loads and samples the same model.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from msd_lora.errors import ModelError, OutputFolderError, UnsupportedArchitectureError
from msd_lora.files.tensor_file import read_tensor_file, write_tensor_file
from msd_lora.models import ldm, mindone
from msd_lora.models.model_config import ModelConfig
from msd_lora.models.pretrained import NETWORKS, PretrainedModel
from msd_lora.models.versions import detect_version, mismatches, signature_of
from msd_lora.tokenizer import folder_from_files, is_standard_clip, tokenizer_files, tokenizer_folder

LAYOUTS = ("ldm", "mindone")
TOKENIZER_KEY = "msd_lora.tokenizer"  # metadata: json {file name: text} of a non-standard tokenizer


def network_configs(cfg: ModelConfig) -> dict[str, dict]:
    missing = [n for n in NETWORKS if n not in cfg.architecture]
    if missing:
        raise ModelError(f"model_config {cfg.path} has no {', '.join(missing)} section; single-file "
                         f"checkpoints take their architecture from it (see configs/model/v1-inference.yaml)")
    return {n: dict(cfg.architecture[n]) for n in NETWORKS}


def tokenizer_for(cfg: ModelConfig) -> Path:
    settings = dict(cfg.architecture.get("tokenizer") or {})
    if settings.get("folder"):
        folder = Path(settings["folder"])
        if not folder.is_absolute():
            folder = (Path(cfg.path).parent / folder) if (Path(cfg.path).parent / folder).is_dir() else \
                Path(__file__).resolve().parents[2] / folder
        return folder
    return tokenizer_folder(settings.get("pad_token", "<|endoftext|>"), int(settings.get("model_max_length", 77)))


def read_single_file(path: str | Path, model_config: ModelConfig | None = None,
                     use_ema: bool = False) -> tuple[PretrainedModel, ModelConfig]:
    """An LDM or mindone single file as PretrainedModel plus the model config that describes it."""
    from msd_lora.models.versions import shipped_config

    path = Path(path)
    file = read_tensor_file(path)
    note = ""
    if model_config is None:
        version, sig, note = detect_version(file.tensors, file.metadata, str(path))
        model_config = shipped_config(version)
    else:
        sig = signature_of(file.tensors, str(path))
        problems = mismatches(model_config, sig)
        if problems:
            raise UnsupportedArchitectureError(
                f"model_config {model_config.path} does not describe {path}:\n  " + "\n  ".join(problems)
                + "\n  Leave model_config empty to detect the version from the weights.")
    configs = network_configs(model_config)
    architecture = model_config.name
    if sig.layout == "mindone":
        converted = mindone.from_mindone(file.tensors, configs, str(path), architecture)
    else:
        converted = ldm.from_ldm(file.tensors, configs, model_config.text_encoder_layout, str(path), use_ema,
                                 architecture)
    metadata = {"format": sig.layout, "container": file.container, "version": model_config.version,
                "model_config": model_config.path}
    if use_ema and sig.layout == "ldm" and not any(k.startswith("model_ema.") for k in file.tensors):
        note = (note + "; " if note else "") + "--ema: the file holds no EMA weights, its UNet weights were used"
    if note:
        metadata["note"] = note
    if converted.ignored:
        metadata["ignored_keys"] = str(len(converted.ignored))
    tokenizer = file.metadata.get(TOKENIZER_KEY)
    tokenizer_dir = folder_from_files(json.loads(tokenizer)) if tokenizer else tokenizer_for(model_config)
    model = PretrainedModel(source=str(path), configs=configs, state=converted.state, tokenizer_dir=tokenizer_dir,
                            metadata=metadata, extras=converted.extras)
    return model, model_config


def single_file_tensors(model: PretrainedModel, layout: str, text_layout: str) -> dict[str, np.ndarray]:
    if layout == "ldm":
        return ldm.to_ldm(model.state, model.configs, ldm.require_layout(text_layout), model.extras)
    if layout == "mindone":
        return mindone.to_mindone(model.state, model.configs)
    raise ValueError(f"unknown single-file layout {layout!r}; expected one of {LAYOUTS}")


def write_single_file(model: PretrainedModel, path: str | Path, layout: str, text_layout: str,
                      dtype: str | None = None) -> Path:
    """Write an LDM (.safetensors) or mindone (.ckpt, MindSpore protobuf) single file, atomically."""
    path = Path(path)
    if layout == "ldm" and path.suffix != ".safetensors":
        raise OutputFolderError(f"{path}: LDM single files are written as .safetensors (pickled .ckpt files are not "
                                f"written: they can carry code, and every tool that reads .ckpt reads .safetensors)")
    if layout == "mindone" and path.suffix != ".ckpt":
        raise OutputFolderError(f"{path}: mindone checkpoints are MindSpore .ckpt files; name the output *.ckpt")
    tensors = single_file_tensors(model, layout, text_layout)
    metadata = {"format": "pt", "msd_lora.layout": layout, "msd_lora.version": model.metadata.get("version", "")}
    if not is_standard_clip(model.tokenizer_dir):
        if layout == "mindone":
            warnings.warn(f"{path}: mindone checkpoints cannot carry a tokenizer, and this model's is not the "
                          f"standard CLIP one; load it back with a model yaml whose tokenizer.folder names "
                          f"{model.tokenizer_dir}", UserWarning, stacklevel=2)
        metadata[TOKENIZER_KEY] = json.dumps(tokenizer_files(model.tokenizer_dir), sort_keys=True)
    return write_tensor_file(path, tensors, metadata, container="mindspore" if layout == "mindone" else "safetensors",
                             dtype=dtype)
