"""Files generated on read (procfs), re-read through one kept descriptor instead of an open and close per tick.

A ``pread`` at offset 0 of a procfs file makes the kernel generate it afresh, so the descriptor can be kept for
the life of the reader: after the 1 s sleep between ticks, when caches are cold, the path lookup, open and close
cost more than the read itself (the per-tick gain shows in ``make bench``'s daemon CPU figures). Only files that
report a size of 0, as procfs files do, are kept open: a regular file (a test fixture, replaced by rename) is
opened on each read, so it is never stale.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

_TICK: ContextVar[int] = ContextVar("carbond_procread_tick", default=0)
_TICKS = itertools.count(1)
_SHARED: dict[str, ProcFile] = {}


@contextlib.contextmanager
def one_tick() -> Iterator[None]:
    """Within the block, a shared file is read once: /proc/stat feeds both the TDP model and attribution."""
    token = _TICK.set(next(_TICKS))
    try:
        yield
    finally:
        _TICK.reset(token)


def shared(path: Path, size: int) -> ProcFile:
    """The one ProcFile of ``path`` in this process (its size the largest asked for)."""
    found = _SHARED.get(str(path))
    if found is None:
        found = _SHARED[str(path)] = ProcFile(path, size)
    found.size = max(found.size, size)
    return found


class ProcFile:
    """``read()`` returns up to ``size`` bytes from the start of ``path``; OSError as ``os.open`` would raise it.

    Inside :func:`one_tick`, a second read returns the bytes of the first (outside it, every read is fresh).
    """

    def __init__(self, path: Path, size: int = 4096) -> None:
        self.path = path
        self.size = size
        self._fd: int | None = None
        self._tick = 0
        self._data = b""

    def read(self) -> bytes:
        tick = _TICK.get()
        if tick and tick == self._tick:
            return self._data
        data = self._read()
        self._tick, self._data = tick, data
        return data

    def _read(self) -> bytes:
        fd = self._fd
        if fd is not None:
            try:
                return os.pread(fd, self.size, 0)
            except OSError:  # e.g. procfs remounted: reopen once, below
                self.close()
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, self.size, 0)
            if os.fstat(fd).st_size == 0:  # generated on read: keep the descriptor
                self._fd, fd = fd, -1
            return data
        finally:
            if fd >= 0:
                os.close(fd)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.close()
