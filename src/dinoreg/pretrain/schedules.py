"""Training schedules as pure functions of the step (so a resumed run recomputes them exactly)."""

from __future__ import annotations

import math


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total``), constant after."""
    if total <= 0:
        return end
    t = min(max(step / total, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def warmup_cosine(step: int, total: int, warmup: int, peak: float, final: float) -> float:
    """Linear warm-up from ``peak/warmup`` to ``peak`` over ``warmup`` steps, then cosine to ``final``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step - warmup, total - warmup, peak, final)


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """Linear from ``start`` to ``end`` over ``warmup`` steps, ``end`` after."""
    if step >= warmup or warmup <= 0:
        return end
    return start + (end - start) * step / warmup
