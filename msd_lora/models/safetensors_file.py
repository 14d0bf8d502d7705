"""safetensors read lazily (memory map) and written streaming, so multi-GB checkpoints fit in little memory.

Layout: 8-byte little-endian header length N, a JSON header of N bytes (name -> dtype, shape, data_offsets,
plus `__metadata__` of strings), then the tensor bytes. bfloat16 tensors are widened to float32 on read
(numpy has no bfloat16); that widening is exact.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from msd_lora.io_utils import atomic_path

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items() if k != "BF16"}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """The file is not a complete, readable safetensors file."""


def read_header(path: Path) -> tuple[int, dict]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path} is too short to be a safetensors file ({size} bytes)")
        length = int.from_bytes(head, "little")
        if not 2 <= length <= min(MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: header length {length} does not fit a {size}-byte file; the file is "
                                   f"truncated or not safetensors")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SafetensorsError(f"{path}: the safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the safetensors header is not a JSON object")
    return 8 + length, header


def read_safetensors_lazy(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> read-only array backed by a memory map, metadata). Raises SafetensorsError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SafetensorsError(f"{path} does not exist")
    start, header = read_header(path)
    metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    size = path.stat().st_size
    tensors: dict[str, np.ndarray] = {}
    whole = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    for name, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: malformed header entry for {name!r}") from None
        if dtype_name not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {dtype_name}, which is not supported here")
        if start + end > size:
            raise SafetensorsError(f"{path} is truncated: tensor {name!r} ends at byte {start + end} of a "
                                   f"{size}-byte file. Download or copy it again.")
        dtype = np.dtype(DTYPES[dtype_name])
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * dtype.itemsize:
            raise SafetensorsError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} {dtype_name}")
        array = whole[start + begin:start + end].view(dtype).reshape(shape)
        if dtype_name == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array
    return tensors, metadata


def cast(array: np.ndarray, dtype: str | None) -> np.ndarray:
    """`array` as `dtype` when it is floating point and a dtype is asked for (integers are left alone)."""
    array = np.asarray(array)
    return array.astype(dtype) if dtype and np.issubdtype(array.dtype, np.floating) else array


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
                      dtype: str | None = None) -> Path:
    """Write tensors in order, one at a time (atomically), floats cast to `dtype` if given."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        target = np.dtype(dtype) if dtype and np.issubdtype(array.dtype, np.floating) else array.dtype
        if target not in NAMES:
            raise SafetensorsError(f"{name}: dtype {target} cannot be written to safetensors")
        nbytes = array.size * target.itemsize
        header[name] = {"dtype": NAMES[target], "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        arrays[name] = array
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for array in arrays.values():
            f.write(np.ascontiguousarray(cast(array, dtype)).tobytes())
    return Path(path)
