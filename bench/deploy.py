"""Real-process deployment speed and memory.

    .venv/bin/python bench/deploy.py --rounds 10 [--set "batch-size=128"]

Runs `fedfraud deploy` (a SuperLink and ten banks, each `fedfraud-bank run`: its
SuperNode and its task executor; gRPC, TLS and bank authentication) from a clean
process table and prints: total wall time (startup included), per-round seconds,
peak memory of every process of the run together, and an idle bank's memory (all its
processes, once every bank is online and before the run starts). Memory is PSS: shared
pages (e.g. a task forked from its bank's executor) are counted once, not per process.
Also the CPU seconds by part (SuperLink, SuperNodes, executors with their tasks,
ServerApp: the processes of the run's FLWR_HOME, not the `fedfraud` command itself,
which prepares the demo data), sampled every 0.2 s, over the whole run, until the run
sees its banks (start-up), and per warm round (from the end
of round 2 to the end of the last round but one: no start-up, no final evaluate):
where a round's time goes on a machine that is short of cores. A round can take no
less than its CPU seconds over the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(APP_DIR))

from common.processes import descendants, proc_stat, processes_with_env  # noqa: E402

EXECUTOR = "bank executor + tasks"


def rss_mb(pid: int) -> float:
    """The process's proportional set size: its own pages plus its share of pages it
    shares (a bank's forked tasks share the executor's memory copy-on-write; summing
    their RSS would count those pages once per task)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def role(command: str) -> str:
    """Which part of the network a process is, for the CPU breakdown."""
    for marker, name in (("server.superlink", "SuperLink"), ("client.supernode", "SuperNode"),
                         ("executor", EXECUTOR),
                         ("flwr-serverapp", "ServerApp"), ("fedfraud-bank", "bank supervisor")):
        if marker in command:
            return name
    return command.split()[0].rsplit("/", 1)[-1] if command else "?"


def summed(pairs: Iterable[tuple[str, float]]) -> dict[str, float]:
    """The values of (name, value) pairs added up by name."""
    totals: dict[str, float] = {}
    for name, value in pairs:
        totals[name] = totals.get(name, 0.0) + value
    return totals


class Sampler(threading.Thread):
    """Samples the summed PSS of every process of the run every 0.2 s, and each
    process's CPU time (the last reading before it ends)."""

    def __init__(self, marker: str) -> None:
        super().__init__(daemon=True)
        self.marker, self.peak_mb, self.idle_bank_mb = marker, 0.0, 0.0
        self.started = time.monotonic()
        self.peak_at, self.peak_by_role = 0.0, {}  # when the peak was, each part's MB then
        self.idle_bank_by_part: dict[str, float] = {}  # the largest idle bank's MB by part
        self.roles: dict[int, str | None] = {}  # None: a forked task
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> its role, its CPU seconds
        self.stopped = threading.Event()

    def cpu_by_role(self) -> dict[str, float]:
        totals = summed(list(self.cpu.values()))  # a copy: the sampler adds to it
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def sample_cpu(self, pid: int) -> None:
        """The process's CPU seconds so far. An executor's include the tasks it has
        reaped; a forked task is counted there, not itself; a supervisor's reaped
        children (its SuperNode and executor, once it stops them) are not counted."""
        fields = proc_stat(pid)
        if fields is None:
            return
        if pid not in self.roles:
            command = cmdline(pid)
            self.roles[pid] = None if command == cmdline(int(fields[1])) else role(command)
        if (name := self.roles[pid]) is not None:
            times = fields[11:15] if name == EXECUTOR else fields[11:13]
            self.cpu[pid] = (name, sum(int(t) for t in times) / os.sysconf("SC_CLK_TCK"))

    def bank_mb(self, pids: list[int], bank: int) -> dict[str, float]:
        """One bank's processes (its command, SuperNode and executor): MB by part."""
        for pid in pids:
            words = cmdline(pid).split()
            if "fedfraud-bank" in " ".join(words[:2]) and "run" in words and \
                    words[words.index("--bank-id") + 1] == str(bank):
                return summed((role(cmdline(p)), rss_mb(p)) for p in (pid, *descendants(pid)))
        return {}

    def run(self) -> None:
        while not self.stopped.is_set():
            pids = processes_with_env(self.marker)
            for pid in pids:
                self.sample_cpu(pid)
            sizes = {pid: rss_mb(pid) for pid in pids}
            if (total := sum(sizes.values())) > self.peak_mb:
                self.peak_mb, self.peak_at = total, time.monotonic() - self.started
                # No role: a forked task, or a preparer child of its executor.
                self.peak_by_role = summed(
                    (self.roles.get(pid) or "bank task or preparer", mb)
                    for pid, mb in sizes.items())
            time.sleep(0.2)


def run_deploy(rounds: int, banks: int, work: Path, overrides: list[str]) -> dict:
    path = "deploy"
    flwr_home = work / f"flwr-{path}"
    command = [
        str(BIN / "fedfraud"), "--app-dir", str(APP_DIR), "--flwr-home", str(flwr_home),
        "--set", f"num-server-rounds={rounds}", "--set", f"num-banks={banks}",
        "--set", f"min-banks={banks}", "--set", f"data-dir='{work / 'data'}'",
        "--set", f"runs-dir='{work / f'runs-{path}'}'",
        *(word for override in overrides for word in ("--set", override)),
        "deploy", "--certs", str(work / "certs"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    sampler = Sampler(f"FLWR_HOME={flwr_home}")
    sampler.start()
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    warm: dict[int, dict[str, float]] = {}  # round -> CPU by role when it ended
    startup: dict[str, float] = {}  # CPU by role when the run saw its banks
    for line in process.stdout:
        if (ended := round_ended(line, rounds)) in (2, rounds - 1):
            warm[ended] = sampler.cpu_by_role()
        if "banks connected" in line:
            startup = sampler.cpu_by_role()
            pids = processes_with_env(f"FLWR_HOME={flwr_home}")
            sampler.idle_bank_by_part = max((sampler.bank_mb(pids, b) for b in range(banks)),
                                            key=lambda parts: sum(parts.values()))
            sampler.idle_bank_mb = sum(sampler.idle_bank_by_part.values())
        if "fedfraud" in line:
            print(f"  [{path} {time.monotonic() - started:5.1f} s] {line.strip()}", flush=True)
    code = process.wait()
    wall = time.monotonic() - started
    sampler.stopped.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"{path} deployment failed with exit code {code}")
    metrics = json.loads((work / f"runs-{path}" / "latest" / "metrics.json").read_text())
    return {"wall_s": wall, "round_s": metrics["timing"]["round_s"],
            "peak_mb": sampler.peak_mb, "idle_bank_mb": sampler.idle_bank_mb,
            "peak_at_s": sampler.peak_at, "peak_mb_by_part": sampler.peak_by_role,
            "idle_bank_mb_by_part": sampler.idle_bank_by_part,
            "cpu_s": sampler.cpu_by_role(), "cpu_s_startup": startup,
            "cpu_s_per_warm_round": per_round(warm)}


def round_ended(line: str, rounds: int) -> int | None:
    """The round a "fedfraud round 3/10: 2.9 s" line reports as ended."""
    marker = "fedfraud round "
    if marker not in line or f"/{rounds}:" not in line:
        return None
    return int(line.split(marker, 1)[1].split("/", 1)[0])


def per_round(warm: dict[int, dict[str, float]]) -> dict[str, float]:
    """CPU seconds per role and round between the two readings in ``warm``."""
    if len(warm) != 2:
        return {}
    (first, before), (last, after) = sorted(warm.items())
    return {name: (seconds - before.get(name, 0.0)) / (last - first)
            for name, seconds in after.items()}


def by_part(cpu_s: dict[str, float], digits: int) -> str:
    """"SuperLink 1.2, SuperNode 0.8, ...": CPU seconds by part, as the bench prints them."""
    return ", ".join(f"{name} {seconds:.{digits}f}" for name, seconds in cpu_s.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--banks", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="a run-config override, as fedfraud --set takes it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {"deploy": run_deploy(args.rounds, args.banks, Path(tmp), args.overrides)}
    print(f"\n{args.banks} banks, {args.rounds} rounds, TLS + bank authentication"
          + (f", settings: {args.overrides}" if args.overrides else ""))
    print(f"{'path':6} {'wall s':>8} {'first round s':>14} {'warm round s (median)':>22} "
          f"{'peak MB':>8} {'idle bank MB':>13}")
    for path, r in results.items():
        warm_rounds = sorted(r["round_s"][1:]) or r["round_s"]
        median = warm_rounds[len(warm_rounds) // 2]
        print(f"{path:6} {r['wall_s']:8.1f} {r['round_s'][0]:14.1f} {median:22.1f} "
              f"{r['peak_mb']:8.0f} {r['idle_bank_mb']:13.0f}")
        print(f"       per round: {' '.join(f'{s:.1f}' for s in r['round_s'])}")
        parts = dict(sorted(r["peak_mb_by_part"].items(), key=lambda item: -item[1]))
        print(f"       peak at {r['peak_at_s']:.1f} s, MB: {by_part(parts, 0)}")
        print(f"       idle bank, MB: {by_part(r['idle_bank_mb_by_part'], 1)}")
        print(f"       CPU s (whole run, sampled): {by_part(r['cpu_s'], 1)}")
        print(f"       CPU s until the banks are connected: {by_part(r['cpu_s_startup'], 1)}")
        if per_warm_round := r["cpu_s_per_warm_round"]:
            print(f"       CPU s per warm round: {sum(per_warm_round.values()):.2f} in all, "
                  f"on {os.cpu_count()} cores: {by_part(per_warm_round, 2)}")


if __name__ == "__main__":
    main()
