"""A UPS through Network UPS Tools: what the UPS feeding this machine delivers, read from ``upsd`` over TCP.

The protocol (NUT developer guide, "Network protocol information"; port 3493) is one line per command; answers put
multi-word elements in double quotes, with ``\\"`` and ``\\\\`` escaped. We send ``USERNAME`` and ``PASSWORD`` when
configured (the password comes from ``password_file``, never from the config itself), ``LIST UPS`` at start to find
the UPS, ``LIST VAR <ups>`` at each poll (every variable in one round trip) and ``LOGOUT`` at close. One connection is
kept open and reopened after any error; a kept connection found closed (upsd restarted) is retried at once on a new
one. ``ERR DATA-STALE`` (the driver lost the UPS) is a failed sample with reason ``stale``, never the previous value
again; ``ERR DRIVER-NOT-CONNECTED`` and an unreachable upsd are failed samples too.

The machine's draw, the first figure the UPS reports:

1. ``ups.realpower`` (W);
2. ``outlet.realpower`` (W, the outlets' total, on devices that report it instead);
3. ``ups.power`` (VA) x the power factor the UPS reports (``output.powerfactor``, ``outlet.powerfactor``);
4. ``ups.load`` (%) x ``ups.realpower.nominal`` (W);
5. ``ups.power`` (VA) x ``power_factor`` (config; default 0.9, typical of servers' PFC power supplies);
6. ``ups.load`` (%) x ``ups.power.nominal`` (VA) x ``power_factor``.

Figures 3 to 6 are estimates: the device's ``method`` names how (``ups.load x ups.realpower.nominal (estimated)``)
and its readings are marked not measured. ``ups.realpower.nominal`` is otherwise only a bound (a value above 1.5
times the rating is rejected as implausible), never a reading. When the chosen variable is 0, negative or not a
number, the sample is rejected with that reason; there is no quiet fall back to a coarser figure.

Whose draw: a UPS's output is what its loads draw. By default **the whole UPS output is charged to this machine**,
which is right only for a UPS that feeds nothing else; a warning at start says so. For a UPS shared with other
machines, set ``outlet`` (the id of the outlet this machine is plugged into: ``outlet.<id>.realpower``, else
``outlet.<id>.power`` x that outlet's power factor, else x ``power_factor``) or ``share`` (this machine's fraction
of the output, which makes the figure an estimate). ``input.realpower`` is never used: it adds the UPS's own losses
and battery charging, which are facility overhead (PUE), not IT power; ``carbond probe`` shows it for reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.logs import get_logger
from carbond.model import SensorRead
from carbond.procfs import HostSample
from carbond.sensors.base import Backend, Clock, Context
from carbond.sensors.platform import PlatformSensor, PlatformSettings, Rejected, Sample, watts

log = get_logger("carbond.sensors.ups")

DEFAULT_PORT = 3493
#: Real power over apparent power assumed when the UPS reports no power factor (servers' PFC supplies: 0.9 to 0.99).
DEFAULT_POWER_FACTOR = 0.9
#: A UPS carries some overload for seconds before it trips; a reading beyond this many times its rating is garbage.
OVERLOAD = 1.5
#: Bound on one listing (an ePDU with many outlets has a few hundred variables).
MAX_LIST = 5000
NAME = r"^[^\s\"\\]+$"  # a NUT name: one word, so it can never inject a second command

#: What upsd's error codes mean for us (the rest are shown as they are).
ERRORS = {
    "UNKNOWN-UPS": "upsd does not serve this UPS",
    "DATA-STALE": "the data is stale (the driver lost the UPS)",
    "DRIVER-NOT-CONNECTED": "upsd has no connection to the UPS's driver (driver not running?)",
    "ACCESS-DENIED": "access denied (check username, password_file and upsd.users)",
    "INVALID-USERNAME": "upsd rejected the username",
    "INVALID-PASSWORD": "upsd rejected the password",
}


class UpsSettings(PlatformSettings):
    """The ``ups`` config section (plus interval_s, timeout_s, max_watts from PlatformSettings)."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = DEFAULT_PORT
    ups: Annotated[str, Field(pattern=NAME)] | None = None  # default: the only UPS upsd serves
    username: Annotated[str, Field(pattern=NAME)] | None = None
    password_file: Path | None = None  # the password, alone in a file (a trailing newline is ignored)
    power_factor: Annotated[float, Field(gt=0, le=1)] = DEFAULT_POWER_FACTOR  # W per VA when the UPS gives none
    outlet: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")] | None = None  # the outlet this machine uses
    share: Annotated[float, Field(gt=0, le=1)] = 1.0  # this machine's fraction of the UPS output

    @model_validator(mode="after")
    def _consistent(self) -> UpsSettings:
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs username")
        if self.outlet is not None and self.share != 1.0:
            raise ValueError("set outlet or share, not both (an outlet is already this machine's part)")
        return self


class NutError(Exception):
    """upsd answered ``ERR <code>``; the connection is still usable."""

    def __init__(self, code: str) -> None:
        self.code = code
        super().__init__(f"ERR {code}: {ERRORS.get(code, 'upsd refused the command')}")


class ProtocolError(Exception):
    """An answer that is not NUT's protocol: the stream is out of step, the connection is dropped."""


def split_words(line: str) -> list[str]:
    """One protocol line as words: double quotes group, a backslash escapes the next character."""
    words: list[str] = []
    cur: list[str] = []
    in_word = quoted = escaped = False
    for ch in line.rstrip("\r\n"):
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = in_word = True
        elif ch == '"':
            quoted, in_word = not quoted, True
        elif ch in " \t" and not quoted:
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
        else:
            cur.append(ch)
            in_word = True
    if quoted or escaped:
        raise ProtocolError(f"unterminated quote in {line[:80]!r}")
    if in_word:
        words.append("".join(cur))
    return words


def _quote(word: str) -> str:
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


class NutClient:
    """One upsd connection, opened on first use and reopened after any error."""

    def __init__(
        self, host: str, port: int, timeout_s: float, username: str | None = None, password: str | None = None
    ) -> None:
        self.where = f"upsd at {host}:{port}"
        self._host, self._port, self._timeout = host, port, timeout_s
        self._username, self._password = username, password
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def list_ups(self) -> dict[str, str]:
        """UPS name -> description."""
        return {w[1]: w[2] if len(w) > 2 else "" for w in await self._command("LIST UPS", list_of="UPS") if len(w) > 1}

    async def list_var(self, ups: str) -> dict[str, str]:
        """Every variable of ``ups``: name -> value."""
        rows = await self._command(f"LIST VAR {ups}", list_of=f"VAR {ups}")
        return {w[2]: w[3] for w in rows if len(w) > 3 and w[0] == "VAR"}

    async def _command(self, line: str, list_of: str) -> list[list[str]]:
        """Send ``line``; the rows of its ``BEGIN LIST <list_of>`` answer. A kept connection that turns out closed is
        replaced once; a timeout or a cancellation mid-exchange drops the connection (the stream is out of step)."""
        for attempt in range(2):
            reused = self._conn is not None
            try:
                async with asyncio.timeout(self._timeout):
                    if self._conn is None:
                        await self._connect()
                    return await self._exchange(line, list_of)
            except NutError:
                raise
            except TimeoutError:
                self.drop()
                raise SensorReadError(f"{self.where}: no answer within {self._timeout} s") from None
            except (OSError, asyncio.IncompleteReadError, ProtocolError, ValueError) as exc:
                self.drop()
                if reused and attempt == 0:
                    continue
                why = "connection refused (upsd not running there?)" if isinstance(exc, ConnectionRefusedError) else exc
                raise SensorReadError(f"{self.where}: {why or type(exc).__name__}") from None
            except BaseException:
                self.drop()
                raise
        raise AssertionError("unreachable")

    async def _connect(self) -> None:
        self._conn = await asyncio.open_connection(self._host, self._port)
        try:
            if self._username is not None:
                await self._simple(f"USERNAME {_quote(self._username)}")
            if self._password is not None:
                await self._simple(f"PASSWORD {_quote(self._password)}")
        except NutError:
            self.drop()
            raise

    async def _simple(self, line: str) -> None:
        """A command answered ``OK``: its text never appears in an error (it may hold the password)."""
        words = await self._send(line)
        if words[:1] != ["OK"]:
            raise ProtocolError(f"unexpected answer to {line.split()[0]}: {' '.join(words)[:80]!r}")

    async def _send(self, line: str) -> list[str]:
        assert self._conn is not None
        _, writer = self._conn
        writer.write(line.encode() + b"\n")
        await writer.drain()
        words = await self._line()
        if words[:1] == ["ERR"]:
            raise NutError(words[1] if len(words) > 1 else "UNKNOWN")
        return words

    async def _line(self) -> list[str]:
        assert self._conn is not None
        raw = await self._conn[0].readline()
        if not raw.endswith(b"\n"):
            raise ConnectionResetError("upsd closed the connection")
        return split_words(raw.decode("utf-8", errors="replace"))

    async def _exchange(self, line: str, list_of: str) -> list[list[str]]:
        head = await self._send(line)
        if head != ["BEGIN", "LIST", *list_of.split()]:
            raise ProtocolError(f"unexpected answer to {line.split()[0]} {line.split()[1]}: {' '.join(head)[:80]!r}")
        rows: list[list[str]] = []
        end = ["END", "LIST", *list_of.split()]
        while (words := await self._line()) != end:
            rows.append(words)
            if len(rows) > MAX_LIST:
                raise ProtocolError(f"more than {MAX_LIST} rows")
        return rows

    def drop(self) -> None:
        if self._conn is not None:
            self._conn[1].transport.abort()
            self._conn = None

    async def close(self) -> None:
        """``LOGOUT`` (best effort, briefly), then close."""
        if self._conn is None:
            return
        _, writer = self._conn
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):  # best effort: upsd may be gone
            async with asyncio.timeout(min(self._timeout, 1.0)):
                writer.write(b"LOGOUT\n")
                await writer.drain()
                await self._conn[0].readline()
                writer.close()
                await writer.wait_closed()
        self.drop()


@dataclasses.dataclass(frozen=True, slots=True)
class Power:
    watts: float
    method: str
    estimated: bool


def _number(variables: Mapping[str, str], key: str) -> float:
    raw = variables[key]
    try:
        return float(raw)
    except ValueError:
        raise Rejected("format", f"{key} = {raw[:40]!r} is not a number") from None


def _checked(value: float, method: str, estimated: bool, bound: float) -> Power:
    try:
        return Power(watts(value, bound), method + (" (estimated)" if estimated else ""), estimated)
    except Rejected as exc:
        raise Rejected(exc.reason, f"{method}: {exc.detail}") from None


def machine_power(
    variables: Mapping[str, str],
    *,
    power_factor: float,
    max_watts: float,
    outlet: str | None = None,
    share: float = 1.0,
) -> Power:
    """The machine's draw from one ``LIST VAR`` (the order and rules in the module docstring); :class:`Rejected` when
    the chosen figure is unusable, :class:`SensorReadError` when the UPS reports none."""
    v = variables
    bound = max_watts
    if "ups.realpower.nominal" in v:
        with contextlib.suppress(Rejected):  # a garbage rating is no bound (and fails where it is a factor)
            if (nominal := _number(v, "ups.realpower.nominal")) > 0:
                bound = min(bound, OVERLOAD * nominal)
    pf = next((k for k in ("output.powerfactor", "outlet.powerfactor") if k in v), None)
    if outlet is not None:
        p = f"outlet.{outlet}."
        opf = f"{p}powerfactor"
        if f"{p}realpower" in v:
            return _checked(_number(v, f"{p}realpower"), f"{p}realpower", False, bound)
        if f"{p}power" in v and opf in v:
            return _checked(_number(v, f"{p}power") * _number(v, opf), f"{p}power x {opf}", True, bound)
        if f"{p}power" in v:
            return _checked(
                _number(v, f"{p}power") * power_factor, f"{p}power x power_factor {power_factor}", True, bound
            )
        raise SensorReadError(f"outlet {outlet} reports neither {p}realpower nor {p}power")
    if "ups.realpower" in v:
        found = _checked(_number(v, "ups.realpower"), "ups.realpower", False, bound)
    elif "outlet.realpower" in v:
        found = _checked(_number(v, "outlet.realpower"), "outlet.realpower", False, bound)
    elif "ups.power" in v and pf is not None:
        found = _checked(_number(v, "ups.power") * _number(v, pf), f"ups.power x {pf}", True, bound)
    elif "ups.load" in v and "ups.realpower.nominal" in v:
        w = _number(v, "ups.load") / 100 * _number(v, "ups.realpower.nominal")
        found = _checked(w, "ups.load x ups.realpower.nominal", True, bound)
    elif "ups.power" in v:
        found = _checked(
            _number(v, "ups.power") * power_factor, f"ups.power x power_factor {power_factor}", True, bound
        )
    elif "ups.load" in v and "ups.power.nominal" in v:
        w = _number(v, "ups.load") / 100 * _number(v, "ups.power.nominal") * power_factor
        found = _checked(w, f"ups.load x ups.power.nominal x power_factor {power_factor}", True, bound)
    else:
        raise SensorReadError(
            "the UPS reports none of ups.realpower, outlet.realpower, ups.power, ups.load with ups.realpower.nominal "
            "or ups.power.nominal"
        )
    if share == 1.0:
        return found
    method = found.method.removesuffix(" (estimated)")
    return Power(found.watts * share, f"{method} x share {share} (estimated)", True)


def _read_secret(path: Path) -> str:
    return path.read_text().rstrip("\r\n")


class UpsSource:
    """The :class:`~carbond.sensors.platform.Source` of one UPS."""

    name = "ups"
    min_interval_s = 0.5  # upsd answers from its memory; the driver refreshes every 2 s by default

    def __init__(self, settings: UpsSettings) -> None:
        self._settings = settings
        self._client: NutClient | None = None
        self.ups = settings.ups or ""
        self.device = ""
        self.model = ""
        self.method = ""  # how the last accepted figure was found
        self.estimated = False

    async def open(self) -> str:
        s = self._settings
        password = None
        if s.password_file is not None:
            try:
                password = await asyncio.to_thread(_read_secret, s.password_file)
            except OSError as exc:
                why = f"cannot read password_file {s.password_file}: {exc.strerror}"
                raise SensorUnavailable(self.name, why) from None
        client = NutClient(s.host, s.port, s.timeout_s, s.username, password)
        try:
            self.ups = await self._find(client)
            variables = await client.list_var(self.ups)
        except (SensorReadError, NutError) as exc:
            await client.close()
            raise SensorUnavailable(self.name, f"{client.where}: {exc}") from None
        self._client = client
        if s.outlet is not None and not any(k.startswith(f"outlet.{s.outlet}.") for k in variables):
            await self.close()
            outlets = sorted({k.split(".")[1] for k in variables if k.count(".") >= 2 and k.startswith("outlet.")})
            raise SensorUnavailable(self.name, f"UPS {self.ups!r} has no outlet {s.outlet!r} (outlets: {outlets})")
        self.device = f"ups-{self.ups}" + (f"-outlet-{s.outlet}" if s.outlet else "")
        self.model = " ".join(variables.get(k, "") for k in ("device.mfr", "device.model")).strip() or "UPS"
        if s.outlet is None and s.share == 1.0:
            log.warning(
                "ups_whole_output_charged",
                sensor=self.name,
                ups=self.ups,
                detail="the whole UPS output is charged to this machine; if the UPS feeds other machines too, set "
                "ups.outlet (the outlet this machine is plugged into) or ups.share (its fraction)",
            )
        extra = (
            f", input.realpower {variables['input.realpower']} W not charged" if "input.realpower" in variables else ""
        )
        return f"{client.where}, UPS {self.ups!r} ({self.model}){extra}"

    async def _find(self, client: NutClient) -> str:
        upses = await client.list_ups()
        if self._settings.ups is not None:
            if self._settings.ups not in upses:
                raise SensorReadError(
                    f"no UPS {self._settings.ups!r} (it serves: {', '.join(sorted(upses)) or 'none'})"
                )
            return self._settings.ups
        if len(upses) != 1:
            names = ", ".join(sorted(upses)) or "none"
            raise SensorReadError(f"serves {len(upses)} UPSes ({names}): name the one to read in ups.ups")
        return next(iter(upses))

    async def sample(self) -> Mapping[str, Sample]:
        if self._client is None:
            raise SensorReadError("ups: not open")
        s = self._settings
        try:
            variables = await self._client.list_var(self.ups)
        except NutError as exc:
            if exc.code == "DATA-STALE":
                raise Rejected("stale", f"upsd: UPS {self.ups!r}: {ERRORS['DATA-STALE']}") from None
            raise SensorReadError(f"{self._client.where}: UPS {self.ups!r}: {exc}") from None
        found = machine_power(
            variables, power_factor=s.power_factor, max_watts=s.max_watts, outlet=s.outlet, share=s.share
        )
        if found.method != self.method:
            log.info("ups_power_method", sensor=self.name, ups=self.ups, method=found.method)
        self.method, self.estimated = found.method, found.estimated
        return {self.device: Sample(watts=found.watts)}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


class UpsSensor(PlatformSensor):
    """The platform poller, with the UPS's model and how its figure is found (estimated or not) on its device."""

    def __init__(self, source: UpsSource, settings: UpsSettings, clock: Clock) -> None:
        super().__init__(source, settings, clock, model="UPS")
        self._ups = source

    async def read(self, host: HostSample) -> SensorRead:
        got = await super().read(host)
        src = self._ups
        readings = tuple(dataclasses.replace(r, measured=not src.estimated) for r in got.readings)
        info = tuple(dataclasses.replace(i, model=src.model or i.model, method=src.method) for i in got.device_info)
        return dataclasses.replace(got, readings=readings, device_info=info)


def create(settings: UpsSettings, ctx: Context) -> UpsSensor:
    return UpsSensor(UpsSource(settings), settings, ctx.clock)


BACKEND = Backend(frozenset({"platform"}), UpsSettings, create)
