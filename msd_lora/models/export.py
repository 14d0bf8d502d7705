"""Save a PretrainedModel in any supported layout: diffusers folder, LDM single file, mindone checkpoint."""
from __future__ import annotations

from pathlib import Path

from msd_lora.errors import OutputFolderError
from msd_lora.models.diffusers_writer import write_diffusers_folder
from msd_lora.models.model_config import ModelConfig
from msd_lora.models.pretrained import PretrainedModel
from msd_lora.models.single_file import write_single_file

MODEL_FORMATS = ("diffusers", "ldm", "mindone")
DTYPES = {"fp16": "float16", "fp32": "float32", "float16": "float16", "float32": "float32", None: None}


def save_model(model: PretrainedModel, cfg: ModelConfig, out: str | Path, fmt: str, dtype: str | None = None) -> Path:
    """Write `model` as `fmt`; floats cast to `dtype` (fp16 / fp32) if given, else kept as they are."""
    if fmt not in MODEL_FORMATS:
        raise ValueError(f"unknown model format {fmt!r}; expected one of {MODEL_FORMATS}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected fp16 or fp32")
    out = Path(out)
    if fmt == "diffusers":
        if out.exists() and not out.is_dir():
            raise OutputFolderError(f"{out} is a file; a diffusers model is a folder")
        return write_diffusers_folder(model, cfg, out, DTYPES[dtype])
    return write_single_file(model, out, fmt, cfg.text_encoder_layout, DTYPES[dtype])
