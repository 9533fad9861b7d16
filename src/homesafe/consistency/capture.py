"""Capture strategies: how each app's paths are held still for as short a time as can be.

An app is *quiesced* (locked down, services stopped) only for the moment its paths are
captured; the archive is then written from the captured copies while the app runs again.
Per path, the cheapest safe way is chosen:

* ``snapshot``: the path is on btrfs: a read-only snapshot of the subvolume holding it
  (and of every subvolume nested below it, which a snapshot leaves out) is taken in
  ``.homesafe-snapshots/`` at the subvolume's root. It costs milliseconds whatever the
  size. Or the path's filesystem is on an LVM thin volume: a thin snapshot of the
  volume (LVM freezes the filesystem for that instant) is mounted read-only in
  ``$HOMESAFE_HOME/mnt/`` while the app is held still. LVM cannot run where homesafe
  is developed (no device-mapper there): its commands are tested as argv, and the
  capture around them with a block-level copy standing in for ``lvcreate``.
* ``clone``: the filesystem makes reflink copies (XFS with reflink=1, and btrfs when a
  clone is asked for): ``cp --reflink=always`` into ``.homesafe-clones/`` at the root of
  the filesystem, while the app runs (metadata only: it grows with the number of files,
  not their size); quiesced, the clone is brought up to date as a staged copy is.
* ``staged``: any other filesystem: a copy in :func:`locations.staging_directory` is
  made by ``rsync`` while the app runs (:meth:`Captures.prepare`) and brought up to
  date, still running, until such a pass is quick; then, quiesced, brought up to date
  for what changed since the last pass began (:meth:`Captures.capture`): the downtime
  grows with what changed in the last second or so, not with the data size. That
  last pass walks the tree once (one ``lstat`` per entry) and copies plain files
  itself (:func:`copy_in_place`), leaving rsync, which takes tens of milliseconds
  to start, to anything else (hard links, symlinks, new directories). Files whose
  change time is after the first copy began are copied again whatever their size and
  modification time say (those can be set back by a program; the change time cannot).
  When the staging area is short of space, the app is stopped for the whole archive
  run instead (``stop``), and the result says why.
* ``live``: nothing held still: the app says it is safe (``consistency = "live"``) or,
  under ``auto``, it has nothing to hold still (no services, no lockdown commands).

An app's strategy is the costliest its paths needed (live < snapshot < clone < staged <
stop); an explicit ``snapshot`` or ``clone`` that some path cannot have fails the app
with the reason, before it is touched. ``stop`` asks for a staged copy and falls back to
stopping for the run.

The engine reads the copies through a private mount namespace where each copy is bind
mounted over its original path (:mod:`.view`), so the archive holds the original paths.
That needs root; without it (or with a Python caller's own backup handler, which reads
the live paths), every app that needs holding still is stopped for the run.

Snapshots, clones and staged copies are recorded in the operation's journal as soon as
they exist and removed by :meth:`Captures.close` however the backup ends (or by
``homesafe recover`` after a crash). Clones and staged copies are new files each time
(new inodes and change times): the engine reads their files again (and deduplicates
them) rather than trust size and modification time alone, which a program can keep
while changing a file (see :class:`ReadView`). Snapshots keep inodes and change times.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import posixpath
import re
import shutil
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from homesafe import allocation, execute, journal, locations
from homesafe.consistency import snapshots
from homesafe.consistency.view import PRIVATE_NAMESPACE_ARGV, wrapper_argv
from homesafe.engines.base import ReadView
from homesafe.errors import CommandError, HomesafeError
from homesafe.manifest import Manifest, is_inside

__all__ = [
    "METHODS",
    "REQUESTABLE",
    "AppCapturePlan",
    "CaptureError",
    "Captures",
    "plan_app",
    "views_available",
]

logger = logging.getLogger(__name__)

Method = Literal["live", "snapshot", "clone", "staged", "stop"]
# Cheapest first: an app's strategy is the last of these any of its paths needed.
METHODS: tuple[Method, ...] = ("live", "snapshot", "clone", "staged", "stop")
# What a manifest's ``consistency`` or ``--strategy`` may ask for.
REQUESTABLE = ("auto", "snapshot", "clone", "stop", "live")
SNAPSHOT_DIRECTORY = ".homesafe-snapshots"
CLONE_DIRECTORY = ".homesafe-clones"
# Filesystems worth probing for reflinks (btrfs has snapshots, which come first).
REFLINK_FILESYSTEMS = frozenset({"xfs", "btrfs", "bcachefs", "ocfs2", "zfs"})
# A file changed this long before the first copy began is copied again under quiesce:
# change times come from a coarse clock (a few milliseconds).
CHANGE_TIME_MARGIN_NS = 1_000_000_000
# Space a staged copy must leave free on its filesystem, beyond its own growth.
STAGING_RESERVE_BYTES = 64 * 1024 * 1024
STAGING_RESERVE_FRACTION = 0.02
COPY_TIMEOUT = 6 * 3600.0
RSYNC_OPTIONS = ("-aHAX", "--numeric-ids")
# Passes that bring a first copy up to date while the app still runs, and the pass
# time under which one more would gain nothing (the change-time margin dominates).
CATCH_UP_PASSES = 3
CATCH_UP_QUICK_NS = 250_000_000


class CaptureError(HomesafeError):
    """A path could not be captured the way its app needs."""


@dataclass
class PathPlan:
    path: str
    method: Method


@dataclass
class AppCapturePlan:
    """How one app is captured: its strategy, the method per path, and why it is not
    cheaper (``notes``). ``problem``: the asked-for strategy is impossible; the app
    fails with it before anything is touched."""

    app_id: str
    strategy: Method
    paths: list[PathPlan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problem: str | None = None

    @property
    def holds_still_for_the_run(self) -> bool:
        return self.strategy == "stop"


@functools.cache
def views_available() -> bool:
    """Whether copies can be shown at their original paths to the engine: a private
    mount namespace needs root with CAP_SYS_ADMIN (a container may withhold it) and
    ``unshare``; tried once per process with a namespace that runs ``true``."""
    if not locations.running_as_root():
        return False
    return execute.succeeds([*PRIVATE_NAMESPACE_ARGV, "true"], timeout=30)


def _has_nothing_to_hold_still(manifest: Manifest) -> bool:
    return not manifest.services and not manifest.lockdown.enter


def _can_snapshot(path: str) -> str | None:
    """None when ``path`` can be captured by a snapshot (btrfs, or an LVM thin volume
    under any filesystem), else why not."""
    kind = snapshots.filesystem_type(path)
    if kind != "btrfs" and snapshots.thin_volume_of(path) is None:
        return f"{path} is on {kind}, neither btrfs nor an LVM thin volume"
    return None


def _can_clone(path: str) -> str | None:
    kind = snapshots.filesystem_type(path)
    if kind not in REFLINK_FILESYSTEMS:
        return f"{path} is on {kind}, which makes no reflink copies"
    root = snapshots.mount_of(path).mount_point
    if not snapshots.supports_reflink(root):
        return f"{path} is on {kind} without reflink support"
    return None


def _cheapest(path: str) -> Method:
    """The cheapest way to capture ``path`` safely, copies being readable in place."""
    if os.path.islink(path):
        return "live"  # a symlink is its target's name: read as it is
    if _can_snapshot(path) is None:
        return "snapshot"
    if _can_clone(path) is None:
        return "clone"
    return "staged"


def plan_app(
    app_id: str,
    manifest: Manifest,
    paths: Sequence[str],
    requested: str | None = None,
    *,
    views: bool | None = None,
) -> AppCapturePlan:
    """Choose how to capture ``paths`` (the app's existing paths) of one app.

    ``requested`` overrides the manifest's ``consistency`` (the CLI's ``--strategy``);
    ``views``: whether copies can be read at their original paths (default:
    :func:`views_available`). Looks at filesystems only; changes nothing.
    """
    wanted = requested or manifest.consistency
    plan = AppCapturePlan(app_id, "live")
    if wanted == "live" or (wanted == "auto" and _has_nothing_to_hold_still(manifest)):
        plan.paths = [PathPlan(path, "live") for path in paths]
        return plan
    views = views_available() if views is None else views
    if not views:
        plan.strategy = "stop"
        plan.paths = [PathPlan(path, "stop") for path in paths]
        if wanted != "stop":
            plan.notes.append(
                "services stayed stopped for the archive run: reading snapshots, clones "
                "or staged copies at the original paths needs a private mount namespace "
                "(root, with the right to make one)"
            )
        return plan
    for path in paths:
        if wanted in ("snapshot", "clone"):
            refused = _can_snapshot(path) if wanted == "snapshot" else _can_clone(path)
            if refused is not None and not os.path.islink(path):
                plan.problem = f"consistency = {wanted} is impossible: {refused}"
                return plan
            method: Method = "live" if os.path.islink(path) else wanted  # type: ignore[assignment]
        elif wanted == "stop":
            method = "live" if os.path.islink(path) else "staged"
        else:
            method = _cheapest(path)
        plan.paths.append(PathPlan(path, method))
    plan.strategy = max(
        (entry.method for entry in plan.paths), key=METHODS.index, default="snapshot"
    )
    if not plan.paths:
        plan.strategy = "snapshot" if wanted == "snapshot" else "live"
    if plan.strategy == "staged" and shutil.which("rsync") is None:
        _stop_for_the_run(plan, "rsync is not installed (Debian package rsync)")
    return plan


def _stop_for_the_run(plan: AppCapturePlan, reason: str) -> None:
    plan.strategy = "stop"
    plan.paths = [PathPlan(entry.path, "stop") for entry in plan.paths]
    plan.notes.append(f"services stayed stopped for the archive run: {reason}")


# -- the captures of one backup -------------------------------------------------------


def _rsync_argv(
    source: str, destination: Path, *, listed: bool = False, again: bool = False
) -> list[str]:
    """rsync of ``source`` onto ``destination``; ``listed``: only the entries named on
    stdin (NUL-separated, relative to ``source``), each copied whatever its size and
    time say, and deleted from ``destination`` when ``source`` has it no more."""
    # A trailing slash copies a directory's contents into ``destination`` itself.
    origin = source.rstrip("/") + "/" if os.path.isdir(source) else source
    argv = ["rsync", *RSYNC_OPTIONS]
    if listed:
        argv += ["--files-from=-", "--from0", "--delete-missing-args", "--force"]
    else:
        argv.append("--delete")
    if listed or again:
        argv.append("--ignore-times")
    return [*argv, "--", origin, os.fspath(destination)]


def _tree_bytes(path: str | Path) -> int:
    total = 0
    for found, directories, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(found, name)).st_blocks * 512
        total += len(directories) * 4096
    if not os.path.isdir(path):
        with contextlib.suppress(OSError):
            total += os.lstat(path).st_blocks * 512
    return total


def _staging_shortfall(paths: Sequence[str], directory: Path) -> str | None:
    """Why copies of ``paths`` would not fit in ``directory``, or None when they do."""
    growth = sum(_tree_bytes(path) for path in paths)
    facts = os.statvfs(directory)
    free = facts.f_bavail * facts.f_frsize
    size = facts.f_blocks * facts.f_frsize
    reserve = max(STAGING_RESERVE_BYTES, int(size * STAGING_RESERVE_FRACTION))
    if growth + reserve > free:
        return (
            f"not enough space to stage a copy in {directory}: it needs "
            f"{growth // 2**20} MiB and {reserve // 2**20} MiB to spare, "
            f"{free // 2**20} MiB are free (set HOMESAFE_STAGING to a roomier place)"
        )
    return None


class Captures:
    """The snapshots, clones and staged copies of one backup run, and the view the
    engine reads them through. Use as a context manager: :meth:`close` removes every
    snapshot and clone, whatever happened."""

    def __init__(self, run_name: str) -> None:
        self.run_name = run_name
        self.binds: list[tuple[str, str]] = []
        self.excludes: list[str] = []
        self._stack = contextlib.ExitStack()
        self._snapshots: list[tuple[Path, int]] = []  # (path, journal entry)
        self._lvm_snapshots: list[tuple[snapshots.LogicalVolume, int]] = []
        self._lvm_mounts: list[tuple[Path, int]] = []  # (mount point, journal entry)
        self._holders: dict[Path, int] = {}  # directories made, with journal entries
        self._clone_directories: dict[str, Path] = {}  # mount point -> directory of run
        self._staging: Path | None = None  # this run's directory of staged copies
        # path -> (its copy, when the first pass began), until the quiesced pass.
        self._staged: dict[str, tuple[Path, int]] = {}
        self._cloned: dict[str, tuple[Path, int]] = {}
        self._stop_reasons: dict[str, str] = {}  # app -> why it cannot be staged
        self._counter = 0
        self._taken_now: dict[Path, Path] = {}  # subvolume -> its snapshot, for one app

    def __enter__(self) -> Captures:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def view(self) -> ReadView | None:
        """The view of every capture made, or None when the engine reads live paths."""
        if not self.binds:
            return None
        return ReadView(
            wrapper=tuple(wrapper_argv(self.binds)),
            excludes=tuple(self.excludes),
        )

    # -- before the quiesce --------------------------------------------------------

    def prepare(self, plan: AppCapturePlan) -> None:
        """Work that needs no quiesce, done while the app runs: the clone of every clone
        path and the first copy of every staged path (the quiesced pass then brings
        them up to date); a staging area short of space turns the plan into ``stop``."""
        for entry in plan.paths:
            if entry.method == "clone":
                started = time.time_ns()
                copy = self._make_clone(entry.path)
                skip = {str(Path(snapshots.mount_of(entry.path).mount_point) / CLONE_DIRECTORY)}
                self._cloned[entry.path] = (copy, self._catch_up(entry.path, copy, started, skip))
        staged = [entry.path for entry in plan.paths if entry.method == "staged"]
        if not staged:
            return
        root = locations.staging_directory()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        shortfall = _staging_shortfall(staged, root)
        if shortfall is not None:
            self._stop_reasons[plan.app_id] = shortfall
            _stop_for_the_run(plan, shortfall)
            return
        for path in staged:
            started = time.time_ns()
            copy = self._new_staged_copy(plan.app_id, path)
            self._copy(path, copy)
            self._staged[path] = (copy, self._catch_up(path, copy, started))

    def _catch_up(
        self, path: str, copy: Path, started: int, skip: frozenset[str] | set[str] = frozenset()
    ) -> int:
        """Bring the first copy of ``path`` (begun at ``started``) up to date with what
        changed while it was made, still while the app runs, until a pass is quick:
        what is left for the quiesced pass is then what changed in the last second or
        so, not during the whole first copy. Returns when the last pass began."""
        for _ in range(CATCH_UP_PASSES):
            began = time.time_ns()
            self._bring_up_to_date(path, copy, started, skip)
            started = began
            if time.time_ns() - began < CATCH_UP_QUICK_NS:
                break
        return started

    def _new_staged_copy(self, app_id: str, path: str) -> Path:
        """Where to stage ``path`` of ``app_id`` in this run (its parent made)."""
        if self._staging is None:
            root = locations.staging_directory()
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._staging = self._stack.enter_context(
                journal.temporary_directory(root, f"{self.run_name}-")
            )
            allocation.spread_subdirectories(self._staging)
        copy = self._staging / app_id / f"{self._next_number()}-{Path(path).name or 'root'}"
        copy.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return copy

    # -- under the quiesce --------------------------------------------------------

    def capture(self, plan: AppCapturePlan) -> None:
        """Take the app's snapshots, clones and last staged copies (call it quiesced).
        Raises :class:`CaptureError` (or a command's error) when one cannot be made;
        what was made stays recorded for :meth:`close`. A plan whose staged copy did not
        fit (:meth:`prepare`) becomes ``stop`` here too."""
        reason = self._stop_reasons.get(plan.app_id)
        if reason is not None and plan.strategy != "live":
            _stop_for_the_run(plan, reason)
        # Paths of the app in one subvolume share one snapshot: it is of one instant.
        self._taken_now = {}
        for entry in plan.paths:
            if entry.method == "snapshot":
                self._snapshot(entry.path)
            elif entry.method == "clone":
                self._clone(entry.path)
            elif entry.method == "staged":
                self._finish_staged_copy(plan.app_id, entry.path)

    def _next_number(self) -> int:
        """A number no other snapshot, clone or copy of this run has."""
        self._counter += 1
        return self._counter

    def _next_name(self) -> str:
        return f"{self.run_name}-{self._next_number()}"

    def _snapshot(self, path: str) -> None:
        if snapshots.filesystem_type(path) != "btrfs":
            self._lvm_snapshot(path)
            return
        subvolume = snapshots.subvolume_of(path)
        original = Path(os.path.realpath(path))
        for source, copy in self._snapshot_tree(subvolume, original):
            self.binds.append((os.fspath(copy), os.fspath(source)))
        holder = subvolume.path / SNAPSHOT_DIRECTORY
        if is_inside(os.fspath(holder), os.fspath(original)):
            self.excludes.append(os.fspath(Path(path) / holder.relative_to(original)))

    def _snapshot_tree(
        self, subvolume: snapshots.Subvolume, path: Path, holder: Path | None = None
    ) -> Iterator[tuple[Path, Path]]:
        """Snapshot ``subvolume`` and yield (``path``, its place in the snapshot), then
        the same for each subvolume nested below ``path`` (a snapshot holds none).
        Nested subvolumes' snapshots go into the outermost one's ``holder``, so that
        one directory is all there is to leave out of the archive."""
        holder = holder or subvolume.path / SNAPSHOT_DIRECTORY
        taken = self._take_snapshot(subvolume, holder)
        yield path, taken / path.relative_to(subvolume.path)
        if not path.is_dir() or path.is_symlink():
            return
        for name in snapshots.nested_subvolumes(subvolume):
            nested = subvolume.path / name
            if SNAPSHOT_DIRECTORY in Path(name).parts:
                continue  # a snapshot of an earlier run that could not be deleted
            if not is_inside(os.fspath(nested), os.fspath(path)):
                continue
            yield from self._snapshot_tree(snapshots.subvolume_at(nested), nested, holder)

    def _lvm_snapshot(self, path: str) -> None:
        """Bind ``path`` to its place in a mounted thin snapshot of its volume (one
        snapshot per volume and app: the app's paths on it are of one instant)."""
        mount = snapshots.mount_of(path)
        volume = snapshots.thin_volume_of(path)
        if volume is None:
            raise CaptureError(f"{path} is not on an LVM thin volume any more")
        key = Path(mount.source)
        target = self._taken_now.get(key)
        if target is None:
            target = self._take_lvm_snapshot(volume, mount)
            self._taken_now[key] = target
        # The snapshot holds the whole filesystem; the mount may show a part of it.
        inside = posixpath.join(
            mount.root, os.path.relpath(os.path.realpath(path), mount.mount_point)
        )
        self.binds.append((os.fspath(target / inside.lstrip("/")), path))

    def _take_lvm_snapshot(self, volume: snapshots.LogicalVolume, mount: snapshots.Mount) -> Path:
        """Snapshot ``volume`` and mount the snapshot read-only; returns where."""
        name = re.sub(r"[^A-Za-z0-9+_.-]", "_", f"homesafe-{self._next_name()}")[:120]
        wanted = snapshots.LogicalVolume(volume.volume_group, name)
        with journal.command_to_undo(
            f"LVM snapshot {wanted.full_name} of {volume.full_name}",
            snapshots.lvm_remove_argv(wanted),
            if_exists=f"/dev/{wanted.full_name}",
        ) as entry:
            try:
                taken = snapshots.take_lvm_snapshot(volume, name)
            except HomesafeError:
                # lvcreate may have made it before failing (to activate it, say).
                with contextlib.suppress(HomesafeError):
                    snapshots.delete_lvm_snapshot(wanted)
                raise
        self._lvm_snapshots.append((taken, entry))
        mounts = locations.ensure_home() / "mnt"
        mounts.mkdir(mode=0o700, exist_ok=True)
        target = mounts / name
        self._make_holder(target, "a snapshot mount")
        with journal.command_to_undo(
            f"unmount {target}", snapshots.unmount_argv(target), if_mounted=target
        ) as unmount:
            snapshots.mount(
                taken.device or f"/dev/{taken.full_name}",
                target,
                options=snapshots.snapshot_mount_options(mount.filesystem_type),
                filesystem=mount.filesystem_type,
            )
        self._lvm_mounts.append((target, unmount))
        return target

    def _make_holder(self, holder: Path, purpose: str) -> None:
        """Make ``holder`` (the directory snapshots or clones go in) if it is missing;
        journaled first, so that recovery removes it once it is empty again."""
        if holder in self._holders:
            return
        entry = journal.make_directory(holder, purpose)
        if entry is not None:
            self._holders[holder] = entry

    def _take_snapshot(self, subvolume: snapshots.Subvolume, holder: Path) -> Path:
        if subvolume.path in self._taken_now:
            return self._taken_now[subvolume.path]
        self._make_holder(holder, "snapshots")
        name = self._next_name()
        destination = snapshots.subvolume_path(holder, name)
        with journal.subvolume_to_make(
            f"snapshot {destination} of {subvolume.path}", destination
        ) as entry:
            taken = snapshots.take_snapshot(subvolume, holder, name)
        self._snapshots.append((taken.path, entry))
        self._taken_now[subvolume.path] = taken.path
        return taken.path

    def _clone(self, path: str) -> None:
        prepared = self._cloned.pop(path, None)
        if prepared is None:  # made by a backup_pre hook: cloned now
            copy = self._make_clone(path)
        else:
            copy, started = prepared
            mount_point = snapshots.mount_of(path).mount_point
            self._bring_up_to_date(path, copy, started, {str(Path(mount_point) / CLONE_DIRECTORY)})
        self.binds.append((os.fspath(copy), path))

    def _make_clone(self, path: str) -> Path:
        """A reflink clone of ``path`` in ``.homesafe-clones/`` at the root of its
        filesystem (the clone must be on the same filesystem)."""
        mount_point = snapshots.mount_of(path).mount_point
        directory = self._clone_directories.get(mount_point)
        if directory is None:
            holder = Path(mount_point) / CLONE_DIRECTORY
            self._make_holder(holder, "clones")
            directory = self._stack.enter_context(
                journal.temporary_directory(holder, f"{self.run_name}-")
            )
            self._clone_directories[mount_point] = directory
        copy = directory / str(self._next_number())
        if os.path.realpath(path) == os.path.realpath(mount_point):
            self._clone_entries(path, copy)
        else:
            snapshots.reflink_clone(path, copy)
        return copy

    def _clone_entries(self, path: str, copy: Path) -> None:
        """Clone the root of a filesystem entry by entry: the clones' own directory is
        in it and must not be cloned into itself."""
        copy.mkdir(mode=0o700)
        entries = [entry.path for entry in os.scandir(path) if entry.name != CLONE_DIRECTORY]
        if entries:
            argv = ["cp", "-a", "--reflink=always", "--target-directory", os.fspath(copy)]
            execute.run([*argv, "--", *entries], timeout=COPY_TIMEOUT)
        status = os.lstat(path)
        os.chown(copy, status.st_uid, status.st_gid)
        shutil.copystat(path, copy)

    def _copy(
        self, path: str, copy: Path, changed: list[str] | None = None, again: bool = False
    ) -> None:
        """rsync ``path`` to ``copy``: all of it, or only the ``changed`` entries (see
        :func:`changed_since`); ``again``: whatever rsync's size-and-time check says."""
        try:
            execute.run(
                _rsync_argv(path, copy, listed=changed is not None, again=again),
                input_data=b"".join(name.encode() + b"\0" for name in changed or ()),
                timeout=COPY_TIMEOUT,
            )
        except CommandError as error:
            if "No space left" in error.stderr_tail:
                raise CaptureError(
                    f"the staged copy of {path} filled {locations.staging_directory()}",
                    hint="Free space there or set HOMESAFE_STAGING to a roomier place.",
                ) from error
            raise
        if changed:
            _set_directory_times(path, copy, changed)

    def _finish_staged_copy(self, app_id: str, path: str) -> None:
        prepared = self._staged.pop(path, None)
        if prepared is None:  # made by a backup_pre hook (a dump, say): copied whole now
            copy = self._new_staged_copy(app_id, path)
            self._copy(path, copy)
        else:
            copy, started = prepared
            self._bring_up_to_date(path, copy, started)
        self.binds.append((os.fspath(copy), path))

    def _bring_up_to_date(
        self, path: str, copy: Path, started: int, skip: frozenset[str] | set[str] = frozenset()
    ) -> None:
        """The last pass, quiesced: only what changed since the first pass began (at
        ``started``) is copied or deleted; nothing at all when nothing did. ``skip``:
        absolute paths in ``path`` that are not part of it (the clones' directory)."""
        since = started - CHANGE_TIME_MARGIN_NS
        if os.path.isdir(path) and not os.path.islink(path):
            changed = changed_since(path, copy, since, skip)
            if changed and not copy_in_place(path, copy, changed):
                self._copy(path, copy, changed)
            # The top directory itself: rsync given "." copies all it holds.
            if os.lstat(path).st_ctime_ns >= since:
                status = os.lstat(path)
                os.chown(copy, status.st_uid, status.st_gid)
                shutil.copystat(path, copy)
        elif os.lstat(path).st_ctime_ns >= since:
            self._copy(path, copy, changed=None, again=True)

    # -- afterwards ----------------------------------------------------------------

    def close(self) -> None:
        """Delete every snapshot, clone and staged copy of this run (the journal keeps
        what cannot be deleted, for ``homesafe recover``)."""
        failures = []
        for target, entry in reversed(self._lvm_mounts):
            try:
                snapshots.unmount(target)
            except HomesafeError as error:
                failures.append(f"{target}: {error.message}")
                logger.warning("could not unmount the snapshot at %s: %s", target, error.message)
            else:
                journal.active().undone(entry)
        self._lvm_mounts.clear()
        for volume, entry in reversed(self._lvm_snapshots):
            try:
                snapshots.delete_lvm_snapshot(volume)
            except HomesafeError as error:
                failures.append(f"{volume.full_name}: {error.message}")
                logger.warning("could not remove %s: %s", volume.full_name, error.message)
            else:
                journal.active().undone(entry)
        self._lvm_snapshots.clear()
        for path, entry in reversed(self._snapshots):
            try:
                snapshots.delete_subvolume(path)
            except HomesafeError as error:
                failures.append(f"{path}: {error.message}")
                logger.warning("could not delete the snapshot %s: %s", path, error.message)
            else:
                journal.active().undone(entry)
        self._snapshots.clear()
        self._stack.close()
        self._clone_directories.clear()
        for holder, entry in self._holders.items():
            with contextlib.suppress(OSError):
                holder.rmdir()  # only when empty: a snapshot not deleted stays in it
            journal.active().undone(entry)
        self._holders.clear()
        if failures:
            raise CaptureError(
                "could not remove " + "; ".join(failures),
                hint="`homesafe recover` tries again.",
            )


def changed_since(
    path: str, copy: Path, since_ns: int, skip: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    """What of the tree ``path`` differs from its staged ``copy`` by a change made at
    or after ``since_ns`` (wall clock): paths relative to ``path`` (not ``path``
    itself) of every entry whose change time is that late, of every entry below a directory the
    copy does not have (new, or renamed: a renamed tree keeps its entries' times), and
    of every entry the copy has that ``path`` no longer has (to delete). Absolute paths
    in ``skip`` are left out, with everything below them.

    The change time is set by the kernel on every write, rename, link and metadata
    change; a program can set the modification time back, not the change time. Only
    directories that changed are listed against their copy, so the cost is one
    ``lstat`` per entry plus the changed directories. It runs while the app is held
    still: one ``scandir`` per directory, no path normalising per entry.
    """
    changed: list[str] = []
    late_top = os.lstat(path).st_ctime_ns >= since_ns
    # (directory, its path relative to ``path`` with a trailing slash or "", whether it
    # changed, whether the copy lacks it); "." itself is never listed (rsync given "."
    # would copy all it holds; see _bring_up_to_date).
    pending: list[tuple[str, str, bool, bool]] = [(path, "", late_top, False)]
    while pending:
        directory, prefix, late, everything = pending.pop()
        try:
            with os.scandir(directory) as found:
                entries = list(found)
        except (FileNotFoundError, NotADirectoryError):
            continue  # gone meanwhile: nothing to copy (quiesced, it stays gone)
        if late and not everything:
            try:
                copied = os.listdir(copy / prefix if prefix else copy)
            except (FileNotFoundError, NotADirectoryError):
                everything = True  # new, renamed, or a file before: all of it
            else:
                present = {entry.name for entry in entries}
                changed.extend(prefix + name for name in copied if name not in present)
        for entry in entries:
            if skip and entry.path in skip:
                continue
            try:
                status = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            relative = prefix + entry.name
            entry_late = everything or status.st_ctime_ns >= since_ns
            if entry_late:
                changed.append(relative)
            if stat.S_ISDIR(status.st_mode):
                pending.append((entry.path, relative + "/", entry_late, everything))
    return changed


# -- the quiesced pass without rsync ---------------------------------------------------


def copy_in_place(path: str, copy: Path, changed: Sequence[str]) -> bool:
    """Bring ``copy`` up to date for the ``changed`` entries of ``path`` (as listed by
    :func:`changed_since`) without starting rsync, when every one of them is simple:
    a regular file with a single link (new, or already a regular file in the copy), a
    file or symlink the source no longer has, or a directory both sides have. Contents,
    owner, mode, modification time and extended attributes (ACLs included) end as
    ``rsync -aHAX --numeric-ids`` would leave them. Returns False, having changed
    nothing, when some entry is not simple (hard links, symlinks, special files, a
    change of type, new directories) or when an entry cannot be copied here (an
    attribute the staging filesystem refuses, no space): rsync then does the whole
    list, and reports what is wrong.

    Why: an rsync run costs tens of milliseconds to start, which is most of the last
    pass when little changed, and the app is held still during it.
    """
    files: list[tuple[str, Path, os.stat_result]] = []
    doomed: list[Path] = []
    directories: list[tuple[str, Path, os.stat_result]] = []
    for relative in changed:
        source = os.path.join(path, relative)
        target = copy / relative
        source_status = _lstat_or_none(source)
        target_status = _lstat_or_none(target)
        if source_status is None:
            if target_status is None:
                continue
            if stat.S_ISDIR(target_status.st_mode):
                return False
            doomed.append(target)
        elif stat.S_ISREG(source_status.st_mode) and source_status.st_nlink == 1:
            if target_status is None:
                if not target.parent.is_dir() or target.parent.is_symlink():
                    return False
            elif not stat.S_ISREG(target_status.st_mode) or target_status.st_nlink != 1:
                return False
            files.append((source, target, source_status))
        elif stat.S_ISDIR(source_status.st_mode):
            if target_status is None or not stat.S_ISDIR(target_status.st_mode):
                return False
            directories.append((source, target, source_status))
        else:
            return False
    try:
        for source, target, status in files:
            _copy_file(source, target, status)
        for target in doomed:
            target.unlink()
        # Deepest first: entries written in a directory change its modification time.
        for source, target, status in sorted(directories, key=lambda item: -len(item[1].parts)):
            _copy_metadata(source, target, status)
    except OSError as error:
        logger.debug("copying in place failed, rsync takes over: %s", error)
        return False
    return True


def _set_directory_times(path: str, copy: Path, changed: Sequence[str]) -> None:
    """Give the listed directories of ``copy`` their source's times again, deepest
    first: rsync given a list (no recursion) sets a new directory's time before it
    makes the directories listed inside it, which then change it."""
    directories = []
    for relative in changed:
        status = _lstat_or_none(os.path.join(path, relative))
        if status is not None and stat.S_ISDIR(status.st_mode):
            directories.append((copy / relative, status))
    for target, status in sorted(directories, key=lambda item: -len(item[0].parts)):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns), follow_symlinks=False)


def _lstat_or_none(path: str | Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _copy_file(source: str, target: Path, status: os.stat_result) -> None:
    """Copy a regular file's contents and metadata onto ``target`` (made or rewritten).

    The old contents are overwritten, then cut to the new size, not truncated first:
    ext4 flushes a file truncated to nothing and rewritten when it is closed (its
    replace-by-truncate safeguard), milliseconds per file while the app is held still.
    """
    with _descriptors(source, os.O_RDONLY, target, os.O_WRONLY | os.O_CREAT) as (reader, writer):
        size = os.fstat(reader).st_size
        offset = 0
        while offset < size:
            sent = os.sendfile(writer, reader, offset, size - offset)
            if sent == 0:
                break  # shrunk meanwhile (not while quiesced): rsync would agree
            offset += sent
        os.ftruncate(writer, offset)
        _copy_attributes(reader, writer, status)


def _copy_metadata(source: str, target: Path, status: os.stat_result) -> None:
    """Owner, extended attributes, mode and times of a directory onto ``target``."""
    flags = os.O_RDONLY | os.O_DIRECTORY
    with _descriptors(source, flags, target, flags) as (reader, writer):
        _copy_attributes(reader, writer, status)


@contextlib.contextmanager
def _descriptors(
    source: str, source_flags: int, target: Path, target_flags: int
) -> Iterator[tuple[int, int]]:
    """``source`` and ``target`` opened with these flags (never through a symlink)."""
    reader = os.open(source, source_flags | os.O_NOFOLLOW)
    try:
        writer = os.open(target, target_flags | os.O_NOFOLLOW, 0o600)
        try:
            yield reader, writer
        finally:
            os.close(writer)
    finally:
        os.close(reader)


def _copy_attributes(reader: int, writer: int, status: os.stat_result) -> None:
    # Owner first: a change of owner clears set-user-ID and set-group-ID bits.
    os.fchown(writer, status.st_uid, status.st_gid)
    wanted = {name: os.getxattr(reader, name) for name in os.listxattr(reader)}
    for name in os.listxattr(writer):
        if name not in wanted:
            os.removexattr(writer, name)
    for name, value in wanted.items():
        os.setxattr(writer, name, value)
    # After the ACL (an attribute): the mode's group bits are its mask, equal on both.
    os.fchmod(writer, stat.S_IMODE(status.st_mode))
    os.utime(writer, ns=(status.st_atime_ns, status.st_mtime_ns))
