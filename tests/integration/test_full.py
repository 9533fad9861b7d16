"""Full-system backup and restore on a real btrfs (a loop device; root only).

The stand-in for ``/`` is the subvolume ``@root``, the default subvolume of a fresh
btrfs, mounted with ``subvol=@root`` as a real root is; the top level is not mounted,
so a restore has to reach it by itself. A writer keeps committing a pair of files while
the backup runs: the restored pair must be one state the writer actually left.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from homesafe import api, archives, full, journal, locations
from homesafe.consistency import snapshots
from homesafe.engines import engine_for
from homesafe.errors import UsageError
from homesafe.repositories import default_repository
from tests.conftest import ManifestWriter, requires_program
from tests.support.btrfs import LoopFilesystem, loop_filesystem, run

# Loop devices and mounts need root; CI runs as root, so these run there.
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices and mounts")
pytestmark = [ROOT_ONLY, requires_program("mkfs.btrfs"), requires_program("borg")]

HOMESAFE = Path(sys.executable).parent / "homesafe"
# Directories whose contents the comparison leaves aside: the writer's pair (checked on
# its own), what the system excludes leave out, and the nested subvolume.
NOT_COMPARED = ("var/lib/app", "tmp", "run", "srv-data")


@dataclass
class System:
    disk: LoopFilesystem
    root: Path  # where @root is mounted: the stand-in for /
    root_id: int


def _populate(root: Path) -> None:
    """A small system: modes, owners, setuid, symlinks, an xattr, fstab, tmp, run."""
    for directory in ("etc", "usr/bin", "home/alice", "var/lib/app", "dev", "proc", "sys"):
        (root / directory).mkdir(parents=True)
    (root / "etc" / "hostname").write_text("homesafe-test\n")
    (root / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc" / "shadow").chmod(0o640)
    os.chown(root / "etc" / "shadow", 0, 42)
    (root / "etc" / "fstab").write_text(
        "# <file system> <mount point> <type> <options> <dump> <pass>\n"
        "UUID=0000-test / btrfs defaults,subvol=@root 0 0\n"
    )
    (root / "home" / "alice").chmod(0o750)
    os.chown(root / "home" / "alice", 1234, 1234)
    (root / "home" / "alice" / "notes.txt").write_text("alice's notes\n")
    (root / "home" / "alice" / "notes.txt").chmod(0o600)
    os.chown(root / "home" / "alice" / "notes.txt", 1234, 1234)
    os.setxattr(root / "home" / "alice" / "notes.txt", "user.homesafe", b"kept")
    (root / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (root / "usr" / "bin" / "tool").chmod(0o4755)
    (root / "bin").symlink_to("usr/bin")
    (root / "etc" / "localtime").symlink_to("/usr/share/zoneinfo/Nowhere")  # dangling
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    (root / "tmp" / "scratch").write_text("left out\n")
    (root / "run").mkdir()
    (root / "run" / "stale.pid").write_text("123\n")


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Type, mode, owners, xattrs and content (or link target) of every path below
    ``root`` (itself as "."), the contents of NOT_COMPARED left out."""
    found: dict[str, tuple[object, ...]] = {}
    for directory, subdirectories, files in os.walk(root):
        relative_directory = os.path.relpath(directory, root)
        if relative_directory in NOT_COMPARED:
            subdirectories[:] = []
            files = []
        for name in [".", *subdirectories, *files]:
            path = Path(directory, name)
            relative = os.path.normpath(os.path.join(relative_directory, name))
            if name == "." and relative != ".":
                continue
            status = os.lstat(path)
            if stat.S_ISLNK(status.st_mode):
                content: object = os.readlink(path)
            elif stat.S_ISREG(status.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = None
            xattrs = {
                key: os.getxattr(path, key, follow_symlinks=False)
                for key in os.listxattr(path, follow_symlinks=False)
            }
            found[relative] = (
                stat.S_IFMT(status.st_mode),
                stat.S_IMODE(status.st_mode),
                status.st_uid,
                status.st_gid,
                content,
                xattrs,
            )
    return found


class PairWriter:
    """Commits ``a`` then ``b`` (write, fsync, rename) with a growing counter, as an
    application commits its state: at any instant a == b or a == b + 1."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _commit(self, name: str, value: int) -> None:
        temporary = self.directory / f".{name}.tmp"
        with open(temporary, "w") as stream:
            stream.write(f"{value}\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, self.directory / name)

    def _run(self) -> None:
        while not self.stopping.is_set():
            value = self.count + 1
            self._commit("a", value)
            self._commit("b", value)
            self.count = value

    def __enter__(self) -> PairWriter:
        self._commit("a", 0)
        self._commit("b", 0)
        self.thread.start()
        while self.count < 3:
            self.stopping.wait(0.01)
        return self

    def __exit__(self, *exception: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)


@pytest.fixture
def system(tmp_path: Path, homesafe_env: Path) -> Iterator[System]:
    with loop_filesystem(tmp_path / "disk", "btrfs") as disk:
        top = disk.mount_point
        run("btrfs", "subvolume", "create", top / "@root")
        _populate(top / "@root")
        run("btrfs", "subvolume", "create", top / "@root" / "srv-data")
        (top / "@root" / "srv-data" / "big.db").write_text("in a nested subvolume\n")
        root_id = snapshots.subvolume_at(top / "@root").id
        run("btrfs", "subvolume", "set-default", str(root_id), top)
        root = disk.mount(disk.directory / "root", ["subvol=@root"])
        disk.unmount(top)
        yield System(disk, root, root_id)


def _nothing_left_open(system: System) -> None:
    """No journal entry open, no mount of the disk but the root, no mount point left."""
    assert not list(journal.directory().glob("*.jsonl"))
    mounted = [m.mount_point for m in snapshots.read_mounts() if m.source == system.disk.device]
    assert mounted == [str(system.root)]
    assert not list((locations.home() / "mnt").glob("*"))


def _listed(system: System) -> list[tuple[int, str]]:
    """(id, name) of every subvolume of the filesystem. btrfs prints paths relative to
    the top level or to the mounted subvolume, depending: compare base names."""
    listed = snapshots.parse_subvolume_list(run("btrfs", "subvolume", "list", system.root))
    return [(number, os.path.basename(path)) for number, path in listed]


def test_full_backup_and_restore_into_a_new_default_subvolume(system: System) -> None:
    expected = _tree(system.root)
    with PairWriter(system.root / "var" / "lib" / "app") as writer:
        before = writer.count
        result = api.backup_full(
            system.root, excludes=full.SYSTEM_EXCLUDES, comment="before the upgrade"
        )
        after = writer.count
    assert isinstance(result, full.FullSystemResult)
    assert result.status == "ok", result.to_dict()
    assert result.subvolume_id == system.root_id and result.subvolume_name == "@root"
    # The snapshot was read, then deleted.
    assert result.snapshot.startswith(str(system.root / ".homesafe-snapshots"))
    assert not (system.root / ".homesafe-snapshots").exists()
    assert sorted(name for _, name in _listed(system)) == ["@root", "srv-data"]
    assert any("srv-data" in item for item in result.not_included)
    assert f"{system.root}/tmp/*" in result.excluded
    summary = archives.parse_comment(
        engine_for("borg").list_archives(default_repository())[-1].comment
    )
    assert (summary.scope, summary.comment, summary.apps) == ("full", "before the upgrade", [])
    description, contents = api.read_archive(result.archive)
    assert description.metadata["scope"] == "full"
    assert description.metadata["full_system"]["subvolume_id"] == system.root_id
    paths = {entry.path for entry in contents}
    assert {"etc/hostname", "home/alice/notes.txt", "bin", "tmp", "srv-data"} <= paths
    assert "tmp/scratch" not in paths and "run/stale.pid" not in paths
    assert not list(journal.directory().glob("*.jsonl"))

    # The running system moves on after the backup.
    (system.root / "etc" / "after-backup").write_text("newer than the archive\n")
    (system.root / "etc" / "hostname").write_text("changed\n")

    restored = api.restore_full(result.archive, mount_point=system.root)
    assert isinstance(restored, full.FullSystemResult)
    assert restored.status == "ok", restored.to_dict()
    new_id = restored.new_subvolume_id
    assert new_id is not None and restored.new_subvolume.startswith("@root.restored-")
    assert restored.previous_default_id == system.root_id
    assert run("btrfs", "subvolume", "get-default", system.root).startswith(f"ID {new_id} ")
    # The old subvolume is kept, and what is mounted is untouched.
    assert (system.root_id, "@root") in _listed(system)
    assert (new_id, restored.new_subvolume) in _listed(system)
    assert (system.root / "etc" / "after-backup").exists()
    # The top level was mounted for the restore only; the journal is closed.
    _nothing_left_open(system)
    assert any("fstab" in warning and "subvol=@root" in warning for warning in restored.warnings)
    assert any("srv-data" in note for note in restored.notes)
    assert restored.rollback == [
        "btrfs", "subvolume", "set-default", str(system.root_id), str(system.root),
    ]  # fmt: skip

    # A fresh mount that names no subvolume shows the restored system.
    fresh = system.disk.mount(system.disk.directory / "fresh")
    assert _tree(fresh) == expected
    assert (fresh / "etc" / "hostname").read_text() == "homesafe-test\n"
    assert not (fresh / "etc" / "after-backup").exists()
    assert not (fresh / ".homesafe").exists()
    assert not (fresh / ".homesafe-snapshots").exists()
    assert (
        list((fresh / "tmp").iterdir()) == [] and (fresh / "tmp").stat().st_mode & 0o7777 == 0o1777
    )
    assert list((fresh / "run").iterdir()) == []
    assert list((fresh / "srv-data").iterdir()) == []  # nested: not in the archive
    # The writer's pair is one state it committed while the backup ran.
    app = fresh / "var" / "lib" / "app"
    a, b = int((app / "a").read_text()), int((app / "b").read_text())
    assert a in (b, b + 1), (a, b)
    assert before <= b and a <= after
    system.disk.unmount(fresh)

    # Switching back: the next mount shows the old system again.
    subprocess.run(restored.rollback, check=True)
    again = system.disk.mount(system.disk.directory / "again")
    assert (again / "etc" / "after-backup").exists()


def test_failed_backup_still_deletes_its_snapshot(system: System) -> None:
    first = api.backup_full(system.root, archive_name="nightly")
    assert first.status == "ok", first.to_dict()
    second = api.backup_full(system.root, archive_name="nightly")
    assert second.status == "failed" and second.exit_code == 1
    assert [error.error_type for error in second.errors] == ["engine"]
    assert "already exists" in second.errors[0].message
    assert second.snapshot and not os.path.lexists(second.snapshot)
    assert not (system.root / ".homesafe-snapshots").exists()
    assert sorted(name for _, name in _listed(system)) == ["@root", "srv-data"]
    assert not list(journal.directory().glob("*.jsonl"))


def _fill(directory: Path, leave: int) -> None:
    """Write to ``directory`` until its filesystem is full, then free ``leave`` bytes."""
    filler = directory / "filler"
    chunk = b"\0" * (4 * 1024 * 1024)
    with open(filler, "wb") as stream:
        try:
            while True:
                stream.write(chunk)
                stream.flush()
                os.fsync(stream.fileno())
        except OSError:
            pass
    with open(filler, "r+b") as stream:
        stream.truncate(max(0, filler.stat().st_size - leave))
        os.fsync(stream.fileno())
    os.sync()


def test_failed_restore_removes_the_new_subvolume_and_keeps_the_default(
    system: System,
) -> None:
    (system.root / "var" / "lib" / "app" / "data.bin").write_bytes(os.urandom(96 * 1024 * 1024))
    backup = api.backup_full(system.root)
    assert backup.status == "ok", backup.to_dict()
    _fill(system.root, leave=24 * 1024 * 1024)

    # Past the free-space check (as for a compressed filesystem), into a full disk.
    restored = api.restore_full(
        backup.archive, mount_point=system.root, subvolume_name="@new", check_space=False
    )
    assert restored.status == "failed" and restored.exit_code == 1
    assert "incomplete" in restored.errors[0].message or "No space" in restored.errors[0].message
    assert restored.new_subvolume_id is None
    assert snapshots.default_subvolume_id(system.root) == system.root_id
    assert "@new" not in [name for _, name in _listed(system)]
    _nothing_left_open(system)


def test_restore_larger_than_the_free_space_is_refused_before_anything(system: System) -> None:
    from homesafe.restore import InsufficientSpaceError

    (system.root / "var" / "lib" / "app" / "data.bin").write_bytes(os.urandom(96 * 1024 * 1024))
    backup = api.backup_full(system.root)
    assert backup.status == "ok", backup.to_dict()
    _fill(system.root, leave=48 * 1024 * 1024)
    subvolumes_before = _listed(system)

    with pytest.raises(InsufficientSpaceError, match="not enough space") as refused:
        api.restore_full(backup.archive, mount_point=system.root, subvolume_name="@new")

    assert "Nothing was changed" in refused.value.message
    assert "--no-space-check" in (refused.value.hint or "")
    assert _listed(system) == subvolumes_before
    assert snapshots.default_subvolume_id(system.root) == system.root_id
    _nothing_left_open(system)


def test_restore_refuses_an_app_archive_and_changes_nothing(
    system: System, homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    data = homesafe_env / "notes-data"
    data.mkdir()
    (data / "note.txt").write_text("a note\n")
    write_manifest("notes", f'id = "notes"\n[data]\ndirectories = ["{data}"]\n')
    app_archive = api.backup_apps(["notes"])
    assert app_archive.status == "ok"
    with pytest.raises(UsageError, match="not a full-system archive"):
        api.restore_full(app_archive.archive, mount_point=system.root)
    assert sorted(name for _, name in _listed(system)) == ["@root", "srv-data"]
    assert snapshots.default_subvolume_id(system.root) == system.root_id


def test_paths_that_are_not_subvolumes_are_refused_before_anything(
    system: System, tmp_path: Path
) -> None:
    with pytest.raises(snapshots.NotASubvolumeError):
        api.backup_full(system.root / "etc")
    with pytest.raises(snapshots.NotOnBtrfsError):
        api.backup_full(tmp_path)
    with pytest.raises(snapshots.NotASubvolumeError):
        api.restore_full("anything", mount_point=system.root / "home")
    # Not even the default repository was created.
    assert not Path(default_repository().location).exists()
    assert not (system.root / ".homesafe-snapshots").exists()


def test_command_line_full_backup_and_restore(system: System) -> None:
    environment = dict(os.environ)
    backup = subprocess.run(
        [HOMESAFE, "full", "backup", "--subvolume", system.root, "--json"],
        capture_output=True, text=True, env=environment, check=False,
    )  # fmt: skip
    assert backup.returncode == 0, backup.stderr
    document = json.loads(backup.stdout)
    assert document["scope"] == "full" and document["status"] == "ok"
    assert document["full_system"]["subvolume"] == str(system.root)
    # With the top level mounted, the restore creates the new subvolume through that mount.
    top = system.disk.mount(system.disk.directory / "top", ["subvolid=5"])
    restore = subprocess.run(
        [HOMESAFE, "full", "restore", document["archive"], "--mount-point", system.root,
         "--subvolume-name", "@restored"],
        capture_output=True, text=True, env=environment, check=False,
    )  # fmt: skip
    assert restore.returncode == 0, restore.stderr
    assert "To switch back: btrfs subvolume set-default" in restore.stdout
    assert f"created through the mount at {top}" in restore.stdout
    assert (top / "@restored" / "etc" / "hostname").read_text() == "homesafe-test\n"
    new_id = dict((name, number) for number, name in _listed(system))["@restored"]
    assert snapshots.default_subvolume_id(system.root) == new_id
    refused = subprocess.run(
        [HOMESAFE, "full", "backup", "--subvolume", system.root / "etc"],
        capture_output=True, text=True, env=environment, check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "is not a btrfs subvolume" in refused.stderr


# Dies with SIGKILL at the first progress report, while borg reads the snapshot or
# writes the new subvolume.
KILLED_MID_OPERATION = """
import os, signal, sys
from homesafe import api

def die(progress):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[1] == "backup":
    api.backup_full(sys.argv[2], archive_name=sys.argv[3], on_progress=die)
else:
    api.restore_full(sys.argv[3], mount_point=sys.argv[2], subvolume_name="@new", on_progress=die)
"""


def _wait_until_unused(path: Path) -> None:
    """Wait for the borg the killed homesafe left to go (it dies on its closed pipes)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        users = []
        for process in Path("/proc").iterdir():
            try:
                cwd = os.readlink(process / "cwd")
            except OSError:
                continue
            if cwd == str(path) or cwd.startswith(str(path) + "/"):
                users.append(process.name)
        if not users:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes still work in {path}: {users}")


def test_recovery_after_sigkill_removes_snapshot_mount_and_half_restore(system: System) -> None:
    (system.root / "var" / "lib" / "app" / "data.bin").write_bytes(os.urandom(32 * 1024 * 1024))
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_OPERATION, "backup", system.root, "killed"],
        env=dict(os.environ), capture_output=True, check=False,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = system.root / ".homesafe-snapshots" / "killed"
    assert snapshots.is_subvolume(left)
    _wait_until_unused(left)
    recovered = subprocess.run([HOMESAFE, "recover"], capture_output=True, text=True, check=False)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert f"delete the snapshot {left}" in recovered.stdout
    assert not left.exists()
    assert not left.parent.exists()  # the directory made for it too
    assert sorted(name for _, name in _listed(system)) == ["@root", "srv-data"]
    assert not list(journal.directory().glob("*.jsonl"))

    backup = api.backup_full(system.root)
    assert backup.status == "ok", backup.to_dict()
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_OPERATION, "restore", system.root, backup.archive],
        env=dict(os.environ), capture_output=True, check=False,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "@new" in [name for _, name in _listed(system)]
    (mount_point,) = (locations.home() / "mnt").iterdir()
    _wait_until_unused(mount_point)
    recovered = subprocess.run([HOMESAFE, "recover"], capture_output=True, text=True, check=False)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert "delete the half-restored subvolume" in recovered.stdout
    assert f"unmount {mount_point}" in recovered.stdout
    assert not mount_point.exists()  # the directory made for the mount too
    assert "@new" not in [name for _, name in _listed(system)]
    assert snapshots.default_subvolume_id(system.root) == system.root_id
    assert not list(journal.directory().glob("*.jsonl"))
    mounted = [m.mount_point for m in snapshots.read_mounts() if m.source == system.disk.device]
    assert mounted == [str(system.root)]
