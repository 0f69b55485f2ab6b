"""One exception tree for carbond.

CarbondError                 base of everything carbond raises on purpose
├── ConfigError              a config file or option is invalid (CLI exit 2); carries file, key, problem
├── SensorUnavailable        a sensor backend cannot run on this host; carries the reason shown by `probe`
├── SensorReadError          one read of an available sensor failed (counted, never fatal)
└── IntensityError           a carbon-intensity provider failed (the cache serves the last good value)
"""

from __future__ import annotations


class CarbondError(Exception):
    """Base class of carbond's own errors."""


class ConfigError(CarbondError):
    """Invalid configuration. ``problems`` lists (key, message) pairs; ``source`` is the file."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        text = "; ".join(f"{key}: {msg}" if key else msg for key, msg in problems)
        super().__init__(f"{source}: {text}")

    def lines(self) -> list[str]:
        return [f"{self.source}: {key}: {msg}" if key else f"{self.source}: {msg}" for key, msg in self.problems]


class SensorUnavailable(CarbondError):
    """The backend cannot run here; ``reason`` says exactly why (and how to fix it, where possible)."""

    def __init__(self, sensor: str, reason: str) -> None:
        self.sensor = sensor
        self.reason = reason
        super().__init__(f"{sensor}: {reason}")


class SensorReadError(CarbondError):
    """A read failed; the sensor stays configured and is marked down until it reads again."""


class IntensityError(CarbondError):
    """A grid-intensity provider returned nothing usable."""
