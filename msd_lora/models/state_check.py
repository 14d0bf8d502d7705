"""The strict name-and-shape check every backend runs before filling a network from a state dict."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from msd_lora.errors import StateDictError


def check_state_fits(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], source: str,
                     network: str) -> None:
    """Raise StateDictError listing missing, unexpected and mis-shaped names (first few of each)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{n}: file {tuple(state[n].shape)}, network {tuple(expected[n])}"
             for n in sorted(set(expected) & set(state)) if tuple(state[n].shape) != tuple(expected[n])]
    if not (missing or unexpected or wrong):
        return
    parts = [f"{source} does not fit {network}:"]
    if missing:
        parts.append(f"  {len(missing)} missing, e.g. {', '.join(missing[:4])}")
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected, e.g. {', '.join(unexpected[:4])}")
    if wrong:
        parts.append(f"  {len(wrong)} with other shapes, e.g. " + "; ".join(wrong[:3]))
    parts.append("  Likely cause: the weights belong to another model version or size than the config describes.")
    raise StateDictError("\n".join(parts))
