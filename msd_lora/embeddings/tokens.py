"""Named embeddings and the token names their vectors take in the tokenizer.

An embedding is a name (what a prompt says, e.g. ``<sks>``) and an (n_vectors, width) array. In the tokenizer its
vectors are the tokens ``<sks>``, ``<sks>_1``, ... (diffusers' naming), and the prompt's ``<sks>`` is expanded to all
of them; in the text encoder they are rows appended after the base vocabulary, in the order the embeddings are
added. lora_pti's embedding-norm decay (`decay_norms`) is written with operators only, so torch tensors and
MindSpore tensors inside a compiled graph run the same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from msd_lora.errors import EmbeddingError

NORM_TARGET = 0.4  # lora_pti's clip_ti_decay pulls each learnt row's norm towards this
RANDOM_INIT_STD = 0.017  # lora_pti's default initializer, <rand-0.017>


@dataclass(frozen=True)
class Embedding:
    name: str  # the word a prompt uses
    vectors: np.ndarray  # (n_vectors, width) float32

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or not len(self.vectors):
            raise EmbeddingError(f"embedding {self.name!r}: expected an (n_vectors, width) array, got shape "
                                 f"{tuple(self.vectors.shape)}")

    @property
    def token_names(self) -> list[str]:
        return vector_tokens(self.name, len(self.vectors))

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])


def vector_tokens(name: str, n_vectors: int) -> list[str]:
    """The tokenizer tokens of an embedding's vectors: name, name_1, name_2, ..."""
    return [name] + [f"{name}_{i}" for i in range(1, n_vectors)]


def check_width(embedding: Embedding, width: int, source: str) -> None:
    if embedding.width != width:
        family = {768: "SD 1.x", 1024: "SD 2.x"}
        hint = f" (a {family[embedding.width]} embedding)" if embedding.width in family else ""
        raise EmbeddingError(f"{source}: embedding {embedding.name!r} has vectors of width {embedding.width}{hint}, but "
                             f"this model's text encoder has width {width}: it was trained for another base model")


def initial_vectors(initializer: str, n_vectors: int, table: np.ndarray, token_ids: list[int] | None,
                    seed: int) -> np.ndarray:
    """The starting rows of a new embedding: the initializer word's row repeated (`token_ids` its ids, exactly one),
    ``<zero>``, or ``<rand-STD>`` (normal noise of that standard deviation; lora_pti's default is 0.017)."""
    width = table.shape[1]
    if initializer == "<zero>":
        return np.zeros((n_vectors, width), np.float32)
    if initializer == "" or initializer.startswith("<rand"):
        std = RANDOM_INIT_STD
        if initializer.startswith("<rand-"):
            try:
                std = float(initializer[len("<rand-"):].rstrip(">"))
            except ValueError as err:
                raise EmbeddingError(f"initializer_token {initializer!r}: expected <rand-STD> such as <rand-0.017>") \
                    from err
        return (np.random.default_rng([seed, 0x7E1]).standard_normal((n_vectors, width)) * std).astype(np.float32)
    if token_ids is None or len(token_ids) != 1:
        raise EmbeddingError(f"initializer_token {initializer!r} is {len(token_ids or [])} tokens for this tokenizer; "
                             f"it must be exactly one (a single common word such as 'toy' or 'circle'), <zero> or "
                             f"<rand-0.017>")
    return np.repeat(table[token_ids[0]][None].astype(np.float32), n_vectors, axis=0)


def decay_norms(rows: Any, strength: Any) -> Any:
    """lora_pti's clip_ti_decay on learnt rows (N, width) after an optimizer step: each row keeps its direction and
    its norm n becomes n + strength * (0.4 - n), strength = min(1, 100 * learning rate). At strength 0 the rows
    come back bit-identical (n / n is exactly 1). Any array type: operators, `sum` and `reshape` only."""
    norms = ((rows * rows).sum(-1) ** 0.5).reshape(-1, 1)
    return rows * ((norms + strength * (NORM_TARGET - norms)) / norms)


def decay_strength(lr: float, enabled: bool) -> float:
    return min(1.0, 100.0 * lr) if enabled and lr > 0 else 0.0


# Caption templates for data without captions (use_template), in the spirit of the textual-inversion papers' lists
OBJECT_TEMPLATES = (
    "a photo of a {}", "a picture of a {}", "a rendering of a {}", "a photo of the {}", "a close-up photo of a {}",
    "a cropped photo of the {}", "a good photo of a {}", "a bright photo of the {}", "a dark photo of the {}",
    "a photo of one {}", "an image of a {}", "a small {}", "a large {}", "the {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a picture in the style of {}", "a rendering in the style of {}",
    "an image in the style of {}", "a drawing in the style of {}", "a good picture in the style of {}",
    "a small painting in the style of {}", "a large painting in the style of {}", "art in the style of {}",
    "in the style of {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}

ROWS_KEY = "text_encoder.token_rows"  # the added rows as one trainable tensor (optimizer state, resume files)
ROWS_PARAMETER = "token_rows"  # its parameter's name in both backends' text encoders
TOKEN_TABLE = "text_encoder.text_model.embeddings.token_embedding.weight"  # the frozen base table
