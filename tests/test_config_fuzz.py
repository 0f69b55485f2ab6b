"""Hostile configs: whatever the document, a ConfigError with a message, never another exception."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
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
        assert exc.problems  # noqa: PT017 - a fuzzed input may or may not raise: both outcomes are checked
        assert all(isinstance(m, str) and m for _, m in exc.problems)  # noqa: PT017
        assert str(exc).startswith("fuzz.yaml")  # noqa: PT017
    else:
        assert isinstance(cfg, config.Config)


def _yaml_document(data: bytes) -> tuple[bool, object]:
    """(whether ``data`` is UTF-8 YAML, its document): the oracle config.load is checked against."""
    try:
        return True, yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return False, None


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | st.sampled_from([b"# nothing\n", b"pue: [1\n", b"- rapl\n", b"pue: 1.5\n"]))
@example(b"")
@example(b"\xff\xfe")
@example(b"{}")
def test_arbitrary_bytes(data: bytes) -> None:
    """Any file gives a Config or a ConfigError naming the file: an empty document is the defaults, a mapping is
    validated, anything else (not UTF-8, not YAML, a list, a scalar) is an error with a message."""
    import tempfile

    readable, doc = _yaml_document(data)
    with tempfile.NamedTemporaryFile("wb", suffix=".yaml") as fh:
        fh.write(data)
        fh.flush()
        try:
            cfg = config.load(fh.name)
        except ConfigError as exc:
            assert str(exc).startswith(fh.name)  # noqa: PT017 - either outcome of a fuzzed input is checked
            assert exc.problems  # noqa: PT017
            assert all(isinstance(m, str) and m for _, m in exc.problems)  # noqa: PT017
            assert not (readable and doc is None), "an empty document is the defaults, not an error"
        else:
            assert readable, f"accepted {data!r}"
            assert doc is None or isinstance(doc, dict), f"accepted {data!r}"
            if doc is None:
                assert cfg == config.Config()


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
        assert "Traceback" not in out.stderr, (change, out.stderr)
        assert str(p) in out.stderr, (change, out.stderr)
