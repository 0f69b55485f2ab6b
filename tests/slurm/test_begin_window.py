"""examples/slurm/begin_window.py against the real Prometheus server scraping the real daemon, whose Electricity Maps
provider is a loopback fake forecasting 120, 110, 95, 60, 80 ... g/kWh per hour from the current one (103 now): the
lowest window starts 3 hours after the start of the hour the forecast was fetched in. Then a real ``sbatch`` reads
the printed time."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from carbond.testing.provider_fakes import FakeElectricityMaps, FakeInThread
from carbond.testing.slurm import SlurmCluster, can_create_cgroups
from tests.harness.daemon import Daemon, free_port
from tests.harness.skips import host_lacks, skip_or_fail
from tests.harness.tools import require_tool
from tests.harness.wait import eventually

pytestmark = pytest.mark.e2e
SCRIPT = Path(__file__).parent.parent.parent / "examples" / "slurm" / "begin_window.py"
TOKEN_ENV = "CARBOND_BEGIN_WINDOW_EM_TOKEN"
TOKEN = "begin-window-token"
#: Prometheus up and holding a few scrapes: seconds when quiet, many more on a loaded 2-core machine.
PROMETHEUS_TIMEOUT_S = 120.0


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("begin_window", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Run:
    code: int
    out: str
    err: str


def run(*args: str) -> Run:
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    return Run(out.returncode, out.stdout, out.stderr)


@contextmanager
def prometheus_scraping(tmp_path: Path, target_port: int) -> Iterator[str]:
    binary = require_tool("prometheus", "prometheus")
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    scrape = {"job_name": "carbond", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}
    cfg.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": [scrape]}))
    argv = [binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"]
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen([*argv, f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_begin_window_from_carbonds_forecast_through_prometheus(tmp_path: Path) -> None:
    script = load_script()
    fetched_from = time.time() // 3600 * 3600
    with FakeInThread(FakeElectricityMaps(token=TOKEN)) as em:
        intensity = {
            "zone": "FR",
            "providers": ["electricitymaps", "static"],
            "electricitymaps": {"base_url": em.url, "token_env": TOKEN_ENV},
        }
        cfg = {"measure_power_secs": 1, "sensors": ["fake"], "intensity": intensity}
        with Daemon(tmp_path, cfg, env={TOKEN_ENV: TOKEN}) as d, prometheus_scraping(tmp_path, d.port) as prom:

            def forecast_scraped() -> bool:
                return bool(script.lowest_window(prom, "FR")) and script.current_intensity(prom, "FR") == 103.0

            eventually(forecast_scraped, PROMETHEUS_TIMEOUT_S, max_interval=1.0, ignore=(script.PrometheusError,))
            best = run("--prometheus", prom, "--zone", "FR")
            capped = run("--prometheus", prom, "--zone", "FR", "--max-wait", "1")
            worth_it = run("--prometheus", prom, "--zone", "FR", "--min-saving", "40")
            not_worth_it = run("--prometheus", prom, "--zone", "FR", "--min-saving", "45")
            other_zone = run("--prometheus", prom, "--zone", "DE")
        fetched_to = time.time() // 3600 * 3600
    # the lowest forecast (60 g/kWh) starts 3 h after the hour the forecast was fetched in
    expected = {f"--begin={script.slurm_time(h + 3 * 3600)}\n" for h in (fetched_from, fetched_to)}
    assert best.code == 0, best
    assert best.out in expected, (best, expected)
    assert "60 g/kWh" in best.err, best
    assert "103 now" in best.err, best
    assert worth_it.out == best.out  # 60 against 103 saves 42 %
    for r in (capped, not_worth_it, other_zone):
        assert (r.code, r.out) == (0, "--begin=now\n"), r
    assert "beyond --max-wait" in capped.err
    assert "under --min-saving" in not_worth_it.err
    assert "no forecast" in other_zone.err
    gone = run("--prometheus", prom)  # Prometheus stopped: an error, not a silent "now"
    assert (gone.code, gone.out) == (2, ""), gone
    assert "begin_window:" in gone.err, gone


def test_choose_rules() -> None:
    """The choice on its own, at a fixed time: now, later, or now again past the limits."""
    script = load_script()
    now = 1_800_000_000.0
    window = script.Window(now + 7200, 60.0, "FR", "electricitymaps")
    assert script.choose(window, 103.0, now, 24.0, 0.0) == script.slurm_time(now + 7200)
    assert script.choose(window._replace(begin=now + 30), 103.0, now, 24.0, 0.0) == "now"
    assert script.choose(window, 103.0, now, 1.5, 0.0) == "now"
    assert script.choose(window, 62.0, now, 24.0, 5.0) == "now"  # 3 % saved
    assert script.choose(window, None, now, 24.0, 5.0) == script.slurm_time(now + 7200)  # nothing to compare with
    assert script.choose(None, 103.0, now, 24.0, 0.0) == "now"
    assert script.slurm_time(now + 7200 + 29) == script.slurm_time(now + 7200)  # to the minute


def test_sbatch_reads_the_printed_time(tmp_path: Path) -> None:
    """A real ``sbatch --begin=<printed>`` holds the job until exactly that time."""
    for tool, package in (("slurmctld", "slurmctld"), ("munged", "munge"), ("sbatch", "slurm-client")):
        require_tool(tool, package)
    if os.geteuid() != 0:
        skip_or_fail("the real Slurm tests start slurmctld, slurmd and munged as root")
    why = can_create_cgroups()  # slurmd's proctrack/cgroup needs them to start
    if why:
        host_lacks("writable-cgroup2", why)
    script = load_script()
    begin = script.slurm_time(time.time() + 3 * 3600)
    with SlurmCluster(tmp_path) as cluster:
        job_id = cluster.sbatch(f"--begin={begin}", "--chdir=/tmp", "-o", "/dev/null", "--wrap", "true")
        job = cluster.job(job_id)
    assert job is not None
    assert (job.state, job.fields["Reason"], job.fields["EligibleTime"]) == ("PENDING", "BeginTime", begin)
