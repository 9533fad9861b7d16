"""Restores staged by several `borg extract` calls side by side, with real borg.

An app's declared paths are dealt out to the calls (restore.plan_extractions); here the
size below which no call is split off is lowered to a byte and borg is allowed three
calls, so that a small app is split as a large one would be. The result must be what
one call gives: every file, its metadata, and hard links across the calls joined again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from homesafe import api, archives, restore
from homesafe.engines import borg
from homesafe.engines.base import Progress
from homesafe.engines.borg import BorgEngine
from homesafe.repositories import Repository
from tests.conftest import ManifestWriter, requires_program
from tests.integration.test_remote_locks import borg_over_ssh, sshd
from tests.integration.test_restore_reads import (
    lock_holders,
    logging_borg,
    record_of,
    restore_behind_a_writer,
)
from tests.integration.test_restore_staged import borg_wrapper, data_extraction
from tests.integration.test_roundtrip import snapshot_tree
from tests.support.apps import DEFAULT_ACL, describe, to_toml

pytestmark = requires_program("borg")

__all__ = ["borg_over_ssh", "lock_holders", "sshd"]  # fixtures of this module's tests

CALLS = 3


@pytest.fixture(autouse=True)
def split_extractions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(restore, "PARALLEL_EXTRACTION_MIN_BYTES", 1)
    monkeypatch.setattr(restore, "REMOTE_PARALLEL_EXTRACTION_MIN_BYTES", 1)
    monkeypatch.setattr(restore, "REMOTE_UNSETTLED_EXTRACTION_MIN_BYTES", 1)
    monkeypatch.setattr(BorgEngine, "extract_concurrency", CALLS)


def write_wide_app(write_manifest: ManifestWriter, root: Path) -> Path:
    """An app of four declared paths, with hard links within one and across two."""
    base = root / "wide"
    for directory in ("etc", "data/nested/deeper", "media", "cache"):
        (base / directory).mkdir(parents=True)
    (base / "etc/app.conf").write_text("[wide]\n")
    (base / "etc/app.conf").chmod(0o640)
    (base / "data/nested/deeper/records.bin").write_bytes(os.urandom(300_000))
    (base / "data/notes.txt").write_text("notes\n" * 1000)
    (base / "data/nested").chmod(0o750)
    (base / "media/film.bin").write_bytes(os.urandom(500_000))
    os.link(base / "media/film.bin", base / "data/film-link.bin")  # across two paths
    os.link(base / "data/notes.txt", base / "data/nested/notes-link.txt")  # within one
    (base / "media/poster").symlink_to("film.bin")
    (base / "cache/index").write_bytes(os.urandom(200_000))
    manifest = {
        "id": "wide",
        "version": 1,
        "config": {"directories": [str(base / "etc")]},
        "data": {"directories": [str(base / path) for path in ("data", "media", "cache")]},
    }
    write_manifest("wide", to_toml(manifest))
    return base


def change_wide_app(base: Path) -> None:
    (base / "data/notes.txt").write_text("changed\n")
    (base / "media/film.bin").unlink()
    (base / "media/new.bin").write_bytes(b"new")
    (base / "cache/index").unlink()
    (base / "etc/app.conf").chmod(0o600)


def times(base: Path) -> dict[str, int]:
    """The modification time of every path below ``base``'s declared paths."""
    found = {}
    for declared in ("etc", "data", "media", "cache"):
        found[declared] = (base / declared).lstat().st_mtime_ns
        for directory, subdirectories, files in os.walk(base / declared):
            for name in [*subdirectories, *files]:
                path = Path(directory, name)
                found[str(path.relative_to(base))] = path.lstat().st_mtime_ns
    return found


def links(base: Path) -> set[frozenset[str]]:
    """The groups of paths below ``base`` that are one file (hard links)."""
    by_inode: dict[int, set[str]] = {}
    for directory, _subdirectories, files in os.walk(base):
        for name in files:
            path = Path(directory, name)
            by_inode.setdefault(path.lstat().st_ino, set()).add(str(path.relative_to(base)))
    return {frozenset(group) for group in by_inode.values() if len(group) > 1}


@pytest.mark.parametrize("with_record", [True, False], ids=["record", "listing-first"])
def test_extractions_side_by_side_restore_exactly_what_the_archive_holds(
    homesafe_env: Path,
    write_manifest: ManifestWriter,
    monkeypatch: pytest.MonkeyPatch,
    with_record: bool,
) -> None:
    base = write_wide_app(write_manifest, homesafe_env / "srv")
    before = snapshot_tree(base)
    modified = times(base)
    linked = links(base)
    assert linked == {
        frozenset({"media/film.bin", "data/film-link.bin"}),
        frozenset({"data/notes.txt", "data/nested/notes-link.txt"}),
    }
    backup = api.backup_apps()
    if not with_record:
        shutil.rmtree(record_of(homesafe_env, backup.archive))
    change_wide_app(base)
    log = logging_borg(homesafe_env, monkeypatch)
    reports: list[Progress] = []

    result = api.restore_apps(backup.archive, on_progress=reports.append)

    assert result.status == "ok", describe(result)
    assert snapshot_tree(base) == before
    assert times(base) == modified
    assert links(base) == linked
    calls = log.read_text().splitlines()
    assert calls.count("begin extract") == CALLS, calls
    assert not any((homesafe_env / "home/tmp").iterdir())
    # One progress for all the calls: bytes add up, never go back, and end complete.
    extracted = [report for report in reports if report.operation == "extract"]
    counts = [report.current or 0 for report in extracted]
    assert counts == sorted(counts)
    assert extracted[-1].finished
    assert extracted[-1].total is not None and counts[-1] == extracted[-1].total


def test_one_failing_extraction_leaves_the_app_as_it_was(
    homesafe_env: Path, write_manifest: ManifestWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call extracting media/ fails; the others succeed, and are thrown away."""
    base = write_wide_app(write_manifest, homesafe_env / "srv")
    backup = api.backup_apps()
    change_wide_app(base)
    changed = snapshot_tree(base)
    borg_wrapper(
        homesafe_env / "bin",
        data_extraction(
            'case " $* " in *"/media "*) echo "injected: cannot extract media" >&2; exit 2;; esac'
        ),
        monkeypatch,
    )

    result = api.restore_apps(backup.archive)

    assert result.status == "failed"
    assert "injected: cannot extract media" in describe(result)
    assert snapshot_tree(base) == changed
    assert not any((homesafe_env / "home/tmp").iterdir())


def test_extractions_side_by_side_wait_for_a_writer(
    homesafe_env: Path,
    write_manifest: ManifestWriter,
    lock_holders: list[subprocess.Popen[bytes]],
) -> None:
    """Each call gives up on a writer's lock after the short side-by-side wait, is made
    again with the repository's lock wait, and the restore goes through."""
    base = write_wide_app(write_manifest, homesafe_env / "srv")
    before = snapshot_tree(base)
    backup = api.backup_apps()
    change_wide_app(base)

    restore_behind_a_writer(homesafe_env, backup.archive, lock_holders)

    assert snapshot_tree(base) == before
    assert links(base) == {
        frozenset({"media/film.bin", "data/film-link.bin"}),
        frozenset({"data/notes.txt", "data/nested/notes-link.txt"}),
    }


def test_extractions_side_by_side_over_ssh(
    homesafe_env: Path,
    write_manifest: ManifestWriter,
    monkeypatch: pytest.MonkeyPatch,
    borg_over_ssh: Repository,
) -> None:
    """Each call is a connection of its own and a `borg serve` of its own."""
    repository = borg_over_ssh
    base = write_wide_app(write_manifest, homesafe_env / "srv")
    before = snapshot_tree(base)
    linked = links(base)
    backup = api.backup_apps(repository=repository)
    assert backup.status == "ok", describe(backup)
    change_wide_app(base)
    log = logging_borg(homesafe_env, monkeypatch)

    result = api.restore_apps(backup.archive, repository=repository)

    assert result.status == "ok", describe(result)
    assert snapshot_tree(base) == before
    assert links(base) == linked
    assert log.read_text().splitlines().count("begin extract") == CALLS


def test_an_interrupted_restore_ends_every_extraction_at_once(
    homesafe_env: Path, write_manifest: ManifestWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C reaches the main thread only; the extractions other threads wait for are
    ended too, rather than left to finish (here they would take a minute)."""
    base = write_wide_app(write_manifest, homesafe_env / "srv")
    backup = api.backup_apps()
    change_wide_app(base)
    changed = snapshot_tree(base)
    started_pids = homesafe_env / "extract-pids"
    borg_wrapper(
        homesafe_env / "bin", data_extraction(f"echo $$ >> {started_pids}; sleep 60"), monkeypatch
    )

    def interrupt_once_all_started() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if started_pids.exists() and len(started_pids.read_text().split()) == CALLS:
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_once_all_started)
    interrupter.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        api.restore_apps(backup.archive)
    interrupter.join()

    assert time.monotonic() - started < 20
    pids = [int(pid) for pid in started_pids.read_text().split()]
    assert len(pids) == CALLS
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert snapshot_tree(base) == changed
    assert not any((homesafe_env / "home/tmp").iterdir())


def write_deep_app(write_manifest: ManifestWriter, root: Path) -> Path:
    """An app whose data is one directory of several children, with a hard link across
    two of them, an odd mode and an old modification time on the directory itself."""
    base = root / "deep"
    data = base / "data"
    for child in ("photos/2024", "photos/2025", "mail/inbox", "music"):
        (data / child).mkdir(parents=True)
    (data / "photos/2024/a.jpg").write_bytes(os.urandom(400_000))
    (data / "photos/2025/b.jpg").write_bytes(os.urandom(300_000))
    (data / "mail/inbox/1.eml").write_text("mail\n" * 10_000)
    (data / "music/song.ogg").write_bytes(os.urandom(200_000))
    (data / "index.db").write_bytes(os.urandom(100_000))
    os.link(data / "photos/2024/a.jpg", data / "music/cover.jpg")
    (data / "README").symlink_to("index.db")
    data.chmod(0o750)
    os.utime(data, (1_600_000_000, 1_600_000_000))
    manifest = {"id": "deep", "version": 1, "data": {"directories": [str(data)]}}
    write_manifest("deep", to_toml(manifest))
    return base


def change_deep_app(base: Path) -> None:
    (base / "data/index.db").write_text("changed\n")
    shutil.rmtree(base / "data/photos")
    (base / "data/stray.txt").write_text("stray\n")
    (base / "data").chmod(0o700)


def deep_state(base: Path) -> tuple[object, ...]:
    data = base / "data"
    return (
        snapshot_tree(base),
        data.lstat().st_mtime_ns,
        [
            Path(directory, name).lstat().st_mtime_ns
            for directory, subdirectories, files in sorted(os.walk(data))
            for name in sorted([*subdirectories, *files])
        ],
        links(base),
    )


@pytest.mark.parametrize("named", ["one-by-one", "by-patterns"])
@pytest.mark.parametrize(
    "record", ["whole", "missing-a-child", "changed-times", "default-acl", "none"]
)
def test_a_large_directory_is_extracted_child_by_child_and_itself_exactly(
    homesafe_env: Path,
    write_manifest: ManifestWriter,
    monkeypatch: pytest.MonkeyPatch,
    record: str,
    named: str,
) -> None:
    """Its children are dealt out to the calls side by side, and the result is what one
    call gives: the directory's times and mode are borg's.

    From a record that measured the directory's times, the first call extracts the
    directory itself too, but for the children dealt to the others (so also a child
    the record does not know, made during the backup), and its times are set from the
    record once all calls ended: no call more. Without a record, when the archive's
    times are not the record's, or when the directory has a default ACL (entries made
    in it after the ACL would inherit it), one more call extracts the directory
    without its children, once every other one has ended. The children are named to
    borg one by one, or (as beyond borg.PATH_PATTERNS_MAX of them) by regular
    expressions."""
    monkeypatch.setattr(archives, "SPLIT_DIRECTORY_MIN_BYTES", 1)
    if named == "by-patterns":
        monkeypatch.setattr(borg, "PATH_PATTERNS_MAX", 0)
    base = write_deep_app(write_manifest, homesafe_env / "srv")
    data = base / "data"
    if record == "default-acl":
        try:
            os.setxattr(data, "system.posix_acl_default", DEFAULT_ACL)
        except OSError as error:
            pytest.skip(f"no ACLs on this file system: {error}")
        os.utime(data, (1_600_000_000, 1_600_000_000))
    expected = deep_state(base)
    assert len(links(base)) == 1
    backup = api.backup_apps()
    record_file = record_of(homesafe_env, backup.archive) / archives.RECORD_FILE
    document = json.loads(record_file.read_text())
    measured = document["sizes"][str(data)]
    assert sorted(measured[2]) == ["README", "index.db", "mail", "music", "photos"]
    if record == "default-acl":
        assert len(measured) == 3  # no times: the directory is extracted last
    else:
        assert measured[3] == [data.lstat().st_mtime_ns, data.lstat().st_ctime_ns]
    if record == "missing-a-child":
        del measured[2]["mail"]
    elif record == "changed-times":
        measured[3][1] += 1_000_000  # as if the directory changed after borg read it
    record_file.write_text(json.dumps(document))
    if record == "none":
        shutil.rmtree(record_file.parent)
    change_deep_app(base)
    log = logging_borg(homesafe_env, monkeypatch)

    result = api.restore_apps(backup.archive)

    assert result.status == "ok", describe(result)
    assert deep_state(base) == expected
    assert stat.S_IMODE(data.stat().st_mode) == 0o750
    assert not [name for name in os.listdir(data) if name.startswith(restore.HOLD_PREFIX)]
    if record == "default-acl":
        assert os.getxattr(data, "system.posix_acl_default") == DEFAULT_ACL
    calls = [line for line in log.read_text().splitlines() if line.endswith(" extract")]
    if record in ("whole", "missing-a-child"):
        assert calls.count("begin extract") == CALLS, calls
        return
    assert calls.count("begin extract") == CALLS + 1, calls
    # The last call begins once every other one has ended.
    assert calls[-2:] == ["begin extract", "end extract"], calls
    assert calls[: 2 * CALLS].count("end extract") == CALLS, calls
