"""The ledger's files: ``ledger.jsonl`` (appended, fsynced, rotated by size) and ``open.json`` (the jobs in progress,
replaced atomically), both in the ledger directory. Blocking: called from the ledger's worker thread."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from carbond.logs import get_logger

log = get_logger("carbond.slurm.ledger")

LEDGER_NAME = "ledger.jsonl"
OPEN_NAME = "open.json"
OPEN_SCHEMA = "carbond.slurm.open/1"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ledger_files(directory: Path) -> list[Path]:
    """The ledger and its rotated files, oldest first."""
    rotated = []
    for p in directory.glob(f"{LEDGER_NAME}.*"):
        suffix = p.name.removeprefix(f"{LEDGER_NAME}.")
        if suffix.isdigit():
            rotated.append((int(suffix), p))
    current = directory / LEDGER_NAME
    return [p for _, p in sorted(rotated, reverse=True)] + ([current] if current.exists() else [])


class LedgerFile:
    """``<directory>/ledger.jsonl``: whole lines appended and fsynced; before a line would take it past
    ``max_bytes`` it becomes ``ledger.jsonl.1`` (the older ones shift up to ``.<keep>``, the oldest is dropped)."""

    def __init__(self, directory: Path, max_bytes: int, keep: int) -> None:
        self.directory = directory
        self.path = directory / LEDGER_NAME
        self.max_bytes = max_bytes
        self.keep = keep

    def append(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        data = "".join(line.rstrip("\n") + "\n" for line in lines).encode()
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.max_bytes:
            self._rotate()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if not size:
            _fsync_dir(self.directory)

    def _rotate(self) -> None:
        if self.keep <= 0:
            self.path.unlink(missing_ok=True)
            return
        (self.directory / f"{LEDGER_NAME}.{self.keep}").unlink(missing_ok=True)
        for i in range(self.keep - 1, 0, -1):
            older = self.directory / f"{LEDGER_NAME}.{i}"
            if older.exists():
                older.replace(self.directory / f"{LEDGER_NAME}.{i + 1}")
        self.path.replace(self.directory / f"{LEDGER_NAME}.1")
        _fsync_dir(self.directory)


def save_open(directory: Path, doc: dict[str, Any]) -> None:
    """Replace ``open.json`` atomically (temporary file, fsync, rename)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    target = directory / OPEN_NAME
    tmp = directory / f".{OPEN_NAME}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, json.dumps({"schema": OPEN_SCHEMA, **doc}, allow_nan=False).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(target)
    _fsync_dir(directory)


def load_open(directory: Path, host: str) -> dict[str, Any] | None:
    """The saved jobs in progress of ``host``; None (logged when it is not readable) when there are none."""
    path = directory / OPEN_NAME
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("slurm_open_jobs_unreadable", path=str(path), error=str(exc), kept="nothing: starting empty")
        with contextlib.suppress(OSError):
            path.replace(path.with_name(OPEN_NAME + ".bad"))
        return None
    if not isinstance(doc, dict) or doc.get("schema") != OPEN_SCHEMA or doc.get("host") != host:
        log.warning("slurm_open_jobs_ignored", path=str(path), reason="another schema or host")
        return None
    return doc
