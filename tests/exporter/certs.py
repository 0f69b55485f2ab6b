"""Real certificates made by openssl for the TLS tests: a CA, certificates it signs, and self-signed ones."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.harness.tools import require_tool


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl", "openssl"), *args], check=True, capture_output=True, timeout=60)


def self_signed(tmp: Path, name: str, cn: str = "localhost", san: str = "IP:127.0.0.1") -> Pair:
    pair = Pair(tmp / f"{name}.crt", tmp / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", f"/CN={cn}", "-addext", f"subjectAltName={san}", "-keyout", str(pair.key), "-out", str(pair.cert),
    )  # fmt: skip
    return pair


def signed(tmp: Path, name: str, ca: Pair, cn: str, san: str) -> Pair:
    """A certificate for ``cn`` with the given subjectAltName, signed by ``ca``."""
    pair, csr = Pair(tmp / f"{name}.crt", tmp / f"{name}.key"), tmp / f"{name}.csr"
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-subj", f"/CN={cn}", "-keyout", str(pair.key), "-out", str(csr),
    )  # fmt: skip
    ext = tmp / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(pair.cert),
    )  # fmt: skip
    return pair


def ca(tmp: Path, name: str = "ca") -> Pair:
    pair = Pair(tmp / f"{name}.crt", tmp / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign", "-keyout", str(pair.key), "-out", str(pair.cert),
    )  # fmt: skip
    return pair
