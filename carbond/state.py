"""Restart-safe counters: per-device totals and raw hardware counters persisted under ``state_dir``.

Written atomically (two slots in turn, see StateStore) after every tick and fsynced (file and directory) every
``DURABLE_EVERY_S`` and at shutdown: a crash or ``kill -9`` of carbond loses nothing, a power loss at most that
long. After a restart the exported counters continue from the saved totals, so Prometheus sees no reset. When the
boot is the same (``/proc/sys/kernel/random/boot_id``) and a device reports its raw hardware counter, the energy
used while carbond was down is added too, provided the downtime was short enough that the counter cannot have
wrapped more than once.
A corrupted, truncated or foreign file is logged and ignored, never a crash; so is anything at the path that is
not a regular file of at most two slots (a FIFO, a device, a huge file): it is opened non-blocking and never read
beyond ``MAX_FILE_BYTES``. One daemon at a time uses a ``state_dir``: a second one gets :class:`StateDirInUse`, for
as long as the first runs (its :class:`StateLock` outlives reloads).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import math
import os
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carbond.errors import CarbondError
from carbond.logs import get_logger

log = get_logger("carbond.state")


class StateDirInUse(CarbondError):
    """Another process holds the lock of the state directory (two daemons must not write one state file)."""

    def __init__(self, state_dir: Path, holder: str) -> None:
        self.state_dir = state_dir
        who = f"process {holder}" if holder else "another process"
        super().__init__(
            f"state_dir {state_dir} is in use by {who}: run one carbond per state_dir (set state_dir to another "
            "directory for a second daemon)"
        )


def _flock(state_dir: Path) -> int | None:
    """A descriptor holding ``state_dir``'s lock (the holder's pid written in it); StateDirInUse when another
    process has it, None (logged) when the directory or the lock file cannot be made."""
    path = state_dir / LOCK_NAME
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        log.warning("state_lock_unavailable", path=str(path), error=str(exc))
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise StateDirInUse(state_dir, holder) from None
        log.warning("state_lock_unavailable", path=str(path), error=str(exc))
        return None
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class StateLock:
    """A state directory's lock held by this process until :meth:`release`, whatever stores open and close on it.

    The daemon takes one for its state_dir at start and keeps it across SIGHUP reloads, which close and reopen the
    pipeline's :class:`StateStore`: were the store's own lock released in between, a second daemon starting in
    that gap would take the directory and the first would fail its next build.
    """

    _held: dict[Path, StateLock] = {}  # noqa: RUF012 (per process, by directory)

    def __init__(self, state_dir: Path, fd: int | None) -> None:
        self.state_dir, self._fd = state_dir, fd

    @staticmethod
    def key(state_dir: Path) -> Path:
        """The directory as the locks of this process are known by (absolute, symbolic links left as they are)."""
        return Path(os.path.abspath(state_dir))

    @classmethod
    def held(cls, state_dir: Path) -> StateLock | None:
        return cls._held.get(cls.key(state_dir))

    @classmethod
    def acquire(cls, state_dir: Path) -> StateLock:
        """The lock of ``state_dir``, the one already held when this process has it; StateDirInUse when another
        process does. A directory that cannot be made gives a lock holding nothing (logged, as a store does)."""
        held = cls.held(state_dir)
        if held is not None:
            return held
        lock = cls(state_dir, _flock(state_dir))
        if lock._fd is not None:  # one holding nothing leaves each store to try (and log) for itself
            cls._held[cls.key(state_dir)] = lock
        return lock

    def release(self) -> None:
        if self._held.get(self.key(self.state_dir)) is self:
            del self._held[self.key(self.state_dir)]
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _open_regular(path: Path, flags: int, mode: int = 0o600) -> int:
    """A descriptor on ``path`` opened without blocking (a FIFO would hang open and read); OSError unless it is a
    regular file of at most MAX_FILE_BYTES."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise OSError(errno.EFBIG, f"{st.st_size} bytes, more than a state file's {MAX_FILE_BYTES}")
    except BaseException:
        os.close(fd)
        raise
    return fd


FORMAT = "carbond-state/1"
MAGIC = b"CBDSTAT1"
_HEADER = struct.Struct("<8sQII")  # magic, sequence number, body length, CRC-32 of the body
SLOT_BYTES = 1 << 20  # two slots; the file is sparse, its blocks only what the records use
MAX_FILE_BYTES = 2 * SLOT_BYTES
LOCK_NAME = "carbond.lock"
#: Seconds between fsynced saves; the saves between them are atomic but not flushed (see StateStore.save).
DURABLE_EVERY_S = 60.0


@dataclass(slots=True)
class DeviceTotals:
    energy_j_total: float
    emissions_g_total: float
    raw_j: float | None = None  # the hardware counter at the last reading, where the sensor reports it
    range_j: float | None = None  # the counter's wrap range


@dataclass(slots=True)
class SavedState:
    host: str
    boot_id: str
    saved_wall: float
    node_energy_j_total: float = 0.0
    node_emissions_g_total: float = 0.0
    devices: dict[str, DeviceTotals] = field(default_factory=dict)
    embodied_g_total: dict[str, float] = field(default_factory=dict)  # per device; a document without it decodes as {}


def read_boot_id(procfs: Path) -> str:
    try:
        return (procfs / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _finite(value: Any, name: str) -> float:
    try:  # float() of a huge JSON integer raises OverflowError, which must not escape as a crash
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} is not a finite non-negative number")
    return number


def _optional(value: Any, name: str) -> float | None:
    return None if value is None else _finite(value, name)


def decode(data: Any, host: str) -> SavedState:
    """Validate a parsed state document; ValueError says what is wrong."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not a carbond state file of this version")
    if data.get("host") != host:
        raise ValueError(f"written for host {data.get('host')!r}, not {host!r}")
    devices_raw = data.get("devices")
    if not isinstance(devices_raw, dict):
        raise ValueError("devices is not a mapping")
    devices = {}
    for key, d in devices_raw.items():
        if not isinstance(key, str) or not isinstance(d, dict):
            raise ValueError("malformed device entry")
        devices[key] = DeviceTotals(
            _finite(d.get("energy_j_total"), f"{key}.energy_j_total"),
            _finite(d.get("emissions_g_total"), f"{key}.emissions_g_total"),
            _optional(d.get("raw_j"), f"{key}.raw_j"),
            _optional(d.get("range_j"), f"{key}.range_j"),
        )
    embodied_raw = data.get("embodied_g_total", {})
    if not isinstance(embodied_raw, dict) or not all(isinstance(k, str) for k in embodied_raw):
        raise ValueError("embodied_g_total is not a mapping")
    embodied = {k: _finite(v, f"embodied_g_total.{k}") for k, v in embodied_raw.items()}
    boot_id = data.get("boot_id")
    if not isinstance(boot_id, str):
        raise ValueError("boot_id is not a string")
    return SavedState(
        host=host,
        boot_id=boot_id,
        saved_wall=_finite(data.get("saved_wall"), "saved_wall"),
        node_energy_j_total=_finite(data.get("node_energy_j_total"), "node_energy_j_total"),
        node_emissions_g_total=_finite(data.get("node_emissions_g_total"), "node_emissions_g_total"),
        devices=devices,
        embodied_g_total=embodied,
    )


@functools.lru_cache(maxsize=4096)
def _q(text: str) -> str:
    """``text`` as a JSON string, memoised: host, boot id and device keys repeat every tick."""
    return json.dumps(text)


def _n(value: float | None) -> str:
    return "null" if value is None else repr(float(value))  # a finite float's repr is a JSON number


def encode(state: SavedState) -> bytes:
    """The state record's JSON, built as one string rather than through json.dumps of a dict: it runs every tick.

    The same document ``decode`` reads: ``json.loads(encode(s))`` equals the dict json.dumps would have written.
    """
    devices = ",".join(
        f'{_q(k)}:{{"energy_j_total":{_n(d.energy_j_total)},"emissions_g_total":{_n(d.emissions_g_total)},'
        f'"raw_j":{_n(d.raw_j)},"range_j":{_n(d.range_j)}}}'
        for k, d in state.devices.items()
    )
    embodied = ",".join(f"{_q(k)}:{_n(v)}" for k, v in state.embodied_g_total.items())
    return (
        f'{{"format":{_q(FORMAT)},"host":{_q(state.host)},"boot_id":{_q(state.boot_id)},'
        f'"saved_wall":{_n(state.saved_wall)},"node_energy_j_total":{_n(state.node_energy_j_total)},'
        f'"node_emissions_g_total":{_n(state.node_emissions_g_total)},"devices":{{{devices}}},'
        f'"embodied_g_total":{{{embodied}}}}}'
    ).encode()


class StateStore:
    """Loads and saves :class:`SavedState` in ``state_dir/counters.state``: two slots written in turn.

    Each save is one ``pwrite`` of a record (magic, sequence number, length, CRC-32, JSON) into the slot the
    previous save did not use, so a torn write (crash mid-save) damages only the record being written and load
    takes the intact record with the highest sequence number. That is the guarantee of temp-file-and-rename
    without a rename per tick, which costs ext4 a forced writeback each time. Any other file in ``state_dir`` is
    ignored.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "counters.state"
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._seq = 0

    def lock(self) -> None:
        """Take the state directory's lock for the life of this store; StateDirInUse when another process has it.

        Nothing to take when this process already holds it (:class:`StateLock`, the daemon's, kept across reloads):
        the store then leaves it to its holder. A directory that cannot be created or written is left to the saves,
        which count and log their failures.
        """
        if self._lock_fd is None and StateLock.held(self.path.parent) is None:
            self._lock_fd = _flock(self.path.parent)

    def _records(self, data: bytes) -> list[tuple[int, bytes]]:
        found = []
        for slot in (0, 1):
            at = slot * SLOT_BYTES
            head = data[at : at + _HEADER.size]
            if len(head) < _HEADER.size:
                continue
            magic, seq, length, crc = _HEADER.unpack(head)
            body = data[at + _HEADER.size : at + _HEADER.size + length]
            if magic == MAGIC and len(body) == length and zlib.crc32(body) == crc:
                found.append((seq, body))
        return sorted(found, reverse=True)

    def load(self, host: str) -> SavedState | None:
        try:
            fd = _open_regular(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("state_unreadable", path=str(self.path), error=str(exc))
            return None
        try:
            data = os.pread(fd, MAX_FILE_BYTES, 0)
        except OSError as exc:
            log.warning("state_unreadable", path=str(self.path), error=str(exc))
            return None
        finally:
            os.close(fd)
        records = self._records(data)
        if not records:
            log.warning("state_ignored", path=str(self.path), reason="no intact record")
            return None
        self._seq = records[0][0]
        state: SavedState | None = None
        reasons: list[str] = []
        for _, body in records:  # the newest intact record that decodes
            try:
                state = decode(json.loads(body), host)
                break
            except (ValueError, RecursionError) as exc:
                reasons.append(str(exc) or type(exc).__name__)
        if reasons:  # one line per load, whatever the number of slots ignored
            reason = "; ".join(dict.fromkeys(reasons))
            log.warning("state_ignored", path=str(self.path), reason=reason, records=len(reasons), restored=bool(state))
        return state

    def _open(self) -> int:
        if self._fd is not None:
            try:  # the file was removed or replaced behind our back: write to the one at the path again
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    return self._fd
            except OSError:
                pass
            self._close_file()
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        self._fd = _open_regular(self.path, os.O_RDWR | os.O_CREAT)
        records = self._records(os.pread(self._fd, 2 * SLOT_BYTES, 0))
        self._seq = max(self._seq, records[0][0] if records else 0)  # never write below a record already there
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self._fd

    def save(self, state: SavedState, durable: bool = True) -> None:
        """Write one record; raises OSError (the caller counts it and goes on measuring).

        ``durable`` adds an fsync, so the record survives a power loss; without it, it survives a crash or kill of
        carbond (the page cache outlives the process).
        """
        self.write(encode(state), durable)

    def write(self, body: bytes, durable: bool = True) -> None:
        """Write one record holding ``body`` (a state document's JSON) into the slot not used last."""
        if _HEADER.size + len(body) > SLOT_BYTES:
            raise OSError(errno.EFBIG, f"state record of {len(body)} bytes exceeds the slot")
        fd = self._open() if self._fd is None or durable else self._fd
        seq = self._seq + 1
        record = _HEADER.pack(MAGIC, seq, len(body), zlib.crc32(body)) + body
        if os.pwrite(fd, record, (seq % 2) * SLOT_BYTES) != len(record):
            raise OSError(errno.EIO, "short write of the state record")
        self._seq = seq
        if durable:
            os.fsync(fd)

    def _close_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Close the file and release the state directory's lock."""
        self._close_file()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None


def downtime_joules(
    saved: DeviceTotals, raw_j: float | None, range_j: float | None, downtime_s: float, max_power_w: float
) -> float | None:
    """Energy the hardware counter recorded while carbond was down, or None when it cannot be known exactly.

    Known only if the counter's range is known and the downtime is too short for two wraps at ``max_power_w``.
    """
    if saved.raw_j is None or raw_j is None or range_j is None or range_j <= 0 or downtime_s < 0:
        return None
    if downtime_s * max_power_w >= range_j:
        return None
    delta = raw_j - saved.raw_j
    if delta < 0:
        delta += range_j
    return delta


class Persistence:
    """What the monitor uses: restored totals for devices it meets again, and a save after every tick.

    ``max_power_w`` bounds a device's power while carbond is down (the RAPL setting of that name): downtime energy
    is recovered only when the counter cannot have wrapped twice at that power.
    """

    def __init__(self, store: StateStore, host: str, boot_id: str, *, max_power_w: float) -> None:
        self._store = store
        self._host = host
        self._boot_id = boot_id
        self._max_power_w = max_power_w
        store.lock()  # StateDirInUse when another daemon writes there
        self.restored = store.load(host)
        self.errors_total = 0
        self._failing = False
        self._last_durable: float | None = None
        if self.restored is not None:
            log.info("state_restored", devices=len(self.restored.devices), same_boot=self.same_boot)

    @property
    def same_boot(self) -> bool:
        return self.restored is not None and bool(self._boot_id) and self.restored.boot_id == self._boot_id

    def node_totals(self) -> tuple[float, float]:
        r = self.restored
        return (r.node_energy_j_total, r.node_emissions_g_total) if r else (0.0, 0.0)

    def device(
        self, key: str, raw_j: float | None, range_j: float | None, now_wall: float
    ) -> tuple[float, float, float]:
        """(energy total, emissions total, energy used while down) for a device seen for the first time."""
        saved = self.restored.devices.get(key) if self.restored else None
        if saved is None or self.restored is None:
            return 0.0, 0.0, 0.0
        gap = 0.0
        if self.same_boot:
            down = downtime_joules(saved, raw_j, range_j, now_wall - self.restored.saved_wall, self._max_power_w)
            if down is None and saved.raw_j is not None:
                log.warning("downtime_energy_unknown", device=key)
            gap = down or 0.0
        return saved.energy_j_total, saved.emissions_g_total, gap

    def close(self) -> None:
        self._store.close()

    def durable_due(self, now: float) -> bool:
        """Whether the next save should be fsynced: every DURABLE_EVERY_S, and the first save."""
        if self._last_durable is None or now - self._last_durable >= DURABLE_EVERY_S:
            self._last_durable = now
            return True
        return False

    def save(self, state: SavedState, durable: bool = True) -> None:
        try:
            self._store.save(state, durable)
        except OSError as exc:
            self.errors_total += 1
            if not self._failing:
                log.warning("state_persist_failed", path=str(self._store.path), error=str(exc))
            self._failing = True
            return
        if self._failing:
            log.info("state_persist_recovered", path=str(self._store.path))
        self._failing = False

    def new_state(self, saved_wall: float) -> SavedState:
        return SavedState(host=self._host, boot_id=self._boot_id, saved_wall=saved_wall)
