"""The CLIP model for CLIP score as both backends take it: a Hugging Face folder read into config + numpy weights,
its tokenizer and image processor (transformers, numpy only).

A folder holds config.json, model.safetensors (or shards with model.safetensors.index.json), the tokenizer
(vocab.json, merges.txt, tokenizer_config.json) and preprocessor_config.json, as on the Hub. `--ckpt_path` names
such a folder; otherwise `--model_name` (default openai/clip-vit-large-patch14) is looked up in the Hugging Face
cache and, when downloads are allowed, fetched with a message, each weight file's sha256 checked against the Hub's
record of it.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msd_lora.errors import WeightsError
from msd_lora.eval.weights import RANDOM_INIT_KEY, downloads_allowed
from msd_lora.files.plain import sha256_of

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
REQUIRED_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json", "vocab.json", "merges.txt")
WEIGHT_FILE, WEIGHT_INDEX = "model.safetensors", "model.safetensors.index.json"


@dataclass
class ClipModelFiles:
    folder: Path
    config: dict
    state: dict[str, np.ndarray]
    metadata: dict[str, str]

    @property
    def random_init(self) -> bool:
        return RANDOM_INIT_KEY in self.metadata

    def tokenizer(self):
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(self.folder), local_files_only=True)

    def image_processor(self):
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor.from_pretrained(str(self.folder), local_files_only=True)


def weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHT_FILE).is_file():
        return [folder / WEIGHT_FILE]
    if (folder / WEIGHT_INDEX).is_file():
        return [folder / s for s in sorted(set(json.loads((folder / WEIGHT_INDEX).read_text())["weight_map"].values()))]
    return []


def missing_files(folder: Path) -> list[str]:
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    shards = weight_files(folder)
    if not shards:
        missing.append(WEIGHT_FILE)
    missing += [str(p.relative_to(folder)) for p in shards if not p.is_file()]
    return missing


def check_clip_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"CLIP model folder {folder} not found (--ckpt_path); give a Hugging Face folder with "
                           f"{', '.join(REQUIRED_FILES)} and {WEIGHT_FILE}")
    missing = missing_files(folder)
    if missing:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" ({', '.join(pickles)} present: pickled weights are not loaded; use the safetensors file)" \
            if pickles else ""
        raise WeightsError(f"CLIP model folder {folder} is missing {', '.join(missing)}{hint}")
    return folder


def verify_against_hub(repo_id: str, folder: Path, revision: str | None = None) -> None:
    """Each weight file's sha256 must equal the Hub's LFS record (the file's etag, 64 hex digits); a mismatch is an
    error. An etag that is not a sha256 (a file not in LFS) leaves the file unverified, and says so."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    for path in weight_files(folder):
        expected = (get_hf_file_metadata(hf_hub_url(repo_id, path.name, revision=revision)).etag or "").strip('"')
        actual = sha256_of(path)
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            status = "not verifiable (no sha256 from the hub)"
        elif actual != expected:
            raise WeightsError(f"{path}: sha256 {actual} differs from the Hub's {expected}; delete it and retry")
        else:
            status = "verified against the hub"
        print(f"  {path.name}: {path.stat().st_size / 1e6:.1f} MB, sha256 {actual} {status}", file=sys.stderr)


def resolve_clip_folder(ckpt_path: str | Path | None, model_name: str = DEFAULT_CLIP_MODEL,
                        download: bool | None = None) -> Path:
    """`ckpt_path` when given, else `model_name` from the Hugging Face cache or, when allowed, downloaded."""
    if ckpt_path:
        return check_clip_folder(ckpt_path)
    if Path(model_name).is_dir():
        return check_clip_folder(model_name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = [*REQUIRED_FILES, "special_tokens_map.json", "model.safetensors*"]
    try:
        return check_clip_folder(snapshot_download(model_name, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, WeightsError, OSError) as err:
        allowed = downloads_allowed() if download is None else download
        if not allowed:
            raise WeightsError(f"CLIP model {model_name} is not in the Hugging Face cache and downloads are off "
                               f"(MSD_LORA_OFFLINE / HF_HUB_OFFLINE): pass --ckpt_path FOLDER holding "
                               f"{', '.join(REQUIRED_FILES)} and {WEIGHT_FILE} ({err})") from err
    print(f"downloading CLIP model {model_name} from the Hugging Face Hub (config, tokenizer, model.safetensors)",
          file=sys.stderr)
    folder = Path(snapshot_download(model_name, allow_patterns=patterns))
    verify_against_hub(model_name, folder)
    return check_clip_folder(folder)


def load_clip_files(folder: str | Path) -> ClipModelFiles:
    from msd_lora.files.safetensors_file import read_safetensors

    folder = check_clip_folder(folder)
    config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
    state: dict[str, np.ndarray] = {}
    metadata: dict[str, str] = {}
    for path in weight_files(folder):
        tensors, found = read_safetensors(path)
        metadata.update(found)
        state.update({k: v for k, v in tensors.items() if not k.endswith("position_ids")})
    return ClipModelFiles(folder, config, state, metadata)
