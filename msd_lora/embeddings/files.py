"""Embedding files in the layouts other tools write and read.

    A1111 / kohya   ``{"emb_params": (n, width)}`` safetensors (kohya's train_textual_inversion), or A1111's ``.pt``
                    ``{"string_to_param": {"*": (n, width)}, "name": ...}`` (read with the safe pickle reader). A1111
                    names the embedding after the file; our files also record the name in metadata.
    diffusers       ``learned_embeds.safetensors``: ``{token: (width,) or (n, width)}``, one token per file, as
                    ``load_textual_inversion`` expects.
    bundled         inside a LoRA file: ``bundle_emb.<name>.emb_params`` or ``bundle_emb.<name>.string_to_param.*``
                    (A1111's networks extension reads these from kohya-style LoRA files).
SDXL's ``clip_l`` / ``clip_g`` pairs are refused with a message.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from msd_lora.embeddings.tokens import Embedding
from msd_lora.errors import EmbeddingError, TensorFileError
from msd_lora.files.tensor_file import read_tensor_file, write_tensor_file

A1111_KEY = "emb_params"
A1111_PT_PREFIX = "string_to_param."
BUNDLE_PREFIX = "bundle_emb."
NAME_METADATA = "msd_lora.embedding_name"
UNSAFE_FILE_CHARACTERS = re.compile(r'[<>:"/\\|?*\s]+')


def file_stem(name: str) -> str:
    """A file name for an embedding: the token without characters file systems refuse (``<sks>`` -> ``sks``)."""
    return UNSAFE_FILE_CHARACTERS.sub("", name) or "embedding"


def _vectors(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, np.float32)
    return value[None] if value.ndim == 1 else value


def embeddings_from_tensors(tensors: dict[str, np.ndarray], metadata: dict[str, str], source: str,
                            default_name: str, token: str | None = None) -> list[Embedding]:
    """The embeddings a file's tensors hold, in any layout above; `token` renames a file holding one embedding."""
    keys = sorted(tensors)
    if "clip_l" in tensors or "clip_g" in tensors:
        raise EmbeddingError(f"{source} is an SDXL embedding (clip_l / clip_g): SD 1.x and 2.x text encoders cannot "
                             f"use it")
    bundled = bundled_embeddings(tensors)
    if bundled:
        found = bundled
    elif A1111_KEY in tensors:
        found = [Embedding(metadata.get(NAME_METADATA) or default_name, _vectors(tensors[A1111_KEY]))]
    elif any(k.startswith(A1111_PT_PREFIX) for k in keys):
        params = [k for k in keys if k.startswith(A1111_PT_PREFIX)]
        if len(params) != 1:
            raise EmbeddingError(f"{source}: an A1111 embedding holds one string_to_param entry, found {params}")
        found = [Embedding(metadata.get(NAME_METADATA) or default_name, _vectors(tensors[params[0]]))]
    elif any("lora" in k.lower() for k in keys):
        raise EmbeddingError(f"{source} is a LoRA file without bundled embeddings: pass it as --lora_ckpt_path")
    else:
        vectors = {k: v for k, v in tensors.items() if np.asarray(v).ndim in (1, 2) and
                   np.issubdtype(np.asarray(v).dtype, np.floating)}
        if not vectors:
            raise EmbeddingError(f"{source} holds no embedding: expected emb_params (A1111 / kohya), string_to_param "
                                 f"(A1111 .pt) or a token -> vectors entry (diffusers); keys: {keys[:4]}")
        found = [Embedding(name, _vectors(value)) for name, value in sorted(vectors.items())]
    if token:
        if len(found) != 1:
            raise EmbeddingError(f"{source} holds {len(found)} embeddings ({', '.join(e.name for e in found)}); "
                                 f"embedding_token renames a file holding one")
        found = [Embedding(token, found[0].vectors)]
    return found


def read_embeddings(path: str | Path, token: str | None = None) -> list[Embedding]:
    """The embeddings of a file (A1111 / kohya, diffusers, or bundled in a LoRA file)."""
    path = Path(path)
    try:
        file = read_tensor_file(path)
    except TensorFileError as err:
        raise EmbeddingError(f"embedding file {err}") from err
    return embeddings_from_tensors(file.tensors, file.metadata, str(path), path.stem, token)


def bundled_embeddings(tensors: dict[str, np.ndarray]) -> list[Embedding]:
    """Embeddings stored inside a LoRA file (`BUNDLE_PREFIX`), by name."""
    found: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            name, _, rest = key[len(BUNDLE_PREFIX):].partition(".")
            if rest == A1111_KEY or rest.startswith(A1111_PT_PREFIX):
                found[name] = _vectors(value)
    return [Embedding(name, found[name]) for name in sorted(found)]


def bundle_tensors(embeddings: list[Embedding]) -> dict[str, np.ndarray]:
    """Embeddings as a LoRA file's extra tensors (`bundle_emb.<name>.string_to_param.*`)."""
    return {f"{BUNDLE_PREFIX}{e.name}.{A1111_PT_PREFIX}*": e.vectors for e in embeddings}


def split_bundled(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(LoRA tensors, bundled-embedding tensors) of a LoRA file's tensors."""
    bundled = {k: v for k, v in tensors.items() if k.startswith(BUNDLE_PREFIX)}
    return {k: v for k, v in tensors.items() if k not in bundled}, bundled


def write_a1111(path: str | Path, embedding: Embedding, metadata: dict[str, str] | None = None) -> Path:
    """kohya's / A1111's safetensors layout: emb_params (n, width), the name in metadata."""
    return write_tensor_file(path, {A1111_KEY: embedding.vectors},
                             {NAME_METADATA: embedding.name, **(metadata or {})}, dtype="float32")


def write_diffusers(path: str | Path, embedding: Embedding) -> Path:
    """diffusers' learned_embeds layout: {name: (n, width)}, which load_textual_inversion reads."""
    return write_tensor_file(path, {embedding.name: embedding.vectors}, {"format": "pt"}, dtype="float32")


def write_run_embeddings(folder: Path, embeddings: list[Embedding], metadata: dict[str, str]) -> list[Path]:
    """Each embedding twice under `folder`: <stem>.safetensors (A1111 / kohya) and <stem>.diffusers.safetensors."""
    paths = []
    for embedding in embeddings:
        stem = file_stem(embedding.name)
        paths.append(write_a1111(folder / f"{stem}.safetensors", embedding, metadata))
        paths.append(write_diffusers(folder / f"{stem}.diffusers.safetensors", embedding))
    return paths
