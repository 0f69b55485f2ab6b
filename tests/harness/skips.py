"""The one way a test skips. Under ``CI=true`` a skip is a failure, unless its reason is a property of the host that
CI's machine cannot have; those are listed here, each with why CI cannot provide it.

A user's clone without an optional tool skips with the reason (and how to install it); CI installs everything
(``.ci/run``), so a missing tool there is a broken CI, not a reason to pass.
"""

from __future__ import annotations

import os
from typing import Literal, NoReturn

import pytest

#: Host properties CI cannot have, and why. A skip naming one of these is allowed under CI=true.
HostProperty = Literal["cgroup-v1-devices", "kernel-mdwe", "writable-cgroup2"]
HOST_PROPERTIES: dict[HostProperty, str] = {
    # CI runs in a container on a cgroup v2 host: there is no v1 devices hierarchy to write a rule into.
    "cgroup-v1-devices": "root and a cgroup v1 devices hierarchy at /sys/fs/cgroup/devices",
    # PR_SET_MDWE exists from Linux 6.3; the CI kernel is the provider's, not chosen by the project.
    "kernel-mdwe": "a kernel with PR_SET_MDWE (Linux 6.3+)",
    # Creating a cgroup needs a writable, delegated cgroup2 mount, which an unprivileged CI container lacks.
    "writable-cgroup2": "a writable cgroup2 mount to create a cgroup in",
}


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip on a user's machine; fail under CI=true, where whatever is missing must be provided."""
    if in_ci():
        pytest.fail(f"{reason}: CI must provide it (.ci/run, Makefile)")
    pytest.skip(reason)


def host_lacks(prop: HostProperty, detail: str = "") -> NoReturn:
    """Skip, CI included: this host lacks ``prop``, which CI's machine cannot have either (see HOST_PROPERTIES)."""
    reason = f"needs {HOST_PROPERTIES[prop]}"
    pytest.skip(f"{reason} ({detail})" if detail else reason)
