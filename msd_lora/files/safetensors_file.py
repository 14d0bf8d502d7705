"""safetensors read lazily (memory map) and written streaming, so multi-GB checkpoints fit in little memory.

Layout: 8-byte little-endian header length N, a JSON header of N bytes (name -> dtype, shape, data_offsets,
plus `__metadata__` of strings), then the tensor bytes. bfloat16 tensors are widened to float32 on read
(numpy has no bfloat16): exact, but those arrays live in memory (twice the file's bytes), not in the map.
The header is checked as the safetensors spec asks (integer offsets inside the data, sizes that match the
shapes, no overlapping tensors) so a corrupt or crafted file is an error naming it, never garbage.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from msd_lora.errors import SafetensorsError
from msd_lora.files.atomic import atomic_path
from msd_lora.files.bfloat16 import bfloat16_to_float32

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items() if k != "BF16"}
MAX_HEADER = 100 * 1024 * 1024


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
            raise SafetensorsError(f"{path}: the safetensors header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the safetensors header is not a JSON object")
    return 8 + length, header


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _metadata(path: Path, header: dict) -> dict[str, str]:
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: the header's __metadata__ is not an object of strings")
    return metadata


def _entry(path: Path, name: str, info, start: int, size: int) -> tuple[np.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked against the spec and the file's size."""
    if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2):
        raise SafetensorsError(f"{path}: malformed header entry for {name!r}")
    shape, (begin, end) = info["shape"], info["data_offsets"]
    if not all(_is_count(d) for d in shape):
        raise SafetensorsError(f"{path}: tensor {name!r} has shape {shape}; dimensions must be integers >= 0")
    if not (_is_count(begin) and _is_count(end) and begin <= end):
        raise SafetensorsError(f"{path}: tensor {name!r} has data_offsets {[begin, end]}; they must be integers "
                               f"with 0 <= begin <= end")
    if info["dtype"] not in DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which is not supported here")
    if start + end > size:
        raise SafetensorsError(f"{path} is truncated: tensor {name!r} ends at byte {start + end} of a "
                               f"{size}-byte file. Download or copy it again.")
    dtype = np.dtype(DTYPES[info["dtype"]])
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise SafetensorsError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} {info['dtype']}")
    return dtype, shape, begin, end


def _check_no_overlap(path: Path, ranges: dict[str, tuple[int, int]]) -> None:
    previous, last_end = "", 0
    for name, (begin, end) in sorted(ranges.items(), key=lambda item: item[1]):
        if begin < last_end:
            raise SafetensorsError(f"{path}: tensors {previous!r} and {name!r} overlap in the data; the file is "
                                   f"corrupt or crafted")
        if end > begin:
            previous, last_end = name, end


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> read-only array backed by a memory map, metadata). Raises SafetensorsError naming the file.

    bfloat16 tensors are the exception: widened to float32 arrays in memory here.
    """
    path = Path(path)
    if not path.is_file():
        raise SafetensorsError(f"{path} does not exist")
    start, header = read_header(path)
    metadata = _metadata(path, header)
    size = path.stat().st_size
    entries = {name: _entry(path, name, info, start, size) for name, info in header.items()}
    _check_no_overlap(path, {name: (begin, end) for name, (_, _, begin, end) in entries.items()})
    whole = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    tensors: dict[str, np.ndarray] = {}
    for name, (dtype, shape, begin, end) in entries.items():
        array = whole[start + begin:start + end].view(dtype).reshape(shape)
        tensors[name] = bfloat16_to_float32(array) if header[name]["dtype"] == "BF16" else array
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
