"""Redfish BMCs: what the whole machine draws, from the chassis power its BMC reports over HTTPS.

Discovery: ``GET /redfish/v1`` (the service root) -> its ``Chassis`` collection -> every chassis. For each chassis
the first figure it has, in this order, is the one used (chosen once in ``open``, so the method never flips between
a counter and a power reading, which would count an interval twice):

1. ``Chassis/{id}/EnvironmentMetrics`` ``EnergyJoules.Reading``, else ``EnergykWh.Reading`` when it has a
   fractional part (a whole number of kWh is taken for a counter far too coarse to use: 1 kWh is hours of a
   server's draw): the BMC's own energy counter;
2. ``EnvironmentMetrics`` ``PowerWatts.Reading``;
3. ``Chassis/{id}/PowerSubsystem`` -> ``PowerSupplies`` -> each ``Metrics``: the sum of ``InputPowerWatts`` (the
   wall side; ``PowerWatts`` where a BMC names it so; never the DC output, which misses the supplies' losses);
4. the older ``Chassis/{id}/Power`` most BMCs still serve: the first ``PowerControl`` entry whose
   ``PhysicalContext`` is not a component (CPU, memory, ...: sub-domains some BMCs list beside the total), its
   ``PowerConsumedWatts``, else ``PowerMetrics.AverageConsumedWatts`` as a mean over ``IntervalInMin``.
   The current draw comes first: the tick splits each interval's energy over the cgroups that ran in it, which a
   mean over minutes would smear.

Which chassis counts: the one whose power is the machine's. A chassis contained in another that also reports power
(``Links.ContainedBy`` / ``Links.Contains``: a GPU baseboard, a drive enclosure, a PSU shelf inside the server) is
part of it and never counted beside it. Of the outermost chassis with power, one linked to a ComputerSystem wins;
if several remain the sensor is unavailable and says which, rather than add up what may be two views of one
machine. ``chassis`` (an Id or an ``@odata.id``) names it explicitly (a blade in a shared enclosure names its own).

Auth: ``username`` with the password in ``password_file``. ``auth: session`` (the default) logs in by POST to the
SessionService's Sessions, sends ``X-Auth-Token``, logs in again once on a 401 and DELETEs the session at close;
``auth: basic`` sends HTTP basic auth. TLS is verified against ``ca_file`` or the system roots; ``verify_tls:
false`` turns that off only when set, with a warning. Every request has ``timeout_s``; a 429 or 503 with
Retry-After holds polling off for that long; the BMC is polled no faster than ``min_interval_s`` (many refresh
their power readings only every few seconds). The password never appears in a log line, an error or a metric.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeGuard

from pydantic import Field, field_validator, model_validator

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.logs import get_logger
from carbond.sensors.base import Backend, Context, Sensor
from carbond.sensors.platform import Backoff, PlatformSensor, PlatformSettings, Rejected, Sample, watts

if TYPE_CHECKING:  # aiohttp and yarl are heavy (bench/results.md): imported where a redfish sensor runs
    import aiohttp
    from yarl import URL

log = get_logger("carbond.sensors.redfish")


def parse_url(text: str) -> URL:
    """``text`` as a yarl URL, importing yarl (with aiohttp) only once a redfish setting or sensor needs it."""
    from yarl import URL

    return URL(text)


ROOT = "/redfish/v1"
SESSIONS = "/redfish/v1/SessionService/Sessions"  # the standard place, where the root does not link it
NO_RETRY_AFTER_429_S = 60.0  # a 429 without Retry-After: wait this long
MAX_BACKOFF_S = 3600.0
#: PowerControl contexts that are a part of the machine, not the whole of it
COMPONENTS = frozenset({"CPU", "CPUSubsystem", "Memory", "MemorySubsystem", "GPU", "GPUSubsystem", "StorageDevice",
                        "NetworkingDevice", "Accelerator", "ASIC", "FPGA", "Fan", "Backplane"})  # fmt: skip
Json = dict[str, Any]
Method = Literal["energy_joules", "energy_kwh", "env_power", "psu_power", "legacy"]


class RedfishSettings(PlatformSettings):
    """The ``redfish`` config section."""

    url: str = ""  # the BMC: https://bmc.example[:port]; /redfish/v1 is found from there
    username: str = ""  # empty: no credentials sent
    password_file: Path | None = None  # the password, alone in a file (a trailing newline is ignored)
    auth: Literal["session", "basic"] = "session"
    chassis: str = ""  # a chassis Id or @odata.id; empty: found as the module docstring says
    ca_file: Path | None = None  # PEM roots to verify the BMC's certificate; default: the system's
    verify_tls: bool = True  # false only when set explicitly (logged as a warning at start)
    min_interval_s: Annotated[float, Field(ge=0, le=3600)] = 5.0  # poll no faster than this

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v:
            return v
        u = parse_url(v)
        if u.scheme not in {"http", "https"} or not u.host:
            raise ValueError("must be http(s)://host[:port]")
        if u.user or u.password:
            raise ValueError("must not carry credentials: use username and password_file")
        return v

    @model_validator(mode="after")
    def _credentials(self) -> RedfishSettings:
        if bool(self.username) != (self.password_file is not None):
            raise ValueError("username and password_file go together")
        if self.auth == "basic" and ":" in self.username:
            raise ValueError("a basic-auth username cannot contain ':'")
        return self


class HttpStatus(SensorReadError):
    """A response with an error status (``status``)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


@dataclass(frozen=True, slots=True)
class Plan:
    """What to read for one chassis: ``urls`` are the resources ``method`` reads each poll."""

    chassis: str  # @odata.id
    ident: str  # Id
    method: Method
    urls: tuple[str, ...]
    control: int = 0  # legacy: index of the PowerControl entry

    @property
    def described(self) -> str:
        return {
            "energy_joules": "EnvironmentMetrics EnergyJoules (energy counter)",
            "energy_kwh": "EnvironmentMetrics EnergykWh (energy counter)",
            "env_power": "EnvironmentMetrics PowerWatts",
            "psu_power": f"PowerSubsystem, sum of {len(self.urls)} power supplies' InputPowerWatts",
            "legacy": f"Power PowerControl[{self.control}] PowerConsumedWatts",
        }[self.method]


def odata_id(obj: object) -> str | None:
    v = obj.get("@odata.id") if isinstance(obj, dict) else None
    return v.rstrip("/") if isinstance(v, str) and v else None


def reading(doc: Json, key: str) -> object:
    """The ``Reading`` of a sensor excerpt (``"PowerWatts": {"Reading": 374}``), or None."""
    ex = doc.get(key)
    return ex.get("Reading") if isinstance(ex, dict) else None


def is_number(v: object) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool)


def retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from a Retry-After header (delay seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), MAX_BACKOFF_S)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max((when - now).total_seconds(), 0.0), MAX_BACKOFF_S)


class RedfishSource:
    """The :class:`carbond.sensors.platform.Source` of one Redfish service."""

    name = "redfish"

    def __init__(self, settings: RedfishSettings) -> None:
        import aiohttp

        self._s = settings
        self.min_interval_s = settings.min_interval_s
        self._base = str(parse_url(settings.url).origin()) if settings.url else ""
        self._http: aiohttp.ClientSession | None = None
        self._password = ""
        self._token = ""
        self._session_uri = ""
        self._sessions_path = SESSIONS
        self._login_lock = asyncio.Lock()
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self.plan: Plan | None = None
        self.logins = 0

    # --- HTTP -------------------------------------------------------------------------------------------------

    def _what(self, path: str) -> str:
        return f"{self._base}{path}"

    def _auth(self) -> dict[str, str]:
        if not self._s.username:
            return {}
        if self._s.auth == "basic":  # RFC 7617, UTF-8
            pair = base64.b64encode(f"{self._s.username}:{self._password}".encode()).decode("ascii")
            return {"Authorization": f"Basic {pair}"}
        return {"X-Auth-Token": self._token} if self._token else {}

    async def get(self, path: str) -> Json:
        """The JSON object at ``path``; raises SensorReadError (HttpStatus), Rejected, Backoff or TimeoutError."""
        import aiohttp

        assert self._http is not None, "open() first"
        for attempt in (1, 2):
            token = self._token
            try:
                async with self._http.get(self._base + path, headers=self._auth(), timeout=self._timeout) as r:
                    if r.status == 401 and attempt == 1 and self._s.username and self._s.auth == "session":
                        await self._relogin(token)
                        continue
                    body = await r.read()
                    return self._decode(path, r, body)
            except aiohttp.ClientConnectorCertificateError as exc:
                raise SensorReadError(f"TLS verification of {self._base} failed: {exc.certificate_error}") from None
            except aiohttp.ClientSSLError as exc:
                raise SensorReadError(f"TLS with {self._base} failed: {exc}") from None
            except TimeoutError:
                raise  # the frame's "timeout" (aiohttp's read timeouts are both TimeoutError and ClientError)
            except aiohttp.ClientError as exc:
                raise SensorReadError(f"GET {self._what(path)}: {type(exc).__name__}: {exc}"[:300]) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _decode(self, path: str, r: aiohttp.ClientResponse, body: bytes) -> Json:
        if r.status in (429, 503):
            wait = retry_after(r.headers.get("Retry-After"), datetime.now(UTC))
            if wait is not None or r.status == 429:
                wait = NO_RETRY_AFTER_429_S if wait is None else wait
                raise Backoff(wait, f"HTTP {r.status} from {self._what(path)}")
        if r.status == 401 or r.status == 403:
            who = f"user {self._s.username!r}" if self._s.username else "no credentials (set username, password_file)"
            raise HttpStatus(r.status, f"HTTP {r.status} from {self._what(path)}: access refused for {who}")
        if r.status >= 400:
            raise HttpStatus(r.status, f"HTTP {r.status} from {self._what(path)}{error_message(body)}")
        text = body.lstrip()[:1]
        if text == b"<":
            snippet = " ".join(body[:80].decode("utf-8", "replace").split())
            raise Rejected("format", f"{self._what(path)}: {r.content_type} page instead of JSON ({snippet!r})")
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise Rejected("format", f"{self._what(path)}: not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise Rejected("format", f"{self._what(path)}: a JSON {type(doc).__name__}, not an object")
        return doc

    async def _relogin(self, stale: str) -> None:
        async with self._login_lock:
            if self._token == stale:  # nobody logged in again meanwhile
                self._token = ""
                await self._login()

    async def _login(self) -> None:
        import aiohttp

        assert self._http is not None
        creds = {"UserName": self._s.username, "Password": self._password}
        url = self._base + self._sessions_path
        try:
            async with self._http.post(url, json=creds, timeout=self._timeout) as r:
                body = await r.read()
                if r.status in (401, 403):
                    raise HttpStatus(r.status, f"login as {self._s.username!r} at {url} refused (HTTP {r.status}): "
                                     "check username and password_file")  # fmt: skip
                if r.status >= 400:
                    raise HttpStatus(r.status, f"login at {url}: HTTP {r.status}{error_message(body)}")
                token = r.headers.get("X-Auth-Token", "")
                location = r.headers.get("Location", "")
        except aiohttp.ClientError as exc:
            raise SensorReadError(f"login at {url}: {type(exc).__name__}: {exc}"[:300]) from None
        if not token:
            raise SensorReadError(f"login at {url} gave no X-Auth-Token (try auth: basic)")
        if not location:
            with contextlib.suppress(ValueError):
                location = odata_id(json.loads(body)) or ""
        self._token, self._session_uri = token, parse_url(location).path if location else ""
        self.logins += 1
        log.info("redfish_session_opened", url=self._base, user=self._s.username)

    # --- Source -----------------------------------------------------------------------------------------------

    async def open(self) -> str:
        import aiohttp

        if not self._base:
            raise SensorUnavailable(self.name, "no url configured (redfish.url: https://<bmc>)")
        try:
            if self._s.password_file is not None:
                text = await asyncio.to_thread(self._s.password_file.read_text, encoding="utf-8")
                self._password = text.rstrip("\r\n")
            ssl_ctx = await asyncio.to_thread(self._ssl)
        except OSError as exc:
            raise SensorUnavailable(self.name, f"cannot read {exc.filename}: {exc.strerror or exc}") from None
        except ssl.SSLError as exc:
            raise SensorUnavailable(self.name, f"cannot load ca_file {self._s.ca_file}: {exc}") from None
        if parse_url(self._base).scheme == "http" and self._s.username:
            log.warning("redfish_plaintext_credentials", url=self._base, hint="use https")
        connector = aiohttp.TCPConnector(ssl=ssl_ctx, limit=4)
        self._http = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                           headers={"Accept": "application/json", "OData-Version": "4.0"})  # fmt: skip
        try:
            return await self._discover()
        except (SensorReadError, Rejected, Backoff, TimeoutError) as exc:
            await self.close()
            reason = f"no answer within {self._s.timeout_s} s" if isinstance(exc, TimeoutError) else str(exc)
            raise SensorUnavailable(self.name, f"{self._base}: {reason}") from None
        except BaseException:
            await self.close()
            raise

    def _ssl(self) -> ssl.SSLContext | bool:
        if parse_url(self._base).scheme != "https":
            return True
        if not self._s.verify_tls:
            log.warning("redfish_tls_unverified", url=self._base, hint="verify_tls: false; set ca_file instead")
            return False
        return ssl.create_default_context(cafile=str(self._s.ca_file) if self._s.ca_file else None)

    async def _discover(self) -> str:
        root = await self.get(ROOT)
        self._sessions_path = odata_id((root.get("Links") or {}).get("Sessions")) or SESSIONS
        if self._s.username and self._s.auth == "session" and not self._token:
            await self._login()
        collection = odata_id(root.get("Chassis"))
        if not collection:
            raise SensorUnavailable(self.name, f"{self._base}{ROOT} lists no Chassis collection")
        members = [m for m in map(odata_id, (await self.get(collection)).get("Members") or []) if m]
        docs = {m: await self.get(m) for m in members}
        want = self._s.chassis.rstrip("/")
        if want:
            chosen = [m for m, d in docs.items() if want in (m, d.get("Id"))]
            if not chosen:
                ids = ", ".join(str(d.get("Id", m)) for m, d in docs.items()) or "none"
                raise SensorUnavailable(self.name, f"no chassis {want!r} at {self._base} (found: {ids})")
            docs = {chosen[0]: docs[chosen[0]]}
        plans: dict[str, Plan] = {}
        notes: list[str] = []
        for uri, doc in docs.items():
            plan = await self._plan(uri, doc, notes)
            if plan is not None:
                plans[uri] = plan
        if not plans:
            why = "; ".join(notes) or "no chassis has EnvironmentMetrics, PowerSubsystem or Power readings"
            raise SensorUnavailable(self.name, f"{self._base}: no chassis power ({why})")
        self.plan = plans[choose(plans, docs)]
        skipped = sorted(plans[c].ident for c in plans if c != self.plan.chassis)
        extra = f"; not counted: {', '.join(skipped)} (inside it or not the machine's)" if skipped else ""
        kind = docs[self.plan.chassis].get("ChassisType", "?")
        return f"{self._base} chassis {self.plan.ident} ({kind}): {self.plan.described}{extra}"

    async def _plan(self, uri: str, doc: Json, notes: list[str]) -> Plan | None:
        """How this chassis' power can be read (the order in the module docstring), or None."""
        ident = str(doc.get("Id") or uri.rsplit("/", 1)[-1])

        async def fetch(path: str | None) -> Json | None:
            if not path:
                return None
            try:
                return await self.get(path)
            except HttpStatus as exc:
                if exc.status in (401, 403):
                    raise
                notes.append(str(exc))
                return None

        env = await fetch(odata_id(doc.get("EnvironmentMetrics")))
        if env is not None:
            env_uri = odata_id(doc.get("EnvironmentMetrics")) or ""
            kwh = reading(env, "EnergykWh")
            if is_number(reading(env, "EnergyJoules")):
                return Plan(uri, ident, "energy_joules", (env_uri,))
            if isinstance(kwh, float) and not kwh.is_integer():
                return Plan(uri, ident, "energy_kwh", (env_uri,))
            if is_number(reading(env, "PowerWatts")):
                return Plan(uri, ident, "env_power", (env_uri,))
        subsystem = await fetch(odata_id(doc.get("PowerSubsystem")))
        supplies = await fetch(odata_id((subsystem or {}).get("PowerSupplies")))
        metrics: list[str] = []
        for member in (supplies or {}).get("Members") or []:
            psu = await fetch(odata_id(member))
            found = await fetch(odata_id((psu or {}).get("Metrics")))
            if found is not None and any(is_number(reading(found, k)) for k in ("InputPowerWatts", "PowerWatts")):
                metrics.append(odata_id((psu or {}).get("Metrics")) or "")
        if metrics:
            return Plan(uri, ident, "psu_power", tuple(metrics))
        power_uri = odata_id(doc.get("Power"))
        power = await fetch(power_uri)
        if power is not None and power_uri:
            index = control_index(power)
            if index is not None:
                return Plan(uri, ident, "legacy", (power_uri,), index)
        return None

    async def sample(self) -> Mapping[str, Sample]:
        plan = self.plan
        if plan is None:
            raise SensorReadError("redfish: sample() before open()")
        docs = await asyncio.gather(*(self.get(u) for u in plan.urls))
        return {f"chassis-{plan.ident}": to_sample(plan, docs, self._s.max_watts)}

    async def close(self) -> None:
        import aiohttp

        http, self._http = self._http, None
        if http is None:
            return
        if self._token and self._session_uri:
            try:
                deadline = aiohttp.ClientTimeout(total=min(self._s.timeout_s, 5.0))
                headers = {"X-Auth-Token": self._token}
                async with http.delete(self._base + self._session_uri, headers=headers, timeout=deadline) as r:
                    log.info("redfish_session_closed", url=self._base, status=r.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("redfish_logout_failed", url=self._base, error=f"{type(exc).__name__}: {exc}"[:200])
        self._token = self._session_uri = ""
        await http.close()


def error_message(body: bytes) -> str:
    """``: <message>`` from a Redfish error body, or nothing."""
    try:
        err = json.loads(body).get("error", {})
        msg = err.get("message") or ""
    except (ValueError, AttributeError):
        return ""
    return f": {msg}"[:200] if isinstance(msg, str) and msg else ""


def control_index(power: Json) -> int | None:
    """The PowerControl entry that is the chassis' total (the first that is not a component) with a figure."""
    controls = power.get("PowerControl") or []
    for i, c in enumerate(controls if isinstance(controls, list) else []):
        if not isinstance(c, dict) or c.get("PhysicalContext") in COMPONENTS:
            continue
        avg = (c.get("PowerMetrics") or {}).get("AverageConsumedWatts")
        if is_number(c.get("PowerConsumedWatts")) or is_number(avg):
            return i
    return None


def choose(plans: Mapping[str, Plan], docs: Mapping[str, Json]) -> str:
    """The chassis whose power is the machine's (the rule in the module docstring)."""
    parents: dict[str, set[str]] = {}
    for uri, doc in docs.items():
        links = doc.get("Links") or {}
        up = odata_id(links.get("ContainedBy"))
        if up:
            parents.setdefault(uri, set()).add(up)
        for child in links.get("Contains") or []:
            if c := odata_id(child):
                parents.setdefault(c, set()).add(uri)

    def inside_another(uri: str) -> bool:
        seen: set[str] = set()
        todo = list(parents.get(uri, ()))
        while todo:
            p = todo.pop()
            if p in plans and p != uri:
                return True
            if p not in seen:
                seen.add(p)
                todo.extend(parents.get(p, ()))
        return False

    roots = [u for u in plans if not inside_another(u)] or list(plans)
    if len(roots) > 1:
        roots = [u for u in roots if (docs[u].get("Links") or {}).get("ComputerSystems")] or roots
    if len(roots) > 1:
        ids = ", ".join(plans[u].ident for u in roots)
        raise SensorUnavailable("redfish", f"several chassis report power, none inside another: {ids}; "
                                "name the machine's own with redfish.chassis")  # fmt: skip
    return roots[0]


def to_sample(plan: Plan, docs: list[Json], max_watts: float) -> Sample:
    """One poll's documents as a Sample (values checked; Rejected with the reason when unusable)."""
    doc = docs[0]
    if plan.method in ("energy_joules", "energy_kwh"):
        key = "EnergyJoules" if plan.method == "energy_joules" else "EnergykWh"
        value = reading(doc, key)
        if not is_number(value):
            raise Rejected("format", f"{key} reading is {value!r}"[:120])
        power = reading(doc, "PowerWatts")
        shown = float(power) if is_number(power) and 0 < power <= max_watts else None
        return Sample(energy_j=float(value) * (1.0 if key == "EnergyJoules" else 3.6e6), watts=shown)
    if plan.method == "env_power":
        return Sample(watts=watts(reading(doc, "PowerWatts"), max_watts))
    if plan.method == "psu_power":
        total = 0.0
        for d in docs:
            value = reading(d, "InputPowerWatts") if "InputPowerWatts" in d else reading(d, "PowerWatts")
            if value is None or value == 0:  # a supply in standby or without input: nothing drawn through it
                continue
            total += watts(value, max_watts)
        return Sample(watts=watts(total, max_watts))
    controls = doc.get("PowerControl")
    if not isinstance(controls, list) or len(controls) <= plan.control or not isinstance(controls[plan.control], dict):
        raise Rejected("format", f"Power has no PowerControl[{plan.control}]")
    control = controls[plan.control]
    if control.get("PowerConsumedWatts") is not None:
        return Sample(watts=watts(control["PowerConsumedWatts"], max_watts))
    metrics = control.get("PowerMetrics") or {}
    minutes = metrics.get("IntervalInMin")
    period = float(minutes) * 60 if is_number(minutes) and minutes > 0 else None
    return Sample(watts=watts(metrics.get("AverageConsumedWatts"), max_watts), period_s=period)


def create(settings: RedfishSettings, ctx: Context) -> Sensor:
    return PlatformSensor(RedfishSource(settings), settings, ctx.clock, model="Redfish chassis power")


BACKEND = Backend(frozenset({"platform"}), RedfishSettings, create)
