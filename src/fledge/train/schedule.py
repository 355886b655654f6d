"""Learning-rate schedule: linear warmup, then cosine (or linear, or constant) decay to min_lr."""

from __future__ import annotations

import math

from fledge.recipe import TrainConfig


def learning_rate(step: int, t: TrainConfig) -> float:
    """The rate for optimizer step `step` (0-based). Depends on the step only, so resume is exact."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant" or t.max_steps <= t.warmup_steps:
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / (t.max_steps - t.warmup_steps))
    if t.schedule == "linear":
        return t.lr + (t.min_lr - t.lr) * progress
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))
