"""grafana/carbond-slurm.json: its structure, its ConfigMap, and every query against the real daemon and Prometheus.

The end-to-end test runs the daemon on a fake powercap tree and a fake cgroup v2 Slurm tree with two jobs (101 of
ada in account physics, steps batch and 0; 102 of grace in chem, step 0; the Prolog's spool files name them) beside
a systemd unit, a real Prometheus scraping it with carbon budget rules for both accounts, a partition and the node
(named freely: the budget panels go by the ``slurm_account`` label the rules copy from the selector), and evaluates
every panel's query as Grafana would with everything selected, then with one account, and with one user and job:
each must return data, show only what the variables select, and show the right figures (the jobs' power adds up to
their energy rate, jobs and the rest add up to the node, the account and user splits follow the jobs' CPU and memory,
emissions are energy x PUE x intensity, a finished job leaves the running count).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from carbond import budgets
from carbond.testing.cgroupfs import CgroupTree, CgroupWriter, add_slurm_step, remove_slurm_job
from carbond.testing.powercap import PowercapWriter, typical_intel
from carbond.testing.procfs import ProcTree
from tests.harness.daemon import Daemon, free_port
from tests.harness.tools import require_tool
from tests.harness.wait import NotYet, eventually
from tests.slurm.spoolfiles import spool_dir, write_meta

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "grafana" / "carbond-slurm.json"
VARIABLES = ["datasource", "host", "slurm_account", "slurm_user", "slurm_job_id"]
#: Grafana's values with everything selected, and its interval variables.
ALL = {"host": ".*", "slurm_account": ".*", "slurm_user": ".*", "slurm_job_id": ".*"}
INTERVALS = {"__rate_interval": "4s", "__range": "5m"}
PANELS_TIMEOUT_S = 120.0  # a few scrapes quiet, many more on a loaded 2-core machine
HOST, PUE = "slurm-node", 1.2
JOB_ENERGY, RATE_S = 'carbond_cgroup_energy_joules_total{slurm_job_id!=""}', 20
Row = dict[str, Any]
Results = dict[str, list[Row]]


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def targets() -> list[tuple[str, str]]:
    """(panel title and refId, the query as written), for every target."""
    return [(f"{p['title']} {t['refId']}", t["expr"]) for p in dashboard()["panels"] for t in p["targets"]]


def substitute(expr: str, values: dict[str, str]) -> str:
    out = re.sub(r"\$\{?(\w+)\}?", lambda m: {**values, **INTERVALS}.get(m.group(1), m.group(0)), expr)
    assert "$" not in out.replace("$1", ""), f"a variable the test does not know: {out}"
    return out


# --- structure -------------------------------------------------------------------------------------------------


def test_panels_have_a_place_an_id_and_the_datasource() -> None:
    doc = dashboard()
    assert doc["uid"] == "carbond-slurm"
    others = {json.loads(p.read_text())["uid"] for p in (ROOT / "grafana").glob("*.json") if p != DASHBOARD}
    assert doc["uid"] not in others
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in doc["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] < g["x"] + g["w"] <= 24, p["title"]
        assert g["h"] > 0, p["title"]
        for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])):
            assert cell not in cells, f"{p['title']} overlaps {cells[cell]}"
            cells[cell] = p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["description"], p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:  # one value per series: the panels that show a figure, not a line, ask for one
            assert t.get("instant", False) == (p["type"] in ("stat", "bargauge", "table")), p["title"]
            assert (t.get("format") == "table") == (p["type"] == "table"), p["title"]


def test_variables_cascade_and_offer_all() -> None:
    listed = dashboard()["templating"]["list"]
    assert [v["name"] for v in listed] == VARIABLES
    queries = {v["name"]: v["query"]["query"] for v in listed[1:]}
    for v in listed[1:]:
        assert (v["type"], v["includeAll"], v["allValue"], v["multi"]) == ("query", True, ".*", True), v["name"]
        assert v["datasource"]["uid"] == "${datasource}"
        assert v["definition"] == queries[v["name"]]
    # each variable offers only what the ones before it select
    for name, before in [("slurm_account", ["host"]), ("slurm_user", ["host", "slurm_account"])]:
        assert all(f'{b}=~"${b}"' in queries[name] for b in before), name
    assert all(f'{b}=~"${b}"' in queries["slurm_job_id"] for b in ("host", "slurm_account", "slurm_user"))


def test_every_query_honours_the_variables() -> None:
    defined = set(VARIABLES) | set(INTERVALS) | {"1"}
    for title, expr in targets():
        assert set(re.findall(r"\$\{?(\w+)", expr)) <= defined, title
        # only the dashboard's own windows: nothing reads beyond the range or the retention
        assert set(re.findall(r"\[([^\]]+)\]", expr)) <= {"$__range", "$__rate_interval"}, title
        for selector in re.findall(r"carbond_cgroup_\w+\{([^}]*)\}", expr):
            if 'slurm_job_id!=""' in selector:  # the jobs' series: every variable applies
                for name in ("host", "slurm_account", "slurm_user"):
                    assert f'{name}=~"${name}"' in selector, (title, name)
        if "carbond:budget" in expr:  # account budgets carry no host: by the account label their rules record
            assert re.match(r'carbond:budget_\w+\{slurm_account=~"\$slurm_account", slurm_account!=""\}', expr), title
            assert "budget=~" not in expr, title  # never through the budget's name
        else:
            assert 'host=~"$host"' in expr, title


def test_kustomize_renders_both_dashboards_for_the_sidecar() -> None:
    kubectl = require_tool("kubectl", "kubectl")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "grafana")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    maps = {d["metadata"]["name"]: d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "ConfigMap"}
    assert {"carbond-dashboard", "carbond-slurm-dashboard"} <= maps.keys()
    main, slurm = maps["carbond-dashboard"], maps["carbond-slurm-dashboard"]
    assert slurm["data"] == {"carbond-slurm.json": DASHBOARD.read_text()}
    assert slurm["metadata"]["labels"] == main["metadata"]["labels"]
    assert slurm["metadata"]["labels"]["grafana_dashboard"] == "1"


# --- against the real daemon and Prometheus ----------------------------------------------------------------------


class Prometheus:
    """A Prometheus server scraping ``target`` every second with ``rule_files``; instant queries at one time."""

    def __init__(self, workdir: Path, target: str, rule_files: list[Path]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config, self.workdir = workdir / "prometheus.yml", workdir
        scrape = [{"job_name": "carbond", "static_configs": [{"targets": [target]}]}]
        interval = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        rules = [str(f) for f in rule_files]
        self.config.write_text(yaml.safe_dump({"global": interval, "rule_files": rules, "scrape_configs": scrape}))

    def __enter__(self) -> Prometheus:
        binary = require_tool("prometheus", "prometheus")
        self._log = (self.workdir / "prometheus.log").open("wb")
        args = [f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}"]
        args.append(f"--web.listen-address=127.0.0.1:{self.port}")
        self._proc = subprocess.Popen([binary, *args], stdout=self._log, stderr=self._log)
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        self._proc.wait(15)
        self._log.close()

    def get(self, path: str, params: list[tuple[str, str]]) -> dict[str, Any]:
        url = f"{self.base}{path}?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as err:
            return json.loads(err.read())  # type: ignore[no-any-return]

    def query(self, expr: str, at: float) -> dict[str, Any]:
        return self.get("/api/v1/query", [("query", expr), ("time", f"{at:.3f}")])

    def value(self, expr: str, at: float) -> float | None:
        """A query's single value, None while it has none."""
        answer = self.query(expr, at)
        rows = answer["data"]["result"] if answer.get("status") == "success" else []
        return float(rows[0]["value"][1]) if len(rows) == 1 else None

    def panels(self, values: dict[str, str], at: float | None = None) -> tuple[Results, list[str]]:
        """Every panel's results at one instant (default a scrape ago, so that every series of a scrape is in), and
        the targets that failed or returned nothing."""
        at = time.time() - 1.5 if at is None else at
        answers = {title: self.query(substitute(expr, values), at) for title, expr in targets()}
        empty = [t for t, r in answers.items() if r.get("status") != "success" or not r["data"]["result"]]
        return {t: r["data"]["result"] for t, r in answers.items() if r.get("status") == "success"}, empty


def means(prom: Prometheus, values: dict[str, str], start: float, end: float) -> Results:
    """Every time series panel's targets as Grafana draws them (a range query, one point a second), each series
    reduced to its mean over the range, in the shape of an instant answer."""
    out: Results = {}
    kinds = {p["title"]: p["type"] for p in dashboard()["panels"]}
    for title, expr in targets():
        if kinds[title.rpartition(" ")[0]] != "timeseries":
            continue
        params = [("query", substitute(expr, values)), ("start", f"{start:.3f}"), ("end", f"{end:.3f}"), ("step", "1")]
        answer = prom.get("/api/v1/query_range", params)
        assert answer["status"] == "success", (title, answer)
        out[title] = [
            {"metric": r["metric"], "value": [end, str(sum(float(v) for _, v in r["values"]) / len(r["values"]))]}
            for r in answer["data"]["result"]
        ]
    return out


def figures(rows: list[Row], *labels: str) -> dict[tuple[str, ...] | str, float]:
    """The rows' values by their labels (one label: by its value alone)."""
    out: dict[tuple[str, ...] | str, float] = {}
    for r in rows:
        key = tuple(r["metric"].get(label, "") for label in labels)
        out[key[0] if len(key) == 1 else key] = float(r["value"][1])
    return out


def total(rows: list[Row]) -> float:
    return sum(float(r["value"][1]) for r in rows)


JOB = ("slurm_job_id", "slurm_user", "slurm_account")
JOB_101, JOB_102 = ("101", "ada", "physics"), ("102", "grace", "chem")
JOBS = {JOB_101, JOB_102}


def check_power(res: Results, means: Results, energy_rate: float) -> None:
    """Power now (instant) and over the window (the time series' mean, as a panel shows it): by job, adding up to
    the jobs' energy rate, and with the rest of the node to the node."""
    assert total(res["Running jobs A"]) == 2
    power = figures(res["Power by job A"], *JOB)
    assert power.keys() == JOBS
    assert figures(res["Top jobs by power now A"], *JOB) == power
    assert total(res["Jobs' power now A"]) == pytest.approx(sum(power.values()), rel=1e-9)
    # a tick's read can fall between the fake writer's updates of the two jobs' counters: one tick is rough
    assert power[JOB_101] / power[JOB_102] == pytest.approx(3.0, rel=0.25)  # 0.6 CPUs and 3 GiB against 0.2 and 1
    mean = figures(means["Power by job A"], *JOB)
    assert mean[JOB_101] / mean[JOB_102] == pytest.approx(3.0, rel=0.05)
    assert sum(mean.values()) == pytest.approx(energy_rate, rel=0.05)  # the power is the energy's rate
    [node], [jobs], [rest] = (res[f"Node power and Slurm jobs {ref}"] for ref in "ABC")
    assert float(jobs["value"][1]) == pytest.approx(sum(power.values()), rel=1e-9)
    # the parts sum to the node's energy exactly, but their power divides by the attribution's own interval (the
    # moments the cgroups' CPU times were read), which a busy machine moves by tens of ms against the node's 1 s
    assert float(node["value"][1]) == pytest.approx(float(jobs["value"][1]) + float(rest["value"][1]), rel=0.02)
    assert float(rest["value"][1]) > 0  # idle, the unit and what no cgroup accounts for


def check_energy(res: Results, means: Results, intensity: float) -> dict[tuple[str, ...] | str, float]:
    """Energy and emissions over the range, by job, step and kind, account and user; the accounts' emissions."""
    energy = figures(res["Top jobs by energy, time range A"], *JOB)
    assert energy.keys() == JOBS
    assert figures(res["Jobs, time range A"], *JOB) == pytest.approx(energy, rel=1e-9)
    assert energy[JOB_101] / energy[JOB_102] == pytest.approx(3.0, rel=0.05)
    assert total(res["Jobs' energy, time range A"]) == pytest.approx(sum(energy.values()), rel=1e-9)
    job_grams = figures(res["Jobs, time range B"], *JOB)
    for job, wh in energy.items():  # grams = kWh x PUE x g/kWh, in the units the panels say (Wh, g)
        assert job_grams[job] == pytest.approx(wh / 1000 * PUE * intensity, rel=0.02), job

    steps = figures(res["Job energy by step and kind, time range A"], "slurm_job_id", "slurm_step", "kind")
    assert steps.keys() == {
        (j, s, k) for j, s in [("101", "0"), ("101", "batch"), ("102", "0")] for k in ("cpu", "dram")
    }
    assert steps[("101", "0", "cpu")] / steps[("101", "batch", "cpu")] == pytest.approx(5.0, rel=0.05)  # 0.5 / 0.1 CPU
    assert steps[("101", "0", "dram")] / steps[("101", "batch", "dram")] == pytest.approx(2.0, rel=0.05)  # 2 / 1 GiB
    assert sum(v for k, v in steps.items() if k[0] == "101") == pytest.approx(energy[JOB_101], rel=1e-9)

    by_account = figures(res["Emissions by account, time range A"], "slurm_account")
    assert by_account.keys() == {"physics", "chem"}
    assert by_account["physics"] / by_account["chem"] == pytest.approx(3.0, rel=0.05)
    by_user = figures(res["Emissions by user, time range A"], "slurm_user")
    assert by_user == pytest.approx({"ada": by_account["physics"], "grace": by_account["chem"]}, rel=1e-9)
    assert total(res["Jobs' emissions, time range A"]) == pytest.approx(sum(by_account.values()), rel=1e-9)
    rate = figures(means["Emissions rate by account (g/h) A"], "slurm_account")
    assert rate["physics"] / rate["chem"] == pytest.approx(3.0, rel=0.05)
    power = total(means["Power by job A"])  # g/h: the jobs' power x PUE x intensity
    assert sum(rate.values()) == pytest.approx(power / 1000 * PUE * intensity, rel=0.1)
    return by_account


def check_budgets(res: Results, by_account: dict[tuple[str, ...] | str, float]) -> None:
    """The accounts' budgets, not the partition's or the node's, whatever their names: allowed as rendered, spent as
    the accounts emitted."""
    spent = figures(res["Account budgets A"], "slurm_account")
    allowed = figures(res["Account budgets B"], "slurm_account")
    assert allowed == pytest.approx({"physics": 1000.0, "chem": 500.0})  # 3000 g per 30d pro rata 10d; 500 per 7d
    assert spent.keys() == allowed.keys()  # the node's and the partition's budgets are not an account's
    assert set(figures(res["Account budgets A"], "budget")) == {"physics-monthly", "chem"}
    assert spent["physics"] / spent["chem"] == pytest.approx(3.0, rel=0.15)
    for account, grams in spent.items():  # never more than the account emitted (the rules lag a second at most)
        assert 0 < grams <= by_account[account] * 1.05, account
    share = figures(res["Account budgets spent A"], "slurm_account")
    assert share == pytest.approx({a: spent[a] / allowed[a] for a in spent}, rel=1e-9)


def check_filtered(res: Results, jobs: set[str], *, budget_accounts: set[str]) -> None:
    """One account, or one user and job, selected: each row of a job's series belongs to the selected jobs."""
    keep = {job for job in JOBS if job[0] in jobs}
    for title, rows in res.items():
        for r in rows:
            m = r["metric"]
            if "budget" in title:
                assert m["slurm_account"] in budget_accounts, (title, m)
                continue
            for i, label in enumerate(JOB):
                if label in m:
                    assert m[label] in {job[i] for job in keep}, (title, m)
    assert total(res["Running jobs A"]) == len(jobs)
    power = figures(res["Power by job A"], *JOB)
    assert power.keys() == keep
    assert total(res["Node power and Slurm jobs B"]) == pytest.approx(sum(power.values()), rel=1e-9)


def check_variable_queries(prom: Prometheus) -> None:
    """The variables offer the hosts, accounts, users and jobs there are, each filtered by the ones before it."""
    listed = {v["name"]: v["query"]["query"] for v in dashboard()["templating"]["list"][1:]}

    def offered(name: str, values: dict[str, str]) -> set[str]:
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", substitute(listed[name], values))
        assert m is not None
        assert m.group(2) == name
        answer = prom.get(f"/api/v1/label/{name}/values", [("match[]", m.group(1))])
        assert answer["status"] == "success", answer
        return set(answer["data"])

    assert offered("host", ALL) == {HOST}
    assert offered("slurm_account", ALL) == {"physics", "chem"}
    assert offered("slurm_user", {**ALL, "slurm_account": "chem"}) == {"grace"}
    assert offered("slurm_job_id", {**ALL, "slurm_user": "ada"}) == {"101"}


def wait_for_panels(prom: Prometheus, values: dict[str, str]) -> Results:
    last: list[list[str]] = [[t for t, _ in targets()]]

    def every_panel() -> Results | None:
        results, last[0] = prom.panels(values)
        return None if last[0] else results

    try:  # until it is up the API refuses connections or answers a 503 page that is not JSON
        return eventually(every_panel, PANELS_TIMEOUT_S, max_interval=1.0, ignore=(OSError, ValueError))
    except NotYet:
        pytest.fail(f"panels without data ({values}): {last[0]}")


def budget_rules(tmp_path: Path) -> Path:
    """Rules for a budget per account, one for the partition and one for the node, named with no convention: a name
    shaped slurm-<something> does not make a budget an account's, and an account's needs no such name."""
    source = tmp_path / "budgets.yaml"
    source.write_text(
        "budgets:\n"
        "  - {name: physics-monthly, selector: {slurm_account: physics}, grams: 3000, period: 30d}\n"
        "  - {name: chem, selector: {slurm_account: chem}, grams: 500, period: 7d}\n"
        "  - {name: slurm-cpu, selector: {slurm_partition: cpu}, grams: 800, period: 7d}\n"
        f"  - {{name: slurm-nodes, selector: {{host: {HOST}}}, grams: 1000, period: 7d}}\n"
    )
    rules = tmp_path / "budgets.rules.yml"
    rules.write_text(budgets.render_text(budgets.load(source), "budgets.yaml"))
    return rules


@pytest.mark.e2e
def test_every_panel_against_the_daemon_and_prometheus(tmp_path: Path) -> None:
    require_tool("prometheus", "prometheus")
    tree = typical_intel(tmp_path / "sys")
    proc = ProcTree(tmp_path / "proc")  # 2 CPUs, one of them busy: the jobs and the unit use 0.9 of it
    cgroups = CgroupTree(tmp_path / "cg", "v2")
    spool = spool_dir(tmp_path)
    write_meta(spool, 101, user="ada", uid="1000", account="physics", partition="cpu")  # the Prologs ran first
    write_meta(spool, 102, user="grace", uid="1001", account="chem", partition="cpu")
    cgroups.add("system.slice/ssh.service", cpus=0.1, memory_bytes=1 << 30)
    add_slurm_step(cgroups, 101, "batch", cpus=0.1, memory_bytes=1 << 30)
    add_slurm_step(cgroups, 101, 0, cpus=0.5, memory_bytes=2 << 30, tasks=2)
    add_slurm_step(cgroups, 102, 0, cpus=0.2, memory_bytes=1 << 30)
    cfg = {
        "measure_power_secs": 1,
        "sensors": ["rapl"],
        "host_name": HOST,
        "pue": PUE,
        "intensity": {"zone": "FR"},
        "paths": {"sysfs": str(tmp_path / "sys"), "procfs": str(tmp_path / "proc"), "cgroupfs": str(tmp_path / "cg")},
        "attribution": {"slurm": {"enabled": True, "spool_dir": str(spool), "labels": ["account", "partition"]}},
    }
    with (
        PowercapWriter({tree.zones[0]: 40.0, tree.zones[3]: 6.0}, period_s=0.02),
        CgroupWriter(cgroups, proc, busy=0.5),
        Daemon(tmp_path, cfg) as d,
        Prometheus(tmp_path, f"127.0.0.1:{d.port}", [budget_rules(tmp_path)]) as prom,
    ):
        wait_for_panels(prom, ALL)
        # the jobs' energy rate over a window their series cover whole (a rate over a window reaching before the
        # series began counts the part before as nothing): wait until their first sample is older than the window
        eventually(
            lambda: (prom.value(f"min(count_over_time({JOB_ENERGY}[{RATE_S + 5}s]))", time.time()) or 0) >= RATE_S + 3,
            PANELS_TIMEOUT_S,
            max_interval=1.0,
            what=f"the jobs' series older than {RATE_S} s",
        )
        at = time.time() - 1.5
        intensity = prom.value('carbond_grid_intensity_grams_per_kwh{signal="average"}', at)
        rate = prom.value(f"sum(rate({JOB_ENERGY}[{RATE_S}s]))", at)
        assert intensity is not None
        assert rate is not None
        results, empty = prom.panels(ALL, at)
        assert not empty
        window = means(prom, ALL, at - RATE_S, at)
        check_power(results, window, rate)
        check_budgets(results, check_energy(results, window, intensity))
        check_filtered(wait_for_panels(prom, {**ALL, "slurm_account": "chem"}), {"102"}, budget_accounts={"chem"})
        one_job = {**ALL, "slurm_user": "ada", "slurm_job_id": "101"}
        check_filtered(wait_for_panels(prom, one_job), {"101"}, budget_accounts={"physics", "chem"})
        check_variable_queries(prom)

        remove_slurm_job(cgroups, 102)  # the job ends: slurmstepd removes its cgroup

        def one_running() -> Results | None:
            res, _ = prom.panels(ALL)
            return res if total(res.get("Running jobs A", [])) == 1 else None

        after = eventually(one_running, PANELS_TIMEOUT_S, max_interval=1.0, what="job 102 no longer running")
        assert figures(after["Top jobs by power now A"], *JOB).keys() == {JOB_101}
        # its energy stays in the range: the series outlives the cgroup by attribution.retention_secs
        assert figures(after["Jobs, time range A"], *JOB).keys() == JOBS
