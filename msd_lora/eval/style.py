"""How close two image sets are in colour style: the demo's measure of "did the LoRA learn it".

A set's signature is the mean over its images of (mean R, mean G, mean B, mean saturation), saturation being a
pixel's max minus min channel, all in 0..255; the style distance of two sets is the Euclidean distance of their
signatures. Sepia pictures are brown and unsaturated, the tiny model's flat shapes vivid: the distance tells them
apart without any learned network.
"""
from __future__ import annotations

import numpy as np


def colour_signature(img: np.ndarray) -> np.ndarray:
    """Mean R, G, B and mean saturation (max - min channel) of an image, in 0..255."""
    pixels = img.reshape(-1, 3).astype(np.float32)
    return np.append(pixels.mean(0), (pixels.max(1) - pixels.min(1)).mean())


def style_distance(images, reference) -> float:
    """Euclidean distance between the mean colour signatures of two image sets."""
    a = np.mean([colour_signature(im) for im in images], axis=0)
    b = np.mean([colour_signature(im) for im in reference], axis=0)
    return float(np.linalg.norm(a - b))
