"""A real single-node Slurm for tests: Debian's ``munged``, ``slurmctld`` and ``slurmd`` on localhost, as root.

What only root reads lives in ``workdir``: munge's key, pid and log, the controller's state, the daemons' logs,
the Prolog/Epilog wrappers. What a job's user must reach lives in a second temp dir, searchable by all (a test's own
``tmp_path`` is not): ``slurm.conf`` and ``cgroup.conf`` (``srun`` inside a job reads the config), munge's socket,
and slurmd's spool (a batch script runs from there as its user). The daemons run in the foreground (``-D``) as children
of this object, on free ports, with ``SLURM_CONF`` pointing at the written config (clients get it through
:attr:`SlurmCluster.env`). /etc/slurm and /etc/munge are never read.

The node has a name of its own (``NodeName=cbt<pid>n<k>``, ``slurmd -N``, address 127.0.0.1), so two clusters on one
host never share Slurm's cgroups: Debian builds Slurm with multiple-slurmd support, and on cgroup v1 its job
cgroups are ``<controller>/slurm_<NodeName>/uid_<uid>/job_<id>/step_<n>/task_<t>``. Processes are tracked and
confined with ``proctrack/cgroup``, ``task/cgroup`` and ``jobacct_gather/cgroup``; ``cgroup.conf`` lets Slurm
detect the cgroup version and ignores systemd (``IgnoreSystemd=yes``: test containers have no systemd as PID 1).

Slurm runs ``Prolog``/``Epilog`` with a minimal environment of its own (no PATH, none of slurmd's variables), so a
script that needs settings (a spool directory) is run through a wrapper written here that exports ``script_env``
and execs it.

:meth:`SlurmCluster.stop` cancels the jobs left, waits for the queue to empty, stops slurmd and slurmctld (SIGTERM,
then SIGKILL after a bound), kills any ``slurmstepd`` of this cluster still alive (found by ``SLURM_CONF`` in its
environment, by pid), stops munged and removes the cluster's emptied cgroup directories.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
_CLUSTERS = itertools.count(1)  # node names unique within a process too


class SlurmError(RuntimeError):
    """A daemon exited or did not become ready; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait(predicate: Callable[[], object], what: str, timeout: float) -> None:
    """Poll ``predicate`` (5 ms doubling to 0.2 s) until it is truthy; :class:`SlurmError` after ``timeout``."""
    deadline = time.monotonic() + timeout
    interval = 0.005
    while not predicate():
        if time.monotonic() >= deadline:
            raise SlurmError(f"{what} not within {timeout:g} s")
        time.sleep(interval)
        interval = min(interval * 2, 0.2)


def cgroup_version(root: Path = CGROUP_ROOT) -> int:
    """2 on a unified host (``cgroup.controllers`` at the root), else 1 (v1 or hybrid)."""
    return 2 if (root / "cgroup.controllers").exists() else 1


def can_create_cgroups(root: Path = CGROUP_ROOT) -> str:
    """Empty when this process can create a cgroup where Slurm will (the v1 ``cpuacct`` hierarchy, or the v2 root);
    else why not."""
    where = root if cgroup_version(root) == 2 else root / "cpuacct"
    probe = where / f"carbond-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError as err:
        return f"cannot create a cgroup in {where}: {err}"
    probe.rmdir()
    return ""


@dataclass(frozen=True, slots=True)
class Job:
    """One job as ``scontrol show job -o`` describes it."""

    job_id: int
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED ...
    user: str
    uid: int
    account: str
    partition: str
    name: str
    node_list: str
    fields: Mapping[str, str]

    @property
    def finished(self) -> bool:
        return self.state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED")


_FIELD = re.compile(r"(\w+)=(\S*)")
_USER = re.compile(r"^(.*)\((\d+)\)$")


def parse_job(line: str) -> Job:
    """A :class:`Job` from one line of ``scontrol show job -o`` (``UserId=nobody(65534)`` ...)."""
    fields = dict(_FIELD.findall(line))
    user = _USER.match(fields.get("UserId", ""))
    return Job(
        job_id=int(fields["JobId"]),
        state=fields.get("JobState", ""),
        user=user.group(1) if user else "",
        uid=int(user.group(2)) if user else -1,
        account=fields.get("Account", "") if fields.get("Account") != "(null)" else "",
        partition=fields.get("Partition", ""),
        name=fields.get("JobName", ""),
        node_list=fields.get("NodeList", ""),
        fields=fields,
    )


class SlurmCluster:
    """``with SlurmCluster(tmp, prolog=..., script_env={...}) as c: c.sbatch(...)``: munged, slurmctld, slurmd.

    ``prolog``/``epilog`` are node scripts run by slurmd as root around every job (through a wrapper exporting
    ``script_env``), with ``PrologFlags=<prolog_flags>`` (``Alloc,Contain`` adds each job's ``extern`` step);
    ``cpus`` defaults to ``os.cpu_count()``. The public temp dir is made here and removed by :meth:`stop`: start and
    stop the cluster (or use it as a context manager) once it is made.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        prolog: Path | None = None,
        epilog: Path | None = None,
        script_env: Mapping[str, str] | None = None,
        cpus: int | None = None,
        real_memory_mb: int = 1024,
        node_name: str | None = None,
        partition: str = "debug",
        prolog_flags: str = "Alloc",
    ) -> None:
        self.workdir = workdir
        self.node_name = node_name or f"cbt{os.getpid()}n{next(_CLUSTERS)}"
        self.partition = partition
        self.cpus = cpus or os.cpu_count() or 1
        self.real_memory_mb = real_memory_mb
        self.prolog, self.epilog = prolog, epilog
        self.script_env = dict(script_env or {})
        self.prolog_flags = prolog_flags  # Alloc: the Prolog runs when the allocation starts, as sites install it
        self.public = Path(tempfile.mkdtemp(prefix="carbond-slurm-"))  # removed by stop()
        self.public.chmod(0o755)
        self.conf = self.public / "slurm.conf"
        self.spool = self.public / "spool"
        self.munge_socket = self.public / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    # -- configuration -------------------------------------------------------------------------------------------

    def _wrapper(self, name: str, script: Path) -> Path:
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(self.script_env.items()))
        path = self.workdir / name
        path.write_text(f'#!/bin/sh\n{exports}exec {shlex.quote(str(script))} "$@"\n')
        path.chmod(0o755)
        return path

    def slurm_conf(self, ctld_port: int, slurmd_port: int) -> str:
        w, lines = self.workdir, []
        if self.prolog is not None:
            lines.append(f"Prolog={self._wrapper('prolog-wrapper.sh', self.prolog)}")
        if self.epilog is not None:
            lines.append(f"Epilog={self._wrapper('epilog-wrapper.sh', self.epilog)}")
        if self.prolog_flags:
            lines.append(f"PrologFlags={self.prolog_flags}")
        return "\n".join(
            [
                "ClusterName=carbondtest",
                "SlurmctldHost=localhost(127.0.0.1)",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"SlurmctldPort={ctld_port}",
                f"SlurmdPort={slurmd_port}",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={self.munge_socket}",
                f"StateSaveLocation={w / 'state'}",
                f"SlurmdSpoolDir={self.spool}",
                f"SlurmctldPidFile={w / 'slurmctld.pid'}",
                f"SlurmdPidFile={w / 'slurmd.pid'}",
                f"SlurmctldLogFile={w / 'slurmctld.log'}",
                f"SlurmdLogFile={w / 'slurmd.log'}",
                "SlurmctldDebug=info",
                "SlurmdDebug=info",
                "ProctrackType=proctrack/cgroup",
                "TaskPlugin=task/cgroup",
                "JobAcctGatherType=jobacct_gather/cgroup",
                "JobAcctGatherFrequency=30",
                "SchedulerType=sched/builtin",
                "SchedulerParameters=batch_sched_delay=0",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                "MpiDefault=none",
                "MailProg=/bin/true",
                "KillWait=5",
                "InactiveLimit=0",
                *lines,
                f"NodeName={self.node_name} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 "
                f"CPUs={self.cpus} RealMemory={self.real_memory_mb} State=UNKNOWN",
                f"PartitionName={self.partition} Nodes={self.node_name} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    @staticmethod
    def cgroup_conf() -> str:
        # autodetect: cgroup/v1 on v1 and hybrid hosts, cgroup/v2 on unified ones; memory is not confined (the test
        # jobs are tiny and a v1 memory limit needs swap accounting this kernel may lack)
        return "CgroupPlugin=autodetect\nIgnoreSystemd=yes\nConstrainCores=yes\nConstrainRAMSpace=no\n"

    # -- processes -------------------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.out").open("ab")
        self._logs.append(log)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir)
        self._procs[name] = proc
        return proc

    def _alive(self, name: str) -> bool:
        proc = self._procs[name]
        if proc.poll() is not None:
            raise SlurmError(f"{name} exited with {proc.returncode}: {self.log(name)[-2000:]}")
        return True

    def start(self, timeout: float = READY_TIMEOUT_S) -> SlurmCluster:
        """Start munged, slurmctld and slurmd; return once the node is idle in ``sinfo``."""
        w = self.workdir
        for sub in (w / "munge", w / "state", self.spool, self.munge_socket.parent):
            sub.mkdir(parents=True, exist_ok=True)
            sub.chmod(0o700 if sub == w / "munge" else 0o755)  # munged wants its socket's directory searchable by all
        key = w / "munge" / "munge.key"
        subprocess.run(["/usr/sbin/mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        self.conf.write_text(self.slurm_conf(free_port(), free_port()))
        (self.public / "cgroup.conf").write_text(self.cgroup_conf())
        try:
            self._start_daemons(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_daemons(self, timeout: float) -> None:
        m = self.workdir / "munge"
        munged = ["/usr/sbin/munged", "-F", "--force", f"--key-file={m / 'munge.key'}", f"--socket={self.munge_socket}"]
        munged += [f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'seed'}"]
        self._spawn("munged", munged)
        _wait(lambda: self._alive("munged") and self.munge_socket.exists(), "munged's socket", timeout)
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)])
        _wait(lambda: self._alive("slurmctld") and self._ping(), "slurmctld answering scontrol ping", timeout)
        self._spawn("slurmd", ["/usr/sbin/slurmd", "-D", "-N", self.node_name, "-f", str(self.conf)])
        _wait(lambda: self._alive("slurmd") and self.node_state() == "idle", "the node idle in sinfo", timeout)

    def _ping(self) -> bool:
        out = self.run(["scontrol", "ping"], check=False)
        return out.returncode == 0 and " is UP" in out.stdout

    def node_state(self) -> str:
        out = self.run(["sinfo", "-h", "-n", self.node_name, "-o", "%T"], check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Cancel every job, stop the daemons, kill this cluster's step daemons and remove its cgroups."""
        try:
            if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
                self._cancel_all(timeout)
            for name in ("slurmd", "slurmctld"):
                if name in self._procs:
                    _terminate(self._procs[name], timeout)
            for pid in self.step_daemons():
                _kill_pid(pid)
            if "munged" in self._procs:
                _terminate(self._procs["munged"], timeout)
        finally:
            for log in self._logs:
                log.close()
            self._logs.clear()
            self._remove_cgroups()
            shutil.rmtree(self.public, ignore_errors=True)

    def _cancel_all(self, timeout: float) -> None:
        ids = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
        if ids:
            self.run(["scancel", *ids], check=False)
        # past the bound the daemons are stopped anyway, and any step daemon left is killed by pid
        with contextlib.suppress(SlurmError):
            _wait(
                lambda: not self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip(), "empty queue", timeout
            )

    def step_daemons(self) -> list[int]:
        """Pids of ``slurmstepd`` processes of this cluster (their environment holds its ``SLURM_CONF``)."""
        needle = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if not (entry / "comm").read_bytes().startswith(b"slurmstepd"):
                    continue
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # exited while listed
                continue
        return found

    def cgroup_dirs(self) -> list[Path]:
        """This node's top cgroup directory in every hierarchy where Slurm made one (``slurm_<node>``)."""
        if cgroup_version() == 2:
            scope = CGROUP_ROOT / "system.slice" / f"{self.node_name}_slurmstepd.scope"
            return [p for p in (scope, CGROUP_ROOT / "system.slice" / "slurmstepd.scope") if p.is_dir()]
        try:
            controllers = [p for p in CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink()]
        except OSError:
            return []
        return [c / f"slurm_{self.node_name}" for c in controllers if (c / f"slurm_{self.node_name}").is_dir()]

    def _remove_cgroups(self) -> None:
        if cgroup_version() == 2:
            return  # the v2 scope may be shared with another slurmd; Slurm removes its job cgroups itself
        for top in self.cgroup_dirs():
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -t[0].count("/")):
                try:
                    os.rmdir(dirpath)
                except OSError:  # still holds a process: leave it rather than fail the stop
                    continue

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- clients ---------------------------------------------------------------------------------------------------

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster."""
        out = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and out.returncode != 0:
            raise SlurmError(f"{shlex.join(argv)} exited with {out.returncode}: {out.stderr.strip()}")
        return out

    def sbatch(self, *args: str) -> int:
        """Submit with ``sbatch --parsable <args>``; the job id."""
        out = self.run(["sbatch", "--parsable", *args])
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> Job | None:
        """The job as the controller knows it (None once it has forgotten it: ``MinJobAge``, 300 s by default)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        line = out.stdout.strip()
        return parse_job(line) if out.returncode == 0 and line.startswith("JobId=") else None

    def wait_job(self, job_id: int, predicate: Callable[[Job], bool], what: str, timeout: float = 60.0) -> Job:
        """Poll the job until ``predicate`` holds; the job then."""
        seen: list[Job] = []

        def check() -> bool:
            job = self.job(job_id)
            if job is not None:
                seen[:] = [job]
            return job is not None and predicate(job)

        try:
            _wait(check, f"job {job_id} {what}", timeout)
        except SlurmError as err:
            raise SlurmError(f"{err} (last state: {seen[0].state if seen else 'unknown'})") from None
        return seen[0]

    def job_cgroup(self, job: Job, controller: str = "cpuacct") -> Path:
        """Where Slurm puts the job's cgroup on this host (v1: in ``controller``'s hierarchy)."""
        if cgroup_version() == 2:
            return CGROUP_ROOT / "system.slice" / f"{self.node_name}_slurmstepd.scope" / f"job_{job.job_id}"
        return CGROUP_ROOT / controller / f"slurm_{self.node_name}" / f"uid_{job.uid}" / f"job_{job.job_id}"

    def log(self, name: str) -> str:
        """A daemon's output (``munged``, ``slurmctld``, ``slurmd``) and Slurm's own log file for it."""
        parts = [self.workdir / f"{name}.out", self.workdir / f"{name}.log", self.workdir / "munge" / f"{name}.log"]
        return "".join(p.read_text(errors="replace") for p in parts if p.exists())


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # gone meanwhile
        return
