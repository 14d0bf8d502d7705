"""The one way LoRA files are read and written, in every format users bring: training, sampling, the tools and
the tests all go through `read_lora` / `write_lora`.

    lora = read_lora("civitai_style.safetensors")                   # format detected from the keys
    write_lora("out.safetensors", lora.weights, "kohya")             # diffusers | diffusers_old | kohya | mindone

Formats (details in docs/formats.md and each format_* module):
  diffusers      canonical diffusers/peft keys (`unet.<module>.lora_A.weight`), alpha in metadata
  diffusers_old  diffusers 0.14-0.23 layouts (`...processor.to_q_lora.down.weight`), no alpha
  kohya          kohya sd-scripts / A1111 (`lora_unet_..._to_q.lora_down.weight`, `.alpha`, ss_* metadata)
  mindone        mindone's SD LoRA ckpt (MindSpore protobuf; LDM cell paths, `.lora_down.weight`, `lora_rank`)
Names that need the model's module list (kohya's flattened paths, mindone's LDM paths) resolve through a
ModuleIndex: the model's own when it is known, else the SD 1.x/2.x layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msd_lora.embeddings.files import split_bundled
from msd_lora.errors import LoraFormatError, MissingPathError, TensorFileError
from msd_lora.files.tensor_file import read_tensor_file, write_tensor_file
from msd_lora.lora import format_diffusers, format_kohya, format_mindone
from msd_lora.lora.core import LoraWeights, to_tensors
from msd_lora.lora.metadata import FORMAT_VERSION, build_metadata
from msd_lora.lora.module_index import ModuleIndex

FORMATS = ("diffusers", "diffusers_old", "kohya", "mindone")
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class LoraFile:
    weights: LoraWeights
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "diffusers"  # one of FORMATS
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # bundled embeddings' tensors (bundle_emb.*)

    @property
    def step(self) -> int | None:
        value = self.metadata.get("msd_lora.step")
        return int(value) if value is not None else None


def lora_file_path(path: str | Path) -> Path:
    """The file a LoRA path names: itself, or a diffusers `save_lora_weights` folder's weight file."""
    path = Path(path)
    if path.is_dir():
        if not (path / DIFFUSERS_LORA_NAME).is_file():
            raise LoraFormatError(f"LoRA folder {path} holds no {DIFFUSERS_LORA_NAME} (the file diffusers' "
                                  f"save_lora_weights writes); give the LoRA file itself")
        return path / DIFFUSERS_LORA_NAME
    if not path.exists():
        raise MissingPathError(f"LoRA file {path} does not exist")
    return path


def detect_format(keys: list[str]) -> str | None:
    if format_kohya.is_kohya(keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    if format_mindone.is_mindone(keys):
        return "mindone"
    if format_diffusers.is_old_diffusers(keys):
        return "diffusers_old"
    return None


def _not_a_lora(path: Path, keys: list[str]) -> LoraFormatError:
    hint = ""
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys):
        hint = " It looks like a full model checkpoint: pass it as pretrained_model_path (or --base)."
    elif any("hada_" in k or "lokr_" in k for k in keys):
        hint = " It looks like a LyCORIS LoHa / LoKr, which is not a LoRA."
    return LoraFormatError(f"{path} holds no LoRA in a known format (diffusers lora_A/lora_B, kohya lora_down/"
                           f"lora_up, mindone). First keys: {', '.join(keys[:4]) or 'none'}.{hint}")


def read_lora(path: str | Path, index: ModuleIndex | None = None, fmt: str | None = None) -> LoraFile:
    """Any supported LoRA file as canonical weights; the format is detected unless `fmt` is given."""
    path = lora_file_path(path)
    try:
        file = read_tensor_file(path)
    except TensorFileError as err:
        raise LoraFormatError(f"LoRA file {err}") from err
    tensors, bundled = split_bundled({k: np.array(v) for k, v in file.tensors.items()})  # in memory, writable
    file.tensors, keys = tensors, sorted(tensors)
    fmt = fmt or detect_format(keys)
    if fmt is None:
        raise _not_a_lora(path, keys)
    if fmt not in FORMATS:
        raise LoraFormatError(f"unknown LoRA format {fmt!r}; expected one of {FORMATS}")
    index = index or ModuleIndex.stable_diffusion()
    if fmt == "diffusers":
        weights = format_diffusers.read_canonical(file.tensors, file.metadata, str(path))
    elif fmt == "diffusers_old":
        weights = format_diffusers.read_old(file.tensors, str(path))
    elif fmt == "kohya":
        weights = format_kohya.read_kohya(file.tensors, index, str(path))
    else:
        weights = format_mindone.read_mindone(file.tensors, index, str(path))
    if not weights:
        raise LoraFormatError(f"{path} holds no LoRA layers")
    return LoraFile(weights=weights, metadata=file.metadata, format=fmt, embeddings=bundled)


def write_lora(path: str | Path, weights: LoraWeights, fmt: str = "diffusers", index: ModuleIndex | None = None,
               base_model: str = "", dtype: str | None = None, extra: dict[str, str] | None = None,
               step: int | None = None, embeddings: dict[str, np.ndarray] | None = None) -> Path:
    """Write `weights` in format `fmt` (atomically). diffusers/kohya keep alpha; the others fold it into B.
    `embeddings` (bundled embeddings' tensors, `embeddings.files.bundle_tensors`) go along in the safetensors formats.

    The canonical (diffusers) file is float32 unless `dtype` says otherwise, with msd-lora's metadata
    (`msd_lora.lora.metadata`); `step` records how long the LoRA was trained."""
    path = Path(path)
    if fmt not in FORMATS:
        raise LoraFormatError(f"unknown LoRA format {fmt!r}; expected one of {FORMATS}")
    ours = {"msd_lora.format_version": FORMAT_VERSION, "msd_lora.base_model": base_model, **(extra or {})}
    if fmt == "mindone":
        if path.suffix != ".ckpt":
            raise LoraFormatError(f"{path}: mindone LoRA files are MindSpore checkpoints; name the output *.ckpt")
        if embeddings:
            raise LoraFormatError(f"{path}: mindone's LoRA format holds no embeddings; write them apart "
                                  f"(embeddings/*.safetensors) or convert to a safetensors format")
        tensors = format_mindone.write_mindone(weights, index or ModuleIndex.stable_diffusion())
        return write_tensor_file(path, tensors, container="mindspore", dtype=dtype)
    if path.suffix != ".safetensors":
        raise LoraFormatError(f"{path}: {fmt} LoRA files are written as .safetensors")
    if fmt == "diffusers":
        tensors = {**to_tensors(weights), **(embeddings or {})}
        metadata = build_metadata(weights, base_model, step, extra)
        return write_tensor_file(path, tensors, metadata, dtype=dtype or "float32")
    if fmt == "kohya":
        tensors, metadata = format_kohya.write_kohya(weights, dtype)
        metadata.update(ours)
        return write_tensor_file(path, {**tensors, **(embeddings or {})}, metadata)
    return write_tensor_file(path, {**format_diffusers.write_old(weights), **(embeddings or {})},
                             {"format": "pt", **ours}, dtype=dtype)

