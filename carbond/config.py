"""Typed, validated configuration (the contract in docs/architecture.md and the README).

Every key is optional; unknown keys are errors; every message names the file and the dotted key.
Only the composition root (:mod:`carbond.app`) reads the whole of it.

Each sensor backend owns its section's model (``rapl``, ``cpu`` for the TDP model, ``nvml`` ...): the sections are
added to :class:`Config` from the backend table (:mod:`carbond.sensors`), so a new backend needs no line here.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from carbond import sensors as backends
from carbond.attribution.attributor import MAX_CGROUPS, RETENTION_S
from carbond.attribution.kubernetes import REFRESH_S as PODS_REFRESH_S
from carbond.attribution.labels import Granularity, LabelsConfig, SlurmLabel, UnitRule
from carbond.embodied import EmbodiedConfig
from carbond.errors import ConfigError
from carbond.intensity.config import IntensityConfig
from carbond.sensors.base import Settings
from carbond.slurm.spool import SPOOL_DIR

DEFAULT_LISTEN = "127.0.0.1:9875"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    sysfs: Path = Path("/sys")
    procfs: Path = Path("/proc")
    cgroupfs: Path = Path("/sys/fs/cgroup")


class WebSection(_Section):
    config_file: Path | None = None  # exporter-toolkit web config: TLS and basic auth (re-read on SIGHUP)
    max_connections: Annotated[int, Field(ge=8, le=65_536)] = 1024  # beyond: the least useful one is evicted


class KubernetesConfig(_Section):
    """Pod names for the cgroup series (see carbond/attribution/kubernetes.py for the RBAC each source needs)."""

    enabled: bool = False
    source: Literal["apiserver", "kubelet"] = "apiserver"
    node_name: str = ""  # default: $NODE_NAME, else the host name
    api_url: str | None = None  # default: in-cluster $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT
    kubelet_url: str | None = None  # default: https://$HOST_IP:10250
    token_file: Path | None = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    ca_file: Path | None = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    insecure_skip_tls_verify: bool = False
    refresh_secs: Annotated[float, Field(ge=1, le=3600)] = PODS_REFRESH_S

    @field_validator("api_url", "kubelet_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value


class SlurmLedgerConfig(_Section):
    """``attribution.slurm.ledger``: the per-job ledger (JSON lines, rotated) written at each job's end."""

    dir: Path | None = None  # default: <state_dir>/slurm
    max_bytes: Annotated[int, Field(ge=4096, le=1 << 40)] = 16 * 1024 * 1024  # rotate beyond this size
    keep: Annotated[int, Field(ge=1, le=1000)] = 5  # rotated files kept


class SlurmConfig(_Section):
    """``attribution.slurm``: Slurm job labels on the cgroup series, from the Prolog's spool (carbond/slurm)."""

    enabled: bool = False
    spool_dir: Path = SPOOL_DIR
    labels: list[SlurmLabel] = Field(default_factory=list)  # optional slurm_account, slurm_partition
    ledger: SlurmLedgerConfig = SlurmLedgerConfig()

    @field_validator("labels")
    @classmethod
    def _once(cls, value: list[SlurmLabel]) -> list[SlurmLabel]:
        if len(set(value)) != len(value):
            raise ValueError("a label is listed twice")
        return value


class AttributionConfig(_Section):
    enabled: bool = True  # where a readable cgroup hierarchy exists
    max_cgroups: Annotated[int, Field(ge=1, le=100_000)] = MAX_CGROUPS
    retention_secs: Annotated[float, Field(ge=0, le=86_400)] = RETENTION_S
    kubernetes: KubernetesConfig = KubernetesConfig()
    granularity: Granularity = "container"  # container | pod | namespace (carbond/attribution/labels.py)
    labels: LabelsConfig = LabelsConfig()  # Kubernetes labels copied onto the cgroup series
    units: list[UnitRule] = Field(default_factory=list)  # systemd unit globs -> team/project, first match wins
    slurm: SlurmConfig = SlurmConfig()


class Config(_Section):
    host_name: str = ""
    measure_power_secs: Annotated[float, Field(ge=0.1, le=3600)] = 15.0
    sensor_timeout_secs: Annotated[float, Field(gt=0, le=3600)] | None = None
    pue: Annotated[float, Field(ge=1.0, le=5.0)] = 1.0
    #: Standard uncertainty of the PUE (absolute, e.g. 0.05 for 1.4 +- 0.05); 0 takes the PUE as exact.
    pue_uncertainty: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    listen_address: str = DEFAULT_LISTEN
    state_dir: Path | None = None
    paths: PathsConfig = PathsConfig()
    #: hwmon first: a wall meter (ACPI power meter, PMBus supplies) is found where the machine has one, quietly
    #: absent elsewhere; the BMC, UPS and plug sensors need an address and are named explicitly.
    sensors: list[str] = Field(
        default_factory=lambda: ["hwmon", "rapl", "nvml", "amdsmi", "powermetrics", "tdp", "ram"]
    )
    intensity: IntensityConfig = IntensityConfig()
    web: WebSection = WebSection()
    attribution: AttributionConfig = AttributionConfig()
    embodied: EmbodiedConfig = EmbodiedConfig()

    @field_validator("sensors")
    @classmethod
    def _known_sensors(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one sensor")
        for name in value:
            if name not in backends.BACKENDS:
                raise ValueError(f"unknown sensor {name!r} (known: {', '.join(backends.BACKENDS)})")
        if len(set(value)) != len(value):
            raise ValueError("a sensor is listed twice")
        return value

    @field_validator("listen_address")
    @classmethod
    def _listen(cls, value: str) -> str:
        split_listen_address(value)
        return value

    def advisories(self) -> list[str]:
        """Valid but likely wrong settings, for ``check-config`` and the daemon's start-up log."""
        out = []
        wall = [n for n in self.sensors if "platform" in backends.load(n).classes and n != "fake"]
        if wall and self.pue > 2.0:
            out.append(
                f"pue: {self.pue:g} with a platform sensor ({', '.join(wall)}) that measures at the wall: the PUE "
                "must then be the facility's alone (cooling, power distribution outside the machine), typically "
                "1.1-1.6; fans and power supply losses are already in the measured figure"
            )
        return out

    def backend_settings(self, name: str) -> Settings:
        """The config section of sensor backend ``name`` (its model is the backend's own)."""
        section: Settings = dict(self)[backends.BACKENDS[name].section]
        return section

    def resolved_host(self) -> str:
        """``host_name``, else ``$NODE_NAME``, else the hostname."""
        return self.host_name or os.environ.get("NODE_NAME", "") or socket.gethostname()

    def resolved_state_dir(self) -> Path:
        """``state_dir``, else systemd's $STATE_DIRECTORY, else /var/lib/carbond for root, else ~/.local/state."""
        if self.state_dir is not None:
            return self.state_dir
        if os.environ.get("STATE_DIRECTORY"):
            return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
        if os.geteuid() == 0:
            return Path("/var/lib/carbond")
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local/state")
        return Path(base) / "carbond"

    def sensor_timeout(self) -> float:
        if self.sensor_timeout_secs is not None:
            return min(self.sensor_timeout_secs, self.measure_power_secs)
        return min(5.0, 0.8 * self.measure_power_secs)


def _with_backend_sections(base: type[Config]) -> type[Config]:
    """``base`` with one field per backend section, typed by the backend's settings model."""
    fields: dict[str, Any] = {}
    for name, ref in backends.BACKENDS.items():
        model = backends.load(name).settings
        fields[ref.section] = (model, model())
    return create_model(base.__name__, __base__=base, __module__=__name__, **fields)


if not TYPE_CHECKING:  # type checkers see the core fields; sections are reached through backend_settings()
    Config = _with_backend_sections(Config)


def split_listen_address(value: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` -> (host, port); ValueError with the reason. An empty host (as in
    Go's ``:9100``) and ``::`` mean every address of both families; ``0.0.0.0`` means every IPv4 address only."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{value!r} is not host:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, as in [::]:{port}")
    return host, port


def _key(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def problems(exc: ValidationError) -> list[tuple[str, str]]:
    """(dotted key, message) for every error pydantic found; unknown keys say so."""
    return [(_key(e["loc"]), "unknown key" if e["type"] == "extra_forbidden" else e["msg"]) for e in exc.errors()]


M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML document of ``path`` (None when empty); ConfigError naming the file when it cannot be read
    or is not YAML. ``what`` names the file's role in the message ("config", "web config" ...)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [("", f"cannot read {what}: {exc}")]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"invalid YAML in {what}: {exc}")]) from None


def load_model(path: Path, model: type[M], what: str) -> M:
    """Read a YAML file into a strict pydantic model; ConfigError naming the file and every bad key."""
    data = read_yaml(path, what)
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise ConfigError(str(path), problems(exc)) from None


def parse(data: Any, source: str = "<config>") -> Config:
    """Validate a parsed YAML document; raise ConfigError naming every bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [("", f"the document must be a mapping of keys, not {type(data).__name__}")])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, problems(exc)) from None


def load(path: str | Path | None) -> Config:
    """Read and validate a YAML config file; None gives the embedded defaults."""
    if path is None:
        return Config()
    return parse(read_yaml(path, "config"), str(path))
