"""Out of file descriptors, the log gets one structured event per streak, not a traceback per failed accept()."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

SERVER = """
import asyncio, os, resource, sys
from carbond import logs
from carbond.exporter.http import HttpServer, Response

async def ok(request):
    return Response(200, b"ok\\n")

async def main():
    logs.configure("info", "json")
    loop = asyncio.get_running_loop()
    logs.install_loop_handler(loop, quiet_s=1.5)  # asyncio retries accept() every second
    server = HttpServer(ok, server_header="t", max_connections=16)
    await server.start("127.0.0.1", 0)
    hog = []
    try:
        while True:
            hog.append(os.open("/dev/null", os.O_RDONLY))  # every descriptor the limit allows
    except OSError:
        pass
    print(server.port, flush=True)
    await asyncio.sleep(2.5)  # accept() fails with EMFILE all this time
    for fd in hog:
        os.close(fd)
    await asyncio.sleep(2.5)
    await server.close()

resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
asyncio.run(main())
"""


def test_out_of_descriptors_is_one_event_per_streak() -> None:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        clients = []
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and len(clients) < 40:  # each waits in the backlog, accept() fails
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            client.sendall(b"G")  # a byte sent: the kernel's deferred accept hands the connection over at once
            clients.append(client)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=30)
        for c in clients:
            c.close()
    finally:
        proc.kill()
    lines = [line for line in err.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is one JSON event: no traceback lines
    names = [e["event"] for e in events]
    assert names.count("out_of_file_descriptors") == 1, names
    assert names.count("out_of_file_descriptors_over") == 1, names
    over = next(e for e in events if e["event"] == "out_of_file_descriptors_over")
    assert over["times"] >= 2  # asyncio retried accept() more than once in the streak
