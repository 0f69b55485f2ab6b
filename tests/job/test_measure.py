from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from carbond.cli import main
from carbond.job.report import load_json
from tests.harness.wait import NotYet, eventually

from .conftest import assert_ratio, burn


def _measure(config: Path, *extra: str, code: str) -> int:
    return main(["measure", "--config", str(config), "-q", *extra, "--", sys.executable, "-c", code])


def test_cpu_burning_child_exit_code_and_ratio(fake_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    started = time.monotonic()
    rc = _measure(fake_config, "--json", str(out), "--attribution", "proctree", code=burn(0.4, code=5))
    assert rc == 5
    r = load_json(out)
    assert r.exit_code == 5
    assert r.command is not None
    assert r.command[0] == sys.executable
    assert (r.scope, r.method) == ("job", "proctree")
    assert 0.4 <= r.duration_s <= time.monotonic() - started
    assert_ratio(r.energy_j, r.emissions_g)
    assert_ratio(r.machine_energy_j, r.machine_emissions_g)
    # the job burned about one CPU: a real share of the CPU energy, never more than the machine's
    assert 0 < r.energy_by_kind_j["cpu"] <= r.machine_energy_j
    assert r.energy_j <= r.machine_energy_j
    # the machine drew 40 W (package) + 6 W (dram) + 100 W (gpu) for the whole run; core is inside the package
    assert r.machine_energy_j == pytest.approx(146.0 * r.duration_s, rel=0.1)
    assert r.energy_by_kind_j.get("gpu", 0.0) == 0.0  # no GPU process shares: none of the GPU is the job's
    assert {d.device for d in r.devices} == {"package-0", "core-0", "dram-0", "gpu-0"}
    doc = json.loads(out.read_text())
    assert doc["schema"] == "carbond.job.report/1"
    assert doc["intensity"]["zone"] == "FR"
    assert doc["intensity"]["provider"] == "static"
    assert set(doc["equivalents"]) >= {"car_km", "tv_hours", "household_days", "sources"}


def test_auto_attribution_says_which_method(fake_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    assert _measure(fake_config, "--json", str(out), code=burn(0.3)) == 0
    r = load_json(out)
    assert r.method in ("cgroup", "systemd", "proctree")
    assert r.scope == "job"
    assert r.method_detail
    assert_ratio(r.energy_j, r.emissions_g)


def test_machine_attribution_reports_the_whole_machine(fake_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    assert _measure(fake_config, "--json", str(out), "--attribution", "machine", code=burn(0.2)) == 0
    r = load_json(out)
    assert (r.scope, r.method) == ("machine", "machine")
    assert r.energy_j == r.machine_energy_j > 0
    assert_ratio(r.energy_j, r.emissions_g)


def test_missing_command_and_no_command(fake_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "--config", str(fake_config), "-q", "--", "/nonexistent/cmd"]) == 127
    assert main(["measure", "--config", str(fake_config)]) == 2
    assert "no command" in capsys.readouterr().err


def test_summary_on_stderr_child_output_untouched(fake_config: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "--config", str(fake_config), "--", "echo", "hello"]) == 0
    out, err = capfd.readouterr()
    assert out == "hello\n"
    for word in ("duration", "energy", "emissions", "intensity", "PUE", "equivalents", "attribution"):
        assert word in err


def test_measure_failure_never_breaks_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sensors: [rapl]\npaths: {{sysfs: {tmp_path / 'nosys'}}}\nmeasure_power_secs: 0.2\n")
    out = tmp_path / "r.json"
    rc = _measure(cfg, "--json", str(out), code="import sys; sys.exit(4)")  # -q: the failure is still an error line
    assert rc == 4
    err = capsys.readouterr().err
    assert err.startswith("carbond: error: not measured: no sensor available")
    assert "Warning" not in err
    assert main(["measure", "--config", str(cfg), "--", "true"]) == 0  # not quiet: a plain warning line, no file:line
    err = capsys.readouterr().err
    assert "carbond: warning: not measuring: no sensor available" in err
    assert "MeasurementWarning" not in err
    r = load_json(out)
    assert r.scope == "none"
    assert "no sensor available" in r.error
    assert r.exit_code == 4


def _child(ready: Path, handler: bool) -> str:
    lines = ["import signal, sys, time, pathlib"]
    if handler:
        lines += ["signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))"]
        lines += ["signal.signal(signal.SIGINT, lambda *a: sys.exit(43))"]
    lines += [f"pathlib.Path({str(ready)!r}).touch()", "print('ready', flush=True)", "time.sleep(30)"]
    return "\n".join(lines)


def _when_ready(ready: Path, action: Callable[[], None]) -> threading.Thread:
    def wait() -> None:
        with contextlib.suppress(NotYet):  # act anyway: the test then fails on the child's exit code
            eventually(ready.exists, what=f"{ready} from the child")
        action()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("handler", "expected"), [(True, 42), (False, 128 + signal.SIGTERM)])
def test_sigterm_is_forwarded(fake_config: Path, tmp_path: Path, handler: bool, expected: int) -> None:
    ready = tmp_path / "ready"
    thread = _when_ready(ready, lambda: os.kill(os.getpid(), signal.SIGTERM))  # to carbond measure: this process
    before = signal.getsignal(signal.SIGTERM)
    assert _measure(fake_config, code=_child(ready, handler)) == expected
    thread.join(5)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_sigint_is_forwarded(fake_config: Path, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = [sys.executable, "-c", _child(ready, True)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "carbond", "measure", "--config", str(fake_config), "-q", "--", *child],
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # away from any terminal: only carbond gets the signal, and must forward it
    )
    try:
        _when_ready(ready, lambda: os.kill(proc.pid, signal.SIGINT)).join(25)
        assert proc.wait(timeout=20) == 43
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
