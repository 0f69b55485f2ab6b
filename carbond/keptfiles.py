"""Files generated on read (cgroupfs counters, procfs), re-read through descriptors kept open from one tick to the
next: the one kept-descriptor file class of carbond, used by attribution and by :mod:`carbond.procfs`.

cgroupfs and procfs files are seq_files: a ``pread`` at offset 0 makes the kernel generate the content afresh, so
a descriptor can be kept from one tick to the next. A read through it skips what an open, read and close pays each
time (the path lookup, the open and release of the seq_file), but each kept descriptor holds about 6 KB of kernel
memory (the seq_file buffer, charged to carbond's cgroup): their number is bounded by a cap (by default 4,096, and
never within 512 of the soft ``RLIMIT_NOFILE``). Beyond the cap, a file is opened, read and closed on each read.

Only files that report a size of 0, as kernfs does, are kept: a regular file (a test fixture, replaced by rename)
is opened on each read, so it is never stale. When a cgroup is removed, reads of its kept files fail (``ENODEV``),
also after a new cgroup is created at the same path: any error closes the descriptor and the file is opened again
once by path, so a read returns the current cgroup's bytes or None, never stale bytes, and never raises.

Files are opened with ``O_NOATIME`` where allowed (as root, or as their owner; else without it): kernfs keeps access
times in memory, but on a disk file system (the fixtures) each read after a rewrite would otherwise dirty the inode.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import sys
from collections.abc import Callable

DEFAULT_CAP = 4096
FD_HEADROOM = 512  # descriptors left below the soft limit for sockets, sensors and everything else
READ_SIZE = 4096
NOATIME = os.O_NOATIME if sys.platform == "linux" else 0  # polling a file is no reason to write its access time

UNKNOWN = -1  # not classified yet
OPEN_EACH = -2  # a regular file: opened on each read
KEEPABLE = -3  # generated on read, not kept at the moment (the cap was reached, or a read failed)


def fd_cap(cap: int = DEFAULT_CAP, headroom: int = FD_HEADROOM) -> int:
    """``cap``, lowered to leave ``headroom`` descriptors below the soft ``RLIMIT_NOFILE``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return cap
    return max(0, min(cap, soft - headroom))


def generated_on_read(st: os.stat_result) -> bool:
    """kernfs and procfs files report a size of 0; regular files report their content's."""
    return st.st_size == 0


class CounterFile:
    """One file read every tick, up to ``size`` bytes. ``fd`` is a kept descriptor (>= 0) or one of the states
    above."""

    __slots__ = ("fd", "path", "size")

    def __init__(self, path: str, size: int = READ_SIZE) -> None:
        self.path = path
        self.fd = UNKNOWN
        self.size = size


class KeptFiles:
    """Reads :class:`CounterFile` s, keeping at most ``cap`` descriptors open between reads."""

    def __init__(self, cap: int | None = None, keep: Callable[[os.stat_result], bool] = generated_on_read) -> None:
        self._held: set[CounterFile] = set()
        self.cap = fd_cap() if cap is None else max(cap, 0)
        self._keep = keep
        self._flags = os.O_RDONLY | os.O_CLOEXEC | NOATIME

    @property
    def kept(self) -> int:
        return len(self._held)

    def read(self, f: CounterFile) -> bytes | None:
        """Up to ``f.size`` bytes from the start of the file, or None when it cannot be read (e.g. it is gone)."""
        fd = f.fd
        if fd >= 0:
            try:
                return os.pread(fd, f.size, 0)
            except OSError:  # its cgroup was removed (perhaps recreated at the same path): reopen once, below
                self.release(f)
        try:
            fd = os.open(f.path, self._flags)
        except OSError as exc:
            if exc.errno != errno.EPERM or not self._flags & NOATIME:
                return None
            self._flags &= ~NOATIME  # not the files' owner (nor CAP_FOWNER): open them as anyone may
            return self.read(f)
        held = False
        try:
            data = os.read(fd, f.size)
            state = f.fd
            if state != OPEN_EACH and len(self._held) < self.cap:
                if state == UNKNOWN and not self._keep(os.fstat(fd)):
                    f.fd = OPEN_EACH
                else:
                    f.fd, held = fd, True
                    self._held.add(f)
            return data
        except OSError:
            return None
        finally:
            if not held:
                os.close(fd)

    def release(self, f: CounterFile) -> None:
        """Close the file's kept descriptor, if any (its cgroup vanished, or a read failed)."""
        fd = f.fd
        if fd >= 0:
            f.fd = KEEPABLE
            self._held.discard(f)
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Close every kept descriptor; reads still work afterwards (and may keep descriptors again)."""
        for f in list(self._held):
            self.release(f)

    def __del__(self) -> None:
        self.close()
