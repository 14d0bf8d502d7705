"""Learning-rate schedules by optimizer step (mindone's names): constant, cosine_decay, linear_decay,
multi_step_decay."""
from __future__ import annotations

import math


def learning_rate(step: int, total_steps: int, scheduler: str, start: float, end: float,
                  warmup_steps: int = 0, decay_steps: int = 0, milestones: tuple[int, ...] = (),
                  decay_rate: float = 0.9) -> float:
    """Rate for 0-based optimizer `step`: linear warmup to `start`, then the schedule down to `end`.

    `decay_steps` 0 means the decay lasts until the last step; after it the rate stays at `end`.
    """
    if step < warmup_steps:
        return start * (step + 1) / warmup_steps
    if scheduler == "constant":
        return start
    if scheduler == "multi_step_decay":  # mindone's: times decay_rate at each milestone passed
        return start * decay_rate ** sum(step >= m for m in milestones)
    span = decay_steps or max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if scheduler == "cosine_decay":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if scheduler == "linear_decay":
        return start + (end - start) * progress
    raise ValueError(f"unknown scheduler {scheduler!r}; expected constant, cosine_decay or linear_decay")
