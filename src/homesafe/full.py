"""Full-system backup and restore: one whole btrfs subvolume (``/`` by default).

The reference design's ``backup_full`` and ``restore_full``, which it left unwritten.

**Backup.** The subvolume is snapshotted (atomic: the archive holds the system as it was
at one instant, with no service stopped), homesafe's metadata (scope "full") is written
into the snapshot, the snapshot is made read-only, and borg reads it from inside
(working directory = the snapshot, path ``.``), so the archive paths are relative to the
subvolume's root: the original absolute paths when it is ``/``. borg 1.2 (Debian's) has
no other way to cut a path prefix, and a read-only snapshot has no room for the
metadata, hence the one write into the snapshot before it is made read-only. The
snapshot lives in ``.homesafe-snapshots/`` at the subvolume's root (it must be on the
same filesystem) and is deleted afterwards, also on failure.

What is not in the archive: subvolumes nested in this one and other filesystems mounted
below it (a snapshot holds neither; the result names them), homesafe's own snapshots,
scratch files and local repository, and, for ``/``, what is inside ``/dev``, ``/proc``,
``/sys``, ``/run`` and ``/tmp`` (the directories themselves are kept).

**Restore.** The archive is extracted (numeric owners: the restored system's own
``/etc/passwd`` names them) into a new subvolume created next to the one mounted at the
mount point, on the same filesystem; then the new subvolume is made the default, which
the next mount without ``subvol=`` (the next boot, for ``/``) shows. The old subvolume is
kept; the result says how to switch back (``btrfs subvolume set-default OLD_ID``). A
failed extraction deletes the new subvolume and changes no default.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from homesafe import archives, journal, locations
from homesafe.api import BackupError, OperationResult
from homesafe.consistency import snapshots
from homesafe.consistency.snapshots import Subvolume
from homesafe.engines import borg
from homesafe.engines.base import ArchiveStats, ProgressCallback
from homesafe.errors import EngineError, HomesafeError, UsageError
from homesafe.repositories import Repository
from homesafe.sources import EngineSource

logger = logging.getLogger(__name__)

__all__ = [
    "SNAPSHOT_DIRECTORY",
    "SYSTEM_EXCLUDES",
    "FullSystemResult",
    "backup_full",
    "create_argv",
    "exclude_patterns",
    "extract_argv",
    "fstab_subvolume_options",
    "restore_full",
    "source_subvolume",
]

SCOPE = "full"
# Where snapshots of a subvolume are taken: at its root, so on its filesystem.
SNAPSHOT_DIRECTORY = ".homesafe-snapshots"
# Directories of a root filesystem whose contents are never worth restoring: kernel
# views and mount points of memory filesystems (in a snapshot they are empty, unless
# files hide under the mount), and /tmp. The directories themselves are kept.
SYSTEM_EXCLUDES = ("dev", "proc", "sys", "run", "tmp")
# Filesystems mounted below a subvolume that hold no data of their own worth naming.
PSEUDO_FILESYSTEMS = frozenset(
    {
        "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs",
        "devpts", "devtmpfs", "efivarfs", "fusectl", "hugetlbfs", "mqueue", "nsfs",
        "overlay", "proc", "pstore", "ramfs", "rpc_pipefs", "securityfs", "squashfs",
        "sysfs", "tmpfs", "tracefs",
    }
)  # fmt: skip


@dataclass
class FullSystemResult(OperationResult):
    """The outcome of a full-system backup or restore: an :class:`OperationResult` with
    no apps, failed when ``errors`` is not empty.

    ``subvolume`` is the path backed up (or the mount point restored under), with the
    subvolume's id and name in the filesystem; a backup tells the ``snapshot`` it read
    and the seconds taking it took, what was ``excluded`` and what is ``not_included``;
    a restore tells the ``new_subvolume`` (name and id), the ``previous_default_id`` and
    the ``rollback`` command. ``notes`` say what was done and what to do next.
    """

    subvolume: str = ""
    subvolume_id: int = 0
    subvolume_name: str = ""
    snapshot: str = ""
    snapshot_time: str = ""
    snapshot_seconds: float = 0.0
    excluded: list[str] = field(default_factory=list)
    not_included: list[str] = field(default_factory=list)
    new_subvolume: str = ""
    new_subvolume_id: int | None = None
    previous_default_id: int | None = None
    rollback: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def status(self) -> Literal["ok", "partial", "failed"]:
        return "failed" if self.errors else "ok"

    def to_dict(self) -> dict[str, Any]:
        document = super().to_dict()
        document["scope"] = SCOPE
        document["full_system"] = {
            "subvolume": self.subvolume,
            "subvolume_id": self.subvolume_id,
            "subvolume_name": self.subvolume_name,
            "snapshot": self.snapshot,
            "snapshot_time": self.snapshot_time,
            "snapshot_seconds": round(self.snapshot_seconds, 6),
            "excluded": self.excluded,
            "not_included": self.not_included,
            "new_subvolume": self.new_subvolume,
            "new_subvolume_id": self.new_subvolume_id,
            "previous_default_id": self.previous_default_id,
            "rollback": self.rollback,
            "notes": self.notes,
            "warnings": self.warnings,
        }
        return document


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _require_borg(repository: Repository) -> None:
    if repository.engine != "borg":
        raise UsageError(
            f"repository {repository.name!r} uses {repository.engine}: full-system "
            "backups need a borg repository",
        )


def source_subvolume(path: str | os.PathLike[str]) -> Subvolume:
    """The btrfs subvolume whose root is ``path``; raises (before anything is changed)
    when ``path`` is not on btrfs or not the root of a subvolume."""
    return snapshots.subvolume_at(path)


# -- borg argv (pure) -------------------------------------------------------------------


def _insert_options(argv: list[str], options: Sequence[str]) -> list[str]:
    """``argv`` with ``options`` just before its ``--`` (the archive and paths follow)."""
    separator = argv.index("--")
    return [*argv[:separator], *options, *argv[separator:]]


def create_argv(
    repository: Repository,
    archive_name: str,
    comment: str,
    patterns: Sequence[str],
    *,
    progress: bool,
) -> list[str]:
    """``borg create`` of ``.`` (run inside the snapshot) leaving out ``patterns``
    (borg patterns on archive paths, relative to the subvolume's root)."""
    argv = borg.create_argv(repository, archive_name, ["."], comment, progress=progress)
    return _insert_options(argv, [part for pattern in patterns for part in ("--exclude", pattern)])


def extract_argv(repository: Repository, archive_name: str, *, progress: bool) -> list[str]:
    """``borg extract`` of a whole full-system archive (run inside the new subvolume),
    with numeric owners and without homesafe's metadata."""
    argv = borg.extract_argv(repository, archive_name, [], progress=progress)
    # Numeric ids: the names in the archive belong to the restored system's own
    # /etc/passwd, which may not map them as the running one does.
    options = ["--numeric-ids", "--exclude", f"pp:{archives.METADATA_DIRECTORY}"]
    return _insert_options(argv, options)


def _relative_inside(path: str | os.PathLike[str], root: Path) -> str | None:
    """``path`` relative to ``root`` when it lies inside it, else None."""
    resolved = os.path.realpath(path)
    relative = os.path.relpath(resolved, root)
    if relative == "." or relative.startswith(".."):
        return None
    return relative


def exclude_patterns(
    root: Path, content_excludes: Sequence[str], repository: Repository
) -> list[str]:
    """The borg patterns a full-system archive of the subvolume at ``root`` leaves out:
    homesafe's snapshots, scratch files and (local) repository when they lie inside it,
    and what is inside each directory of ``content_excludes`` (relative paths)."""
    patterns = [f"pp:{SNAPSHOT_DIRECTORY}"]
    own = [locations.home() / "tmp"]
    if not repository.is_remote:
        own.append(Path(repository.location))
    for path in own:
        relative = _relative_inside(path, root)
        if relative is not None:
            patterns.append(f"pp:{relative}")
    for directory in content_excludes:
        patterns.append(f"sh:{directory.strip('/')}/*")
    return patterns


# -- backup -------------------------------------------------------------------------------


def _not_included(source: Subvolume) -> tuple[list[str], list[str]]:
    """What a snapshot of ``source`` leaves out: the subvolumes nested in it, and the
    other filesystems mounted below its root (memory and kernel filesystems aside), as
    descriptions for people."""
    nested = [
        f"{source.path / name} (nested btrfs subvolume)"
        for name in snapshots.nested_subvolumes(source)
        # A snapshot an interrupted run left behind is homesafe's, not the system's.
        if name.split("/")[0] != SNAPSHOT_DIRECTORY
    ]
    mounted = set()
    for mount in snapshots.read_mounts():
        relative = _relative_inside(mount.mount_point, source.path)
        if relative is None or mount.filesystem_type in PSEUDO_FILESYSTEMS:
            continue
        if relative.split("/")[0] == SNAPSHOT_DIRECTORY:
            continue
        mounted.add(f"{mount.mount_point} ({mount.filesystem_type} mounted there)")
    return nested, sorted(mounted)


def _stats(completed_stdout: str, warnings: list[str]) -> ArchiveStats:
    report = json.loads(completed_stdout)["archive"]
    stats = report.get("stats", {})
    return ArchiveStats(
        name=report["name"],
        original_size=int(stats.get("original_size", 0)),
        compressed_size=int(stats.get("compressed_size", 0)),
        deduplicated_size=int(stats.get("deduplicated_size", 0)),
        file_count=int(stats.get("nfiles", 0)),
        duration=float(report.get("duration", 0.0)),
        warnings=warnings,
    )


def _create(
    repository: Repository,
    archive_name: str,
    snapshot: Path,
    comment: str,
    patterns: Sequence[str],
    on_progress: ProgressCallback | None,
) -> ArchiveStats:
    on_record = borg.create_progress(on_progress)
    argv = create_argv(
        repository,
        archive_name,
        borg.escape_comment(comment),
        patterns,
        progress=on_progress is not None,
    )
    completed = borg.run_borg(
        repository, argv, accept_warnings=True, on_record=on_record, working_directory=snapshot
    )
    return _stats(completed.stdout, completed.messages("WARNING"))


def _incomplete(what: str, warnings: Sequence[str]) -> EngineError:
    # borg skips a file it cannot read or write with a warning and goes on: for a whole
    # system, a file missing without anyone noticing is a failure.
    return EngineError(f"{what} is incomplete: " + "; ".join(warnings or ["borg warned"]))


def backup_full(
    subvolume: str | os.PathLike[str] | Subvolume = "/",
    *,
    repository: Repository,
    archive_name: str | None = None,
    comment: str | None = None,
    on_progress: ProgressCallback | None = None,
    excludes: Sequence[str] | None = None,
) -> FullSystemResult:
    """Back up the whole btrfs subvolume at ``subvolume`` into one archive of
    ``repository`` (which must exist and use borg), from a snapshot deleted afterwards
    whatever happens.

    ``excludes``: directories (relative to the subvolume's root) whose contents are
    left out; default :data:`SYSTEM_EXCLUDES` for ``/`` and nothing elsewhere. A path
    that is not a btrfs subvolume, or a repository of another engine, raises before
    anything is changed; later failures are recorded in the returned result.
    """
    started = time.monotonic()
    _require_borg(repository)
    source = subvolume if isinstance(subvolume, Subvolume) else source_subvolume(subvolume)
    name = archives.check_name(archive_name) if archive_name else archives.default_name()
    is_root = source.path == Path("/")
    content_excludes = (
        tuple(excludes) if excludes is not None else SYSTEM_EXCLUDES if is_root else ()
    )
    result = FullSystemResult(
        "backup",
        repository.name,
        name,
        started=_now(),
        target_root=str(source.path),
        subvolume=str(source.path),
        subvolume_id=source.id,
        subvolume_name=source.name,
    )
    patterns = exclude_patterns(source.path, content_excludes, repository)
    result.excluded = [_describe_pattern(pattern, source.path) for pattern in patterns]
    snapshot_directory = source.path / SNAPSHOT_DIRECTORY
    taken: Subvolume | None = None
    entry = 0
    made: int | None = None
    try:
        nested, mounted = _not_included(source)
        result.not_included = [*nested, *mounted]
        made = journal.make_directory(snapshot_directory, "snapshots")
        clock = time.monotonic()
        result.snapshot_time = _now()
        destination = snapshots.subvolume_path(snapshot_directory, name)
        with journal.subvolume_to_make(f"delete the snapshot {destination}", destination) as entry:
            taken = snapshots.take_snapshot(source, snapshot_directory, name, read_only=False)
        result.snapshot_seconds = time.monotonic() - clock
        result.snapshot = str(taken.path)
        _write_metadata(taken.path, result, comment, patterns, mounted)
        # From here on nothing can change what borg reads.
        snapshots.set_read_only(taken.path)
        summary = archives.comment_summary([], comment, scope=SCOPE, subvolume=str(source.path))
        result.engine_stats = _create(repository, name, taken.path, summary, patterns, on_progress)
        if result.engine_stats.warnings:
            raise _incomplete(
                f"archive {name} (kept in the repository)", result.engine_stats.warnings
            )
        result.notes.append(
            f"Archive {name} holds the btrfs subvolume {source.name or '(top level)'} "
            f"(id {source.id}) at {source.path} as it was at {result.snapshot_time}: "
            f"{result.engine_stats.file_count} files, "
            f"{result.engine_stats.original_size} bytes."
        )
    except HomesafeError as error:
        kind = "engine" if isinstance(error, EngineError) else "snapshot"
        result.errors.append(BackupError(kind, "*", None, str(error)))
    finally:
        if taken is not None:
            try:
                snapshots.delete_subvolume(taken.path)
                journal.active().undone(entry)
            except HomesafeError as error:
                result.errors.append(
                    BackupError("cleanup", "*", None, f"the snapshot is left behind: {error}")
                )
        # Only when empty: a snapshot another run is reading stays where it is.
        with contextlib.suppress(OSError):
            snapshot_directory.rmdir()
        if made is not None:
            journal.active().undone(made)
    if result.not_included:
        result.notes.append(
            "Not in the archive (a snapshot holds neither nested subvolumes nor other "
            "filesystems): " + "; ".join(result.not_included) + "."
        )
    result.duration = time.monotonic() - started
    _record(result)
    return result


def _describe_pattern(pattern: str, root: Path) -> str:
    """A borg pattern as a person reads it: an absolute path, ``/*`` for contents."""
    style, _, path = pattern.partition(":")
    return str(root / path) if style == "pp" else str(root / path.removesuffix("/*")) + "/*"


def _write_metadata(
    snapshot: Path,
    result: FullSystemResult,
    comment: str | None,
    patterns: Sequence[str],
    other_filesystems: Sequence[str],
) -> None:
    """Write ``.homesafe/archive.json`` at the snapshot's root, still writable."""
    if os.path.lexists(snapshot / archives.METADATA_DIRECTORY):
        raise snapshots.SnapshotError(
            f"{result.subvolume} has a {archives.METADATA_DIRECTORY} of its own at its "
            "root, where homesafe keeps an archive's metadata",
            hint="Move it elsewhere to make full-system backups of this subvolume.",
        )
    metadata = archives.build_metadata(
        archive_name=result.archive, comment=comment, apps=[], scope=SCOPE
    )
    metadata["full_system"] = {
        "subvolume": result.subvolume,
        "subvolume_id": result.subvolume_id,
        "subvolume_name": result.subvolume_name,
        "excluded_patterns": list(patterns),
        "not_included": result.not_included,
        "other_filesystems": list(other_filesystems),
        "snapshot_time": result.snapshot_time,
        "snapshot_seconds": round(result.snapshot_seconds, 6),
    }
    archives.write_metadata(snapshot, metadata, {})


def _record(result: FullSystemResult) -> None:
    from homesafe import history

    history.record_operation(result)


# -- restore ------------------------------------------------------------------------------


def _restored_name(current: Subvolume) -> str:
    base = posixpath.basename(current.name) or "root"
    return f"{base}.restored-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}"


@contextlib.contextmanager
def _parent_directory(current: Subvolume) -> Iterator[tuple[Path, str]]:
    """A directory, writable, where a subvolume next to ``current`` can be created, and
    how it was reached.

    That is the directory holding ``current`` in the filesystem (inside it, for the top
    level, which has none). An existing writable mount that shows it is used; else the
    top level is mounted in a scratch directory for the ``with`` block.
    """
    if current.is_top_level:
        yield current.path, f"inside the top level at {current.path}"
        return
    parent_name = "/" + posixpath.dirname(current.name)
    for mount in reversed(snapshots.read_mounts()):
        if (
            mount.device != current.mount.device
            or mount.filesystem_type != "btrfs"
            or mount.read_only
        ):
            continue
        root = mount.root.rstrip("/") or "/"
        if not (root == "/" or parent_name == root or parent_name.startswith(root + "/")):
            continue
        directory = Path(mount.mount_point) / posixpath.relpath(parent_name, root)
        if directory.is_dir():
            yield directory, f"through the mount at {mount.mount_point}"
            return
    # Never inside a directory that is removed recursively (scratch directories are): if
    # the unmount failed, that removal would go on into the whole filesystem.
    mounts = locations.ensure_home() / "mnt"
    mounts.mkdir(mode=0o700, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="full-restore-", dir=mounts))
    # Journaled once made (its name is not known before): recovery removes it, empty,
    # after undoing the mount.
    made = journal.active().record(
        journal.DIRECTORY_CREATED, {"path": str(target), "purpose": "a temporary mount"}
    )
    try:
        options = [f"subvolid={snapshots.BTRFS_TOP_LEVEL_ID}"]
        with journal.command_to_undo(
            f"unmount {target}", snapshots.unmount_argv(target), if_mounted=target
        ) as entry:
            snapshots.mount(current.mount.source, target, options=options, filesystem="btrfs")
        try:
            yield target / parent_name.lstrip("/"), "through a temporary mount of the top level"
        finally:
            snapshots.unmount(target)
            journal.active().undone(entry)
    finally:
        # rmdir only: it fails, harmlessly, if something is still mounted there.
        with contextlib.suppress(OSError):
            target.rmdir()
            journal.active().undone(made)


def fstab_subvolume_options(fstab: str) -> list[str]:
    """The ``subvol=``/``subvolid=`` options of the entries for ``/`` in ``fstab``:
    they pin the root subvolume, so a new default subvolume would not be used."""
    found = []
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[0].startswith("#") or fields[1] != "/":
            continue
        found += [
            option for option in fields[3].split(",") if option.startswith(("subvol=", "subvolid="))
        ]
    return found


def _boot_warnings(restored: Path, mount_point: Path, new_name: str) -> list[str]:
    """What would keep the next boot from using the new default subvolume."""
    warnings = []
    try:
        pinned = fstab_subvolume_options((restored / "etc" / "fstab").read_text())
    except (OSError, UnicodeDecodeError):
        pinned = []
    if pinned:
        warnings.append(
            f"The restored etc/fstab mounts / with {', '.join(pinned)}: the default "
            f"subvolume does not apply to that mount. Change it to subvol=/{new_name} "
            "(or remove it) in the new subvolume's etc/fstab."
        )
    if mount_point == Path("/"):
        try:
            command_line = Path("/proc/cmdline").read_text()
        except OSError:
            command_line = ""
        if "rootflags=" in command_line and "subvol" in command_line:
            warnings.append(
                "The kernel command line names the root subvolume (rootflags=subvol...): "
                f"change it in the boot loader to subvol=/{new_name}, or the next boot "
                "mounts the old one."
            )
    return warnings


def _extract(
    repository: Repository, archive_name: str, target: Path, on_progress: ProgressCallback | None
) -> None:
    """Extract the whole archive into ``target``; any file borg could not write (a
    warning, exit 1) fails the restore."""

    on_record = borg.extract_progress(on_progress)
    completed = borg.run_borg(
        repository,
        extract_argv(repository, archive_name, progress=on_progress is not None),
        accept_warnings=True,
        on_record=on_record,
        working_directory=target,
    )
    if completed.returncode != 0:
        raise _incomplete(f"the restored copy of {archive_name}", completed.messages("WARNING"))


def restore_full(
    archive_name: str,
    *,
    repository: Repository,
    mount_point: str | os.PathLike[str] = "/",
    subvolume_name: str | None = None,
    on_progress: ProgressCallback | None = None,
    check_space: bool = True,
) -> FullSystemResult:
    """Restore the full-system archive ``archive_name`` into a new btrfs subvolume next
    to the one mounted at ``mount_point``, and make it the default subvolume.

    ``check_space``: refuse first, with :class:`~homesafe.restore.InsufficientSpaceError`
    and nothing changed, when the archive's original size does not fit in the
    filesystem's free space (see :func:`_require_space`).

    ``subvolume_name`` names the new subvolume (default ``<current>.restored-<UTC
    time>``). Nothing mounted changes: the next mount without ``subvol=`` shows the
    restored system. The old subvolume is kept; ``rollback`` in the result makes it the
    default again. An archive that is not a full-system one, or a mount point that is
    not a btrfs subvolume, raises before anything is changed; a failed extraction
    deletes the new subvolume and is recorded in the result.
    """
    started = time.monotonic()
    _require_borg(repository)
    current = source_subvolume(mount_point)
    new_name = subvolume_name or _restored_name(current)
    if "/" in new_name or new_name in ("", ".", "..") or new_name == SNAPSHOT_DIRECTORY:
        raise UsageError(f"{new_name!r} cannot name a subvolume")
    description = EngineSource(repository, archive_name).describe()
    if description.metadata.get("scope") != SCOPE:
        raise UsageError(
            f"{archive_name} is not a full-system archive",
            hint="Restore the apps of an app archive with `homesafe restore`.",
        )
    stored = description.metadata.get("full_system") or {}
    result = FullSystemResult(
        "restore",
        repository.name,
        archive_name,
        started=_now(),
        target_root=str(current.path),
        subvolume=str(current.path),
        subvolume_id=current.id,
        subvolume_name=current.name,
        not_included=[str(item) for item in stored.get("not_included", [])],
    )
    previous_default = snapshots.default_subvolume_id(current.path)
    result.previous_default_id = previous_default
    if check_space:
        _require_space(repository, archive_name, current)
    with _parent_directory(current) as (parent, reached):
        target = parent / new_name
        if os.path.lexists(target):
            raise UsageError(
                f"a subvolume or file {new_name} exists already next to "
                f"{current.name or 'the top level'}",
                hint="Give another name with --subvolume-name.",
            )
        destination = snapshots.subvolume_path(parent, new_name)
        with journal.subvolume_to_make(
            f"delete the half-restored subvolume {destination}", destination
        ) as entry:
            created = snapshots.create_subvolume(target)
        full_name = posixpath.join(posixpath.dirname(current.name), new_name)
        result.new_subvolume = full_name
        result.new_subvolume_id = created.id
        try:
            _extract(repository, archive_name, created.path, on_progress)
        except BaseException as error:
            # Half a system must never become the default: remove it.
            result.new_subvolume_id = None
            try:
                snapshots.delete_subvolume(created.path)
                journal.active().undone(entry)
                result.notes.append(f"The new subvolume {full_name} was removed.")
            except HomesafeError as cleanup:
                result.errors.append(
                    BackupError("cleanup", "*", None, f"{full_name} is left behind: {cleanup}")
                )
            if not isinstance(error, HomesafeError):
                raise
            result.errors.append(BackupError("engine", "*", None, str(error)))
        else:
            # Whole: from now on it stays, before it may become the default (a recovery
            # must never delete the default subvolume).
            journal.active().keep(entry, f"{full_name} is restored")
            result.warnings += _boot_warnings(created.path, current.path, full_name)
    if not result.errors:
        try:
            snapshots.set_default_subvolume(created.id, current.path)
        except HomesafeError as error:
            result.errors.append(BackupError("default", "*", None, str(error)))
            result.notes.append(
                f"{archive_name} is restored in the subvolume {full_name} (id {created.id}), "
                "but it is not the default: "
                f"{' '.join(snapshots.set_default_argv(created.id, current.path))} makes it so."
            )
    if result.errors:
        result.notes.append(f"The default subvolume is still {previous_default}.")
    else:
        other_filesystems = [str(item) for item in stored.get("other_filesystems", [])]
        _describe_restore(result, current, created, previous_default, reached, other_filesystems)
    result.duration = time.monotonic() - started
    _record(result)
    return result


def _require_space(repository: Repository, archive_name: str, current: Subvolume) -> None:
    """Refuse, before a subvolume is made, a full restore that cannot fit: the archive's
    original size (``borg info``) and a margin against the filesystem's free space.

    A filesystem mounted with compression may hold more than that says: there the check
    only warns in the log, and a restore that runs out of space is undone (the new
    subvolume deleted)."""
    from homesafe.restore import SPACE_MARGIN_BYTES, InsufficientSpaceError

    argv = [borg.BORG, "info", "--log-json", "--json"]
    completed = borg.run_borg(repository, [*argv, borg.archive_argument(repository, archive_name)])
    try:
        size = int(json.loads(completed.stdout)["archives"][0]["stats"]["original_size"])
    except (ValueError, KeyError, IndexError, TypeError):
        logger.warning("borg info gave no size for %s: free space not checked", archive_name)
        return
    status = os.statvfs(current.path)
    free = status.f_bavail * status.f_frsize
    needed = size + SPACE_MARGIN_BYTES
    if needed <= free:
        return
    message = (
        f"not enough space to restore {archive_name}: it holds {size / 1e9:.2f} GB and "
        f"the filesystem of {current.path} has {free / 1e9:.2f} GB free"
    )
    if any(option.startswith("compress") for option in current.mount.super_options):
        logger.warning("%s (it is compressed: trying anyway)", message)
        return
    raise InsufficientSpaceError(
        f"{message}. Nothing was changed.",
        hint="Free space on that filesystem (old snapshots or subvolumes hold blocks), or "
        "pass --no-space-check if its compression will make the archive fit.",
    )


def _describe_restore(
    result: FullSystemResult,
    current: Subvolume,
    created: Subvolume,
    previous_default: int,
    reached: str,
    other_filesystems: Sequence[str],
) -> None:
    result.rollback = snapshots.set_default_argv(previous_default, current.path)
    device = current.mount.source
    result.notes += [
        f"Restored {result.archive} into the new subvolume {result.new_subvolume} "
        f"(id {created.id}), created {reached}.",
        f"It is now the default subvolume of {device}: the next mount without subvol= "
        f"or subvolid= (the next boot, for /) shows it. {current.path} still shows "
        "the old one until then.",
        f"The old subvolume {current.name or '(top level)'} (id {current.id}) is kept; "
        f"delete it with `btrfs subvolume delete` once the restored system works.",
        f"To switch back: {' '.join(result.rollback)}",
    ]
    nested = snapshots.nested_subvolumes(current)
    if nested:
        result.notes.append(
            "Subvolumes nested in the old subvolume were not in the archive and stay "
            f"there: {', '.join(nested)}. The restored tree has empty directories in "
            "their place; move them over (mv, within the filesystem) if the restored "
            "system needs them."
        )
    if other_filesystems:
        result.notes.append(
            "Filesystems mounted below the subvolume when the archive was made were not "
            f"in it: {'; '.join(other_filesystems)}."
        )
