"""What CodeCarbon 3.3.2's own test suite, run against the drop-in with only the import changed, found missing:
CodeCarbon's output base class and its ``live_out`` calls, its module paths, its outputs carbond does not implement,
the shape of ``tracker._tasks``, and the country of cloud regions."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from carbond.codecarbon import BaseOutput, CodeCarbonAPIOutput, EmissionsData, EmissionsTracker, OfflineEmissionsTracker
from carbond.job.csvfile import _location
from tests.harness.wait import eventually


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)


class Recorder(BaseOutput):
    """Overrides only what it records, as CodeCarbon's users subclass BaseOutput."""

    def __init__(self) -> None:
        self.live: list[tuple[EmissionsData, EmissionsData]] = []
        self.outs: list[EmissionsData] = []

    def live_out(self, total: EmissionsData, delta: EmissionsData) -> None:
        self.live.append((total, delta))

    def out(self, total: EmissionsData, delta: EmissionsData) -> None:
        self.outs.append(total)


def test_live_out_at_every_api_call_interval_th_measurement(fake_config: Path) -> None:
    """CodeCarbon counts a measurement at start and one at stop: with api_call_interval=2 and no periodic one in
    between, live_out is called once, at stop, with the run's final figures."""
    handler = Recorder()
    t = EmissionsTracker(output_handlers=[handler], api_call_interval=2, measure_power_secs=999, config=fake_config)
    t.start()
    t.stop()
    assert t.final_emissions_data is not None
    assert len(handler.live) == 1
    assert handler.live[0][0] == t.final_emissions_data
    assert handler.outs == [t.final_emissions_data]


def test_live_out_never_with_api_call_interval_minus_one(fake_config: Path) -> None:
    handler = Recorder()
    t = EmissionsTracker(output_handlers=[handler], api_call_interval=-1, measure_power_secs=0.2, config=fake_config)
    t.start()
    t.flush()
    t.stop()
    assert handler.live == []
    assert len(handler.outs) == 2


def test_live_out_during_the_run_from_the_periodic_measurement(fake_config: Path) -> None:
    handler = Recorder()
    t = EmissionsTracker(output_handlers=[handler], api_call_interval=1, measure_power_secs=0.2, config=fake_config)
    t.start()
    try:
        # the first live outputs may come before carbond's first sample: wait for one with energy after another
        eventually(lambda: len(handler.live) >= 2 and handler.live[-1][0].energy_consumed > 0, what="live outputs")
        assert not handler.outs  # nothing flushed or stopped yet: these came from the periodic measurement
        (first, _), (second, delta) = handler.live[-2], handler.live[-1]
        assert second.duration >= first.duration
        assert second.energy_consumed >= first.energy_consumed
        assert delta.energy_consumed == pytest.approx(second.energy_consumed - first.energy_consumed)
    finally:
        t.stop()
    assert len(handler.outs) == 1
    assert t._ticker is None  # the periodic measurement ends with the run


def test_codecarbons_module_paths() -> None:
    import carbond.codecarbon as cc
    from carbond.codecarbon import emissions_tracker, output

    assert emissions_tracker.EmissionsTracker is cc.EmissionsTracker
    assert emissions_tracker.track_task_emissions is cc.track_task_emissions
    assert output.BaseOutput is cc.BaseOutput
    assert output.LoggerOutput is cc.LoggerOutput
    assert output.EmissionsData is cc.EmissionsData
    assert output.OutputMethod is cc.OutputMethod


def test_codecarbons_unimplemented_outputs_construct_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="carbond.codecarbon"):
        api = CodeCarbonAPIOutput("http://127.0.0.1:9", experiment_id="x")
    assert isinstance(api, BaseOutput)
    assert any(
        "CodeCarbonAPIOutput" in r.getMessage() and "does not implement" in r.getMessage() for r in caplog.records
    )


def test_tasks_keep_codecarbons_shape(fake_config: Path) -> None:
    t = OfflineEmissionsTracker(country_iso_code="FRA", output_methods=[], config=fake_config)
    t.start()
    t.start_task("load")
    assert t._tasks["load"].is_active
    assert t._tasks["load"].emissions_data is None
    data = t.stop_task()
    t.stop()
    task = t._tasks["load"]
    assert not task.is_active
    assert task.emissions_data is data
    assert data is not None
    assert data.duration > 0


@pytest.mark.parametrize(
    ("zone", "country"),
    [
        ("gcp:europe-west10", "Germany"),  # the table names it "Berlin"
        ("gcp:us-east2", "United States"),  # "Georgia", the state, not the country
        ("azure:eastus3", "United States"),
        ("azure:francecentral", "France"),  # "Paris (grid FR)"
        ("aws:eu-west-2", "United Kingdom"),
        ("gcp:europe-west1", "Belgium"),
    ],
)
def test_cloud_regions_have_a_country_in_codecarbons_columns(zone: str, country: str) -> None:
    assert _location(zone)["country_name"] == country


def test_every_shipped_cloud_region_has_a_country() -> None:
    from carbond.intensity.static import rows

    zones = [r.intensity.zone for provider in ("aws", "gcp", "azure") for r in rows(provider)]
    assert len(zones) > 100
    assert [z for z in zones if not _location(z)["country_iso_code"]] == []


def test_a_city_named_cloud_region_writes_its_country(fake_config: Path, tmp_path: Path) -> None:
    t = OfflineEmissionsTracker(cloud_provider="gcp", cloud_region="europe-west10", config=fake_config)
    t.start()
    t.stop()
    with (tmp_path / "emissions.csv").open() as f:
        row = next(csv.DictReader(f))
    assert (row["country_name"], row["country_iso_code"], row["on_cloud"]) == ("Germany", "DEU", "Y")
