"""bfloat16 for numpy, which has no such dtype: files store it as 16-bit patterns, read here as float32."""
from __future__ import annotations

import numpy as np


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> a new float32 array in memory (exact: bf16 is a float32's top half)."""
    return (np.asarray(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
