"""LoRA dropout that draws the same masks on every backend: a counter-based hash instead of a framework RNG.

`lora_dropout` (peft's): dropout on the LoRA branch's input. `network_dropout` (kohya's): dropout on the down
projection's output, the rank-r features. Both are inverted dropout (kept values scaled by 1 / (1 - p)) and only
act in training steps. The loop draws one seed per micro-step in numpy (`step_seed`); a layer's mask is then a pure
function of (that seed, the layer's number, each element's flat index), computed with integer arithmetic every
framework does exactly: int64 additions, multiplications and remainders modulo the prime 2^26 - 5, with two
squarings for non-linearity. Every intermediate stays below 2^53 (MindSpore's int64 remainder on CPU goes through
float64, exact only there). A uniform draw u = hash / (2^26 - 5) keeps an element when u >= p.
"""
from __future__ import annotations

from typing import Any

import numpy as np

MODULUS = 2**26 - 5  # a prime; squares of residues stay below 2^52
MULTIPLIER = 48271  # Park and Miller's
LAYER_STRIDE = 7919  # a prime: spreads the layers' seeds
DROPOUT_STREAM = 0xD209


def step_seed(seed: int, micro_step: int) -> int:
    """The seed of one micro-step's masks, in [1, MODULUS) (0 means: no dropout)."""
    return int(np.random.default_rng([seed, DROPOUT_STREAM, micro_step]).integers(1, MODULUS))


def layer_seed(seed: Any, layer: int) -> Any:
    """The seed of one layer's masks (any integer array type)."""
    return (seed + LAYER_STRIDE * (layer + 1)) % MODULUS


def hashed(index: Any, seed: Any) -> Any:
    """Pseudo-random integers in [0, MODULUS) for int64 element indices and a layer seed; operators only, so numpy
    arrays, torch tensors and MindSpore tensors (in a compiled graph) compute the same numbers."""
    x = (index + seed) % MODULUS
    x = (x * MULTIPLIER) % MODULUS
    x = (x * x + seed) % MODULUS
    x = (x * MULTIPLIER) % MODULUS
    return (x * x) % MODULUS


def threshold(p: float) -> int:
    """An element is kept when its hash is at least this (so with probability 1 - p)."""
    return int(round(p * MODULUS))
