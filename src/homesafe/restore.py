"""Staged atomic restore: nothing of an app is touched until all of it is ready.

For each path of each app being restored:

1. **plan** — where it goes (below the target root) and a staging area on the *same
   filesystem* (so that moving it into place is a rename, never a copy);
2. **check space** — every filesystem must hold what will be staged on it, before
   anything is written;
3. **stage** — the engine extracts the paths into the staging areas while the apps still
   run, in several calls side by side when it extracts on one core
   (:func:`plan_extractions`);
4. **verify** — every archived file is there with its size;
5. **swap** (under quiesce) — the live path is renamed aside, the staged one renamed into
   place; the previous copy is kept until the whole app succeeded, so that any failure
   (a hook, a service that will not start) is rolled back by renaming back.

A path the archive does not hold (it did not exist at backup time) is moved aside too:
after a restore, each app's paths are exactly what the archive says.

Every staging area, every rename and every directory made is written to the journal
(:mod:`homesafe.journal`) before it happens, so that a restore killed half-way is rolled
back by the next homesafe command: each app back to its previous copy, staging removed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from homesafe import allocation, archives, execute, journal, locations
from homesafe.archives import PathSize
from homesafe.engines.base import ArchiveEntry, Progress, ProgressCallback
from homesafe.errors import HomesafeError, RepositoryLockedError
from homesafe.manifest import is_inside
from homesafe.sources import ArchiveSource

STAGING_PREFIX = ".homesafe-staging-"
# Room left free besides the staged bytes: filesystem blocks, directories, metadata.
SPACE_MARGIN_BYTES = 16 * 1024 * 1024
BLOCK_OVERHEAD_BYTES = 4096
# Threads unlinking files in discard(), and directories of files waiting for them.
DISCARD_THREADS = 4
DISCARD_QUEUED_DIRECTORIES = 64
# The least an engine call of a restore made side by side with others extracts: each
# call pays the engine's start-up again (borg: ~0.1 s of CPU without its self-tests).
# From a remote repository it also opens a connection and starts `borg serve` there
# (~0.7 s of CPU between both ends): over ssh, to a server on the same 2 cores, raw
# `borg extract` of 206 MB in two calls took 0.80 of one call, of 129 MB 1.00. Where a
# directory shared out needs a last call (no record with its times: see
# plan_extractions), that call is one more connection after the others: 200 MB took
# 3.5 s in two calls and the last, 2.8 s in one.
PARALLEL_EXTRACTION_MIN_BYTES = 64 * 1024 * 1024
REMOTE_PARALLEL_EXTRACTION_MIN_BYTES = 96 * 1024 * 1024
REMOTE_UNSETTLED_EXTRACTION_MIN_BYTES = 256 * 1024 * 1024


class RestoreError(HomesafeError):
    """The restore of an app could not go on; what was changed has been put back."""


class InsufficientSpaceError(HomesafeError):
    """A filesystem cannot hold what a restore would stage on it."""


class VerificationError(RestoreError):
    """What was extracted does not match the archive's listing."""


@dataclass
class StagingArea:
    """A private directory on one filesystem: ``new/`` holds staged copies, ``old/`` the
    live copies moved aside."""

    device: int
    anchor: Path  # an existing directory on that filesystem
    root: Path | None = None
    entry: int | None = None  # in the journal

    def create(self) -> Path:
        if self.root is None:
            base = locations.ensure_home() / "tmp"
            base.mkdir(exist_ok=True, mode=0o700)
            # homesafe's own scratch space when it is on that filesystem, else beside
            # the targets themselves.
            parent = base if os.stat(base).st_dev == self.device else self.anchor
            # Named before it is made, so that the journal knows it before it exists.
            root = parent / f"{STAGING_PREFIX}{os.urandom(6).hex()}"  # as secrets.token_hex
            self.entry = journal.active().record(journal.TEMPORARY_DIRECTORY, {"path": str(root)})
            root.mkdir(mode=0o700)
            self.root = root
            allocation.spread_subdirectories(root)  # before "new": see the module
            (root / "new").mkdir()
            (root / "old").mkdir()
        return self.root

    def remove(self) -> None:
        if self.root is not None:
            discard(self.root)
            if self.entry is not None and not os.path.lexists(self.root):
                journal.active().undone(self.entry)
            self.root = None
            self.entry = None

    def keep(self, reason: str) -> None:
        """Leave the area where it is, for good: recovery must not remove it."""
        if self.entry is not None:
            journal.active().keep(self.entry, reason)
            self.entry = None


def discard(path: Path) -> None:
    """Remove ``path`` and everything below it, as far as possible, never following a
    link: errors are ignored, and what could not be removed stays.

    Directories are walked through their descriptors (as shutil.rmtree does), so that
    a directory swapped for a link meanwhile is never entered. Unlinking is the kernel's
    work, most of it waiting (some 0.1 ms a file on ext4), so the files of each directory
    are unlinked by DISCARD_THREADS threads at once; the directories left, and anything
    else, then go with shutil.rmtree.
    """
    if not os.path.isdir(path) or os.path.islink(path):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    # (descriptor of a directory, names of files in it); None tells a thread to stop.
    batches: queue.Queue[tuple[int, list[str]] | None] = queue.Queue(DISCARD_QUEUED_DIRECTORIES)

    def unlink_batches() -> None:
        while (batch := batches.get()) is not None:
            directory, names = batch
            try:
                for name in names:
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=directory)
            finally:
                os.close(directory)

    threads = [
        threading.Thread(target=unlink_batches, name=f"discard-{number}", daemon=True)
        for number in range(DISCARD_THREADS)
    ]
    for thread in threads:
        thread.start()
    try:
        for _directory, _subdirectories, files, descriptor in os.fwalk(path, follow_symlinks=False):
            if files:
                # A duplicate: the walk closes its own once it leaves the directory.
                batches.put((os.dup(descriptor), files))
    except OSError:
        pass  # shutil.rmtree below removes what it can of the rest
    finally:
        for _thread in threads:
            batches.put(None)
        for thread in threads:
            thread.join()
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class PathPlan:
    """One app path: where it goes and where it is staged."""

    path: str  # absolute, as in the manifest
    target: Path
    in_archive: bool
    area: StagingArea
    # Bytes it will take once staged, when planned from a record (no listing yet).
    expected_bytes: int = 0
    # Bytes below each of its children, when planned from a record that measured them
    # (a large directory: see archives.PathSize), and its own (mtime, ctime) then.
    expected_children: dict[str, int] | None = None
    expected_times: tuple[int, int] | None = None

    @property
    def archive_path(self) -> str:
        return self.path.lstrip("/")

    @property
    def staged(self) -> Path:
        assert self.area.root is not None
        return self.area.root / "new" / self.archive_path

    @property
    def previous(self) -> Path:
        assert self.area.root is not None
        return self.area.root / "old" / self.archive_path


@dataclass
class AppPlan:
    """Everything about one app's restore that is known before touching it."""

    app_id: str
    paths: list[PathPlan]
    entries: list[ArchiveEntry]
    # False while planned from a record: ``entries`` come with the listing, later.
    listed: bool = True

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.entries if entry.type == "-")


def nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def plan(
    apps: Iterable[tuple[str, list[str]]], listing: list[ArchiveEntry], target_root: Path
) -> list[AppPlan]:
    """Plan the restore of ``(app id, paths)`` from an archive with this listing."""
    areas: dict[int, StagingArea] = {}
    by_path = {entry.path: entry for entry in listing}
    plans = []
    for app_id, paths in apps:
        path_plans = []
        entries: list[ArchiveEntry] = []
        for path in paths:
            relative = path.lstrip("/")
            target = target_root / relative
            anchor = nearest_existing(target.parent)
            device = os.stat(anchor).st_dev
            area = areas.setdefault(device, StagingArea(device, anchor))
            path_plans.append(PathPlan(path, target, relative in by_path, area))
            entries += [entry for entry in listing if is_inside(entry.path, relative)]
        plans.append(AppPlan(app_id, path_plans, entries))
    return plans


def plan_from_record(
    apps: Iterable[tuple[str, list[str], list[str] | None]],
    sizes: dict[str, PathSize],
    target_root: Path,
) -> list[AppPlan]:
    """Plan the restore of ``(app id, paths, captured paths)`` from the local record of
    an archive (see :mod:`homesafe.archives`), before its listing is known: a path is
    taken for archived when it was captured (None: every path was), and its staged size
    for what was measured at backup time. :func:`attach_listing` completes the plans.
    """
    areas: dict[int, StagingArea] = {}
    plans = []
    for app_id, paths, captured in apps:
        path_plans = []
        for path in paths:
            target = target_root / path.lstrip("/")
            anchor = nearest_existing(target.parent)
            device = os.stat(anchor).st_dev
            area = areas.setdefault(device, StagingArea(device, anchor))
            in_archive = captured is None or path in captured
            size = sizes.get(path)
            expected = size.bytes + size.entries * BLOCK_OVERHEAD_BYTES if size else 0
            children = size.children if size else None
            times = size.times if size else None
            path_plans.append(PathPlan(path, target, in_archive, area, expected, children, times))
        plans.append(AppPlan(app_id, path_plans, [], listed=False))
    return plans


def attach_listing(plans: Iterable[AppPlan], listing: list[ArchiveEntry]) -> list[str]:
    """Complete plans made by :func:`plan_from_record` with the archive's ``listing``
    (of at least their paths): each app's entries, for :func:`verify`.

    A path planned as archived that the listing lacks is not archived (nothing of it
    was extracted). Returns the paths the listing holds but the plans took for not
    archived: they were not extracted, so the plans cannot be used (empty: all is well).
    """
    by_path = {entry.path for entry in listing}
    missed = []
    for app_plan in plans:
        entries: list[ArchiveEntry] = []
        for path_plan in app_plan.paths:
            listed = path_plan.archive_path in by_path
            if listed and not path_plan.in_archive:
                missed.append(path_plan.path)
            path_plan.in_archive = listed
            entries += [e for e in listing if is_inside(e.path, path_plan.archive_path)]
        app_plan.entries = entries
        app_plan.listed = True
    return missed


@dataclass
class SpaceCheck:
    """Free space against need, for one filesystem."""

    anchor: str
    required: int
    available: int

    @property
    def sufficient(self) -> bool:
        return self.available >= self.required


def staged_bytes(app_plan: AppPlan, path_plan: PathPlan) -> int:
    """What one path of an app takes once staged: from the listing, or, for plans made
    from a record, as measured at backup time (0 for a path the archive lacks)."""
    if not app_plan.listed:
        return path_plan.expected_bytes if path_plan.in_archive else 0
    return sum(
        entry.size + BLOCK_OVERHEAD_BYTES
        for entry in app_plan.entries
        if is_inside(entry.path, path_plan.archive_path)
    )


def staged_children(app_plan: AppPlan, path_plan: PathPlan) -> dict[str, int] | None:
    """The bytes below each child of a large directory path (by name), when known: from
    the listing, or as measured at backup time; None for a path whose children a
    restore may not share out (:func:`archives.splittable_children`)."""
    if not app_plan.listed:
        return path_plan.expected_children if path_plan.in_archive else None
    root = path_plan.archive_path
    children: dict[str, int] = {}
    for entry in app_plan.entries:
        if entry.path != root and is_inside(entry.path, root):
            name = entry.path[len(root) + 1 :].split("/", 1)[0]
            children[name] = children.get(name, 0) + entry.size
    return archives.splittable_children(children)


def check_space(plans: Iterable[AppPlan]) -> list[SpaceCheck]:
    """What each filesystem needs and has; staging never overwrites, so it needs it all.

    Needs come from the listing, or, for plans made from a record, from the sizes
    measured at backup time."""
    needs: dict[int, tuple[StagingArea, int]] = {}
    for app_plan in plans:
        for path_plan in app_plan.paths:
            size = staged_bytes(app_plan, path_plan)
            area, total = needs.get(path_plan.area.device, (path_plan.area, 0))
            needs[path_plan.area.device] = (area, total + size)
    checks = []
    for area, total in needs.values():
        status = os.statvfs(area.anchor)
        checks.append(
            SpaceCheck(
                str(area.anchor),
                total + SPACE_MARGIN_BYTES,
                status.f_bavail * status.f_frsize,
            )
        )
    return checks


def require_space(plans: Iterable[AppPlan]) -> None:
    """Refuse, before anything is written, a restore that does not fit."""
    short = [check for check in check_space(plans) if not check.sufficient]
    if short:
        details = "; ".join(
            f"the filesystem of {check.anchor} needs {check.required / 1e6:.1f} MB "
            f"and has {check.available / 1e6:.1f} MB free"
            for check in short
        )
        raise InsufficientSpaceError(
            f"not enough space to restore: {details}. Nothing was changed.",
            hint="Free some space, or restore fewer apps at a time.",
        )


@dataclass
class Extraction:
    """One engine call of a restore: archive paths extracted into one staging area,
    but for ``excludes`` (paths left out with what lies below them). A ``last`` call
    is made once every other call of the restore has ended. ``settled``: directories
    shared out between calls whose own entry this call extracts (their children that
    other calls extract are among ``excludes``), while the others may still write into
    them; their times are set once all have ended (:func:`settle_directories`)."""

    area: StagingArea
    paths: list[str] = field(default_factory=list)
    size: int = 0
    excludes: list[str] = field(default_factory=list)
    last: bool = False
    settled: list[str] = field(default_factory=list)


def plan_extractions(
    plans: list[AppPlan], concurrency: int, minimum_bytes: int, *, settle: bool = False
) -> list[Extraction]:
    """The engine calls that stage ``plans``: one per staging area (filesystem), and an
    area's paths split into up to ``concurrency`` calls made side by side.

    A split gives no call less than ``minimum_bytes`` (each call pays the engine's
    start-up again) and keeps a declared path and what lies below it in one call (the
    engine's own rules hold within it; a path inside another, as two apps may share a
    tree, goes with it), except for a directory larger than a fair share whose
    children's sizes are known (:func:`staged_children`): its children are dealt out
    instead. The directory itself, without them, is then extracted by a ``last`` call,
    so that its own metadata (times above all) is set after everything written into it;
    that call also extracts any child the sizes did not know of.

    With ``settle`` (the caller then calls :func:`settle_directories` once it has the
    archive's listing with times, and runs as root: no mode keeps it from writing into
    a directory), a directory whose times were measured at backup time
    (:attr:`PathPlan.expected_times`: it had no default ACL and no flag that keeps entries
    from being made in it) needs no last call: the first call holding one of its
    children extracts the directory instead, but for the children dealt to other
    calls, and so also the children the sizes did not know of. Its mode, owner, ACLs
    and extended attributes are borg's; creating entries in it changes its times only,
    which :func:`settle_directories` sets afterwards.

    Paths are dealt out largest first, each to the call with the least so far, which
    keeps the calls close in size.
    """
    by_area: dict[int, tuple[StagingArea, dict[str, int], dict[str, dict[str, int] | None]]] = {}
    settleable: set[str] = set()
    for app_plan in plans:
        for path_plan in app_plan.paths:
            if path_plan.in_archive:
                area, sizes, children = by_area.setdefault(
                    path_plan.area.device, (path_plan.area, {}, {})
                )
                size = staged_bytes(app_plan, path_plan)
                sizes[path_plan.archive_path] = size
                # Only what may be split is looked into: a walk of the listing per path.
                splittable = concurrency > 1 and size >= archives.SPLIT_DIRECTORY_MIN_BYTES
                children[path_plan.archive_path] = (
                    staged_children(app_plan, path_plan) if splittable else None
                )
                if settle and not app_plan.listed and path_plan.expected_times is not None:
                    settleable.add(path_plan.archive_path)
    extractions = []
    for area, sizes, children in by_area.values():
        roots: dict[str, int] = {}
        for path in sorted(sizes):
            outer = next((root for root in roots if is_inside(path, root)), None)
            if outer is None:
                roots[path] = sizes[path]
            else:
                roots[outer] += sizes[path]
                children[outer] = None  # a path holding other planned paths goes whole
        total = sum(roots.values())
        possible = max(1, min(concurrency, total // max(minimum_bytes, 1)))
        units: dict[str, int] = {}
        split: dict[str, list[str]] = {}
        for root, size in roots.items():
            known = children.get(root)
            if possible > 1 and known and len(known) > 1 and size > total / possible:
                split[root] = [f"{root}/{name}" for name in sorted(known)]
                units.update({f"{root}/{name}": known[name] for name in known})
            else:
                units[root] = size
        calls = [Extraction(area) for _ in range(min(possible, len(units)))]
        for path in sorted(units, key=lambda unit: (-units[unit], unit)):
            lightest = min(calls, key=lambda call: call.size)
            lightest.paths.append(path)
            lightest.size += units[path]
        extractions += calls
        for root in sorted(split.keys() & settleable):
            dealt = set(split.pop(root))
            holders = [call for call in calls if dealt.intersection(call.paths)]
            own = holders[0]
            own.paths = [path for path in own.paths if not is_inside(path, root)] + [root]
            own.excludes += sorted(
                path for call in holders[1:] for path in call.paths if is_inside(path, root)
            )
            own.settled.append(root)
        if split:
            excludes = [child for root in sorted(split) for child in split[root]]
            extractions.append(Extraction(area, sorted(split), 0, excludes, last=True))
    return extractions


class _CombinedProgress:
    """One progress report for the extractions of a restore: their bytes summed, and
    their totals as far as they are known (a call made last reports its own later)."""

    def __init__(self, on_progress: ProgressCallback, count: int) -> None:
        self.on_progress = on_progress
        self.current: list[float] = [0.0] * count
        self.totals: list[float | None] = [None] * count
        self.finished = [False] * count
        self.lock = threading.Lock()

    def callback(self, index: int) -> ProgressCallback:
        def report(progress: Progress) -> None:
            with self.lock:
                self.totals[index] = progress.total or self.totals[index]
                self.finished[index] = progress.finished
                if progress.finished:
                    # A last report may carry no count (borg's): the call did it all.
                    done = self.totals[index] or self.current[index]
                    self.current[index] = max(self.current[index], done)
                else:
                    self.current[index] = progress.current or 0.0
                known = [total for total in self.totals if total is not None]
                combined = Progress(
                    progress.operation,
                    current=sum(self.current),
                    total=sum(known) if known else None,
                    message=progress.message,
                    finished=all(self.finished),
                )
                self.on_progress(combined)

        return report


@dataclass
class SettledDirectory:
    """A directory one extraction extracted while others wrote into it (see
    :attr:`Extraction.settled`): its times are set by :func:`settle_directories`."""

    area: StagingArea
    path: str  # archive path
    times: tuple[int, int]  # (mtime, ctime) in nanoseconds, measured at backup time
    hold: Path  # a file that keeps it from being empty until then

    @property
    def staged(self) -> Path:
        assert self.area.root is not None
        return self.area.root / "new" / self.path


# The name of the file that keeps a settled directory from being empty, with 16 random
# hex digits after it (no archived entry is expected to bear one).
HOLD_PREFIX = ".homesafe-hold-"


def stage(
    plans: list[AppPlan],
    source: ArchiveSource,
    on_progress: ProgressCallback | None,
    *,
    alongside: bool = False,
    settled: list[SettledDirectory] | None = None,
) -> list[str]:
    """Extract every planned path into its staging area, in the calls
    :func:`plan_extractions` makes for the source's ``extract_concurrency``: those made
    side by side first, then the ``last`` ones. Each call extracts at least
    PARALLEL_EXTRACTION_MIN_BYTES; from a remote source REMOTE_PARALLEL_EXTRACTION_MIN_BYTES
    when no directory shared out would need a last call, else
    REMOTE_UNSETTLED_EXTRACTION_MIN_BYTES.

    ``settled``: a list the caller will hand to :func:`settle_directories` once it has
    the archive's listing with times; when homesafe runs as root, the directories whose
    times are left to it are appended to it (see ``settle`` in
    :func:`plan_extractions`). Each is given a file of its own before the calls start,
    so that it is never empty: an extraction of a directory that finds it empty removes
    it and makes it again, which would pull it from under another call writing into it.

    Calls made side by side, with each other or (``alongside``) with another engine call
    of the caller's, are made through ``source.hasty()``; one that found the repository
    locked is made again through ``source`` once the others ended. They all run to their
    end, and the first error is raised then. Returns the engine's warnings.
    """
    settle = settled is not None and os.geteuid() == 0
    if not source.remote:
        minimum = PARALLEL_EXTRACTION_MIN_BYTES
    elif settle and all(
        path_plan.expected_times is not None
        for app_plan in plans
        for path_plan in app_plan.paths
        if path_plan.expected_children is not None
    ):
        minimum = REMOTE_PARALLEL_EXTRACTION_MIN_BYTES
    else:
        minimum = REMOTE_UNSETTLED_EXTRACTION_MIN_BYTES
    extractions = plan_extractions(plans, source.extract_concurrency, minimum, settle=settle)
    for app_plan in plans:
        for path_plan in app_plan.paths:
            path_plan.area.create()
    times = {
        path_plan.archive_path: path_plan.expected_times
        for app_plan in plans
        for path_plan in app_plan.paths
    }
    for extraction in extractions:
        assert extraction.area.root is not None
        for path in extraction.paths:
            # Made beforehand: engines side by side would race to make them.
            (extraction.area.root / "new" / path).parent.mkdir(parents=True, exist_ok=True)
        for path in extraction.settled:
            directory = extraction.area.root / "new" / path
            directory.mkdir(parents=True, exist_ok=True)
            hold = directory / f"{HOLD_PREFIX}{os.urandom(8).hex()}"
            hold.touch(exist_ok=False)
            path_times = times[path]
            assert settled is not None and path_times is not None
            settled.append(SettledDirectory(extraction.area, path, path_times, hold))
    combined = _CombinedProgress(on_progress, len(extractions)) if on_progress else None
    side_by_side = alongside or len(extractions) > 1
    first_source = source.hasty() if side_by_side else source

    def extract(index: int, from_source: ArchiveSource) -> list[str]:
        extraction = extractions[index]
        assert extraction.area.root is not None
        report = combined.callback(index) if combined else None
        return from_source.extract(
            extraction.paths, extraction.area.root / "new", report, extraction.excludes
        )

    warnings: list[str] = []
    for last in (False, True):
        indexes = [index for index, call in enumerate(extractions) if call.last == last]
        outcomes = _extract_side_by_side(indexes, lambda index: extract(index, first_source))
        for index, outcome in zip(indexes, outcomes, strict=True):
            if isinstance(outcome, RepositoryLockedError) and side_by_side:
                outcome = extract(index, source)
            if isinstance(outcome, BaseException):
                raise outcome
            warnings += outcome
    return warnings


def settle_directories(
    settled: list[SettledDirectory], listing: list[ArchiveEntry], source: ArchiveSource
) -> list[str]:
    """Set the times of directories :func:`stage` left to it, with the archive's
    ``listing`` made with times; returns the engine's warnings.

    Each loses its file that kept it from being empty. Its mtime (and atime: an archive
    homesafe wrote keeps no atime, and borg then sets the mtime for both) is the one
    measured at backup time, if the archive holds the same mtime and ctime (to the
    microsecond its listing gives): the directory did not change between the moment the
    engine read it and the measuring, so its mode, owner, ACLs, extended attributes and
    flags as measured (no default ACL, no flag that keeps entries out) are the
    archive's too. Otherwise the directory, without its children, is extracted once
    more, as a ``last`` call would have (see :func:`plan_extractions`).
    """
    by_path = {entry.path: entry for entry in listing}
    again: dict[int, tuple[StagingArea, list[str], list[str]]] = {}
    for directory in settled:
        directory.hold.unlink()
        mtime, ctime = directory.times
        entry = by_path.get(directory.path)
        if entry is not None and same_time(entry.mtime, mtime) and same_time(entry.ctime, ctime):
            os.utime(directory.staged, ns=(mtime, mtime), follow_symlinks=False)
            continue
        area, paths, excludes = again.setdefault(directory.area.device, (directory.area, [], []))
        paths.append(directory.path)
        below = directory.path + "/"
        excludes += [
            entry.path
            for entry in listing
            if entry.path.startswith(below) and "/" not in entry.path[len(below) :]
        ]
    warnings: list[str] = []
    for area, paths, excludes in again.values():
        assert area.root is not None
        warnings += source.extract(paths, area.root / "new", None, excludes)
    return warnings


def same_time(text: str, nanoseconds: int) -> bool:
    """Whether ``text`` (an ISO 8601 time as an engine lists it; without a zone: local
    time) is ``nanoseconds`` since the epoch, to the microsecond it is given to
    (rounded either way: borg goes through a float)."""
    import datetime

    try:
        listed = datetime.datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError, OSError):
        return False
    return abs(listed - nanoseconds / 1e9) <= 2e-6


def _extract_side_by_side(
    indexes: list[int], extract: Callable[[int], list[str]]
) -> list[list[str] | BaseException]:
    """``extract(index)`` for every index, side by side when more than one: each one's
    warnings, or the lock error or exception it ended with."""
    if len(indexes) <= 1:
        outcomes: list[list[str] | BaseException] = []
        for index in indexes:
            try:
                outcomes.append(extract(index))
            except RepositoryLockedError as error:
                outcomes.append(error)
        return outcomes
    import concurrent.futures
    import contextvars

    with (
        execute.tracking() as programs,
        concurrent.futures.ThreadPoolExecutor(len(indexes), thread_name_prefix="extract") as pool,
    ):
        futures = [pool.submit(contextvars.copy_context().run, extract, index) for index in indexes]
        try:
            concurrent.futures.wait(futures)
        except BaseException:
            # Interrupted: no extraction may go on (nor keep the pool waiting for it).
            programs.end_all()
            raise
        return [future.exception() or future.result() for future in futures]


def join_hard_links(plans: list[AppPlan]) -> list[str]:
    """Link again, in staging, hard links that :func:`stage` extracted as copies.

    An engine links the files of a hard-link group that it extracts in one call; a file
    whose link target another call extracted (another path, or another child of a
    directory split between calls) comes out as a copy of it. Each such copy is
    replaced by a link to the target's staged copy (same staging area, so the same
    filesystem); a missing one is left to :func:`verify`. A copy that cannot be linked
    (the filesystem refuses) stays a copy, with the same contents: returns a warning
    for each.
    """
    staged: dict[str, Path] = {}
    for app_plan in plans:
        for path_plan in app_plan.paths:
            if path_plan.in_archive and path_plan.area.root is not None:
                staged[path_plan.archive_path] = path_plan.area.root / "new"
    warnings = []
    for app_plan in plans:
        for entry in app_plan.entries:
            if not (entry.mode.startswith("h") and entry.link_target):
                continue
            entry_root = _staged_root(staged, entry.path)
            target_root = _staged_root(staged, entry.link_target)
            if entry_root is None or target_root is None:
                continue
            if staged[entry_root] != staged[target_root]:
                continue  # on two filesystems: no link can join them
            copy = staged[entry_root] / entry.path
            target = staged[target_root] / entry.link_target
            try:
                if os.path.samefile(copy, target):
                    continue
            except OSError:
                continue
            try:
                _link_over(target, copy)
            except OSError as error:
                warnings.append(
                    f"/{entry.path} is restored as a copy of /{entry.link_target}, not as "
                    f"a hard link to it: {error.strerror or error}"
                )
    return warnings


def _link_over(target: Path, copy: Path) -> None:
    """Replace ``copy`` by a hard link to ``target``, keeping its directory's times.

    Linked beside the copy, then renamed over it, so that the copy is never missing;
    that changes the directory's times, which the engine had restored: put back.
    """
    directory = os.stat(copy.parent)
    beside = copy.with_name(f".{copy.name}.homesafe-link")
    os.link(target, beside)
    try:
        os.replace(beside, copy)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(beside)
        raise
    finally:
        os.utime(copy.parent, ns=(directory.st_atime_ns, directory.st_mtime_ns))


def _staged_root(staged: dict[str, Path], path: str) -> str | None:
    """The planned path ``path`` lies in (the innermost), if any."""
    inside = [root for root in staged if is_inside(path, root)]
    return max(inside, key=len) if inside else None


def verify(app_plan: AppPlan) -> None:
    """Every archived entry of the app is staged, with its type and size."""
    problems = []
    for path_plan in app_plan.paths:
        if not path_plan.in_archive:
            continue
        assert path_plan.area.root is not None
        # One lstat per entry, on plain strings, and nothing else the loop can do
        # without: it runs after the extraction, with nothing beside it, for each of an
        # app's entries (42,000 in ~0.15 s).
        staged_root = os.path.join(path_plan.area.root, "new") + "/"
        top = path_plan.archive_path
        below = top.rstrip("/") + "/"
        lstat = os.lstat
        for entry in app_plan.entries:
            path = entry.path
            if path != top and not path.startswith(below):
                continue
            try:
                status = lstat(staged_root + path)  # entry paths are relative
            except OSError:
                problems.append(f"/{path} is missing")
                continue
            kind = entry.type
            if kind == "-":
                if status.st_size != entry.size:
                    problems.append(f"/{path} has {status.st_size} bytes, not {entry.size}")
            elif kind == "d":
                if not stat.S_ISDIR(status.st_mode):
                    problems.append(f"/{path} is not a directory")
            elif kind == "l" and not stat.S_ISLNK(status.st_mode):
                problems.append(f"/{path} is not a symbolic link")
    if problems:
        shown = "; ".join(problems[:10])
        raise VerificationError(
            f"the extracted copy of {app_plan.app_id} does not match the archive: {shown}"
            + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
        )


@dataclass
class Swap:
    """Puts one app's staged paths into place, and can take them back out."""

    app_plan: AppPlan
    moved_aside: list[PathPlan] = field(default_factory=list)
    placed: list[PathPlan] = field(default_factory=list)
    created: list[Path] = field(default_factory=list)
    entries: list[int] = field(default_factory=list)  # in the journal, closed together

    def record(self, kind: str, data: dict[str, object]) -> None:
        """Journal a change to this app made as part of the swap (closed with it)."""
        self.entries.append(journal.active().record(kind, {"app": self.app_plan.app_id, **data}))

    def apply(self) -> None:
        """Rename each live path aside and each staged path into place.

        Raises RestoreError after rolling back whatever it had done.
        """
        try:
            for path_plan in self.app_plan.paths:
                if os.path.lexists(path_plan.target):
                    path_plan.previous.parent.mkdir(parents=True, exist_ok=True)
                    self.record(
                        journal.MOVED_ASIDE,
                        {"target": str(path_plan.target), "previous": str(path_plan.previous)},
                    )
                    os.rename(path_plan.target, path_plan.previous)
                    self.moved_aside.append(path_plan)
                if path_plan.in_archive:
                    self._make_parents(path_plan.target.parent)
                    self.record(
                        journal.PLACED,
                        {"staged": str(path_plan.staged), "target": str(path_plan.target)},
                    )
                    os.rename(path_plan.staged, path_plan.target)
                    self.placed.append(path_plan)
        except OSError as error:
            self.roll_back()
            raise RestoreError(
                f"could not put {error.filename or 'a path'} of {self.app_plan.app_id} in "
                f"place: {error.strerror}; the app was left as it was"
            ) from error

    def _make_parents(self, directory: Path) -> None:
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for path in reversed(missing):
            self.record(journal.DIRECTORY_CREATED, {"path": str(path)})
            path.mkdir(mode=0o755)
            self.created.append(path)

    def roll_back(self) -> None:
        """Undo :meth:`apply`: restored paths back to staging, previous ones in place."""
        failures = []
        for path_plan in reversed(self.placed):
            try:
                os.rename(path_plan.target, path_plan.staged)
            except OSError as error:
                failures.append(f"{path_plan.target}: {error.strerror}")
        self.placed.clear()
        # What could not be put back stays listed: its staging area must be kept.
        still_aside = []
        for path_plan in reversed(self.moved_aside):
            try:
                os.rename(path_plan.previous, path_plan.target)
            except OSError as error:
                still_aside.append(path_plan)
                failures.append(
                    f"{path_plan.target}: {error.strerror} (the previous copy is kept at "
                    f"{path_plan.previous})"
                )
        self.moved_aside = still_aside
        for directory in reversed(self.created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        self.created.clear()
        self._close_entries(f"rollback failed: {'; '.join(failures)}" if failures else None)
        if failures:
            raise RestoreError(
                f"rolling back {self.app_plan.app_id} failed for: {'; '.join(failures)}",
                hint="Nothing was deleted: move the kept copies back by hand.",
            )

    def commit(self, *, discard_previous: bool = True) -> None:
        """Forget the previous copies: the app has been restored. Without
        ``discard_previous`` they stay in the staging area, removed with it."""
        # Closed first: a crash while deleting the previous copies must not "roll back"
        # half-deleted ones over the restored app (recovery then removes the staging).
        self._close_entries("restore committed")
        if discard_previous:
            for path_plan in self.moved_aside:
                discard(path_plan.previous)
        self.moved_aside.clear()
        self.placed.clear()
        self.created.clear()

    def _close_entries(self, kept_because: str | None) -> None:
        """Close every journal entry of the swap: undone, or kept for ``kept_because``."""
        if kept_because is None:
            journal.active().close(self.entries, "undone", "")
        else:
            journal.active().close(self.entries, "kept", kept_because)
        self.entries.clear()


def remove_staging(
    plans: Iterable[AppPlan], keep_if_unrolled: Iterable[Swap] = (), *, detached: bool = False
) -> None:
    """Remove every staging area, except those still holding previous copies.

    An area holding copies a rollback could not put back is kept for good (the error
    said where they are). An area of a swap neither committed nor rolled back (an
    interrupted restore) is left to the journal: recovery puts the previous copies back
    first, then removes it. With ``detached``, the areas to remove are handed to a
    process of their own (see :func:`remove_detached`) and this call does not wait.
    """
    swaps = list(keep_if_unrolled)
    kept = {plan.area.device for swap in swaps if not swap.entries for plan in swap.moved_aside}
    unrolled = {plan.area.device for swap in swaps if swap.entries for plan in swap.app_plan.paths}
    removed: dict[int, StagingArea] = {}
    for app_plan in plans:
        for path_plan in app_plan.paths:
            if path_plan.area.device in unrolled:
                continue
            if path_plan.area.device in kept:
                path_plan.area.keep("it holds previous copies a rollback could not put back")
            elif path_plan.area.root is not None:
                removed[path_plan.area.device] = path_plan.area
    if detached:
        remove_detached(list(removed.values()))
    else:
        for area in removed.values():
            area.remove()


def remove_detached(areas: list[StagingArea]) -> None:
    """Hand ``areas`` over to a detached process that removes them, and return at once.

    Removing the copies a restore replaced takes a while (some 0.1 ms a file), and
    nothing waits for it once the restore is final. The remover is forked (no program
    is run: it is this process's own :func:`discard`), leaves the session, drops every
    inherited descriptor (the operation lock among them, so the next operation need
    not wait) and records the areas in a journal of its own, which it holds as long as
    it lives; only then does it tell this process, which closes its own entries for
    them. Killed at any point, one of the two journals still names every area and
    recovery removes it. When the hand-over fails, the areas are removed here.

    An area holding at most SMALL_AREA_ENTRIES entries (a restore into paths where
    nothing was, whose staged copies all went into place) is removed here: that costs
    less than the hand-over (~10 ms: two forks and a journal).
    """
    areas = [area for area in areas if area.root is not None]
    for area in [area for area in areas if holds_few_entries(area.root)]:
        area.remove()
        areas.remove(area)
    if not areas:
        return
    roots = [str(area.root) for area in areas]
    read_end, write_end = os.pipe()
    try:
        child = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        child = None
    if child == 0:
        _remove_in_child(roots, read_end, write_end)  # never returns
    handed_over = False
    if child is not None:
        os.close(write_end)
        try:
            handed_over = os.read(read_end, 1) == REMOVER_READY
        finally:
            os.close(read_end)
            os.waitpid(child, 0)  # the go-between exits at once; the remover lives on
    for area in areas:
        if handed_over and area.entry is not None:
            journal.active().keep(area.entry, "removed by a detached process")
            area.entry = None
            area.root = None
        else:
            area.remove()


REMOVER_READY = b"1"
SMALL_AREA_ENTRIES = 64


def holds_few_entries(root: Path | None, limit: int = SMALL_AREA_ENTRIES) -> bool:
    """Whether the tree at ``root`` holds at most ``limit`` entries (links not followed;
    the walk stops as soon as it finds more)."""
    if root is None:
        return True
    count = 0
    pending = [str(root)]
    try:
        while pending:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    count += 1
                    if count > limit:
                        return False
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
    except OSError:
        return False  # the detached remover copes with what cannot be read
    return True


def _remove_in_child(roots: list[str], read_end: int, write_end: int) -> None:
    """The forked side of :func:`remove_detached`: fork again (so that nobody has to
    reap the remover), then record, report ready, remove, close, exit."""
    try:
        os.close(read_end)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for standard in (0, 1, 2):
            os.dup2(null, standard)
        # Every descriptor but the pipe: the caller's journal and locks stay its own.
        os.closerange(3, write_end)
        os.closerange(write_end + 1, os.sysconf("SC_OPEN_MAX"))
        own = journal.Journal(journal.directory().absolute())
        own.operation = "restore"
        entries = [own.record(journal.TEMPORARY_DIRECTORY, {"path": root}) for root in roots]
        os.write(write_end, REMOVER_READY)
        os.close(write_end)
        for root, entry in zip(roots, entries, strict=True):
            discard(Path(root))
            if not os.path.lexists(root):
                own.undone(entry)
    finally:
        os._exit(0)
