"""KL-weight schedules as pure functions of the training step (β-VAE and friends).

- "constant": β throughout (β = 1 is the plain VAE).
- "linear":   KL warm-up (Bowman et al. 2016): β·min(1, step / warmup_steps).
- "cyclical": cyclical annealing (Fu et al. 2019, https://arxiv.org/abs/1903.10145): the step axis is cut
              into cycles of `cycle_steps`; in each, β rises linearly from 0 to β over the first `ratio` of
              the cycle, then holds.
The capacity objective of Burgess et al. 2018 (https://arxiv.org/abs/1804.03599) is `capacity_at`: the
target KL C rises linearly from 0 to `capacity_max` over `capacity_steps`, and the loss becomes
recon + β·|KL − C|.
"""

from __future__ import annotations

import math

from vaelab.config import KL_SCHEDULES as SCHEDULES
from vaelab.config import LR_SCHEDULES


def beta_at(step: int, *, beta: float, schedule: str = "constant", warmup_steps: int = 0,
            cycle_steps: int = 0, ratio: float = 0.5) -> float:
    """The KL weight at `step` (0-based count of optimizer steps already taken)."""
    if schedule == "constant":
        return float(beta)
    if schedule == "linear":
        if warmup_steps <= 0:
            return float(beta)
        return float(beta) * min(1.0, step / warmup_steps)
    if schedule == "cyclical":
        if cycle_steps <= 0:
            return float(beta)
        pos = (step % cycle_steps) / cycle_steps  # position in the current cycle, in [0, 1)
        return float(beta) * min(1.0, pos / ratio)
    raise ValueError(f"unknown KL schedule {schedule!r}; choose one of {list(SCHEDULES)}")


def capacity_at(step: int, *, capacity_max: float, capacity_steps: int) -> float:
    """Burgess et al.'s target KL C(step), in nats: linear from 0 to capacity_max, then constant."""
    if capacity_steps <= 0:
        return float(capacity_max)
    return float(capacity_max) * min(1.0, step / capacity_steps)


def lr_at(step: int, *, lr: float, schedule: str = "constant", total_steps: int = 0, lr_min: float = 0.0) -> float:
    """The learning rate for optimizer step `step` (0-based): constant, or cosine annealing (Loshchilov &
    Hutter 2017, without restarts) from lr at step 0 to lr_min at step total_steps. A pure function of the
    step, so a resumed run continues on the same curve with no scheduler state to save."""
    if schedule == "constant" or total_steps <= 0:
        return float(lr)
    if schedule == "cosine":
        t = min(1.0, step / total_steps)
        return float(lr_min) + 0.5 * (float(lr) - float(lr_min)) * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {list(LR_SCHEDULES)}")
