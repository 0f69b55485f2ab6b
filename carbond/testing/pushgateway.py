"""A loopback Prometheus Pushgateway for tests: records each push (PUT/POST) and delete as the real one's API
takes them (``/metrics/job/<job>{/<label>/<value>}``), answering 200/202 as the Pushgateway does."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


@dataclass(frozen=True, slots=True)
class Push:
    method: str  # PUT (push_to_gateway), POST (pushadd_to_gateway) or DELETE
    path: str
    body: str
    authorization: str


class FakePushgateway:
    """``with FakePushgateway() as gw:`` serves on 127.0.0.1:<free port> (``gw.address``); ``gw.pushes``."""

    def __init__(self) -> None:
        self.pushes: list[Push] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self, status: int) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
                push = Push(self.command, self.path, body, self.headers.get("Authorization", ""))
                with owner._lock:
                    owner.pushes.append(push)
                self.send_response(status if self.path.startswith("/metrics/job/") else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_PUT(self) -> None:
                self._record(200)

            def do_POST(self) -> None:
                self._record(200)

            def do_DELETE(self) -> None:
                self._record(202)

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the pushes are the record."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-pushgateway", daemon=True)

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, as ``prometheus_url`` takes it."""
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def received(self) -> list[Push]:
        with self._lock:
            return list(self.pushes)

    def __enter__(self) -> FakePushgateway:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
