"""What a restore reads before it extracts, with real borg: the archive's description and
listing are read side by side, never stall on the repository's lock roster, and still
wait the repository's whole lock wait for a writer that holds the lock. An archive this
host wrote is planned from the local record the backup kept, and read while it is
extracted; a record that is not the archive's is found out before anything changes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homesafe import api, archives, sources
from homesafe.repositories import default_repository
from homesafe.sources import EngineSource
from tests.conftest import ManifestWriter, requires_program
from tests.integration.test_repo_locks import borg_lock_holder
from tests.integration.test_restore_staged import borg_wrapper, change_everything, write_app
from tests.integration.test_roundtrip import snapshot_tree
from tests.support.apps import describe

pytestmark = requires_program("borg")


@pytest.fixture
def lock_holders() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The lock holders a test starts; each is ended and reaped at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def test_side_by_side_reads_match_the_reads_one_after_the_other(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    write_app(write_manifest, homesafe_env / "srv", "first")
    write_app(write_manifest, homesafe_env / "srv", "second")
    backup = api.backup_apps()
    source = EngineSource(default_repository(), backup.archive)

    description, listing = source.describe_and_list()

    assert description == source.describe()
    assert listing == source.listing()
    assert sorted(description.apps) == ["first", "second"]


def test_side_by_side_reads_never_sleep_a_lock_poll(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    """With the default 60 s lock wait, a borg process that meets the other on the lock
    roster sleeps 6 s; read side by side, no read may take that long."""
    write_app(write_manifest, homesafe_env / "srv", "quick")
    backup = api.backup_apps()
    repository = default_repository()
    assert repository.lock_wait >= 60
    source = EngineSource(repository, backup.archive)

    durations = []
    for _ in range(5):
        started = time.monotonic()
        source.describe_and_list()
        durations.append(time.monotonic() - started)

    assert max(durations) < repository.lock_wait / 10, durations


def test_restore_waits_the_whole_lock_wait_for_a_writer(
    homesafe_env: Path,
    write_manifest: ManifestWriter,
    lock_holders: list[subprocess.Popen[bytes]],
) -> None:
    """A writer holding the lock longer than the side-by-side reads wait: they give up,
    are made again one after the other with the repository's lock wait, and the restore
    goes through once the writer is done."""
    base = write_app(write_manifest, homesafe_env / "srv", "patient")
    before = snapshot_tree(base)
    backup = api.backup_apps()
    (base / "data/a.txt").write_text("changed after the backup\n")

    restore_behind_a_writer(homesafe_env, backup.archive, lock_holders)

    assert snapshot_tree(base) == before


def restore_behind_a_writer(
    homesafe_env: Path, archive: str, lock_holders: list[subprocess.Popen[bytes]]
) -> None:
    """Restore ``archive`` (default repository, 30 s lock wait) while a writer holds
    the lock three times as long as reads made side by side wait for it: the restore
    must go through, and not before the writer let go."""
    repository = dataclasses.replace(default_repository(), lock_wait=30)
    hold_seconds = 3 * sources.SIDE_BY_SIDE_LOCK_WAIT
    borg_lock_holder(repository, homesafe_env / "home", hold_seconds, lock_holders)

    started = time.monotonic()
    result = api.restore_apps(archive, repository=repository)

    assert result.status == "ok", describe(result)
    assert time.monotonic() - started >= hold_seconds - 0.5


def test_listing_holds_what_borg_lists_as_json(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    """The NUL-separated listing homesafe asks for says what --json-lines says, odd
    names, links, hard links and special files included; but where borg lists a hard
    link with size 0, homesafe gives it the size of the file it links to (for a link
    whose file lies outside the paths listed, from a second listing)."""
    base = write_app(write_manifest, homesafe_env / "srv", "odd")
    data = base / "data"
    (data / "tab\there").write_text("tab\n")
    (data / "new\nline").write_text("newline\n")
    (data / "ünïcödé €").write_text("unicode\n")
    (data / "link").symlink_to("sub/b.bin")
    (data / "dangling").symlink_to("/nowhere/at all")
    os.link(data / "a.txt", data / "hard")
    os.mkfifo(data / "fifo")
    (data / "empty").mkdir()
    backup = api.backup_apps()
    assert backup.status == "ok", describe(backup)
    repository = default_repository()
    passphrase = repository.passphrase() or ""
    completed = subprocess.run(
        ["borg", "list", "--json-lines", f"{repository.location}::{backup.archive}"],
        env={
            **os.environ,
            "BORG_PASSPHRASE": passphrase,
            "BORG_BASE_DIR": str(homesafe_env / "home/borg"),
        },
        capture_output=True,
        text=True,
        check=True,
    )
    expected = [
        (
            item["path"],
            item["type"],
            item["mode"],
            item["size"],
            item["user"],
            item["group"],
            item["linktarget"],
        )
        for item in map(json.loads, completed.stdout.splitlines())
    ]
    sizes = {item[0]: item[3] for item in expected}
    hard = str(data / "hard").lstrip("/")
    expected = [
        (*item[:3], sizes[item[6]], *item[4:]) if item[2].startswith("h") else item
        for item in expected
    ]
    source = EngineSource(repository, backup.archive)

    listing = source.listing()
    link_only = source.listing([str(data / "a.txt").lstrip("/")])

    found = [(e.path, e.type, e.mode, e.size, e.user, e.group, e.link_target) for e in listing]
    assert found == expected
    assert {"-", "d", "l", "p"} <= {entry.type for entry in listing}
    assert [(e.mode[0], e.size, e.link_target) for e in listing if e.mode.startswith("h")] == [
        ("h", len("odd a\n"), hard)
    ]
    assert [(e.mode[0], e.size, e.link_target) for e in link_only] == [("h", len("odd a\n"), hard)]


def test_restore_of_unchanged_apps_does_not_validate_their_manifests_again(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    """The archive's manifests equal the installed ones (validated at backup time): a
    restore takes those and never imports pydantic; one that differs is validated."""
    base = write_app(write_manifest, homesafe_env / "srv", "same")
    before = snapshot_tree(base)
    backup = api.backup_apps()
    (base / "data/a.txt").write_text("changed after the backup\n")
    script = (
        "import sys\n"
        "from homesafe import api\n"
        "result = api.restore_apps(sys.argv[1])\n"
        "print(result.status, 'pydantic' in sys.modules)\n"
    )

    def restore_in_a_new_process() -> str:
        return subprocess.run(
            [sys.executable, "-c", script, backup.archive],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    assert restore_in_a_new_process() == "ok False"
    assert snapshot_tree(base) == before

    write_app(write_manifest, homesafe_env / "srv", "same", version=2)  # installed: newer
    assert restore_in_a_new_process() == "ok True"
    assert snapshot_tree(base) == before


def record_of(homesafe_env: Path, archive_name: str) -> Path:
    directory = archives.record_directory(homesafe_env / "home", "default", archive_name)
    assert directory is not None
    return directory


def logging_borg(homesafe_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A borg wrapper first on PATH that logs when each call begins and ends (the
    extraction of homesafe's own files told apart); returns the log."""
    log = homesafe_env / "borg-calls.log"
    borg_wrapper(
        homesafe_env / "bin",
        # homesafe's files named as a path, or by a pattern (borg.prefix_regexes).
        'kind="$1"; case " $* " in *" .homesafe "*|*"re:^\\\\.homesafe("*)'
        ' kind="$kind-metadata";; esac\n'
        f'echo "begin $kind" >> {log}\n'
        '"$REAL_BORG" "$@"; status=$?\n'
        f'echo "end $kind" >> {log}\n'
        "exit $status",
        monkeypatch,
    )
    return log


def test_a_restore_here_extracts_first_and_reads_the_archive_meanwhile(
    homesafe_env: Path, write_manifest: ManifestWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backup keeps a record (homesafe's files, each path's size); the restore
    plans from it and starts the extraction before any other borg call has ended, the
    listing (which holds the run marker) read beside it; the result is exactly the
    archive."""
    base = write_app(write_manifest, homesafe_env / "srv", "recorded")
    before = snapshot_tree(base)
    backup = api.backup_apps()
    record = archives.load_record(
        record_of(homesafe_env, backup.archive), str(homesafe_env / "home/repository")
    )
    assert record is not None
    marker = f"{archives.RUN_MARKER_DIRECTORY}/{record.run_id}"
    assert marker in {
        entry.path for entry in EngineSource(default_repository(), backup.archive).listing()
    }
    assert record.sizes[str(base / "data")] == archives.PathSize(len("recorded a\n") + 50_000, 4)
    assert record.sizes[str(base / "secret")] == archives.PathSize(len("secret\n"), 1)
    change_everything(base)
    log = logging_borg(homesafe_env, monkeypatch)

    result = api.restore_apps(backup.archive)

    assert result.status == "ok", describe(result)
    assert snapshot_tree(base) == before
    assert result.app("recorded").size == len("recorded a\n") + 50_000 + len("[recorded]\n") + len(
        "secret\n"
    )
    calls = log.read_text().splitlines()
    kinds = ("extract", "list")
    assert sorted(calls) == sorted(f"{edge} {kind}" for kind in kinds for edge in ("begin", "end"))
    first_end = next(number for number, call in enumerate(calls) if call.startswith("end"))
    assert calls.index("begin extract") < first_end, calls


def test_a_stale_record_is_found_out_and_the_archive_restored(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    """An archive deleted and written again under the same name (the record kept is
    the first one's, with the same apps and paths): the run marker in the listing
    tells, the restore reads the archive, restores exactly what it holds, and drops
    the stale record."""
    base = write_app(write_manifest, homesafe_env / "srv", "renamed")
    api.backup_apps(archive_name="again")
    stale = homesafe_env / "stale-record"
    shutil.copytree(record_of(homesafe_env, "again"), stale)
    api.delete_archives(["again"])
    assert not record_of(homesafe_env, "again").exists()  # deleting forgets the record
    (base / "data/late.txt").write_text("written after the first backup\n")
    (base / "app.conf").write_text("[renamed]\nsecond = true\n")
    expected = snapshot_tree(base)
    api.backup_apps(archive_name="again")
    shutil.rmtree(record_of(homesafe_env, "again"))
    shutil.copytree(stale, record_of(homesafe_env, "again"))
    change_everything(base)

    result = api.restore_apps("again")

    assert result.status == "ok", describe(result)
    assert snapshot_tree(base) == expected
    assert not record_of(homesafe_env, "again").exists()
    assert not any((homesafe_env / "home/tmp").iterdir())


def test_an_archive_without_a_record_restores_the_same(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    """An archive written elsewhere (or before records were kept) has no record: it is
    read before extracting, as it always was, with the same result."""
    base = write_app(write_manifest, homesafe_env / "srv", "elsewhere")
    before = snapshot_tree(base)
    backup = api.backup_apps()
    change_everything(base)
    with_record = api.restore_apps(backup.archive)
    assert snapshot_tree(base) == before
    shutil.rmtree(record_of(homesafe_env, backup.archive))
    change_everything(base)

    without_record = api.restore_apps(backup.archive)

    assert without_record.status == "ok", describe(without_record)
    assert snapshot_tree(base) == before
    assert without_record.app("elsewhere").size == with_record.app("elsewhere").size
