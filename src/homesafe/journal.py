"""Crash safety: every change an operation makes is written down before it is made.

A backup or restore changes the system for a while: it sets lockdown flags, stops
services, creates staging areas, moves an app's live files aside and puts restored ones
in their place. Each of these is first appended to a journal file under
``$HOMESAFE_HOME/journal/`` (one JSON object per line, fsync'ed) as an *entry*: a kind
and the data needed to undo it. When the change has been undone (a service started
again), or has become permanent (a restore committed), a closing line says so. A journal
whose entries are all closed is deleted.

If homesafe dies with entries still open — killed with SIGKILL, a power cut — the next
operation, or ``homesafe recover``, undoes them newest first: services started again,
lockdown lifted, files swapped back, staging areas removed. A journal belongs to a live
process as long as that process holds an ``flock`` on it; the kernel drops the lock when
the process dies, however it dies, so a journal is recovered exactly when its writer is
gone, and never twice at the same time.

Kinds of entry (``data`` keys in brackets):

``lockdown`` [app, flag, leave, timeout]
    a lockdown flag set; undone by running ``leave`` (if any) and removing ``flag``.
``service_stopped`` [app, service, label]
    a running service stopped; undone by starting it unless it runs already.
``temporary_directory`` [path]
    a directory homesafe made for itself (a staging area); undone by removing it.
``moved_aside`` [target, previous]
    a live path renamed aside during a restore; undone by renaming it back.
``placed`` [staged, target]
    a restored path renamed into place; undone by renaming it back to staging.
``directory_created`` [path]
    a parent directory made for a restored path; undone by removing it if empty.
``settings_written`` [app, previous, written]
    settings stored by a restore; undone by writing ``previous`` back.
``command`` [description, undo, timeout]
    anything else (a snapshot, a mount): undone by running the argv ``undo``.

One operation at a time per host: :func:`operation` holds the ``operation`` lock of
:mod:`homesafe.locks` (an ``flock``, so a dead process cannot leave it stuck), waits a
while for another operation to finish, and recovers what dead operations left before
starting.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

from homesafe import execute, locations, locks, processes
from homesafe.errors import HomesafeError, OperationLockedError

__all__ = [
    "COMMAND",
    "DIRECTORY_CREATED",
    "LOCKDOWN",
    "MOVED_ASIDE",
    "PLACED",
    "SERVICE_STOPPED",
    "SETTINGS_WRITTEN",
    "TEMPORARY_DIRECTORY",
    "Entry",
    "Journal",
    "RecoveryAction",
    "RecoveryReport",
    "UndoError",
    "active",
    "directory",
    "guarded",
    "make_directory",
    "operation",
    "record_lockdown",
    "recover",
    "remove_tree",
    "temporary_directory",
    "undo_own",
]

logger = logging.getLogger(__name__)

LOCKDOWN = "lockdown"
SERVICE_STOPPED = "service_stopped"
TEMPORARY_DIRECTORY = "temporary_directory"
MOVED_ASIDE = "moved_aside"
PLACED = "placed"
DIRECTORY_CREATED = "directory_created"
SETTINGS_WRITTEN = "settings_written"
COMMAND = "command"

# Changes to an app's files: while they are undone, the app's services must be stopped.
FILE_KINDS = frozenset({MOVED_ASIDE, PLACED, DIRECTORY_CREATED, SETTINGS_WRITTEN})

OPERATION_LOCK = "operation"
DEFAULT_WAIT_SECONDS = 60.0
LOCK_POLL_SECONDS = 0.1
# A journal being created is a dot-file until its header is written; one older than this
# whose writer is gone is a leftover.
UNFINISHED_JOURNAL_SECONDS = 60.0
UNDO_COMMAND_TIMEOUT = 300.0
SUFFIX = ".jsonl"


def directory() -> Path:
    """Where journals live: ``$HOMESAFE_HOME/journal``."""
    return locations.home() / "journal"


@dataclass(frozen=True)
class Entry:
    """One change, recorded before it was made."""

    number: int
    kind: str
    data: dict[str, Any]
    time: float


class Journal:
    """This process's journal in one ``HOMESAFE_HOME`` (get it with :func:`active`).

    The file is created with the first entry and deleted when the last open entry is
    closed; while it exists this process holds an exclusive ``flock`` on it. Every method
    is safe to call from several threads.
    """

    def __init__(self, journal_directory: Path) -> None:
        self.directory = journal_directory
        self.operation = "operation"
        self._lock = threading.Lock()
        self._descriptor: int | None = None
        self._path: Path | None = None
        self._pending: dict[int, Entry] = {}
        self._services: list[Entry] = []  # every service stop, closed or not
        self._counter = 0

    @property
    def path(self) -> Path | None:
        """The journal file, while it has open entries."""
        return self._path

    def record(self, kind: str, data: dict[str, Any]) -> int:
        """Write down a change about to be made (on disk when this returns); its number
        is what :meth:`undone` and :meth:`keep` take."""
        with self._lock:
            if self._descriptor is None:
                self._open()
            self._counter += 1
            entry = Entry(self._counter, kind, data, time.time())
            self._write({"entry": entry.number, "kind": kind, "data": data, "time": entry.time})
            self._pending[entry.number] = entry
            if kind == SERVICE_STOPPED:
                self._services.append(entry)
            return entry.number

    def undone(self, number: int) -> None:
        """The change ``number`` has been undone (or turned out never to have happened)."""
        self.close([number], "undone", "")

    def keep(self, number: int, reason: str) -> None:
        """The change ``number`` stays as it is: nothing must undo it any more (a restore
        that was committed; a failure already reported to the person, who decides)."""
        self.close([number], "kept", reason)

    def close(self, numbers: list[int], how: Literal["undone", "kept"], reason: str) -> None:
        """Close several entries with one write: all of them or none, even in a crash
        (a restore commits all its renames at once)."""
        with self._lock:
            numbers = [number for number in numbers if number in self._pending]
            if not numbers:
                return  # closing twice is harmless: rollbacks may overlap
            self._write({"entries": numbers, "closed": how, "reason": reason})
            for number in numbers:
                del self._pending[number]
            if not self._pending:
                self._finish()
                self._services.clear()

    def pending(self) -> list[Entry]:
        """The entries not closed yet, oldest first."""
        with self._lock:
            return sorted(self._pending.values(), key=lambda entry: entry.number)

    def services(self) -> list[Entry]:
        """Every service stop recorded while the file exists, closed or not."""
        with self._lock:
            return list(self._services)

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{time.time_ns()}-{os.getpid()}{SUFFIX}"
        # Created under a dot-name, locked, given its header, then renamed: recovery never
        # sees a journal whose writer has not locked it yet.
        unfinished = self.directory / f".{name}"
        descriptor = os.open(unfinished, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        self._descriptor = descriptor
        self._write(
            {
                "journal": 1,
                "operation": self.operation,
                "pid": os.getpid(),
                "host": locations.hostname(),
                "started": time.time(),
                "argv": sys.argv,
            }
        )
        self._path = self.directory / name
        os.rename(unfinished, self._path)
        _sync_directory(self.directory)

    def _write(self, record: dict[str, Any]) -> None:
        assert self._descriptor is not None
        _append(self._descriptor, record)

    def _finish(self) -> None:
        assert self._descriptor is not None and self._path is not None
        # Unlinked while still locked: nobody can take a half-closed journal for a dead one.
        self._path.unlink(missing_ok=True)
        os.close(self._descriptor)
        self._descriptor = None
        self._path = None


def _append(descriptor: int, record: dict[str, Any]) -> None:
    os.write(descriptor, (json.dumps(record, separators=(",", ":")) + "\n").encode())
    os.fsync(descriptor)


def _sync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


_journals: dict[Path, Journal] = {}
_journals_lock = threading.Lock()


def active() -> Journal:
    """This process's journal for the current ``HOMESAFE_HOME``."""
    journal_directory = directory().absolute()
    with _journals_lock:
        journal = _journals.get(journal_directory)
        if journal is None:
            journal = _journals[journal_directory] = Journal(journal_directory)
        return journal


def make_directory(path: Path, purpose: str) -> int | None:
    """Make the directory ``path`` (0700) if it is missing, recorded in :func:`active`
    first so that recovery removes it once it is empty again; the entry (to close once
    the directory is removed or kept), or None when it existed already. ``purpose``
    says what it was made for, in recovery reports."""
    if path.is_dir():
        return None
    journal = active()
    entry = journal.record(DIRECTORY_CREATED, {"path": str(path), "purpose": purpose})
    try:
        path.mkdir(mode=0o700)
    except BaseException:
        journal.undone(entry)  # nothing was made
        raise
    return entry


@contextlib.contextmanager
def temporary_directory(parent: Path, prefix: str) -> Iterator[Path]:
    """A new private directory (0700) in ``parent``, journaled before it is made and
    removed, with everything in it, when the block ends (or by recovery)."""
    # os.urandom is what secrets.token_hex reads; the secrets module itself would load
    # OpenSSL (through hmac) into every operation for this one name.
    path = parent / f"{prefix}{os.urandom(6).hex()}"
    journal = active()
    entry = journal.record(TEMPORARY_DIRECTORY, {"path": str(path)})
    try:
        path.mkdir(mode=0o700)
    except BaseException:
        journal.undone(entry)
        raise
    try:
        yield path
    finally:
        try:
            remove_tree(path)
        except OSError as error:
            # Never hide what happened in the block; the entry stays for recovery.
            logger.warning("could not remove %s: %s", path, error)
        else:
            journal.undone(entry)


@contextlib.contextmanager
def scratch_directory(prefix: str) -> Iterator[Path]:
    """A private temporary directory under ``$HOMESAFE_HOME/tmp``, removed afterwards
    (journaled: if homesafe dies meanwhile, the next recovery removes it)."""
    base = locations.ensure_home() / "tmp"
    base.mkdir(exist_ok=True, mode=0o700)
    with temporary_directory(base, prefix) as directory:
        yield directory


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it, read-only directories included (an
    archive may hold some)."""
    if os.path.isdir(path) and not os.path.islink(path):
        for found, _, _ in os.walk(path):
            with contextlib.suppress(OSError):
                os.chmod(found, 0o700)
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def record_lockdown(app_id: str, flag: Path, leave: list[str] | None, timeout: float) -> int:
    """Record, in :func:`active`, the lockdown of an app about to be set."""
    return active().record(
        LOCKDOWN, {"app": app_id, "flag": str(flag), "leave": leave, "timeout": timeout}
    )


@contextlib.contextmanager
def command_to_undo(
    description: str,
    undo: list[str],
    *,
    if_exists: str | os.PathLike[str] | None = None,
    if_mounted: str | os.PathLike[str] | None = None,
) -> Iterator[int]:
    """Record, in :func:`active`, a change the body is about to make (a snapshot, a
    mount, a subvolume) and the argv that undoes it; yields the entry's number.

    Recorded before it is made, so that homesafe killed at any instant leaves it
    recorded. The guard makes that safe: recovery runs ``undo`` only if ``if_exists``
    exists or ``if_mounted`` is a mount point, so a change never made (or undone
    already, its closing unwritten) is not undone again. If the body raises and the
    guard says nothing was made, the entry is closed.
    """
    if (if_exists is None) == (if_mounted is None):
        raise ValueError("command_to_undo needs exactly one guard: if_exists or if_mounted")
    data: dict[str, Any] = {"description": description, "undo": undo}
    # What is there already is not homesafe's to undo.
    if if_exists is not None and os.path.lexists(if_exists):
        raise HomesafeError(f"{os.fspath(if_exists)} exists already: homesafe did not make it")
    if if_mounted is not None and is_mount_point(if_mounted):
        raise HomesafeError(f"something is mounted on {os.fspath(if_mounted)} already")
    if if_exists is not None:
        data["if_exists"] = os.fspath(if_exists)
    if if_mounted is not None:
        data["if_mounted"] = os.fspath(if_mounted)
    journal = active()
    entry = journal.record(COMMAND, data)
    try:
        yield entry
    except BaseException:
        if not _guard_holds(data):
            journal.undone(entry)
        raise


def subvolume_to_make(
    description: str, path: str | os.PathLike[str]
) -> contextlib.AbstractContextManager[int]:
    """:func:`command_to_undo` for a btrfs subvolume or snapshot about to be made at
    ``path`` (a resolved path): undone by deleting it."""
    from homesafe.consistency.snapshots import delete_subvolume_argv

    return command_to_undo(description, delete_subvolume_argv(path), if_exists=path)


def _guard_holds(data: dict[str, Any]) -> bool:
    """Whether the change a COMMAND entry's guard watches is there to undo (True for an
    entry without a guard)."""
    if data.get("if_exists"):
        return os.path.lexists(data["if_exists"])
    if data.get("if_mounted"):
        return is_mount_point(data["if_mounted"])
    return True


def is_mount_point(path: str | os.PathLike[str]) -> bool:
    """Whether something is mounted on ``path`` (as this process sees the mounts)."""
    from homesafe.consistency.snapshots import read_mounts

    resolved = os.path.realpath(path)
    return any(mount.mount_point == resolved for mount in read_mounts())


# -- undoing ----------------------------------------------------------------------------


class UndoError(HomesafeError):
    """A recorded change could not be undone; it stays in its journal."""


def _describe(entry: Entry) -> str:
    """What undoing ``entry`` does, in words."""
    data = entry.data
    app = f" (app {data['app']})" if data.get("app") else ""
    if entry.kind == LOCKDOWN:
        return f"lift the lockdown of {data['app']}"
    if entry.kind == SERVICE_STOPPED:
        return f"start {data['label']} again{app}"
    if entry.kind == TEMPORARY_DIRECTORY:
        return f"remove the leftover directory {data['path']}"
    if entry.kind == MOVED_ASIDE:
        return f"put the previous copy of {data['target']} back"
    if entry.kind == PLACED:
        return f"take the restored copy of {data['target']} out"
    if entry.kind == DIRECTORY_CREATED:
        return f"remove the directory {data['path']} made for {data.get('purpose', 'a restore')}"
    if entry.kind == SETTINGS_WRITTEN:
        return f"write back the previous settings{app}"
    if entry.kind == COMMAND:
        return str(data.get("description") or f"run {execute.describe(data['undo'])}")
    return f"undo a change of an unknown kind {entry.kind!r}"


def _undo_lockdown(entry: Entry, later: list[Entry]) -> str:
    leave = entry.data.get("leave")
    try:
        if leave:
            execute.run(leave, timeout=float(entry.data.get("timeout") or 60))
    finally:
        Path(entry.data["flag"]).unlink(missing_ok=True)
    ran = " (ran its lockdown.leave command)" if leave else ""
    return f"lifted the lockdown of {entry.data['app']}{ran}"


def _service_handler(entry: Entry) -> Any:
    from homesafe.consistency.services import handler_for
    from homesafe.manifest import SERVICE_TYPES

    service = entry.data["service"]
    return handler_for(SERVICE_TYPES[service["type"]](**service))


def _undo_service(entry: Entry, later: list[Entry]) -> str:
    handler = _service_handler(entry)
    if handler.is_running():
        return f"{handler.label} was running already"
    handler.start()
    return f"started {handler.label} again"


def _undo_temporary_directory(entry: Entry, later: list[Entry]) -> str:
    path = Path(entry.data["path"])
    for other in later:
        # A previous copy that could not be put back lives here: never delete it.
        if (
            other.kind == MOVED_ASIDE
            and _is_below(Path(other.data["previous"]), path)
            and os.path.lexists(other.data["previous"])
        ):
            raise UndoError(f"kept {path}: it holds the previous copy of {other.data['target']}")
    if not os.path.lexists(path):
        return f"{path} was gone already"
    remove_tree(path)
    return f"removed the leftover directory {path}"


def _undo_moved_aside(entry: Entry, later: list[Entry]) -> str:
    target, previous = entry.data["target"], entry.data["previous"]
    if not os.path.lexists(previous):
        return f"{target} had not been moved aside yet"
    if os.path.lexists(target):
        raise UndoError(
            f"cannot put the previous copy of {target} back: something is in its place "
            f"(the previous copy is kept at {previous})"
        )
    os.rename(previous, target)
    return f"put the previous copy of {target} back"


def _undo_placed(entry: Entry, later: list[Entry]) -> str:
    staged, target = entry.data["staged"], entry.data["target"]
    if os.path.lexists(staged) or not os.path.lexists(target):
        return f"the restored copy of {target} had not been put in place yet"
    Path(staged).parent.mkdir(parents=True, exist_ok=True)
    os.rename(target, staged)
    return f"took the restored copy of {target} out"


def _undo_directory_created(entry: Entry, later: list[Entry]) -> str:
    path = Path(entry.data["path"])
    if not path.is_dir():
        return f"{path} was gone already"
    try:
        path.rmdir()
    except OSError:
        return f"kept {path}: it is not empty"
    return f"removed the directory {path} made for {entry.data.get('purpose', 'a restore')}"


def _undo_settings(entry: Entry, later: list[Entry]) -> str:
    from homesafe import state

    previous: dict[str, Any] = entry.data["previous"]
    for key in set(entry.data["written"]) - set(previous):
        state.delete_setting(key)
    state.write_settings(previous)
    return f"wrote back the previous settings of {entry.data['app']}"


def _undo_command(entry: Entry, later: list[Entry]) -> str:
    # The guards (see command_to_undo): ``if_exists``, the path the undo removes;
    # ``if_mounted``, the mount point it unmounts. Nothing there (never made, or undone
    # just before homesafe died, its closing unwritten) needs nothing.
    if not _guard_holds(entry.data):
        guard = entry.data.get("if_exists") or entry.data.get("if_mounted")
        what = "gone already" if entry.data.get("if_exists") else "not mounted"
        return f"{guard} was {what}"
    execute.run(
        entry.data["undo"], timeout=float(entry.data.get("timeout") or UNDO_COMMAND_TIMEOUT)
    )
    return _describe(entry)


UNDO: dict[str, Callable[[Entry, list[Entry]], str]] = {
    LOCKDOWN: _undo_lockdown,
    SERVICE_STOPPED: _undo_service,
    TEMPORARY_DIRECTORY: _undo_temporary_directory,
    MOVED_ASIDE: _undo_moved_aside,
    PLACED: _undo_placed,
    DIRECTORY_CREATED: _undo_directory_created,
    SETTINGS_WRITTEN: _undo_settings,
    COMMAND: _undo_command,
}


def _is_below(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


# -- recovery ---------------------------------------------------------------------------

Status = Literal["done", "planned", "failed"]


@dataclass
class RecoveryAction:
    """One thing recovery did (``done``), would do (``planned``, dry run) or could not
    do (``failed``: the entry stays, for the next recovery)."""

    journal: str
    operation: str
    pid: int
    kind: str
    description: str
    status: Status
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecoveryReport:
    """What recovery found and did."""

    dry_run: bool = False
    actions: list[RecoveryAction] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # journals fully dealt with
    busy: list[str] = field(default_factory=list)  # journals of live operations, left alone

    @property
    def failed(self) -> list[RecoveryAction]:
        return [action for action in self.actions if action.status == "failed"]

    @property
    def changed_anything(self) -> bool:
        return any(action.status == "done" for action in self.actions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "actions": [action.to_dict() for action in self.actions],
            "recovered": self.recovered,
            "busy": self.busy,
            "failed": len(self.failed),
        }

    def lines(self) -> list[str]:
        """One readable line per action."""
        shown = []
        for action in self.actions:
            origin = f"{action.operation} (pid {action.pid})"
            if action.status == "failed":
                shown.append(f"could not {action.description} [{origin}]: {action.error}")
            elif action.status == "planned":
                shown.append(f"would {action.description} [{origin}]")
            else:
                shown.append(f"{action.description} [{origin}]")
        return shown


@dataclass
class _Found:
    """A journal file read back."""

    header: dict[str, Any]
    pending: list[Entry]
    services: list[Entry]  # every service stop it records, closed or not


def _read(descriptor: int) -> _Found:
    with os.fdopen(os.dup(descriptor), "rb") as file:
        file.seek(0)
        raw_lines = file.read().splitlines()
    header: dict[str, Any] = {}
    pending: dict[int, Entry] = {}
    services: list[Entry] = []
    for raw in raw_lines:
        try:
            record = json.loads(raw)
        except ValueError:
            continue  # a line torn by the crash: what it announced was never done
        if not isinstance(record, dict):
            continue
        if "journal" in record:
            header = record
        elif "closed" in record:
            for number in record.get("entries", [record.get("entry")]):
                pending.pop(int(number), None)
        elif "kind" in record:
            number = int(record["entry"])
            entry = Entry(
                number, str(record["kind"]), dict(record.get("data") or {}), record["time"]
            )
            pending[number] = entry
            if entry.kind == SERVICE_STOPPED:
                services.append(entry)
    return _Found(header, sorted(pending.values(), key=lambda entry: entry.number), services)


def _undo_all(
    pending: list[Entry],
    services: list[Entry],
    close: Callable[[Entry], None],
    report: RecoveryReport,
    origin: tuple[str, str, int],
) -> bool:
    """Undo ``pending`` newest first; ``close`` is called for each undone entry.

    An app whose files are to be put back never has them swapped under it: its services
    (``services``: every stop the journal records) that run are stopped first, and
    afterwards every one of them runs again — also those the operation had started
    already, or stopped again for a rollback of its own. True when every pending entry
    was undone.
    """
    name, operation, pid = origin
    remaining = list(pending)
    everything = True

    def act(kind: str, description: str, status: Status, error: str | None = None) -> None:
        report.actions.append(
            RecoveryAction(name, operation, pid, kind, description, status, error)
        )

    apps_with_files = {entry.data.get("app") for entry in pending if entry.kind in FILE_KINDS}
    pending_numbers = {entry.number for entry in pending}
    quieted = [entry for entry in services if entry.data.get("app") in apps_with_files]
    for entry in reversed(quieted):
        try:
            handler = _service_handler(entry)
            if handler.is_running():
                handler.stop()
                act(entry.kind, f"stopped {handler.label} to put its files back", "done")
        except Exception as error:  # reported; the files are put back all the same
            act(entry.kind, f"stop {entry.data.get('label')}", "failed", _first_line(error))
    for entry in reversed(pending):
        undo = UNDO.get(entry.kind)
        try:
            if undo is None:
                raise UndoError(f"this homesafe does not know how to undo {entry.kind!r}")
            description = undo(entry, remaining)
        except Exception as error:
            everything = False
            act(entry.kind, _describe(entry), "failed", _first_line(error))
            continue
        remaining.remove(entry)
        close(entry)
        act(entry.kind, description, "done")
    for entry in quieted:
        if entry.number in pending_numbers:
            continue  # started by its own undo above
        try:
            handler = _service_handler(entry)
            if not handler.is_running():
                handler.start()
                act(entry.kind, f"started {handler.label} again", "done")
        except Exception as error:  # no entry is left for it: reported, not retried
            act(entry.kind, f"start {entry.data.get('label')} again", "failed", _first_line(error))
    return everything


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def recover(*, dry_run: bool = False, discard: bool = False) -> RecoveryReport:
    """Undo what operations that died left behind, and report it.

    Every journal not locked by a live process is undone newest entry first; a change
    that cannot be undone is reported as failed and stays for the next recovery (with
    ``discard``, it is reported and dropped: for when the person has put it back by
    hand). Lockdown flags set by processes that are gone are cleared too. With
    ``dry_run`` nothing is changed: the report says what would be done.
    """
    report = RecoveryReport(dry_run=dry_run)
    journal_directory = directory()
    if journal_directory.is_dir():
        for path in sorted(journal_directory.iterdir()):
            if path.name.startswith("."):
                if not dry_run:
                    _remove_unfinished(path)
            elif path.name.endswith(SUFFIX):
                _recover_file(path, report, dry_run=dry_run, discard=discard)
    _clear_orphaned_flags(report, dry_run)
    return report


def _recover_file(path: Path, report: RecoveryReport, *, dry_run: bool, discard: bool) -> None:
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_APPEND)
    except FileNotFoundError:
        return  # its writer finished meanwhile
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report.busy.append(path.name)  # a live operation's (possibly this process's)
            return
        if not path.exists():
            return  # finished and unlinked between our open and our lock
        found = _read(descriptor)
        origin = (
            path.name,
            str(found.header.get("operation", "operation")),
            int(found.header.get("pid", 0)),
        )
        if dry_run:
            for entry in reversed(found.pending):
                report.actions.append(
                    RecoveryAction(*origin, entry.kind, _describe(entry), "planned")
                )
            return

        def close(entry: Entry) -> None:
            _append(descriptor, {"entry": entry.number, "closed": "undone", "reason": "recovered"})

        everything = _undo_all(found.pending, found.services, close, report, origin)
        if not everything and discard:
            for entry in found.pending:
                _append(
                    descriptor,
                    {"entry": entry.number, "closed": "kept", "reason": "discarded by recover"},
                )
            everything = True
        if everything:
            path.unlink()
            report.recovered.append(path.name)
    finally:
        os.close(descriptor)


def _remove_unfinished(path: Path) -> None:
    """A journal whose writer died while creating it holds no change: remove it."""
    try:
        if time.time() - path.stat().st_mtime < UNFINISHED_JOURNAL_SECONDS:
            return
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except BlockingIOError:
        pass
    finally:
        os.close(descriptor)


def _clear_orphaned_flags(report: RecoveryReport, dry_run: bool) -> None:
    """Lockdown flags whose setter is gone and no journal accounts for (a homesafe older
    than the journal, or a flag set by hand with a pid)."""
    flags = locations.lockdown_directory()
    if not flags.is_dir():
        return
    for flag in sorted(flags.iterdir()):
        try:
            record = json.loads(flag.read_text())
            pid = int(record.get("pid", 0))
            since = float(record["since"]) if record.get("since") is not None else None
        except (OSError, ValueError, AttributeError, TypeError):
            continue
        if pid <= 0 or pid == os.getpid() or processes.alive(pid, recorded_at=since):
            continue
        description = f"lift the lockdown of {flag.name} (its process {pid} is gone)"
        if dry_run:
            report.actions.append(
                RecoveryAction("", "lockdown", pid, LOCKDOWN, description, "planned")
            )
            continue
        flag.unlink(missing_ok=True)
        report.actions.append(
            RecoveryAction(
                "", "lockdown", pid, LOCKDOWN, f"lifted the lockdown of {flag.name}", "done"
            )
        )


def undo_own() -> RecoveryReport:
    """Undo what this process's journal still holds: for after an interruption, once
    every ``finally`` has run. What cannot be undone stays for the next recovery."""
    report = RecoveryReport()
    journal = active()
    pending = journal.pending()
    if pending:
        origin = (
            journal.path.name if journal.path else "",
            journal.operation,
            os.getpid(),
        )
        _undo_all(
            pending, journal.services(), lambda entry: journal.undone(entry.number), report, origin
        )
    return report


# -- one operation at a time --------------------------------------------------------------

_operation_lock = threading.RLock()
_operation_depth = 0


def _log_recovery(report: RecoveryReport) -> None:
    for line in report.lines():
        logger.warning("recovered what an interrupted operation left: %s", line)


@contextlib.contextmanager
def operation(
    name: str,
    *,
    wait: float | None = None,
    on_wait: Callable[[int | None], None] | None = None,
    on_recovered: Callable[[RecoveryReport], None] = _log_recovery,
    recover_first: bool = True,
) -> Iterator[RecoveryReport]:
    """Hold the host's operation lock for the block, recovering first (unless not
    ``recover_first``) what dead operations left; the report goes to ``on_recovered``
    (default: logged as warnings) and is yielded.

    Re-entrant in the thread that holds it (the inner block recovers nothing). Another
    thread or process waits up to ``wait`` seconds (default 60), calling ``on_wait``
    once with the holder's pid when it has to wait, then raises
    :class:`~homesafe.errors.OperationLockedError`.
    """
    global _operation_depth
    wait = DEFAULT_WAIT_SECONDS if wait is None else wait
    deadline = time.monotonic() + wait
    if not _operation_lock.acquire(timeout=max(wait, 0.0)):
        raise _locked_error(name, wait, None)
    try:
        if _operation_depth > 0:
            _operation_depth += 1
            try:
                yield RecoveryReport()
            finally:
                _operation_depth -= 1
            return
        with contextlib.ExitStack() as held:
            told = False
            while not held.enter_context(locks.exclusive(OPERATION_LOCK)):
                held.close()
                holder = locks.holder(OPERATION_LOCK)
                if time.monotonic() >= deadline:
                    raise _locked_error(name, wait, holder)
                if on_wait is not None and not told:
                    on_wait(holder)
                    told = True
                time.sleep(LOCK_POLL_SECONDS)
            journal = active()
            previous_name, journal.operation = journal.operation, name
            _operation_depth = 1
            try:
                report = recover() if recover_first else RecoveryReport()
                if report.actions:
                    on_recovered(report)
                yield report
            finally:
                _operation_depth = 0
                journal.operation = previous_name
    finally:
        _operation_lock.release()


def _locked_error(name: str, wait: float, holder: int | None) -> OperationLockedError:
    who = "another homesafe operation"
    if holder:
        who += f" (pid {holder}{_command_of(holder)})"
    return OperationLockedError(
        f"cannot start the {name}: {who} is running, and it did not finish within {wait:g} s",
        hint="Wait for it to finish, or give a longer --wait.",
    )


def _command_of(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    shown = " ".join(part.decode(errors="replace") for part in argv if part)
    return f": {shown}" if shown else ""


Parameters = ParamSpec("Parameters")
Returned = TypeVar("Returned")


def guarded(
    name: str,
) -> Callable[[Callable[Parameters, Returned]], Callable[Parameters, Returned]]:
    """Decorate an API operation so that it runs inside :func:`operation`."""

    def decorate(function: Callable[Parameters, Returned]) -> Callable[Parameters, Returned]:
        @functools.wraps(function)
        def run(*arguments: Parameters.args, **keywords: Parameters.kwargs) -> Returned:
            with operation(name):
                return function(*arguments, **keywords)

        return run

    return decorate
