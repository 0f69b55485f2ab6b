"""What the machine draws at the wall, from its BMC over IPMI (device kind ``platform``), through ``pyghmi``.

- Out-of-band: IPMI 2.0 RMCP+ ("lanplus") to ``ipmi.host``:``ipmi.port`` (623) as ``ipmi.username``, with the
  password read from ``ipmi.password_file`` (re-read at every login, so a rotated password is picked up; never on a
  command line, in a log line, an error or a metric). ``ipmi.privilege`` defaults to ``user``, the least the power
  commands need. In-band (no ``host``): the local BMC through the kernel's OS interface, ``/dev/ipmi0`` (modules
  ``ipmi_si`` and ``ipmi_devintf``; root or read-write access to the device node).
- Method (``ipmi.method``, default ``auto``): DCMI Get Power Reading where the BMC answers it with an active
  reading, else SDR sensors in watts (which ones: ``ipmi.sensors``, or the rule in :mod:`carbond.sensors.ipmi_dcmi`).
  The choice is made once, at start, and ``carbond probe`` shows it with the reason DCMI was not used.
- pyghmi (the ``ipmi`` extra) is imported in :meth:`IpmiSource.open`; its calls block, so each runs in a worker
  thread, one at a time (:class:`~carbond.sensors.base.BlockingCalls`). A failed call drops the session; the next
  poll logs in again. The platform frame (:mod:`carbond.sensors.platform`) polls, checks and integrates.

Tested against OpenIPMI's ``ipmi_sim`` (SDR path, lanplus, wrong password, a BMC that stops answering). ``ipmi_sim``
does not implement DCMI (it answers Get Power Reading with completion code 0xC1, invalid command), so the DCMI path is
tested against :mod:`carbond.testing.dcmi_fake`, which encodes the DCMI 1.5 response byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.logs import get_logger
from carbond.sensors.base import Backend, BlockingCalls, Context
from carbond.sensors.ipmi_dcmi import (
    CMD_GET_POWER_READING,
    CMD_GET_SENSOR_READING,
    NETFN_DCMI,
    NETFN_SENSOR,
    POWER_READING_REQUEST,
    DcmiUnsupported,
    SdrSensor,
    decode_power_reading,
    power_sample,
    select_sensors,
)
from carbond.sensors.platform import PlatformSensor, PlatformSettings, Rejected, Sample, watts

log = get_logger("carbond.sensors.ipmi")

NAME = "ipmi"
#: BMCs refresh their power reading about once a second; polling faster only loads the BMC.
MIN_INTERVAL_S = 1.0
#: Opening logs in, tries DCMI and reads the whole SDR, record by record: slow BMCs (and ipmi_sim, whose answers to
#: partial SDR reads pyghmi retries after ~0.7 s) take seconds. A BMC that never answers fails sooner: pyghmi gives
#: up on a login after about 5 s.
OPEN_TIMEOUT_S = 60.0
DEV_IPMI = "/dev/ipmi0"
PRIVILEGE = {"user": 2, "operator": 3, "administrator": 4}

#: Makes a pyghmi ``Command`` (or a fake of it); blocking, called in a worker thread. Arguments: the password.
Connect = Callable[[str], Any]


class IpmiSettings(PlatformSettings):
    """The ``ipmi`` config section."""

    host: Annotated[str, Field(min_length=1)] | None = None  # the BMC (lanplus); unset: the local BMC in-band
    port: Annotated[int, Field(ge=1, le=65535)] = 623
    username: str = ""
    password_file: Path | None = None  # required with host; its first line is the password
    privilege: Literal["user", "operator", "administrator"] = "user"
    method: Literal["auto", "dcmi", "sdr"] = "auto"
    sensors: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)  # SDR sensor names

    @model_validator(mode="after")
    def _credentials(self) -> IpmiSettings:
        if self.host is not None and self.password_file is None:
            raise ValueError("ipmi.host needs ipmi.password_file (the password is never put in the config)")
        if self.host is None and (self.username or self.password_file is not None):
            raise ValueError("ipmi.username and ipmi.password_file are for a BMC over the network: set ipmi.host")
        return self


def read_password(path: Path) -> str:
    """The first line of ``path`` (its line break dropped, spaces kept); SensorUnavailable without its content."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SensorUnavailable(NAME, f"cannot read password_file {path}: {type(exc).__name__}") from None
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o004:
            log.warning("ipmi_password_file_world_readable", path=str(path))
    return text.splitlines()[0] if text else ""


class IpmiSource:
    """The BMC's power through pyghmi (see the module docstring); ``connect`` replaces pyghmi in tests."""

    name = NAME
    min_interval_s = MIN_INTERVAL_S

    def __init__(self, settings: IpmiSettings, connect: Connect | None = None) -> None:
        self._settings = settings
        self._interval_s = max(settings.interval_s, MIN_INTERVAL_S)
        self._connect_fn = connect
        self._calls = BlockingCalls(NAME, grace_s=1.0)
        self._cmd: Any = None
        self._errors: tuple[type[BaseException], ...] = (OSError,)
        self._password = ""
        self._method: Literal["dcmi", "sdr"] = "dcmi"
        self._sdr: dict[str, tuple[SdrSensor, Any]] = {}  # device -> (sensor, pyghmi SDR entry)
        if settings.host is None:
            self.where = f"{DEV_IPMI} (in-band)"
        else:
            self.where = f"{settings.host}:{settings.port} (lanplus, user {settings.username!r})"

    # -- in the event loop

    async def open(self) -> str:
        try:
            errors = importlib.import_module("pyghmi.exceptions")
        except ImportError:
            raise SensorUnavailable(NAME, "pyghmi is not installed (pip install 'carbond[ipmi]')") from None
        self._errors = (errors.IpmiException, OSError)
        deadline = max(OPEN_TIMEOUT_S, self._settings.timeout_s)
        try:
            return await asyncio.wait_for(self._calls(self._open), deadline)
        except TimeoutError:
            raise SensorUnavailable(NAME, f"{self.where}: no answer within {deadline:g} s") from None
        except SensorReadError as exc:
            raise SensorUnavailable(NAME, f"{self.where}: {exc}") from None

    async def sample(self) -> Mapping[str, Sample]:
        return await self._calls(self._sample)

    async def close(self) -> None:
        cmd, self._cmd = self._cmd, None
        if cmd is None:
            return
        failures: tuple[type[BaseException], ...] = (TimeoutError, SensorReadError, *self._errors)
        try:
            await asyncio.wait_for(self._calls(_logout, cmd), self._settings.timeout_s)
        except failures as exc:
            log.info("ipmi_logout_failed", where=self.where, error=self._scrub(f"{type(exc).__name__}: {exc}"))

    # -- in a worker thread

    def _connect(self) -> Any:
        s = self._settings
        if s.password_file is not None:
            self._password = read_password(s.password_file)
        try:
            if self._connect_fn is not None:
                return self._connect_fn(self._password)
            command = importlib.import_module("pyghmi.ipmi.command")
            if s.host is None:
                return command.Command()
            return command.Command(
                bmc=s.host, userid=s.username, password=self._password, port=s.port, privlevel=PRIVILEGE[s.privilege]
            )
        except FileNotFoundError:
            raise SensorUnavailable(
                NAME, f"no {DEV_IPMI}: load ipmi_si and ipmi_devintf for the local BMC, or set ipmi.host"
            ) from None
        except PermissionError:
            raise SensorUnavailable(NAME, f"{DEV_IPMI}: permission denied (root or read-write access needed)") from None
        except self._errors as exc:
            raise SensorUnavailable(NAME, f"{self.where}: login failed: {self._describe(exc)}") from None

    def _open(self) -> str:
        self._cmd = self._connect()
        reasons: list[str] = []
        if self._settings.method != "sdr":
            unusable: tuple[type[BaseException], ...] = (DcmiUnsupported, Rejected, SensorReadError, *self._errors)
            try:
                sample = self._dcmi(self._cmd)["bmc"]
            except unusable as exc:
                reasons.append(f"DCMI power reading unusable ({self._describe(exc)})")
            else:
                self._method = "dcmi"
                average = f"average over {sample.period_s:g} s" if sample.period_s else "current reading"
                return f"{self.where}: DCMI power reading, {sample.watts:g} W ({average})"
            if self._settings.method == "dcmi":
                raise SensorUnavailable(NAME, f"{self.where}: {reasons[0]}")
        try:
            sdr = self._cmd.init_sdr()
            entries = {key: sdr.sensors[key] for key in sdr.get_sensor_numbers()}
            devices, how = select_sensors([_describe_entry(k, e) for k, e in entries.items()], self._settings.sensors)
        except LookupError as exc:
            reasons.append(str(exc))
            raise SensorUnavailable(NAME, f"{self.where}: " + "; ".join(reasons)) from None
        except Exception as exc:  # noqa: BLE001 - pyghmi raises KeyError, IndexError, NotImplementedError on records it cannot parse
            raise SensorUnavailable(NAME, f"{self.where}: reading the SDR failed: {self._describe(exc)}") from None
        self._method = "sdr"
        self._sdr = {device: (sensor, entries[sensor.key]) for device, sensor in devices.items()}
        names = ", ".join(repr(s.name) for s, _ in self._sdr.values())
        why = f" ({'; '.join(reasons)})" if reasons else ""
        return f"{self.where}: SDR sensor {names}, {how}{why}"

    def _sample(self) -> Mapping[str, Sample]:
        try:
            if self._cmd is None:
                self._cmd = self._connect()
            if self._method == "dcmi":
                return self._dcmi(self._cmd)
            return {device: self._sdr_reading(self._cmd, s, entry) for device, (s, entry) in self._sdr.items()}
        except (Rejected, SensorReadError):
            raise
        except SensorUnavailable as exc:  # a new login failed
            raise SensorReadError(exc.reason) from None
        except DcmiUnsupported as exc:
            raise SensorReadError(f"DCMI power reading failed: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - pyghmi's IpmiException, a socket error, a response it could not parse
            self._cmd = None  # the session is suspect: log in again at the next poll
            raise SensorReadError(f"{self.where}: {type(exc).__name__}: {self._describe(exc)}") from None

    def _dcmi(self, cmd: Any) -> dict[str, Sample]:
        rsp = cmd.raw_command(netfn=NETFN_DCMI, command=CMD_GET_POWER_READING, data=POWER_READING_REQUEST)
        reading = decode_power_reading(rsp.get("code", 0), rsp.get("data", b""), rsp.get("error", ""))
        return {"bmc": power_sample(reading, self._interval_s, self._settings.max_watts)}

    def _sdr_reading(self, cmd: Any, sensor: SdrSensor, entry: Any) -> Sample:
        rsp = cmd.raw_command(
            netfn=NETFN_SENSOR, command=CMD_GET_SENSOR_READING, rslun=entry.sensor_lun, data=(entry.sensor_number,)
        )
        if rsp.get("code"):
            raise SensorReadError(f"reading SDR sensor {sensor.name!r}: {rsp.get('error') or rsp['code']}")
        reading = entry.decode_sensor_reading(cmd, rsp["data"])
        if reading.unavailable:
            raise Rejected("unavailable", f"SDR sensor {sensor.name!r}: reading unavailable or scanning disabled")
        if reading.value is None:
            raise Rejected("format", f"SDR sensor {sensor.name!r} gave no numeric reading")
        return Sample(watts=watts(reading.value, self._settings.max_watts, reading.units))

    def _describe(self, exc: BaseException) -> str:
        text = str(exc)
        if text in ("", "None"):  # pyghmi's IpmiException(None): the BMC did not answer in time
            text = "no answer" if "IpmiException" in type(exc).__name__ else type(exc).__name__
        return self._scrub(text)

    def _scrub(self, text: str) -> str:
        """``text`` without the password (no library is known to echo it; this makes sure)."""
        return text.replace(self._password, "***") if self._password else text


def _describe_entry(key: str, entry: Any) -> SdrSensor:
    """The :class:`SdrSensor` of one pyghmi SDR entry (base unit "W" is unit code 6)."""
    rate = getattr(entry, "sensor_rate", "")
    plain = getattr(entry, "unit_mod", "") == "" and getattr(entry, "percent", "") == "" and not rate
    unit = getattr(entry, "unit_suffix", "")
    return SdrSensor(
        key, str(entry.name), str(entry.sensor_type), unit, getattr(entry, "baseunit", "") == "W" and plain
    )


def _logout(cmd: Any) -> None:
    session = cmd.ipmi_session
    if hasattr(session, "logout"):  # lanplus
        session.logout()
    elif hasattr(session, "ipmidev"):  # in-band: the device node
        session.ipmidev.close()


def create(settings: IpmiSettings, ctx: Context) -> PlatformSensor:
    return PlatformSensor(IpmiSource(settings), settings, ctx.clock, model="IPMI BMC")


BACKEND = Backend(frozenset({"platform"}), IpmiSettings, create)
