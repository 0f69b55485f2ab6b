"""The declarations of the metric families (carbond.exporter.families): what they hold is what is served, the
README's table is theirs, and a declaration that breaks the naming rules does not load."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from carbond.exporter import families as declared
from carbond.exporter.family import (
    CGROUP_LABEL_NAMES,
    Family,
    FromCgroups,
    FromHistogram,
    FromOwner,
    FromSnapshot,
    collect,
    markdown_rows,
)
from carbond.exporter.http import HttpServer, Request, Response
from carbond.exporter.live import LiveWebConfig
from carbond.exporter.server import MetricsCache, server_families
from carbond.exporter.webconfig import WebConfig
from carbond.model import (
    CalibrationState,
    CgroupLabels,
    CgroupState,
    DeviceDown,
    DeviceInfo,
    DeviceState,
    Intensity,
    IntensityForecast,
    IntensityProviderState,
    Snapshot,
)
from tests.harness.snapshots import frozen_snapshot

README = Path(__file__).parents[2] / "README.md"


async def every_family_snapshot() -> Snapshot:
    """The frozen snapshot with every optional part present: each declared family has a series."""
    base = await frozen_snapshot()
    wall = DeviceState("wall", "platform", "hwmon", 80.0, 4800.0, 0.2, True, False, 2.0, 100.0)
    devices = dataclasses.replace(
        base.devices,
        states=(*base.devices.states, wall),
        info=(DeviceInfo("package-0", "Xeon", sensor="fake", method="tdp", detail="tdp 40 W"),),
        unread=((DeviceDown("gpu-1", "gpu", "lost"), "nvml"),),
    )
    cal = CalibrationState("hwmon", "full", 40, 0.98, 1.5, 20.0, 1.1, 30.0, in_use=False)
    node = dataclasses.replace(
        base.node, platform="hwmon", platform_clamped_total=1, uncertainty_dominant="intensity", calibration=cal
    )
    marginal = Intensity(400.0, "watttime", "FR", 0.0, signal="marginal", factor_type="direct")
    intensity = dataclasses.replace(
        base.intensity,
        other=((marginal, 30.0),),
        forecast=IntensityForecast(40.0, 1.7e9 + 3600, 3600.0, "static", "FR"),
        providers=(IntensityProviderState("watttime", True, 0, 30.0),),
        zone="FR",
        zone_source="config",
        rel_u=0.14,
        rel_u_term="yearly average",
    )
    health = dataclasses.replace(base.health, pod_names_errors=0, state_persist_errors=0)
    labels = CgroupLabels(unit="web.service", team="shop", extra=(("label_app", "web"),))
    cgroups = (CgroupState("system.slice/web.service", (("cpu", 10.0, 600.0), ("dram", None, 60.0)), 0.5, labels),)
    return dataclasses.replace(base, devices=devices, node=node, intensity=intensity, health=health, cgroups=cgroups)


def readme_table() -> list[str]:
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


def test_readme_metric_table_is_the_declarations() -> None:
    generated = markdown_rows(declared.FAMILIES)
    assert len(generated) > 30
    hint = "regenerate it: .venv/bin/python -m carbond.exporter.families --markdown"
    assert readme_table() == generated, hint


def test_markdown_command_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert declared.main(["--markdown"]) == 0
    assert capsys.readouterr().out.splitlines() == markdown_rows(declared.FAMILIES)
    assert declared.main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_names_are_unique_and_groups_make_up_the_whole() -> None:
    names = [f.name for f in declared.FAMILIES]
    assert len(names) == len(set(names)) == len(declared.BY_NAME)
    parts = (declared.HEAD, declared.HTTP, declared.CGROUP, declared.TAIL)
    assert sum(len(p) for p in parts) == len(declared.FAMILIES)


@pytest.mark.asyncio
async def test_every_snapshot_family_is_served_as_declared() -> None:
    """Type, help, label names and one series at least, for each family a snapshot carries."""
    snap = await every_family_snapshot()
    body = (MetricsCache(lambda: snap).body(False, False) or b"").decode()
    served = {f.name: f for f in text_string_to_metric_families(body)}
    from_snapshot = [f for f in declared.FAMILIES if not isinstance(f.source, FromOwner)]
    assert [_queried(f.name, f.type) for f in served.values()] == [f.name for f in from_snapshot]  # in order
    for fam in from_snapshot:
        got = served[fam.name.removesuffix("_total")]
        assert (got.type, got.documentation) == (fam.type, fam.help), fam.name
        assert got.samples, fam.name
        copied = ["label_app"] if isinstance(fam.source, FromCgroups) else []
        for sample in got.samples:
            bucket = ["le"] if sample.name.endswith("_bucket") else []
            assert sorted(sample.labels) == sorted(["host", *fam.labels, *copied, *bucket]), fam.name


def _queried(name: str, kind: str) -> str:
    return name + "_total" if kind == "counter" else name


@pytest.mark.asyncio
async def test_conditional_families_are_absent_from_a_bare_snapshot() -> None:
    snap = await frozen_snapshot()
    absent = {f.name for f in declared.FAMILIES if f.when is not None and not f.served(snap)}
    assert {"carbond_cgroup_power_watts", "carbond_pod_names_refresh_errors_total"} <= absent
    body = (MetricsCache(lambda: snap).body(False, False) or b"").decode()
    for name in absent:
        assert f"# TYPE {name} " not in body
    assert all(collect(declared.BY_NAME[name], snap) is None for name in absent)


@pytest.mark.asyncio
async def test_the_http_servers_families_are_the_declared_ones() -> None:
    """carbond.exporter.server renders these itself: the same name, type, help and labels as declared."""

    async def handler(request: Request) -> Response:
        return Response(200, b"")

    server = HttpServer(handler, server_header="test")
    web = LiveWebConfig(None, WebConfig())
    try:
        fams = list(server_families(server, web)(await frozen_snapshot()))
    finally:
        web.close()
    assert [_queried(f.name, f.type) for f in fams] == [f.name for f in declared.HTTP]
    for got, fam in zip(fams, declared.HTTP, strict=True):
        assert (got.type, got.documentation) == (fam.type, fam.help)
        assert got.samples, fam.name
        for sample in got.samples:
            assert sorted(sample.labels) == sorted(["host", *fam.labels])


def test_cgroup_labels_are_the_models_fields() -> None:
    """A cgroup family's labels name fields of CgroupLabels, so a new field is a new possible label by the same
    name, and the renderers read each value by its label's name."""
    assert {"cgroup", "kind", *CgroupLabels._fields} - {"extra"} == CGROUP_LABEL_NAMES
    for fam in declared.CGROUP:
        assert set(fam.labels) <= CGROUP_LABEL_NAMES


def _family(**changes: object) -> Family:
    fields: dict[str, object] = {
        "name": "carbond_test_watts",
        "type": "gauge",
        "unit": "watts",
        "help": "A test.",
        "labels": ("device",),
        "source": FromSnapshot(lambda s: ()),
        "doc": "a test",
    }
    fields.update(changes)
    return Family(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"name": "test_watts"}, "start with carbond_"),
        ({"type": "counter"}, "_total exactly for counters"),
        ({"name": "carbond_test_watts_total"}, "_total exactly for counters"),
        ({"unit": "joules"}, "the name ends in it"),
        ({"unit": "kilowatts", "name": "carbond_test_kilowatts"}, "one of"),
        ({"labels": ("host",)}, "host is implied"),
        ({"labels": ("device", "device")}, "labels are distinct"),
        ({"type": "histogram", "unit": "", "name": "carbond_test"}, "only a histogram"),
        ({"source": FromHistogram(lambda s: s.health.tick_duration)}, "only a histogram"),
        ({"doc": ""}, "doc unless"),
        ({"source": FromCgroups("power_w"), "labels": ("cgroup",)}, "cgroup labels"),
        ({"source": FromCgroups("emissions_g_total"), "labels": ("cgroup", "kind")}, "cgroup labels"),
        ({"source": FromCgroups("power_w"), "labels": ("cgroup", "kind", "slurm_job")}, "cgroup labels"),
    ],
)
def test_a_declaration_that_breaks_a_rule_does_not_load(changes: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        _family(**changes)


def test_a_row_shares_only_identical_labels() -> None:
    first = _family()
    assert markdown_rows([first, _family(name="carbond_other_watts", doc="", same_row=True)])[2].startswith(
        "| `carbond_test_watts` / `carbond_other_watts` | gauge | device | a test |"
    )
    with pytest.raises(ValueError, match="different labels"):
        markdown_rows([first, _family(name="carbond_other_watts", labels=(), same_row=True)])


def test_long_label_lists_repeat_as_the_same() -> None:
    five = ("a", "b", "c", "d", "e")
    rows = markdown_rows(
        [
            _family(labels=five),
            _family(name="carbond_b_watts", labels=five),
            _family(name="carbond_c_watts", labels=("a", "b", "d", "e")),
            _family(name="carbond_d_watts", labels=("a", "b")),
        ]
    )
    assert [row.split(" | ")[2] for row in rows[2:]] == ["a, b, c, d, e", "the same", "the same without c", "a, b"]


def test_every_kind_of_source_is_in_use() -> None:
    kinds = {FromSnapshot, FromHistogram, FromCgroups, FromOwner}
    assert {type(f.source) for f in declared.FAMILIES} == kinds
    assert all(
        f.source.owner.startswith("carbond.exporter.server") for f in declared.HTTP if isinstance(f.source, FromOwner)
    )
