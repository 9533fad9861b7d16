"""Pure parts of the snapshot primitives: mount table and btrfs/lvs output parsing, and
every argv they run.

LVM thin snapshots cannot run on the machines homesafe is developed and tested on: the
kernel there has no device-mapper (/dev/mapper/control is missing), so lvcreate and
lvremove cannot be driven for real. Their argv and the parsing of the lvs report are
tested here instead; everything else is also exercised for real in
tests/integration/test_snapshots.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from homesafe.consistency import snapshots
from homesafe.consistency.snapshots import LogicalVolume, Mount

MOUNTINFO = """\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
25 22 0:5 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
43 22 0:39 / /srv/pool rw,relatime shared:30 - btrfs /dev/loop0 rw,subvolid=5,subvol=/
44 22 0:39 /@root /srv/my\\040root rw,relatime - btrfs /dev/loop0 rw,subvolid=256,subvol=/@root
45 44 0:40 / /srv/my\\040root/tmp rw - tmpfs tmpfs rw,size=1024k
46 22 0:39 /@root /srv/pool ro,relatime - btrfs /dev/loop0 ro,subvolid=256,subvol=/@root
"""


@pytest.fixture
def mounts() -> list[Mount]:
    return snapshots.parse_mountinfo(MOUNTINFO)


def test_mountinfo_fields_and_escapes(mounts: list[Mount]) -> None:
    assert len(mounts) == 6
    root_subvolume = mounts[3]
    assert root_subvolume.mount_point == "/srv/my root"  # \040 is a space
    assert root_subvolume.root == "/@root"
    assert root_subvolume.device == "0:39" == mounts[2].device
    assert root_subvolume.filesystem_type == "btrfs"
    assert root_subvolume.source == "/dev/loop0"
    assert root_subvolume.super_option("subvolid") == "256"
    assert root_subvolume.super_option("subvol") == "/@root"
    assert root_subvolume.super_option("compress") is None
    assert not root_subvolume.read_only and mounts[5].read_only
    # Optional fields ("shared:1") before the separator are skipped.
    assert mounts[0].filesystem_type == "ext4" and mounts[0].source == "/dev/vda1"


def test_mountinfo_that_cannot_be_read_is_an_error() -> None:
    with pytest.raises(snapshots.SnapshotError, match="mountinfo"):
        snapshots.parse_mountinfo("22 1 0:21 / / rw no separator here\n")


def test_mount_of_takes_the_deepest_and_latest_mount(mounts: list[Mount]) -> None:
    assert snapshots.mount_of("/etc/passwd", mounts).mount_point == "/"
    assert snapshots.mount_of("/srv/my root/etc", mounts).mount_id == 44
    assert snapshots.mount_of("/srv/my root/tmp/x", mounts).filesystem_type == "tmpfs"
    assert snapshots.mount_of("/srv/my rootless", mounts).mount_point == "/"
    # Two mounts on /srv/pool: the later one hides the first.
    assert snapshots.mount_of("/srv/pool/a", mounts).mount_id == 46


SHOW_TOP_LEVEL = """\
/
\tName: \t\t\t<FS_TREE>
\tUUID: \t\t\tfd655e37-a8de-44e6-888f-1e9011d8cb4d
\tParent UUID: \t\t-
\tSubvolume ID: \t\t5
\tGeneration: \t\t5
\tParent ID: \t\t0
\tTop level ID: \t\t0
\tFlags: \t\t\t-
\tSnapshot(s):
"""

SHOW_SNAPSHOT = """\
snapshots/first
\tName: \t\t\tfirst
\tUUID: \t\t\taa137f45-ac02-5e4d-a671-56d424180d4f
\tParent UUID: \t\td05e0dab-6bd1-5743-a570-848dcc692574
\tReceived UUID: \t\t-
\tCreation time: \t\t2026-11-26 13:30:17 +0000
\tSubvolume ID: \t\t258
\tGeneration: \t\t9
\tGen at creation: \t9
\tParent ID: \t\t256
\tTop level ID: \t\t256
\tFlags: \t\t\treadonly
\tSnapshot(s):
"""


def test_subvolume_show_is_parsed() -> None:
    top = snapshots.parse_subvolume_show(SHOW_TOP_LEVEL)
    assert (top.name, top.id, top.parent_id, top.read_only) == ("", 5, 0, False)
    snapshot = snapshots.parse_subvolume_show(SHOW_SNAPSHOT)
    assert snapshot.name == "snapshots/first"
    assert (snapshot.id, snapshot.parent_id) == (258, 256)
    assert snapshot.uuid == "aa137f45-ac02-5e4d-a671-56d424180d4f"
    assert snapshot.read_only
    with pytest.raises(snapshots.SnapshotError):
        snapshots.parse_subvolume_show("data\n\tName: data\n")


def test_default_and_list_outputs_are_parsed() -> None:
    assert snapshots.parse_default_subvolume("ID 5 (FS_TREE)\n") == 5
    assert snapshots.parse_default_subvolume("ID 256 gen 9 top level 5 path @root\n") == 256
    with pytest.raises(snapshots.SnapshotError):
        snapshots.parse_default_subvolume("ERROR: not a btrfs filesystem\n")
    listed = snapshots.parse_subvolume_list(
        "ID 256 gen 9 top level 5 path @root\n"
        "ID 257 gen 7 top level 256 path @root/with space\n"
        "ID 258 gen 9 cgen 9 top level 5 path snap\n"
    )
    assert listed == [(256, "@root"), (257, "@root/with space"), (258, "snap")]


def test_btrfs_argv() -> None:
    assert snapshots.snapshot_argv("/srv", "/srv/.snap/a", read_only=True) == [
        "btrfs", "subvolume", "snapshot", "-r", "--", "/srv", "/srv/.snap/a",
    ]  # fmt: skip
    assert snapshots.snapshot_argv("/srv", "/x", read_only=False) == [
        "btrfs", "subvolume", "snapshot", "--", "/srv", "/x",
    ]  # fmt: skip
    assert snapshots.delete_subvolume_argv("/x") == ["btrfs", "subvolume", "delete", "--", "/x"]
    assert snapshots.create_subvolume_argv("/y") == ["btrfs", "subvolume", "create", "--", "/y"]
    assert snapshots.show_subvolume_argv("/y") == ["btrfs", "subvolume", "show", "--", "/y"]
    assert snapshots.set_default_argv(257, "/") == ["btrfs", "subvolume", "set-default", "257", "/"]
    assert snapshots.get_default_argv("/") == ["btrfs", "subvolume", "get-default", "/"]
    assert snapshots.set_read_only_argv("/s", True) == [
        "btrfs", "property", "set", "-ts", "/s", "ro", "true",
    ]  # fmt: skip
    assert snapshots.set_read_only_argv("/s", False)[-1] == "false"
    assert snapshots.list_nested_argv("/") == ["btrfs", "subvolume", "list", "-o", "/"]


def test_clone_and_mount_argv() -> None:
    assert snapshots.reflink_clone_argv("/a", "/b") == [
        "cp", "-a", "--reflink=always", "--no-target-directory", "--", "/a", "/b",
    ]  # fmt: skip
    assert snapshots.mount_argv("/dev/vg/snap", "/mnt/x", options=["ro", "nouuid"]) == [
        "mount", "-o", "ro,nouuid", "--", "/dev/vg/snap", "/mnt/x",
    ]  # fmt: skip
    assert snapshots.mount_argv("/dev/loop0", "/t", options=["subvolid=5"], filesystem="btrfs") == [
        "mount", "-t", "btrfs", "-o", "subvolid=5", "--", "/dev/loop0", "/t",
    ]  # fmt: skip
    assert snapshots.unmount_argv("/t") == ["umount", "--", "/t"]
    assert snapshots.snapshot_mount_options("xfs") == ("ro", "nouuid")
    assert snapshots.snapshot_mount_options("ext4") == ("ro",)


# -- LVM: argv and parsing only (no device-mapper here; see the module docstring) --------

LVS_REPORT = json.dumps(
    {
        "report": [
            {
                "lv": [
                    {
                        "vg_name": "vg0",
                        "lv_name": "data",
                        "pool_lv": "pool0",
                        "lv_attr": "Vwi-aotz--",
                        "lv_path": "/dev/vg0/data",
                    },
                    {
                        "vg_name": "vg0",
                        "lv_name": "old",
                        "pool_lv": "",
                        "lv_attr": "-wi-ao----",
                        "lv_path": "/dev/vg0/old",
                    },
                ]
            }
        ]
    }
)


def test_lvs_report_is_parsed() -> None:
    thin, thick = snapshots.parse_lvs_report(LVS_REPORT)
    assert thin == LogicalVolume("vg0", "data", "pool0", "Vwi-aotz--", "/dev/vg0/data")
    assert thin.is_thin and thin.full_name == "vg0/data"
    assert not thick.is_thin
    with pytest.raises(snapshots.SnapshotError, match="lvs report"):
        snapshots.parse_lvs_report("not json")


def test_lvm_argv() -> None:
    volume = LogicalVolume("vg0", "data", "pool0", "Vwi-aotz--")
    assert snapshots.lvs_argv("/dev/mapper/vg0-data") == [
        "lvs", "--reportformat", "json", "--options",
        "vg_name,lv_name,pool_lv,lv_attr,lv_path", "/dev/mapper/vg0-data",
    ]  # fmt: skip
    # Thin: no --size; activated, since thin snapshots are made with "skip activation".
    assert snapshots.lvm_thin_snapshot_argv(volume, "data-homesafe") == [
        "lvcreate", "--snapshot", "--name", "data-homesafe", "--setactivationskip", "n",
        "--activate", "y", "vg0/data",
    ]  # fmt: skip
    assert snapshots.lvm_remove_argv(LogicalVolume("vg0", "data-homesafe")) == [
        "lvremove", "--yes", "vg0/data-homesafe",
    ]  # fmt: skip


def test_thick_volumes_are_refused_before_any_command() -> None:
    with pytest.raises(snapshots.SnapshotError, match="not a thin volume"):
        snapshots.take_lvm_snapshot(LogicalVolume("vg0", "old", "", "-wi-ao----"), "snap")


def test_device_mapper_devices_are_told_by_their_major_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a device-mapper block device can be an LVM volume: the major numbers come
    from /proc/devices (its block section), so nothing else is handed to lvs."""
    devices = tmp_path / "devices"
    devices.write_text(
        "Character devices:\n  1 mem\n253 not-this-one\n\n"
        "Block devices:\n  7 loop\n 8 sd\n253 device-mapper\n254 mdp\n"
    )
    monkeypatch.setattr(snapshots, "PROC_DEVICES", devices)
    snapshots._device_mapper_majors.cache_clear()
    try:
        assert snapshots._device_mapper_majors() == frozenset({253})
        assert not snapshots.is_device_mapper(tmp_path)  # a directory
        assert not snapshots.is_device_mapper(tmp_path / "missing")
        assert snapshots.thin_volume_of(tmp_path) is None  # not on a mapper device
    finally:
        snapshots._device_mapper_majors.cache_clear()
