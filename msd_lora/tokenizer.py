"""Prompts to token ids: `PromptTokenizer`, and the SD 1.x / 2.x CLIP tokenizer built offline from the BPE merges
shipped in msd_lora/assets/clip_bpe.

Single-file checkpoints carry no tokenizer. OpenAI's `bpe_simple_vocab_16e6.txt.gz` defines it: the vocabulary
is the 256 byte symbols, the same with the end-of-word mark `</w>`, one token per merge (the first 48,894
merges are used), then `<|startoftext|>` and `<|endoftext|>` — 49,408 ids. `tokenizer_folder` writes that
as vocab.json + merges.txt + tokenizer_config.json (once, into a cache folder) so `CLIPTokenizer` loads it.
SD1 pads with `<|endoftext|>`; SD2 (open_clip) pads with id 0, `!`.
"""
from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from msd_lora.errors import UnwritablePathError

END_OF_WORD = "</w>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


BPE_FILE = Path(__file__).resolve().parent / "assets/clip_bpe/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # what CLIP uses of the file


def read_merges(path: Path = BPE_FILE) -> list[tuple[str, str]]:
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    return [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]


def vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def write_tokenizer(folder: Path, pad_token: str, model_max_length: int) -> Path:
    merges = read_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocabulary(merges), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "bos_token": BOS,
              "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return folder


def cache_root() -> Path:
    return Path(os.environ.get("MSD_LORA_CACHE", Path.home() / ".cache" / "msd_lora"))


def cached_folder(name: str, write: Callable[[Path], None]) -> Path:
    """The folder `name` under the cache (or, where that is not writable, the temp folder), built once by
    `write(folder)` beside it and renamed into place, so readers never see a half-written one."""
    for root in (cache_root(), Path(tempfile.gettempdir()) / "msd_lora"):
        target = root / name
        if (target / "tokenizer_config.json").is_file():
            return target
        try:
            root.mkdir(parents=True, exist_ok=True)
            building = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
            write(building)
            try:
                os.replace(building, target)
            except OSError:  # another process finished first
                shutil.rmtree(building, ignore_errors=True)
            if (target / "tokenizer_config.json").is_file():
                return target
        except OSError:
            continue
    raise UnwritablePathError(f"cannot write the tokenizer files under {cache_root()} or the temp folder; set "
                              f"MSD_LORA_CACHE to a writable folder")


def tokenizer_folder(pad_token: str = EOS, model_max_length: int = 77) -> Path:
    """The standard CLIP tokenizer as a folder CLIPTokenizer loads, built once per (pad token, length)."""
    digest = hashlib.sha256(BPE_FILE.read_bytes()).hexdigest()[:12]
    pad_id = hashlib.sha256(pad_token.encode()).hexdigest()[:8]
    return cached_folder(f"clip_tokenizer-{digest}-pad{pad_id}-{model_max_length}",
                         lambda folder: write_tokenizer(folder, pad_token, model_max_length))


def tokenizer_files(folder: str | Path) -> dict[str, str]:
    """The text of each tokenizer file a folder holds."""
    return {name: (Path(folder) / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES
            if (Path(folder) / name).is_file()}


def folder_from_files(files: dict[str, str]) -> Path:
    """A tokenizer folder holding exactly `files` (name -> text), built once per content."""
    unknown = sorted(set(files) - set(TOKENIZER_FILES))
    if unknown or "vocab.json" not in files:
        raise ValueError(f"not a CLIP tokenizer's files: {sorted(files)}")
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]

    def write(folder: Path) -> None:
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")

    return cached_folder(f"tokenizer-{digest}", write)


def is_standard_clip(folder: str | Path) -> bool:
    """Whether a tokenizer has the standard CLIP vocabulary and merges (SD 1.x / 2.x), no added tokens."""
    standard = tokenizer_files(tokenizer_folder())
    mine = tokenizer_files(folder)
    return "added_tokens.json" not in mine and all(mine.get(n) == standard[n] for n in ("vocab.json", "merges.txt"))


TOKEN_LENGTHS = (75, 150, 225)  # max_token_length: one, two or three 77-token chunks


class PromptTokenizer:
    """CLIP tokenizer of a model, returning fixed-length numpy ids both backends take.

    `max_token_length` 150 or 225 encodes long prompts the way kohya and A1111 do for SD 1.x / 2.x: the text's
    tokens in chunks of 75, each chunk `BOS + 75 tokens + EOS` padded to 77 (SD 2's `!` padding keeps an EOS after
    the text, or right after BOS in an empty chunk), ids (N, chunks * 77). The text encoder runs on every chunk and
    `join_chunks` keeps the first BOS state, the 75 inner states of each chunk and the last state. With 75 (one
    chunk) the ids equal the tokenizer's usual `max_length=77` output."""

    def __init__(self, tokenizer_dir: str | Path, max_token_length: int = 75):
        from transformers import CLIPTokenizer

        self._tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self._set_length(max_token_length)
        self._expansions: dict[str, str] = {}  # embedding name -> its vector tokens, space-separated
        self._row_shift = 0  # text-encoder row of an added token = its tokenizer id + this

    def has_token(self, word: str) -> bool:
        """Whether `word` is a token of the vocabulary already (added, or a word the BPE knows, with or without the
        end-of-word mark)."""
        vocab = self._tok.get_vocab()
        return word in vocab or word.lower() + END_OF_WORD in vocab

    def token_ids(self, word: str) -> list[int]:
        """The ids `word` tokenises to, without BOS / EOS."""
        return self._tok(word, add_special_tokens=False, verbose=False).input_ids

    def add_embedding(self, name: str, token_names: list[str], first_row: int) -> list[int]:
        """Make `name` in a prompt stand for the new tokens `token_names`, whose vectors are the text encoder's rows
        from `first_row` on (after the rows added before). Returns those rows."""
        from msd_lora.errors import EmbeddingError

        taken = [t for t in token_names if self.has_token(t)]
        if taken:
            raise EmbeddingError(f"token {taken[0]!r} is already in the tokenizer's vocabulary: a new embedding needs "
                                 f"a word the model does not know (e.g. <{name.strip('<>')}-new>); rename it with "
                                 f"embedding_token / placeholder_tokens")
        before = len(self._tok)
        if self._expansions and before + self._row_shift != first_row:
            raise ValueError(f"embedding rows must be added in order: expected row {before + self._row_shift}")
        self._row_shift = first_row - before
        self._tok.add_tokens(token_names)
        self._expansions[name] = " ".join(token_names)
        return [int(self._tok.convert_tokens_to_ids(t)) + self._row_shift for t in token_names]

    def expand(self, prompt: str) -> str:
        """`prompt` with every embedding name replaced by its vector tokens."""
        for name, tokens in self._expansions.items():
            if " " in tokens:
                prompt = re.sub(re.escape(name) + r"(?!_\d)", tokens, prompt)
        return prompt

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        encoded = self._tok([self.expand(p) for p in prompts], add_special_tokens=False, verbose=False).input_ids
        if not self._row_shift:
            return encoded
        first_added = len(self._tok) - sum(len(t.split()) for t in self._expansions.values())
        return [[i + self._row_shift if i >= first_added else i for i in ids] for ids in encoded]

    def _set_length(self, max_token_length: int) -> None:
        if max_token_length not in TOKEN_LENGTHS:
            raise ValueError(f"max_token_length must be one of {TOKEN_LENGTHS}, got {max_token_length}")
        self.max_token_length = max_token_length
        self.chunk_length = int(self._tok.model_max_length)  # 77: BOS + 75 + EOS
        self.chunks = max_token_length // 75
        self.max_tokens = self.chunks * (self.chunk_length - 2)

    def with_length(self, max_token_length: int) -> PromptTokenizer:
        """This tokenizer encoding up to `max_token_length` tokens (itself when that is its length already)."""
        if max_token_length == self.max_token_length:
            return self
        other = copy.copy(self)
        other._set_length(max_token_length)
        return other

    def token_counts(self, prompts: list[str]) -> list[int]:
        """How many tokens each prompt has, without BOS/EOS."""
        return [len(ids) for ids in self._encode(list(prompts))]

    def overlong(self, prompts: list[str]) -> list[tuple[str, int]]:
        """(prompt, its token count) of every prompt longer than max_token_length: those are truncated."""
        return [(p, n) for p, n in zip(prompts, self.token_counts(prompts)) if n > self.max_tokens]

    def __call__(self, prompts: list[str]) -> np.ndarray:
        tok, body = self._tok, self.chunk_length - 2
        bos, eos = tok.bos_token_id, tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        rows = []
        for ids in self._encode(list(prompts)):
            ids = ids[:self.max_tokens]
            row = []
            for i in range(self.chunks):
                part = ids[i * body:(i + 1) * body]
                row += [bos, *part, eos] + [pad] * (body - len(part))
            rows.append(row)
        return np.asarray(rows, dtype=np.int64)


def join_chunks(states, chunks: int, cat):
    """Text-encoder states of (N * chunks, 77, D) chunks -> (N, 2 + 75 * chunks, D): the first chunk's BOS, every
    chunk's 75 inner states, the last chunk's last state. `cat(list, axis)` is the framework's concatenation; the
    same slicing runs on torch and MindSpore tensors (and inside a MindSpore graph)."""
    if chunks == 1:
        return states
    length, width = states.shape[1], states.shape[2]
    grouped = states.reshape(-1, chunks, length, width)
    parts = [grouped[:, 0, :1]] + [grouped[:, i, 1:length - 1] for i in range(chunks)] + [grouped[:, chunks - 1,
                                                                                                   length - 1:]]
    return cat(parts, 1)
