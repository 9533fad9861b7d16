"""homesafe's public operations: back up apps, restore them, read archives.

The semantics follow the reference design (lockdown, services stopped in reverse order
and restarted in order, pre/post hooks around the engine, a :class:`Packet` given to
hooks and to an optional custom handler, :class:`BackupError` records) without its
gaps: nothing is swallowed, every error ends up in the :class:`OperationResult`, and
services and lockdown are put back in ``finally`` whatever failed.

Strategies in this release: ``stop`` (services stopped for the archive run) and
``live`` (no services to stop). A restore uses the manifests stored in the archive.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from homesafe import archives, journal, locations, prestart, state
from homesafe.apps import App, dependency_groups, dependency_order, load_apps, select
from homesafe.consistency import lockdown
from homesafe.consistency.services import ServiceController, ServiceHandler
from homesafe.engines import engine_for
from homesafe.engines.base import (
    ArchiveEntry,
    ArchiveStats,
    CheckReport,
    Engine,
    Progress,
    ProgressCallback,
    PruneReport,
    ReadView,
    RepositoryInfo,
    RetentionPolicy,
)
from homesafe.errors import (
    EXIT_FAILURE,
    EXIT_PARTIAL,
    EXIT_SUCCESS,
    AppNotFoundError,
    ArchiveNotFoundError,
    CommandError,
    EngineError,
    HomesafeError,
    ManifestError,
    PassphraseError,
    RepositoryLockedError,
    RepositoryNotFoundError,
    UsageError,
)
from homesafe.hooks import HookOutcome, run_command, run_hook
from homesafe.manifest import is_inside
from homesafe.repositories import (
    Repository,
    default_repository,
    generate_passphrase,
    passphrase_file_for,
    s3_credentials_file,
)
from homesafe.repositories import get as get_repository
from homesafe.repositories import new_passphrase as new_passphrase_value
from homesafe.repositories import unregister as unregister_repository

if TYPE_CHECKING:
    from homesafe import restore
    from homesafe.sources import ArchiveSource

__all__ = [
    "AppResult",
    "ArchiveInfo",
    "BackupError",
    "Destination",
    "OperationResult",
    "Packet",
    "backup_apps",
    "backup_full",
    "break_lock",
    "change_passphrase",
    "check_repository",
    "delete_archives",
    "export_archive",
    "export_key",
    "get_setting",
    "import_apps",
    "import_key",
    "initialize_repository",
    "list_archives",
    "preview_restore",
    "prune_repository",
    "read_archive",
    "remove_repository",
    "repository_info",
    "restore_apps",
    "restore_full",
    "set_setting",
    "verify_archive",
]

logger = logging.getLogger(__name__)

Handler = Callable[..., Any]
Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class BackupError:
    """One thing that went wrong for one app, compared by (type, app, hook)."""

    error_type: str
    app: str
    hook: str | None = None
    message: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.error_type,
            "app": self.app,
            "hook": self.hook,
            "message": self.message,
        }


@dataclass
class Packet:
    """What hooks and handlers are given: the operation and the apps it covers.

    ``root`` is where the apps' paths live for this operation (``/`` for a live backup
    or restore, the target root otherwise); ``path`` is the archive name. For scope
    ``apps``, ``directories`` and ``files`` are the union of every app's config, data
    and secrets sections.
    """

    operation: Literal["backup", "restore"]
    scope: Literal["apps", "full"]
    root: str
    apps: list[App]
    path: str
    archive_comment: str | None = None
    errors: list[BackupError] = field(default_factory=list)

    @property
    def components(self) -> list[App]:
        """The reference design's name for :attr:`apps`."""
        return self.apps

    @property
    def directories(self) -> list[str]:
        return [path for app in self.apps for path in app.manifest.directories]

    @property
    def files(self) -> list[str]:
        return [path for app in self.apps for path in app.manifest.files]


@dataclass
class AppResult:
    """How one app fared in one operation.

    ``downtime`` is the seconds its services were stopped (monotonic clock); ``size``
    the bytes in its paths when the backup started, or once the restore finished.
    """

    app: str
    status: Status = "ok"
    strategy: str = "live"
    downtime: float = 0.0
    size: int = 0
    paths: list[str] = field(default_factory=list)
    errors: list[BackupError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    hooks: list[HookOutcome] = field(default_factory=list)
    healthy_after: float | None = None  # restore drills: seconds to a healthy app

    def fail(self, error_type: str, message: str, hook: str | None = None) -> None:
        self.status = "failed"
        self.errors.append(BackupError(error_type, self.app, hook, message))

    @property
    def active(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "status": self.status,
            "strategy": self.strategy,
            "downtime_seconds": round(self.downtime, 6),
            "size": self.size,
            "paths": self.paths,
            "errors": [error.to_dict() for error in self.errors],
            "warnings": self.warnings,
            "hooks": [outcome.to_dict() for outcome in self.hooks],
            "healthy_after_seconds": (
                None if self.healthy_after is None else round(self.healthy_after, 3)
            ),
        }


@dataclass
class Destination:
    """How one repository of a backup to several fared: the archive is written to each
    from one capture; ``error`` says why it is not in this one."""

    repository: str
    status: Literal["ok", "failed"] = "ok"
    engine_stats: ArchiveStats | None = None
    error: str | None = None
    duration: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "status": self.status,
            "engine": self.engine_stats.to_dict() if self.engine_stats else None,
            "error": self.error,
            "duration_seconds": round(self.duration, 3),
        }


@dataclass
class OperationResult:
    """The outcome of a backup or restore: per-app results, archive, engine stats.

    A backup to several repositories has one :class:`Destination` each in
    ``destinations`` (``repository`` and ``engine_stats`` are the first's); one that
    failed makes the result partial, not failed, while another holds the archive.
    """

    operation: str
    repository: str
    archive: str
    apps: list[AppResult] = field(default_factory=list)
    errors: list[BackupError] = field(default_factory=list)
    engine_stats: ArchiveStats | None = None
    started: str = ""
    duration: float = 0.0
    target_root: str = "/"
    destinations: list[Destination] = field(default_factory=list)

    @property
    def status(self) -> Literal["ok", "partial", "failed"]:
        statuses = {app.status for app in self.apps}
        if (
            self.errors
            or not self.apps
            or (statuses <= {"failed", "skipped"} and "failed" in statuses)
        ):
            return "failed"
        if "failed" in statuses or any(d.status == "failed" for d in self.destinations):
            return "partial"
        return "ok"

    @property
    def exit_code(self) -> int:
        return {"ok": EXIT_SUCCESS, "partial": EXIT_PARTIAL, "failed": EXIT_FAILURE}[self.status]

    def app(self, app_id: str) -> AppResult:
        for result in self.apps:
            if result.app == app_id:
                return result
        raise KeyError(app_id)

    def all_errors(self) -> list[BackupError]:
        return [*self.errors, *(error for app in self.apps for error in app.errors)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "status": self.status,
            "repository": self.repository,
            "archive": self.archive,
            "target_root": self.target_root,
            "started": self.started,
            "duration_seconds": round(self.duration, 3),
            "apps": [app.to_dict() for app in self.apps],
            "errors": [error.to_dict() for error in self.errors],
            "engine": self.engine_stats.to_dict() if self.engine_stats else None,
            "destinations": [destination.to_dict() for destination in self.destinations],
        }


# -- settings store ---------------------------------------------------------------


def get_setting(key: str, default: Any = None) -> Any:
    """Read a value from homesafe's settings store (what apps' ``settings`` name)."""
    return state.get_setting(key, default)


def set_setting(key: str, value: Any) -> None:
    """Write a JSON-serialisable value to homesafe's settings store."""
    state.set_setting(key, value)


# -- the quiesce / resume bracket ---------------------------------------------------


@dataclass
class _Quiesced:
    """Apps held still for one operation, and what must be undone for each."""

    apps: list[App]
    results: dict[str, AppResult]
    operation: str
    locked: list[App] = field(default_factory=list)
    controllers: dict[str, ServiceController] = field(default_factory=dict)
    # The services each app had stopped, kept after they are started again.
    stopped: dict[str, list[ServiceHandler]] = field(default_factory=dict)
    lockdown_entries: dict[str, int] = field(default_factory=dict)  # in the journal
    left: bool = False
    # Apps whose services keep running (captured live): locked down only.
    running: frozenset[str] = frozenset()

    def enter(self) -> None:
        """Lock every app down, then stop services: last app's last service first.

        Each flag and each stop is written to the journal before it is made."""
        for app in self.apps:
            if not self.results[app.id].active:
                continue  # failed already (not installed): nothing of it will be touched
            self.lockdown_entries[app.id] = journal.record_lockdown(
                app.id,
                lockdown.flag_path(app.id),
                app.manifest.lockdown.leave,
                app.manifest.hooks.timeout,
            )
            try:
                lockdown.enter(app.manifest, self.operation)
            except CommandError as error:
                self.results[app.id].fail("lockdown", f"lockdown.enter failed: {error.message}")
            # Recorded even on failure: the flag is set and must be cleared.
            self.locked.append(app)
        for app in reversed(self.apps):
            result = self.results[app.id]
            if not result.active or app.id in self.running:
                continue
            controller = ServiceController(
                app.manifest.services, journal=journal.active(), owner=app.id
            )
            self.controllers[app.id] = controller
            if app.manifest.services:
                result.strategy = "stop"
            try:
                controller.stop_all()
            except HomesafeError as error:
                result.fail("service_stop", error.message)

    def leave(self) -> None:
        """Restart what was stopped (first app first), then lift every lockdown.
        Once: a second call does nothing."""
        if self.left:
            return
        self.left = True
        for app in self.apps:
            controller = self.controllers.get(app.id)
            if controller is None:
                continue
            self.stopped[app.id] = list(controller.stopped)
            for failure in controller.start_all():
                self.results[app.id].fail("service_start", failure.message)
            self.results[app.id].downtime = controller.downtime
        for app in reversed(self.locked):
            try:
                lockdown.leave(app.manifest)
            except CommandError as error:
                self.results[app.id].fail("lockdown", f"lockdown.leave failed: {error.message}")
            # Not reached when interrupted: recovery then runs lockdown.leave again.
            journal.active().undone(self.lockdown_entries.pop(app.id))
        self.locked.clear()


def _run_hooks(
    hook_name: str, apps: Sequence[App], results: dict[str, AppResult], packet: Packet
) -> None:
    """Run one hook for every still-active app, applying each app's on_error policy."""
    for app in apps:
        result = results[app.id]
        if not result.active:
            continue
        environment = {
            "HOMESAFE_OPERATION": packet.operation,
            "HOMESAFE_APP": app.id,
            "HOMESAFE_ROOT": packet.root,
            "HOMESAFE_ARCHIVE": packet.path,
        }
        for outcome in run_hook(app, hook_name, packet, environment):
            result.hooks.append(outcome)
            if outcome.succeeded:
                continue
            message = f"{hook_name} hook failed: {outcome.error}"
            error = BackupError("hook", app.id, hook_name, message)
            packet.errors.append(error)
            if app.manifest.hooks.on_error == "fail":
                result.status = "failed"
                result.errors.append(error)
            else:
                result.warnings.append(f"{message} (on_error = continue)")


def _resolve_repository(repository: Repository | None) -> Repository:
    return repository if repository is not None else default_repository()


def _ensure_repository(repository: Repository) -> None:
    """Create the embedded default repository on first use; others must exist."""
    if repository.is_remote:
        return  # a probe costs a round trip: the engine's own call says if it is missing
    engine = engine_for(repository.engine)
    if engine.repository_exists(repository):
        return
    if repository.name != default_repository().name or repository.location != str(
        locations.default_repository()
    ):
        raise RepositoryNotFoundError(f"no repository at {repository.location}")
    Path(repository.location).parent.mkdir(parents=True, exist_ok=True)
    generate_passphrase(repository)
    engine.initialize(repository)


def _tree_size(path: str) -> archives.PathSize:
    """Apparent size of ``path`` and everything below it, and how many entries (files,
    directories, links) it holds; symlinks are not followed. For a directory whose
    children a restore may share out (:func:`archives.splittable_children`), also the
    bytes below each child and its own times (see :class:`archives.PathSize`)."""
    total = 0
    entries = 0
    children: dict[str, int] = {}
    top: os.stat_result | None = None
    # (path, the child of ``path`` it is or lies below; "" for ``path`` itself)
    stack = [(path, "")]
    while stack:
        current, child = stack.pop()
        try:
            status = os.lstat(current)
        except OSError:
            continue
        if not child:
            top = status  # ``path`` itself
        entries += 1
        if not stat.S_ISDIR(status.st_mode):
            total += status.st_size
            if child:
                children[child] = children.get(child, 0) + status.st_size
            continue
        try:
            with os.scandir(current) as found:
                for entry in found:
                    below = child or entry.name
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((entry.path, below))
                        children.setdefault(below, 0)
                        continue
                    entries += 1
                    with contextlib.suppress(OSError):
                        size = entry.stat(follow_symlinks=False).st_size
                        total += size
                        children[below] = children.get(below, 0) + size
        except OSError:
            pass
    splittable = archives.splittable_children(children)
    times = _directory_times(path, top) if splittable is not None and top is not None else None
    return archives.PathSize(total, entries, splittable, times)


DEFAULT_ACL_ATTRIBUTE = "system.posix_acl_default"


def _directory_times(path: str, status: os.stat_result) -> tuple[int, int] | None:
    """(mtime, ctime) of the directory ``path`` in nanoseconds, as ``status`` has them,
    if a restore may set its other attributes first and its times last: None when it
    has a default ACL (entries made in it after the ACL would inherit it) or an
    immutable or append-only flag (none could be made or removed), or either cannot be
    read. See :func:`homesafe.restore.plan_extractions`."""
    from homesafe import allocation

    if not stat.S_ISDIR(status.st_mode):
        return None
    try:
        os.getxattr(path, DEFAULT_ACL_ATTRIBUTE, follow_symlinks=False)
        return None  # it has one
    except OSError as error:
        if error.errno not in (errno.ENODATA, errno.ENOTSUP):
            return None
    flags = allocation.inode_flags(path)
    if flags is None or flags & (allocation.FS_IMMUTABLE_FL | allocation.FS_APPEND_FL):
        return None
    return status.st_mtime_ns, status.st_ctime_ns


def _measure_sizes(
    apps: Sequence[App],
    results: dict[str, AppResult],
    on_progress: ProgressCallback | None,
    path_sizes: dict[str, archives.PathSize],
) -> Callable[[], None]:
    """Start measuring each app's size (and each path's, into ``path_sizes``) in a
    thread beside the engine; returns what to call once the engine is done, which
    waits for the measuring to end.

    The walk is a stat of every file: done after the engine, it added ~5 us a file to
    every backup (0.06 s for 12,000 files). Beside it, it costs no wall time on a
    second core, and it gives a progress bar its total early. The thread runs at the
    lowest CPU priority (a Linux thread has a nice value of its own), so that on a busy
    machine it gives way to the engine and finishes in the wait after it.
    """

    def measure() -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        for app in apps:
            for path in results[app.id].paths:
                path_sizes[path] = _tree_size(path)
            results[app.id].size = sum(path_sizes[path].bytes for path in results[app.id].paths)
        if on_progress is not None:
            total = sum(results[app.id].size for app in apps)
            on_progress(Progress("create", current=None, total=total))

    thread = threading.Thread(target=measure, name="measure-sizes", daemon=True)
    thread.start()
    return thread.join


def _record_archive(
    repositories: Sequence[Repository],
    result: OperationResult,
    staging: Path,
    path_sizes: dict[str, archives.PathSize],
) -> None:
    """Keep a local record of the archive just written to each repository that has it
    (see :mod:`homesafe.archives`), so that restoring it here needs no reading of the
    archive before extracting. A restic archive is recorded with its snapshot id, and
    not at all if restic did not report one. A record that cannot be written is only
    missed."""
    written = {d.repository: d.engine_stats for d in result.destinations if d.status == "ok"}
    for repository in repositories:
        if written and repository.name not in written:
            continue
        stats = written.get(repository.name) if written else result.engine_stats
        archive_id = stats.archive_id if stats is not None else ""
        if repository.engine == "restic" and not archive_id:
            continue
        directory = archives.record_directory(locations.home(), repository.name, result.archive)
        if directory is None:
            continue
        try:
            archives.save_record(directory, staging, repository.location, path_sizes, archive_id)
        except OSError as error:
            logger.warning("could not keep a record of archive %s: %s", result.archive, error)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _staging_directory() -> contextlib.AbstractContextManager[Path]:
    return journal.scratch_directory("operation-")  # journaled: recovery removes a leftover


# -- backup -------------------------------------------------------------------------


@journal.guarded("backup")
def backup_apps(
    app_ids: Sequence[str] | None = None,
    *,
    repository: Repository | None = None,
    archive_name: str | None = None,
    comment: str | None = None,
    handler: Handler | None = None,
    encryption_passphrase: str | None = None,
    apps: dict[str, App] | None = None,
    on_progress: ProgressCallback | None = None,
    periods: Sequence[str] = (),
    strategy: str | None = None,
    repositories: Sequence[Repository] = (),
) -> OperationResult:
    """Back up the named apps (every app when none is named) into one archive.

    Apps are taken in dependency order, one dependency group at a time (apps linked by
    ``depends``; see :func:`homesafe.apps.dependency_groups`): the group is locked
    down, its running services stopped in reverse order, ``backup_pre`` hooks run, each
    app's paths are captured (snapshot, reflink clone, or the last pass of a staged
    copy: see :mod:`homesafe.consistency.capture`), and the group is resumed at once:
    services restarted in order, lockdown lifted. Then the engine writes one archive
    from the captured copies (or ``handler(packet, encryption_passphrase=...)`` when
    given, as in the reference design, which reads the live paths: every app is then
    held still until it returns), and ``backup_post`` hooks run. An app captured with
    the ``stop`` strategy keeps its group held still until the archive is written.
    Services and lockdown are put back, and snapshots and clones removed, whatever
    failed.

    ``strategy`` overrides every app's ``consistency`` (auto, snapshot, clone, stop,
    live). Configuration problems (bad manifests, unknown apps, no repository) raise
    before anything is touched; failures after that are recorded in the returned
    result, whose ``status`` is ok, partial or failed, and in the history.
    ``periods``: the schedule periods a scheduled backup serves (kept in the comment).

    ``repositories`` (instead of ``repository``): write the same archive, from one
    capture, to each of several repositories at once (one engine process each). A
    repository that fails, before or while writing, does not fail the others: the
    result's ``destinations`` say which has the archive, and its status is partial.
    """
    from homesafe.consistency import capture

    started_clock = time.monotonic()
    known = apps if apps is not None else load_apps()
    selected = select(known, app_ids)
    if strategy is not None and strategy not in capture.REQUESTABLE:
        raise UsageError(f"unknown strategy {strategy!r}: auto, snapshot, clone, stop or live")
    if repositories and (repository is not None or handler is not None):
        raise UsageError("give either one repository (or a handler) or several repositories")
    targets = list(repositories) or [_resolve_repository(repository)]
    name = archives.check_name(archive_name) if archive_name else archives.default_name()
    result = OperationResult("backup", targets[0].name, name, started=_now())
    results = {app.id: AppResult(app.id) for app in selected}
    result.apps = [results[app.id] for app in selected]
    packet = Packet("backup", "apps", "/", list(selected), name, comment)
    if handler is None:
        # Fails early, before any service is stopped.
        targets = _usable_destinations(targets, result) if len(targets) > 1 else targets
        _ensure_repository(targets[0])
        targets[0].passphrase()
        for target in targets:
            # Before any service is stopped. restic: homesafe's own key, for a repository
            # registered before homesafe made them (at most once: then it is there).
            engine_for(target.engine).attach(target)
    settings = {app.id: state.read_settings(app.manifest.settings) for app in selected}
    # A handler reads the live paths; else copies can be read where root allows it
    # (found out only when an app needs it: None).
    views = False if handler is not None else None

    held: list[_Quiesced] = []
    finish_sizes: Callable[[], None] | None = None
    with _staging_directory() as staging, capture.Captures(name) as captures:
        try:
            for group in dependency_groups(selected):
                _capture_group(group, results, packet, captures, strategy, views, held)
            included = [app for app in selected if results[app.id].active]
            paths = [path for app in included for path in results[app.id].paths]
            packet.apps = included
            path_sizes: dict[str, archives.PathSize] = {}
            finish_sizes = _measure_sizes(included, results, on_progress, path_sizes)
            if included:
                _write_backup_metadata(Path(staging), name, comment, included, results, settings)
                summary = archives.comment_summary([a.id for a in included], comment, periods)
                stats: ArchiveStats | None
                if len(targets) > 1:
                    stats = _create_everywhere(
                        targets, result, name, paths, Path(staging), summary, on_progress,
                        captures.view(), included, results,
                    )  # fmt: skip
                else:
                    stats = _create(
                        targets[0], handler, encryption_passphrase, packet, name, paths,
                        Path(staging), summary, on_progress, captures.view(),
                    )  # fmt: skip
                if stats is not None:
                    result.engine_stats = stats
                    _attribute_warnings(stats.warnings, included, results)
            finish_sizes()
            if included and handler is None:
                _record_archive(targets, result, Path(staging), path_sizes)
            _run_hooks("backup_post", included, results, packet)
        except EngineError as error:
            if finish_sizes is not None:
                finish_sizes()  # the measuring thread must not change a returned result
            for app in selected:
                if results[app.id].active:
                    results[app.id].fail("engine", error.message)
            result.errors.append(BackupError("engine", "*", None, str(error)))
        finally:
            for quiesced in held:
                quiesced.leave()
            _remove_captures(captures, selected, results)
    for app in selected:
        if results[app.id].status == "failed" and not results[app.id].errors:
            results[app.id].fail("unknown", "failed")  # never a silent failure
    result.duration = time.monotonic() - started_clock
    _record_in_history(result)
    return result


def _existing_paths(app: App, result: AppResult | None = None) -> list[str]:
    """The app's paths that exist; with ``result``, a warning for each one missing."""
    existing = []
    for path in app.manifest.owned_paths():
        if os.path.lexists(path):
            existing.append(path)
        elif result is not None:
            result.warnings.append(f"{path} does not exist; not backed up")
    return existing


def _capture_group(
    group: Sequence[App],
    results: dict[str, AppResult],
    packet: Packet,
    captures: Any,
    strategy: str | None,
    views: bool | None,
    held: list[_Quiesced],
) -> None:
    """Hold one dependency group still just long enough to capture it.

    Staged copies get their first pass while the apps run; then the group is quiesced,
    its ``backup_pre`` hooks run (they may write files to capture, such as dumps), each
    app is captured by its plan, and the group is resumed, unless an app of it must
    stay stopped for the archive run. The group's bracket is put in ``held`` before
    anything is stopped, so that the caller's ``finally`` resumes it whatever
    happens here (it is left already, or once the archive is written)."""
    from homesafe.consistency.capture import plan_app

    live: set[str] = set()
    for app in group:
        if not results[app.id].active:
            continue
        plan = plan_app(app.id, app.manifest, _existing_paths(app), strategy, views=views)
        if plan.strategy == "live":
            live.add(app.id)  # declared safe to read running (or nothing to stop)
        if plan.problem is not None:
            results[app.id].fail("capture", plan.problem)
            continue
        try:
            captures.prepare(plan)
        except (HomesafeError, OSError) as error:
            results[app.id].fail("capture", f"the first copy failed: {_message(error)}")
    quiesced = _Quiesced(list(group), results, "backup", running=frozenset(live))
    held.append(quiesced)
    quiesced.enter()
    _run_hooks("backup_pre", group, results, packet)
    hold_for_the_run = False
    for app in group:
        result = results[app.id]
        if not result.active:
            continue
        result.paths = _existing_paths(app, result)
        plan = plan_app(app.id, app.manifest, result.paths, strategy, views=views)
        if plan.problem is not None:
            result.fail("capture", plan.problem)
            continue
        try:
            captures.capture(plan)
        except (HomesafeError, OSError) as error:
            result.fail("capture", f"{plan.strategy} failed: {_message(error)}")
            continue
        result.strategy = plan.strategy
        result.warnings.extend(plan.notes)
        hold_for_the_run = hold_for_the_run or plan.holds_still_for_the_run
    if not hold_for_the_run:
        quiesced.leave()


def _message(error: HomesafeError | OSError) -> str:
    return error.message if isinstance(error, HomesafeError) else str(error)


def _remove_captures(captures: Any, apps: Sequence[App], results: dict[str, AppResult]) -> None:
    """Remove the run's snapshots and clones; one that cannot be removed is a warning
    (the archive is whole) naming ``homesafe recover``, which tries again."""
    try:
        captures.close()
    except HomesafeError as error:
        for app in apps:
            results[app.id].warnings.append(f"{error.message} ({error.hint})")


def _record_in_history(result: OperationResult) -> None:
    """Every operation becomes a job of the history (imported here: it costs start-up
    time only to operations, not to listings)."""
    from homesafe import history

    history.record_operation(result)


def _write_backup_metadata(
    staging: Path,
    name: str,
    comment: str | None,
    included: Sequence[App],
    results: dict[str, AppResult],
    settings: dict[str, dict[str, Any]],
) -> None:
    entries = []
    for app in included:
        result = results[app.id]
        entries.append(
            {
                "id": app.id,
                "name": app.manifest.display_name,
                "version": app.manifest.version,
                "manifest": app.manifest.to_dict(),
                "strategy": result.strategy,
                # With the stop strategy, services are still stopped while the archive
                # is written, so the downtime is known only after it (see the result).
                "downtime_seconds": (
                    None if result.strategy == "stop" else round(result.downtime, 6)
                ),
                "status": "captured",
                "paths": result.paths,
                "settings": archives.settings_member(app.id),
            }
        )
    metadata = archives.build_metadata(archive_name=name, comment=comment, apps=entries)
    archives.write_metadata(staging, metadata, {app.id: settings[app.id] for app in included})
    archives.write_run_marker(staging)


def _create(
    repository: Repository,
    handler: Handler | None,
    encryption_passphrase: str | None,
    packet: Packet,
    name: str,
    paths: list[str],
    staging: Path,
    comment: str,
    on_progress: ProgressCallback | None,
    view: ReadView | None = None,
) -> ArchiveStats | None:
    if handler is not None:
        try:
            handler(packet, encryption_passphrase=encryption_passphrase)
        except Exception as error:
            # A custom handler is the engine here: its failure fails the apps it held.
            raise EngineError(
                f"the backup handler failed: {type(error).__name__}: {error}"
            ) from error
        return None
    return _write_archive(repository, name, paths, staging, comment, on_progress, view)


def _write_archive(
    repository: Repository,
    name: str,
    paths: list[str],
    staging: Path,
    comment: str,
    on_progress: ProgressCallback | None,
    view: ReadView | None,
) -> ArchiveStats:
    """The engine writes the archive: the metadata in ``staging``, then ``paths``."""
    return engine_for(repository.engine).create(
        repository,
        name,
        [archives.METADATA_DIRECTORY, *paths],
        working_directory=staging,
        comment=comment,
        on_progress=on_progress,
        view=view,
    )


def _usable_destinations(targets: list[Repository], result: OperationResult) -> list[Repository]:
    """The repositories of a backup to several that exist and open; each that does not
    is a failed destination of ``result``. Raises the first problem when none is left
    (then nothing was touched)."""
    usable, problems = [], []
    for target in targets:
        try:
            _ensure_repository(target)
            target.passphrase()
        except HomesafeError as error:
            problems.append(error)
            result.destinations.append(Destination(target.name, "failed", error=error.message))
        else:
            usable.append(target)
    if not usable:
        raise problems[0]
    result.repository = usable[0].name
    return usable


def _create_everywhere(
    targets: Sequence[Repository],
    result: OperationResult,
    name: str,
    paths: list[str],
    staging: Path,
    comment: str,
    on_progress: ProgressCallback | None,
    view: ReadView | None,
    included: Sequence[App],
    results: dict[str, AppResult],
) -> ArchiveStats:
    """Write the archive to every repository of ``targets`` at once, each engine
    process reading the same captured copies (the progress bar follows the first).

    Each repository's outcome becomes a :class:`Destination` of ``result``; the apps
    get a warning for each repository that failed. Returns the first successful
    write's stats; raises the first failure's error when every one failed.
    """
    from concurrent.futures import ThreadPoolExecutor

    def write(position: int) -> tuple[Destination, ArchiveStats | None, EngineError | None]:
        target = targets[position]
        clock = time.monotonic()
        try:
            stats = _write_archive(
                target, name, paths, staging, comment,
                on_progress if position == 0 else None, view,
            )  # fmt: skip
        except HomesafeError as error:
            failure = error if isinstance(error, EngineError) else EngineError(error.message)
            destination = Destination(target.name, "failed", error=error.message)
            destination.duration = time.monotonic() - clock
            return destination, None, failure
        destination = Destination(target.name, "ok", stats, duration=time.monotonic() - clock)
        return destination, stats, None

    with ThreadPoolExecutor(max_workers=len(targets), thread_name_prefix="destination") as pool:
        outcomes = list(pool.map(write, range(len(targets))))
    result.destinations.extend(destination for destination, _, _ in outcomes)
    written = [stats for _, stats, _ in outcomes if stats is not None]
    failures = [failure for _, _, failure in outcomes if failure is not None]
    if not written:
        raise failures[0]
    for destination in result.destinations:
        if destination.status == "failed":
            for app in included:
                results[app.id].warnings.append(
                    f"not in repository {destination.repository!r}: {destination.error}"
                )
    result.repository = next(d.repository for d in result.destinations if d.status == "ok")
    return written[0]


def _attribute_warnings(
    warnings: list[str], apps: Sequence[App], results: dict[str, AppResult]
) -> None:
    """An engine warning about a path fails the app owning it: its copy is not whole."""
    for warning in warnings:
        owner = None
        for app in apps:
            for path in app.manifest.owned_paths():
                if warning.startswith(path + ":") or warning.startswith(path + "/"):
                    owner = app
                elif f" {path}" in warning or f"'{path}" in warning:
                    owner = owner or app
        if owner is None:
            for app in apps:
                results[app.id].warnings.append(warning)
        else:
            results[owner.id].fail("engine", f"incomplete copy: {warning}")


# -- restore ------------------------------------------------------------------------


@dataclass
class ArchiveInfo:
    """An archive in a listing: name, time, apps (from the comment), user comment."""

    name: str
    id: str
    time: str
    apps: list[str]
    comment: str
    homesafe: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "time": self.time,
            "apps": self.apps,
            "comment": self.comment,
            "homesafe": self.homesafe,
        }


def _existing_repository(repository: Repository | None) -> Repository:
    repository = _resolve_repository(repository)
    if repository.is_remote:
        return repository  # the engine's own call says if it is missing
    if not engine_for(repository.engine).repository_exists(repository):
        raise RepositoryNotFoundError(
            f"no repository at {repository.location}",
            hint="Run `homesafe backup` first: it creates the default repository.",
        )
    return repository


def list_archives(repository: Repository | None = None) -> list[ArchiveInfo]:
    """Every archive of the repository, oldest first, with its apps."""
    repository = _existing_repository(repository)
    listed = []
    for summary in engine_for(repository.engine).list_archives(repository):
        parsed = archives.parse_comment(summary.comment)
        listed.append(
            ArchiveInfo(
                summary.name,
                summary.id,
                summary.time,
                parsed.apps,
                parsed.comment,
                parsed.is_homesafe,
            )
        )
    return listed


def _describe_and_list(
    source: ArchiveSource, local: dict[str, App] | None = None
) -> tuple[archives.ArchiveDescription, list[ArchiveEntry]]:
    """The archive's description and listing: from a repository, read side by side
    (see :meth:`EngineSource.describe_and_list`); from a tar file, one after the other.
    Stored manifests equal to those of the ``local`` apps are not validated again."""
    from homesafe.sources import EngineSource

    known = [app.manifest for app in (local or {}).values()]
    if isinstance(source, EngineSource):
        return source.describe_and_list(known)
    description = source.describe(known)
    return description, source.listing()


def read_archive(
    archive_name: str, repository: Repository | None = None
) -> tuple[archives.ArchiveDescription, list[ArchiveEntry]]:
    """What an archive says about itself (homesafe's or the reference distribution's
    metadata) and its contents, homesafe's own files left out."""
    from homesafe.sources import EngineSource

    source = EngineSource(_existing_repository(repository), archive_name)
    description, listing = _describe_and_list(source)
    contents = [
        entry for entry in listing if not is_inside(entry.path, archives.METADATA_DIRECTORY)
    ]
    return description, contents


@dataclass
class _RestoreRun:
    """One restore's state, so every failure path can put back what it changed."""

    source: ArchiveSource
    target: Path
    force: bool
    result: OperationResult
    results: dict[str, AppResult]
    stored: dict[str, archives.StoredApp]
    selected: list[App]
    plans: dict[str, restore.AppPlan] = field(default_factory=dict)
    swaps: dict[str, restore.Swap] = field(default_factory=dict)
    previous_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The local record the plans were made from; the archive is read while staging.
    record: archives.ArchiveRecord | None = None
    # Staging areas (and the replaced copies in them) removed by a detached process.
    detached_removal: bool = False

    @property
    def live(self) -> bool:
        return str(self.target) == "/"

    def active(self) -> list[App]:
        return [app for app in self.selected if self.results[app.id].active]


def _prepare_restore(
    source: ArchiveSource,
    label: str,
    repository_name: str,
    app_ids: Sequence[str] | None,
    target_root: str | os.PathLike[str],
    apps: dict[str, App] | None,
    force: bool,
    *,
    check_space: bool = True,
    use_record: bool = False,
) -> _RestoreRun:
    """Everything decided before anything is changed: apps, refusals, plan, space.

    With ``use_record``, an archive this host wrote and kept a record of is planned
    from that record, without reading the archive (see :func:`_stage_from_record`).
    """
    from homesafe import restore
    from homesafe.sources import TarSource

    target = Path(target_root).resolve()
    if not target.is_dir():
        raise HomesafeError(f"target root {target} is not a directory")
    live = str(target) == "/"
    local = apps if apps is not None else _local_apps_or_none(live)
    record = _archive_record(source) if use_record else None
    known = [app.manifest for app in (local or {}).values()]
    recorded = (
        archives.describe_extracted(record.directory, source.label, known) if record else None
    )
    listing: list[ArchiveEntry] = []
    if recorded is not None:
        description = recorded
    else:
        record = None
        description, listing = _describe_and_list(source, local)
    stored_apps = _stored_apps(description, local)
    selected = _select_from_archive(stored_apps, app_ids)
    if isinstance(source, TarSource):
        source.check(_tar_member_filter(description))
    result = OperationResult(
        "restore", repository_name, label, started=_now(), target_root=str(target)
    )
    results = {
        app.id: AppResult(app.id, strategy="stop" if live and app.manifest.services else "live")
        for app in selected
    }
    result.apps = [results[app.id] for app in selected]
    run = _RestoreRun(source, target, force, result, results, description.apps, selected)
    run.record = record
    for app in selected:
        _check_version(app, (local or {}).get(app.id), force, results[app.id])
    if record is not None:
        plans = restore.plan_from_record(
            [
                (app.id, app.manifest.owned_paths(), description.apps[app.id].paths)
                for app in run.active()
            ],
            record.sizes,
            target,
        )
    else:
        plans = restore.plan(
            [(app.id, app.manifest.owned_paths()) for app in run.active()], listing, target
        )
    run.plans = {plan.app_id: plan for plan in plans}
    if check_space:
        restore.require_space(run.plans[app.id] for app in run.active())
    return run


class _StaleRecord(Exception):
    """The local record a restore was planned from does not describe the archive."""


def _archive_record(source: ArchiveSource) -> archives.ArchiveRecord | None:
    """The local record of the archive ``source`` reads, if this host kept one."""
    from homesafe.sources import EngineSource

    if not isinstance(source, EngineSource):
        return None
    directory = archives.record_directory(
        locations.home(), source.repository.name, source.archive_name
    )
    record = archives.load_record(directory, source.repository.location)
    if record is not None and source.repository.engine != "borg" and not record.archive_id:
        return None  # a restic archive is addressed by its id: names are only tags
    return record


def _stage_from_record(
    run: _RestoreRun, plans: list[restore.AppPlan], on_progress: ProgressCallback | None
) -> list[str]:
    """Stage plans made from a record, and list the archive meanwhile (the apps' paths
    and the run marker, with times) by a second engine call side by side with the
    extraction; then settle the directories the extraction left to it
    (:func:`restore.settle_directories`). Returns the extraction's warnings.

    Before anything is verified or swapped, the archive's run marker must be the
    record's (the archive is the very one this host wrote and recorded) and the listing
    must hold no path the plans took for not archived; otherwise :class:`_StaleRecord`
    (staging is removed by the caller). The plans get their entries from the listing,
    so that verification is as exact as without a record. Both calls wait
    SIDE_BY_SIDE_LOCK_WAIT seconds at most for the repository lock (calls meeting on
    borg's lock roster would otherwise sleep a tenth of the whole lock wait), and so do
    the extractions :func:`restore.stage` makes side by side; one that still finds the
    repository locked is made again once the others ended, with the repository's own
    lock wait. An archive the record addresses by id (restic) is read
    by that id; an archive that is gone makes the record stale as well.
    """
    try:
        return _stage_and_list(run, plans, on_progress)
    except ArchiveNotFoundError as error:
        raise _StaleRecord() from error


def _stage_and_list(
    run: _RestoreRun, plans: list[restore.AppPlan], on_progress: ProgressCallback | None
) -> list[str]:
    """The work of :func:`_stage_from_record`."""
    from concurrent.futures import ThreadPoolExecutor

    from homesafe import restore
    from homesafe.sources import EngineSource

    assert run.record is not None and isinstance(run.source, EngineSource)
    source = run.source.by_id(run.record.archive_id) if run.record.archive_id else run.source
    hasty = source.hasty()
    paths = [archives.RUN_MARKER_DIRECTORY]
    paths += sorted({path.archive_path for plan in plans for path in plan.paths})

    def read_listing() -> list[ArchiveEntry] | None:
        try:
            # The borg started early (if any) is for the extraction, the longer call.
            with prestart.leave_it():
                return hasty.listing(paths, times=True)
        except RepositoryLockedError:
            return None  # made again below, with the whole lock wait

    settled: list[restore.SettledDirectory] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-listing") as pool:
        listed = pool.submit(read_listing)
        # Leaving the pool waits for the listing: it ends before anything else happens,
        # whatever the extraction did.
        warnings = restore.stage(plans, source, on_progress, alongside=True, settled=settled)
        listing = listed.result()
    if listing is None:
        listing = source.listing(paths, times=True)
    if archives.run_markers([entry.path for entry in listing]) != [run.record.run_id]:
        raise _StaleRecord()
    if restore.attach_listing(plans, listing):
        raise _StaleRecord()
    warnings += restore.settle_directories(settled, listing, source)
    return list(warnings)


def _tar_member_filter(description: archives.ArchiveDescription) -> Callable[[str], bool]:
    """Members a tar may hold: metadata, paths of the apps the archive declares, and the
    directories above them (tar files list them; they are never extracted)."""
    roots = [*archives.DESCRIPTION_MEMBERS, archives.REFERENCE_DATA]
    roots += [
        path.lstrip("/")
        for stored in description.apps.values()
        for path in stored.manifest.owned_paths()
    ]
    return lambda path: any(is_inside(path, root) or is_inside(root, path) for root in roots)


def _check_version(app: App, local: App | None, force: bool, result: AppResult) -> None:
    """Refuse data newer than the installed app can read, unless forced."""
    if local is None or force or app.manifest.version <= local.manifest.version:
        return
    result.fail(
        "version",
        f"the archive holds {app.id} data version {app.manifest.version}, newer than the "
        f"installed app's version {local.manifest.version}; upgrade the app first, or "
        "restore with --force",
    )


def _run_restore(run: _RestoreRun, on_progress: ProgressCallback | None) -> OperationResult:
    """Install, stage, verify, then swap each app under quiesce; roll back what fails."""
    from homesafe import restore

    started_clock = time.monotonic()
    if run.live:
        for app in run.active():
            _install_if_missing(app, run.results[app.id])
    try:
        plans = [run.plans[app.id] for app in run.active()]
        try:
            if run.record is not None:
                warnings = _stage_from_record(run, plans, on_progress)
            else:
                warnings = restore.stage(plans, run.source, on_progress)
            # Extractions side by side copy hard links that span them: link them again.
            warnings += restore.join_hard_links(plans)
        except EngineError as error:
            for app in run.active():
                run.results[app.id].fail("engine", error.message)
            run.result.errors.append(BackupError("engine", "*", None, str(error)))
            return run.result
        for app in run.active():
            run.results[app.id].warnings += warnings
            try:
                restore.verify(run.plans[app.id])
            except restore.VerificationError as error:
                run.results[app.id].fail("verify", error.message)
        quiesced = _Quiesced(run.active() if run.live else [], run.results, "restore")
        packet = Packet("restore", "apps", str(run.target), run.active(), run.result.archive)
        try:
            quiesced.enter()
            if run.live:
                _run_hooks("restore_pre", run.active(), run.results, packet)
            for app in run.active():
                _swap_in(run, app)
            if run.live:
                _run_hooks("restore_post", run.active(), run.results, packet)
            for app in run.selected:
                if not run.results[app.id].active and app.id in run.swaps:
                    _roll_back(run, app)
        except BaseException:
            # Interrupted (SIGTERM, Ctrl-C) with apps swapped: none stays half-restored.
            for app in run.selected:
                if app.id in run.swaps:
                    _roll_back(run, app)
            raise
        finally:
            quiesced.leave()
        for app in run.selected:
            # A service that would not start with the restored data: put the old data
            # back and start the app as it was.
            if not run.results[app.id].active and app.id in run.swaps:
                _roll_back(run, app, quiesced.stopped.get(app.id, []))
        for app in run.active():
            run.swaps.pop(app.id).commit(discard_previous=not run.detached_removal)
            run.results[app.id].paths = app.manifest.owned_paths()
            run.results[app.id].size = run.plans[app.id].size
    finally:
        restore.remove_staging(
            run.plans.values(), keep_if_unrolled=run.swaps.values(), detached=run.detached_removal
        )
        run.result.duration = time.monotonic() - started_clock
    return run.result


def _swap_in(run: _RestoreRun, app: App) -> None:
    """Put one app's staged paths in place, then its settings."""
    from homesafe import restore

    result = run.results[app.id]
    swap = restore.Swap(run.plans[app.id])
    try:
        swap.apply()
    except restore.RestoreError as error:
        result.fail("swap", error.message)
        return
    run.swaps[app.id] = swap
    if not run.live:
        return
    values = _restored_settings(run, app)
    if values:
        run.previous_settings[app.id] = state.read_settings(values)
        swap.record(
            journal.SETTINGS_WRITTEN,
            {"previous": run.previous_settings[app.id], "written": list(values)},
        )
        state.write_settings(values)


def _restored_settings(run: _RestoreRun, app: App) -> dict[str, Any]:
    return run.stored[app.id].settings or {}


def _roll_back(run: _RestoreRun, app: App, started_services: Sequence[Any] = ()) -> None:
    """Put the app back as it was before the restore; its services stopped meanwhile."""
    from homesafe import restore

    result = run.results[app.id]
    for handler in reversed(started_services):
        try:
            if handler.is_running():
                handler.stop()
        except HomesafeError as error:
            result.fail("rollback", f"could not stop {handler.label} to roll back: {error}")
    try:
        run.swaps[app.id].roll_back()
        run.swaps.pop(app.id)
        result.warnings.append("rolled back: the app is as it was before the restore")
    except restore.RestoreError as error:
        result.fail("rollback", str(error))
    previous = run.previous_settings.pop(app.id, None)
    if previous is not None:
        for key in set(_restored_settings(run, app)) - set(previous):
            state.delete_setting(key)
        state.write_settings(previous)
    for handler in started_services:
        try:
            handler.start()
        except HomesafeError as error:
            result.fail("rollback", f"could not start {handler.label} again: {error}")


@journal.guarded("restore")
def restore_apps(
    archive_name: str,
    app_ids: Sequence[str] | None = None,
    *,
    repository: Repository | None = None,
    target_root: str | os.PathLike[str] = "/",
    apps: dict[str, App] | None = None,
    force: bool = False,
    on_progress: ProgressCallback | None = None,
    remove_in_background: bool = False,
) -> OperationResult:
    """Restore the named apps (every app in the archive when none is named).

    The archive's own manifests (homesafe's, or the reference distribution's) say what
    to restore. Each app's paths are extracted into staging areas on the targets'
    filesystems and verified while the apps still run; then, into the live system
    (``target_root`` = ``/``): missing apps are installed, apps are locked down, their
    services stopped in reverse order, ``restore_pre`` hooks run, the staged paths are
    swapped in by rename, settings written back, ``restore_post`` hooks run and services
    restarted. An app any of whose steps fails is rolled back to exactly what it was.
    Into another root only the files are placed: services, hooks and settings belong to
    the live system. Data newer than the installed app is refused unless ``force``.
    Refusals that concern the whole restore (no space, unknown apps) raise before
    anything is changed.

    The copies the restore replaced are removed once it is final; with
    ``remove_in_background`` (what the CLI does) by a detached process, so that this
    call returns without waiting for it (see :func:`restore.remove_detached`).
    """
    from homesafe.sources import EngineSource

    repository = _existing_repository(repository)
    source = EngineSource(repository, archive_name)
    arguments = (source, archive_name, repository.name, app_ids, target_root, apps, force)
    run = _prepare_restore(*arguments, use_record=True)
    run.detached_removal = remove_in_background
    try:
        result = _run_restore(run, on_progress)
    except _StaleRecord:
        # The record was not the archive's (nothing was changed, staging is removed):
        # read the archive itself, as for an archive this host has no record of.
        logger.warning("the local record of archive %s is stale; reading the archive", archive_name)
        if run.record is not None:
            shutil.rmtree(run.record.directory, ignore_errors=True)
        run = _prepare_restore(*arguments)
        run.detached_removal = remove_in_background
        result = _run_restore(run, on_progress)
    _record_in_history(result)
    return result


@journal.guarded("import")
def import_apps(
    file: str | os.PathLike[str],
    app_ids: Sequence[str] | None = None,
    *,
    target_root: str | os.PathLike[str] = "/",
    apps: dict[str, App] | None = None,
    force: bool = False,
    on_progress: ProgressCallback | None = None,
) -> OperationResult:
    """Restore apps from an exported tar (.tar, .tar.gz, .tar.zst ...) as
    :func:`restore_apps` does from an archive. Every member is checked first: a path
    with ``..``, an absolute path, a link leaving the tree, a device file or a path of
    no app in the archive refuses the whole file before anything is written."""
    from homesafe.sources import TarSource

    with journal.scratch_directory("import-") as scratch:
        source = TarSource(Path(file), scratch)
        run = _prepare_restore(source, str(file), "import", app_ids, target_root, apps, force)
        result = _run_restore(run, on_progress)
    _record_in_history(result)
    return result


@dataclass
class AppPreview:
    """What restoring one app would change."""

    app: str
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    size: int = 0
    services: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "added": self.added,
            "replaced": self.replaced,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "size": self.size,
            "services": self.services,
            "errors": self.errors,
        }


@dataclass
class RestorePreview:
    """A dry run: per-app changes and free space, with nothing changed."""

    archive: str
    target_root: str
    apps: list[AppPreview]
    space: list[restore.SpaceCheck]

    @property
    def possible(self) -> bool:
        return all(check.sufficient for check in self.space) and not any(
            app.errors for app in self.apps
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": True,
            "archive": self.archive,
            "target_root": self.target_root,
            "possible": self.possible,
            "apps": [app.to_dict() for app in self.apps],
            "space": [
                {
                    "filesystem_of": check.anchor,
                    "required": check.required,
                    "available": check.available,
                    "sufficient": check.sufficient,
                }
                for check in self.space
            ],
        }


def preview_restore(
    archive_name: str,
    app_ids: Sequence[str] | None = None,
    *,
    repository: Repository | None = None,
    file: str | os.PathLike[str] | None = None,
    target_root: str | os.PathLike[str] = "/",
    apps: dict[str, App] | None = None,
    force: bool = False,
) -> RestorePreview:
    """What :func:`restore_apps` (or :func:`import_apps` with ``file``) would change:
    files added, replaced and removed per app, services stopped, space needed against
    space free on each filesystem. Nothing is changed."""
    from homesafe import restore
    from homesafe.sources import EngineSource, TarSource

    with journal.scratch_directory("preview-") as scratch:
        if file is not None:
            source: ArchiveSource = TarSource(Path(file), scratch)
            label, repository_name = str(file), "import"
        else:
            resolved = _existing_repository(repository)
            source = EngineSource(resolved, archive_name)
            label, repository_name = archive_name, resolved.name
        # The preview reports missing space instead of refusing.
        run = _prepare_restore(
            source, label, repository_name, app_ids, target_root, apps, force, check_space=False
        )
    previews = []
    for app in run.selected:
        preview = AppPreview(app.id, errors=[e.message for e in run.results[app.id].errors])
        plan = run.plans.get(app.id)
        if plan is not None:
            _compare_with_live(plan, run.target, preview)
        if run.live:
            preview.services = [service.name for service in reversed(app.manifest.services)]
        previews.append(preview)
    return RestorePreview(label, str(run.target), previews, restore.check_space(run.plans.values()))


def _compare_with_live(plan: restore.AppPlan, target: Path, preview: AppPreview) -> None:
    archived = {entry.path: entry for entry in plan.entries}
    preview.size = plan.size
    live: dict[str, os.stat_result] = {}
    for path_plan in plan.paths:
        for found in _walk(path_plan.target):
            live[str(found.relative_to(target))] = found.lstat()
    for archive_path, entry in archived.items():
        status = live.get(archive_path)
        if status is None:
            preview.added.append("/" + archive_path)
        elif entry.type == "-" and (
            not stat.S_ISREG(status.st_mode) or status.st_size != entry.size
        ):
            preview.replaced.append("/" + archive_path)
        else:
            preview.unchanged += 1
    preview.removed = sorted("/" + live_path for live_path in live if live_path not in archived)


def _walk(root: Path) -> Iterator[Path]:
    if not os.path.lexists(root):
        return
    yield root
    if root.is_dir() and not root.is_symlink():
        for directory, subdirectories, files in os.walk(root):
            for name in [*subdirectories, *files]:
                yield Path(directory, name)


@journal.guarded("verify")
def verify_archive(
    archive_name: str,
    app_ids: Sequence[str] | None = None,
    *,
    repository: Repository | None = None,
    apps: dict[str, App] | None = None,
) -> OperationResult:
    """A restore drill: restore into a sandbox, run each app's ``setup.health`` command
    against it (``HOMESAFE_ROOT`` names the sandbox), record how long it took to a
    healthy app, and remove the sandbox. Apps without a health command are restored and
    checked against the archive only (a warning says so)."""
    from homesafe.sources import EngineSource

    repository = _existing_repository(repository)
    started = time.monotonic()
    with journal.scratch_directory("verify-") as sandbox:
        source = EngineSource(repository, archive_name)
        run = _prepare_restore(
            source, archive_name, repository.name, app_ids, sandbox, apps, force=True
        )
        result = _run_restore(run, None)
        result.operation = "verify"
        environment = {
            "HOMESAFE_OPERATION": "verify",
            "HOMESAFE_ROOT": str(sandbox),
            "HOMESAFE_SANDBOX": str(sandbox),
            "HOMESAFE_ARCHIVE": archive_name,
        }
        for app in run.active():
            app_result = run.results[app.id]
            health = app.manifest.setup.health
            if health is None:
                app_result.warnings.append("no setup.health command: files verified only")
                continue
            outcome = run_command(
                app.id,
                "health",
                health,
                {**environment, "HOMESAFE_APP": app.id},
                app.manifest.hooks.timeout,
            )
            app_result.hooks.append(outcome)
            if outcome.succeeded:
                app_result.healthy_after = time.monotonic() - started
            else:
                app_result.fail("health", f"health check failed: {outcome.error}")
    _record_in_history(result)
    return result


def _local_apps_or_none(live: bool) -> dict[str, App] | None:
    """Installed apps, for their Python hooks; a restore elsewhere does not need them."""
    try:
        return load_apps()
    except ManifestError:
        if live:
            raise
        return None


def _stored_apps(
    description: archives.ArchiveDescription, local: dict[str, App] | None
) -> dict[str, App]:
    """The archive's apps, described by the manifests stored with them (with the
    Python hooks of the installed app of the same id, if any)."""
    stored = {}
    for app_id, stored_app in description.apps.items():
        local_app = (local or {}).get(app_id)
        if local_app is not None:
            stored[app_id] = local_app.with_manifest(stored_app.manifest)
        else:
            stored[app_id] = App(stored_app.manifest, "archive")
    return stored


def _select_from_archive(stored: dict[str, App], app_ids: Sequence[str] | None) -> list[App]:
    if not app_ids:
        return dependency_order(stored.values())
    missing = [app_id for app_id in app_ids if app_id not in stored]
    if missing:
        raise AppNotFoundError(
            f"not in this archive: {', '.join(missing)}",
            hint=f"The archive holds: {', '.join(sorted(stored)) or 'no apps'}.",
        )
    return select(stored, app_ids)


def _install_if_missing(app: App, result: AppResult) -> None:
    """Run ``setup.install`` for an app whose ``setup.installed`` check fails."""
    try:
        if app.is_installed():
            return
    except CommandError as error:
        result.fail("install", f"setup.installed check failed: {error.message}")
        return
    install = app.manifest.setup.install
    if install is None:
        result.fail("install", "the app is not installed and its manifest has no setup.install")
        return
    from homesafe import execute

    try:
        execute.run(install, timeout=3600)
    except CommandError as error:
        result.fail("install", f"setup.install failed: {error.message}")
        return
    if not app.is_installed():
        result.fail("install", "setup.install ran, but setup.installed still fails")


# -- archive maintenance -------------------------------------------------------------


def delete_archives(archive_names: Sequence[str], repository: Repository | None = None) -> None:
    """Delete archives and reclaim their space (borg: delete, then compact)."""
    repository = _existing_repository(repository)
    engine_for(repository.engine).delete(repository, archive_names)
    archives.forget_records(locations.home(), repository.name, archive_names)


def export_archive(
    archive_name: str, file: str | os.PathLike[str], repository: Repository | None = None
) -> None:
    """Write an archive as a tar file (.tar, .tar.gz, .tar.bz2, .tar.xz by suffix)."""
    repository = _existing_repository(repository)
    engine_for(repository.engine).export_tar(repository, archive_name, Path(file))


def export_key(repository: Repository | None = None) -> dict[str, str]:
    """What a user must keep to open the repository elsewhere: key and passphrase."""
    repository = _existing_repository(repository)
    return {
        "repository": repository.location,
        "encryption": repository.encryption,
        "passphrase": repository.passphrase() or "",
        "key": engine_for(repository.engine).export_key(repository),
    }


# -- repositories ---------------------------------------------------------------------
# Thin: each asks the repository's engine (see homesafe.engines.base for the contracts).


def initialize_repository(repository: Repository) -> bool:
    """Create ``repository`` when nothing is at its location (True, with a generated
    passphrase file for a file source that has none); else check that its passphrase
    opens the repository there (False)."""
    engine = engine_for(repository.engine)
    file = repository.passphrase_file
    generated = file is not None and not file.exists()
    generate_passphrase(repository)  # a remote probe needs some passphrase to send
    try:
        if _opens(engine, repository):
            engine.attach(repository)
            return False
        if not repository.is_remote:
            Path(repository.location).parent.mkdir(parents=True, exist_ok=True)
        engine.initialize(repository)
    except PassphraseError as error:
        if generated and file is not None:
            file.unlink(missing_ok=True)
            raise PassphraseError(
                f"a repository exists already at {repository.location}, and a new "
                "passphrase cannot open it",
                hint="Give its passphrase: --passphrase-file, --passphrase-env or --passcommand.",
            ) from error
        raise
    except BaseException:
        if generated and file is not None:
            file.unlink(missing_ok=True)
        raise
    return True


def _opens(engine: Engine, repository: Repository) -> bool:
    """True when a repository is at the location and the passphrase opens it; False
    when there is none; PassphraseError when there is one the passphrase does not open.
    A remote one is listed straight away: a probe first would cost a round trip more."""
    if repository.is_remote:
        try:
            engine.list_archives(repository)
        except RepositoryNotFoundError:
            return False
        return True
    if not engine.repository_exists(repository):
        return False
    engine.list_archives(repository)  # raises PassphraseError for a wrong passphrase
    return True


def repository_info(repository: Repository | None = None) -> RepositoryInfo:
    """Archive count, last archive time, sizes and encryption of the repository."""
    repository = _existing_repository(repository)
    return engine_for(repository.engine).repository_info(repository)


def check_repository(
    repository: Repository | None = None,
    *,
    verify_data: bool = False,
    sample_percent: float | None = None,
) -> CheckReport:
    """Check the repository; with ``verify_data`` read back all data, with
    ``sample_percent`` that share of it (restic). Damage is reported, not raised."""
    repository = _existing_repository(repository)
    if sample_percent is not None and not 0 < sample_percent <= 100:
        raise UsageError(f"--sample must be a percentage above 0, not {sample_percent:g}")
    report = engine_for(repository.engine).check(
        repository, verify_data=verify_data, sample_percent=sample_percent
    )
    _record_job(
        "check",
        repository.name,
        ok=report.ok,
        error="; ".join(report.problems[:1]),
        detail=report.to_dict(),
    )
    return report


def _record_job(
    operation: str, repository: str, *, ok: bool, error: str, detail: dict[str, Any]
) -> None:
    """A repository operation (check, prune) as a job of the history."""
    from homesafe import history

    history.record_job(
        operation, repository, status="ok" if ok else "failed", error=error, detail=detail
    )


def prune_repository(
    repository: Repository | None, policy: RetentionPolicy, *, dry_run: bool = False
) -> PruneReport:
    """Delete the archives ``policy`` does not keep and give the space back; the report
    says which were kept and removed and how many stored bytes that freed."""
    repository = _existing_repository(repository)
    if not policy.keeps_anything:
        raise UsageError(
            "give at least one of --keep-daily, --keep-weekly, --keep-monthly",
            hint="A policy that keeps nothing would delete every archive.",
        )
    engine = engine_for(repository.engine)
    before = None if dry_run else engine.repository_info(repository).stored_size
    report = engine.prune(repository, policy, dry_run=dry_run)
    if not dry_run:
        archives.forget_records(locations.home(), repository.name, report.removed)
    if before is not None:
        report.reclaimed_bytes = before - engine.repository_info(repository).stored_size
    if not dry_run:
        _record_job("prune", repository.name, ok=True, error="", detail=report.to_dict())
    return report


def import_key(file: str | os.PathLike[str], repository: Repository | None = None) -> None:
    """Put a key exported by ``export_key`` back into the repository (borg)."""
    repository = _existing_repository(repository)
    engine_for(repository.engine).import_key(repository, Path(file))


def change_passphrase(
    repository: Repository | None = None, new_passphrase: str | None = None
) -> str:
    """Re-encrypt the repository key with a new passphrase and return it.

    With a passphrase file, a new random passphrase (unless given) is written next to it
    first (``<file>.new``, 0600) and moved over it once the engine has switched, so the
    passphrase that opens the repository is on disk at every moment. With a passphrase
    from the environment or a command, the caller must give the new one and update
    that source.
    """
    repository = _existing_repository(repository)
    engine = engine_for(repository.engine)
    if repository.encryption == "none":
        raise UsageError(f"repository {repository.name!r} is not encrypted")
    file = repository.passphrase_file
    uses_file = not (repository.passphrase_environment or repository.passphrase_command)
    if not uses_file and new_passphrase is None:
        raise UsageError(
            f"the passphrase of {repository.name!r} comes from "
            f"{repository.passphrase_source()}: give the new one",
        )
    new = new_passphrase if new_passphrase is not None else new_passphrase_value()
    if not uses_file or file is None:
        engine.change_passphrase(repository, new)
        return new
    pending = file.with_name(file.name + ".new")
    locations.write_secret_file(pending, new + "\n")
    try:
        engine.change_passphrase(repository, new)
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    os.replace(pending, file)
    return new


def break_lock(repository: Repository | None = None) -> None:
    """Remove every lock of the repository, whoever holds it (borg ``break-lock``,
    restic ``unlock --remove-all``). For the user to decide, once sure no process on any
    host uses the repository: a lock homesafe can prove stale is cleared without it."""
    repository = _existing_repository(repository)
    engine_for(repository.engine).break_lock(repository)
    _record_job("break-lock", repository.name, ok=True, error="", detail={})


def remove_repository(name: str, *, delete_data: bool = False) -> None:
    """Forget a registered repository; with ``delete_data`` delete it and its archives
    first, and its passphrase file (under secrets/) after."""
    repository = get_repository(name)
    if delete_data:
        engine_for(repository.engine).destroy(repository)
    unregister_repository(name)
    archives.forget_repository_records(locations.home(), name)
    # homesafe's own restic key opens the repository only for this registration.
    from homesafe.engines import restic_key

    restic_key.forget(name)
    if delete_data:
        # Only the secrets homesafe made for it: a file the person named stays.
        if repository.passphrase_file == passphrase_file_for(name):
            repository.passphrase_file.unlink(missing_ok=True)
        s3_credentials_file(name).unlink(missing_ok=True)


# -- full system ------------------------------------------------------------------------
# Thin: the work is in homesafe.full (snapshot, borg, new subvolume, default switch).


@journal.guarded("full backup")
def backup_full(
    subvolume: str | os.PathLike[str] = "/",
    *,
    repository: Repository | None = None,
    archive_name: str | None = None,
    comment: str | None = None,
    on_progress: ProgressCallback | None = None,
    excludes: Sequence[str] | None = None,
) -> OperationResult:
    """Back up the whole btrfs subvolume at ``subvolume`` (``/`` by default) from a
    read-only snapshot, deleted afterwards whatever happens. The archive holds no apps:
    its paths are relative to the subvolume's root (the original absolute paths for
    ``/``) and its metadata has scope "full". ``excludes``: directories whose contents
    are left out (default for ``/``: dev, proc, sys, run, tmp). Returns a
    :class:`homesafe.full.FullSystemResult`; see :mod:`homesafe.full`."""
    from homesafe import full

    source = full.source_subvolume(subvolume)  # not a subvolume: raise, change nothing
    repository = _resolve_repository(repository)
    _ensure_repository(repository)
    repository.passphrase()  # fails early, before the snapshot is taken
    return full.backup_full(
        source,
        repository=repository,
        archive_name=archive_name,
        comment=comment,
        on_progress=on_progress,
        excludes=excludes,
    )


@journal.guarded("full restore")
def restore_full(
    archive_name: str,
    *,
    repository: Repository | None = None,
    mount_point: str | os.PathLike[str] = "/",
    subvolume_name: str | None = None,
    on_progress: ProgressCallback | None = None,
    check_space: bool = True,
) -> OperationResult:
    """Restore a full-system archive into a new btrfs subvolume next to the one mounted
    at ``mount_point`` and make it the default subvolume (used from the next mount, the
    next boot for ``/``); the old subvolume is kept and the result's ``rollback`` and
    ``notes`` say how to switch back. An archive larger than the free space is refused
    first unless ``check_space`` is False. Returns a
    :class:`homesafe.full.FullSystemResult`; see :mod:`homesafe.full`."""
    from homesafe import full

    full.source_subvolume(mount_point)  # not a subvolume: raise, before any engine call
    return full.restore_full(
        archive_name,
        repository=_existing_repository(repository),
        mount_point=mount_point,
        subvolume_name=subvolume_name,
        on_progress=on_progress,
        check_space=check_space,
    )
