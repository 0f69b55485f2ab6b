"""Spool files as the shipped Prolog and Epilog write them (a temporary name, then a rename into place)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def spool_dir(root: Path) -> Path:
    d = root / "spool"
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    return d


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_meta(spool: Path, job_id: int | str, **fields: object) -> Path:
    """``job_<id>.json``: the Prolog's fields (defaults for a job of user ada), overridden by ``fields``."""
    doc: dict[str, object] = {
        "job_id": str(job_id),
        "user": "ada",
        "uid": "1000",
        "account": "physics",
        "partition": "gpu",
        "name": "train",
        "nodes": "n[01-02]",
        "start": 1_718_000_000,
    }
    doc.update(fields)
    path = spool / f"job_{job_id}.json"
    _atomic(path, json.dumps(doc))
    return path


def write_end(spool: Path, job_id: int | str, end: float) -> Path:
    path = spool / f"job_{job_id}.end"
    _atomic(path, json.dumps({"job_id": str(job_id), "end": end}))
    return path
