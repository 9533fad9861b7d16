"""The Protocol every backup engine implements, and the records it returns.

An engine turns homesafe's requests into its own commands: one argv, one
:func:`homesafe.execute.run` call per operation. Paths handed to ``create`` are
absolute paths on the live system (or relative ones under ``working_directory``);
inside archives they are stored without the leading ``/``, and ``extract`` writes them
below ``target_root``.
"""

from __future__ import annotations

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


class Engine(Protocol):
    """What homesafe asks of a backup engine."""

    name: str

    def repository_exists(self, repository: Repository) -> bool: ...

    def initialize(self, repository: Repository) -> None: ...

    def create(
        self,
        repository: Repository,
        archive_name: str,
        paths: Sequence[str],
        *,
        working_directory: Path,
        comment: str,
        on_progress: ProgressCallback | None = None,
    ) -> ArchiveStats: ...

    def list_archives(self, repository: Repository) -> list[ArchiveSummary]: ...

    def list_contents(
        self, repository: Repository, archive_name: str, paths: Sequence[str] = ()
    ) -> list[ArchiveEntry]: ...

    def extract(
        self,
        repository: Repository,
        archive_name: str,
        paths: Sequence[str],
        target_root: Path,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> list[str]: ...

    def delete(self, repository: Repository, archive_names: Sequence[str]) -> None: ...

    def export_tar(
        self, repository: Repository, archive_name: str, file: Path, paths: Sequence[str] = ()
    ) -> None: ...

    def export_key(self, repository: Repository) -> str: ...
