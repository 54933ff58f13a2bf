"""How a run's settings change from round to round: its progress, and the half-cosine decay
that the learning rate ("cosine" schedule) and slice-unet's focus share follow (large early,
to learn fast and find rare structures; small at the end, so the final model is trained at
the data's true proportions, with little noise)."""

from __future__ import annotations

import math


def run_progress(round_: int, total_rounds: int) -> float:
    """How far a run is when its round `round_` (1-based) of `total_rounds` starts: 0 in the
    first round, (r - 1) / R in round r (0 when the total is unknown, i.e. 0)."""
    return min(max(round_ - 1, 0), total_rounds) / max(total_rounds, 1)


def cosine_decay(progress: float) -> float:
    """1 at progress 0, along a half cosine to 0 at progress 1 (clamped to [0, 1])."""
    progress = min(max(float(progress), 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
