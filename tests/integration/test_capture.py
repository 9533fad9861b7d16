"""Capture strategies against real filesystems and a real writer daemon (root only).

Each app's data is written by a daemon that keeps writing pairs of equal numbers (see
tests/support/daemon.py): an archive read while it runs would often hold two different
numbers; a consistent capture always holds equal ones. Filesystems are real: btrfs and
XFS (reflinks) and ext4 on loop devices; the engine is real borg (and restic once).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homesafe import api, locations
from homesafe.archives import StoredApp
from homesafe.consistency import snapshots
from homesafe.engines import engine_for
from homesafe.repositories import DEFAULT_COMPRESSIONS, Repository, default_repository
from tests.conftest import Daemon, DaemonFactory, ManifestWriter, requires_program
from tests.support.btrfs import LoopFilesystem, loop_filesystem, run

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices and mounts"),
    requires_program("mkfs.btrfs"),
    requires_program("mkfs.xfs"),
    requires_program("rsync"),
]


def describe(result: api.OperationResult) -> str:
    return str(result.to_dict())


def manifest(app_id: str, paths: list[Path], daemon: Daemon, config: Path | None) -> str:
    lines = [f'id = "{app_id}"']
    if config is not None:
        lines += ["[config]", f'files = ["{config}"]']
    lines.append("[data]")
    lines.append("directories = [" + ", ".join(f'"{path}"' for path in paths) + "]")
    return "\n".join(lines) + "\n" + daemon.manifest_service(app_id)


def writing_app(
    app_id: str,
    data: Path,
    daemon_factory: DaemonFactory,
    write_manifest: ManifestWriter,
) -> Daemon:
    """An app owning ``data`` (a payload and the pairs its daemon writes) and a config
    file next to it (a single file: bind-mounted alone)."""
    data.mkdir(parents=True, exist_ok=True)
    (data / "payload").mkdir(exist_ok=True)
    for number in range(40):
        (data / "payload" / f"file-{number}").write_bytes(os.urandom(256 * 1024))
    config = None
    if snapshots.same_filesystem(data, data.parent):
        config = data.parent / f"{app_id}.conf"
        config.write_text(f"name = {app_id}\n")
    daemon = daemon_factory(app_id)
    daemon.write_into(data)
    write_manifest(app_id, manifest(app_id, [data], daemon, config))
    daemon.start()
    return daemon


def back_up_twice(app_id: str, strategy: str) -> api.OperationResult:
    """Two backups of ``app_id`` (the second finds the engine's cache of unchanged
    files); each must have captured it with ``strategy`` while holding it still for
    a moment only: not while the engine reads it. Returns the second result.

    The bound is loose (2 s): the target, 0.5 s, is bench/downtime.py's to measure.
    runit's ``sv -w`` alone polls a service's state every ~0.42 s, and one stop and
    start on a loaded 2-core machine took over 0.5 s, failing this test once."""
    results = [api.backup_apps([app_id]) for _ in range(2)]
    for result in results:
        assert result.status == "ok", describe(result)
        app = result.app(app_id)
        assert app.strategy == strategy
        assert 0 < app.downtime < 2.0, app.downtime
        assert app.downtime < result.duration / 2
    return results[1]


def restored_pair(archive: str, app_id: str, data: Path, target: Path) -> tuple[str, str]:
    """Restore the app below ``target``; its config file and the daemon's two numbers."""
    target.mkdir()
    result = api.restore_apps(archive, [app_id], target_root=target)
    assert result.status == "ok", describe(result)
    inside = target / str(data).lstrip("/")
    configs = list(target.rglob("*.conf"))
    has_config = snapshots.same_filesystem(data, data.parent)  # as writing_app decides
    expected = [f"name = {app_id}\n"] if has_config else []
    assert [path.read_text() for path in configs] == expected, configs
    return (inside / "first").read_text(), (inside / "second").read_text()


def archived_paths(archive: str, repository: Repository | None = None) -> set[str]:
    repository = repository or default_repository()
    entries = engine_for(repository.engine).list_contents(repository, archive)
    return {entry.path for entry in entries}


def stored_app(archive: str, app_id: str) -> StoredApp:
    description, _ = api.read_archive(archive)
    return description.apps[app_id]


def mounts_of_host() -> set[str]:
    return {mount.mount_point for mount in snapshots.read_mounts()}


@pytest.fixture
def btrfs(tmp_path: Path) -> Iterator[LoopFilesystem]:
    with loop_filesystem(tmp_path / "btrfs", "btrfs") as filesystem:
        yield filesystem


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[LoopFilesystem]:
    with loop_filesystem(tmp_path / "xfs", "xfs") as filesystem:
        yield filesystem


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[LoopFilesystem]:
    with loop_filesystem(tmp_path / "ext4", "ext4") as filesystem:
        yield filesystem


def test_snapshot_holds_the_app_still_for_milliseconds_and_archives_original_paths(
    btrfs: LoopFilesystem,
    tmp_path: Path,
    daemon_factory: DaemonFactory,
    write_manifest: ManifestWriter,
) -> None:
    data = btrfs.mount_point / "notes"
    run("btrfs", "subvolume", "create", data)
    run("btrfs", "subvolume", "create", data / "attachments")  # nested: not in a snapshot
    (data / "attachments" / "picture").write_bytes(b"nested subvolume\n")
    daemon = writing_app("notes", data, daemon_factory, write_manifest)
    mounts_before = mounts_of_host()

    second = back_up_twice("notes", "snapshot")

    assert daemon.is_running()
    assert (daemon.calls().count("stop"), daemon.calls().count("start")) == (2, 3)
    # Nothing left: no snapshot, no snapshot directory, no mount on the host.
    assert not (data / ".homesafe-snapshots").exists()
    assert run("btrfs", "subvolume", "list", "-o", data).strip().count("\n") == 0
    assert mounts_of_host() == mounts_before
    stored = archived_paths(second.archive)
    relative = str(data).lstrip("/")
    assert f"{relative}/payload/file-7" in stored
    assert f"{relative}/attachments/picture" in stored
    assert not any(".homesafe-snapshots" in path for path in stored)
    pair = restored_pair(second.archive, "notes", data, tmp_path / "restored")
    assert pair[0] == pair[1], pair
    stats = second.engine_stats
    assert stats is not None and stats.deduplicated_size < 1024 * 1024  # files cache hit
    stored_notes = stored_app(second.archive, "notes")
    assert stored_notes.strategy == "snapshot"
    assert stored_notes.downtime_seconds == pytest.approx(second.app("notes").downtime, abs=1e-5)


def test_clone_on_xfs_including_an_app_at_the_root_of_its_filesystem(
    xfs: LoopFilesystem,
    tmp_path: Path,
    daemon_factory: DaemonFactory,
    write_manifest: ManifestWriter,
) -> None:
    data = xfs.mount_point  # the whole filesystem: its clones' directory is inside it
    daemon = writing_app("wiki", data, daemon_factory, write_manifest)
    mounts_before = mounts_of_host()

    second = back_up_twice("wiki", "clone")

    assert daemon.is_running()
    assert not (data / ".homesafe-clones").exists()
    assert mounts_of_host() == mounts_before
    stored = archived_paths(second.archive)
    assert not any(".homesafe-clones" in path for path in stored)
    assert f"{str(data).lstrip('/')}/payload/file-3" in stored
    # Clones are new files each time: read again, deduplicated (nothing stored twice).
    stats = second.engine_stats
    assert stats is not None and stats.deduplicated_size < 1024 * 1024
    pair = restored_pair(second.archive, "wiki", data, tmp_path / "restored")
    assert pair[0] == pair[1], pair


def test_staged_copy_on_ext4_stops_only_for_the_last_pass(
    ext4: LoopFilesystem,
    tmp_path: Path,
    daemon_factory: DaemonFactory,
    write_manifest: ManifestWriter,
) -> None:
    data = ext4.mount_point / "chat"
    daemon = writing_app("chat", data, daemon_factory, write_manifest)

    result = api.backup_apps(["chat"])

    assert result.status == "ok", describe(result)
    chat = result.app("chat")
    assert chat.strategy == "staged"
    assert 0 < chat.downtime < result.duration
    assert daemon.is_running()
    assert list(locations.staging_directory().iterdir()) == []  # copies removed
    assert locations.staging_directory().stat().st_mode & 0o077 == 0
    pair = restored_pair(result.archive, "chat", data, tmp_path / "restored")
    assert pair[0] == pair[1], pair
    # A file changed behind its modification time (same size, time set back) is in the
    # next archive: copies are read again, not trusted by size and time.
    target = data / "payload" / "file-5"
    status = target.stat()
    with open(target, "r+b") as handle:
        handle.write(b"changed!")
    os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns))
    again = api.backup_apps(["chat"])
    assert again.status == "ok", describe(again)
    restored = tmp_path / "again"
    restored.mkdir()
    assert api.restore_apps(again.archive, ["chat"], target_root=restored).status == "ok"
    copy = restored / str(target).lstrip("/")
    assert copy.read_bytes()[:8] == b"changed!"


def test_short_staging_space_stops_for_the_run_and_says_so(
    ext4: LoopFilesystem,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    daemon_factory: DaemonFactory,
    write_manifest: ManifestWriter,
) -> None:
    with loop_filesystem(tmp_path / "small", "ext4", size="16M") as small:
        monkeypatch.setenv("HOMESAFE_STAGING", str(small.mount_point / "staging"))
        data = ext4.mount_point / "media"
        daemon = writing_app("media", data, daemon_factory, write_manifest)

        result = api.backup_apps(["media"])

        assert result.status == "ok", describe(result)
        media = result.app("media")
        assert media.strategy == "stop"
        assert any("not enough space to stage" in warning for warning in media.warnings)
        # Stopped for the archive run: the downtime covers the engine's whole run.
        assert result.engine_stats is not None
        assert media.downtime >= result.engine_stats.duration * 0.9
        assert daemon.is_running()
        assert stored_app(result.archive, "media").downtime_seconds is None
        # ... which `archives show` takes from the history of the backup, as the result
        # recorded it there: to the microsecond (AppResult.to_dict).
        from tests.integration.test_crash import homesafe

        shown = json.loads(homesafe("archives", "show", result.archive, "--json").stdout)
        assert shown["apps"][0]["downtime_seconds"] == round(media.downtime, 6)


def test_an_impossible_strategy_fails_the_app_before_it_is_touched(
    ext4: LoopFilesystem, daemon_factory: DaemonFactory, write_manifest: ManifestWriter
) -> None:
    data = ext4.mount_point / "photos"
    daemon = writing_app("photos", data, daemon_factory, write_manifest)

    result = api.backup_apps(["photos"], strategy="snapshot")

    assert result.status == "failed"
    error = result.app("photos").errors[0]
    assert error.error_type == "capture"
    assert "snapshot is impossible" in error.message and "ext4" in error.message
    assert daemon.calls() == ["start"]  # never stopped, never asked


def test_groups_are_held_still_one_at_a_time(
    btrfs: LoopFilesystem, daemon_factory: DaemonFactory, write_manifest: ManifestWriter
) -> None:
    """``site`` depends on ``database``: they are held still together (dependent first,
    restarted last); ``mail`` has nothing to do with them and keeps running while
    they are captured, and the other way round."""
    daemons = {}
    for app_id in ("database", "site", "mail"):
        path = btrfs.mount_point / app_id
        run("btrfs", "subvolume", "create", path)
        daemons[app_id] = daemon_factory(app_id)
        daemons[app_id].start()
    probe = btrfs.mount_point / "probe"

    def hook(app_id: str) -> str:
        # Which daemons run while this app is held still (exit status 0 = running).
        statuses = " ".join(
            f"{other}=$({' '.join(daemons[other].argv('status'))} >/dev/null; echo $?)"
            for other in daemons
        )
        return f'backup_pre = ["sh", "-c", "echo {app_id}: {statuses} >> {probe}"]'

    for app_id, depends in (("database", ""), ("site", 'depends = ["database"]'), ("mail", "")):
        text = (
            f'id = "{app_id}"\n{depends}\n[data]\n'
            f'directories = ["{btrfs.mount_point / app_id}"]\n'
            f"[hooks]\n{hook(app_id)}\n" + daemons[app_id].manifest_service(app_id)
        )
        write_manifest(app_id, text)

    result = api.backup_apps()

    assert result.status == "ok", describe(result)
    lines = sorted(probe.read_text().splitlines())
    assert lines == [
        "database: database=3 site=3 mail=0",
        "mail: database=0 site=0 mail=3",
        "site: database=3 site=3 mail=0",
    ]
    assert all(daemon.is_running() for daemon in daemons.values())
    assert {app.strategy for app in result.apps} == {"snapshot"}


@requires_program("restic")
def test_restic_reads_the_captured_copies_at_their_original_paths(
    btrfs: LoopFilesystem,
    tmp_path: Path,
    daemon_factory: DaemonFactory,
    write_manifest: ManifestWriter,
) -> None:
    passphrase = tmp_path / "restic-passphrase"
    passphrase.write_text("capture test passphrase\n")
    passphrase.chmod(0o600)
    repository = Repository(
        name="snaps",
        location=str(tmp_path / "restic-repository"),
        engine="restic",
        encryption="repokey",
        passphrase_file=passphrase,
        compression=DEFAULT_COMPRESSIONS["restic"],
    )
    run("restic", "init", "-q", "-r", repository.location, "--password-file", passphrase)
    data = btrfs.mount_point / "books"
    run("btrfs", "subvolume", "create", data)
    daemon = writing_app("books", data, daemon_factory, write_manifest)

    result = api.backup_apps(["books"], repository=repository)

    assert result.status == "ok", describe(result)
    assert result.app("books").strategy == "snapshot"
    assert daemon.is_running()
    stored = archived_paths(result.archive, repository)
    assert f"{str(data).lstrip('/')}/payload/file-2" in stored
    assert not any(".homesafe-snapshots" in path for path in stored)


@pytest.mark.parametrize("kind", ["btrfs", "xfs"])
def test_backup_killed_at_every_step_leaves_no_snapshot_clone_or_stopped_service(
    kind: str,
    tmp_path: Path,
    daemon_factory: DaemonFactory,
    write_manifest: ManifestWriter,
) -> None:
    """SIGKILL right after each journal record and right before each closing of a
    snapshot (btrfs) or clone (XFS) backup; `homesafe recover` must then delete every
    snapshot and clone and the directories made for them, and start the service."""
    from tests.integration.test_crash import count_steps, recover_json, run_killed

    with loop_filesystem(tmp_path / kind, kind) as filesystem:
        data = filesystem.mount_point / "vault"
        if kind == "btrfs":
            run("btrfs", "subvolume", "create", data)
        daemon = writing_app("vault", data, daemon_factory, write_manifest)
        records, closes, steps = count_steps(tmp_path, "backup")
        kinds = {line.split()[1] for line in steps if line.startswith("record ")}
        assert {"command" if kind == "btrfs" else "temporary_directory"} <= kinds, steps
        before = sorted(os.listdir(filesystem.mount_point))
        mounts_before = mounts_of_host()
        for mode, total in (("record", records), ("close", closes)):
            for kill_at in range(1, total + 1):
                completed, steps = run_killed(tmp_path, mode, kill_at, "backup")
                where = f"killed at {mode} {kill_at}: {steps}"
                assert completed.returncode < 0, where + completed.stderr

                report = recover_json()

                assert report["failed"] == 0, (where, report)
                assert daemon.is_running(), where
                assert sorted(os.listdir(filesystem.mount_point)) == before, where
                assert not (data / ".homesafe-snapshots").exists(), where
                assert mounts_of_host() == mounts_before, where
                if kind == "btrfs":
                    listed = run("btrfs", "subvolume", "list", filesystem.mount_point)
                    assert listed.strip().count("\n") == 0, (where, listed)


def test_the_last_staged_pass_copies_what_changed_during_the_first_behind_its_time(
    ext4: LoopFilesystem, homesafe_env: Path
) -> None:
    """A file rewritten while the first copy ran, with its size and modification time
    kept, is copied again by the last pass (rsync alone would take it for unchanged):
    the last pass goes by change time, which no program can set back."""
    from homesafe import journal
    from homesafe.consistency import capture

    data = ext4.mount_point / "ledger"
    data.mkdir()
    book = data / "book"
    book.write_bytes(b"before" * 1000)
    (data / "other").write_bytes(b"untouched")
    (data / "old" / "deep").mkdir(parents=True)
    (data / "old" / "deep" / "page").write_text("kept under a new name\n")
    (data / "doomed").mkdir()
    (data / "doomed" / "file").write_text("deleted during the first copy\n")
    (data / "private").write_text("mode changes\n")
    # Changes within a second before the first copy count as changed (the change-time
    # clock is coarse): let the set-up be older than that.
    time.sleep(capture.CHANGE_TIME_MARGIN_NS / 1e9 + 0.1)
    plan = capture.AppCapturePlan("ledger", "staged", [capture.PathPlan(str(data), "staged")])
    with journal.operation("test"), capture.Captures("run") as captures:
        captures.prepare(plan)  # the first copy, "while the app runs"
        status = book.stat()
        book.write_bytes(b"after!" * 1000)
        os.utime(book, ns=(status.st_atime_ns, status.st_mtime_ns))
        (data / "old").rename(data / "new")
        shutil.rmtree(data / "doomed")
        (data / "fresh").write_text("made during the first copy\n")
        (data / "private").chmod(0o600)
        captures.capture(plan)  # the last pass, "quiesced"
        (copy, original) = captures.binds[0]
        assert original == str(data)
        assert (Path(copy) / "book").read_bytes() == b"after!" * 1000
        assert (Path(copy) / "book").stat().st_mtime_ns == status.st_mtime_ns
        assert tree_of(Path(copy)) == tree_of(data)
    assert not Path(copy).exists()  # removed with the captures


def test_an_lvm_thin_snapshot_is_mounted_read_only_and_removed(
    ext4: LoopFilesystem,
    tmp_path: Path,
    daemon_factory: DaemonFactory,
    write_manifest: ManifestWriter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An app on a filesystem on an LVM thin volume is captured by a snapshot of the
    volume, mounted read-only while the app is held still and read at the app's paths.

    LVM cannot run here (no device-mapper in this kernel), so two things stand in for
    it, and only they: the lookup says the ext4 loop device is a thin volume, and
    "lvcreate" is a block-level copy of the device taken with the filesystem frozen
    (which is what LVM does), attached to a loop device of its own; "lvremove" detaches
    it. The mount, the view, the journal and the clean-up are homesafe's, for real.
    """
    from homesafe.consistency import snapshots as primitives

    thin = primitives.LogicalVolume("vgtest", "data", "pool0", "Vwi-aotz--", ext4.device)
    copies: dict[str, tuple[str, Path]] = {}  # snapshot name -> (loop device, image)

    def take(volume: primitives.LogicalVolume, name: str) -> primitives.LogicalVolume:
        assert volume == thin
        image = tmp_path / f"{name}.img"
        run("fsfreeze", "--freeze", ext4.mount_point)
        try:
            run("cp", "--sparse=always", ext4.directory / "image", image)
        finally:
            run("fsfreeze", "--unfreeze", ext4.mount_point)
        device = run("losetup", "--find", "--show", image).strip()
        copies[name] = (device, image)
        return primitives.LogicalVolume("vgtest", name, "pool0", "Vwi-a-tz--", device)

    def delete(volume: primitives.LogicalVolume) -> None:
        device, image = copies.pop(volume.name)
        run("losetup", "--detach", device)
        image.unlink()

    monkeypatch.setattr(primitives, "thin_volume_of", lambda path: thin)
    monkeypatch.setattr(primitives, "take_lvm_snapshot", take)
    monkeypatch.setattr(primitives, "delete_lvm_snapshot", delete)
    data = ext4.mount_point / "chat"
    daemon = writing_app("chat", data, daemon_factory, write_manifest)
    mounts_before = mounts_of_host()

    second = back_up_twice("chat", "snapshot")

    assert daemon.is_running()
    assert copies == {}  # every snapshot removed
    assert mounts_of_host() == mounts_before
    assert list((locations.home() / "mnt").iterdir()) == []
    stored = archived_paths(second.archive)
    assert f"{str(data).lstrip('/')}/payload/file-7" in stored
    pair = restored_pair(second.archive, "chat", data, tmp_path / "restored")
    assert pair[0] == pair[1], pair
    assert stored_app(second.archive, "chat").strategy == "snapshot"


def acl_granting_read_to(uid: int) -> bytes:
    """A POSIX access ACL in the kernel's xattr form: owner rw, user ``uid`` r, group r,
    mask r, others nothing."""
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 4, uid), (0x04, 4, 0xFFFFFFFF)]
    entries += [(0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)]
    return (2).to_bytes(4, "little") + b"".join(
        tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + who.to_bytes(4, "little")
        for tag, perm, who in entries
    )


def full_tree_of(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path below ``root`` with what ``rsync -aHAX`` keeps: type and mode, owner,
    modification time (not of symlinks), extended attributes, contents or target."""
    found: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        status = path.lstat()
        if path.is_symlink():
            found[str(path.relative_to(root))] = (status.st_mode, os.readlink(path))
            continue
        attributes = sorted((name, os.getxattr(path, name)) for name in os.listxattr(path))
        content = path.read_bytes() if path.is_file() else b""
        found[str(path.relative_to(root))] = (
            status.st_mode,
            status.st_uid,
            status.st_gid,
            status.st_mtime_ns,
            status.st_nlink if path.is_file() else 0,
            tuple(attributes),
            content,
        )
    return found


def rsync_copy(source: Path, destination: Path) -> None:
    from homesafe import execute
    from homesafe.consistency import capture

    execute.run(capture._rsync_argv(str(source), destination))


def test_the_quiesced_pass_copies_simple_changes_itself_as_rsync_would(
    ext4: LoopFilesystem,
) -> None:
    """Rewritten, shrunk, grown and new files, a deleted file and a deleted symlink,
    changes of mode, owner, extended attributes and ACL: copied without rsync, and the
    copy ends equal to the source in all that ``rsync -aHAX`` keeps."""
    from homesafe.consistency import capture

    source = ext4.mount_point / "app"
    (source / "db").mkdir(parents=True)
    (source / "keep").mkdir()
    (source / "keep" / "x").write_bytes(b"unchanged")
    for name, size in (("a", 65536), ("b", 300_000), ("c", 10)):
        (source / "db" / name).write_bytes(os.urandom(size))
    os.setxattr(source / "db" / "a", "user.old", b"to be removed")
    (source / "gone").write_text("deleted later\n")
    (source / "link").symlink_to("db/a")
    copy = ext4.mount_point / "copy"
    rsync_copy(source, copy)
    # As the last pass counts: from a margin before, the change-time clock being coarse.
    time.sleep(capture.CHANGE_TIME_MARGIN_NS / 1e9 + 0.1)
    since = time.time_ns() - capture.CHANGE_TIME_MARGIN_NS

    with open(source / "db" / "a", "r+b") as handle:
        handle.write(b"rewritten page")
    os.removexattr(source / "db" / "a", "user.old")
    (source / "db" / "b").write_bytes(b"shrunk")
    (source / "db" / "c").write_bytes(os.urandom(200_000))
    os.chown(source / "db" / "c", 1234, 5678)
    (source / "db" / "c").chmod(0o640)
    os.setxattr(source / "db" / "c", "user.tag", b"value")
    os.setxattr(source / "db" / "c", "system.posix_acl_access", acl_granting_read_to(4321))
    (source / "db" / "new").write_bytes(b"made while held still")
    (source / "gone").unlink()
    (source / "link").unlink()
    (source / "keep").chmod(0o700)

    changed = capture.changed_since(str(source), copy, since)
    assert {"db/a", "db/b", "db/c", "db/new", "gone", "link", "keep"} <= set(changed)
    assert "keep/x" not in changed
    assert capture.copy_in_place(str(source), copy, changed)

    assert full_tree_of(copy) == full_tree_of(source)
    acl = os.getxattr(copy / "db" / "c", "system.posix_acl_access")
    assert acl == acl_granting_read_to(4321)


@pytest.mark.parametrize("change", ["hard link", "new directory", "symlink", "file to directory"])
def test_the_quiesced_pass_leaves_what_is_not_simple_to_rsync(
    ext4: LoopFilesystem, change: str
) -> None:
    """Anything but plain files and existing directories is rsync's: the in-place copy
    says no and changes nothing, and rsync then brings the copy up to date."""
    from homesafe.consistency import capture

    source = ext4.mount_point / "app"
    source.mkdir()
    (source / "file").write_bytes(b"one")
    (source / "other").write_bytes(b"two")
    (source / "link").symlink_to("file")
    copy = ext4.mount_point / "copy"
    rsync_copy(source, copy)
    # As the last pass counts: from a margin before, the change-time clock being coarse.
    time.sleep(capture.CHANGE_TIME_MARGIN_NS / 1e9 + 0.1)
    since = time.time_ns() - capture.CHANGE_TIME_MARGIN_NS
    before = full_tree_of(copy)
    if change == "hard link":
        os.link(source / "file", source / "twin")
    elif change == "new directory":
        (source / "fresh" / "deep").mkdir(parents=True)
        (source / "other").write_bytes(b"changed too")
    elif change == "symlink":
        (source / "link").unlink()
        (source / "link").symlink_to("other")
    else:
        (source / "file").unlink()
        (source / "file").mkdir()

    changed = capture.changed_since(str(source), copy, since)
    assert changed
    assert not capture.copy_in_place(str(source), copy, changed)
    assert full_tree_of(copy) == before
    with capture.Captures("run") as captures:
        captures._bring_up_to_date(str(source), copy, since + capture.CHANGE_TIME_MARGIN_NS)
    assert full_tree_of(copy) == full_tree_of(source)


def tree_of(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path below ``root`` with its mode and (files) contents."""
    found = {}
    for path in root.rglob("*"):
        content = path.read_bytes() if path.is_file() else b""
        found[str(path.relative_to(root))] = (path.lstat().st_mode, content)
    return found


def test_a_capture_that_fails_fails_its_app_only_and_resumes_it(
    btrfs: LoopFilesystem, daemon_factory: DaemonFactory, write_manifest: ManifestWriter
) -> None:
    broken = btrfs.mount_point / "broken"
    run("btrfs", "subvolume", "create", broken)
    (broken / ".homesafe-snapshots").write_text("a file where snapshots would go\n")
    fine = btrfs.mount_point / "fine"
    run("btrfs", "subvolume", "create", fine)
    broken_daemon = writing_app("broken", broken, daemon_factory, write_manifest)
    fine_daemon = writing_app("fine", fine, daemon_factory, write_manifest)

    result = api.backup_apps()

    assert result.status == "partial", describe(result)
    failure = result.app("broken").errors[0]
    assert failure.error_type == "capture" and "snapshot failed" in failure.message
    assert result.app("fine").status == "ok" and result.app("fine").strategy == "snapshot"
    assert broken_daemon.is_running() and fine_daemon.is_running()
    assert (broken / ".homesafe-snapshots").read_text().startswith("a file")
    assert run("btrfs", "subvolume", "list", "-o", btrfs.mount_point).count("\n") == 2
    assert journal_files() == []


def journal_files() -> list[str]:
    directory = locations.home() / "journal"
    return sorted(os.listdir(directory)) if directory.is_dir() else []
