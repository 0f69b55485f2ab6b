"""What resolving GPU processes' cgroups from inside a cgroup namespace costs, on a fixture of 1,000 pod containers:
the one walk of ``cgroup.procs`` that finds carbond's own cgroup (carbond's container last in the walk's order, the
worst case), and 80 GPU processes matched by suffix, first and then cached.
Run: ``.venv/bin/python -m tests.attribution.pidcgroups_cost``."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from carbond.attribution.pidcgroups import PidCgroups, find_pid
from carbond.testing.cgroupfs import CgroupTree, shown_path, write_pid_cgroup

N = 1000
PIDS = 80


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tree = CgroupTree(root / "cg")
        paths = [
            f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{i:032x}.slice/cri-containerd-{i:064x}.scope"
            for i in range(N)
        ]
        for i, path in enumerate(paths):
            tree.add(path, write=False)
            tree.set_procs(path, [100_000 + i])
        ours = paths[-1]
        tree.set_procs(ours, [os.getpid()])
        write_pid_cgroup(root / "proc", "self", ours, ns_root=ours)
        t = time.perf_counter()
        assert find_pid(root / "cg", os.getpid(), "/") == ours
        scan = time.perf_counter() - t
        pc = PidCgroups(root / "proc", None, 2)  # no hierarchy to search: suffix matching only
        shown = [shown_path(p, ours) for p in paths[:PIDS]]
        known = dict.fromkeys(paths, 0.0)
        timings = []
        for _ in range(2):
            t = time.perf_counter()
            assert all(pc.resolve(s, known) is not None for s in shown)
            timings.append(time.perf_counter() - t)
    print(
        f"{N} cgroups: carbond's own cgroup found by one walk in {scan * 1e3:.1f} ms; {PIDS} GPU processes by suffix "
        f"in {timings[0] * 1e3:.2f} ms, then {timings[1] * 1e3:.3f} ms cached"
    )


if __name__ == "__main__":
    main()
