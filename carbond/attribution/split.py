"""The pure split of one energy delta over weights, conserving the delta exactly (to rounding)."""

from __future__ import annotations

import math
from collections.abc import Mapping

IDLE = "(idle)"
UNATTRIBUTED = "(unattributed)"
OTHER = "(other)"


def split(delta_j: float, weights: Mapping[str, float], capacity: float) -> dict[str, float]:
    """Share ``delta_j`` in proportion to ``weights`` out of ``capacity``; what the weights do not cover is
    ``(unattributed)``. When the weights exceed the capacity (counters read at slightly different times) they are
    scaled down to it. The parts always sum to ``delta_j``: the rounding remainder goes to ``(unattributed)``.
    """
    values = weights.values()
    total = math.fsum(values) if weights and min(values) > 0 else math.nan
    positive = weights
    if math.isnan(total):  # some weights do not count (zero, negative or NaN): leave them out
        positive = {key: w for key, w in weights.items() if w > 0}
        total = math.fsum(positive.values())
    parts: dict[str, float] = {}
    if delta_j > 0 and total > 0 and capacity > 0:
        scale = delta_j / max(total, capacity)
        parts = dict(zip(positive, map(scale.__mul__, positive.values()), strict=True))  # w * scale, in C
    parts[UNATTRIBUTED] = parts.get(UNATTRIBUTED, 0.0) + (delta_j - math.fsum(parts.values()))
    return parts


def split_cpu(delta_j: float, busy_share: float, usage: Mapping[str, float], busy_capacity: float) -> dict[str, float]:
    """CPU energy: the idle share to ``(idle)``, the active share by CPU time over the busy time available."""
    busy_share = min(max(busy_share, 0.0), 1.0)
    active = delta_j * busy_share
    parts = split(active, usage, busy_capacity)
    parts[IDLE] = delta_j - active
    return parts
