"""One reader for every single-file weight container users bring: safetensors, torch zip pickles, MindSpore ckpt.

The container is recognised from the file's first bytes, not its name (a `.ckpt` may be torch or MindSpore).
Bare pickles are refused: they can run code while loading.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msd_lora.errors import MissingPathError, TensorFileError
from msd_lora.files import mindspore_ckpt, safetensors_file, torch_pickle


@dataclass
class TensorFile:
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors metadata; global_step of torch ckpts
    container: str = "safetensors"  # safetensors | torch | mindspore


def sniff_container(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    if mindspore_ckpt.looks_like_mindspore_ckpt(head):
        return "mindspore"
    if head[:1] == b"\x80" or head[:2] == b"\x8a\x0a":
        return "pickle"
    return "unknown"


def read_tensor_file(path: str | Path) -> TensorFile:
    """Read any supported container into numpy; errors name the file and say what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        if not path.exists():
            raise MissingPathError(f"{path} does not exist")
        raise TensorFileError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise TensorFileError(f"{path} is empty")
    container = sniff_container(path)
    if container == "safetensors":
        tensors, metadata = safetensors_file.read_safetensors(path)
        return TensorFile(tensors, metadata, container)
    if container == "torch":
        obj = torch_pickle.read_torch_zip(path)
        metadata = {}
        if isinstance(obj, dict) and isinstance(obj.get("global_step"), (int, np.integer)):
            metadata["global_step"] = str(int(obj["global_step"]))
        return TensorFile(torch_pickle.tensors_in(obj), metadata, container)
    if container == "mindspore":
        return TensorFile(mindspore_ckpt.read_mindspore_ckpt(path), {}, container)
    if container == "pickle":
        torch_pickle.refuse_legacy_pickle(path)
    raise TensorFileError(f"{path}: unknown file format (not safetensors, a torch zip checkpoint or a MindSpore "
                          f"checkpoint); if it is a download, it may be an HTML error page or truncated")


def write_tensor_file(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
                      container: str | None = None, dtype: str | None = None) -> Path:
    """Write safetensors (default) or a MindSpore checkpoint (container='mindspore', or a *.ckpt path)."""
    path = Path(path)
    container = container or ("mindspore" if path.suffix == ".ckpt" else "safetensors")
    if container == "mindspore":
        return mindspore_ckpt.write_mindspore_ckpt(path, tensors, dtype)
    if container == "safetensors":
        return safetensors_file.write_safetensors(path, tensors, metadata, dtype)
    raise TensorFileError(f"{path}: cannot write container {container!r}; pickled torch files are not written "
                          f"(every tool that reads .ckpt also reads .safetensors)")
