"""Plain files: UTF-8 text read with an error that says how to fix it, and content hashes."""
from __future__ import annotations

import hashlib
from pathlib import Path

from msd_lora.errors import MsdLoraError


def read_utf8(path: str | Path, what: str, error: type[MsdLoraError]) -> str:
    """The text of `path` (a UTF-8 byte-order mark is dropped); a file that is not UTF-8 raises `error` naming it."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8 "
                    f"(e.g. iconv -f latin1 -t utf-8)") from err


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
