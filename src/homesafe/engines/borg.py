"""The borg engine: argv builders and one :func:`homesafe.execute.run` call each.

Works with borg 1.2 (Debian bookworm) and 1.4; what differs between versions is in
:data:`FEATURES` and nowhere else. The passphrase reaches borg through
``BORG_PASSPHRASE_FD`` (a pipe), never argv or the environment. ``BORG_BASE_DIR`` is
``$HOMESAFE_HOME/borg`` so that borg's cache and security records live with homesafe's
state. Errors are classified by the ``msgid`` borg logs with ``--log-json``.

Remote repositories (``ssh://user@host[:port]/path``) are reached through ``borg serve``
on the server, with ``BORG_RSH`` carrying homesafe's own ssh key and known_hosts (see
:mod:`homesafe.repositories`); when borg only says the connection closed, an ssh probe
tells an unreachable host, a refused key and a changed host key apart.

Locks: every repository command gets ``--lock-wait`` (the repository's ``lock_wait``).
borg itself removes a lock whose holder is a dead process of this host; when it still
times out, homesafe reads the lock of a local repository and runs ``borg break-lock``
only if every holder is a process of this host that is gone (a zombie counts as gone:
borg's own check takes it for alive), then tries once more. A live holder makes the
command fail with a :class:`RepositoryLockedError` naming it. Over ssh the lock is
taken by ``borg serve`` on the server, which removes a lock of a dead process of its own
host itself; a lock of another host (one sharing the repository's disk, or a server
renamed) cannot be proven dead from here or there: the error says so and names
``homesafe repo break-lock``, which the user runs once sure nothing uses the repository.

Self-tests: borg runs 33 unit tests of its compiled parts (hash index, crypto, chunker)
at the start of every command, ~0.05 s of an unchanged backup's ~0.4 s. Its
documentation allows switching them off (``BORG_SELFTEST=disabled``) "after at least
doing a one-time test borg (with selftests not disabled) when installing or upgrading".
homesafe lets them run in its first borg call after the borg binary changed, and again
once a day (:data:`SELFTEST_INTERVAL_SECONDS`); the other calls go without them.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from homesafe import execute, locations, prestart, processes
from homesafe.engines.base import (
    ArchiveEntry,
    ArchiveStats,
    ArchiveSummary,
    CheckReport,
    Progress,
    ProgressCallback,
    PruneReport,
    ReadView,
    RepositoryInfo,
    RetentionPolicy,
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
from homesafe.repositories import Repository, classify_ssh_failure, diagnose_ssh, ssh_options

BORG = "borg"
BORG_WARNING = 1
# How long a pass of borg's self-tests stands for the calls after it (see above).
SELFTEST_INTERVAL_SECONDS = 24 * 3600
# The most `borg extract` calls of one restore made side by side (each is a process of
# some 100 MB, and each reads the archive's metadata in full).
MAX_EXTRACT_CONCURRENCY = 4

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
    "NotLocked": RepositoryLockedError,
}

# borg's msgids for a connection to ``borg serve`` that went away: ssh failed, or borg
# is missing on the server. An ssh probe tells which.
CONNECTION_MESSAGE_IDS = {
    "ConnectionClosed",
    "ConnectionClosedWithHint",
    "RemoteRepository.RPCError",
}

# Subcommands that open the repository and so take ``--lock-wait``.
LOCKING_COMMANDS = {
    "init", "create", "list", "extract", "delete", "compact", "export-tar", "key", "info",
    "check", "prune", "break-lock",
}  # fmt: skip

HINTS: dict[type[EngineError], str] = {
    RepositoryNotFoundError: "Check the repository location; `homesafe backup` creates the "
    "default repository on first use.",
    PassphraseError: "Check the passphrase file under $HOMESAFE_HOME/secrets/.",
    ArchiveNotFoundError: "`homesafe archives list` shows the archives there are.",
    RepositoryLockedError: "Another homesafe or borg process is using the repository; wait "
    "for it to finish.",
}


def _binary_stamp() -> str:
    """The borg on PATH, as its real path and modification time (a new borg, or the same
    one reinstalled, has another)."""
    binary = shutil.which(BORG)
    if binary is None:
        raise EngineError(
            "borg is not installed.",
            hint="Install it with `apt-get install borgbackup` (or run `make demo`).",
        )
    real = os.path.realpath(binary)
    return f"{real}:{os.stat(real).st_mtime_ns}"


def _version_file() -> Path:
    return locations.home() / "borg-version.json"


def _cached(stamp: str) -> dict[str, Any] | None:
    """What ``borg-version.json`` keeps of the borg with ``stamp``: its version and when
    it last passed its self-tests; None for another borg or no file."""
    try:
        cached = json.loads(_version_file().read_text())
    except (OSError, ValueError):
        return None
    return cached if isinstance(cached, dict) and cached.get("binary") == stamp else None


def version() -> tuple[int, int, int]:
    """The installed borg's version, cached per binary (a borg call costs ~0.3 s)."""
    stamp = _binary_stamp()
    try:
        major, minor, patch = (_cached(stamp) or {})["version"]
        return (int(major), int(minor), int(patch))
    except (KeyError, TypeError, ValueError):
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
        _note(stamp, version=found)
    except OSError:
        pass
    return found


def selftest_environment() -> dict[str, str]:
    """``BORG_SELFTEST=disabled`` when this borg passed its self-tests in a homesafe call
    less than :data:`SELFTEST_INTERVAL_SECONDS` ago; else nothing: they run."""
    try:
        passed = float((_cached(_binary_stamp()) or {}).get("selftest_passed", 0))
    except (TypeError, ValueError):
        return {}
    if 0 <= time.time() - passed < SELFTEST_INTERVAL_SECONDS:
        return {"BORG_SELFTEST": "disabled"}
    return {}


def _remember_selftest_passed() -> None:
    """Note that the borg on PATH passed its self-tests now (a call that ran them ended
    well: borg exits 2 when they fail). Best effort: unnoted, they run again."""
    with suppress(OSError, EngineError):
        _note(_binary_stamp(), selftest_passed=time.time())


def _note(stamp: str, **facts: object) -> None:
    """Add ``facts`` to what ``borg-version.json`` keeps of the borg with ``stamp`` (what
    it kept of another borg goes). Written whole under a name of this process's and
    renamed: calls side by side may note at once."""
    file = _version_file()
    partial = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps({**(_cached(stamp) or {}), "binary": stamp, **facts}))
    os.replace(partial, file)


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
    timestamp: datetime.datetime | None = None,
    view: ReadView | None = None,
) -> list[str]:
    argv = [BORG, "create", "--json", "--log-json"]
    if progress:
        argv.append("--progress")
    for excluded in view.excludes if view is not None else ():
        argv += ["--exclude", "pp:" + excluded]
    if timestamp is not None:
        # borg reads a naive time as UTC.
        utc = timestamp.astimezone(datetime.UTC).replace(tzinfo=None)
        argv += ["--timestamp", utc.isoformat(timespec="seconds")]
    argv += ["--compression", repository.compression, "--comment", comment]
    argv += ["--", archive_argument(repository, archive_name), *paths]
    return argv


def list_archives_argv(repository: Repository) -> list[str]:
    return [BORG, "list", "--log-json", "--json", "--format", "{comment}", repository.location]


# What a listing of an archive's contents asks borg for: these fields only, each ended by
# a NUL (the one character no path or link target holds). borg formats and homesafe
# parses them in a good deal less time than every field of --json-lines.
LIST_CONTENTS_FIELDS = ("type", "mode", "size", "user", "group", "linktarget", "path")
# Asked for only when wanted: borg formats each time (~3 us an entry).
LIST_TIMES_FIELDS = ("isomtime", "isoctime")


def list_contents_fields(times: bool) -> tuple[str, ...]:
    """The fields a listing asks borg for, in order (with ``times``, the times last)."""
    return LIST_CONTENTS_FIELDS + (LIST_TIMES_FIELDS if times else ())


def list_contents_format(times: bool) -> str:
    return "".join(f"{{{name}}}{{NUL}}" for name in list_contents_fields(times))


def list_contents_argv(
    repository: Repository, archive_name: str, paths: Sequence[str], *, times: bool = False
) -> list[str]:
    return [
        BORG,
        "list",
        "--log-json",
        "--format",
        list_contents_format(times),
        "--",
        archive_argument(repository, archive_name),
        *paths,
    ]


def parse_contents(output: str, *, times: bool = False) -> list[ArchiveEntry]:
    """The entries of a listing made by :func:`list_contents_argv` (with ``times`` as
    it was made)."""
    fields = output.split("\0")
    width = len(list_contents_fields(times))
    common = len(LIST_CONTENTS_FIELDS)
    # Every field ends with a NUL: what follows the last one is empty.
    if len(fields) % width != 1 or fields[-1]:
        raise EngineError(f"borg list printed a listing homesafe cannot read: {output[:200]!r}")
    entries = []
    for start in range(0, len(fields) - 1, width):
        kind, mode, size, user, group, link_target, path = fields[start : start + common]
        entry = ArchiveEntry(
            path=path,
            type=kind,
            mode=mode,
            size=int(size or 0),
            user=user,
            group=group,
            link_target=link_target,
        )
        if times:
            entry.mtime, entry.ctime = fields[start + common : start + width]
        entries.append(entry)
    return entries


# An extraction names up to this many paths (or excludes) to borg one by one; beyond it,
# the siblings among them become one regular expression per parent directory. borg
# tries each item of the archive against each pattern in turn, in Python, and a large
# directory shared out between calls (homesafe.restore.plan_extractions) may give one
# call hundreds of its entries: 42,000 items against 400 prefixes take seconds, against
# one expression (a trie: matched in time proportional to a path's length) next to none.
PATH_PATTERNS_MAX = 16


def extract_argv(
    repository: Repository,
    archive_name: str,
    paths: Sequence[str],
    *,
    progress: bool,
    excludes: Sequence[str] = (),
) -> list[str]:
    """``borg extract`` of ``paths`` (archive paths, each with what lies below it) but
    for ``excludes`` (the same)."""
    argv = [BORG, "extract", "--log-json"]
    if progress:
        argv.append("--progress")
    if len(excludes) <= PATH_PATTERNS_MAX:
        # Path prefixes ("pp:"): literal, each path and what lies below it.
        argv += [part for path in excludes for part in ("--exclude", f"pp:{path}")]
    else:
        argv += [part for regex in prefix_regexes(excludes) for part in ("--exclude", regex)]
    if len(paths) <= PATH_PATTERNS_MAX:
        return [*argv, "--", archive_argument(repository, archive_name), *paths]
    # Included by patterns, whatever else is excluded by the last one; no path is given
    # (borg would then include by default what no pattern matches).
    argv += [f"--pattern=+{regex}" for regex in prefix_regexes(paths)]
    # Joined to its option: argparse would take a separate "-re:^" for an option.
    return [*argv, "--pattern=-re:^", "--", archive_argument(repository, archive_name)]


def prefix_regexes(paths: Sequence[str]) -> list[str]:
    """borg patterns (``re:``) matching ``paths`` (archive paths, without a leading
    slash) and what lies below each: one per parent directory."""
    by_parent: dict[str, list[str]] = {}
    for path in paths:
        parent, _, name = path.rpartition("/")
        by_parent.setdefault(parent, []).append(name)
    return [
        f"re:^{re.escape(parent + '/') if parent else ''}{literal_alternation(names)}(?:/|\\Z)"
        for parent, names in sorted(by_parent.items())
    ]


def literal_alternation(names: Sequence[str]) -> str:
    """A regular expression matching exactly one of ``names`` (literally), built as a
    trie: the names' shared beginnings are written once, so that matching never tries
    the names one by one."""
    trie: dict[str, Any] = {}
    for name in names:
        node = trie
        for character in name:
            node = node.setdefault(character, {})
        node[""] = {}  # a name ends here

    def expression(node: dict[str, Any]) -> str:
        branches = [re.escape(key) + expression(below) for key, below in sorted(node.items())]
        if len(branches) <= 1:
            return "".join(branches)  # "" where the last name ended
        return "(?:" + "|".join(branches) + ")"

    return expression(trie)


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


def key_import_argv(repository: Repository, file: Path) -> list[str]:
    return [BORG, "key", "import", "--log-json", repository.location, str(file)]


def change_passphrase_argv(repository: Repository) -> list[str]:
    return [BORG, "key", "change-passphrase", "--log-json", repository.location]


def info_argv(repository: Repository) -> list[str]:
    return [BORG, "info", "--log-json", "--json", repository.location]


def probe_argv(repository: Repository) -> list[str]:
    """The cheapest call that opens the repository (manifest only, no cache sync)."""
    return [BORG, "list", "--log-json", "--short", "--last", "1", repository.location]


def check_argv(repository: Repository, *, verify_data: bool) -> list[str]:
    argv = [BORG, "check", "--log-json"]
    if verify_data:
        argv.append("--verify-data")
    return [*argv, repository.location]


def prune_argv(repository: Repository, policy: RetentionPolicy, *, dry_run: bool) -> list[str]:
    argv = [BORG, "prune", "--log-json", "--list"]
    if dry_run:
        argv.append("--dry-run")
    for option, count in (
        ("--keep-daily", policy.keep_daily),
        ("--keep-weekly", policy.keep_weekly),
        ("--keep-monthly", policy.keep_monthly),
    ):
        if count:
            argv += [option, str(count)]
    return [*argv, repository.location]


def break_lock_argv(repository: Repository) -> list[str]:
    return [BORG, "break-lock", "--log-json", repository.location]


def destroy_argv(repository: Repository) -> list[str]:
    return [BORG, "delete", "--log-json", repository.location]


# -- running them -------------------------------------------------------------------


@contextmanager
def passphrase_pipe(
    repository: Repository,
) -> Iterator[tuple[dict[str, str], list[int], list[str]]]:
    """Environment, fds to pass and secrets to mask for one borg call."""
    environment = prestart.borg_environment(str(locations.home()))
    if repository.parsed_location.uses_ssh:
        environment["BORG_RSH"] = shlex.join(["ssh", *ssh_options()])
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
    environment: dict[str, str] | None = None,
    secrets: Sequence[str] = (),
    wrapper: Sequence[str] = (),
) -> execute.Completed:
    """Run one borg command for ``repository``, turning its errors into homesafe's.

    A lock that outlived its (dead, local) holder is broken once and the command run
    again; see the module docstring. ``wrapper``: an argv prefix that borg runs under
    (a capture view, see :class:`~homesafe.engines.base.ReadView`).
    """
    argv = [*wrapper, *with_lock_wait(repository, argv)]
    try:
        return _run_borg_once(
            repository,
            argv,
            accept_warnings,
            on_record,
            working_directory,
            stdout_path,
            environment,
            secrets,
        )
    except RepositoryLockedError:
        if not break_stale_lock(repository):
            raise
        return _run_borg_once(
            repository,
            argv,
            accept_warnings,
            on_record,
            working_directory,
            stdout_path,
            environment,
            secrets,
        )


def with_lock_wait(repository: Repository, argv: list[str]) -> list[str]:
    """``argv`` with ``--lock-wait`` after the subcommand, for those that lock."""
    if len(argv) < 2 or argv[1] not in LOCKING_COMMANDS:
        return argv
    position = 3 if argv[1] == "key" else 2
    return [
        *argv[:position],
        "--lock-wait",
        str(max(1, round(repository.lock_wait))),
        *argv[position:],
    ]


def _run_borg_once(
    repository: Repository,
    argv: list[str],
    accept_warnings: bool,
    on_record: Callable[[dict[str, Any]], None] | None,
    working_directory: Path | None,
    stdout_path: Path | None,
    extra_environment: dict[str, str] | None,
    extra_secrets: Sequence[str],
) -> execute.Completed:
    extra_environment = extra_environment or {}
    # A program that does not need a passphrase does not get one (borg's own rule); the
    # passphrase reaches borg through the pipe only.
    removed = [
        name
        for name in (
            "BORG_PASSPHRASE",
            "BORG_PASSCOMMAND",
            "BORG_NEW_PASSPHRASE",
            repository.passphrase_environment,
        )
        if name and name not in extra_environment
    ]
    selftest = selftest_environment()
    with passphrase_pipe(repository) as (environment, fds, secrets):
        try:
            completed = execute.run(
                argv,
                environment={**environment, **selftest, **extra_environment},
                remove_environment=removed,
                pass_fds=fds,
                secrets=[*secrets, *extra_secrets],
                accept_returncodes=(0, BORG_WARNING) if accept_warnings else (0,),
                on_record=on_record,
                working_directory=working_directory,
                stdout_path=stdout_path,
            )
        except CommandError as error:
            raise classify(error, repository) from error
    if not selftest:
        _remember_selftest_passed()
    return completed


def borg_host_id() -> str:
    """This host as borg names lock holders: ``BORG_HOST_ID``, else ``fqdn@node`` with
    the fqdn found as borg finds it (its own getfqdn, not Python's)."""
    configured = os.environ.get("BORG_HOST_ID")
    if configured:
        return configured
    import socket  # here: only lock holders are named by it

    name = locations.hostname()
    try:
        addresses = socket.getaddrinfo(name, None, 0, socket.SOCK_DGRAM, 0, socket.AI_CANONNAME)
    except OSError:
        addresses = []
    fqdn = next((address[3] for address in addresses if address[3]), name)
    return f"{fqdn}@{uuid.getnode()}"


def lock_holders(repository: Repository) -> list[tuple[str, int]] | None:
    """The (host id, pid) of every holder of a local repository's lock; None when it
    cannot be read (remote repository, no lock)."""
    if repository.is_remote:
        return None
    location = Path(repository.location)
    holders: list[tuple[str, int]] = []
    try:
        roster = json.loads((location / "lock.roster").read_text())
        for kind in ("exclusive", "shared"):
            holders += [(str(entry[0]), int(entry[1])) for entry in roster.get(kind, [])]
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        pass
    exclusive = location / "lock.exclusive"
    if exclusive.is_dir():
        for entry in exclusive.iterdir():
            # "<host id>.<pid>-<thread>"
            match = re.fullmatch(r"(.+)\.(\d+)-\d+", entry.name)
            if match:
                holders.append((match[1], int(match[2])))
    return sorted(set(holders)) if holders else None


def break_stale_lock(repository: Repository) -> bool:
    """Break the lock of a local repository when every holder is a gone process of this
    host; True when it did (the caller then tries again)."""
    holders = lock_holders(repository)
    if not holders:
        return False
    host = borg_host_id()
    if any(holder_host != host or processes.alive(pid) for holder_host, pid in holders):
        return False
    _run_borg_once(repository, break_lock_argv(repository), False, None, None, None, None, ())
    return True


def describe_lock(repository: Repository) -> str:
    holders = lock_holders(repository)
    if holders is None:
        if repository.is_remote:
            return "the lock is on the server"
        return "the lock holder is unknown"
    host = borg_host_id()
    return ", ".join(
        f"pid {pid} on {'this host' if holder_host == host else holder_host}"
        + (" (gone)" if holder_host == host and not processes.alive(pid) else "")
        for holder_host, pid in holders
    )


def locked_hint(repository: Repository) -> str:
    """What to do about a lock that outlasted the wait: wait for a live holder of this
    host; break, once sure, a lock no process here can be proven to hold."""
    holders = lock_holders(repository)
    host = borg_host_id()
    if holders and all(holder == host and processes.alive(pid) for holder, pid in holders):
        return HINTS[RepositoryLockedError]
    where = "the server or any other host" if repository.is_remote else "any host"
    return (
        f"{HINTS[RepositoryLockedError]} A lock left by a process that is gone is removed "
        "only when it was taken on the host that finds it; once you are sure no borg or "
        f"homesafe process on {where} uses the repository, run "
        f"`homesafe repo break-lock {repository.name}`."
    )


def create_progress(
    on_progress: ProgressCallback | None,
) -> Callable[[dict[str, Any]], None]:
    """A ``--log-json`` record handler turning `borg create` progress into Progress."""

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

    return on_record


def extract_progress(
    on_progress: ProgressCallback | None,
) -> Callable[[dict[str, Any]], None]:
    """A ``--log-json`` record handler turning `borg extract` progress into Progress."""

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

    return on_record


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
    if error_class is EngineError and repository.parsed_location.uses_ssh:
        remote = classify_ssh_failure(text, repository)
        if remote is None and (error.message_ids & CONNECTION_MESSAGE_IDS or not error.message_ids):
            remote = diagnose_ssh(repository)
        if remote is not None:
            return remote
    summary = {
        RepositoryNotFoundError: f"no borg repository at {repository.location}",
        PassphraseError: f"wrong passphrase for repository {repository.name!r}",
        RepositoryExistsError: f"a repository exists already at {repository.location}",
        RepositoryLockedError: f"repository {repository.name!r} is locked by another "
        f"process ({describe_lock(repository)}); waited {repository.lock_wait:g} s",
    }.get(error_class, f"borg failed on repository {repository.name!r}")
    detail = text.strip() or error.message
    hint = locked_hint(repository) if error_class is RepositoryLockedError else None
    return error_class(f"{summary}: {detail}", hint=hint or HINTS.get(error_class))


class BorgEngine:
    """:class:`homesafe.engines.base.Engine` on borg 1.2 / 1.4."""

    name = "borg"

    @property
    def extract_concurrency(self) -> int:
        # `borg extract` decrypts, decompresses and writes in one thread: calls side by
        # side (each with a share of the paths) put the other cores to work.
        return max(1, min(len(os.sched_getaffinity(0)), MAX_EXTRACT_CONCURRENCY))

    def repository_exists(self, repository: Repository) -> bool:
        """Local: the repository's files are there. Remote: the server opens it (a
        wrong passphrase still proves it exists)."""
        if not repository.is_remote:
            location = Path(repository.location)
            return (location / "config").is_file() and (location / "data").is_dir()
        try:
            run_borg(repository, probe_argv(repository))
        except RepositoryNotFoundError:
            return False
        except PassphraseError:
            return True
        return True

    def initialize(self, repository: Repository) -> None:
        # An unsupported borg is refused before the repository is made, and the version
        # is remembered then: the first backup need not ask borg for it.
        version()
        run_borg(repository, init_argv(repository))

    def attach(self, repository: Repository) -> None:
        """Nothing: borg opens a repository as fast with the passphrase as without."""

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
        on_record = create_progress(on_progress)
        completed = run_borg(
            repository,
            create_argv(
                repository,
                archive_name,
                paths,
                escape_comment(comment),
                progress=on_progress is not None,
                timestamp=timestamp,
                view=view,
            ),
            accept_warnings=True,
            on_record=on_record,
            working_directory=working_directory,
            wrapper=view.wrapper if view is not None else (),
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
        self,
        repository: Repository,
        archive_name: str,
        paths: Sequence[str] = (),
        *,
        times: bool = False,
    ) -> list[ArchiveEntry]:
        """The entries below ``paths`` (all when empty), a hard link with the size of
        the file it links to.

        borg lists a hard link (every link of a file but the first archived) with size
        0; its size is its first link's, which a second listing fetches when the first
        did not hold it (its link was archived outside ``paths``)."""
        completed = run_borg(
            repository,
            list_contents_argv(repository, archive_name, paths, times=times),
            accept_warnings=True,
        )
        entries = parse_contents(completed.stdout, times=times)
        links = [entry for entry in entries if entry.mode.startswith("h") and entry.link_target]
        if not links:
            return entries
        sizes = {entry.path: entry.size for entry in entries if not entry.mode.startswith("h")}
        elsewhere = sorted({link.link_target for link in links} - sizes.keys())
        if elsewhere:
            completed = run_borg(
                repository,
                list_contents_argv(repository, archive_name, elsewhere),
                accept_warnings=True,
            )
            sizes |= {entry.path: entry.size for entry in parse_contents(completed.stdout)}
        for link in links:
            link.size = sizes.get(link.link_target, link.size)
        return entries

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
        on_record = extract_progress(on_progress)
        completed = run_borg(
            repository,
            extract_argv(
                repository,
                archive_name,
                paths,
                progress=on_progress is not None,
                excludes=excludes,
            ),
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

    def repository_info(self, repository: Repository) -> RepositoryInfo:
        info = json.loads(run_borg(repository, info_argv(repository)).stdout)
        stats = info.get("cache", {}).get("stats", {})
        listed = self.list_archives(repository)
        return RepositoryInfo(
            archive_count=len(listed),
            last_archive_time=max((archive.time for archive in listed), default=""),
            stored_size=int(stats.get("unique_csize", 0)),
            original_size=int(stats.get("total_size", 0)),
            encryption=str(info.get("encryption", {}).get("mode", repository.encryption)),
        )

    def check(
        self,
        repository: Repository,
        *,
        verify_data: bool = False,
        sample_percent: float | None = None,
    ) -> CheckReport:
        """``borg check``; borg cannot read back a sample, only all data."""
        if sample_percent is not None:
            raise EngineError(
                "borg cannot check a sample of the data",
                hint="Use --verify-data to read back all of it (restic repositories take "
                "--sample).",
            )
        started = time.monotonic()
        try:
            completed = run_borg(
                repository, check_argv(repository, verify_data=verify_data), accept_warnings=True
            )
            records = completed.records
            ok = completed.returncode == 0
        except EngineError as error:
            cause = error.__cause__
            if type(error) is not EngineError or not isinstance(cause, CommandError):
                raise
            # borg check exits 1 or 2 when it finds damage; what it found is in its log.
            records = _records_of(cause)
            ok = False
        problems = [
            str(record.get("message", "")).strip()
            for record in records
            if record.get("type") == "log_message"
            and record.get("levelname") in ("ERROR", "WARNING", "CRITICAL")
        ]
        ok = ok and not problems
        affected: list[str] = []
        if not ok:
            damaged = set(re.findall(r"\b[0-9a-f]{64}\b", "\n".join(problems)))
            try:
                affected = [
                    archive.name
                    for archive in self.list_archives(repository)
                    if archive.id in damaged
                ]
            except EngineError:
                affected = []
        return CheckReport(
            ok=ok,
            verified_data="all" if verify_data else "none",
            problems=problems,
            affected_archives=affected,
            duration=time.monotonic() - started,
        )

    def prune(
        self, repository: Repository, policy: RetentionPolicy, *, dry_run: bool = False
    ) -> PruneReport:
        """``borg prune`` by ``policy``, then ``borg compact`` to give the space back."""
        if not policy.keeps_anything:
            raise EngineError("a retention policy that keeps nothing would delete every archive")
        names = {archive.id: archive.name for archive in self.list_archives(repository)}
        completed = run_borg(repository, prune_argv(repository, policy, dry_run=dry_run))
        kept: list[str] = []
        removed: list[str] = []
        for message in completed.messages():
            match = re.search(r"\[([0-9a-f]{64})\]\s*$", message)
            if not match or match[1] not in names:
                continue
            if message.startswith(("Would prune", "Pruning archive")):
                removed.append(names[match[1]])
            elif message.startswith(("Keeping archive", "Would keep")):
                kept.append(names[match[1]])
        if removed and not dry_run and has_feature("compact"):
            run_borg(repository, compact_argv(repository))
        return PruneReport(kept=kept, removed=removed, dry_run=dry_run)

    def import_key(self, repository: Repository, file: Path) -> None:
        run_borg(repository, key_import_argv(repository, file))

    def change_passphrase(self, repository: Repository, new_passphrase: str) -> None:
        # borg reads the new passphrase from BORG_NEW_PASSPHRASE only (no fd for it):
        # the environment of this one child, never argv, and masked in every message.
        run_borg(
            repository,
            change_passphrase_argv(repository),
            environment={"BORG_NEW_PASSPHRASE": new_passphrase},
            secrets=[new_passphrase],
        )

    def break_lock(self, repository: Repository) -> None:
        run_borg(repository, break_lock_argv(repository))

    def destroy(self, repository: Repository) -> None:
        run_borg(
            repository,
            destroy_argv(repository),
            environment={"BORG_DELETE_I_KNOW_WHAT_I_AM_DOING": "YES"},
        )


def _records_of(error: CommandError) -> list[dict[str, Any]]:
    """The JSON log records a failed borg call left in its stderr tail."""
    records = []
    for line in error.stderr_tail.splitlines():
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                records.append(value)
    return records
