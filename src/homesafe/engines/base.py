"""The Protocol every backup engine implements, and the records it returns.

An engine turns homesafe's requests into its own commands: one argv, one
:func:`homesafe.execute.run` call per operation. Paths handed to ``create`` are
absolute paths on the live system (or relative ones under ``working_directory``);
inside archives they are stored without the leading ``/``, and ``extract`` writes them
below ``target_root``.

Besides archives, an engine looks after its repositories: facts for ``repo show``,
``check`` (optionally reading back all or a sample of the data), ``prune`` by a
retention policy with the space given back, keys and passphrase changes. A repository
locked by a live process is waited for up to ``Repository.lock_wait`` seconds, then
:class:`~homesafe.errors.RepositoryLockedError`; a lock left by a dead process is
cleared when the engine can tell it is dead (a process of the host that took it). A
lock it cannot tell about (another host's) stays until the user breaks it
(:meth:`Engine.break_lock`), and the error says so.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from homesafe.repositories import Repository


@dataclass
class Progress:
    """One progress report: bytes or items done (None: not known yet), out of a total
    when one is known."""

    operation: str
    current: float | None = 0
    total: float | None = None
    message: str = ""
    finished: bool = False


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class ReadView:
    """Where ``create`` reads the paths it archives from, when not from the live system.

    ``wrapper`` is an argv prefix that runs the engine with captured copies (snapshots,
    clones, staged copies) mounted at their original paths, so that the archive and
    the engine's cache of unchanged files see the original paths
    (:func:`homesafe.consistency.view.wrapper_argv`). The engine keeps its own rule for
    telling unchanged files (borg: change time, size and inode): a snapshot keeps
    them, so unchanged files are not read again; a clone or staged copy is new each
    time, so its files are read again (and deduplicated), which is slower but never
    takes a file changed behind its modification time for unchanged.
    ``excludes`` are absolute paths in the view that are not part of any app (the
    directory holding snapshots, when it is inside an app's path).
    """

    wrapper: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()


@dataclass
class ArchiveStats:
    """Sizes of one archive as the engine reports them."""

    name: str
    original_size: int = 0
    compressed_size: int = 0
    deduplicated_size: int = 0
    file_count: int = 0
    duration: float = 0.0
    warnings: list[str] = field(default_factory=list)
    # The engine's own id of the archive when it names archives by id as well (restic:
    # the snapshot id), else empty; what an archive record addresses the archive by.
    archive_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "original_size": self.original_size,
            "compressed_size": self.compressed_size,
            "deduplicated_size": self.deduplicated_size,
            "file_count": self.file_count,
            "duration_seconds": round(self.duration, 3),
            "warnings": self.warnings,
        }


@dataclass
class ArchiveSummary:
    """An archive as listings show it: name, id, time and the comment."""

    name: str
    id: str
    time: str
    comment: str = ""


@dataclass
class ArchiveEntry:
    """One file, directory or link inside an archive."""

    path: str
    type: str
    mode: str
    size: int
    user: str = ""
    group: str = ""
    link_target: str = ""
    # Modification and change times as the engine prints them (ISO 8601, borg: local
    # time to the microsecond), when a listing was asked for them; empty otherwise.
    mtime: str = ""
    ctime: str = ""


@dataclass
class RepositoryInfo:
    """What ``homesafe repo show`` tells about a repository.

    ``stored_size`` is what the repository takes in storage (after deduplication and
    compression), ``original_size`` the sum of the archives' sizes before that;
    ``last_archive_time`` is as the engine reports it, empty when there is no archive.
    """

    archive_count: int
    last_archive_time: str
    stored_size: int
    original_size: int
    encryption: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "archive_count": self.archive_count,
            "last_archive_time": self.last_archive_time,
            "stored_size": self.stored_size,
            "original_size": self.original_size,
            "encryption": self.encryption,
        }


@dataclass
class CheckReport:
    """The outcome of a repository check: ``problems`` in the engine's words, and the
    archives they affect (when the engine can tell)."""

    ok: bool
    verified_data: str  # "none", "all" or "<percent>%"
    problems: list[str] = field(default_factory=list)
    affected_archives: list[str] = field(default_factory=list)
    duration: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "verified_data": self.verified_data,
            "problems": self.problems,
            "affected_archives": self.affected_archives,
            "duration_seconds": round(self.duration, 3),
        }


@dataclass(frozen=True)
class RetentionPolicy:
    """How many daily, weekly and monthly archives to keep (0: that rule keeps none).

    Each engine applies its own rules, which differ in one point: borg counts an archive
    kept by one rule for that rule only, restic for every rule it satisfies.
    """

    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    def __post_init__(self) -> None:
        if min(self.keep_daily, self.keep_weekly, self.keep_monthly) < 0:
            raise ValueError("keep counts cannot be negative")

    @property
    def keeps_anything(self) -> bool:
        return self.keep_daily + self.keep_weekly + self.keep_monthly > 0


@dataclass
class PruneReport:
    """Which archives a prune kept and removed (or would, with ``dry_run``)."""

    kept: list[str]
    removed: list[str]
    dry_run: bool
    reclaimed_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": self.kept,
            "removed": self.removed,
            "dry_run": self.dry_run,
            "reclaimed_bytes": self.reclaimed_bytes,
        }


class Engine(Protocol):
    """What homesafe asks of a backup engine."""

    name: str

    @property
    def extract_concurrency(self) -> int:
        """How many ``extract`` calls of one archive pay to run side by side: more than
        one for an engine that extracts on one core."""
        ...

    def repository_exists(self, repository: Repository) -> bool: ...

    def initialize(self, repository: Repository) -> None:
        """Create the repository, and :meth:`attach` it."""
        ...

    def attach(self, repository: Repository) -> None:
        """Make ready a repository this host is to use, found at its location (at
        ``homesafe repo add``). Whatever it does is only for speed: a failure is logged,
        never raised."""
        ...

    def create(
        self,
        repository: Repository,
        archive_name: str,
        paths: Sequence[str],
        *,
        working_directory: Path,
        comment: str,
        on_progress: ProgressCallback | None = None,
        timestamp: datetime.datetime | None = None,
        view: ReadView | None = None,
    ) -> ArchiveStats:
        """Write one archive; ``timestamp`` (default: now) is the time it is filed under;
        ``view``: read the paths through a capture view instead of the live system."""
        ...

    def list_archives(self, repository: Repository) -> list[ArchiveSummary]: ...

    def list_contents(
        self,
        repository: Repository,
        archive_name: str,
        paths: Sequence[str] = (),
        *,
        times: bool = False,
    ) -> list[ArchiveEntry]:
        """The archive's entries below ``paths`` (all when empty); with ``times``, with
        their ``mtime`` and ``ctime`` where the engine gives them (borg does)."""
        ...

    def extract(
        self,
        repository: Repository,
        archive_name: str,
        paths: Sequence[str],
        target_root: Path,
        *,
        on_progress: ProgressCallback | None = None,
        excludes: Sequence[str] = (),
    ) -> list[str]:
        """Extract ``paths`` and what lies below them into ``target_root``, but for
        ``excludes`` and what lies below them (archive paths, without the leading
        ``/``); returns the warnings."""
        ...

    def delete(self, repository: Repository, archive_names: Sequence[str]) -> None: ...

    def export_tar(
        self, repository: Repository, archive_name: str, file: Path, paths: Sequence[str] = ()
    ) -> None: ...

    def export_key(self, repository: Repository) -> str: ...

    def repository_info(self, repository: Repository) -> RepositoryInfo: ...

    def check(
        self,
        repository: Repository,
        *,
        verify_data: bool = False,
        sample_percent: float | None = None,
    ) -> CheckReport:
        """Check the repository's structure and archives; with ``verify_data`` read back
        every piece of data, with ``sample_percent`` that share of it."""
        ...

    def prune(
        self, repository: Repository, policy: RetentionPolicy, *, dry_run: bool = False
    ) -> PruneReport:
        """Delete the archives ``policy`` does not keep and give their space back."""
        ...

    def import_key(self, repository: Repository, file: Path) -> None: ...

    def change_passphrase(self, repository: Repository, new_passphrase: str) -> None:
        """Re-encrypt the repository key with ``new_passphrase``; the repository's
        passphrase source still gives the old one during the call."""
        ...

    def destroy(self, repository: Repository) -> None:
        """Delete the repository and every archive in it, for good."""
        ...

    def break_lock(self, repository: Repository) -> None:
        """Remove every lock of the repository, whoever holds it: the user's decision
        (``homesafe repo break-lock``) for a lock whose holder the engine cannot prove
        gone, such as one of another host."""
        ...
