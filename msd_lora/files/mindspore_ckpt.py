"""MindSpore `.ckpt` files (protobuf) read and written with numpy alone, so torch users can convert them too.

The format (mindspore/train/checkpoint.proto):
    Checkpoint  { repeated Value value = 1; }
    Value       { string tag = 1; TensorProto tensor = 2; MapTensorProto maptensor = 3; }
    TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }
MindSpore writes one Checkpoint message per parameter back to back (protobuf concatenation appends the
repeated field), splits parameters over 512 MB into several values with the same tag, and may end the file
with `crc_num` + 10 bytes. Tensors are returned as read-only views of a memory map of the file.
"""
from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import BinaryIO

import numpy as np

from msd_lora.errors import MindSporeCkptError
from msd_lora.files.atomic import atomic_path

NUMPY_TYPES = {"Int8": np.int8, "UInt8": np.uint8, "Int16": np.int16, "UInt16": np.uint16, "Int32": np.int32,
               "UInt32": np.uint32, "Int64": np.int64, "UInt64": np.uint64, "Float16": np.float16,
               "Float32": np.float32, "Float64": np.float64, "Bool": np.bool_}
TYPE_NAMES = {np.dtype(v): k for k, v in NUMPY_TYPES.items()}
SLICE_BYTES = 512 * 1024 * 1024  # MindSpore splits larger parameters into values of at most this size
CRC_TRAILER = b"crc_num"


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise IndexError("varint runs past the end")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (offset, length)) of each field of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise IndexError("field runs past the end")
            yield field, wire, (pos, length)
            pos += length
        else:
            raise ValueError(f"unexpected wire type {wire}")


def _parse_tensor(buf, start: int, end: int) -> tuple[list[int], str, tuple[int, int]]:
    dims, type_name, content = [], "", (start, 0)
    for field, wire, value in _fields(buf, start, end):
        if field == 1 and wire == 0:
            dims.append(value)
        elif field == 1 and wire == 2:  # packed dims
            pos, stop = value[0], value[0] + value[1]
            while pos < stop:
                dim, pos = _varint(buf, pos, stop)
                dims.append(dim)
        elif field == 2:
            type_name = bytes(buf[value[0]:value[0] + value[1]]).decode()
        elif field == 3:
            content = value
    return dims, type_name, content


def _scan(buf, size: int) -> list[tuple[str, list[int], str, tuple[int, int]]]:
    entries, pos = [], 0
    while pos < size:
        if bytes(buf[pos:pos + len(CRC_TRAILER)]) == CRC_TRAILER:
            break
        key, pos = _varint(buf, pos, size)
        if key != (1 << 3 | 2):
            raise ValueError(f"unexpected top-level field {key >> 3}")
        length, pos = _varint(buf, pos, size)
        if pos + length > size:
            raise ValueError(f"a value of {length} bytes at byte {pos} runs past the end of the {size}-byte file")
        tag, tensor = "", None
        for field, _, value in _fields(buf, pos, pos + length):
            if field == 1:
                tag = bytes(buf[value[0]:value[0] + value[1]]).decode()
            elif field == 2:
                tensor = _parse_tensor(buf, value[0], value[0] + value[1])
            elif field == 3:
                raise ValueError(f"parameter {tag!r} is a MapTensor, which model checkpoints do not use")
        if tensor is None:
            raise ValueError(f"value {tag!r} has no tensor")
        entries.append((tag, *tensor))
        pos += length
    return entries


def read_mindspore_ckpt(path: str | Path) -> dict[str, np.ndarray]:
    """name -> array for every tensor in the file; string values (MindSpore's append_dict) are skipped."""
    path = Path(path)
    with open(path, "rb") as f:
        if path.stat().st_size == 0:
            raise MindSporeCkptError(f"{path} is empty")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        entries = _scan(buf, len(buf))
    except (IndexError, ValueError, UnicodeDecodeError) as err:
        raise MindSporeCkptError(f"{path} is not a readable MindSpore checkpoint ({err}); it may be truncated, "
                                 f"encrypted or in another format") from err
    parts: dict[str, list] = {}
    for tag, dims, type_name, (offset, length) in entries:
        parts.setdefault(tag, []).append((dims, type_name, offset, length))
    tensors = {}
    for tag, pieces in parts.items():
        dims, type_name = pieces[0][0], pieces[0][1]
        if type_name == "str":
            continue
        if type_name not in NUMPY_TYPES:
            raise MindSporeCkptError(f"{path}: parameter {tag!r} has type {type_name}, which numpy cannot hold")
        dtype = np.dtype(NUMPY_TYPES[type_name])
        lengths = [length for _, _, _, length in pieces]
        nbytes = sum(lengths)
        if nbytes != math.prod(dims) * dtype.itemsize or any(n % dtype.itemsize for n in lengths):
            raise MindSporeCkptError(f"{path}: parameter {tag!r} holds {nbytes} bytes for shape {tuple(dims)} "
                                     f"{type_name}; the file is truncated or corrupt")
        arrays = [np.frombuffer(buf, dtype=dtype, count=length // dtype.itemsize, offset=offset)
                  for _, _, offset, length in pieces]
        flat = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        tensors[tag] = flat.reshape(dims)
    return tensors


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _encode_varint(field << 3 | 2) + _encode_varint(len(payload)) + payload


def _write_value(f: BinaryIO, name: str, dims: tuple[int, ...], type_name: str, content: bytes) -> None:
    tensor = b"".join(_encode_varint(1 << 3) + _encode_varint(d) for d in dims)
    tensor += _length_delimited(2, type_name.encode()) + _length_delimited(3, content)
    value = _length_delimited(1, name.encode()) + _length_delimited(2, tensor)
    f.write(_length_delimited(1, value))


def write_mindspore_ckpt(path: str | Path, tensors: dict[str, np.ndarray], dtype: str | None = None) -> Path:
    """Write `tensors` (floats cast to `dtype` if given) as a MindSpore checkpoint, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for name, array in tensors.items():
            array = np.asarray(array)
            if dtype and np.issubdtype(array.dtype, np.floating):
                array = array.astype(dtype)
            if array.dtype not in TYPE_NAMES:
                raise MindSporeCkptError(f"{name}: dtype {array.dtype} cannot be stored in a MindSpore checkpoint")
            pieces = [array]
            if array.nbytes > SLICE_BYTES and array.ndim:
                pieces = np.array_split(array, int(np.ceil(array.nbytes / SLICE_BYTES)))
            for piece in pieces:
                _write_value(f, name, array.shape, TYPE_NAMES[array.dtype], np.ascontiguousarray(piece).tobytes())
    return Path(path)


def looks_like_mindspore_ckpt(head: bytes) -> bool:
    """First bytes of a MindSpore checkpoint: field 1 (Value), then a Value whose field 1 is its name."""
    if len(head) < 4 or head[0] != 0x0A:
        return False
    try:
        _, pos = _varint(head, 1, len(head))
    except IndexError:
        return False
    return pos < len(head) and head[pos] == 0x0A
