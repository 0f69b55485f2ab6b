"""Scrape latency while clients reconnect as fast as they are evicted past ``web.max_connections`` (issue 31).

    .venv/bin/python -m bench reconnect        # runs this alone and rewrites its section of bench/results.md

The daemon runs as a process of its own (TDP model, 1 s ticks, ``web.max_connections`` at its default of 1,024).
A second process opens 2,000 connections that send nothing and reopen at once when the server drops them, so the
server is past its limit for the whole window and evicts a connection for every new one. A third (this one) scrapes
``/metrics`` as Prometheus does, one scrape at a time on a new connection (``Accept-Encoding: gzip``,
``Connection: close``), 20 a second, and times each from ``connect()`` to the last byte. A scrape is *cut* when its
connection is closed or reset before a whole 200 answer arrives. node_exporter, where installed, is measured beside
it under the same flood (it has no connection limit: its 2,000 connections stay open and idle).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests.harness.daemon import Daemon, free_port, parse_metrics
from tests.harness.floods import reconnecting_flood

CLIENTS = 2000
SCRAPES = 300
INTERVAL_S = 0.05
REQUEST = b"GET /metrics HTTP/1.1\r\nHost: bench\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n"


def scrape(port: int, timeout: float = 10.0) -> float | None:
    """Seconds from connect to the last byte of a whole 200 answer; None when cut."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout) as sock:
            sock.sendall(REQUEST)
            chunks = []
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
    except OSError:
        return None
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        return None
    fields = dict(line.lower().split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
    if fields.get(b"transfer-encoding", b"").strip() == b"chunked":  # node_exporter's gzipped answers
        whole = body.endswith(b"0\r\n\r\n")
    else:
        whole = int(fields.get(b"content-length", b"-1")) == len(body)
    return time.perf_counter() - t0 if whole else None


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(int(len(sorted_values) * q), len(sorted_values) - 1)]


def under_flood(port: int, clients: int = CLIENTS, scrapes: int = SCRAPES) -> dict[str, float]:
    """p50/p99 (ms) of valid scrapes and the number cut, while ``clients`` reconnect against ``port``."""
    flood = subprocess.Popen(reconnecting_flood(port, clients), stdin=subprocess.DEVNULL)
    try:
        time.sleep(3.0)  # the flood's connections opened and past the limit (a warm-up, not a wait for a result)
        took: list[float] = []
        cut = 0
        for _ in range(scrapes):
            t = scrape(port)
            if t is None:
                cut += 1
            else:
                took.append(t)
            time.sleep(INTERVAL_S)
    finally:
        flood.kill()
        flood.wait()
    took.sort()
    return {
        "p50 ms": _percentile(took, 0.5) * 1000 if took else float("nan"),
        "p99 ms": _percentile(took, 0.99) * 1000 if took else float("nan"),
        "max ms": took[-1] * 1000 if took else float("nan"),
        "cut": float(cut),
        "scrapes": float(scrapes),
    }


def carbond_figures(workdir: Path) -> dict[str, float]:
    cfg = {"sensors": ["tdp"], "measure_power_secs": 1, "attribution": {"enabled": False}}
    with Daemon(workdir, cfg) as d:
        quiet = sorted(t for t in (scrape(d.port) for _ in range(50)) if t is not None)
        flood = under_flood(d.port)
        evicted = sum(v for (name, _), v in parse_metrics(d.get("/metrics")[1].decode()).items()
                      if name == "carbond_http_connections_evicted_total")  # fmt: skip
    out = {"carbond, no flood: scrape p50 ms": _percentile(quiet, 0.5) * 1000}
    out.update({f"carbond, {CLIENTS} reconnecting: scrape {k}": v for k, v in flood.items()})
    out[f"carbond, {CLIENTS} reconnecting: connections evicted"] = evicted
    return out


def node_exporter_figures(workdir: Path) -> dict[str, float] | None:
    binary = "/usr/bin/prometheus-node-exporter"
    if not Path(binary).exists():
        return None
    port = free_port()
    # the collectors of a small node: a scrape that reads little, so the figure is the HTTP server's
    args = ["--collector.disable-defaults", "--collector.cpu", "--collector.meminfo", "--collector.loadavg"]
    proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}", *args], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while scrape(port) is None:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)
        flood = under_flood(port)
    finally:
        proc.terminate()
        proc.wait(10)
    return {f"node_exporter, {CLIENTS} idle beside: scrape {k}": v for k, v in flood.items()}


def figures(workdir: Path) -> dict[str, float]:
    out = carbond_figures(workdir)
    out.update(node_exporter_figures(workdir) or {})
    return out


SECTION = f"## Scrapes while {CLIENTS:,} clients reconnect as they are evicted (web.max_connections 1,024)"


def section(rows: dict[str, float]) -> list[str]:
    cells = [f"| {k} | {v:.1f} |" for k, v in rows.items()]
    return [
        SECTION,
        "",
        "| figure | value |",
        "| --- | ---: |",
        *cells,
        "",
        f"{SCRAPES} scrapes, one every {INTERVAL_S * 1000:.0f} ms, each on a new connection, timed from connect to "
        "the last byte; cut: closed or reset before a whole 200 answer. The flood, the scraper and the daemon share "
        "the machine's CPUs (`python -m bench reconnect`), and the p99 of one run swings by 2x between runs. The "
        "tail is set by bunches: the kernel hands the silent clients over in bunches as their deferred accepts end "
        "(all 2,000 at once about when the scrapes begin, then the ~1,000 beyond the limit every 3 s), and a scrape "
        "that lands behind one waits for its accepts and closes (tens of microseconds each) and for the transports "
        "of those let in below the limit (given a few per turn of the event loop, after requests already in the "
        "kernel); node_exporter keeps its 2,000 connections open instead.",
        "",
    ]


def write_section(results: Path, rows: dict[str, float]) -> None:
    """Replace (or append) this bench's section of ``results``, leaving the others as they are."""
    lines = results.read_text().splitlines() if results.exists() else ["# Benchmark results", ""]
    if SECTION in lines:
        start = lines.index(SECTION)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section(rows)
    else:
        lines += ["", *section(rows)]
    results.write_text("\n".join(lines).rstrip("\n") + "\n")
