"""Real filesystems on loop devices for snapshot and clone tests (root only).

:func:`loop_filesystem` makes a sparse image file, formats it (btrfs, or XFS with or
without reflinks), attaches it to a free loop device and mounts it; on the way out,
however the test ended, it unmounts everything mounted below its directory (deepest
first, lazily if a mount is still busy) and detaches the loop device, so no mount and
no loop device outlives the test.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from homesafe.consistency.snapshots import read_mounts


def run(*argv: str | os.PathLike[str]) -> str:
    """Run a command of the test set-up; its stdout, or an AssertionError with stderr."""
    completed = subprocess.run(
        [os.fspath(part) for part in argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert completed.returncode == 0, f"{argv}: {completed.stderr}"
    return completed.stdout


class LoopFilesystem:
    """One formatted image on one loop device, mounted (whole) at ``mount_point``."""

    def __init__(self, directory: Path, device: str, mount_point: Path) -> None:
        self.directory = directory
        self.device = device
        self.mount_point = mount_point

    def mount(self, target: Path, options: Sequence[str] = ()) -> Path:
        """Mount the filesystem once more at ``target`` (made if missing)."""
        target.mkdir(parents=True, exist_ok=True)
        argv: list[str] = ["mount"]
        if options:
            argv += ["-o", ",".join(options)]
        run(*argv, self.device, target)
        return target

    def unmount(self, target: Path) -> None:
        run("umount", target)

    def mounts_below(self) -> list[str]:
        """Mount points below this filesystem's directory, deepest (latest) first."""
        inside = [
            mount.mount_point
            for mount in read_mounts()
            if mount.mount_point == str(self.directory)
            or mount.mount_point.startswith(str(self.directory) + "/")
            or mount.source == self.device
        ]
        return list(reversed(inside))

    def close(self) -> None:
        """Unmount everything below the directory and every mount of the device, then
        detach the loop device."""
        try:
            for _ in range(3):
                remaining = self.mounts_below()
                if not remaining:
                    break
                for mount_point in remaining:
                    if subprocess.run(["umount", mount_point], check=False).returncode != 0:
                        # Busy: detach it now, the kernel frees it when the last user goes.
                        subprocess.run(["umount", "--lazy", mount_point], check=False)
        finally:
            subprocess.run(["losetup", "--detach", self.device], check=False)


@contextmanager
def loop_filesystem(
    directory: Path, kind: str = "btrfs", size: str = "1G"
) -> Iterator[LoopFilesystem]:
    """A fresh ``kind`` filesystem ("btrfs", "xfs" with reflinks, "xfs-noreflink",
    "ext4") on a loop device, mounted at ``directory/mnt``; removed afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    image = directory / "image"
    run("truncate", "-s", size, image)
    formats = {
        "btrfs": ["mkfs.btrfs", "-q", image],
        "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1", image],
        "xfs-noreflink": ["mkfs.xfs", "-q", "-m", "reflink=0", image],
        "ext4": ["mkfs.ext4", "-q", "-F", image],
    }
    run(*formats[kind])
    device = run("losetup", "--find", "--show", image).strip()
    filesystem = LoopFilesystem(directory, device, directory / "mnt")
    try:
        filesystem.mount(filesystem.mount_point)
        yield filesystem
    finally:
        filesystem.close()
        image.unlink(missing_ok=True)
