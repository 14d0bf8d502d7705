"""Write an offline CLIP BPE tokenizer (vocab.json + merges.txt) for a closed vocabulary.

The files follow OpenAI CLIP's layout, so `transformers.CLIPTokenizer` loads them unchanged: the 256
byte symbols, the same with the end-of-word marker, one merged token per learned pair, then the two
special tokens. Merges are chosen so every listed word becomes a single token; any other text still
tokenizes, byte by byte.
"""
from __future__ import annotations

import json
from pathlib import Path

from msd_lora.tokenizer import BOS, END_OF_WORD, EOS, bytes_to_unicode


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy lowest-rank-first BPE, as CLIP applies it."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that reduce each word to one token without changing how earlier words reduce.

    A new merge is appended with the highest rank, so it only fires once no older merge applies:
    words already reduced to one token keep reducing the same way.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    byte_symbol = bytes_to_unicode()
    for word in words:
        encoded = "".join(byte_symbol[b] for b in word.encode("utf-8"))
        symbols = list(encoded[:-1]) + [encoded[-1] + END_OF_WORD]
        while len(symbols := _apply_merges(symbols, ranks)) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def write_clip_tokenizer(folder: str | Path, words: list[str], model_max_length: int = 77) -> dict[str, int]:
    """Write vocab.json, merges.txt and tokenizer_config.json; return the special token ids."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    merges = learn_merges(sorted(set(words)))
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(p) for p in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return {"vocab_size": len(vocab), "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS]}
