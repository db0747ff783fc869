"""The bank's task executor: runs the ClientApp for its SuperNode, approved apps only.

The bank's SuperNode runs with ``--isolation process``: it starts no ClientApp itself,
it serves its Runtime API (on 127.0.0.1, behind a SuperExec auth secret only the bank
holds) to this executor, which replaces Flower's SuperExec:

1. it acquires each task with Flower's ``AcquireTask`` (the call Flower's SuperExec
   makes) when the SuperNode rings its doorbell (client/supernode.py; at least once
   a second without), and forks; the child runs Flower's unchanged ``run_clientapp``
   with the task's token. Flower, torch and the bank's ClientApp are imported once, here, so a
   task starts in milliseconds instead of a fresh ``flwr-clientapp`` process per
   message (~1.1 s of Flower's imports plus torch's, on every message);
2. in the child, before Flower installs the run's app bundle (FAB), ``only_approved``
   checks the bundle's SHA-256 against the bank's policy. Any other bundle is refused:
   Flower replies with an error naming the digest, and nothing from that bundle is
   installed, imported or run, so it reads no row. The bank's log says why. Flower
   then loads the app from a folder named by the run's app id, version and hash
   (strings the server sends): ``loaded_where_installed`` refuses any folder but the
   one the approved bundle was installed to.

An approved bundle is byte for byte the app the bank approved (by default its own
installed copy); Flower then loads the ClientApp module already imported here.
These two swaps are the one place fedfraud reaches into Flower's ClientApp runtime:
``tests/test_bank_boundary.py`` fails if a Flower upgrade moves what it relies on.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.supernode import REPLY_BELL, TASK_BELL, Doorbell
from common.processes import die_with_parent, retry_object_pulls_promptly

if TYPE_CHECKING:
    from common.config import Config
    from common.data import PreparedVersion

IDLE_S = 1.0  # the longest the executor waits for a doorbell before it asks anyway
# The Runtime API calls Flower's SuperExec signs with the shared secret.
AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask",
                          "/flwr.proto.Runtime/PullPendingTasks",
                          "/flwr.proto.Runtime/ClaimTask"})


class AppNotApproved(RuntimeError):
    """The run's app bundle is not in the bank's policy (the text goes to the server:
    it names the bank and the digest, nothing of the bank's data)."""


def only_approved(install: Callable[..., Path], approved: frozenset[str], bank: str,
                  installed: list[Path] | None = None) -> Callable[..., Path]:
    """Flower's ``install_from_fab``, refusing any bundle outside ``approved``, and
    installing an approved one once: Flower unpacks and checks the bundle into a
    temporary folder on every task and then keeps the folder it installed before
    (named after the bundle's digest; ~40 files written and removed again per task).
    A bundle whose SHA-256 is approved is byte for byte the one installed then.
    The folder goes to ``installed`` for ``loaded_where_installed``."""
    from logging import ERROR

    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION
    from flwr.supercore import log
    from flwr.supercore.utils import get_flwr_home

    from client.policy import fab_digest

    def install_approved(fab: bytes, install_dir: Path | None = None,
                         skip_prompt: bool = False) -> Path:
        digest = fab_digest(fab)
        if digest not in approved:
            log(ERROR, "%s: refused app bundle sha256 %s: not approved in the bank's "
                    "policy (approved: %s)", bank, digest, sorted(approved))
            raise AppNotApproved(f"{bank} refuses app bundle sha256 {digest}: not "
                                 "approved by the bank's policy")
        apps = (install_dir or get_flwr_home()) / APP_DIR
        folder = next(apps.glob(f"*.{digest[:FAB_HASH_TRUNCATION]}"), None) or install(
            fab, install_dir, skip_prompt)
        if installed is not None:
            installed.append(folder)
        return folder

    return install_approved


def loaded_where_installed(project_dir: Callable[[str, str, str], Path],
                           installed: list[Path], bank: str,
                           ) -> Callable[[str, str, str], Path]:
    """Flower's ``get_project_dir``, refusing any folder but the one the approved
    bundle was just installed to. Flower installs the bundle by its content, then loads
    the ClientApp from ``get_project_dir(run.fab_id, run.fab_version, fab.hash_str)``:
    strings the server sends. A server could send an approved bundle and have the app
    loaded from ``../../<elsewhere>`` (``fab_version = "/../../../tmp/x"``) or from
    another app's folder (another hash)."""
    from logging import ERROR

    from flwr.supercore import log

    def project_dir_checked(fab_id: str, fab_version: str, fab_hash: str) -> Path:
        folder = project_dir(fab_id, fab_version, fab_hash)
        if not installed or folder != installed[-1]:
            log(ERROR, "%s: refused a run whose app id %r, version %r and hash %s name "
                    "the folder %s, not the approved bundle's", bank, fab_id, fab_version,
                fab_hash, folder)
            raise AppNotApproved(f"{bank} refuses to load the app from a folder other "
                                 "than its approved bundle's (app id, version or hash)")
        return folder

    return project_dir_checked


def run_task(runtime: str, token: str, approved: frozenset[str], bank: str) -> None:
    """In the forked child: Flower's own ClientApp runtime, with the app checks, and
    its message's objects pulled again promptly when the task started before the
    SuperNode had them all (``common.processes.retry_object_pulls_promptly``)."""
    from flwr.supernode.runtime import run_clientapp as runtime_module

    retry_object_pulls_promptly(runtime_module, "pull_and_inflate_object_from_tree")
    installed: list[Path] = []
    runtime_module.install_from_fab = only_approved(  # type: ignore[assignment]
        runtime_module.install_from_fab, approved, bank, installed)
    runtime_module.get_project_dir = loaded_where_installed(  # type: ignore[assignment]
        runtime_module.get_project_dir, installed, bank)
    runtime_module.run_clientapp(runtime_api_address=runtime, token=token, insecure=True)


def warm_up(dp: bool) -> None:
    """Import everything a task imports, once, before any fork: Flower's ClientApp
    runtime and the bank's code, and what torch only imports on first use (a tiny
    training step and score), Opacus's DP-SGD too when ``dp``. pandas and scikit-learn
    are not imported here (``Preparing``). Runs no thread that outlives it."""
    import encodings.cp437  # noqa: F401 - zipfile's, for the app bundle

    import client.app  # noqa: F401 - the ClientApp
    import client.bank  # noqa: F401 - the bank's training and evaluation
    import client.ledger  # noqa: F401 - its privacy ledger
    import flwr.supernode.runtime.run_clientapp  # noqa: F401 - Flower's task runtime

    warm_training(privacy=False)
    if dp:
        warm_training(privacy=True)


class Preparing:
    """The bank's file read, split and its scaler fitted (``prepared_bank``) in a
    forked child; ``keep`` waits for it and keeps the result here, so the tasks forked
    later start with it. pandas and scikit-learn (~130 MB, ~1 s of imports) live only
    in that child, which exits when done; started before torch is imported, it shares
    no pages it would copy. A file that does not read is left to the task, which
    reports it in the bank's log."""

    def __init__(self, bank_id: int, shard: Path, config: Config) -> None:
        import pickle

        from common.data import prepared_bank, prepared_with

        self.bank_id = bank_id
        self.pipe, writable = os.pipe()
        executor = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:  # the child: prepare, send, exit without the parent's handlers
            code = 1
            try:
                die_with_parent(executor)
                os.close(self.pipe)
                prepared = prepared_bank(bank_id, shard, config)
                with os.fdopen(writable, "wb") as parent:
                    pickle.dump((prepared_with(bank_id), prepared), parent)
                code = 0
            finally:
                os._exit(code)
        os.close(writable)

    def keep(self) -> None:
        import pickle

        from common.data import keep_prepared

        with os.fdopen(self.pipe, "rb") as child:
            sent = child.read()
        _, status = os.waitpid(self.pid, 0)
        if os.waitstatus_to_exitcode(status) == 0:  # all it sent (not killed half-way)
            keep_prepared(self.bank_id, *pickle.loads(sent))  # from our own child


def warm_training(privacy: bool) -> None:
    """One tiny training step and score; with ``privacy`` through Opacus's DP-SGD."""
    import numpy as np

    from common.metrics import score_histograms
    from common.model import FraudNet, ModelSpec
    from common.task import Privacy, score, train

    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = (np.arange(64) % 2).astype(np.int64)
    model = FraudNet(ModelSpec(in_features=4))
    train(model, x, y, epochs=1, batch_size=32, learning_rate=1e-3, pos_weight=1.0, seed=0,
          privacy=Privacy(noise_multiplier=1.0, max_grad_norm=1.0) if privacy else None)
    score_histograms(y, score(model, x))


def tell(pipe: int, dp: bool, bank_id: int, prepared: PreparedVersion | None) -> None:
    """In a task's child, as it ends: tell the executor what to make ready for the next
    tasks (one JSON line, shorter than a pipe's atomic write): Opacus, if the task
    trained with DP and the executor has not warmed it up; the task's split settings,
    if it prepared the bank's file anew (``prepared`` is what the executor holds)."""
    from common.data import prepared_with

    note: dict[str, Any] = {}
    if not dp and "opacus" in sys.modules:
        note["dp"] = True
    now = prepared_with(bank_id)
    if now is not None and now != prepared:
        note["split"] = {"label_column": now.label_column,
                         "val_fraction": now.val_fraction, "seed": now.seed}
    if note:
        os.write(pipe, json.dumps(note).encode() + b"\n")


def told(pipe: int) -> list[dict[str, Any]]:
    """What ended tasks wrote to ``pipe`` (non-blocking)."""
    try:
        return [json.loads(line) for line in os.read(pipe, 1 << 16).splitlines()]
    except BlockingIOError:
        return []


def serve(runtime: str, secret: bytes, approved: frozenset[str], bank: str,
          shard: Path, bank_id: int, dp: bool, bells: Path, config: Config) -> None:
    """Acquire and run the SuperNode's tasks until killed.

    Between tasks the executor sleeps on its doorbell (``bells``): the SuperNode rings
    it when it has stored a task, and the executor rings the SuperNode's when a task
    has ended (its reply is then stored), so neither side polls the other.

    Opacus is warmed up at start only for a bank whose policy requires DP: importing
    it costs ~2 s of CPU (ten banks starting on two cores: ~10 s of every start), and a
    DP-optional bank mostly trains without it. The bank's file is prepared with
    ``config`` (the app's defaults) first, and torch is imported only once the preparer
    has exited: a bank then never holds pandas and torch at once (ten banks starting
    together peaked at 4.5 GB with the two overlapping, 3.7 GB without, in the same
    start-up time: `make bench-deploy`). A task that used Opacus, or whose run split
    the file otherwise, says so through a pipe (``tell``), and the executor makes that
    ready then, once, for the tasks that follow."""
    Preparing(bank_id, shard, config).keep()
    import torch

    from common.data import prepared_with

    torch.set_num_threads(1)  # one thread per bank process, before torch runs anything
    warm_up(dp)
    notes, note = os.pipe()
    os.set_blocking(notes, False)
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    runtime_api = RuntimeHttpClient.from_server_address(
        server_address=runtime, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret,
                                                   protected_methods=AUTH_METHODS)],
        retry_invoker=make_simple_http_retry_invoker())
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    print(f"{bank}: executor ready; approved apps {sorted(approved)}", flush=True)
    tasks, replies = Doorbell(bells / TASK_BELL), Doorbell(bells / REPLY_BELL)
    children: dict[int, tuple[float, int]] = {}  # pid -> when its task started, its pidfd
    executor = os.getpid()
    while True:
        for pid in list(children):
            done, _, usage = os.wait4(pid, os.WNOHANG)
            if done:
                started, pidfd = children.pop(pid)
                os.close(pidfd)
                replies.ring()
                print(f"{bank}: task done in {time.monotonic() - started:.2f} s "
                      f"({usage.ru_utime + usage.ru_stime:.2f} s CPU)", flush=True)
        for told_now in told(notes):
            if told_now.get("dp") and not dp:
                dp = True  # once, whatever comes of it
                print(f"{bank}: a task trained with DP: warming Opacus up for the next "
                      "ones", flush=True)
                try:
                    warm_training(privacy=True)
                except Exception as err:  # noqa: BLE001 - a speed-up only: tasks import it
                    print(f"{bank}: warming Opacus up failed ({err}); tasks import it",
                          flush=True)
            if settings := told_now.get("split"):
                print(f"{bank}: a run split the bank's file with {settings}: preparing it "
                      "so for the next tasks", flush=True)
                Preparing(bank_id, shard, replace(config, **settings)).keep()
        acquired = runtime_api.AcquireTask(request)
        if not (acquired.HasField("task") and acquired.token):
            # Until the SuperNode rings or a task ends (its pidfd becomes readable).
            tasks.wait(IDLE_S, *(pidfd for _, pidfd in children.values()))
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        prepared = prepared_with(bank_id)
        pid = os.fork()
        if pid == 0:  # the child: one task, then exit without the parent's handlers
            code = 1
            try:
                die_with_parent(executor)
                run_task(runtime, acquired.token, approved, bank)
                code = 0
            except SystemExit as end:  # flwr_exit ends a task this way
                code = end.code if isinstance(end.code, int) else 1
            finally:
                try:
                    tell(note, dp, bank_id, prepared)
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        children[pid] = (time.monotonic(), os.pidfd_open(pid))
