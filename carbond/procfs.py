"""``/proc/stat`` and ``/proc/meminfo``: parsed here and nowhere else, read at most once per tick.

The monitor takes one :class:`HostSample` per tick from its :class:`HostReader` and passes it down to every sensor
and to attribution, so the TDP model and the cgroup split see the same jiffies. Each part is parsed on first use
(the aggregate CPU line, the per-CPU lines, meminfo), and meminfo is read only when something asks for it.

Both files are generated on read, so they are re-read through kept descriptors (:mod:`carbond.keptfiles`).

``/proc/stat`` counts USER_HZ jiffies (100 per second on every Linux ABI). busy = user + nice + system + irq +
softirq + steal; idle and iowait are not busy; guest and guest_nice are already inside user and nice.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from carbond.keptfiles import CounterFile, KeptFiles

USER_HZ = 100
STAT_SIZE = 4096  # the head of /proc/stat: the aggregate line and, on small machines, every per-CPU line
MEMINFO_SIZE = 256  # MemTotal, MemFree and MemAvailable are its first three lines
MAX_STAT_SIZE = 1 << 20


class CpuTimes(NamedTuple):
    """Busy and total jiffies of one CPU line (``cpu`` for all CPUs, ``cpu0`` ...)."""

    busy: int
    total: int


def parse_cpu_line(line: bytes) -> CpuTimes:
    """One ``cpu...`` line of /proc/stat; ValueError when it is not one."""
    parts = line.split()
    if not parts or not parts[0].startswith(b"cpu"):
        raise ValueError(f"not a cpu line: {line[:40]!r}")
    fields = [int(x) for x in parts[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
    busy = user + nice + system + irq + softirq + steal
    return CpuTimes(busy, busy + idle + iowait)


def parse_stat(data: bytes) -> dict[str, CpuTimes]:
    """Every ``cpu`` line of /proc/stat by name ({"cpu": ..., "cpu0": ...}); ValueError without the aggregate."""
    out: dict[str, CpuTimes] = {}
    for line in data.split(b"\n"):
        if not line.startswith(b"cpu"):
            break
        out[line.split(None, 1)[0].decode("ascii", "replace")] = parse_cpu_line(line)
    if "cpu" not in out:
        raise ValueError("no aggregate cpu line in /proc/stat")
    return out


def parse_meminfo(data: bytes) -> dict[str, int]:
    """The ``Key: value kB`` lines of /proc/meminfo, in bytes."""
    out: dict[str, int] = {}
    for line in data.split(b"\n"):
        key, _, rest = line.partition(b":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            unit = 1024 if len(fields) > 1 and fields[1].lower() == b"kb" else 1
            out[key.decode("ascii", "replace")] = int(fields[0]) * unit
    return out


def mem_total_bytes(data: bytes) -> int:
    """``MemTotal`` in bytes; ValueError without it."""
    total = parse_meminfo(data).get("MemTotal")
    if total is None:
        raise ValueError("no MemTotal line in /proc/meminfo")
    return total


def mem_used_bytes(data: bytes) -> float:
    """MemTotal - MemAvailable (else MemFree), in bytes."""
    info = parse_meminfo(data)
    return float(info.get("MemTotal", 0) - info.get("MemAvailable", info.get("MemFree", 0)))


class HostSample:
    """One tick's view of /proc/stat and /proc/meminfo, each part parsed (and meminfo read) on first use."""

    __slots__ = ("_cpu", "_error", "_mem_used", "_per_cpu", "_reader", "_stat")

    def __init__(self, stat: bytes, reader: HostReader | None = None, error: str = "") -> None:
        self._stat = stat
        self._reader = reader
        self._error = error  # why /proc/stat could not be read: raised as ValueError by every CPU accessor
        self._cpu: CpuTimes | None = None
        self._per_cpu: dict[str, CpuTimes] | None = None
        self._mem_used: float | None = None

    @property
    def cpu(self) -> CpuTimes:
        """All CPUs; ValueError when /proc/stat could not be read or has no aggregate line."""
        if self._error:
            raise ValueError(self._error)
        if self._cpu is None:
            self._cpu = parse_cpu_line(self._stat.split(b"\n", 1)[0])
        return self._cpu

    def per_cpu(self) -> dict[str, CpuTimes]:
        """Every cpu line by name (the aggregate ``cpu`` included); ValueError as :attr:`cpu`."""
        if self._error:
            raise ValueError(self._error)
        if self._per_cpu is None:
            reader = self._reader
            if reader is not None and len(self._stat) >= reader.stat_size and not _whole_cpu_block(self._stat):
                self._stat = reader.read_stat(whole=True)  # cut short: a many-CPU host, read it all once
            self._per_cpu = parse_stat(self._stat)
        return self._per_cpu

    @property
    def mem_used_bytes(self) -> float:
        """Memory in use (MemTotal - MemAvailable), read once per sample; OSError when unreadable."""
        if self._mem_used is None:
            if self._reader is None:
                raise OSError("no /proc/meminfo in this sample")
            self._mem_used = mem_used_bytes(self._reader.read_meminfo())
        return self._mem_used


def _whole_cpu_block(data: bytes) -> bool:
    """True when ``data`` holds a complete line after the last cpu line (the block was not cut short)."""
    end = data.rfind(b"\n")
    if end < 0:
        return False
    last_start = data.rfind(b"\n", 0, end) + 1
    return not data[last_start:end].startswith(b"cpu")


class HostReader:
    """Reads /proc/stat (and meminfo on demand) under ``procfs`` through kept descriptors; ``close()`` them."""

    def __init__(self, procfs: Path) -> None:
        self.procfs = procfs
        self._files = KeptFiles(cap=2)
        self._stat = CounterFile(str(procfs / "stat"), STAT_SIZE)
        self._meminfo = CounterFile(str(procfs / "meminfo"), MEMINFO_SIZE)

    @property
    def stat_size(self) -> int:
        return self._stat.size

    def _read(self, f: CounterFile) -> bytes:
        data = self._files.read(f)
        if data is None:
            raise OSError(f"cannot read {f.path}")
        return data

    def read_stat(self, whole: bool = False) -> bytes:
        """The head of /proc/stat; ``whole``: grow the read until every cpu line fits (many-CPU hosts)."""
        data = self._read(self._stat)
        while whole and len(data) >= self._stat.size and self._stat.size < MAX_STAT_SIZE:
            if _whole_cpu_block(data):
                break
            self._stat.size *= 2
            data = self._read(self._stat)
        return data

    def read_meminfo(self) -> bytes:
        return self._read(self._meminfo)

    def sample(self) -> HostSample:
        """This tick's sample (never raises: a failed read is raised by the sample's accessors)."""
        try:
            return HostSample(self.read_stat(), self)
        except OSError as exc:
            return HostSample(b"", self, str(exc))

    def close(self) -> None:
        self._files.close()
