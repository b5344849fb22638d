"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

>>> s = Schedule(max_lr=1e-3, warmup_steps=10, total_steps=110, min_lr=1e-4)
>>> s(0), s(9), s(60), s(110)
(0.0001, 0.001, 0.00055, 0.0001)
"""
from __future__ import annotations

import dataclasses
import math

from fusegrad.core.errors import ConfigError


def cosine_schedule(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """lr for optimizer step `step` (0-based).

    Warmup: max_lr * (step + 1) / warmup_steps for step < warmup_steps, so step 0 already learns and
    step warmup_steps - 1 reaches max_lr. Then min_lr + (max_lr - min_lr) * (1 + cos(pi * r)) / 2 with
    r = (step - warmup_steps) / (total_steps - warmup_steps); min_lr from total_steps on.
    """
    _check(max_lr, warmup_steps, total_steps, min_lr)
    if step < 0:
        raise ConfigError(f"cosine_schedule: step must be >= 0, got {step}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    ratio = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


def _check(max_lr, warmup_steps, total_steps, min_lr) -> None:
    if not 0 <= min_lr <= max_lr:
        raise ConfigError(f"cosine_schedule: need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if not 0 <= warmup_steps <= total_steps or total_steps <= 0:
        raise ConfigError(f"cosine_schedule: need 0 <= warmup_steps <= total_steps and total_steps > 0, "
                         f"got warmup_steps={warmup_steps}, total_steps={total_steps}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """`cosine_schedule` with its settings bound; min_lr defaults to max_lr / 10 (Chinchilla)."""

    max_lr: float
    warmup_steps: int
    total_steps: int
    min_lr: float | None = None

    def __post_init__(self):
        if self.min_lr is None:
            object.__setattr__(self, "min_lr", self.max_lr / 10)
        _check(self.max_lr, self.warmup_steps, self.total_steps, self.min_lr)

    def __call__(self, step: int) -> float:
        return cosine_schedule(step, self.max_lr, self.warmup_steps, self.total_steps, self.min_lr)
