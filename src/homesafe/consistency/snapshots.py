"""Snapshot and clone primitives: btrfs subvolumes, reflink clones, LVM thin snapshots.

The building blocks of the capture strategies (an app held still for the moment it
takes to snapshot or clone its paths) and of full-system backup and restore. Nothing
here knows about apps, archives or results: each function does one thing to the
storage and raises a :class:`SnapshotError` subclass saying what went wrong.

Every command goes through :mod:`homesafe.execute` as an argv list. Each one is built
by a pure ``*_argv`` function (tested without running it) and run by the function of
the same name without the suffix. The reference design's primitives map as follows:
``_is_snapshot_available`` -> :func:`snapshots_available`, ``_take_snapshot`` ->
:func:`take_snapshot` (or the :func:`snapshot` context manager), ``_create_subvolume``
-> :func:`create_subvolume`, ``_delete_snapshot`` -> :func:`delete_subvolume`,
``_switch_to_subvolume`` -> :func:`set_default_subvolume`.

What a path is stored on is read from ``/proc/self/mountinfo`` (:func:`mount_of`,
:func:`filesystem_type`); the btrfs subvolume holding a path is found by walking up to
the directory whose inode is 256, the root of every btrfs subvolume
(:func:`subvolume_of`). Reflink support is probed with the ``FICLONE`` ioctl on two
scratch files (:func:`supports_reflink`); clones are made by ``cp --reflink=always``.

LVM thin snapshots cannot be exercised where homesafe is developed (no device-mapper in
that kernel): their argv builders and report parsing are tested, the calls are not. A
filesystem is taken to be on a thin volume (:func:`thin_volume_of`) when its device is
a device-mapper one (by its major number) and ``lvs`` says it is thin.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from homesafe import execute
from homesafe.errors import CommandError, CommandNotFoundError, HomesafeError

__all__ = [
    "BTRFS_SUBVOLUME_ROOT_INODE",
    "BTRFS_TOP_LEVEL_ID",
    "LogicalVolume",
    "Mount",
    "NotASubvolumeError",
    "NotOnBtrfsError",
    "ReflinkUnsupportedError",
    "SnapshotError",
    "Subvolume",
    "SubvolumeFacts",
    "ToolMissingError",
    "create_subvolume",
    "create_subvolume_argv",
    "default_subvolume_id",
    "delete_lvm_snapshot",
    "delete_subvolume",
    "delete_subvolume_argv",
    "filesystem_type",
    "get_default_argv",
    "is_subvolume",
    "list_nested_argv",
    "logical_volume_of",
    "lvm_remove_argv",
    "lvm_thin_snapshot_argv",
    "lvs_argv",
    "mount",
    "mount_argv",
    "mount_of",
    "nested_subvolumes",
    "parse_default_subvolume",
    "parse_lvs_report",
    "parse_mountinfo",
    "parse_subvolume_list",
    "parse_subvolume_show",
    "read_mounts",
    "reflink_clone",
    "reflink_clone_argv",
    "remove_clone",
    "same_filesystem",
    "set_default_argv",
    "set_default_subvolume",
    "set_read_only",
    "set_read_only_argv",
    "show_subvolume_argv",
    "snapshot",
    "snapshot_argv",
    "snapshot_mount_options",
    "snapshots_available",
    "subvolume_at",
    "subvolume_of",
    "supports_reflink",
    "take_lvm_snapshot",
    "take_snapshot",
    "temporary_mount",
    "thin_volume_of",
    "unmount",
    "unmount_argv",
]

# The inode number of the root directory of every btrfs subvolume, the top level
# included (BTRFS_FIRST_FREE_OBJECTID in the kernel).
BTRFS_SUBVOLUME_ROOT_INODE = 256
# The id of the top-level subvolume (BTRFS_FS_TREE_OBJECTID), the one mkfs makes.
BTRFS_TOP_LEVEL_ID = 5
# linux/fs.h: _IOW(0x94, 9, int). Clones one whole file into another on the same
# filesystem; filesystems without reflinks answer EOPNOTSUPP (or EXDEV, EINVAL).
FICLONE = 0x40049409
MOUNTINFO = Path("/proc/self/mountinfo")
PROC_DEVICES = Path("/proc/devices")
# A snapshot or a deletion commits a btrfs transaction: seconds on a busy disk, but
# never minutes; a hung command must not hold an app still for ever.
COMMAND_TIMEOUT = 600.0
# Which Debian package provides each program, for the "not installed" hint.
PACKAGES = {
    "btrfs": "btrfs-progs",
    "cp": "coreutils",
    "lvcreate": "lvm2",
    "lvremove": "lvm2",
    "lvs": "lvm2",
    "mount": "mount",
    "umount": "mount",
}


# -- errors ---------------------------------------------------------------------------


class SnapshotError(HomesafeError):
    """A snapshot, clone, subvolume or mount could not be found, made or removed."""


class ToolMissingError(SnapshotError):
    """The program a snapshot or clone needs (btrfs, cp, lvcreate ...) is not installed."""


class NotOnBtrfsError(SnapshotError):
    """A path that must be on btrfs (for a subvolume snapshot) is on another filesystem."""


class NotASubvolumeError(SnapshotError):
    """A path that must be the root of a btrfs subvolume is a plain directory in one."""


class ReflinkUnsupportedError(SnapshotError):
    """The filesystem of a path cannot make reflink clones (ext4, XFS without reflink)."""


def _run(argv: Sequence[str], what: str) -> execute.Completed:
    """Run ``argv`` for ``what`` (a phrase: "snapshot /srv"), with homesafe's errors."""
    try:
        return execute.run(argv, timeout=COMMAND_TIMEOUT)
    except CommandNotFoundError as error:
        program = os.path.basename(argv[0])
        package = PACKAGES.get(program, program)
        raise ToolMissingError(
            f"cannot {what}: {program} is not installed",
            hint=f"Install it: apt-get install {package}",
        ) from error
    except CommandError as error:
        raise SnapshotError(f"cannot {what}: {error.message}") from error


# -- mounts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``.

    ``device`` (``major:minor``) is the same for every mount of one filesystem, whatever
    part of it each shows; ``root`` is the directory of the filesystem mounted at
    ``mount_point`` (``/`` for all of it, ``/@root`` for a btrfs subvolume).
    """

    mount_id: int
    parent_id: int
    device: str
    root: str
    mount_point: str
    options: tuple[str, ...]
    filesystem_type: str
    source: str
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options

    def super_option(self, name: str) -> str | None:
        """The value of a filesystem option (``subvol``, ``subvolid`` ...), or None."""
        for option in self.super_options:
            key, _, value = option.partition("=")
            if key == name:
                return value
        return None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Every mount listed in ``text`` (the format of ``/proc/self/mountinfo``), in order."""
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        before, separator, after = line.partition(" - ")
        if not separator:
            raise SnapshotError(f"cannot read a mountinfo line: {line!r}")
        fields = before.split(" ")
        tail = after.split(" ")
        if len(fields) < 6 or len(tail) < 3:
            raise SnapshotError(f"cannot read a mountinfo line: {line!r}")
        mounts.append(
            Mount(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                device=fields[2],
                root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                options=tuple(fields[5].split(",")),
                filesystem_type=tail[0],
                source=_unescape(tail[1]),
                super_options=tuple(tail[2].split(",")),
            )
        )
    return mounts


def read_mounts() -> list[Mount]:
    """The mounts this process sees, in the order they were made."""
    return parse_mountinfo(MOUNTINFO.read_text())


def _is_within(path: str, directory: str) -> bool:
    return directory == "/" or path == directory or path.startswith(directory + "/")


def mount_of(path: str | os.PathLike[str], mounts: Sequence[Mount] | None = None) -> Mount:
    """The mount ``path`` is reached through (symlinks resolved): the deepest mount
    point above it, and of several mounts there the last one made (it hides the rest)."""
    resolved = os.path.realpath(path)
    found: Mount | None = None
    for candidate in mounts if mounts is not None else read_mounts():
        if not _is_within(resolved, candidate.mount_point):
            continue
        if found is None or len(candidate.mount_point) >= len(found.mount_point):
            found = candidate
    if found is None:
        raise SnapshotError(f"no mount holds {resolved}")
    return found


def filesystem_type(path: str | os.PathLike[str]) -> str:
    """The type of the filesystem holding ``path`` as the kernel names it: ``btrfs``,
    ``xfs``, ``ext4``, ``tmpfs``, ``overlay`` ..."""
    return mount_of(path).filesystem_type


def same_filesystem(first: str | os.PathLike[str], second: str | os.PathLike[str]) -> bool:
    """Whether two paths are on one filesystem (through any mounts of it)."""
    mounts = read_mounts()
    return mount_of(first, mounts).device == mount_of(second, mounts).device


def mount_argv(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    options: Sequence[str] = (),
    filesystem: str | None = None,
) -> list[str]:
    argv = ["mount"]
    if filesystem:
        argv += ["-t", filesystem]
    if options:
        argv += ["-o", ",".join(options)]
    return [*argv, "--", os.fspath(source), os.fspath(target)]


def unmount_argv(target: str | os.PathLike[str]) -> list[str]:
    return ["umount", "--", os.fspath(target)]


def mount(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    options: Sequence[str] = (),
    filesystem: str | None = None,
) -> None:
    """Mount ``source`` (a device, or a directory with the ``bind`` option) on the
    existing directory ``target``."""
    _run(mount_argv(source, target, options=options, filesystem=filesystem), f"mount {target}")


def unmount(target: str | os.PathLike[str]) -> None:
    """Unmount what is mounted on ``target``."""
    _run(unmount_argv(target), f"unmount {target}")


@contextlib.contextmanager
def temporary_mount(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    options: Sequence[str] = (),
    filesystem: str | None = None,
) -> Iterator[Path]:
    """Mount ``source`` on ``target`` for the ``with`` block; unmounted however the
    block ends."""
    mount(source, target, options=options, filesystem=filesystem)
    try:
        yield Path(target)
    finally:
        unmount(target)


def snapshot_mount_options(filesystem: str) -> tuple[str, ...]:
    """Options to mount a block-level snapshot (LVM) of a ``filesystem`` next to its
    origin: read-only, and for XFS ``nouuid``, since the copy has the origin's UUID
    and XFS refuses to mount two filesystems with one UUID."""
    return ("ro", "nouuid") if filesystem == "xfs" else ("ro",)


# -- btrfs subvolumes -----------------------------------------------------------------


@dataclass(frozen=True)
class Subvolume:
    """A btrfs subvolume (a snapshot is one too).

    ``path`` is its root directory as reachable now; ``name`` its path inside the
    filesystem from the top level (``@root``, ``@root/srv``; empty for the top level
    itself); ``mount`` the mount ``path`` is reached through.
    """

    path: Path
    id: int
    name: str
    parent_id: int
    uuid: str
    read_only: bool
    mount: Mount

    @property
    def is_top_level(self) -> bool:
        return self.id == BTRFS_TOP_LEVEL_ID


def show_subvolume_argv(path: str | os.PathLike[str]) -> list[str]:
    return ["btrfs", "subvolume", "show", "--", os.fspath(path)]


def snapshot_argv(
    source: str | os.PathLike[str], destination: str | os.PathLike[str], *, read_only: bool
) -> list[str]:
    argv = ["btrfs", "subvolume", "snapshot"]
    if read_only:
        argv.append("-r")
    return [*argv, "--", os.fspath(source), os.fspath(destination)]


def delete_subvolume_argv(path: str | os.PathLike[str]) -> list[str]:
    return ["btrfs", "subvolume", "delete", "--", os.fspath(path)]


def create_subvolume_argv(path: str | os.PathLike[str]) -> list[str]:
    return ["btrfs", "subvolume", "create", "--", os.fspath(path)]


def set_default_argv(subvolume_id: int, path: str | os.PathLike[str]) -> list[str]:
    return ["btrfs", "subvolume", "set-default", str(subvolume_id), os.fspath(path)]


def get_default_argv(path: str | os.PathLike[str]) -> list[str]:
    return ["btrfs", "subvolume", "get-default", os.fspath(path)]


def set_read_only_argv(path: str | os.PathLike[str], read_only: bool) -> list[str]:
    # -ts: the property of the subvolume, not of the filesystem or of an inode.
    return [
        "btrfs", "property", "set", "-ts", os.fspath(path), "ro",
        "true" if read_only else "false",
    ]  # fmt: skip


def list_nested_argv(path: str | os.PathLike[str]) -> list[str]:
    # -o: only the subvolumes directly below the one holding ``path``.
    return ["btrfs", "subvolume", "list", "-o", os.fspath(path)]


@dataclass(frozen=True)
class SubvolumeFacts:
    """What ``btrfs subvolume show`` tells about a subvolume."""

    name: str
    id: int
    parent_id: int
    uuid: str
    read_only: bool


def parse_subvolume_show(text: str) -> SubvolumeFacts:
    """Read the output of ``btrfs subvolume show``: its first line is the subvolume's
    path from the top level (``/`` for the top level), then ``Key: value`` lines."""
    lines = text.splitlines()
    if not lines:
        raise SnapshotError("btrfs subvolume show printed nothing")
    values: dict[str, str] = {}
    for line in lines[1:]:
        key, separator, value = line.strip().partition(":")
        if separator:
            values.setdefault(key.strip(), value.strip())
    try:
        subvolume_id = int(values["Subvolume ID"])
        parent_id = int(values.get("Parent ID", "0"))
    except (KeyError, ValueError) as error:
        raise SnapshotError(f"cannot read btrfs subvolume show: {text!r}") from error
    name = lines[0].strip()
    return SubvolumeFacts(
        name="" if subvolume_id == BTRFS_TOP_LEVEL_ID or name in ("/", "<FS_TREE>") else name,
        id=subvolume_id,
        parent_id=parent_id,
        uuid=values.get("UUID", ""),
        read_only="readonly" in values.get("Flags", "").split(),
    )


def parse_default_subvolume(text: str) -> int:
    """The id in the output of ``btrfs subvolume get-default``
    (``ID 5 (FS_TREE)`` or ``ID 256 gen 9 top level 5 path @root``)."""
    match = re.match(r"\s*ID\s+(\d+)", text)
    if not match:
        raise SnapshotError(f"cannot read btrfs subvolume get-default: {text!r}")
    return int(match[1])


def parse_subvolume_list(text: str) -> list[tuple[int, str]]:
    """(id, path from the top level) of each line of ``btrfs subvolume list``."""
    found = []
    for line in text.splitlines():
        match = re.match(r"ID (\d+) gen \d+ (?:cgen \d+ )?top level \d+ .*?path (.+)$", line)
        if match:
            found.append((int(match[1]), match[2]))
    return found


def _require_btrfs(path: Path, mounts: Sequence[Mount] | None = None) -> Mount:
    found = mount_of(path, mounts)
    if found.filesystem_type != "btrfs":
        raise NotOnBtrfsError(
            f"{path} is on {found.filesystem_type} (mounted at {found.mount_point}), not btrfs",
            hint="Snapshots of subvolumes need btrfs; other filesystems use another strategy.",
        )
    return found


def snapshots_available(path: str | os.PathLike[str]) -> bool:
    """Whether btrfs snapshots can be taken of what holds ``path``: it is on btrfs and
    the btrfs tool is installed."""
    try:
        _require_btrfs(Path(os.path.realpath(path)))
    except NotOnBtrfsError:
        return False
    return shutil.which("btrfs") is not None


def is_subvolume(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the root directory of a btrfs subvolume."""
    try:
        status = os.lstat(path)
    except OSError:
        return False
    if status.st_ino != BTRFS_SUBVOLUME_ROOT_INODE or not os.path.isdir(path):
        return False
    return filesystem_type(path) == "btrfs"


def _subvolume_root(path: Path, mount: Mount) -> Path:
    """The root directory of the subvolume holding ``path``: the nearest directory at
    or above it whose inode is 256, without leaving the mount."""
    current = path if path.is_dir() else path.parent
    while True:
        if os.lstat(current).st_ino == BTRFS_SUBVOLUME_ROOT_INODE:
            return current
        if str(current) == mount.mount_point or current.parent == current:
            raise SnapshotError(
                f"the root of the btrfs subvolume holding {path} is not reachable: "
                f"{mount.mount_point} mounts a directory inside it ({mount.root})",
                hint="Mount the subvolume itself (subvol=...) to snapshot it.",
            )
        current = current.parent


def _subvolume(root: Path, mount: Mount) -> Subvolume:
    facts = parse_subvolume_show(
        _run(show_subvolume_argv(root), f"read the btrfs subvolume {root}").stdout
    )
    return Subvolume(
        path=root,
        id=facts.id,
        name=facts.name,
        parent_id=facts.parent_id,
        uuid=facts.uuid,
        read_only=facts.read_only,
        mount=mount,
    )


def subvolume_of(path: str | os.PathLike[str]) -> Subvolume:
    """The btrfs subvolume holding ``path`` (symlinks resolved), and where its root is.

    Raises :class:`NotOnBtrfsError` when ``path`` is on another filesystem.
    """
    resolved = Path(os.path.realpath(path))
    if not os.path.lexists(resolved):
        raise SnapshotError(f"{resolved} does not exist")
    found = _require_btrfs(resolved)
    return _subvolume(_subvolume_root(resolved, found), found)


def subvolume_at(path: str | os.PathLike[str]) -> Subvolume:
    """The btrfs subvolume whose root is ``path`` (a mount point of one, or a nested
    subvolume). Raises :class:`NotASubvolumeError` for a directory inside one."""
    subvolume = subvolume_of(path)
    resolved = Path(os.path.realpath(path))
    if subvolume.path != resolved:
        raise NotASubvolumeError(
            f"{resolved} is not a btrfs subvolume: it is a directory in the subvolume "
            f"{subvolume.name or '(top level)'} whose root is {subvolume.path}",
        )
    return subvolume


def subvolume_path(directory: str | os.PathLike[str], name: str) -> Path:
    """Where a subvolume or snapshot named ``name`` in ``directory`` is made: the
    directory with its symlinks resolved (what :func:`take_snapshot` and
    :func:`create_subvolume` make, and what a journal entry made before them names)."""
    return Path(os.path.realpath(directory)) / name


def take_snapshot(
    source: str | os.PathLike[str] | Subvolume,
    into: str | os.PathLike[str],
    name: str,
    *,
    read_only: bool = True,
) -> Subvolume:
    """Snapshot the subvolume ``source`` as ``into/name`` and return the snapshot.

    The snapshot is atomic: it holds the subvolume exactly as it was at one instant.
    It holds none of the subvolumes nested in ``source`` (each is an empty directory
    there). ``into`` must exist on the same btrfs filesystem, and ``name`` be new.
    """
    source_path = source.path if isinstance(source, Subvolume) else Path(source)
    if not isinstance(source, Subvolume):
        subvolume_at(source_path)
    if "/" in name or name in ("", ".", ".."):
        raise SnapshotError(f"{name!r} cannot name a snapshot")
    destination = subvolume_path(into, name)
    directory = destination.parent
    if os.path.lexists(destination):
        raise SnapshotError(f"cannot snapshot {source_path} as {destination}: it exists")
    mounts = read_mounts()
    target_mount = _require_btrfs(directory, mounts)
    if target_mount.device != mount_of(source_path, mounts).device:
        raise SnapshotError(
            f"cannot snapshot {source_path} into {directory}: another filesystem",
            hint="A snapshot lives on the filesystem of its subvolume.",
        )
    _run(
        snapshot_argv(source_path, destination, read_only=read_only),
        f"snapshot {source_path}",
    )
    return _subvolume(destination, target_mount)


def delete_subvolume(path: str | os.PathLike[str]) -> None:
    """Delete the subvolume (or snapshot) whose root is ``path``, read-only or not.

    Refuses anything that is not a subvolume root, so a wrong path deletes nothing.
    """
    if not is_subvolume(path):
        raise NotASubvolumeError(f"will not delete {path}: it is not a btrfs subvolume")
    _run(delete_subvolume_argv(path), f"delete the btrfs subvolume {path}")


@contextlib.contextmanager
def snapshot(
    source: str | os.PathLike[str] | Subvolume,
    into: str | os.PathLike[str],
    name: str,
    *,
    read_only: bool = True,
) -> Iterator[Subvolume]:
    """:func:`take_snapshot` for the ``with`` block; the snapshot is deleted however the
    block ends."""
    taken = take_snapshot(source, into, name, read_only=read_only)
    try:
        yield taken
    finally:
        delete_subvolume(taken.path)


def create_subvolume(path: str | os.PathLike[str]) -> Subvolume:
    """Create an empty subvolume at ``path`` (its parent must exist, on btrfs)."""
    target = subvolume_path(Path(path).parent, Path(path).name)
    if os.path.lexists(target):
        raise SnapshotError(f"cannot create a subvolume at {target}: it exists")
    found = _require_btrfs(target.parent)
    _run(create_subvolume_argv(target), f"create the btrfs subvolume {target}")
    return _subvolume(target, found)


def set_read_only(path: str | os.PathLike[str], read_only: bool = True) -> None:
    """Make the subvolume at ``path`` read-only (or writable again)."""
    if not is_subvolume(path):
        raise NotASubvolumeError(f"{path} is not a btrfs subvolume")
    _run(set_read_only_argv(path, read_only), f"set read-only={read_only} on {path}")


def default_subvolume_id(path: str | os.PathLike[str]) -> int:
    """The id of the subvolume a mount of the filesystem holding ``path`` shows when it
    names none (``subvol=``/``subvolid=``): what the next boot mounts, usually."""
    _require_btrfs(Path(os.path.realpath(path)))
    completed = _run(get_default_argv(path), f"read the default subvolume of {path}")
    return parse_default_subvolume(completed.stdout)


def set_default_subvolume(subvolume_id: int, path: str | os.PathLike[str]) -> None:
    """Make subvolume ``subvolume_id`` the default of the filesystem holding ``path``.

    Mounts already made are unchanged; the next mount without ``subvol=`` shows it.
    """
    _require_btrfs(Path(os.path.realpath(path)))
    _run(
        set_default_argv(subvolume_id, path),
        f"make subvolume {subvolume_id} the default of {path}",
    )


def nested_subvolumes(subvolume: Subvolume) -> list[str]:
    """The subvolumes directly below ``subvolume``, as paths relative to its root.

    A snapshot of ``subvolume`` holds none of them (each is an empty directory in it).
    """
    completed = _run(list_nested_argv(subvolume.path), f"list subvolumes in {subvolume.path}")
    prefix = subvolume.name + "/" if subvolume.name else ""
    nested = []
    for _, name in parse_subvolume_list(completed.stdout):
        nested.append(name.removeprefix(prefix) if prefix else name)
    return sorted(nested)


# -- reflink clones -------------------------------------------------------------------


def supports_reflink(directory: str | os.PathLike[str]) -> bool:
    """Whether files in ``directory`` can be reflink-cloned (btrfs; XFS made with
    reflink=1): a scratch file there is cloned with the FICLONE ioctl, then removed."""
    try:
        with (
            tempfile.NamedTemporaryFile(dir=directory, prefix=".homesafe-reflink-") as source,
            tempfile.NamedTemporaryFile(dir=directory, prefix=".homesafe-reflink-") as clone,
        ):
            source.write(b"homesafe\n" * 456)
            source.flush()
            fcntl.ioctl(clone.fileno(), FICLONE, source.fileno())
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL):
            return False
        raise SnapshotError(
            f"cannot tell whether {directory} supports reflinks: {error}"
        ) from error
    return True


def reflink_clone_argv(
    source: str | os.PathLike[str], destination: str | os.PathLike[str]
) -> list[str]:
    # -a: owners, modes, times, links, xattrs and ACLs as they are; -T: ``destination``
    # is the copy itself, never a directory to copy into.
    return [
        "cp", "-a", "--reflink=always", "--no-target-directory", "--",
        os.fspath(source), os.fspath(destination),
    ]  # fmt: skip


def reflink_clone(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> Path:
    """Clone the file or tree ``source`` as the new path ``destination`` by reflinks:
    no data is copied, only metadata, and both share their blocks until one changes.

    Raises :class:`ReflinkUnsupportedError` when the filesystem cannot (the copy would
    take as long as the data is big); a clone that fails half way is removed.
    """
    target = Path(os.path.abspath(destination))
    if os.path.lexists(target):
        raise SnapshotError(f"cannot clone {source} as {target}: it exists")
    if not os.path.lexists(source):
        raise SnapshotError(f"cannot clone {source}: it does not exist")
    if not same_filesystem(source, target.parent):
        raise ReflinkUnsupportedError(
            f"cannot clone {source} into {target.parent}: another filesystem",
            hint="A reflink clone lives on the filesystem of what it clones.",
        )
    if not supports_reflink(target.parent):
        raise ReflinkUnsupportedError(
            f"{target.parent} is on {filesystem_type(target.parent)}, which cannot make "
            "reflink clones",
            hint="btrfs and XFS (made with reflink=1) can.",
        )
    try:
        _run(reflink_clone_argv(source, target), f"clone {source}")
    except BaseException:
        remove_clone(target)
        raise
    return target


def remove_clone(path: str | os.PathLike[str]) -> None:
    """Remove a clone made by :func:`reflink_clone` (a file or a tree); no error when
    it is already gone."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


# -- LVM thin snapshots -----------------------------------------------------------------


@dataclass(frozen=True)
class LogicalVolume:
    """An LVM logical volume: ``pool`` names its thin pool (empty when it is not thin);
    ``attributes`` is ``lv_attr`` (first letter ``V``: a thin volume)."""

    volume_group: str
    name: str
    pool: str = ""
    attributes: str = ""
    device: str = ""

    @property
    def full_name(self) -> str:
        return f"{self.volume_group}/{self.name}"

    @property
    def is_thin(self) -> bool:
        return bool(self.pool) and self.attributes.startswith("V")


def lvs_argv(device: str | os.PathLike[str]) -> list[str]:
    return [
        "lvs", "--reportformat", "json", "--options",
        "vg_name,lv_name,pool_lv,lv_attr,lv_path", os.fspath(device),
    ]  # fmt: skip


def parse_lvs_report(text: str) -> list[LogicalVolume]:
    """The volumes in a ``lvs --reportformat json`` report."""
    try:
        report = json.loads(text)
        rows = [row for part in report["report"] for row in part.get("lv", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise SnapshotError(f"cannot read the lvs report: {text!r}") from error
    return [
        LogicalVolume(
            volume_group=str(row.get("vg_name", "")),
            name=str(row.get("lv_name", "")),
            pool=str(row.get("pool_lv", "")),
            attributes=str(row.get("lv_attr", "")),
            device=str(row.get("lv_path", "")),
        )
        for row in rows
    ]


def lvm_thin_snapshot_argv(volume: LogicalVolume, name: str) -> list[str]:
    # A thin snapshot needs no size (it takes blocks from the pool as they change) and
    # is created with "skip activation" set: activate it, so it can be mounted. It
    # stays writable: a filesystem replays its journal when the copy is mounted (ro).
    return [
        "lvcreate", "--snapshot", "--name", name, "--setactivationskip", "n",
        "--activate", "y", volume.full_name,
    ]  # fmt: skip


def lvm_remove_argv(volume: LogicalVolume) -> list[str]:
    return ["lvremove", "--yes", volume.full_name]


def logical_volume_of(device: str | os.PathLike[str]) -> LogicalVolume:
    """The LVM logical volume behind a block ``device`` (``/dev/mapper/vg-lv``)."""
    volumes = parse_lvs_report(_run(lvs_argv(device), f"read the LVM volume {device}").stdout)
    if len(volumes) != 1:
        raise SnapshotError(f"{device} is not one LVM logical volume")
    return volumes[0]


def take_lvm_snapshot(volume: LogicalVolume, name: str) -> LogicalVolume:
    """Snapshot the thin volume ``volume`` as ``name`` in its volume group; returns the
    snapshot, whose device can be mounted with :func:`snapshot_mount_options`. LVM
    freezes a filesystem mounted from ``volume`` for the instant of the snapshot."""
    if not volume.is_thin:
        raise SnapshotError(
            f"{volume.full_name} is not a thin volume",
            hint="Snapshots of thick LVM volumes need a size and slow down writes; "
            "homesafe takes thin snapshots only.",
        )
    _run(lvm_thin_snapshot_argv(volume, name), f"snapshot {volume.full_name}")
    return logical_volume_of(f"/dev/{volume.volume_group}/{name}")


def delete_lvm_snapshot(volume: LogicalVolume) -> None:
    """Remove the LVM snapshot ``volume`` (unmount it first)."""
    _run(lvm_remove_argv(volume), f"remove the LVM snapshot {volume.full_name}")


@functools.cache
def _device_mapper_majors() -> frozenset[int]:
    """The major numbers of device-mapper block devices (``/proc/devices``)."""
    try:
        text = PROC_DEVICES.read_text()
    except OSError:
        return frozenset()
    _, _, block = text.partition("Block devices:")
    majors = set()
    for line in block.splitlines():
        number, _, name = line.strip().partition(" ")
        if name.strip() == "device-mapper" and number.isdigit():
            majors.add(int(number))
    return frozenset(majors)


def is_device_mapper(device: str | os.PathLike[str]) -> bool:
    """Whether ``device`` is a device-mapper block device (LVM volumes are)."""
    try:
        status = os.stat(device)
    except OSError:
        return False
    return stat.S_ISBLK(status.st_mode) and os.major(status.st_rdev) in _device_mapper_majors()


@functools.cache
def _thin_volume_of_device(device: str) -> LogicalVolume | None:
    # Cached: plans are made again while apps are held still, and lvs takes a while.
    if not is_device_mapper(device) or shutil.which("lvs") is None:
        return None
    try:
        volume = logical_volume_of(device)
    except SnapshotError:
        return None
    return volume if volume.is_thin else None


def thin_volume_of(path: str | os.PathLike[str]) -> LogicalVolume | None:
    """The LVM thin volume the filesystem holding ``path`` is mounted from, or None
    (another kind of device, no ``lvs``, a thick volume). Asked once per device."""
    return _thin_volume_of_device(mount_of(path).source)
