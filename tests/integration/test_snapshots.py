"""The snapshot and clone primitives on real filesystems: btrfs and XFS on loop devices,
and the ext4 of the temp directory (root only: loop devices and mounts)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from homesafe.consistency import snapshots
from tests.conftest import requires_program
from tests.support.btrfs import LoopFilesystem, loop_filesystem, run

# Loop devices and mounts need root; CI runs as root, so these run there.
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices and mounts")
pytestmark = [ROOT_ONLY, requires_program("mkfs.btrfs")]


@pytest.fixture
def btrfs(tmp_path: Path) -> Iterator[LoopFilesystem]:
    """A btrfs with the subvolume ``data`` (files, a symlink, a nested subvolume)."""
    with loop_filesystem(tmp_path / "btrfs", "btrfs") as filesystem:
        data = filesystem.mount_point / "data"
        run("btrfs", "subvolume", "create", data)
        (data / "dir").mkdir()
        (data / "dir" / "file.txt").write_text("hello\n")
        (data / "dir" / "file.txt").chmod(0o640)
        os.chown(data / "dir" / "file.txt", 1234, 4321)
        (data / "link").symlink_to("dir/file.txt")
        run("btrfs", "subvolume", "create", data / "nested")
        (data / "nested" / "inner.txt").write_text("inner\n")
        yield filesystem


def test_filesystem_type_reads_the_mount_table(btrfs: LoopFilesystem, tmp_path: Path) -> None:
    assert snapshots.filesystem_type(btrfs.mount_point / "data" / "dir") == "btrfs"
    expected = run("findmnt", "--noheadings", "--output", "FSTYPE", "--target", tmp_path)
    assert snapshots.filesystem_type(tmp_path) == expected.strip()
    assert snapshots.snapshots_available(btrfs.mount_point / "data")
    assert not snapshots.snapshots_available(tmp_path)
    assert snapshots.same_filesystem(btrfs.mount_point, btrfs.mount_point / "data" / "nested")
    assert not snapshots.same_filesystem(btrfs.mount_point, tmp_path)


def test_subvolume_of_finds_the_subvolume_holding_a_path(btrfs: LoopFilesystem) -> None:
    data = btrfs.mount_point / "data"
    holder = snapshots.subvolume_of(data / "dir" / "file.txt")
    assert holder.path == data
    assert holder.name == "data"
    assert holder.parent_id == snapshots.BTRFS_TOP_LEVEL_ID
    assert not holder.read_only
    assert holder.mount.mount_point == str(btrfs.mount_point)
    nested = snapshots.subvolume_of(data / "nested" / "inner.txt")
    assert (nested.path, nested.name, nested.parent_id) == (
        data / "nested",
        "data/nested",
        holder.id,
    )
    top = snapshots.subvolume_at(btrfs.mount_point)
    assert top.is_top_level and top.name == ""
    # A subvolume mounted on its own is found through that mount.
    mounted = btrfs.mount(btrfs.directory / "data-mount", ["subvol=data"])
    assert snapshots.subvolume_of(mounted / "dir").id == holder.id
    assert snapshots.subvolume_at(mounted).path == mounted


def test_paths_that_are_not_subvolumes_are_refused(btrfs: LoopFilesystem, tmp_path: Path) -> None:
    with pytest.raises(snapshots.NotASubvolumeError, match="not a btrfs subvolume"):
        snapshots.subvolume_at(btrfs.mount_point / "data" / "dir")
    with pytest.raises(snapshots.NotOnBtrfsError, match="not btrfs"):
        snapshots.subvolume_of(tmp_path)
    assert not snapshots.is_subvolume(btrfs.mount_point / "data" / "dir")
    with pytest.raises(snapshots.NotASubvolumeError, match="will not delete"):
        snapshots.delete_subvolume(btrfs.mount_point / "data" / "dir")
    assert (btrfs.mount_point / "data" / "dir" / "file.txt").exists()


def test_read_only_snapshot_is_a_frozen_copy_deleted_on_request(btrfs: LoopFilesystem) -> None:
    data = btrfs.mount_point / "data"
    into = btrfs.mount_point / "snapshots"
    into.mkdir()
    taken = snapshots.take_snapshot(data, into, "first")
    assert taken.path == into / "first" and taken.read_only and taken.name == "snapshots/first"
    (data / "dir" / "file.txt").write_text("changed\n")
    assert (taken.path / "dir" / "file.txt").read_text() == "hello\n"
    copied = os.lstat(taken.path / "dir" / "file.txt")
    assert (copied.st_mode & 0o7777, copied.st_uid, copied.st_gid) == (0o640, 1234, 4321)
    assert os.readlink(taken.path / "link") == "dir/file.txt"
    # A nested subvolume is not in the snapshot: an empty directory stands in its place.
    assert list((taken.path / "nested").iterdir()) == []
    with pytest.raises(OSError) as refused:
        (taken.path / "new.txt").write_text("no")
    assert refused.value.errno == errno.EROFS
    with pytest.raises(snapshots.SnapshotError, match="exists"):
        snapshots.take_snapshot(data, into, "first")
    snapshots.delete_subvolume(taken.path)
    assert not taken.path.exists()


def test_snapshot_context_removes_the_snapshot_when_the_block_fails(
    btrfs: LoopFilesystem,
) -> None:
    data = btrfs.mount_point / "data"
    with pytest.raises(RuntimeError), snapshots.snapshot(data, btrfs.mount_point, "held") as held:
        assert (held.path / "dir" / "file.txt").read_text() == "hello\n"
        raise RuntimeError("the capture failed")
    assert not (btrfs.mount_point / "held").exists()
    listed = run("btrfs", "subvolume", "list", btrfs.mount_point)
    assert "held" not in listed


def test_snapshot_must_stay_on_the_filesystem(btrfs: LoopFilesystem, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(snapshots.NotOnBtrfsError):
        snapshots.take_snapshot(btrfs.mount_point / "data", elsewhere, "snap")
    assert list(elsewhere.iterdir()) == []


def test_writable_snapshot_made_read_only_afterwards(btrfs: LoopFilesystem) -> None:
    taken = snapshots.take_snapshot(
        btrfs.mount_point / "data", btrfs.mount_point, "work", read_only=False
    )
    assert not taken.read_only
    (taken.path / "added.txt").write_text("written before it froze\n")
    snapshots.set_read_only(taken.path)
    assert snapshots.subvolume_at(taken.path).read_only
    with pytest.raises(OSError):
        (taken.path / "later.txt").write_text("no")
    snapshots.set_read_only(taken.path, False)
    (taken.path / "later.txt").write_text("yes")
    snapshots.delete_subvolume(taken.path)


def test_new_subvolume_becomes_the_default(btrfs: LoopFilesystem) -> None:
    assert snapshots.default_subvolume_id(btrfs.mount_point) == snapshots.BTRFS_TOP_LEVEL_ID
    created = snapshots.create_subvolume(btrfs.mount_point / "fresh")
    assert created.name == "fresh" and snapshots.is_subvolume(created.path)
    assert list(created.path.iterdir()) == []
    (created.path / "marker").write_text("fresh\n")
    snapshots.set_default_subvolume(created.id, btrfs.mount_point)
    assert snapshots.default_subvolume_id(btrfs.mount_point) == created.id
    shown = run("btrfs", "subvolume", "get-default", btrfs.mount_point)
    assert shown.startswith(f"ID {created.id} ")
    # A mount that names no subvolume now shows the new one.
    plain = btrfs.mount(btrfs.directory / "plain")
    assert (plain / "marker").read_text() == "fresh\n"
    btrfs.unmount(plain)
    with pytest.raises(snapshots.SnapshotError, match="exists"):
        snapshots.create_subvolume(btrfs.mount_point / "fresh")


def test_nested_subvolumes_are_listed_relative_to_their_parent(btrfs: LoopFilesystem) -> None:
    data = snapshots.subvolume_at(btrfs.mount_point / "data")
    assert snapshots.nested_subvolumes(data) == ["nested"]
    top = snapshots.subvolume_at(btrfs.mount_point)
    assert snapshots.nested_subvolumes(top) == ["data"]


def test_temporary_mount_of_the_top_level_is_removed(btrfs: LoopFilesystem) -> None:
    target = btrfs.directory / "top"
    target.mkdir()
    with snapshots.temporary_mount(
        btrfs.device, target, options=["subvolid=5"], filesystem="btrfs"
    ):
        assert (target / "data" / "dir" / "file.txt").exists()
        assert snapshots.mount_of(target).mount_point == str(target)
    assert snapshots.mount_of(target).mount_point != str(target)


def test_missing_btrfs_tool_is_a_clear_error(
    btrfs: LoopFilesystem, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "no-tools"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(snapshots.ToolMissingError, match="btrfs is not installed") as missing:
        snapshots.subvolume_of(btrfs.mount_point / "data")
    assert "btrfs-progs" in str(missing.value)
    assert not snapshots.snapshots_available(btrfs.mount_point / "data")


# -- reflinks -------------------------------------------------------------------------


def _make_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "big.bin").write_bytes(os.urandom(64 * 1024 * 1024))
    (root / "small.txt").write_text("small\n")
    (root / "small.txt").chmod(0o600)
    os.chown(root / "small.txt", 2000, 3000)
    (root / "link").symlink_to("sub/big.bin")


def _free_bytes(path: Path) -> int:
    os.sync()
    status = os.statvfs(path)
    return status.f_bavail * status.f_frsize


def _check_clone(source: Path, clone: Path) -> None:
    assert (clone / "sub" / "big.bin").read_bytes() == (source / "sub" / "big.bin").read_bytes()
    copied = os.lstat(clone / "small.txt")
    assert (copied.st_mode & 0o7777, copied.st_uid, copied.st_gid) == (0o600, 2000, 3000)
    assert os.readlink(clone / "link") == "sub/big.bin"


@pytest.mark.parametrize("kind", ["btrfs", pytest.param("xfs", marks=requires_program("mkfs.xfs"))])
def test_reflink_clone_shares_blocks(tmp_path: Path, kind: str) -> None:
    with loop_filesystem(tmp_path / kind, kind, "1G") as filesystem:
        source = filesystem.mount_point / "app"
        _make_tree(source)
        assert snapshots.supports_reflink(filesystem.mount_point)
        free_before = _free_bytes(filesystem.mount_point)
        clone = snapshots.reflink_clone(source, filesystem.mount_point / "clone")
        # 64 MiB cloned, not copied: the free space barely moves.
        assert free_before - _free_bytes(filesystem.mount_point) < 8 * 1024 * 1024
        _check_clone(source, clone)
        (clone / "small.txt").write_text("the clone changed\n")
        assert (source / "small.txt").read_text() == "small\n"
        with pytest.raises(snapshots.SnapshotError, match="exists"):
            snapshots.reflink_clone(source, clone)
        snapshots.remove_clone(clone)
        assert not clone.exists()
        assert not list(filesystem.mount_point.glob(".homesafe-reflink-*"))


@requires_program("mkfs.xfs")
def test_xfs_without_reflink_cannot_clone(tmp_path: Path) -> None:
    with loop_filesystem(tmp_path / "xfs", "xfs-noreflink", "512M") as filesystem:
        assert snapshots.filesystem_type(filesystem.mount_point) == "xfs"
        assert not snapshots.supports_reflink(filesystem.mount_point)


def test_ext4_cannot_clone_and_leaves_nothing(tmp_path: Path) -> None:
    if snapshots.filesystem_type(tmp_path) in ("btrfs", "xfs"):
        pytest.skip("the temp directory is on a filesystem with reflinks")
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "file").write_text("data\n")
    assert not snapshots.supports_reflink(tmp_path)
    with pytest.raises(snapshots.ReflinkUnsupportedError, match="cannot make reflink clones"):
        snapshots.reflink_clone(tmp_path / "source", tmp_path / "clone")
    assert not (tmp_path / "clone").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]


def test_clone_across_filesystems_is_refused(btrfs: LoopFilesystem, tmp_path: Path) -> None:
    with pytest.raises(snapshots.ReflinkUnsupportedError, match="another filesystem"):
        snapshots.reflink_clone(btrfs.mount_point / "data" / "dir", tmp_path / "clone")
    assert not (tmp_path / "clone").exists()
