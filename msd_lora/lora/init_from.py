"""Start training from an existing LoRA file (any format), checked against what this run trains.

The file's layers must be among the run's targets, with the run's rank and the same shapes; layers the run
trains but the file lacks start as usual (A random, B zero: no change). A file alpha different from the
run's `lora_alpha` is absorbed into B, so the starting model is exactly the one the file describes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from msd_lora.errors import LoraFormatError
from msd_lora.lora.core import LoraLayer, LoraWeights


def start_from_file(path: str | Path, fresh: LoraWeights, index) -> tuple[LoraWeights, str]:
    """(initial weights, a log line): `fresh` with the file's layers put in place."""
    from msd_lora.lora.formats import read_lora

    file = read_lora(path, index)
    outside = sorted(k for k in file.weights if k not in fresh)
    if outside:
        leaves = sorted({k.rsplit(".", 1)[-1] for k in outside})
        raise LoraFormatError(
            f"init_lora_path {path}: {len(outside)} of its {len(file.weights)} layers are not trained by this run, "
            f"e.g. {', '.join(outside[:3])}. Add their module names ({', '.join(leaves[:6])}) to "
            f"lora_target_modules / lora_te_target_modules (and set lora_ft_text_encoder for text_encoder layers).")
    problems = []
    for key, layer in file.weights.items():
        target = fresh[key]
        if layer.rank != target.rank:
            problems.append(f"{key}: rank {layer.rank}, this run trains rank {target.rank} (set lora_rank / conv_rank: "
                            f"{layer.rank})")
        elif (layer.magnitude is None) != (target.magnitude is None):
            problems.append(f"{key}: {'a DoRA' if layer.magnitude is not None else 'a plain LoRA'} layer; set lora_type "
                            f"to {'dora' if layer.magnitude is not None else 'lora'}")
        elif layer.down.shape != target.down.shape or layer.up.shape != target.up.shape:
            problems.append(f"{key}: A {layer.down.shape}, B {layer.up.shape}; the model needs A {target.down.shape}, "
                            f"B {target.up.shape} (a LoRA for another model?)")
    if problems:
        raise LoraFormatError(f"init_lora_path {path} does not fit this run:\n  " + "\n  ".join(problems[:4]))
    start = dict(fresh)
    for key, layer in file.weights.items():
        alpha = fresh[key].alpha
        up = layer.up.astype(np.float64) * (float(layer.alpha) / alpha)
        magnitude = None if layer.magnitude is None else np.asarray(layer.magnitude, np.float32).reshape(
            fresh[key].magnitude.shape)
        start[key] = LoraLayer(down=np.asarray(layer.down, np.float32).copy(), up=up.astype(np.float32), alpha=alpha,
                               magnitude=magnitude)
    message = (f"initialised {len(file.weights)} of {len(fresh)} LoRA layers from {path} ({file.format} format)"
               + (f"; {len(fresh) - len(file.weights)} start fresh" if len(fresh) > len(file.weights) else ""))
    return start, message
