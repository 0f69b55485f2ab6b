"""Unit conversions. Names carry their units; nothing here does I/O."""

from __future__ import annotations

JOULES_PER_KWH = 3_600_000.0
LB_PER_MWH_TO_G_PER_KWH = 0.45359237  # 1 lb = 453.59237 g; per MWh -> per kWh divides by 1000


def emissions_g(joules: float, pue: float, g_per_kwh: float) -> float:
    """Operational emissions of an IT energy: kWh x PUE x intensity."""
    return joules / JOULES_PER_KWH * pue * g_per_kwh
