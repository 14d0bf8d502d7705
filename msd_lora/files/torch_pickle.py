"""Read PyTorch `.ckpt`/`.pt`/`.bin` files (torch.save's zip format) into numpy without importing torch.

A pickle can run any code while it loads, so this reader never hands the pickle a real class or function:
`find_class` answers only a short list of names torch checkpoints use (tensor rebuilding, OrderedDict,
numpy scalars, Lightning's checkpoint-callback records) with inert stand-ins, and refuses everything else
with `UnsafePickleError`, naming the global the file asked for. Tensor bytes are memory-mapped from the
zip (torch stores them uncompressed), so a 4 GB checkpoint costs little memory until its arrays are used;
bfloat16 tensors are the exception, widened to float32 in memory as they are read. Compressed members (which
torch never writes, and which could inflate without bound) and views larger than their storage are refused.
"""
from __future__ import annotations

import collections
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from msd_lora.errors import TorchFileError, UnsafePickleError
from msd_lora.files.bfloat16 import bfloat16_to_float32

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Storage:
    """A torch storage: a flat array of one dtype, read lazily from the zip (bfloat16 held as uint16 bits)."""

    def __init__(self, array: np.ndarray, bfloat16: bool = False):
        self.array, self.bfloat16 = array, bfloat16


class _Inert:
    """Stand-in for harmless training-time objects (Lightning callbacks): keeps their state as a dict."""

    def __init__(self, *args, **kwargs):
        self.state: Any = None

    def __setstate__(self, state):
        self.state = state


def _fits_storage(offset: int, size: tuple[int, ...], stride: tuple[int, ...], elements: int) -> bool:
    """A view as state dicts hold them: inside its storage, no larger than it, no repeated (stride-0) axes."""
    if offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride) or len(size) != len(stride):
        return False
    if math.prod(size) == 0:
        return offset <= elements
    if math.prod(size) > elements or any(s == 0 and n > 1 for n, s in zip(size, stride)):
        return False  # a broadcast view: widening or astype would materialise all of it
    return offset + sum((n - 1) * s for n, s in zip(size, stride)) < elements


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *_unused) -> np.ndarray:
    flat = storage.array
    offset, size, stride = int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if not _fits_storage(offset, size, stride, flat.size):  # as_strided would read outside the storage
        raise TorchFileError(f"a tensor of shape {size}, strides {stride} at offset {offset} does not fit its "
                             f"storage of {flat.size} elements: the file is corrupt or crafted")
    if not size:
        value = flat[offset:offset + 1]
        return (bfloat16_to_float32(value) if storage.bfloat16 else np.array(value)).reshape(())
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=tuple(s * itemsize for s in stride),
                                           writeable=False)
    if storage.bfloat16:
        return bfloat16_to_float32(view)
    return view


def _rebuild_parameter(data, *_unused):
    return data


def _numpy_scalar(dtype, data=None):
    return np.frombuffer(data, dtype=dtype)[0] if data is not None else dtype.type()


def _codecs_encode(text, encoding="latin1"):
    return text.encode(encoding)


SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): _Inert,
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"): _Inert,
    ("torch.torch_version", "TorchVersion"): str,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        raise UnsafePickleError(
            f"{self.path}: the pickle asks for '{module}.{name}', which is not a tensor, number or container. "
            f"Pickled checkpoints can run code while loading, so only plain weights are read; this file was refused. "
            f"If you trust it, convert it to .safetensors with a tool you trust first.")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f"{self.path}: unexpected persistent id {pid!r} in the pickle")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if numel < 0:
            raise TorchFileError(f"storage {key} claims {numel} elements")
        if key not in self.storages:
            self.storages[key] = self._read_storage(storage_type.name, key, numel)
        return self.storages[key]

    def _read_storage(self, type_name: str, key: str, numel: int) -> _Storage:
        dtype = STORAGE_DTYPES[type_name]
        bf16 = dtype == "bfloat16"
        np_dtype = np.dtype(np.uint16 if bf16 else dtype)
        info = _stored_member(self.archive, f"{self.prefix}data/{key}")
        nbytes = numel * np_dtype.itemsize
        if info.file_size < nbytes:
            raise TorchFileError(f"storage {key} holds {info.file_size} bytes, expected "
                                 f"{nbytes}; the file is truncated or corrupt")
        offset = _data_offset(self.path, info)
        if offset + nbytes > self.path.stat().st_size:
            raise TorchFileError(f"storage {key} runs past the end of the file; it is truncated or corrupt")
        if numel == 0:
            return _Storage(np.zeros(0, np_dtype), bf16)
        return _Storage(np.memmap(self.path, dtype=np_dtype, mode="r", offset=offset, shape=(numel,)), bf16)


def _stored_member(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    """The zip entry `name`, refused unless stored uncompressed (as torch.save writes every entry)."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise TorchFileError(f"entry {name} is compressed (method {info.compress_type}); torch.save stores "
                             f"every entry uncompressed, so the file was repacked or crafted and is not read. "
                             f"Re-save it with torch.save or convert it to .safetensors with a tool you trust.")
    return info


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where an uncompressed zip member's bytes start: after its local header, name and extra field."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if header[:4] != b"PK\x03\x04":
        raise TorchFileError(f"corrupt zip entry {info.filename}")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


def read_torch_zip(path: str | Path) -> Any:
    """The object torch.save wrote (dicts of numpy arrays), refusing any pickle that asks for code."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise TorchFileError(f"{path}: not a readable torch zip checkpoint ({err}); it may be truncated") from err
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise TorchFileError(f"{path}: a torch checkpoint holds one data.pkl, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            with archive.open(_stored_member(archive, pickles[0])) as file:
                return _RestrictedUnpickler(file, archive, prefix, path).load()
        except UnsafePickleError:
            raise
        except TorchFileError as err:  # raised by the checks above, which do not know the file's name
            raise TorchFileError(f"{path}: {err}") from err
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, IndexError, AttributeError,
                OverflowError, zipfile.BadZipFile) as err:
            raise TorchFileError(f"{path}: the pickle inside is corrupt or crafted ({type(err).__name__}: {err})") \
                from err


def refuse_legacy_pickle(path: str | Path) -> None:
    """Old (pre-zip) torch files and bare pickles: say why they are not read."""
    raise UnsafePickleError(f"{path} is a bare pickle (not torch's zip format): it is not read, because a pickle "
                            f"can run code while loading. Re-save it with torch >= 1.6 (zip format) or convert it "
                            f"to .safetensors with a tool you trust.")


def tensors_in(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Flatten the checkpoint's state dict: a top-level 'state_dict' (Lightning) wins, else all array leaves."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    out: dict[str, np.ndarray] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            name = f"{prefix}{key}"
            if isinstance(value, np.ndarray):
                out[name] = value
            elif isinstance(value, dict) and prefix == "" and key not in ("callbacks", "optimizer_states"):
                out.update({k: v for k, v in tensors_in(value, f"{name}.").items()})
    return out
