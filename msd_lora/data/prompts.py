"""The prompts file `text_to_image.py --data_path` samples from and the eval tools pair images with."""
from __future__ import annotations

from pathlib import Path
from msd_lora.errors import MissingPathError


def read_prompts_file(path: str | Path, what: str = "prompts file",
                      error: type[ValueError] = ValueError) -> list[str]:
    """One prompt per non-empty line, stripped. A missing file is FileNotFoundError, an empty one `error`."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"{what} {path} not found (a .txt file, one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise error(f"{what} {path} holds no prompts")
    return prompts
