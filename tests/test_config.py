from __future__ import annotations

from pathlib import Path

import pytest

from carbond import config
from carbond.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_need_no_file() -> None:
    cfg = config.load(None)
    assert cfg.measure_power_secs == 15
    assert cfg.listen_address == "127.0.0.1:9875"
    assert cfg.sensors[:2] == ["hwmon", "rapl"]
    assert cfg.sensors[-2:] == ["tdp", "ram"]
    assert cfg.intensity.providers == ["static"]


def test_example_config_is_valid() -> None:
    example = Path(__file__).parent.parent / "config.example.yaml"
    cfg = config.load(example)
    assert cfg.listen_address == "127.0.0.1:9875"


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, "")) == config.Config()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bogus: 1\n", "bogus"),
        ("intensity:\n  zonee: FR\n", "intensity.zonee"),
        ("measure_power_secs: -1\n", "measure_power_secs"),
        ("measure_power_secs: fast\n", "measure_power_secs"),
        ("pue: 0.5\n", "pue"),
        ("sensors: [rapl, gpu9000]\n", "sensors"),
        ("listen_address: nowhere\n", "listen_address"),
        ("listen_address: '127.0.0.1:70000'\n", "listen_address"),
        ("cpu: {tdp_watts: -3}\n", "cpu.tdp_watts"),
        ("paths: []\n", "paths"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    keys = [k for k, _ in info.value.problems]
    assert key in keys
    assert str(path) in info.value.lines()[0]


@pytest.mark.parametrize("text", ["[1, 2]\n", "just a string\n", "a: [\n"])
def test_non_mapping_or_invalid_yaml(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        config.load(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.yaml")


def test_host_label_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "node-7")
    assert config.Config().resolved_host() == "node-7"
    assert config.Config(host_name="explicit").resolved_host() == "explicit"
    monkeypatch.delenv("NODE_NAME")
    assert config.Config().resolved_host()  # the hostname, never empty


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:9875", ("127.0.0.1", 9875)), ("[::1]:80", ("::1", 80)), ("0.0.0.0:1", ("0.0.0.0", 1))],
)
def test_split_listen_address(value: str, expected: tuple[str, int]) -> None:
    assert config.split_listen_address(value) == expected


def test_sensor_timeout_never_exceeds_interval() -> None:
    assert config.Config(measure_power_secs=1).sensor_timeout() == pytest.approx(0.8)
    assert config.Config(measure_power_secs=60).sensor_timeout() == 5.0
    assert config.Config(measure_power_secs=2, sensor_timeout_secs=30).sensor_timeout() == 2.0


def test_unreadable_or_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    bad = write(tmp_path, "a: [\n")
    for read in (config.load, lambda p: config.load_model(p, config.WebSection, "web config")):
        with pytest.raises(ConfigError, match="invalid YAML") as info:
            read(bad)
        assert info.value.source == str(bad)
        with pytest.raises(ConfigError, match="cannot read") as info:
            read(tmp_path / "nope.yaml")
        assert info.value.source == str(tmp_path / "nope.yaml")
