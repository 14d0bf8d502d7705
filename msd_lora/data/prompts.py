"""The prompts file `text_to_image.py --data_path` samples from and the eval tools pair images with."""
from __future__ import annotations

from pathlib import Path

from msd_lora.errors import ConfigError, MissingPathError, MsdLoraError
from msd_lora.files.plain import read_utf8


def read_prompts_file(path: str | Path, what: str = "prompts file",
                      error: type[MsdLoraError] = ConfigError) -> list[str]:
    """One prompt per non-empty line (UTF-8), stripped. A missing file is a MissingPathError; an empty one or one
    that is not UTF-8 text raises `error`."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"{what} {path} not found (a .txt file, one prompt per line)")
    prompts = [line.strip() for line in read_utf8(path, what, error).splitlines() if line.strip()]
    if not prompts:
        raise error(f"{what} {path} holds no prompts")
    return prompts
