"""The Slurm job spool: what the node's Prolog and Epilog hand carbond, read without ever asking the controller.

The shipped Prolog writes ``<spool_dir>/job_<id>.json`` when a job starts on the node and the Epilog
``<spool_dir>/job_<id>.end`` when it ends, each by writing a temporary name and renaming it into place::

    job_42.json  {"job_id": "42", "user": "ada", "uid": "1000", "account": "physics", "partition": "gpu",
                  "name": "train", "nodes": "n[01-04]", "start": 1718000000}
    job_42.end   {"job_id": "42", "end": 1718003600}

Values are strings, ``start`` and ``end`` epoch seconds (numbers or numeric strings); unknown keys are ignored, a
missing key is empty. An ``.end`` file without an ``end`` (an Epilog that could only ``touch`` it) ends the job at
the file's modification time.

Cost: :meth:`SlurmSpool.refresh` (once a tick, from the attributor's sampling step, off the event loop when
sampling is slow) stats the directory and lists it only when its modification time changed (or changed so recently
that a second change in the same timestamp tick could hide: racy-git's rule); only new or changed files are read.
A file that does not parse is retried whenever it changes, and reported once, after :data:`SETTLE_S` so that a
file caught while a non-atomic writer is still writing it is not reported. Lookups (:meth:`~SlurmSpool.meta`,
:meth:`~SlurmSpool.ended`) only read memory.

Memory: a job is held from its ``.json`` until the ledger has written it and calls :meth:`~SlurmSpool.forget`,
which also deletes the job's two files (the spool is a hand-off, not an archive). Without a ledger at most
``max_jobs`` jobs are held: beyond, the ones that ended first, then the oldest, are dropped.

Trust: the labels and the ledger believe these files, so a spool directory writable by every user is refused
(logged once); the shipped scripts create it ``0755 root``. Symbolic links are not followed.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from carbond.logs import get_logger

log = get_logger("carbond.slurm.spool")

SPOOL_DIR = Path("/run/carbond/slurm")  # default of attribution.slurm.spool_dir
MAX_JOBS = 4096  # jobs held at most when nothing forgets them
MAX_FILE_BYTES = 64 * 1024  # a larger spool file is malformed
MAX_VALUE_CHARS = 1024
SETTLE_S = 2.0  # a file or directory changed this recently may still change within the same timestamp tick
_RECHECK = 64  # unparsable files re-stat'ed per refresh, at most
_NAME = re.compile(r"^job_([0-9]{1,20})\.(json|end)$")
_TEXT_KEYS = ("user", "uid", "account", "partition", "name", "nodes")
Stamp = tuple[int, int, int]  # inode, mtime_ns, size: a file replaced or rewritten gets a new one


@dataclass(frozen=True, slots=True)
class JobMeta:
    """One job's metadata as its Prolog wrote it (empty strings where the Prolog had nothing)."""

    job_id: str
    user: str = ""
    uid: str = ""
    account: str = ""
    partition: str = ""
    name: str = ""
    nodes: str = ""  # Slurm's hostlist expression, e.g. "n[01-04]"
    start: float | None = None  # epoch seconds


@lru_cache(maxsize=1024)
def user_name(uid: str) -> str:
    """The user name of ``uid`` (through NSS, once per uid), else the uid itself; "" for ""."""
    if not uid:
        return ""
    try:
        return pwd.getpwuid(int(uid)).pw_name
    except (KeyError, ValueError, OverflowError):
        return uid


def _document(job_id: str, data: bytes) -> Mapping[str, object]:
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    doc = json.loads(data)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, found {type(doc).__name__}")
    found = doc.get("job_id")
    if found is not None and str(found) != job_id:
        raise ValueError(f"job_id {found!r} does not match the file name's {job_id}")
    return doc


def _text(doc: Mapping[str, object], key: str) -> str:
    value = doc.get(key)
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a uid written as a number
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, found {type(value).__name__}")
    if len(value) > MAX_VALUE_CHARS:
        raise ValueError(f"{key}: longer than {MAX_VALUE_CHARS} characters")
    return value


def _seconds(doc: Mapping[str, object], key: str) -> float | None:
    value = doc.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{key}: expected epoch seconds, found {type(value).__name__}")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{key}: {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{key}: {value!r} is not a time")
    return seconds


def parse_meta(job_id: str, data: bytes) -> JobMeta:
    """A ``job_<id>.json`` file's metadata; ValueError saying what is wrong."""
    doc = _document(job_id, data)
    user, uid, account, partition, name, nodes = (_text(doc, k) for k in _TEXT_KEYS)
    return JobMeta(job_id, user, uid, account, partition, name, nodes, _seconds(doc, "start"))


def parse_end(job_id: str, data: bytes, mtime: float) -> float:
    """A ``job_<id>.end`` file's end time (``mtime`` when the file is empty or gives none); ValueError."""
    if not data.strip():
        return mtime
    end = _seconds(_document(job_id, data), "end")
    return mtime if end is None else end


@dataclass(slots=True)
class _Seen:
    stamp: Stamp
    state: Literal["ok", "pending", "bad", "ignored"]  # pending: unparsable but maybe still being written
    reason: str = ""


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return os.read(fd, MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)


class SlurmSpool:
    """The jobs the spool directory describes. ``refresh()`` does the IO (call it off the event loop, or where a
    few small reads are acceptable); the other methods only read memory, and are safe from another thread.
    ``generation`` grows whenever a job's metadata is added or changed (the attributor relabels then)."""

    def __init__(self, directory: Path = SPOOL_DIR, *, max_jobs: int = MAX_JOBS, wall: Callable[[], float] = time.time):
        self.directory = directory
        self.generation = 0
        self._dir = str(directory)
        self._max = max_jobs
        self._wall = wall
        self._lock = threading.Lock()
        self._meta: dict[str, JobMeta] = {}
        self._ends: dict[str, float] = {}
        self._files: dict[str, _Seen] = {}
        self._dir_mtime: int | None = None
        self._racy = True
        self._problem = ""  # the directory's last problem, logged once per streak
        self.scans = 0  # listings of the directory (tests check the spool is not listed every tick)
        self.reads = 0  # files read and parsed

    def meta(self, job_id: str) -> JobMeta | None:
        return self._meta.get(job_id)

    def ended(self) -> list[tuple[str, float]]:
        """(job id, end epoch seconds) of every job whose ``.end`` was read and not yet forgotten, oldest first."""
        with self._lock:
            return sorted(self._ends.items(), key=lambda item: (item[1], item[0]))

    def forget(self, job_id: str) -> None:
        """Drop a job (its ledger record is written) and delete its spool files."""
        with self._lock:
            self._meta.pop(job_id, None)
            self._ends.pop(job_id, None)
            for name in (f"job_{job_id}.json", f"job_{job_id}.end"):
                try:
                    os.unlink(f"{self._dir}/{name}")
                except FileNotFoundError:
                    pass
                except OSError as exc:  # read-only spool: keep ignoring the file while it stays as it is
                    seen = self._files.get(name)
                    if seen is not None and seen.state != "ignored":
                        log.warning("slurm_spool_unlink_failed", file=name, error=str(exc))
                        seen.state = "ignored"
                    continue
                self._files.pop(name, None)

    def refresh(self) -> None:
        """Read what changed in the spool since the last call; never raises."""
        now = self._wall()
        try:
            st = os.stat(self._dir)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(f"{self._dir} is not a directory")
            if st.st_mode & stat.S_IWOTH:
                raise PermissionError(f"{self._dir} is writable by every user: its files are not trusted")
        except OSError as exc:
            self._report(str(exc))
            return
        with self._lock:
            if st.st_mtime_ns != self._dir_mtime or self._racy:
                try:
                    self._scan(now)
                except OSError as exc:  # vanished or unreadable between the stat and the listing
                    self._report(str(exc))
                    return
                self._dir_mtime = st.st_mtime_ns
                self._racy = now - st.st_mtime < SETTLE_S
            else:
                self._recheck(now)
            self._evict()
        self._report("")

    def _report(self, problem: str) -> None:
        if problem and problem != self._problem:
            log.warning("slurm_spool_unreadable", directory=self._dir, error=problem)
        elif not problem and self._problem:
            log.info("slurm_spool_readable", directory=self._dir)
        self._problem = problem

    def _scan(self, now: float) -> None:
        self.scans += 1
        present: set[str] = set()
        with os.scandir(self._dir) as it:
            for entry in it:
                m = _NAME.match(entry.name)
                if m is None:
                    continue  # temporary names of the atomic writes, anything else
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # renamed or deleted since the listing
                if stat.S_ISREG(st.st_mode):
                    present.add(entry.name)
                    self._consider(entry.name, m.group(1), m.group(2), st, now)
        for name in self._files.keys() - present:
            del self._files[name]  # the job stays known until forgotten

    def _recheck(self, now: float) -> None:
        """Files that did not parse, which a non-atomic writer may complete without touching the directory."""
        retry = [name for name, seen in self._files.items() if seen.state in ("pending", "bad")][:_RECHECK]
        for name in retry:
            m = _NAME.match(name)
            try:
                st = os.stat(f"{self._dir}/{name}", follow_symlinks=False)
            except OSError:
                continue  # gone: the next listing (the directory changed) drops it
            if m is not None and stat.S_ISREG(st.st_mode):
                self._consider(name, m.group(1), m.group(2), st, now)

    def _consider(self, name: str, job_id: str, kind: str, st: os.stat_result, now: float) -> None:
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        seen = self._files.get(name)
        if seen is not None and seen.stamp == stamp:
            if seen.state == "pending" and now - st.st_mtime >= SETTLE_S:
                log.warning("slurm_spool_file_malformed", file=f"{self._dir}/{name}", error=seen.reason)
                seen.state = "bad"
            return
        self.reads += 1
        try:
            data = _read(f"{self._dir}/{name}")
            if kind == "json":
                meta = parse_meta(job_id, data)
                if self._meta.get(job_id) != meta:
                    self._meta[job_id] = meta
                    self.generation += 1
            else:
                self._ends[job_id] = parse_end(job_id, data, st.st_mtime)
        except (OSError, ValueError) as exc:
            settled = now - st.st_mtime >= SETTLE_S
            if settled:
                log.warning("slurm_spool_file_malformed", file=f"{self._dir}/{name}", error=str(exc))
            self._files[name] = _Seen(stamp, "bad" if settled else "pending", str(exc))
            return
        if seen is not None and seen.state in ("pending", "bad"):
            log.info("slurm_spool_file_read", file=f"{self._dir}/{name}")
        self._files[name] = _Seen(stamp, "ok")

    def _evict(self) -> None:
        """Hold at most ``max_jobs`` jobs: those that ended first go first, then the oldest."""
        over = max(len(self._meta), len(self._ends)) - self._max
        if over <= 0:
            return
        ended = sorted(self._ends, key=lambda j: (self._ends[j], j))
        running = sorted(self._meta.keys() - self._ends.keys(), key=lambda j: (self._meta[j].start or 0.0, j))
        dropped = (ended + running)[:over]
        log.warning("slurm_spool_full", max_jobs=self._max, dropped=len(dropped))
        for job_id in dropped:
            self._meta.pop(job_id, None)
            self._ends.pop(job_id, None)
            for name in (f"job_{job_id}.json", f"job_{job_id}.end"):
                if (seen := self._files.get(name)) is not None:
                    seen.state = "ignored"
