"""carbond.logs: events go to the stderr in force when they are logged."""

from __future__ import annotations

import io
import json
import sys

import pytest
import structlog

from carbond import logs


def test_events_follow_a_replaced_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream current at configure time is not kept: in one pytest run, a test that ran the CLI in-process
    left structlog writing into that test's closed capture, and later tests saw no log lines."""
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logs.configure("info", "json")
    monkeypatch.setattr(sys, "stderr", second)
    structlog.get_logger("t").warning("moved", n=1)
    assert first.getvalue() == ""
    event = json.loads(second.getvalue())
    assert event["event"] == "moved"
    assert event["n"] == 1
    assert event["level"] == "warning"


def test_the_level_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.configure("error", "json")
    structlog.get_logger("t").warning("dropped")
    structlog.get_logger("t").error("kept")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["kept"]
