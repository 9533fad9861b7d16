"""The allocation hint on homesafe's scratch directories, on the real filesystem."""

from __future__ import annotations

import array
import fcntl
import os
from pathlib import Path

import pytest

from homesafe import allocation
from homesafe.consistency import snapshots


def flags_of(path: Path) -> int:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(descriptor, allocation.FS_IOC_GETFLAGS, flags, True)
        return flags[0]
    finally:
        os.close(descriptor)


def test_a_scratch_directory_on_ext4_is_flagged_top_of_hierarchy(tmp_path: Path) -> None:
    if snapshots.filesystem_type(tmp_path) != "ext4":
        pytest.skip(f"the temp directory is on {snapshots.filesystem_type(tmp_path)}, not ext4")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert not flags_of(scratch) & allocation.FS_TOPDIR_FL
    assert allocation.spread_subdirectories(scratch)
    assert flags_of(scratch) & allocation.FS_TOPDIR_FL
    assert allocation.spread_subdirectories(scratch)  # again: nothing to change
    (scratch / "new").mkdir()  # and the directory works as any other
    assert (scratch / "new").is_dir()


def test_where_the_hint_cannot_be_given_nothing_happens(tmp_path: Path) -> None:
    assert not allocation.spread_subdirectories(tmp_path / "missing")
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    assert not allocation.spread_subdirectories(link)  # never through a symlink
    assert not allocation.spread_subdirectories(Path("/proc"))  # a filesystem without it
