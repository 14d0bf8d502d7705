"""Caption handling at training time (kohya's options): prefix/suffix, caption dropout for classifier-free
guidance, and shuffling of the separator-delimited tags after the first `keep_tokens`.

    options = CaptionOptions(prefix="sks style,", shuffle=True, keep_tokens=1)
    options.apply("a dog, grass, sunny", rng)   # 'sks style, a dog, sunny, grass'

Every random choice comes from the rng the loop passes (seeded by the step), so a batch is a pure function of
the seed and the step. Backend-neutral.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CaptionOptions:
    dropout_rate: float = 0.0  # probability of training on the empty caption
    shuffle: bool = False
    keep_tokens: int = 0  # leading tags that stay in place when shuffling
    separator: str = ","
    prefix: str = ""  # joined with a space, before shuffling (so keep_tokens can keep it first)
    suffix: str = ""
    templates: tuple[str, ...] = ()  # use_template: each step's caption is one of these around `subject`
    subject: str = ""

    def fixed(self, caption: str) -> str:
        """The caption with prefix and suffix, before any random change."""
        parts = [p for p in (self.prefix.strip(), caption.strip(), self.suffix.strip()) if p]
        return " ".join(parts)

    def apply(self, caption: str, rng: np.random.Generator | None) -> str:
        """The caption trained on at one step."""
        if self.templates and rng is not None:
            caption = self.templates[int(rng.integers(len(self.templates)))].format(self.subject)
        text = self.fixed(caption)
        if self.dropout_rate > 0 and rng is not None and rng.random() < self.dropout_rate:
            return ""
        if self.shuffle and rng is not None:
            text = shuffled(text, rng, self.keep_tokens, self.separator)
        return text


def shuffled(caption: str, rng: np.random.Generator, keep_tokens: int = 0, separator: str = ",") -> str:
    """The caption's tags (split at `separator`, stripped) with all but the first `keep_tokens` shuffled, joined
    with the separator and a space."""
    tags = [t.strip() for t in caption.split(separator) if t.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    joiner = separator if separator.endswith(" ") else separator + " "
    return joiner.join(kept + rest)
