"""The borg engine: argv builders and one :func:`homesafe.execute.run` call each.

Works with borg 1.2 (Debian bookworm) and 1.4; what differs between versions is in
:data:`FEATURES` and nowhere else. The passphrase reaches borg through
``BORG_PASSPHRASE_FD`` (a pipe), never argv or the environment. ``BORG_BASE_DIR`` is
``$HOMESAFE_HOME/borg`` so that borg's cache and security records live with homesafe's
state. Errors are classified by the ``msgid`` borg logs with ``--log-json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from homesafe import execute, locations
from homesafe.engines.base import (
    ArchiveEntry,
    ArchiveStats,
    ArchiveSummary,
    Progress,
    ProgressCallback,
)
from homesafe.errors import (
    ArchiveExistsError,
    ArchiveNotFoundError,
    CommandError,
    EngineError,
    PassphraseError,
    RepositoryExistsError,
    RepositoryLockedError,
    RepositoryNotFoundError,
)
from homesafe.repositories import Repository

BORG = "borg"
BORG_WARNING = 1

# The first version that has each feature homesafe can use.
FEATURES: dict[str, tuple[int, int, int]] = {
    # `borg compact` exists, and `delete` frees no space without it.
    "compact": (1, 2, 0),
    # `--comment` expands {placeholders}, so literal braces must be doubled.
    "comment_placeholders": (1, 2, 0),
    # `create` accepts `/./` in a path to cut the stored path there.
    "slashdot_paths": (1, 4, 0),
}

# borg's msgid -> the homesafe error it means.
ERRORS_BY_MESSAGE_ID: dict[str, type[EngineError]] = {
    "Repository.DoesNotExist": RepositoryNotFoundError,
    "Repository.InvalidRepository": RepositoryNotFoundError,
    "Repository.AlreadyExists": RepositoryExistsError,
    "PassphraseWrong": PassphraseError,
    "PasscommandFailure": PassphraseError,
    "PasswordRetriesExceeded": PassphraseError,
    "Archive.DoesNotExist": ArchiveNotFoundError,
    "Archive.AlreadyExists": ArchiveExistsError,
    "LockTimeout": RepositoryLockedError,
    "LockFailed": RepositoryLockedError,
    "LockError": RepositoryLockedError,
}

HINTS: dict[type[EngineError], str] = {
    RepositoryNotFoundError: "Check the repository location; `homesafe backup` creates the "
    "default repository on first use.",
    PassphraseError: "Check the passphrase file under $HOMESAFE_HOME/secrets/.",
    ArchiveNotFoundError: "`homesafe archives list` shows the archives there are.",
    RepositoryLockedError: "Another homesafe or borg process is using the repository; wait "
    "for it to finish.",
}


def version() -> tuple[int, int, int]:
    """The installed borg's version, cached per binary (a borg call costs ~0.3 s)."""
    binary = shutil.which(BORG)
    if binary is None:
        raise EngineError(
            "borg is not installed.",
            hint="Install it with `apt-get install borgbackup` (or run `make demo`).",
        )
    real = os.path.realpath(binary)
    stamp = f"{real}:{os.stat(real).st_mtime_ns}"
    cache = locations.home() / "borg-version.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("binary") == stamp:
            major, minor, patch = cached["version"]
            return (int(major), int(minor), int(patch))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    output = execute.run([BORG, "--version"], timeout=60).stdout
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", output)
    if not match:
        raise EngineError(f"cannot tell the version of borg from {output!r}")
    found = (int(match[1]), int(match[2]), int(match[3]))
    if found < (1, 2, 0) or found >= (2, 0, 0):
        raise EngineError(f"borg {'.'.join(map(str, found))} is not supported; use 1.2 or 1.4")
    try:
        locations.ensure_home()
        cache.write_text(json.dumps({"binary": stamp, "version": found}))
    except OSError:
        pass
    return found


def has_feature(feature: str) -> bool:
    return version() >= FEATURES[feature]


def archive_argument(repository: Repository, archive_name: str) -> str:
    return f"{repository.location}::{archive_name}"


def escape_comment(comment: str) -> str:
    """Double the braces of a comment for the borg versions that expand placeholders."""
    if has_feature("comment_placeholders"):
        return comment.replace("{", "{{").replace("}", "}}")
    return comment


# -- argv builders (pure) ------------------------------------------------------------


def init_argv(repository: Repository) -> list[str]:
    return [BORG, "init", "--log-json", "--encryption", repository.encryption, repository.location]


def create_argv(
    repository: Repository,
    archive_name: str,
    paths: Sequence[str],
    comment: str,
    *,
    progress: bool,
) -> list[str]:
    argv = [BORG, "create", "--json", "--log-json"]
    if progress:
        argv.append("--progress")
    argv += ["--compression", repository.compression, "--comment", comment]
    argv += ["--", archive_argument(repository, archive_name), *paths]
    return argv


def list_archives_argv(repository: Repository) -> list[str]:
    return [BORG, "list", "--log-json", "--json", "--format", "{comment}", repository.location]


def list_contents_argv(
    repository: Repository, archive_name: str, paths: Sequence[str]
) -> list[str]:
    return [
        BORG,
        "list",
        "--log-json",
        "--json-lines",
        "--",
        archive_argument(repository, archive_name),
        *paths,
    ]


def extract_argv(
    repository: Repository, archive_name: str, paths: Sequence[str], *, progress: bool
) -> list[str]:
    argv = [BORG, "extract", "--log-json"]
    if progress:
        argv.append("--progress")
    return [*argv, "--", archive_argument(repository, archive_name), *paths]


def delete_argv(repository: Repository, archive_names: Sequence[str]) -> list[str]:
    return [BORG, "delete", "--log-json", "--", repository.location, *archive_names]


def compact_argv(repository: Repository) -> list[str]:
    return [BORG, "compact", "--log-json", repository.location]


def export_tar_argv(
    repository: Repository, archive_name: str, file: Path, paths: Sequence[str]
) -> list[str]:
    return [
        BORG,
        "export-tar",
        "--log-json",
        "--",
        archive_argument(repository, archive_name),
        str(file),
        *paths,
    ]


def key_export_argv(repository: Repository) -> list[str]:
    return [BORG, "key", "export", "--log-json", repository.location]


# -- running them -------------------------------------------------------------------


@contextmanager
def passphrase_pipe(
    repository: Repository,
) -> Iterator[tuple[dict[str, str], list[int], list[str]]]:
    """Environment, fds to pass and secrets to mask for one borg call."""
    environment = {
        "BORG_BASE_DIR": str(locations.home() / "borg"),
        # Never let borg wait for an answer on a terminal nobody watches.
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "no",
        "BORG_DISPLAY_PASSPHRASE": "no",
        "BORG_EXIT_CODES": "legacy",
    }
    passphrase = repository.passphrase()
    if repository.encryption == "none":
        environment["BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK"] = "yes"
    if passphrase is None:
        yield environment, [], []
        return
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, passphrase.encode())
        os.close(write_end)
        write_end = -1
        environment["BORG_PASSPHRASE_FD"] = str(read_end)
        yield environment, [read_end], [passphrase]
    finally:
        if write_end >= 0:
            os.close(write_end)
        os.close(read_end)


def run_borg(
    repository: Repository,
    argv: list[str],
    *,
    accept_warnings: bool = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    working_directory: Path | None = None,
    stdout_path: Path | None = None,
) -> execute.Completed:
    """Run one borg command for ``repository``, turning its errors into homesafe's."""
    with passphrase_pipe(repository) as (environment, fds, secrets):
        try:
            return execute.run(
                argv,
                environment=environment,
                remove_environment=("BORG_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_NEW_PASSPHRASE"),
                pass_fds=fds,
                secrets=secrets,
                accept_returncodes=(0, BORG_WARNING) if accept_warnings else (0,),
                on_record=on_record,
                working_directory=working_directory,
                stdout_path=stdout_path,
            )
        except CommandError as error:
            raise classify(error, repository) from error


def classify(error: CommandError, repository: Repository) -> EngineError:
    """The homesafe error for a failed borg call."""
    text = error.stderr_tail
    error_class: type[EngineError] = EngineError
    for message_id in error.message_ids:
        if message_id in ERRORS_BY_MESSAGE_ID:
            error_class = ERRORS_BY_MESSAGE_ID[message_id]
            break
    else:
        if "passphrase supplied" in text and "incorrect" in text:
            error_class = PassphraseError
        elif "does not exist" in text and "Repository" in text:
            error_class = RepositoryNotFoundError
    summary = {
        RepositoryNotFoundError: f"no borg repository at {repository.location}",
        PassphraseError: f"wrong passphrase for repository {repository.name!r}",
        RepositoryExistsError: f"a repository exists already at {repository.location}",
        RepositoryLockedError: f"repository {repository.name!r} is locked",
    }.get(error_class, f"borg failed on repository {repository.name!r}")
    detail = text.strip() or error.message
    return error_class(f"{summary}: {detail}", hint=HINTS.get(error_class))


class BorgEngine:
    """:class:`homesafe.engines.base.Engine` on borg 1.2 / 1.4."""

    name = "borg"

    def repository_exists(self, repository: Repository) -> bool:
        location = Path(repository.location)
        return (location / "config").is_file() and (location / "data").is_dir()

    def initialize(self, repository: Repository) -> None:
        run_borg(repository, init_argv(repository))

    def create(
        self,
        repository: Repository,
        archive_name: str,
        paths: Sequence[str],
        *,
        working_directory: Path,
        comment: str,
        on_progress: ProgressCallback | None = None,
    ) -> ArchiveStats:
        def on_record(record: dict[str, Any]) -> None:
            if on_progress is not None and record.get("type") == "archive_progress":
                on_progress(
                    Progress(
                        "create",
                        current=float(record.get("original_size", 0)),
                        message=str(record.get("path", "")),
                        finished=bool(record.get("finished")),
                    )
                )

        completed = run_borg(
            repository,
            create_argv(
                repository,
                archive_name,
                paths,
                escape_comment(comment),
                progress=on_progress is not None,
            ),
            accept_warnings=True,
            on_record=on_record,
            working_directory=working_directory,
        )
        report = json.loads(completed.stdout)["archive"]
        stats = report.get("stats", {})
        return ArchiveStats(
            name=report["name"],
            original_size=int(stats.get("original_size", 0)),
            compressed_size=int(stats.get("compressed_size", 0)),
            deduplicated_size=int(stats.get("deduplicated_size", 0)),
            file_count=int(stats.get("nfiles", 0)),
            duration=float(report.get("duration", 0.0)),
            warnings=completed.messages("WARNING"),
        )

    def list_archives(self, repository: Repository) -> list[ArchiveSummary]:
        completed = run_borg(repository, list_archives_argv(repository))
        return [
            ArchiveSummary(
                name=item["name"],
                id=item["id"],
                time=item.get("time") or item.get("start", ""),
                comment=item.get("comment", ""),
            )
            for item in json.loads(completed.stdout)["archives"]
        ]

    def list_contents(
        self, repository: Repository, archive_name: str, paths: Sequence[str] = ()
    ) -> list[ArchiveEntry]:
        completed = run_borg(
            repository, list_contents_argv(repository, archive_name, paths), accept_warnings=True
        )
        entries = []
        for line in completed.stdout.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            entries.append(
                ArchiveEntry(
                    path=item["path"],
                    type=item["type"],
                    mode=item["mode"],
                    size=int(item.get("size", 0)),
                    user=item.get("user", ""),
                    group=item.get("group", ""),
                    link_target=item.get("linktarget", ""),
                )
            )
        return entries

    def extract(
        self,
        repository: Repository,
        archive_name: str,
        paths: Sequence[str],
        target_root: Path,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> list[str]:
        def on_record(record: dict[str, Any]) -> None:
            if on_progress is not None and record.get("type") == "progress_percent":
                on_progress(
                    Progress(
                        "extract",
                        current=float(record.get("current", 0) or 0),
                        total=float(record.get("total", 0) or 0) or None,
                        message=str((record.get("info") or [""])[-1]),
                        finished=bool(record.get("finished")),
                    )
                )

        completed = run_borg(
            repository,
            extract_argv(repository, archive_name, paths, progress=on_progress is not None),
            accept_warnings=True,
            on_record=on_record,
            working_directory=target_root,
        )
        return completed.messages("WARNING")

    def delete(self, repository: Repository, archive_names: Sequence[str]) -> None:
        if not archive_names:
            return
        # borg 1.2 exits 0 and 1.4 exits 1 (before compacting) on a missing name, with
        # no msgid either way: check the names first so nothing is half done.
        existing = {archive.name for archive in self.list_archives(repository)}
        missing = [name for name in archive_names if name not in existing]
        if missing:
            raise ArchiveNotFoundError(
                f"no archive {', '.join(missing)} in repository {repository.name!r}; "
                "nothing was deleted",
                hint=HINTS[ArchiveNotFoundError],
            )
        run_borg(repository, delete_argv(repository, archive_names))
        if has_feature("compact"):
            run_borg(repository, compact_argv(repository))

    def export_tar(
        self, repository: Repository, archive_name: str, file: Path, paths: Sequence[str] = ()
    ) -> None:
        run_borg(repository, export_tar_argv(repository, archive_name, file, paths))

    def export_key(self, repository: Repository) -> str:
        return run_borg(repository, key_export_argv(repository)).stdout
