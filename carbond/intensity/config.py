"""The ``intensity`` config section (see docs/architecture.md and the README).

Kept apart from :mod:`carbond.config` so the providers can import it without a cycle. Secrets are named by a file or
an environment variable, never written in the config itself, and never logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ProviderName = Literal["electricitymaps", "watttime", "ukgrid", "static"]
#: The signal each provider gives; a chain entry whose signal differs from ``intensity.signal`` is exported but
#: never used for the emissions counters.
PROVIDER_SIGNAL: dict[str, Literal["average", "marginal"]] = {
    "electricitymaps": "average",
    "watttime": "marginal",
    "ukgrid": "average",
    "static": "average",
}


#: Defaults of the keys below, shared with the classes they configure (the cache, the providers' HTTP GETs).
REFRESH_S = 900.0
MAX_AGE_S = 21_600.0
RETRY_MIN_S = 15.0
TIMEOUT_S = 10.0


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value.rstrip("/")


class _Secret(_Section):
    """Exactly one way to find a secret: a file (re-read before each use, so rotation works) or a variable."""

    def _secret_pair(self, file: Path | None, env: str | None, what: str) -> None:
        if file is not None and env is not None:
            raise ValueError(f"set either {what}_file or {what}_env, not both")


class ElectricityMapsConfig(_Secret):
    base_url: str = "https://api.electricitymap.org"
    token_file: Path | None = None
    token_env: Annotated[str, Field(min_length=1)] | None = None
    zone: Annotated[str, Field(min_length=1, max_length=64)] | None = None  # default: intensity.zone

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

    @model_validator(mode="after")
    def _one_secret(self) -> ElectricityMapsConfig:
        self._secret_pair(self.token_file, self.token_env, "token")
        return self


class WattTimeConfig(_Secret):
    base_url: str = "https://api.watttime.org"
    username: str = ""
    password_file: Path | None = None
    password_env: Annotated[str, Field(min_length=1)] | None = None
    region: Annotated[str, Field(min_length=1, max_length=64)] | None = None  # e.g. CAISO_NORTH; default: zone

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

    @model_validator(mode="after")
    def _one_secret(self) -> WattTimeConfig:
        self._secret_pair(self.password_file, self.password_env, "password")
        return self


class UkGridConfig(_Section):
    base_url: str = "https://api.carbonintensity.org.uk"
    region_id: Annotated[int, Field(ge=1, le=17)] | None = None  # regional figures; default: national (GB)
    postcode: Annotated[str, Field(min_length=2, max_length=8, pattern=r"^[A-Za-z0-9]+$")] | None = None  # outward

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

    @model_validator(mode="after")
    def _one_place(self) -> UkGridConfig:
        if self.region_id is not None and self.postcode is not None:
            raise ValueError("set either region_id or postcode, not both")
        return self


class MetadataConfig(_Section):
    """Instance-metadata base addresses for ``zone: auto`` (configurable for tests)."""

    aws_url: str = "http://169.254.169.254"
    gcp_url: str = "http://metadata.google.internal"
    azure_url: str = "http://169.254.169.254"
    timeout_secs: Annotated[float, Field(gt=0, le=10)] = 1.0

    @field_validator("aws_url", "gcp_url", "azure_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)


def _known_zone(value: str) -> str:
    """A zone the static tables can place (a country, a sub-zone of one, a cloud region, world), else ValueError
    with the closest known zones: a typo would silently fall to the world average."""
    from carbond.intensity.static import close_matches, lookup

    if lookup(value) is None:
        near = close_matches(value)
        raise ValueError(f"unknown zone {value!r}" + (f" (close matches: {', '.join(near)})" if near else ""))
    return value


class IntensityConfig(_Section):
    #: ISO 3166 alpha-2/3, a sub-zone (US-CA, CA-QC, SE3), a cloud region (aws:eu-west-3), "world", or "auto".
    zone: Annotated[str, Field(min_length=1, max_length=64)] = "world"
    fallback_zone: Annotated[str, Field(min_length=1, max_length=64)] = "world"  # when auto finds no cloud
    providers: Annotated[list[ProviderName], Field(min_length=1)] = ["static"]
    signal: Literal["average", "marginal"] = "average"
    override_g_per_kwh: Annotated[float, Field(ge=0, le=2000)] | None = None
    refresh_secs: Annotated[float, Field(ge=1, le=86_400)] = REFRESH_S
    max_age_secs: Annotated[float, Field(ge=1, le=30 * 86_400)] = MAX_AGE_S
    timeout_secs: Annotated[float, Field(gt=0, le=300)] = TIMEOUT_S
    retry_min_secs: Annotated[float, Field(gt=0, le=3600)] = RETRY_MIN_S  # first backoff delay; doubles up to refresh
    forecast: bool = True  # also fetch the next 24 h where the provider offers it
    electricitymaps: ElectricityMapsConfig = ElectricityMapsConfig()
    watttime: WattTimeConfig = WattTimeConfig()
    ukgrid: UkGridConfig = UkGridConfig()
    metadata: MetadataConfig = MetadataConfig()

    @field_validator("providers")
    @classmethod
    def _chain(cls, value: list[ProviderName]) -> list[ProviderName]:
        if len(set(value)) != len(value):
            raise ValueError("a provider is listed twice")
        if "static" in value and value[-1] != "static":
            raise ValueError("static never fails: it can only be the last of the chain")
        return value

    @field_validator("fallback_zone")
    @classmethod
    def _not_auto(cls, value: str) -> str:
        if value.strip().lower() == "auto":
            raise ValueError("the fallback of auto cannot be auto")
        return _known_zone(value)

    @field_validator("zone")
    @classmethod
    def _known(cls, value: str) -> str:
        return value if value.strip().lower() == "auto" else _known_zone(value)

    @model_validator(mode="after")
    def _consistent(self) -> IntensityConfig:
        if self.signal == "marginal" and not any(PROVIDER_SIGNAL[p] == "marginal" for p in self.providers):
            raise ValueError("signal: marginal needs a marginal provider in providers (watttime)")
        zone = self.zone.strip().lower()
        if "electricitymaps" in self.providers and not self.electricitymaps.zone and (zone == "auto" or ":" in zone):
            raise ValueError("electricitymaps.zone is required when zone is auto or a cloud region")
        return self
