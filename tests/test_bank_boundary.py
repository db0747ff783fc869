"""The bank's side of the trust boundary: its policy, its keys, its app check, and the
Flower internals the executor relies on (these fail when a Flower upgrade moves them)."""

from __future__ import annotations

import inspect
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from client.executor import AppNotApproved, loaded_where_installed, only_approved
from client.identity import PRIVATE_KEY, PUBLIC_KEY, ensure_key_pair
from client.policy import DEFAULT_POLICY, INSTALLED, Policy, PolicyError, app_digest
from common.config import Config
from common.files import write_private
from server.certs import make_certificates
from tests.conftest import APP_DIR, app_config, fresh_python

BIN = Path(sys.executable).parent


def test_the_default_policy_is_the_documented_file_and_allows_the_default_run() -> None:
    policy = Policy.from_toml(DEFAULT_POLICY, "default")
    assert policy.approved_apps == (INSTALLED,)
    assert not policy.require_dp and not policy.membership_audit
    assert not policy.require_secure_aggregation
    assert policy.refusals(app_config()) == []
    # every key (or pair of bounds) is documented by the comment right above it
    lines = DEFAULT_POLICY.splitlines()
    for number, line in enumerate(lines):
        if " = " in line and not line.startswith("#"):
            above = lines[number - 1]
            assert above.startswith("#") or " = " in above, line


@pytest.mark.parametrize("text, error", [
    ("approved-apps = 'x'", "approved-apps has the wrong type"),
    ("max-rounds = true", "max-rounds has the wrong type"),
    ("let-the-server-decide = true", "unknown keys"),
    ("min-val-fraction = 0.5\nmax-val-fraction = 0.2", "min-val-fraction"),
    ("[[", "not valid TOML"),
])
def test_a_broken_policy_is_an_error_naming_the_file(text: str, error: str) -> None:
    with pytest.raises(PolicyError, match=f"bank-3/policy.toml: .*{error}"):
        Policy.from_toml(text, "bank-3/policy.toml")


def test_installed_resolves_to_the_bundle_flower_builds_from_the_bank_s_own_copy(
    tmp_path: Path,
) -> None:
    policy = Policy.from_toml('approved-apps = ["installed", "ABC123"]', "p")

    approved = policy.approved(APP_DIR)

    assert approved == {app_digest(APP_DIR), "abc123"}
    # The bundle holds the code and pyproject only: a run folder, data or docs lying in
    # the app folder do not change what the bank approved.
    copy = tmp_path / "app"
    for part in ("common", "client", "server"):
        (copy / part).mkdir(parents=True)
        for source in (APP_DIR / part).glob("*.py"):
            (copy / part / source.name).write_bytes(source.read_bytes())
    (copy / "pyproject.toml").write_bytes((APP_DIR / "pyproject.toml").read_bytes())
    (copy / "runs" / "1").mkdir(parents=True)
    (copy / "runs" / "1" / "metrics.json").write_text("{}")
    (copy / "NOTES.md").write_text("notes")
    assert app_digest(copy) == app_digest(APP_DIR)
    (copy / "client" / "app.py").write_text((copy / "client" / "app.py").read_text() + "#")
    assert app_digest(copy) != app_digest(APP_DIR)


def test_the_bundle_from_the_app_s_own_folders_is_flower_s_whole_bundle() -> None:
    """A bank approves the digest of the bundle built from the folders fab-include
    names (common/files.py: bundle_files); it must be byte for byte the bundle Flower
    builds from walking the whole app folder (what ``flwr run`` sends)."""
    from flwr.cli.build import build_fab_from_disk, build_fab_from_files

    from common.files import bundle_files

    files = bundle_files(APP_DIR)
    assert not any(name.startswith((".venv/", "data/", "runs/")) for name in files)
    assert build_fab_from_files(files)[0] == build_fab_from_disk(APP_DIR)


@pytest.mark.parametrize("include", [
    '["common/**/*.py", "client/**/*.py"]',  # anchored: pruned
    '["/common/*.py", "client/*.py"]',
    '["common/"]',  # a folder named common at any depth: the whole walk
    '["**/*.py"]',
    '["common/**/*.py", "../outside/*.py"]',  # never outside the app folder
])
def test_the_pruned_bundle_is_flower_s_for_any_fab_include(tmp_path: Path,
                                                          include: str) -> None:
    from flwr.cli.build import build_fab_from_disk, build_fab_from_files

    from common.files import bundle_files

    app = tmp_path / "app"
    for name in ("common/a.py", "client/b.py", "tests/common/c.py", "data/d.py"):
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(f"# {name}\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "e.py").write_text("# outside\n")
    pyproject = (APP_DIR / "pyproject.toml").read_text()
    start = pyproject.index("fab-include = ")
    (app / "pyproject.toml").write_text(
        pyproject[:start] + f"fab-include = {include}" + pyproject[pyproject.index("\n", start):])
    files = bundle_files(app)
    assert all((app / name).resolve().is_relative_to(app.resolve()) for name in files)
    try:
        expected = build_fab_from_disk(app)
    except Exception as flower_refused:  # noqa: BLE001 - then ours must refuse alike
        with pytest.raises(type(flower_refused)):
            build_fab_from_files(files)
    else:
        assert build_fab_from_files(files)[0] == expected


def test_only_approved_bundles_are_installed(tmp_path: Path) -> None:
    installed: list[bytes] = []

    def install(fab: bytes, *args: object, **kwargs: object) -> Path:
        installed.append(fab)
        return Path("/installed")

    import hashlib

    good = b"the approved bundle"
    guard = only_approved(install, frozenset({hashlib.sha256(good).hexdigest()}), "bank 3")

    assert guard(good, tmp_path, skip_prompt=True) == Path("/installed")
    with pytest.raises(AppNotApproved, match="bank 3 refuses app bundle sha256 [0-9a-f]{64}"):
        guard(b"the approved bundle, altered", tmp_path)
    assert installed == [good]


def test_an_approved_bundle_is_installed_once_where_flower_installs_it(
        tmp_path: Path) -> None:
    """The executor skips Flower's unpacking of a bundle it installed before: it finds
    Flower's install folder by the bundle's digest, so Flower's folder naming must not
    change; a bundle that is not approved is refused also when one is installed."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.install import install_from_fab

    fab = build_fab_from_disk(APP_DIR)
    calls: list[Path] = []

    def flower_install(*args: object) -> Path:
        calls.append(install_from_fab(*args))  # type: ignore[arg-type]
        return calls[-1]

    guard = only_approved(flower_install, frozenset({app_digest(APP_DIR)}), "bank 3")
    first = guard(fab, tmp_path, True)
    assert calls == [first] and (first / "pyproject.toml").is_file()
    assert guard(fab, tmp_path, True) == first and calls == [first]  # not unpacked again
    with pytest.raises(AppNotApproved):
        guard(fab + b"\0", tmp_path, True)


def test_a_run_naming_another_folder_than_its_approved_bundles_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A malicious server sends an approved bundle but a run whose app id, version or
    hash name another folder: Flower alone would load the ClientApp from there (here a
    folder planted outside the bank's apps folder); the executor refuses."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.install import install_from_fab
    from flwr.common.config import get_project_dir

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    fab, digest = build_fab_from_disk(APP_DIR), app_digest(APP_DIR)
    installed: list[Path] = []
    only_approved(install_from_fab, frozenset({digest}), "bank 3", installed)(fab, None, True)
    publisher, name, *version, _ = installed[-1].name.split(".")
    fab_id, fab_version = f"{publisher}/{name}", ".".join(version)
    checked = loaded_where_installed(get_project_dir, installed, "bank 3")
    assert checked(fab_id, fab_version, digest) == installed[-1]

    planted = tmp_path / f"evil.{digest[:8]}"
    planted.mkdir()
    # the folder Flower names is apps/ + "..<version>.<hash>": climb to / and down again
    escape = "/" + "../" * len(installed[-1].parents) + str(tmp_path / "evil").lstrip("/")
    assert get_project_dir("/", escape, digest).resolve() == planted.resolve()  # Flower alone
    other = (tmp_path / "flwr" / "apps" / f"{publisher}.{name}.{fab_version}.{'0' * 8}")
    other.mkdir()
    for attack in [("/", escape, digest), (fab_id, fab_version, "0" * 64),
                   (fab_id, "9.9.9", digest), ("other/app", fab_version, digest)]:
        with pytest.raises(AppNotApproved, match="bank 3 refuses to load the app"):
            checked(*attack)


def test_flower_runtime_still_installs_the_bundle_where_the_executor_checks_it() -> None:
    """The executor swaps ``install_from_fab`` in Flower's ClientApp runtime: it must
    still be that module's name for it, called after the task input is pulled and
    before the app is loaded and run."""
    from flwr.supernode.runtime import run_clientapp as runtime

    source = inspect.getsource(runtime.run_clientapp)
    order = [source.index(call) for call in (
        "pull_task_input(client)", "install_from_fab(fab.content",
        "get_project_dir(run.fab_id, run.fab_version, fab.hash_str)",
        "load_client_app_fn(", "client_app(message=message")]
    assert order == sorted(order)
    # the folder checked is the folder the app is loaded from: the same three strings
    assert re.search(r"load_client_app_fn\(\s*run.fab_id, run.fab_version, fab.hash_str\s*\)",
                     source)
    assert "from flwr.cli.install import install_from_fab" in inspect.getsource(runtime)
    assert "from flwr.common.config import get_project_dir" in inspect.getsource(runtime)
    # ... and Flower's loader finds that folder the same way (run_clientapp passes no app_path)
    from flwr.clientapp import utils as loader
    assert "app_path=None" in source
    assert "get_project_dir(fab_id, fab_version, fab_hash)" in inspect.getsource(
        loader.get_load_client_app_fn)
    # A refusal raised there becomes an error reply to the server (not a silent hang).
    assert "reply_message = Message(Error(code=e_code, reason=reason)" in source


def test_flower_loads_an_already_imported_clientapp_module_as_it_is() -> None:
    """Tasks run in children forked from the executor, which imported the bank's
    ClientApp once: Flower must reuse that module, not import it anew per task."""
    from flwr.supercore import object_ref

    assert "if module_str not in sys.modules" in inspect.getsource(object_ref.load_app)


def test_flower_runtime_api_serves_process_isolation_with_superexec_auth() -> None:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec import run_superexec

    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    from client.executor import AUTH_METHODS

    assert AUTH_METHODS == run_superexec._SUPEREXEC_AUTH_METHODS
    help_text = subprocess.run([str(BIN / "flower-supernode"), "--help"],
                               capture_output=True, text=True).stdout
    for flag in ("--isolation {subprocess,process}", "--superexec-auth-secret-file"):
        assert flag in help_text


def test_private_files_are_0600_from_their_first_byte(tmp_path: Path) -> None:
    old = os.umask(0)  # even a permissive umask must not leave a readable moment
    try:
        write_private(tmp_path / "secret", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):  # never silently replaced
        write_private(tmp_path / "secret", b"y")


def test_a_bank_makes_its_own_key_pair_and_the_operator_holds_none(tmp_path: Path) -> None:
    bank_dir = tmp_path / "bank_03"
    result = subprocess.run([str(BIN / "fedfraud-bank"), "init", "--bank-id", "3",
                             "--bank-dir", str(bank_dir), "--app-dir", str(APP_DIR)],
                            capture_output=True, text=True, check=True)

    private, public = bank_dir / "keys" / PRIVATE_KEY, bank_dir / "keys" / PUBLIC_KEY
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert str(public) in result.stdout and Policy.load(bank_dir / "policy.toml")
    assert ensure_key_pair(bank_dir / "keys", 3) == public  # made once, kept
    # The operator's folder: its CA and the SuperLink's certificate, no bank's key.
    operator = make_certificates(tmp_path / "operator")
    files = sorted(str(p.relative_to(operator)) for p in operator.rglob("*") if p.is_file())
    assert files == ["ca.crt", "ca.key", "server/ca.crt", "server/server.key",
                     "server/server.pem"]
    for key in ("ca.key", "server/server.key"):
        assert stat.S_IMODE((operator / key).stat().st_mode) == 0o600


def test_bank_commands_fail_in_one_line_naming_the_policy_file(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text("max-rounds = 'many'\n")
    result = subprocess.run(
        [str(BIN / "fedfraud-bank"), "run", "--bank-id", "1", "--bank-dir", str(tmp_path),
         "--superlink", "127.0.0.1:1", "--insecure"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fedfraud-bank: {tmp_path / 'policy.toml'}: max-rounds has the wrong type ('many')"]


def test_flower_supernode_still_idles_through_its_module_s_time_sleep(
        tmp_path: Path) -> None:
    """client/supernode.py replaces the sleeps of this one module: they must still be
    there (a 3 s idle pull, 0.5 s reply waits) and go through its ``time``; idle pulls
    back off from busy_s to idle_s; a message's first reply wait rings the executor's
    doorbell, a wait ends when the executor rings back, and the next pull is prompt."""
    import threading
    import time

    from flwr.supernode import start_client_internal as internal

    from client.supernode import REPLY_BELL, TASK_BELL, Doorbell, prompt_time
    from common.processes import Backoff

    source = inspect.getsource(internal)
    assert internal.time is time and "import time" in source
    assert source.count("time.sleep(3)") == 1 and source.count("time.sleep(0.5)") == 2
    # A reply wait is the loop's wait right after it stored a task:
    push = inspect.getsource(internal._push_messages)
    assert "while not (reply_messages := state.get_messages(is_reply=True)):" in push
    assert "time.sleep(0.5)" in push.split("for message in reply_messages")[0]
    idle_wait = Backoff(busy_s=0.01, idle_s=0.04)
    tasks, replies = Doorbell(tmp_path / TASK_BELL), Doorbell(tmp_path / REPLY_BELL)
    clock = prompt_time(idle_wait, tasks, replies)
    started = time.monotonic()
    for _ in range(4):
        clock.sleep(3)
    assert 0.01 + 0.02 + 0.04 + 0.04 <= time.monotonic() - started < 0.5
    assert idle_wait.wait_s == 0.04
    # The executor's end of the same pipes, opened as it opens them.
    executor_tasks = Doorbell(tmp_path / TASK_BELL)
    executor_replies = Doorbell(tmp_path / REPLY_BELL)
    assert not executor_tasks.wait(0)
    started = time.monotonic()
    clock.sleep(0.5)  # nobody rings back: Flower's own wait
    assert 0.45 <= time.monotonic() - started < 0.7 and idle_wait.wait_s == 0.01
    assert executor_tasks.wait(0) and not executor_tasks.wait(0)  # rung once, cleared
    threading.Timer(0.1, executor_replies.ring).start()
    started = time.monotonic()
    clock.sleep(0.5)  # the executor rings back after 0.1 s
    assert 0.08 <= time.monotonic() - started < 0.3
    assert not executor_tasks.wait(0)  # told once a message, not on every reply wait
    threading.Timer(0.05, executor_replies.ring).start()
    clock.sleep(0.5)  # the next message's reply wait, after a task ended: told anew
    assert executor_tasks.wait(0)
    clock.sleep(0.5)  # the next message's, its task not over in 0.5 s
    assert executor_tasks.wait(0)
    clock.sleep(3)  # it was answered, then a pull came back empty: told anew
    threading.Timer(0.05, executor_replies.ring).start()
    clock.sleep(0.5)
    assert executor_tasks.wait(0)
    assert clock.monotonic is time.monotonic and clock.time is time.time


PROMPT_PULLS = (  # (module, the function of it that pulls, the name it pulls through)
    ("flwr.superlink.grid.http_grid", "HttpGrid.pull_messages", "pull_objects"),
    ("flwr.supernode.start_client_internal", "_pull_and_store_message", "pull_objects"),
    ("flwr.supernode.runtime.run_clientapp", "pull_task_input",
     "pull_and_inflate_object_from_tree"))


@pytest.mark.parametrize(("module_name", "function", "name"), PROMPT_PULLS)
def test_flower_still_pulls_objects_through_the_name_made_prompt(
        module_name: str, function: str, name: str) -> None:
    """``retry_object_pulls_promptly`` rebinds, in each process that pulls, the
    inflatable_utils function the ServerApp's grid, the SuperNode's loop and a task's
    runtime call by that module-global name, without an ``initial_backoff`` of their
    own (which would override the rebound one)."""
    import importlib

    from flwr.supercore.inflatable import inflatable_utils

    module = importlib.import_module(module_name)
    code = module
    for part in function.split("."):
        code = getattr(code, part)
    assert name in code.__code__.co_names
    assert "initial_backoff" not in inspect.getsource(code)
    pull = getattr(module, name)
    assert getattr(pull, "func", pull) is getattr(inflatable_utils, name)
    assert "initial_backoff" in inspect.signature(getattr(inflatable_utils, name)).parameters


def test_an_object_not_uploaded_yet_is_pulled_again_within_a_tenth_of_a_second() -> None:
    """Flower's first retry waits ~1 s (PULL_INITIAL_BACKOFF, +-20 %); the rebound
    pull's ~0.05 s. Both get the object on the second try."""
    import time
    from types import ModuleType

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    from common.processes import OBJECT_RETRY_S, retry_object_pulls_promptly

    def seconds_to_pull(pull) -> float:
        tries = []

        def pull_object(object_id: str) -> bytes:
            tries.append(object_id)
            if len(tries) == 1:
                raise ObjectUnavailableError(object_id)
            return b"uploaded"

        started = time.monotonic()
        assert pull(["a"], pull_object) == {"a": b"uploaded"} and tries == ["a", "a"]
        return time.monotonic() - started

    prompt = ModuleType("pulls")
    prompt.pull_objects = inflatable_utils.pull_objects
    retry_object_pulls_promptly(prompt)
    retry_object_pulls_promptly(prompt)  # once is what twice does
    assert prompt.pull_objects.keywords == {"initial_backoff": OBJECT_RETRY_S}
    assert prompt.pull_objects.func is inflatable_utils.pull_objects
    assert seconds_to_pull(prompt.pull_objects) < 0.3
    assert seconds_to_pull(inflatable_utils.pull_objects) >= 0.7
    # A partial Flower might bind itself is not taken for ours: it is made prompt too.
    from functools import partial

    flowers = ModuleType("flowers")
    flowers.pull_objects = partial(inflatable_utils.pull_objects, max_time=5)
    retry_object_pulls_promptly(flowers)
    assert flowers.pull_objects.keywords == {"max_time": 5,
                                             "initial_backoff": OBJECT_RETRY_S}


def test_a_bank_s_supernode_and_tasks_make_their_object_pulls_prompt(tmp_path: Path) -> None:
    """The wiring of ``retry_object_pulls_promptly``: ``client.supernode.main`` and
    ``client.executor.run_task`` rebind Flower's names before Flower's code runs
    (Flower's entry points stubbed, in a fresh interpreter)."""
    code = f"""
import importlib, sys
from flwr.supernode import start_client_internal
cli = importlib.import_module("flwr.supernode.cli.flower_supernode")  # the module
from flwr.supernode.runtime import run_clientapp as runtime
import client.supernode, client.executor
from common.processes import OBJECT_RETRY_S

def prompt(module, name):
    return getattr(getattr(module, name), "keywords", {{}}).get("initial_backoff")

cli.flower_supernode = lambda: print("supernode", prompt(start_client_internal,
                                                         "pull_objects"))
sys.argv = ["client.supernode", "--bells", {str(tmp_path)!r}]
client.supernode.main()
runtime.run_clientapp = lambda **_: print("task", prompt(
    runtime, "pull_and_inflate_object_from_tree"))
client.executor.run_task("127.0.0.1:1", "token", frozenset(), "bank 0")
print("expected", OBJECT_RETRY_S)
"""
    lines = dict(line.split() for line in fresh_python(code).splitlines())
    assert lines["supernode"] == lines["task"] == lines["expected"]


def test_a_child_forked_by_an_executor_that_is_killed_outright_dies_with_it() -> None:
    """A preparer or task child calls ``die_with_parent``: when its executor is killed
    with SIGKILL (no handler runs), the child is killed too instead of running on as
    nobody's descendant."""
    import signal
    import subprocess
    import sys
    import time

    from common.processes import proc_stat

    code = ("import os, sys, time; from common.processes import die_with_parent; "
            "parent = os.getpid(); pid = os.fork()\n"
            "if pid == 0:\n    die_with_parent(parent); time.sleep(60); os._exit(0)\n"
            "print(pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=APP_DIR, text=True,
                              stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(0.2)  # the child has asked to die with its parent
        stat = proc_stat(child)
        assert stat is not None and stat[0] != "Z"
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 5
        while (stat := proc_stat(child)) is not None and stat[0] != "Z":
            assert time.monotonic() < deadline, "the child outlived its killed parent"
            time.sleep(0.05)
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_bank_whose_runtime_port_was_taken_moves_both_its_processes(
        tmp_path: Path, prepared, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """free_port() answers a port nobody listens on *now*; another process may bind it
    before the bank's SuperNode does. The bank then starts its SuperNode and its
    executor on a new port, rather than leave its executor talking to a stranger."""
    import socket
    import threading
    import time

    from client import node
    from client.node import BankFiles
    from common.processes import free_port, processes_with_env

    bank_dir = tmp_path / "bank"
    bank_dir.mkdir()
    for name in ("transactions.csv", "schema.json"):
        (bank_dir / name).write_bytes((Path(prepared.data_dir) / "bank_00" / name)
                                      .read_bytes())
    (bank_dir / "policy.toml").write_text(DEFAULT_POLICY)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken, fresh = squatter.getsockname()[1], free_port()
    ports = iter([taken, fresh])
    monkeypatch.setattr(node, "free_port", lambda: next(ports))
    monkeypatch.setattr(node, "RESTART_S", 0.1)
    flwr_home = tmp_path / "flwr"
    bank = BankFiles(0, bank_dir, bank_dir, APP_DIR)
    runner = threading.Thread(target=node.run, args=(
        bank, f"127.0.0.1:{free_port()}", None, flwr_home), daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                f"127.0.0.1:{fresh}" in Path(f"/proc/{pid}/cmdline").read_text(errors="ignore")
                for pid in processes_with_env(f"FLWR_HOME={flwr_home}")
                if "executor" in Path(f"/proc/{pid}/cmdline").read_text(errors="ignore")):
            time.sleep(0.5)
        commands = [Path(f"/proc/{pid}/cmdline").read_text(errors="ignore")
                    for pid in processes_with_env(f"FLWR_HOME={flwr_home}")]
        executors = [c for c in commands if "executor" in c]
        assert executors and all(f"127.0.0.1:{fresh}" in c for c in executors)
        assert any("client.supernode" in c and str(fresh) in c for c in commands)
    finally:
        squatter.close()
        for pid in processes_with_env(f"FLWR_HOME={flwr_home}"):
            if "executor" in Path(f"/proc/{pid}/cmdline").read_text(errors="ignore"):
                os.kill(pid, 9)  # the bank's loop then ends and stops the rest
        runner.join(60)
        assert not runner.is_alive()
        assert not processes_with_env(f"FLWR_HOME={flwr_home}")


def test_a_bank_s_long_lived_supervisor_imports_no_data_libraries() -> None:
    """``fedfraud-bank run`` stays up for the bank's life beside its SuperNode and
    executor: it imports neither numpy, pandas nor torch (~15-220 MB each, ten banks
    on one machine)."""
    code = ("import sys; import client.cli, client.node, client.identity; "
            "print(sorted({'numpy', 'pandas', 'torch', 'cryptography'} & set(sys.modules)))")
    out = fresh_python(code)
    assert out.strip() == "[]"


def test_a_bank_s_executor_gets_its_file_prepared_without_pandas_or_scikit_learn(
        prepared) -> None:
    """The executor also stays up for the bank's life: a short-lived child reads,
    splits and scales the bank's file for it, so neither the executor nor the tasks it
    forks import pandas, scikit-learn or scipy (~130 MB a bank), and a task's bank
    starts from the prepared rows."""
    from common.data import bank_file

    shard = Path(prepared.data_dir) / bank_file(2)
    code = (
        "import sys; from pathlib import Path; "
        "from client.executor import Preparing, warm_up; "
        "from common.data import prepared_version, prepared_with; "
        "from tests.conftest import app_config; "
        f"config, shard = app_config(data_dir={prepared.data_dir!r}), Path({str(shard)!r}); "
        "preparing = Preparing(2, shard, config); warm_up(False); preparing.keep(); "
        "from client.bank import Bank; "
        "print(prepared_with(2) == prepared_version(shard, config)); "
        "print(len(Bank(2, shard, config).y_val) > 0); "
        "print(sorted({'pandas', 'sklearn', 'scipy', 'torch._dynamo'} & set(sys.modules)))")
    out = fresh_python(code)
    assert out.split() == ["True", "True", "[]"]


def test_a_bank_s_executor_imports_torch_only_after_its_preparer_has_exited(
        prepared, tmp_path) -> None:
    """A bank never holds pandas (its preparer child) and torch (its executor) at once:
    ten banks starting together on one machine peaked at 4.5 GB with the two
    overlapping, 3.7 GB without (`make bench-deploy`)."""
    from common.data import bank_file

    shard = Path(prepared.data_dir) / bank_file(2)
    code = (
        "import sys; from pathlib import Path; "
        "from client import executor; "
        "from tests.conftest import app_config; "
        "keep = executor.Preparing.keep\n"
        "def kept(self):\n"
        "    keep(self); print('torch' in sys.modules); raise SystemExit(0)\n"
        "executor.Preparing.keep = kept\n"
        f"executor.serve('127.0.0.1:1', b'', frozenset(), 'bank 2', Path({str(shard)!r}), 2, "
        f"False, Path({str(tmp_path)!r}), app_config(data_dir={prepared.data_dir!r}))")
    assert fresh_python(code).split() == ["False"]


def test_a_task_tells_its_executor_what_to_make_ready_for_the_next_ones(prepared) -> None:
    """A task whose run splits the bank's file otherwise (another seed here) prepares
    it itself, and tells the executor those settings: it then prepares the file so for
    the tasks that follow. Nothing to tell: nothing told."""
    from dataclasses import replace

    from client.executor import tell, told
    from common.data import bank_file, prepared_bank, prepared_version, prepared_with

    shard = Path(prepared.data_dir) / bank_file(2)
    prepared_bank(2, shard, prepared)
    held = prepared_with(2)
    notes, note = os.pipe()
    os.set_blocking(notes, False)
    tell(note, True, 2, held)
    assert told(notes) == []

    prepared_bank(2, shard, replace(prepared, seed=prepared.seed + 1))
    tell(note, True, 2, held)
    [settings] = [told_now["split"] for told_now in told(notes)]
    assert prepared_version(shard, replace(prepared, **settings)) == prepared_with(2) != held


@pytest.mark.parametrize("bad", ["inf", "abc", "odd column"])
def test_a_bad_file_is_reported_by_the_task_not_lost_in_the_preparer(prepared, tmp_path,
                                                                      bad, monkeypatch) -> None:
    """The executor's preparer child fails quietly on a file with inf, text in a number
    column or a column the schema lacks; nothing is kept, and the task that reads the
    file then reports the one-line error naming the bank, the file and the column."""
    import shutil

    from client.executor import Preparing
    from common.data import BankDataError, bank_file, prepared_bank, prepared_with
    from common.schema import SCHEMA_FILE

    source = Path(prepared.data_dir) / bank_file(0)
    header, *rows = source.read_text().splitlines()[:41]
    cells = [row.split(",") for row in rows]
    if bad == "odd column":
        header, cells = header + ",odd", [row + ["1"] for row in cells]
    else:
        cells[3][header.split(",").index("f05")] = bad
    shard = tmp_path / "bank_09" / "transactions.csv"
    shard.parent.mkdir()
    shutil.copy(source.parent / SCHEMA_FILE, shard.parent / SCHEMA_FILE)
    shard.write_text("\n".join([header, *(",".join(row) for row in cells)]) + "\n")

    # Nothing kept from an earlier test of this process (tests/test_data.py prepares
    # a bank 9 of its own).
    monkeypatch.setattr("common.data._PREPARED", {})
    Preparing(9, shard, prepared).keep()

    assert prepared_with(9) is None
    with pytest.raises(BankDataError) as refused:
        prepared_bank(9, shard, prepared)
    message = str(refused.value)
    assert "\n" not in message and "bank 9" in message and str(shard) in message
    assert ("odd" if bad == "odd column" else "f05") in message


def test_the_bank_s_step_bound_lets_the_default_run_through_and_decides_alone() -> None:
    """The default run at the largest default bank (~20,000 training rows: ~480 steps)
    is far inside the default bound; batch-size 1 is not; the bank may raise its bound."""
    default = app_config()
    greedy = Config.from_run_config({**default.as_run_config(), "batch-size": 1})
    policy = Policy.from_toml("", "policy.toml")
    assert default.most_steps(20_231) == 477  # 3 epochs of 159 batches of 128
    assert policy.steps_refusal(default, 20_231) is None
    assert "60693 training steps" in policy.steps_refusal(greedy, 20_231)
    assert Policy.from_toml("max-steps-per-round = 100000", "p").steps_refusal(
        greedy, 20_231) is None
    for key, value, why in (("batch-size", 0, "must be at least 1"),  # no batch at all
                            ("dp-batch-size", 0, "must be at least 1"),
                            ("seed", 2**63, r"must be 0 to 2\*\*31 - 1"),  # overflows torch
                            ("proximal-mu", float("nan"), "must be a number from 0")):
        with pytest.raises(ValueError, match=f"^run config: {key} {why}$"):
            Config.from_run_config({**default.as_run_config(), key: value})
