"""Every backend in the table: a module exporting ``BACKEND``, a strict settings model, defaults that build."""

from __future__ import annotations

import importlib

import pytest
from pydantic import ValidationError

from carbond import sensors
from carbond.config import Config
from carbond.sensors.base import Backend, Context, Sensor


@pytest.mark.parametrize("name", sorted(sensors.BACKENDS))
def test_backend_module_exports_its_backend(name: str) -> None:
    backend = importlib.import_module(sensors.BACKENDS[name].module).BACKEND
    assert isinstance(backend, Backend)
    assert sensors.load(name) is backend
    assert backend.classes
    assert backend.classes <= {"cpu", "dram", "gpu", "platform"}
    # the config section is typed by the backend's own model
    assert isinstance(Config().backend_settings(name), backend.settings)


@pytest.mark.parametrize("name", sorted(sensors.BACKENDS))
def test_settings_reject_an_unknown_key(name: str) -> None:
    settings = sensors.load(name).settings
    with pytest.raises(ValidationError, match="no_such_key"):
        settings.model_validate({"no_such_key": 1})


@pytest.mark.parametrize("name", sorted(sensors.BACKENDS))
def test_defaults_build_a_sensor_without_starting_it(name: str) -> None:
    sensor = sensors.load(name).build(None, Context())
    assert isinstance(sensor, Sensor)
    assert sensor.name == name
    assert isinstance(sensor.inline, bool)
    assert sensor.covers == frozenset()  # not started: covers nothing yet


def test_unknown_backend_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        sensors.load("no-such-backend")
