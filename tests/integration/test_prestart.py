"""borg started while homesafe starts (homesafe.prestart), with real borg: the first
borg call it can stand for exactly is run by it, with that call's argv, environment,
working directory and passphrase pipe; any other call starts borg as always; and it
never outlives homesafe, whether homesafe exits, dies or never needs it."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homesafe import api, execute, locations, prestart, repositories
from homesafe.consistency import snapshots, view
from tests.conftest import ManifestWriter, requires_program
from tests.integration.test_capture import archived_paths
from tests.integration.test_restore_staged import borg_wrapper, change_everything, write_app
from tests.integration.test_roundtrip import snapshot_tree
from tests.support.apps import describe
from tests.support.btrfs import loop_filesystem, run

pytestmark = requires_program("borg")


@pytest.fixture(autouse=True)
def nothing_left_waiting(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("HOMESAFE_PRESTART", raising=False)
    yield
    prestart.discard()


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie waiting for init counts)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def early_runs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == execute.__name__ and "started early" in record.getMessage()
    ]


def started_early(arguments: list[str], caplog: pytest.LogCaptureFixture) -> int:
    """Start borg early as the program would for ``arguments``, with the debug log of
    homesafe.execute captured; the waiting interpreter's pid."""
    caplog.set_level(logging.DEBUG, logger=execute.__name__)
    prestart.begin(arguments)
    waiting = prestart.waiting_pid()
    assert waiting is not None
    return waiting


def test_the_first_borg_call_is_run_by_the_borg_started_early(
    homesafe_env: Path, write_manifest: ManifestWriter, caplog: pytest.LogCaptureFixture
) -> None:
    """The backup's `borg create` (the repository exists already) is the first call:
    it runs in the waiting interpreter, and the archive it writes (encrypted: the
    passphrase pipe was handed over) restores the app exactly."""
    base = write_app(write_manifest, homesafe_env / "srv", "notes")
    assert api.backup_apps().status == "ok"  # creates the repository
    expected = snapshot_tree(base)
    waiting = started_early(["-v", "backup", "notes"], caplog)
    backup = api.backup_apps(["notes"])

    assert backup.status == "ok", describe(backup)
    assert early_runs(caplog) == [f"run by the borg started early (pid {waiting})"]
    assert prestart.waiting_pid() is None
    assert gone(waiting)
    change_everything(base)
    restored = api.restore_apps(backup.archive)
    assert restored.status == "ok", describe(restored)
    assert snapshot_tree(base) == expected


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices and mounts")
@requires_program("mkfs.btrfs")
def test_a_backup_through_a_captures_view_is_run_by_it_in_a_namespace_of_its_own(
    homesafe_env: Path,
    write_manifest: ManifestWriter,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A snapshot's backup runs borg through the view (`unshare ... view --bind`): the
    borg started early enters a mount namespace of its own and binds the snapshots over
    the original paths (a nested subvolume's after its parent's) before borg runs, as
    the view would have. The archive holds the original paths and restores exactly;
    the host's mounts are as they were."""
    with loop_filesystem(tmp_path / "btrfs", "btrfs") as filesystem:
        data = filesystem.mount_point / "notes"
        run("btrfs", "subvolume", "create", data)
        run("btrfs", "subvolume", "create", data / "attachments")
        (data / "attachments/picture").write_bytes(os.urandom(10_000))
        (data / "note.txt").write_text("a note\n")
        write_manifest("notes", f'id = "notes"\n[data]\ndirectories = ["{data}"]\n')
        assert api.backup_apps().status == "ok"
        expected = snapshot_tree(data)
        mounts_before = {mount.mount_point for mount in snapshots.read_mounts()}
        waiting = started_early(["backup"], caplog)
        backup = api.backup_apps(strategy="snapshot")

        assert backup.status == "ok", describe(backup)
        assert backup.app("notes").strategy == "snapshot"
        assert early_runs(caplog) == [f"run by the borg started early (pid {waiting})"]
        messages = [record.getMessage() for record in caplog.records]
        handed_over = messages.index(early_runs(caplog)[0])
        assert messages[handed_over - 1].startswith("running unshare --mount"), messages
        assert {mount.mount_point for mount in snapshots.read_mounts()} == mounts_before
        listed = archived_paths(backup.archive)
        relative = str(data).lstrip("/")
        assert {f"{relative}/note.txt", f"{relative}/attachments/picture"} <= listed
        assert not any(".homesafe-snapshots" in path for path in listed)
        (data / "note.txt").write_text("changed\n")
        restored = api.restore_apps(backup.archive)
        assert restored.status == "ok", describe(restored)
        assert snapshot_tree(data) == expected


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mount namespaces")
def test_a_view_that_cannot_be_shown_fails_as_the_view_itself_does(homesafe_env: Path) -> None:
    """A copy that is gone: the exit status and message of the view, and no mount."""
    original = homesafe_env / "original"
    original.mkdir()
    argv = [*view.wrapper_argv([(str(homesafe_env / "gone"), str(original))]), "borg", "-V"]
    environment = {**os.environ, **prestart.borg_environment(str(locations.home()))}
    mounts_before = snapshots.read_mounts()
    prestart.begin(["backup"])

    adopted = prestart.adopt(argv, environment, None, [], plain_stdio=True)
    assert adopted is not None
    _, errors = adopted.communicate(timeout=60)
    direct = subprocess.run(argv, env=environment, capture_output=True, check=False)

    assert adopted.returncode == direct.returncode == view.EXIT_VIEW_FAILED
    assert errors == direct.stderr
    assert b"cannot show" in errors
    assert snapshots.read_mounts() == mounts_before


def test_a_borg_script_run_by_an_isolated_interpreter_is_started_early_too(
    homesafe_env: Path,
    write_manifest: ManifestWriter,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The script's first line may give its interpreter an option (here -I), which the
    launcher runs under too, and PATH may reach the script through a link."""
    real = Path(shutil.which("borg") or "borg")
    first_line, _, body = real.read_text().partition("\n")
    if not first_line.startswith("#!/") or "python" not in first_line:
        pytest.skip(f"{real} is not a Python script")
    scripts = homesafe_env / "scripts"
    scripts.mkdir()
    (scripts / "borg").write_text(f"{first_line.split()[0]} -I\n{body}")
    (scripts / "borg").chmod(0o755)
    (homesafe_env / "bin").mkdir()
    (homesafe_env / "bin/borg").symlink_to(scripts / "borg")
    monkeypatch.setenv("PATH", f"{homesafe_env / 'bin'}{os.pathsep}{os.environ['PATH']}")
    write_app(write_manifest, homesafe_env / "srv", "notes")
    assert api.backup_apps().status == "ok"
    waiting = started_early(["backup"], caplog)
    assert api.backup_apps().status == "ok"

    assert early_runs(caplog) == [f"run by the borg started early (pid {waiting})"]


def test_a_restore_hands_its_extraction_to_it_not_the_listing_beside(
    homesafe_env: Path, write_manifest: ManifestWriter, caplog: pytest.LogCaptureFixture
) -> None:
    """Planned from the backup's record, a restore lists the archive in a thread while
    it extracts: the extraction, the longer of the two, is the call handed over."""
    base = write_app(write_manifest, homesafe_env / "srv", "notes")
    expected = snapshot_tree(base)
    backup = api.backup_apps()
    change_everything(base)
    waiting = started_early(["restore", backup.archive], caplog)
    restored = api.restore_apps(backup.archive)

    assert restored.status == "ok", describe(restored)
    assert snapshot_tree(base) == expected
    runs = [record for record in caplog.records if record.name == execute.__name__]
    listing = [record for record in runs if record.getMessage().startswith("running borg list")]
    assert listing and all(record.threadName.startswith("archive-listing") for record in listing)
    handed = [record for record in runs if "started early" in record.getMessage()]
    assert [record.getMessage() for record in handed] == [
        f"run by the borg started early (pid {waiting})"
    ]
    # What the thread that handed a call over was running: the extraction.
    same_thread = [record for record in runs if record.thread == handed[0].thread]
    handed_call = same_thread[same_thread.index(handed[0]) - 1].getMessage()
    assert handed_call.startswith("running borg extract"), handed_call


def test_a_call_it_cannot_stand_for_starts_borg_as_always(
    homesafe_env: Path,
    write_manifest: ManifestWriter,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An environment that differs in a name read before borg runs (here the
    interpreter's PYTHONWARNINGS) is not the one the interpreter started with: borg is
    started anew, and the waiting one is left for a later call, then ended."""
    write_app(write_manifest, homesafe_env / "srv", "notes")
    assert api.backup_apps().status == "ok"
    waiting = started_early(["backup"], caplog)
    monkeypatch.setenv("PYTHONWARNINGS", "default")

    assert api.backup_apps().status == "ok"

    assert early_runs(caplog) == []
    assert prestart.waiting_pid() == waiting
    prestart.discard()
    assert prestart.waiting_pid() is None
    assert gone(waiting)


def test_a_pipe_still_open_for_writing_is_not_handed_over(homesafe_env: Path) -> None:
    """Its contents could not be read to their end: the call starts borg itself."""
    prestart.begin(["restore", "archive"])
    assert prestart.waiting_pid() is not None
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"not all of it")
        environment = {**os.environ, **prestart.borg_environment(str(locations.home()))}
        adopted = prestart.adopt(
            ["borg", "--version"], environment, None, [read_end], plain_stdio=True
        )
        assert adopted is None
        assert prestart.waiting_pid() is not None
        assert os.read(read_end, 100) == b"not all of it"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_pipe_holding_more_than_a_new_pipe_takes_is_not_handed_over(
    homesafe_env: Path,
) -> None:
    """Its contents could not be written whole into a new pipe before borg reads it."""
    import fcntl

    prestart.begin(["backup"])
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4 * prestart.PIPE_CAPACITY)
    os.write(write_end, b"x" * (prestart.PIPE_CAPACITY + 1))
    os.close(write_end)
    try:
        environment = {**os.environ, **prestart.borg_environment(str(locations.home()))}
        adopted = prestart.adopt(["borg", "-V"], environment, None, [read_end], plain_stdio=True)
        assert adopted is None
        assert prestart.waiting_pid() is not None
        assert len(os.read(read_end, 2 * prestart.PIPE_CAPACITY)) == prestart.PIPE_CAPACITY + 1
    finally:
        os.close(read_end)


def test_a_closed_pipe_handed_over_is_left_to_the_caller_as_it_was(homesafe_env: Path) -> None:
    """Its contents are read to hand them over (that they reach borg, the encrypted
    backup above shows); the caller's fd is then a pipe holding the same, as before."""
    prestart.begin(["backup"])
    read_end, write_end = os.pipe()
    os.write(write_end, b"a passphrase")
    os.close(write_end)
    try:
        environment = {**os.environ, **prestart.borg_environment(str(locations.home()))}
        environment["BORG_PASSPHRASE_FD"] = str(read_end)
        adopted = prestart.adopt(
            ["borg", "--version"], environment, str(homesafe_env), [read_end], plain_stdio=True
        )
        assert adopted is not None
        output, _ = adopted.communicate(timeout=60)
        assert adopted.returncode == 0
        assert output.decode().startswith("borg ")
        assert os.read(read_end, 100) == b"a passphrase"
        assert os.read(read_end, 100) == b""
    finally:
        os.close(read_end)


def test_a_borg_wrapper_is_never_started_early(
    homesafe_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    borg_wrapper(homesafe_env / "bin", 'exec "$REAL_BORG" "$@"', monkeypatch)
    prestart.begin(["backup"])
    assert prestart.waiting_pid() is None


@pytest.mark.parametrize(
    "arguments",
    [["apps", "list"], ["backup", "--dry-run"], ["restore", "--help"], ["-h"], []],
)
def test_other_commands_start_nothing(homesafe_env: Path, arguments: list[str]) -> None:
    prestart.begin(arguments)
    assert prestart.waiting_pid() is None


def test_only_a_command_writing_to_a_borg_repository_starts_borg(homesafe_env: Path) -> None:
    """The embedded default repository is borg's; a registered one is looked up (a
    borg started for a restic repository would only take a core from restic)."""
    for name, engine in (("far", "borg"), ("object", "restic")):
        repositories.register(
            repositories.Repository(name, str(homesafe_env / name), engine=engine)
        )
    expected = {
        ("backup",): True,
        ("backup", "--repo", "default"): True,
        ("backup", "--repo=far"): True,
        ("restore", "archive", "--repo", "object"): False,
        ("backup", "--repo", "object", "--repo", "far"): True,
        ("backup", "--repo", "unknown"): False,
    }
    started = {}
    for arguments in expected:
        prestart.begin(arguments)
        started[arguments] = prestart.waiting_pid() is not None
        prestart.discard()
    assert started == expected


def test_prestart_can_be_turned_off(homesafe_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOMESAFE_PRESTART", "0")
    prestart.begin(["backup"])
    assert prestart.waiting_pid() is None


IMPORTED_BEFORE_THE_START = """
import sys
from homesafe import prestart
prestart.begin(["backup"])
assert prestart.waiting_pid() is not None
print(" ".join(sorted(sys.modules)))
"""
# What the rest of homesafe imports, each several milliseconds of start-up; imported
# before the waiting borg is started, each would delay it as much.
LATER_IMPORTS = ["click", "dataclasses", "inspect", "typing"]


def test_borg_is_started_before_homesafe_imports_the_rest_of_itself(homesafe_env: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", IMPORTED_BEFORE_THE_START],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    imported = set(completed.stdout.split())
    assert "homesafe.prestart" in imported
    assert not imported & set(LATER_IMPORTS), imported & set(LATER_IMPORTS)


WAIT_THEN = """
import os, sys, time
from homesafe import prestart
prestart.begin(["backup"])
print(prestart.waiting_pid(), flush=True)
if sys.argv[1] == "die":
    os.kill(os.getpid(), 9)
"""


@pytest.mark.parametrize("how", ["exit", "die"])
def test_it_never_outlives_homesafe(homesafe_env: Path, how: str) -> None:
    """Killed at homesafe's exit; when homesafe is killed, its order pipe closes and it
    exits by itself."""
    completed = subprocess.run(
        [sys.executable, "-c", WAIT_THEN, how], capture_output=True, text=True, check=False
    )
    assert completed.returncode == (-signal.SIGKILL if how == "die" else 0), completed.stderr
    waiting = int(completed.stdout)
    deadline = time.monotonic() + 30
    while not gone(waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(waiting)


def test_the_interpreter_is_read_from_the_script(tmp_path: Path) -> None:
    script = tmp_path / "borg"
    for first_line, expected in [
        ("#!/usr/bin/python3\n", ["/usr/bin/python3"]),
        ("#!/opt/borg/bin/python3.11 -s\n", ["/opt/borg/bin/python3.11", "-s"]),
        ("#!/usr/bin/env python3\n", None),
        ("#!/bin/sh\n", None),
        ("python3\n", None),
        ("\x7fELF", None),
    ]:
        script.write_text(first_line + "rest\n")
        assert prestart._interpreter(str(script)) == expected, first_line
