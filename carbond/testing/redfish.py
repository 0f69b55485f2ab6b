"""Redfish services for tests: sushy-tools' static emulator, and a small aiohttp BMC with sessions and faults.

:class:`StaticEmulator` runs ``sushy-static`` (PyPI ``sushy-tools``) on a free loopback port, over TLS when given a
certificate and key. It serves ``<mockup>/<path>/index.json`` for ``GET /redfish/v1/<path>`` and opens the file on
every request, so a test that rewrites a file sees the new value on the next poll. It answers POST with 204 and
checks no credentials, so it cannot play a session login.

:class:`FakeBmc` serves the same mockup trees (also read per request) behind real Redfish session auth (POST to
``SessionService/Sessions`` -> 201, ``X-Auth-Token`` and ``Location``; DELETE to log out; 401 without a valid
token) or basic auth, and serves queued :class:`Fault` responses (a status, a body, headers, a delay) in place of
the next GETs, for the failures a real BMC has.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import socket
import subprocess
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from aiohttp import web

from carbond.testing.loopback import serve

MOCKUPS = Path(str(resources.files("carbond.testing") / "redfish_mockups"))
NEWER = MOCKUPS / "newer"  # EnvironmentMetrics and PowerSubsystem, a GPU baseboard chassis inside the server
OLDER = MOCKUPS / "older"  # Chassis/{id}/Power with PowerControl


def mockup_file(tree: Path, odata_id: str) -> Path:
    """The file that serves ``odata_id`` (``/redfish/v1/Chassis/1`` -> ``<tree>/Chassis/1/index.json``)."""
    rel = odata_id.rstrip("/").removeprefix("/redfish/v1").lstrip("/")
    return tree / rel / "index.json" if rel else tree / "index.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StaticEmulator:
    """``sushy-static`` serving ``mockup`` on 127.0.0.1 (``https`` when ``cert`` and ``key`` are given).

    ``start()`` returns at once; poll :meth:`ready` (the port accepts connections). A port taken between choosing
    it and the emulator binding it is retried on another, up to three times. Its request log goes to ``log``.
    """

    def __init__(self, binary: str, mockup: Path, log: Path, cert: Path | None = None, key: Path | None = None) -> None:
        self.binary = binary
        self.mockup = mockup
        self.log = log
        self.tls = (cert, key) if cert and key else None
        self.port = 0
        self.attempts = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        self.attempts += 1
        cmd = [self.binary, "-i", "127.0.0.1", "-p", str(self.port), "-m", str(self.mockup)]
        if self.tls:
            cmd += ["-c", str(self.tls[0]), "-k", str(self.tls[1])]
        with self.log.open("ab") as out:
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=os.environ | {"PYTHONUNBUFFERED": "1"},  # its request log is written as it goes
            )  # fmt: skip

    def ready(self) -> bool:
        """True once it listens; raises if it exited (restarting it on a new port if its port was taken)."""
        assert self._proc is not None, "start() first"
        if self._proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            if "Address already in use" in tail and self.attempts < 3:
                self.start()
                return False
            raise RuntimeError(f"sushy-static exited with {self._proc.returncode}: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None


@dataclass
class Fault:
    """A response served instead of the next GET (other than the service root's)."""

    status: int = 200
    body: str = ""
    content_type: str = "text/html"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # wait this long before answering (a slow BMC)


class FakeBmc:
    """A loopback Redfish service over ``mockup`` with session or basic auth and injectable faults."""

    SESSIONS = "/redfish/v1/SessionService/Sessions"

    def __init__(self, mockup: Path, username: str = "admin", password: str = "", auth: str = "session") -> None:
        self.mockup = mockup
        self.username = username
        self.password = password or secrets.token_urlsafe(12)
        self.auth = auth  # "session": tokens only; "basic": basic auth only
        self.sessions: dict[str, str] = {}  # token -> session path
        self.logins = 0
        self.failed_logins = 0
        self.logouts = 0
        self.unauthorized = 0  # GETs refused for want of valid credentials
        self.faults: deque[Fault] = deque()
        self.served: list[str] = []  # paths of GETs answered from the mockup
        self._next_id = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post(self.SESSIONS, self._login)
        app.router.add_delete(self.SESSIONS + "/{id}", self._logout)
        app.router.add_get("/{tail:.*}", self._get)
        self._runner, self.url = await serve(app, shutdown_timeout=1.0)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def expire_sessions(self) -> None:
        """Forget every token, as a BMC does when a session times out."""
        self.sessions.clear()

    def _authorized(self, request: web.Request) -> bool:
        if self.auth == "basic":
            want = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            return request.headers.get("Authorization", "") == f"Basic {want}"
        return request.headers.get("X-Auth-Token", "") in self.sessions

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        body = {"error": {"code": "Base.1.18.GeneralError", "message": message}}
        return web.json_response(body, status=status)

    async def _login(self, request: web.Request) -> web.Response:
        try:
            creds = await request.json()
        except ValueError:
            return self._error(400, "The request body is not JSON.")
        if creds.get("UserName") != self.username or creds.get("Password") != self.password:
            self.failed_logins += 1
            return self._error(401, "Invalid username or password.")
        self._next_id += 1
        token, path = secrets.token_hex(16), f"{self.SESSIONS}/{self._next_id}"
        self.sessions[token] = path
        self.logins += 1
        doc = {"@odata.type": "#Session.v1_7_2.Session", "@odata.id": path, "Id": str(self._next_id),
               "Name": "User Session", "UserName": self.username}  # fmt: skip
        return web.json_response(doc, status=201, headers={"X-Auth-Token": token, "Location": path})

    async def _logout(self, request: web.Request) -> web.Response:
        token = request.headers.get("X-Auth-Token", "")
        if self.sessions.get(token) != request.path:
            return self._error(401, "No valid session.")
        del self.sessions[token]
        self.logouts += 1
        return web.Response(status=204)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        if path != "/redfish/v1":  # the service root needs no credentials (Redfish spec)
            if self.faults:
                fault = self.faults.popleft()
                if fault.delay_s:
                    await asyncio.sleep(fault.delay_s)
                return web.Response(status=fault.status, text=fault.body, content_type=fault.content_type,
                                    headers=fault.headers)  # fmt: skip
            if not self._authorized(request):
                self.unauthorized += 1
                return self._error(401, "Authentication required.")
        file = mockup_file(self.mockup, path)
        if not path.startswith("/redfish/v1") or not file.is_file():
            return self._error(404, f"{path} not found.")
        self.served.append(path)
        return web.json_response(json.loads(file.read_text(encoding="utf-8")))
