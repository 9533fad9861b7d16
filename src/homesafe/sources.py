"""Where a restore reads archived files from: a repository archive, or a tar file.

Both kinds answer the same three questions: what does the archive say about itself
(:meth:`describe`), what does it hold (:meth:`listing`), and extract these paths below
that directory (:meth:`extract`). Paths in listings are archive paths: absolute paths
without the leading ``/``.

A tar file comes from outside (a downloaded backup, say), so :class:`TarSource` trusts
nothing in it: every member is checked before anything is written, and one bad member
refuses the whole file (see :func:`check_members`).
"""

from __future__ import annotations

import dataclasses
import posixpath
import stat
import tarfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from homesafe import archives, execute, journal
from homesafe.engines import engine_for
from homesafe.engines.base import ArchiveEntry, ProgressCallback
from homesafe.errors import HomesafeError, RepositoryLockedError
from homesafe.manifest import Manifest, is_inside
from homesafe.repositories import Repository


class UnsafeArchiveError(HomesafeError):
    """A tar file holds something that must never be extracted."""


class NotAnArchiveError(HomesafeError):
    """The archive was written neither by homesafe nor by the reference distribution."""


class ArchiveSource(Protocol):
    label: str
    # Read over a network: each engine call opens a connection and starts the engine's
    # server there (see homesafe.restore.stage).
    remote: bool

    @property
    def extract_concurrency(self) -> int:
        """How many extractions of this archive pay to run side by side (see
        :func:`homesafe.restore.plan_extractions`)."""
        ...

    def describe(self, known: Sequence[Manifest] = ()) -> archives.ArchiveDescription:
        """What the archive says about itself; ``known`` as for
        :func:`archives.describe_extracted`."""
        ...

    def listing(self) -> list[ArchiveEntry]: ...

    def extract(
        self,
        paths: Sequence[str],
        into: Path,
        on_progress: ProgressCallback | None = None,
        excludes: Sequence[str] = (),
    ) -> list[str]:
        """Extract ``paths`` (archive paths) and what lies below them into ``into``,
        but for ``excludes`` and what lies below them; returns the warnings."""
        ...

    def hasty(self) -> ArchiveSource:
        """This source, for calls made side by side: they wait SIDE_BY_SIDE_LOCK_WAIT
        seconds at most for a lock, and the caller makes one that did not get it again
        with this source."""
        ...


def _description_or_error(
    directory: Path, label: str, known: Sequence[Manifest]
) -> archives.ArchiveDescription:
    description = archives.describe_extracted(directory, label, known)
    if description is None:
        raise NotAnArchiveError(
            f"{label} was written neither by homesafe nor by the reference distribution: "
            f"it has no {archives.METADATA_FILE} and no {archives.REFERENCE_MANIFESTS}/"
        )
    return description


# How long each of two engine calls made side by side waits for the repository lock
# before it gives up, to be made again alone (see EngineSource.describe_and_list).
SIDE_BY_SIDE_LOCK_WAIT = 1.0


class EngineSource:
    """An archive in a repository, read through its engine."""

    def __init__(self, repository: Repository, archive_name: str) -> None:
        self.repository = repository
        self.archive_name = archive_name
        self.engine = engine_for(repository.engine)
        self.label = f"archive {archive_name!r}"
        self.remote = repository.is_remote

    @property
    def extract_concurrency(self) -> int:
        return self.engine.extract_concurrency

    def describe(self, known: Sequence[Manifest] = ()) -> archives.ArchiveDescription:
        with journal.scratch_directory("describe-") as directory:
            self.engine.extract(
                self.repository, self.archive_name, archives.DESCRIPTION_MEMBERS, directory
            )
            description = _description_or_error(directory, self.label, known)
            settings_files = archives.reference_settings_members(description)
            if settings_files:
                self.engine.extract(self.repository, self.archive_name, settings_files, directory)
                archives.load_reference_settings(description, directory)
            return description

    def listing(self, paths: Sequence[str] = (), *, times: bool = False) -> list[ArchiveEntry]:
        """The archive's entries (those below ``paths`` when given); with ``times``, with
        their times (see :meth:`homesafe.engines.base.Engine.list_contents`)."""
        return self.engine.list_contents(self.repository, self.archive_name, paths, times=times)

    def by_id(self, archive_id: str) -> EngineSource:
        """This archive addressed by the engine's id of it (restic: a snapshot id) rather
        than by its name; the label keeps the name."""
        return self._variant(self.repository, archive_id)

    def hasty(self) -> EngineSource:
        """This archive, read by engine calls that wait SIDE_BY_SIDE_LOCK_WAIT seconds at
        most for the repository lock (for calls made side by side; see
        :meth:`describe_and_list`)."""
        repository = dataclasses.replace(self.repository, lock_wait=SIDE_BY_SIDE_LOCK_WAIT)
        return self._variant(repository, self.archive_name)

    def _variant(self, repository: Repository, archive_name: str) -> EngineSource:
        """This source with another repository record or archive address, the same label
        and the same engine object: what a listing learns (restic: the snapshot's id)
        serves the extraction of the files later."""
        variant = EngineSource(repository, archive_name)
        variant.label = self.label
        variant.engine = self.engine
        return variant

    def describe_and_list(
        self, known: Sequence[Manifest] = ()
    ) -> tuple[archives.ArchiveDescription, list[ArchiveEntry]]:
        """:meth:`describe` and :meth:`listing`, read by two engine calls side by side.

        Two borg processes opening a repository at the same instant contend for the
        mutex of its lock roster, and the loser sleeps a tenth of its lock wait before
        trying again: 6 s with the default 60 s, far more than the calls take. So both
        calls wait SIDE_BY_SIDE_LOCK_WAIT seconds at most (a 0.1 s poll); one that still
        finds the repository locked (a writer holds it) is made again afterwards, alone,
        with the repository's own lock wait, so no caller ever waits less than it did.
        """
        hasty = self.hasty()
        listing: list[ArchiveEntry] | None = None
        listing_error: BaseException | None = None

        def read_listing() -> None:
            nonlocal listing, listing_error
            try:
                listing = hasty.listing()
            except RepositoryLockedError:
                pass  # made again below, with the full lock wait
            except BaseException as error:  # re-raised in the caller's thread
                listing_error = error

        reader = threading.Thread(target=read_listing, name="archive-listing", daemon=True)
        reader.start()
        try:
            description = hasty.describe(known)
        except RepositoryLockedError:
            description = None
        finally:
            # Never leave the listing's engine call behind, whatever the description did.
            reader.join()
        if listing_error is not None:
            raise listing_error
        if description is None:
            description = self.describe(known)
        if listing is None:
            listing = self.listing()
        return description, listing

    def extract(
        self,
        paths: Sequence[str],
        into: Path,
        on_progress: ProgressCallback | None = None,
        excludes: Sequence[str] = (),
    ) -> list[str]:
        return self.engine.extract(
            self.repository,
            self.archive_name,
            list(paths),
            into,
            on_progress=on_progress,
            excludes=excludes,
        )


# -- tar files --------------------------------------------------------------------

TAR_TYPES = {
    tarfile.REGTYPE: "-",
    tarfile.AREGTYPE: "-",
    tarfile.DIRTYPE: "d",
    tarfile.SYMTYPE: "l",
    tarfile.LNKTYPE: "h",
}


def archive_name(name: str) -> str:
    """A tar name as an archive path: leading ``./`` and trailing ``/`` removed."""
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def member_path(member: tarfile.TarInfo) -> str:
    return archive_name(member.name)


def check_members(members: Sequence[tarfile.TarInfo], allowed: Callable[[str], bool]) -> list[str]:
    """Every reason to refuse these members; an empty list means all are safe.

    Refused: absolute names, ``..`` anywhere, device files and FIFOs, symbolic links
    whose target leaves the tree (absolute, or climbing above the root), hard links to
    names that are themselves refused, and names ``allowed`` rejects (a path that
    belongs to no app of the restore).
    """
    problems = []
    for member in members:
        name = member_path(member)
        parts = name.split("/")
        if member.name.startswith("/"):
            problems.append(f"{member.name}: absolute path")
            continue
        if ".." in parts:
            problems.append(f"{member.name}: contains '..'")
            continue
        if member.isdev() or member.isfifo():
            problems.append(f"{member.name}: device file or FIFO")
            continue
        if member.type not in TAR_TYPES:
            problems.append(f"{member.name}: unsupported member type {member.type!r}")
            continue
        if member.issym():
            target = member.linkname
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                problems.append(f"{member.name}: link to {target!r} points outside the archive")
                continue
        if member.islnk():
            link = (
                member.linkname.lstrip("./")
                if member.linkname.startswith("./")
                else member.linkname
            )
            link_parts = link.split("/")
            if link.startswith("/") or ".." in link_parts or not allowed(link):
                problems.append(f"{member.name}: hard link to {member.linkname!r} is not allowed")
                continue
        if not allowed(name):
            problems.append(f"{member.name}: belongs to no app being restored")
    return problems


class TarSource:
    """An exported archive in a tar file (.tar, .tar.gz, .tar.bz2, .tar.xz, .tar.zst).

    ``.tar.zst`` is decompressed with the ``zstd`` program into homesafe's scratch space
    first (Python's tarfile does not read zstd).
    """

    def __init__(self, file: Path, scratch: Path) -> None:
        self.file = file
        self.label = f"tar file {file}"
        self.extract_concurrency = 1  # one pass through the tar file
        self.remote = False
        if not file.is_file():
            raise HomesafeError(f"{file} does not exist or is not a file")
        self.tar_path = file
        if file.name.endswith((".zst", ".zstd")):
            self.tar_path = scratch / "import.tar"
            execute.run(["zstd", "-d", "-q", "-c", "--", str(file)], stdout_path=self.tar_path)
        try:
            with tarfile.open(self.tar_path) as tar:
                self.members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as error:
            raise HomesafeError(f"{file} is not a readable tar file: {error}") from None
        self.by_path = {member_path(member): member for member in self.members}

    def describe(self, known: Sequence[Manifest] = ()) -> archives.ArchiveDescription:
        roots = (*archives.DESCRIPTION_MEMBERS, archives.REFERENCE_DATA)
        wanted = [
            member
            for member in self.members
            if member.isfile()
            and any(is_inside(member_path(member), root) for root in roots)
            and not (
                is_inside(member_path(member), archives.REFERENCE_DATA)
                and not member_path(member).endswith("-settings.json")
            )
        ]
        problems = check_members(wanted, lambda path: True)
        if problems:
            raise UnsafeArchiveError(f"{self.label} is unsafe: {'; '.join(problems)}")
        with (
            journal.scratch_directory("describe-") as directory,
            tarfile.open(self.tar_path) as tar,
        ):
            for member in wanted:
                source = tar.extractfile(member)
                if source is None:
                    continue
                target = directory / member_path(member)
                target.parent.mkdir(parents=True, exist_ok=True)
                with source, open(target, "wb") as output:
                    output.write(source.read())
            description = _description_or_error(directory, self.label, known)
            archives.load_reference_settings(description, directory)
            return description

    def listing(self) -> list[ArchiveEntry]:
        return [
            ArchiveEntry(
                path=member_path(member),
                type=TAR_TYPES.get(member.type, "?"),
                mode=stat.filemode(member.mode),
                size=member.size if member.isfile() else 0,
                user=member.uname,
                group=member.gname,
                link_target=member.linkname,
            )
            for member in self.members
            if member_path(member)
        ]

    def hasty(self) -> TarSource:
        return self  # a tar file has no lock to wait for

    def check(self, allowed: Callable[[str], bool]) -> None:
        """Refuse the whole file if any member is unsafe; nothing has been written yet."""
        problems = check_members(self.members, allowed)
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise UnsafeArchiveError(
                f"{self.label} holds {len(problems)} unsafe member(s); nothing was "
                f"written:\n  {shown}{more}"
            )

    def extract(
        self,
        paths: Sequence[str],
        into: Path,
        on_progress: ProgressCallback | None = None,
        excludes: Sequence[str] = (),
    ) -> list[str]:
        def wanted(name: str) -> bool:
            return any(is_inside(name, path) for path in paths) and not any(
                is_inside(name, path) for path in excludes
            )

        selected = [member for member in self.members if wanted(member_path(member))]
        with tarfile.open(self.tar_path) as tar:
            # Every member was checked by check(): extract as the archive says, owners
            # and modes included, as a restore must.
            tar.extractall(into, members=selected, filter="fully_trusted")  # noqa: S202
        return []
