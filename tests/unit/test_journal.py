"""The journal's own logic on real files: what it writes, how it reads back what a dead
process left (torn lines included), and how each kind of change is undone.

A journal "left by a dead process" is written here as the file format says, with no
process holding its lock: exactly what the kernel leaves after a SIGKILL. The kills
themselves are in tests/integration/test_crash.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from homesafe import journal, locks, state
from homesafe.errors import HomesafeError, OperationLockedError


def journal_files(homesafe_env: Path) -> list[Path]:
    directory = homesafe_env / "home" / "journal"
    return sorted(directory.iterdir()) if directory.is_dir() else []


def dead_journal(homesafe_env: Path, *records: dict[str, Any], name: str = "1-99999") -> Path:
    """A journal as a killed process leaves it: header, records, maybe closings."""
    directory = homesafe_env / "home" / "journal"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.jsonl"
    lines = [{"journal": 1, "operation": "restore", "pid": 99999, "started": 0.0}]
    lines += list(records)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def entry(number: int, kind: str, **data: Any) -> dict[str, Any]:
    return {"entry": number, "kind": kind, "data": data, "time": 0.0}


def test_journal_file_exists_while_a_change_is_open_and_is_deleted_after(
    homesafe_env: Path,
) -> None:
    current = journal.active()
    first = current.record(journal.COMMAND, {"undo": ["true"], "description": "one"})
    second = current.record(journal.COMMAND, {"undo": ["true"], "description": "two"})

    (path,) = journal_files(homesafe_env)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["journal"] == 1 and lines[0]["pid"] == os.getpid()
    assert [line["kind"] for line in lines[1:]] == ["command", "command"]
    assert [entry.number for entry in current.pending()] == [first, second]

    current.undone(first)
    assert path.exists()
    current.keep(second, "stays")
    assert not path.exists()
    assert journal_files(homesafe_env) == []
    assert current.pending() == []


def test_a_journal_of_a_live_process_is_left_alone(homesafe_env: Path) -> None:
    marker = homesafe_env / "undone"
    current = journal.active()
    number = current.record(journal.COMMAND, {"undo": ["touch", str(marker)]})

    report = journal.recover()

    # This very process holds its journal's lock: it is alive, nothing is undone.
    assert report.actions == []
    assert report.busy == [current.path.name if current.path else ""]
    assert not marker.exists()
    current.undone(number)


def test_recovery_undoes_newest_first_and_deletes_the_journal(homesafe_env: Path) -> None:
    log = homesafe_env / "log"
    path = dead_journal(
        homesafe_env,
        entry(1, journal.COMMAND, undo=["sh", "-c", f"echo first >> {log}"]),
        entry(2, journal.COMMAND, undo=["sh", "-c", f"echo second >> {log}"]),
        entry(3, journal.COMMAND, undo=["sh", "-c", f"echo closed >> {log}"]),
        {"entries": [3], "closed": "undone", "reason": ""},
        entry(4, journal.COMMAND, undo=["sh", "-c", f"echo third >> {log}"]),
    )

    report = journal.recover()

    assert log.read_text().split() == ["third", "second", "first"]
    assert [action.status for action in report.actions] == ["done"] * 3
    assert report.recovered == [path.name]
    assert not path.exists()
    assert report.to_dict()["failed"] == 0


def test_a_torn_last_line_is_a_change_never_made(homesafe_env: Path) -> None:
    log = homesafe_env / "log"
    path = dead_journal(homesafe_env, entry(1, journal.COMMAND, undo=["touch", str(log)]))
    with path.open("a") as file:
        file.write('{"entry": 2, "kind": "command", "data": {"undo": ["fal')  # killed mid-write

    report = journal.recover()

    assert len(report.actions) == 1 and log.exists()
    assert not path.exists()


def test_dry_run_says_what_it_would_do_and_changes_nothing(homesafe_env: Path) -> None:
    staging = homesafe_env / "staging"
    staging.mkdir()
    path = dead_journal(homesafe_env, entry(1, journal.TEMPORARY_DIRECTORY, path=str(staging)))
    before = path.read_text()

    report = journal.recover(dry_run=True)

    assert [(action.status, action.description) for action in report.actions] == [
        ("planned", f"remove the leftover directory {staging}")
    ]
    assert report.lines() == [
        f"would remove the leftover directory {staging} [restore (pid 99999)]"
    ]
    assert staging.is_dir()
    assert path.read_text() == before


def test_half_swapped_paths_are_put_back_and_staging_removed(homesafe_env: Path) -> None:
    # A restore of two paths, killed after the first was swapped and the second moved
    # aside: the journal holds every step, each done.
    staging = homesafe_env / "home" / "tmp" / ".homesafe-staging-x"
    live = homesafe_env / "srv"
    (live / "b").mkdir(parents=True)
    (live / "b" / "b.txt").write_text("b restored\n")
    (staging / "old" / "srv" / "a").mkdir(parents=True)
    (staging / "old" / "srv" / "a" / "a.txt").write_text("a previous\n")
    (staging / "old" / "srv" / "b").mkdir(parents=True)
    (staging / "old" / "srv" / "b" / "b.txt").write_text("b previous\n")
    (staging / "new" / "srv" / "a").mkdir(parents=True)
    (staging / "new" / "srv" / "a" / "a.txt").write_text("a restored\n")

    def paths(name: str) -> dict[str, str]:
        return {
            "target": str(live / name),
            "previous": str(staging / "old" / "srv" / name),
            "staged": str(staging / "new" / "srv" / name),
        }

    def swap_entry(number: int, kind: str, name: str) -> dict[str, Any]:
        keys = ("target", "previous") if kind == journal.MOVED_ASIDE else ("staged", "target")
        return entry(number, kind, app="two", **{key: paths(name)[key] for key in keys})

    path = dead_journal(
        homesafe_env,
        entry(1, journal.TEMPORARY_DIRECTORY, path=str(staging)),
        swap_entry(2, journal.MOVED_ASIDE, "b"),
        swap_entry(3, journal.PLACED, "b"),
        swap_entry(4, journal.MOVED_ASIDE, "a"),
        swap_entry(5, journal.PLACED, "a"),  # recorded, never done: killed before
    )

    report = journal.recover()

    assert report.failed == [], report.lines()
    assert (live / "a" / "a.txt").read_text() == "a previous\n"
    assert (live / "b" / "b.txt").read_text() == "b previous\n"
    assert not staging.exists()
    assert not path.exists()
    descriptions = [action.description for action in report.actions]
    assert descriptions[0] == f"the restored copy of {live / 'a'} had not been put in place yet"
    assert f"took the restored copy of {live / 'b'} out" in descriptions


def test_a_previous_copy_that_cannot_go_back_keeps_its_staging_area(
    homesafe_env: Path,
) -> None:
    staging = homesafe_env / "staging"
    previous = staging / "old" / "srv" / "app"
    previous.mkdir(parents=True)
    (previous / "precious").write_text("only copy\n")
    target = homesafe_env / "srv" / "app"
    target.mkdir(parents=True)  # something took its place: no rename over it
    path = dead_journal(
        homesafe_env,
        entry(1, journal.TEMPORARY_DIRECTORY, path=str(staging)),
        entry(2, journal.MOVED_ASIDE, app="app", target=str(target), previous=str(previous)),
    )

    report = journal.recover()

    assert [action.status for action in report.actions] == ["failed", "failed"]
    assert "previous copy is kept" in str(report.failed[0].error)
    assert "holds the previous copy" in str(report.failed[1].error)
    assert (previous / "precious").read_text() == "only copy\n"
    assert path.exists()  # tried again next time

    again = journal.recover()
    assert len(again.failed) == 2 and path.exists()

    # Put back by hand: --discard forgets what it cannot undo.
    discarded = journal.recover(discard=True)
    assert len(discarded.failed) == 2
    assert not path.exists()
    assert journal.recover().actions == []


def test_settings_written_by_a_restore_are_written_back(homesafe_env: Path) -> None:
    state.write_settings({"app.theme": "restored", "app.new": 1})
    dead_journal(
        homesafe_env,
        entry(
            1,
            journal.SETTINGS_WRITTEN,
            app="app",
            previous={"app.theme": "dark"},
            written=["app.theme", "app.new"],
        ),
    )

    journal.recover()

    assert state.read_settings(["app.theme", "app.new"]) == {"app.theme": "dark"}


def test_lockdown_is_lifted_with_its_leave_command(homesafe_env: Path) -> None:
    flag = homesafe_env / "home" / "lockdown" / "notes"
    flag.parent.mkdir(parents=True)
    flag.write_text('{"pid": 99999}')
    left = homesafe_env / "left"
    dead_journal(
        homesafe_env,
        entry(1, journal.LOCKDOWN, app="notes", flag=str(flag), leave=["touch", str(left)]),
    )

    report = journal.recover()

    assert not flag.exists() and left.exists()
    assert report.lines() == [
        "lifted the lockdown of notes (ran its lockdown.leave command) [restore (pid 99999)]"
    ]


def test_a_lockdown_flag_of_a_dead_process_without_journal_is_cleared(
    homesafe_env: Path,
) -> None:
    flags = homesafe_env / "home" / "lockdown"
    flags.mkdir(parents=True)
    (flags / "orphan").write_text(json.dumps({"pid": 2**22 + 12345, "operation": "backup"}))
    (flags / "mine").write_text(json.dumps({"pid": os.getpid(), "operation": "backup"}))

    report = journal.recover()

    assert sorted(os.listdir(flags)) == ["mine"]
    assert [action.description for action in report.actions] == ["lifted the lockdown of orphan"]


def test_a_lockdown_flag_whose_pid_was_reused_since_is_cleared(homesafe_env: Path) -> None:
    """The pid in a flag now names a live process, but one started after the flag was
    set (a pid reused since): the setter is gone. A flag of a live process that set it
    stays."""
    flags = homesafe_env / "home" / "lockdown"
    flags.mkdir(parents=True)
    live = subprocess.Popen(["sleep", "60"])
    try:
        reused = {"pid": live.pid, "operation": "backup", "since": time.time() - 3600}
        (flags / "reused").write_text(json.dumps(reused))
        (flags / "held").write_text(json.dumps({**reused, "since": time.time()}))

        report = journal.recover()

        assert sorted(os.listdir(flags)) == ["held"]
        assert [action.description for action in report.actions] == [
            "lifted the lockdown of reused"
        ]
    finally:
        live.kill()
        live.wait()


def test_unknown_kinds_are_reported_not_guessed(homesafe_env: Path) -> None:
    path = dead_journal(homesafe_env, entry(1, "teleport", where="mars"))

    report = journal.recover()

    assert report.failed[0].error == "this homesafe does not know how to undo 'teleport'"
    assert path.exists()


def test_temporary_directory_is_journaled_and_removed(homesafe_env: Path) -> None:
    parent = homesafe_env / "scratch"
    parent.mkdir()
    with journal.temporary_directory(parent, "work-") as made:
        (made / "read-only").mkdir()
        (made / "read-only" / "file").write_text("x")
        (made / "read-only").chmod(0o555)
        (recorded,) = journal.active().pending()
        assert recorded.data == {"path": str(made)}
        assert made.stat().st_mode & 0o777 == 0o700
    assert not made.exists()
    assert journal_files(homesafe_env) == []


def test_operation_lock_is_reentrant_in_its_thread(homesafe_env: Path) -> None:
    with journal.operation("backup") as outer:
        assert locks.holder(journal.OPERATION_LOCK) == os.getpid()
        with journal.operation("restore", wait=0) as inner:
            assert inner.actions == []
    assert locks.holder(journal.OPERATION_LOCK) is None
    assert outer.actions == []


def test_operation_lock_makes_another_thread_wait_then_fail(homesafe_env: Path) -> None:
    import threading

    failures: list[BaseException] = []

    def second() -> None:
        try:
            with journal.operation("restore", wait=0.2):
                pass
        except OperationLockedError as error:
            failures.append(error)

    with journal.operation("backup"):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=10)

    assert len(failures) == 1
    assert "cannot start the restore" in str(failures[0])
    with journal.operation("restore", wait=0):  # free again
        pass


def test_operation_recovers_first_and_reports(homesafe_env: Path) -> None:
    staging = homesafe_env / "left-behind"
    staging.mkdir()
    dead_journal(homesafe_env, entry(1, journal.TEMPORARY_DIRECTORY, path=str(staging)))
    seen: list[journal.RecoveryReport] = []

    with journal.operation("backup", on_recovered=seen.append) as report:
        assert not staging.exists()

    assert seen == [report]
    assert report.changed_anything


@pytest.mark.parametrize("closing", ["entry", "entries"])
def test_both_closing_forms_are_read(homesafe_env: Path, closing: str) -> None:
    marker = homesafe_env / "marker"
    closed: dict[str, Any] = {"closed": "undone", "reason": ""}
    closed[closing] = 1 if closing == "entry" else [1]
    dead_journal(homesafe_env, entry(1, journal.COMMAND, undo=["touch", str(marker)]), closed)

    assert journal.recover().actions == []
    assert not marker.exists()


def test_service_controller_writes_each_stop_down_before_making_it(homesafe_env: Path) -> None:
    from homesafe.consistency.services import ServiceController
    from homesafe.manifest import CommandService

    def service(name: str, start_works: bool = True) -> CommandService:
        flag = homesafe_env / f"{name}.running"
        flag.touch()
        # The stop checks that the journal already names this service.
        journal_directory = homesafe_env / "home" / "journal"
        stop = f'grep -q \'"label":"service {name}"\' {journal_directory}/*.jsonl && rm {flag}'
        return CommandService(
            type="command",
            name=name,
            start=["touch", str(flag)] if start_works else ["false"],
            stop=["sh", "-c", stop],
            status=["test", "-e", str(flag)],
        )

    controller = ServiceController(
        [service("first"), service("second", start_works=False)],
        journal=journal.active(),
        owner="app",
    )
    controller.stop_all()

    pending = journal.active().pending()
    assert [entry.data["label"] for entry in pending] == ["service second", "service first"]
    assert pending[0].data["app"] == "app"
    assert pending[0].data["service"]["stop"][0] == "sh"

    failures = controller.start_all()

    assert [str(failure).split(":")[0] for failure in failures] == [
        "could not start service second"
    ]
    # Started again, or failed and reported: either way nothing is left to recover.
    assert journal.active().pending() == []
    assert journal_files(homesafe_env) == []


# -- changes recorded before they are made (snapshots, mounts, subvolumes) ---------------


def test_a_change_is_on_disk_before_the_body_makes_it(homesafe_env: Path) -> None:
    made = homesafe_env / "made"
    with journal.command_to_undo("make it", ["rm", "-r", str(made)], if_exists=made) as number:
        (path,) = journal_files(homesafe_env)
        (line,) = [json.loads(text) for text in path.read_text().splitlines()[1:]]
        assert line["entry"] == number and line["data"]["if_exists"] == str(made)
        made.mkdir()
    journal.active().undone(number)


def test_a_body_that_failed_before_making_anything_closes_its_entry(homesafe_env: Path) -> None:
    never = homesafe_env / "never"
    with pytest.raises(RuntimeError), journal.command_to_undo("x", ["true"], if_exists=never):
        raise RuntimeError("the snapshot command failed")
    assert journal.active().pending() == []
    assert journal_files(homesafe_env) == []


def test_a_body_that_failed_after_making_it_leaves_it_to_recovery(homesafe_env: Path) -> None:
    made = homesafe_env / "half"
    undo = ["rm", "-r", str(made)]
    with pytest.raises(RuntimeError), journal.command_to_undo("x", undo, if_exists=made):
        made.mkdir()
        raise RuntimeError("failed after making it")
    (pending,) = journal.active().pending()
    journal.active().undone(pending.number)


def test_what_exists_already_is_not_recorded_as_homesafes(homesafe_env: Path) -> None:
    theirs = homesafe_env / "theirs"
    theirs.mkdir()
    undo = ["rm", "-r", str(theirs)]
    with (
        pytest.raises(HomesafeError, match="exists already"),
        journal.command_to_undo("x", undo, if_exists=theirs),
    ):
        pass
    assert theirs.is_dir() and journal.active().pending() == []


def test_recovery_undoes_only_what_the_guard_finds(homesafe_env: Path) -> None:
    """Killed after recording and before making (or after undoing, before closing):
    there is nothing to undo, and the undo (which would fail) is not run."""
    log = homesafe_env / "log"
    made = homesafe_env / "made"
    made.mkdir()
    dead_journal(
        homesafe_env,
        entry(1, journal.COMMAND, undo=["sh", "-c", f"echo made >> {log}"], if_exists=str(made)),
        entry(2, journal.COMMAND, undo=["false"], if_exists=str(homesafe_env / "never")),
        entry(3, journal.COMMAND, undo=["false"], if_mounted=str(homesafe_env)),
    )

    report = journal.recover()

    assert log.read_text().split() == ["made"]
    assert [action.status for action in report.actions] == ["done"] * 3
    descriptions = [action.description for action in report.actions]
    assert f"{homesafe_env} was not mounted" in descriptions
    assert f"{homesafe_env / 'never'} was gone already" in descriptions


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_mount_is_recorded_before_it_is_made_and_recovered_by_its_mount_point(
    homesafe_env: Path,
) -> None:
    target = homesafe_env / "mounted"
    target.mkdir()
    unmount = ["umount", "--", str(target)]
    with journal.command_to_undo("mount", unmount, if_mounted=target) as number:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    try:
        assert journal.is_mount_point(target)
        with (
            pytest.raises(HomesafeError, match="mounted on"),
            journal.command_to_undo("again", unmount, if_mounted=target),
        ):
            pass
        # As a killed process leaves it: the entry open, its lock gone.
        path = journal.active().path
        assert path is not None
        records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
        left = dead_journal(homesafe_env, *records, name="2-99999")
        journal.active().keep(number, "handed to the dead journal of this test")

        report = journal.recover()

        assert [action.status for action in report.actions] == ["done"]
        assert not journal.is_mount_point(target) and not left.exists()
    finally:
        if journal.is_mount_point(target):
            subprocess.run(unmount, check=True)
