"""homesafe killed mid-operation (SIGKILL, SIGTERM, SIGINT), and everything put back.

Two ways of finding "each step":

* **every journal step**: a child runs the real ``homesafe`` command with the journal's
  ``record`` and ``close`` wrapped so that the process SIGKILLs itself right after the
  N-th record reaches the disk (the change is announced, not made) or right before the
  N-th closing is written (the change is undone, the journal does not know it yet). N
  goes over every step of a backup and of a restore; each time ``homesafe recover``
  (and once a next ``homesafe backup``) must put everything back. Nothing else of
  homesafe is touched: the kill is the only thing injected.
* **blocked steps**: hooks that block (a ``sleep``) with a real daemon as the service;
  the test waits until the step is reached, then ``kill -9``s homesafe from outside.

After each: every service in its original state, no lockdown flag, no journal, no
staging or scratch directory, and a restore either rolled back to the previous files
byte for byte or (killed after it committed) fully restored.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from homesafe import api, journal, restore, state
from tests.conftest import Daemon, DaemonFactory, ManifestWriter, requires_program
from tests.support.apps import (
    alive,
    command_service,
    describe,
    lockdown_flags,
    make_tree,
    sh,
    to_toml,
)

pytestmark = requires_program("borg")

HOMESAFE = shutil.which("homesafe", path=str(Path(sys.executable).parent)) or "homesafe"

# Runs the real CLI with a kill point on the journal (see the module docstring).
CHILD = """
import os, signal, sys
from homesafe import journal

mode, kill_at, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = {"record": 0, "close": 0}

def note(line):
    with open(steps, "a") as file:
        file.write(line + "\\n")

def step(kind):
    seen[kind] += 1
    if kind == mode and seen[kind] == kill_at:
        note("killed")
        os.kill(os.getpid(), signal.SIGKILL)

record, close = journal.Journal.record, journal.Journal.close

def recording(self, kind, data):
    number = record(self, kind, data)
    note(f"record {kind}")
    step("record")
    return number

def closing(self, numbers, how, reason):
    if any(number in self._pending for number in numbers):
        step("close")  # a kill here: the change is undone, its closing never written
        kinds = ",".join(sorted({self._pending[n].kind for n in numbers if n in self._pending}))
        note(f"close {how} {kinds} {reason}".rstrip())
    return close(self, numbers, how, reason)

journal.Journal.record, journal.Journal.close = recording, closing
from homesafe.cli import main
main(sys.argv[4:], prog_name="homesafe")
"""


def homesafe(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HOMESAFE, *arguments],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        check=False,
        timeout=timeout,
    )


def tree(root: Path) -> dict[str, bytes | str]:
    """Every path below ``root`` with its bytes (files) or its kind, and modes."""
    found: dict[str, bytes | str] = {}
    if not os.path.lexists(root):
        return found
    for directory, subdirectories, files in os.walk(root):
        for name in sorted([*subdirectories, *files]):
            path = Path(directory, name)
            key = str(path.relative_to(root))
            mode = oct(path.lstat().st_mode & 0o7777)
            found[key] = f"dir {mode}" if path.is_dir() else path.read_bytes() + mode.encode()
    return found


@dataclass
class CrashApp:
    """An app with a real daemon, two data paths, a config file, a setting and
    lockdown commands; and what the machine must look like after any crash."""

    root: Path
    daemon: Daemon
    home: Path
    srv: Path

    @property
    def data(self) -> Path:
        return self.srv / "crashy"

    @property
    def deep(self) -> Path:
        return self.srv / "extra" / "deep"

    @property
    def config(self) -> Path:
        return self.srv / "etc" / "crashy.conf"

    def live(self) -> dict[str, dict[str, bytes | str]]:
        return {"srv": tree(self.srv)}

    def journals(self) -> list[str]:
        directory = self.home / "journal"
        return sorted(os.listdir(directory)) if directory.is_dir() else []

    def leftovers(self) -> list[str]:
        """Staging and scratch directories anywhere homesafe may put them."""
        found = []
        scratch = self.home / "tmp"
        if scratch.is_dir():
            found += [str(path) for path in scratch.iterdir()]
        for directory, subdirectories, _ in os.walk(self.root):
            found += [
                os.path.join(directory, name)
                for name in subdirectories
                if name.startswith(".homesafe-staging-")
            ]
        return found

    def assert_put_back(self) -> None:
        assert self.daemon.is_running(), "the service is not running again"
        assert lockdown_flags(self.root) == []
        assert self.journals() == []
        assert self.leftovers() == []


@pytest.fixture
def crash_app(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> CrashApp:
    daemon = daemon_factory("crashy")
    daemon.start()
    srv = homesafe_env / "srv"
    app = CrashApp(homesafe_env, daemon, homesafe_env / "home", srv)
    write_version(app, "v1")
    write_manifest(
        "crashy",
        to_toml(
            {
                "id": "crashy",
                "settings": ["crashy.theme"],
                "config": {"files": [str(app.config)]},
                "data": {"directories": [str(app.data), str(app.deep)]},
                "services": [command_service(daemon, "crashy")],
                "lockdown": {"leave": ["touch", str(homesafe_env / "lockdown-left")]},
            }
        ),
    )
    return app


def write_version(app: CrashApp, version: str) -> None:
    """The app's files and setting at ``version``; v2 has no extra/ tree at all (so a
    restore must create its parents) and a file v1 does not have."""
    if app.srv.exists():
        shutil.rmtree(app.srv)
    make_tree(
        app.data,
        {
            "notes.db": bytes(range(256)) * 40 + version.encode(),
            "sub/page.md": f"# {version}\n",
        },
    )
    (app.data / "sub").chmod(0o750)
    app.config.parent.mkdir(parents=True)
    app.config.write_text(f"version = {version!r}\n")
    if version == "v1":
        make_tree(app.deep, {"blob": b"\0\1\2" * 1000})
    else:
        (app.data / "only-in-v2").write_text("new\n")
    state.write_settings({"crashy.theme": f"theme-{version}"})


def run_killed(
    tmp_path: Path, mode: str, kill_at: int, *arguments: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ``homesafe ARGUMENTS`` killing itself at step ``kill_at`` of ``mode``."""
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    steps = tmp_path / f"steps-{mode}-{kill_at}"
    completed = subprocess.run(
        [sys.executable, str(child), mode, str(kill_at), str(steps), *arguments],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        check=False,
        timeout=120,
    )
    return completed, steps.read_text().splitlines() if steps.exists() else []


def recover_json() -> dict:  # type: ignore[type-arg]
    completed = homesafe("recover", "--json")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    value = json.loads(completed.stdout)
    assert isinstance(value, dict)
    return value


def count_steps(tmp_path: Path, *arguments: str) -> tuple[int, int, list[str]]:
    """Run once without a kill: how many records and closings the operation makes."""
    completed, steps = run_killed(tmp_path, "none", 0, *arguments)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert not (tmp_path / "home" / "journal").is_dir() or not os.listdir(
        tmp_path / "home" / "journal"
    ), "a finished operation left its journal"
    records = sum(line.startswith("record ") for line in steps)
    closes = sum(line.startswith("close ") for line in steps)
    return records, closes, steps


def test_backup_killed_at_every_step_is_put_back_by_recover(
    crash_app: CrashApp, tmp_path: Path
) -> None:
    records, closes, steps = count_steps(tmp_path, "backup")
    kinds = [line.split()[1] for line in steps if line.startswith("record ")]
    assert {"lockdown", "service_stopped", "temporary_directory"} <= set(kinds), steps
    before = crash_app.live()
    for mode, total in (("record", records), ("close", closes)):
        for kill_at in range(1, total + 1):
            completed, steps = run_killed(tmp_path, mode, kill_at, "backup")
            where = f"killed at {mode} {kill_at}: {steps}"
            assert completed.returncode == -signal.SIGKILL, where + completed.stderr
            assert crash_app.journals(), where  # something was left to recover

            report = recover_json()

            assert report["failed"] == 0, (where, report)
            assert report["actions"], where
            crash_app.assert_put_back()
            assert crash_app.live() == before, where


def test_restore_killed_at_every_step_is_rolled_back_or_complete(
    crash_app: CrashApp, tmp_path: Path
) -> None:
    # `import` of the exported archive: the same staged restore as `restore` (tested
    # below, killed in its hooks) without borg's start-up at each of the ~16 runs.
    backup = api.backup_apps()
    assert backup.status == "ok", describe(backup)
    exported = str(tmp_path / "backup.tar")
    api.export_archive(backup.archive, exported)
    v1 = crash_app.live()
    write_version(crash_app, "v2")
    v2 = crash_app.live()
    records, closes, steps = count_steps(tmp_path, "import", exported)
    assert crash_app.live() == v1  # the undisturbed restore restores
    kinds = {line.split()[1] for line in steps if line.startswith("record ")}
    expected = {"moved_aside", "placed", "directory_created", "settings_written"}
    assert expected <= kinds, steps
    restarted_before_rollback = 0
    for mode, total in (("record", records), ("close", closes)):
        for kill_at in range(1, total + 1):
            write_version(crash_app, "v2")
            completed, steps = run_killed(tmp_path, mode, kill_at, "import", exported)
            where = f"killed at {mode} {kill_at}: {steps}"
            assert completed.returncode == -signal.SIGKILL, where + completed.stderr

            # What `homesafe recover` runs (the command is driven in the backup test).
            report = journal.recover()

            assert report.failed == [], (where, report.lines())
            crash_app.assert_put_back()
            committed = any(line.endswith("restore committed") for line in steps)
            expected_tree, theme = (v1, "theme-v1") if committed else (v2, "theme-v2")
            assert crash_app.live() == expected_tree, where
            assert state.read_settings(["crashy.theme"]) == {"crashy.theme": theme}, where
            if not committed and "close undone service_stopped" in steps:
                # It ran again on the restored files: stopped while they are put back.
                done = [action.description for action in report.actions]
                assert "stopped service crashy to put its files back" in done, (where, done)
                restarted_before_rollback += 1
    # Killed after the service ran again: before the lockdown was lifted, and after.
    assert restarted_before_rollback >= 2


# -- blocked steps, killed from outside ---------------------------------------------------


@dataclass
class Blocker:
    """A hook that says it was reached, then blocks; and the process that runs it."""

    reached: Path
    pid_file: Path

    def argv(self) -> list[str]:
        return sh(f"echo $$ > {self.pid_file}; touch {self.reached}; exec sleep 60")

    def wait(self, process: subprocess.Popen[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.reached.exists():
            if process.poll() is not None:
                raise AssertionError(f"homesafe ended first: {process.communicate()}")
            if time.monotonic() > deadline:
                raise AssertionError("the blocking step was never reached")
            time.sleep(0.02)

    def pid(self) -> int:
        return int(self.pid_file.read_text())

    def kill(self) -> None:
        """The blocked hook outlives a SIGKILLed homesafe (its own session): end it."""
        if self.pid_file.exists() and alive(self.pid()):
            os.kill(self.pid(), signal.SIGKILL)
            wait_until(lambda: not alive(self.pid()))


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def blocker(tmp_path: Path) -> Iterator[Blocker]:
    made = Blocker(tmp_path / "reached", tmp_path / "hook.pid")
    yield made
    made.kill()


def start(*arguments: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [HOMESAFE, *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def with_hook(
    write_manifest: ManifestWriter, crash_app: CrashApp, hook: str, argv: list[str]
) -> None:
    write_manifest(
        "crashy",
        to_toml(
            {
                "id": "crashy",
                "settings": ["crashy.theme"],
                "config": {"files": [str(crash_app.config)]},
                "data": {"directories": [str(crash_app.data), str(crash_app.deep)]},
                "services": [command_service(crash_app.daemon, "crashy")],
                "hooks": {hook: argv},
            }
        ),
    )


def test_backup_killed_in_its_hook_while_another_waits_for_the_lock(
    crash_app: CrashApp, write_manifest: ManifestWriter, blocker: Blocker
) -> None:
    with_hook(write_manifest, crash_app, "backup_pre", blocker.argv())
    first = start("backup")
    blocker.wait(first)
    assert not crash_app.daemon.is_running()

    # One operation at a time: the second gives up after its --wait.
    started = time.monotonic()
    second = homesafe("backup", "--wait", "0.5")
    assert second.returncode == 1, second.stderr
    assert 0.5 <= time.monotonic() - started < 30
    assert "waiting for another operation" in second.stderr
    assert f"another homesafe operation (pid {first.pid}" in second.stderr
    # Recovery leaves a live operation alone.
    busy = homesafe("recover", "--wait", "0")
    assert busy.returncode == 1 and "is running" in busy.stderr
    dry = homesafe("recover", "--dry-run", "--json")
    assert json.loads(dry.stdout)["busy"] and not json.loads(dry.stdout)["actions"]
    assert not crash_app.daemon.is_running()

    first.kill()  # SIGKILL
    first.communicate(timeout=30)
    blocker.kill()
    planned = json.loads(homesafe("recover", "--dry-run", "--json").stdout)
    assert {action["status"] for action in planned["actions"]} == {"planned"}
    report = recover_json()

    described = [action["description"] for action in report["actions"]]
    assert "started service crashy again" in described
    assert "lifted the lockdown of crashy" in described
    assert any(line.startswith("removed the leftover directory") for line in described)
    assert {action["pid"] for action in report["actions"]} == {first.pid}
    crash_app.assert_put_back()
    # The lock died with its holder: the next backup runs at once.
    with_hook(write_manifest, crash_app, "backup_post", ["true"])
    assert homesafe("backup", "--wait", "0").returncode == 0
    crash_app.assert_put_back()


def test_next_backup_recovers_first_then_runs(
    crash_app: CrashApp, write_manifest: ManifestWriter, blocker: Blocker
) -> None:
    with_hook(write_manifest, crash_app, "backup_pre", blocker.argv())
    process = start("backup")
    blocker.wait(process)
    process.kill()
    process.communicate(timeout=30)
    blocker.kill()
    assert not crash_app.daemon.is_running()
    assert lockdown_flags(crash_app.root) == ["crashy"]
    with_hook(write_manifest, crash_app, "backup_post", ["true"])

    again = homesafe("backup", "--json")

    assert again.returncode == 0, again.stderr
    assert "put back what an interrupted homesafe left" in again.stderr
    assert "started service crashy again" in again.stderr
    assert "lifted the lockdown of crashy" in again.stderr
    assert json.loads(again.stdout)["status"] == "ok"  # stdout: the JSON alone
    crash_app.assert_put_back()


def test_restore_killed_after_the_swap_is_rolled_back_byte_for_byte(
    crash_app: CrashApp, write_manifest: ManifestWriter, blocker: Blocker
) -> None:
    hook = "restore_post"  # the app's files are swapped in, its settings written
    # A restore runs the hooks of the manifest stored in the archive.
    with_hook(write_manifest, crash_app, hook, blocker.argv())
    backup = api.backup_apps()
    assert backup.status == "ok", describe(backup)
    v1 = crash_app.live()
    write_version(crash_app, "v2")
    v2 = crash_app.live()
    process = start("restore", backup.archive)
    blocker.wait(process)
    assert crash_app.live() == v1  # swapped in, not committed
    assert state.read_settings(["crashy.theme"]) == {"crashy.theme": "theme-v1"}
    process.kill()
    process.communicate(timeout=30)
    blocker.kill()

    report = recover_json()

    assert report["failed"] == 0, report
    assert crash_app.live() == v2
    assert state.read_settings(["crashy.theme"]) == {"crashy.theme": "theme-v2"}
    crash_app.assert_put_back()


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_resumes_everything_before_exiting(
    crash_app: CrashApp, write_manifest: ManifestWriter, blocker: Blocker, signal_number: int
) -> None:
    with_hook(write_manifest, crash_app, "backup_pre", blocker.argv())
    process = start("backup")
    blocker.wait(process)
    assert not crash_app.daemon.is_running()

    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 1, stderr
    assert "interrupted" in stderr
    crash_app.assert_put_back()
    assert not alive(blocker.pid())  # the hook was killed with it, not left behind


def test_restore_interrupted_after_the_swap_rolls_back_before_exiting(
    crash_app: CrashApp, write_manifest: ManifestWriter, blocker: Blocker
) -> None:
    with_hook(write_manifest, crash_app, "restore_post", blocker.argv())
    backup = api.backup_apps()
    assert backup.status == "ok", describe(backup)
    write_version(crash_app, "v2")
    v2 = crash_app.live()
    process = start("restore", backup.archive)
    blocker.wait(process)

    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 1, stderr
    assert crash_app.live() == v2
    assert state.read_settings(["crashy.theme"]) == {"crashy.theme": "theme-v2"}
    crash_app.assert_put_back()
    assert recover_json()["actions"] == []


def test_detached_removal_killed_half_way_is_finished_by_recover(
    homesafe_env: Path, write_manifest: ManifestWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process removing the replaced copies (``remove_in_background``) journals
    them before the restore returns; SIGKILLed half-way, it leaves a journal that
    recovery finishes: the staging area gone, the restored app untouched."""
    base = homesafe_env / "srv" / "bulky"
    make_tree(base, {f"d{number % 5}/f{number}": b"x" for number in range(200)})
    write_manifest("bulky", to_toml({"id": "bulky", "data": {"directories": [str(base)]}}))
    backup = api.backup_apps()
    assert backup.status == "ok", describe(backup)
    restored = tree(base)
    (base / "d0" / "f0").write_bytes(b"changed")
    home = homesafe_env / "home"
    # The kill point (as CHILD's): the remover, a fork of this process, removes one
    # directory of the replaced copy for real, then is SIGKILLed.
    test_process = os.getpid()
    discard = restore.discard

    def discard_part_then_die(path: Path) -> None:
        if os.getpid() == test_process:
            discard(path)
            return
        discard(next(path.rglob("d0")))
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(restore, "discard", discard_part_then_die)

    result = api.restore_apps(backup.archive, remove_in_background=True)

    assert result.status == "ok", describe(result)
    (remover_journal,) = os.listdir(home / "journal")
    remover = int(remover_journal.split("-")[1].split(".")[0])
    assert remover != test_process
    wait_until(lambda: not alive(remover))
    (area,) = (home / "tmp").iterdir()  # half removed: d0 of the replaced copy is gone
    assert not any(area.rglob("d0")) and any(area.rglob("d1"))
    report = journal.recover()
    assert report.failed == [], report.lines()
    assert [action.kind for action in report.actions] == ["temporary_directory"]
    assert os.listdir(home / "journal") == []
    assert list((home / "tmp").iterdir()) == []
    assert tree(base) == restored


def test_recover_with_nothing_to_do(crash_app: CrashApp) -> None:
    completed = homesafe("recover")
    assert completed.returncode == 0
    assert completed.stdout.strip() == "Nothing to recover."
    assert recover_json() == {
        "dry_run": False,
        "actions": [],
        "recovered": [],
        "busy": [],
        "failed": 0,
    }
