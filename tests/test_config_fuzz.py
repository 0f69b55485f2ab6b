"""Hostile configs: whatever the document, a ConfigError with a message, never another exception."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carbond import config
from carbond.errors import ConfigError

KEYS = [*list(config.Config.model_fields), "bogus", ""]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["rapl", "FR", "127.0.0.1:9875", "-1", "1e309", "~", "[]", "{}"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from([*KEYS, "zone", "providers", "sysfs", "tdp_watts"]), inner, max_size=4)
    ),
    max_leaves=12,
)
documents = st.dictionaries(st.sampled_from(KEYS), values, max_size=6) | values


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_parse_never_raises_anything_but_config_error(doc: object) -> None:
    try:
        cfg = config.parse(doc, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems and all(isinstance(m, str) and m for _, m in exc.problems)
        assert str(exc).startswith("fuzz.yaml")
    else:
        assert isinstance(cfg, config.Config)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes(data: bytes) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile("wb", suffix=".yaml") as fh:
        fh.write(data)
        fh.flush()
        with contextlib.suppress(ConfigError):
            config.load(fh.name)


def test_mutated_configs_exit_2_without_traceback(tmp_path: Path) -> None:
    base = yaml.safe_load(Path("config.example.yaml").read_text())
    mutations = [
        {"measure_power_secs": "soon"},
        {"pue": [1]},
        {"sensors": "rapl"},
        {"paths": {"sysfs": {"a": 1}}},
        {"intensity": {"zone": 5, "providers": []}},
        {"cpu": {"tdp_watts": 1e309}},
        {"fake": {"devices": [{}]}},
        {"listen_address": ":::"},
        {"web": {"config_file": str(tmp_path / "missing.yml")}},
        {"host_name": ["x"]},
    ]
    for i, change in enumerate(mutations):
        doc = {**base, **change}
        p = tmp_path / f"m{i}.yaml"
        p.write_text(yaml.safe_dump(doc))
        out = subprocess.run(
            [sys.executable, "-m", "carbond", "check-config", str(p)], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 2, (change, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and str(p) in out.stderr, (change, out.stderr)
