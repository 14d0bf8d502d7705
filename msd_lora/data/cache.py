"""Caches of what the frozen networks compute from the data: VAE posteriors of images, text-encoder states of
captions. In memory, or on disk where later runs reuse them.

An entry's key names everything its value depends on: for a latent, the image file's content hash, the VAE
weights' identity, the resize and crop box and the mirroring; for a text state, the token ids and the text
encoder's identity. The key's SHA-256 names the file, and the file records the key itself, so an entry is only
ever read back for exactly that key: another model, a changed image or a different crop finds no entry and
computes (and stores) its own. Backend-neutral.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from msd_lora.errors import TensorFileError
from msd_lora.files.safetensors_file import read_header, read_safetensors, write_safetensors

KEY_METADATA = "msd_lora.cache_key"
CACHE_FORMAT = 1  # bump when what an entry holds changes: old entries are then never read


def weights_identity(state: dict[str, np.ndarray]) -> str:
    """SHA-256 over a network's parameter names, dtypes, shapes and bytes: equal only for identical weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        array = np.ascontiguousarray(state[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Arrays by key: a dict in memory, or one safetensors file per entry under `folder/kind/`."""

    def __init__(self, kind: str, folder: str | Path | None = None):
        self.kind = kind
        self.folder = Path(folder) / kind if folder else None
        self._memory: dict[str, dict[str, np.ndarray]] = {}

    @staticmethod
    def key_text(parts: dict[str, Any]) -> str:
        return json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True)

    def _path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def get(self, parts: dict[str, Any]) -> dict[str, np.ndarray] | None:
        key = self.key_text(parts)
        return self._memory.get(key) if self.folder is None else self._read(key)

    def __contains__(self, parts: dict[str, Any]) -> bool:
        """Whether an entry for exactly `parts` is stored (on disk: its header says so; the tensors are not read)."""
        key = self.key_text(parts)
        if self.folder is None:
            return key in self._memory
        path = self._path(key)
        try:
            return path.is_file() and read_header(path)[1].get("__metadata__", {}).get(KEY_METADATA) == key
        except (TensorFileError, OSError):
            return False

    def put(self, parts: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        key = self.key_text(parts)
        arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}
        if self.folder is None:
            self._memory[key] = arrays
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, arrays, metadata={KEY_METADATA: key})

    def _read(self, key: str) -> dict[str, np.ndarray] | None:
        """The entry stored for exactly `key`, or None (absent, unreadable, or stored for another key)."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            arrays, metadata = read_safetensors(path)
        except (TensorFileError, OSError):
            return None  # a torn or foreign file: computed again and overwritten
        return arrays if metadata.get(KEY_METADATA) == key else None
