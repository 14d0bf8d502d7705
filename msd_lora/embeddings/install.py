"""Embeddings put into a loaded model: their vectors appended to the text encoder's table (`Backend.add_token_rows`)
and their names made tokens of the prompt tokenizer, for sampling or, trainable, for pivotal tuning."""
from __future__ import annotations

import numpy as np

from msd_lora.embeddings.tokens import TOKEN_TABLE, Embedding, check_width, initial_vectors
from msd_lora.errors import EmbeddingError


def install_embeddings(backend, tokenizer, embeddings: list[Embedding], trainable: bool = False,
                       sources: list[str] | None = None) -> None:
    """Add `embeddings` (checked: width, names new to the tokenizer and to each other) to the backend and tokenizer."""
    width = backend.base_shapes()[TOKEN_TABLE][1]
    sources = sources or ["embedding"] * len(embeddings)
    seen: dict[str, str] = {}
    for embedding, source in zip(embeddings, sources):
        check_width(embedding, width, source)
        for token in embedding.token_names:
            if token in seen:
                raise EmbeddingError(f"{source}: embedding token {token!r} is given twice (also by {seen[token]}); "
                                     f"rename one with embedding_token")
            if tokenizer.has_token(token):
                raise EmbeddingError(f"{source}: token {token!r} is already in the tokenizer's vocabulary: an "
                                     f"embedding needs a word the model does not know, e.g. <{token.strip('<>')}>; "
                                     f"rename it (embedding_token / placeholder_tokens)")
            seen[token] = source
    row = backend.add_token_rows(np.concatenate([e.vectors for e in embeddings]), trainable)
    for embedding in embeddings:
        tokenizer.add_embedding(embedding.name, embedding.token_names, row)
        row += len(embedding.vectors)


def placeholder_embeddings(tokens: tuple[str, ...], initializers: tuple[str, ...], n_vectors: int, backend,
                           tokenizer, seed: int) -> list[Embedding]:
    """The starting embeddings of a run's placeholder tokens, from their initializer words (`initial_vectors`)."""
    table = backend.base_weights([TOKEN_TABLE])[TOKEN_TABLE]
    embeddings = []
    for i, token in enumerate(tokens):
        word = initializers[i] if len(initializers) == len(tokens) else (initializers[0] if initializers else "")
        ids = None if word == "" or word.startswith("<") and word.endswith(">") else tokenizer.token_ids(word)
        embeddings.append(Embedding(token, initial_vectors(word, n_vectors, table, ids, seed + i)))
    return embeddings
