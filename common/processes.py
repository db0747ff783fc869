"""Start and stop real processes: Flower's and fedfraud's own, operator's and bank's.

Every process starts in its own session and is stopped by killing its whole process
group (and its descendants' groups), so nothing is left behind. ``FLWR_HOME`` is
project-local; telemetry, the update check and runtime dependency installation are off.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType

BIN = Path(sys.executable).parent  # flwr, flower-superlink, ... of this environment
STOP_GRACE_S = 10.0


def flower_env(flwr_home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
        # Ten banks share this machine's cores: one torch thread each, or they thrash.
        "OMP_NUM_THREADS": "1",
    }


@dataclass
class Backoff:
    """A poller's wait: ``busy_s`` right after activity, doubling while nothing comes,
    up to ``idle_s``. A bank's pollers answer a round's next message within ~``busy_s``
    and cost little while the bank idles: ten banks polling every 0.05-0.1 s used 1.3
    of this machine's 2 cores doing nothing (measured), the cores a round needs."""

    busy_s: float
    idle_s: float
    wait_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.wait_s = self.busy_s

    def active(self) -> None:
        self.wait_s = self.busy_s

    def sleep(self) -> None:
        time.sleep(self.wait_s)
        self.wait_s = min(2 * self.wait_s, self.idle_s)


OBJECT_RETRY_S = 0.05  # first wait before pulling again an object not uploaded yet


def retry_object_pulls_promptly(module: ModuleType, name: str = "pull_objects") -> None:
    """Have ``module`` call Flower's ``name`` (``pull_objects`` or
    ``pull_and_inflate_object_from_tree``, flwr.supercore.inflatable.inflatable_utils)
    with a first retry after ``OBJECT_RETRY_S`` (doubling, as Flower's) instead of
    ``PULL_INITIAL_BACKOFF``, 1 s.

    A message is visible once its metadata is pushed, before its objects (weights,
    metrics) are uploaded. The ServerApp polling for a bank's reply, a SuperNode
    pulling the round's message and a task pulling it from its SuperNode each land in
    that gap now and then, and Flower's first retry then waits ~1 s (measured: rounds
    of 2.6-3.8 s beside rounds of ~1.9 s, `make bench-deploy`). Each process that
    pulls calls this for the one module it pulls through: ``server/grid.py`` (the
    ServerApp's ``HttpGrid``), ``client/supernode.py`` (the SuperNode's loop),
    ``client/executor.py`` (a task's runtime). ``tests/test_bank_boundary.py`` fails
    if Flower stops pulling through those names."""
    pull = getattr(module, name)
    if not (isinstance(pull, partial)  # ours already (a partial of Flower's is not)
            and pull.keywords.get("initial_backoff") == OBJECT_RETRY_S):
        setattr(module, name, partial(pull, initial_backoff=OBJECT_RETRY_S))


def die_with_parent(parent: int) -> None:
    """In a forked child of ``parent``: be killed (SIGKILL) when ``parent`` ends, so a
    bank's executor that is killed outright leaves no preparer or task running on its
    own (a supervisor stops the executor's group, but a killed executor is reaped first
    and its orphans are then nobody's descendants). Linux's prctl; elsewhere nothing."""
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # it ended before we asked
        os._exit(1)


def free_port() -> int:
    """A port nobody listens on now, so two runs on one machine do not collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port: int, deadline_s: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with code {process.returncode}")
        if port_in_use(port):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {deadline_s} s")


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...,
    utime at 11), or None once the process is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Flower's SuperExec starts its own session,
    so killing the parent's process group alone would leave it behind)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := proc_stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def processes_with_env(marker: str) -> list[int]:
    """PIDs of live processes whose environment contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _signal_groups(groups: set[int], sig: signal.Signals) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass


def stop(*processes: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGTERM the processes' groups and their descendants' groups, all at once;
    SIGKILL whatever still lives after the grace period."""
    tree = [pid for process in processes for pid in (process.pid, *descendants(process.pid))]
    groups: set[int] = set()
    for pid in tree:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgid(0))  # never our own group
    _signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(_alive(pid) for pid in tree):
        time.sleep(0.1)
    _signal_groups(groups, signal.SIGKILL)
    for process in processes:
        process.wait()


def _alive(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


@dataclass
class Services:
    """Processes started for one run, stopped together."""

    env: dict[str, str]
    log_dir: Path
    processes: list[subprocess.Popen[bytes]]

    def start(self, name: str, command: Sequence[str]) -> subprocess.Popen[bytes]:
        # Appended: a process restarted under the same name (a bank's SuperNode waiting to
        # be registered) keeps the record of its earlier attempts.
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        process = subprocess.Popen(
            list(command), env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        self.processes.append(process)
        return process


@contextmanager
def services(flwr_home: Path) -> Iterator[Services]:
    """Processes started inside are stopped on the way out, also when this process is
    told to stop (SIGTERM becomes SystemExit, so the ``finally`` runs: a supervisor that
    is killed takes its SuperLink, SuperNodes and executors with it)."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        previous = signal.signal(signal.SIGTERM,
                                 lambda *_: sys.exit(128 + signal.SIGTERM))
    log_dir = flwr_home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = Services(flower_env(flwr_home), log_dir, [])
    try:
        yield started
    finally:
        if main:  # a second SIGTERM must not cut the stopping short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stop(*started.processes)
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
