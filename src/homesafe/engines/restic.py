"""The restic engine: argv builders and one :func:`homesafe.execute.run` call each.

Works with restic 0.14 (Debian bookworm) and later. How homesafe's ideas map onto it:

* **Archive names.** restic names snapshots by id; homesafe files each snapshot under the
  tag ``homesafe.name=<archive name>`` and finds it again with ``latest --tag``. A
  snapshot homesafe did not write is named by its short id.
* **The comment** (homesafe's JSON summary) is stored as the tag
  ``homesafe.comment=<base64url>`` (tags cannot hold commas), and each app as
  ``homesafe.app=<id>`` so that ``restic snapshots --tag homesafe.app=notes`` works too.
* **Paths.** restic keeps a path given as relative (the archive metadata directory,
  relative to the working directory) at the root of the snapshot tree and an absolute
  one at its place: the same layout as borg's. Listings leave out the parent
  directories restic adds above absolute paths, as borg has none.
* **One call per backup.** restic picks a parent snapshot (whose files it compares
  with the disk) only among snapshots of the very same paths, and homesafe's metadata
  directory has a new path every time; a listing to choose one costs a process (some
  0.5 s of key derivation). So homesafe remembers the snapshots each backup wrote
  (``$HOMESAFE_HOME/restic-snapshots/``) and passes ``--parent`` from that record. The
  repository is listed only to refuse a name that may exist already (names not read
  from the clock), for a repository this host has no record of, and when the
  remembered parent is gone.
* **Reading an archive** takes three restic processes (description, listing, files):
  :class:`homesafe.sources.EngineSource` makes the first two side by side, and the
  files are extracted from the snapshot the listing named by id.
* **Passphrase**: through a pipe (``RESTIC_PASSWORD_FILE=/dev/fd/N``), never argv or the
  environment; ``RESTIC_PASSWORD*`` inherited from the caller are removed. A repository
  whose passphrase is kept in a file is opened with homesafe's own key instead
  (:mod:`homesafe.engines.restic_key`), whose derivation costs a millisecond, not half a
  second; the passphrase is used when that key is gone, and for the commands that act on
  the passphrase's key (``key passwd``, ``key export``).
* **Remote**: sftp through homesafe's ssh key and known_hosts (``-o sftp.command``); S3
  with the repository's access keys in the environment of the restic process only.
* **Locks**: restic 0.14 does not wait for a lock. On "already locked" homesafe runs
  ``restic unlock``, which removes only stale locks (of a dead process of this host, or
  not refreshed for 30 minutes), and tries again until ``Repository.lock_wait`` has
  passed; then it fails naming the holder, and for another host's lock names
  ``homesafe repo break-lock`` (``restic unlock --remove-all``), for the user to run
  once sure that host no longer uses the repository.

restic exits 1 for nearly every error, so errors are classified by its words.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import re
import shlex
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from homesafe import archives, execute, locations
from homesafe.engines import restic_key
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
from homesafe.engines.restic_key import OwnKey
from homesafe.errors import (
    ArchiveExistsError,
    ArchiveNotFoundError,
    AuthenticationRefusedError,
    CommandError,
    EngineError,
    HostUnreachableError,
    PassphraseError,
    RepositoryExistsError,
    RepositoryLockedError,
    RepositoryNotFoundError,
    UsageError,
)
from homesafe.repositories import (
    NAME_PATTERN,
    Repository,
    classify_ssh_failure,
    diagnose_ssh,
    ssh_command,
)

logger = logging.getLogger(__name__)

RESTIC = "restic"
# restic 0.14: "backup" exits 3 when some source files could not be read.
INCOMPLETE_SNAPSHOT = 3
NAME_TAG = "homesafe.name="
COMMENT_TAG = "homesafe.comment="
APP_TAG = "homesafe.app="
SNAPSHOT_ID = re.compile(r"[0-9a-f]{8,64}")
LOCK_RETRY_SECONDS = 1.0
LOCKED = re.compile(r"repository is already locked")
TAR_MODES = {".gz": "gz", ".tgz": "gz", ".bz2": "bz2", ".xz": "xz"}

# restic's words -> the homesafe error they mean; the first match wins.
ERRORS_BY_TEXT: list[tuple[re.Pattern[str], type[EngineError]]] = [
    (re.compile(r"repository is already locked"), RepositoryLockedError),
    (re.compile(r"wrong password or no key found"), PassphraseError),
    (re.compile(r"config file already exists|already initialized"), RepositoryExistsError),
    (
        re.compile(r"connection refused|no such host|i/o timeout|network is unreachable", re.I),
        HostUnreachableError,
    ),
    (
        re.compile(
            r"signature we calculated does not match|InvalidAccessKeyId|Access Denied", re.I
        ),
        AuthenticationRefusedError,
    ),
    (
        re.compile(r"Is there a repository at the following location|unable to open config"),
        RepositoryNotFoundError,
    ),
    (
        # An id prefix (restic 0.14 reports a new snapshot by its short id) that has
        # come to match several snapshots names none of them.
        re.compile(
            r"no snapshot found|no matching ID found|invalid id|no snapshot matched"
            r"|multiple IDs with prefix"
        ),
        ArchiveNotFoundError,
    ),
]

HINTS: dict[type[EngineError], str] = {
    RepositoryNotFoundError: "Check the repository location; `homesafe repo add` creates one.",
    PassphraseError: "Check the repository's passphrase source (`homesafe repo show`).",
    ArchiveNotFoundError: "`homesafe archives list` shows the archives there are.",
    RepositoryLockedError: "Another homesafe or restic process is using the repository; "
    "wait for it to finish.",
    HostUnreachableError: "Check the host name and port, and that the server runs.",
    AuthenticationRefusedError: "Check the S3 access key pair "
    "($HOMESAFE_HOME/secrets/<name>.s3-credentials).",
}


# -- names and tags (pure) ------------------------------------------------------------


def encode_comment(comment: str) -> str:
    return base64.urlsafe_b64encode(comment.encode()).decode().rstrip("=")


def decode_comment(encoded: str) -> str:
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        return base64.urlsafe_b64decode(padded).decode()
    except (ValueError, UnicodeDecodeError):
        return ""


def archive_tags(archive_name: str, comment: str) -> list[str]:
    """The tags that carry an archive's name and comment (and its apps, for people)."""
    tags = [NAME_TAG + archive_name]
    if comment:
        tags.append(COMMENT_TAG + encode_comment(comment))
        summary = archives.parse_comment(comment)
        tags += [APP_TAG + app for app in summary.apps if "," not in app]
    return tags


def tag_value(tags: Sequence[str] | None, prefix: str) -> str | None:
    for tag in tags or ():
        if tag.startswith(prefix):
            return tag[len(prefix) :]
    return None


def snapshot_name(snapshot: dict[str, Any]) -> str:
    """The homesafe name of a snapshot: its name tag, else its short id."""
    return tag_value(snapshot.get("tags"), NAME_TAG) or str(snapshot["short_id"])


def snapshot_arguments(archive_name: str) -> list[str]:
    """How to name one archive on restic's command line: the latest snapshot with its
    name tag (names are unique), or a snapshot id for snapshots homesafe did not write."""
    if SNAPSHOT_ID.fullmatch(archive_name):
        return [archive_name]
    return ["latest", "--tag", NAME_TAG + archive_name]


def escape_pattern(path: str) -> str:
    """``path`` as a restic include pattern matching itself only (no glob)."""
    return re.sub(r"([\\*?\[])", r"\\\1", path)


def restic_location(repository: Repository) -> str:
    """The repository as restic's ``-r`` takes it."""
    location = repository.parsed_location
    if location.kind == "sftp":
        return f"sftp:{location.user}@{location.host}:{location.path}"
    if location.kind == "s3":
        return f"s3:{location.endpoint}/{location.path}"
    return location.path


def common_options(repository: Repository) -> list[str]:
    options = ["-r", restic_location(repository)]
    location = repository.parsed_location
    if location.kind == "sftp":
        # restic runs this instead of its own ssh call and keeps only the path of the URL.
        # Without the cipher list: restic 0.14 splits an option's value at its commas.
        command = [*ssh_command(location, tuned=False), "-s", "sftp"]
        options += ["-o", f"sftp.command={shlex.join(command)}"]
    return options


def ancestors(path: str) -> set[str]:
    """Every strict ancestor of a relative path: ``a/b/c`` -> {``a``, ``a/b``}."""
    parts = path.split("/")
    return {"/".join(parts[:index]) for index in range(1, len(parts))}


def stored_members(snapshot_paths: Sequence[str]) -> Callable[[str], bool]:
    """Whether a path (relative, as in the tree) is something the snapshot with these
    paths stored, rather than a parent directory restic added above an absolute path.
    The paths are looked at once, for the many thousands of entries of a listing or a
    dump."""
    tops = {item.lstrip("/") for item in snapshot_paths}
    added = {ancestor for top in tops for ancestor in ancestors(top)}
    inside = within(tops)
    return lambda path: inside(path) or path not in added


def within(tops: Iterable[str]) -> Callable[[str], bool]:
    """Whether a relative path is one of ``tops`` or lies below one."""
    exact = frozenset(tops)
    prefixes = tuple(f"{top}/" for top in exact)
    return lambda path: path in exact or path.startswith(prefixes)


# -- argv builders (pure) ------------------------------------------------------------


def init_argv(repository: Repository) -> list[str]:
    return [RESTIC, "init", *common_options(repository), "--repository-version", "2"]


def backup_argv(
    repository: Repository,
    paths: Sequence[str],
    tags: Sequence[str],
    *,
    parent: str | None = None,
    timestamp: datetime.datetime | None = None,
    view: ReadView | None = None,
) -> list[str]:
    argv = [RESTIC, "backup", *common_options(repository), "--json"]
    argv += ["--compression", repository.compression]
    for excluded in view.excludes if view is not None else ():
        argv += ["--exclude", escape_pattern(excluded)]
    for tag in tags:
        argv += ["--tag", tag]
    if parent:
        argv += ["--parent", parent]
    if timestamp is not None:
        # restic reads this format as local time.
        argv += ["--time", timestamp.astimezone().strftime("%Y-%m-%d %H:%M:%S")]
    return [*argv, "--", *paths]


def snapshots_argv(repository: Repository, archive_name: str | None = None) -> list[str]:
    argv = [RESTIC, "snapshots", *common_options(repository), "--json"]
    if archive_name is not None:
        argv += snapshot_arguments(archive_name)
    return argv


def ls_argv(repository: Repository, archive_name: str) -> list[str]:
    return [RESTIC, "ls", *common_options(repository), "--json", *snapshot_arguments(archive_name)]


def restore_argv(
    repository: Repository, archive_name: str, paths: Sequence[str], target_root: Path
) -> list[str]:
    argv = [RESTIC, "restore", *common_options(repository), *snapshot_arguments(archive_name)]
    argv += ["--target", str(target_root)]
    for path in paths:
        argv += ["--include", escape_pattern("/" + path.strip("/"))]
    return argv


def forget_argv(repository: Repository, snapshot_ids: Sequence[str]) -> list[str]:
    return [RESTIC, "forget", *common_options(repository), "--", *snapshot_ids]


def forget_policy_argv(
    repository: Repository, policy: RetentionPolicy, *, dry_run: bool
) -> list[str]:
    # One group for the whole repository, as borg prunes: restic's default groups by
    # host and paths, and homesafe's paths differ between archives.
    argv = [RESTIC, "forget", *common_options(repository), "--json", "--group-by", ""]
    for option, count in (
        ("--keep-daily", policy.keep_daily),
        ("--keep-weekly", policy.keep_weekly),
        ("--keep-monthly", policy.keep_monthly),
    ):
        if count:
            argv += [option, str(count)]
    if dry_run:
        argv.append("--dry-run")
    return argv


def prune_argv(repository: Repository) -> list[str]:
    return [RESTIC, "prune", *common_options(repository)]


def dump_argv(repository: Repository, archive_name: str) -> list[str]:
    return [RESTIC, "dump", *common_options(repository), *snapshot_arguments(archive_name), "/"]


def check_argv(
    repository: Repository, *, verify_data: bool, sample_percent: float | None
) -> list[str]:
    argv = [RESTIC, "check", *common_options(repository)]
    if verify_data:
        argv.append("--read-data")
    elif sample_percent is not None:
        argv += ["--read-data-subset", f"{sample_percent:g}%"]
    return argv


def find_pack_argv(repository: Repository, pack_ids: Sequence[str]) -> list[str]:
    argv = [RESTIC, "find", *common_options(repository), "--json"]
    for pack in pack_ids:
        argv += ["--pack", pack]
    return argv


def stats_argv(repository: Repository) -> list[str]:
    return [RESTIC, "stats", *common_options(repository), "--json", "--mode", "raw-data"]


def cat_config_argv(repository: Repository) -> list[str]:
    return [RESTIC, "cat", *common_options(repository), "config"]


def cat_masterkey_argv(repository: Repository) -> list[str]:
    return [RESTIC, "cat", *common_options(repository), "masterkey"]


def key_remove_argv(repository: Repository, key_id: str) -> list[str]:
    return [RESTIC, "key", "remove", *common_options(repository), key_id]


def key_list_argv(repository: Repository) -> list[str]:
    return [RESTIC, "key", "list", *common_options(repository), "--json"]


def list_keys_argv(repository: Repository) -> list[str]:
    return [RESTIC, "list", *common_options(repository), "keys"]


def cat_key_argv(repository: Repository, key_id: str) -> list[str]:
    return [RESTIC, "cat", *common_options(repository), "key", key_id]


def key_passwd_argv(repository: Repository, new_password_file: str) -> list[str]:
    return [
        RESTIC,
        "key",
        "passwd",
        *common_options(repository),
        "--new-password-file",
        new_password_file,
    ]


def unlock_argv(repository: Repository, *, remove_all: bool = False) -> list[str]:
    argv = [RESTIC, "unlock", *common_options(repository)]
    return [*argv, "--remove-all"] if remove_all else argv


# -- running them -------------------------------------------------------------------


@contextmanager
def password_pipes(
    repository: Repository, extra: Sequence[str] = (), key: OwnKey | None = None
) -> Iterator[tuple[dict[str, str], list[int], list[str], list[str]]]:
    """Environment, fds, secrets to mask and the ``/dev/fd`` paths of ``extra``
    (further secrets to hand over by pipe) for one restic call; the password is
    ``key``'s when given, else the repository's passphrase."""
    environment = {
        "RESTIC_CACHE_DIR": str(locations.home() / "restic-cache"),
        # One progress line every 5 s is plenty in a log; restic's default is 60/s on
        # a terminal. A progress bar gets more (PROGRESS_FPS_SHOWN).
        "RESTIC_PROGRESS_FPS": "0.2",
    }
    secrets: list[str] = []
    if repository.parsed_location.kind == "s3":
        credentials = repository.s3_credentials()
        environment.update(credentials)
        secrets += list(credentials.values())
    passphrase = key.password if key is not None else repository.passphrase()
    if passphrase is None:
        raise EngineError("restic repositories are always encrypted: they need a passphrase")
    pipes: list[int] = []
    paths: list[str] = []
    try:
        for value in [passphrase, *extra]:
            read_end, write_end = os.pipe()
            pipes.append(read_end)
            try:
                os.write(write_end, value.encode() + b"\n")
            finally:
                os.close(write_end)
            paths.append(f"/dev/fd/{read_end}")
            secrets.append(value)
        environment["RESTIC_PASSWORD_FILE"] = paths[0]
        yield environment, pipes, secrets, paths[1:]
    finally:
        for descriptor in pipes:
            os.close(descriptor)


def run_restic(
    repository: Repository,
    argv: list[str],
    *,
    accept_returncodes: Sequence[int] = (0,),
    working_directory: Path | None = None,
    stdout_path: Path | None = None,
    extra_secrets: Sequence[str] = (),
    replace_argument: str | None = None,
    wrapper: Sequence[str] = (),
    on_stdout_record: execute.JsonRecordCallback | None = None,
    with_passphrase: bool = False,
    own_key: OwnKey | None = None,
) -> execute.Completed:
    """Run one restic command for ``repository``, turning its errors into homesafe's.

    ``wrapper``: an argv prefix that restic runs under (a capture view).
    ``on_stdout_record``: called with each JSON line of stdout as it comes.

    The repository is opened with homesafe's own key when it has one
    (:mod:`homesafe.engines.restic_key`), unless ``with_passphrase``; if restic no
    longer accepts that key, it is forgotten and the passphrase is used. ``own_key``:
    open with this key, and with no other (to try a key just made).

    While the repository is locked by another process, stale locks are removed and the
    command is tried again, up to ``repository.lock_wait`` seconds. ``extra_secrets``
    go through further pipes; ``replace_argument`` in ``argv`` becomes the path of the
    first of them.
    """
    deadline = time.monotonic() + repository.lock_wait
    key = None if with_passphrase else own_key or restic_key.load(repository)
    while True:
        try:
            return _run_restic_once(
                repository,
                argv,
                accept_returncodes,
                working_directory,
                stdout_path,
                extra_secrets,
                replace_argument,
                wrapper,
                on_stdout_record,
                key,
            )
        except PassphraseError:
            if key is None or own_key is not None:
                raise
            # Removed from the repository (`restic key remove`), or the repository at
            # the location is another: the passphrase opens it as before the key was made.
            logger.warning(
                "homesafe's own key %s no longer opens repository %r: forgotten, and none "
                "is made again until the repository is added again; the passphrase opens "
                "it (each restic call derives its key again, ~0.5 s)",
                key.key_id[:8],
                repository.name,
            )
            restic_key.decline(repository)
            key = None
        except RepositoryLockedError as error:
            if time.monotonic() >= deadline:
                raise RepositoryLockedError(
                    f"repository {repository.name!r} is locked by another process "
                    f"({describe_lock(error.message)}); waited {repository.lock_wait:g} s",
                    hint=locked_hint(repository, error.message),
                ) from error
            if argv[1] != "unlock":
                # Removes stale locks only: a live holder's lock stays.
                _run_restic_once(
                    repository, unlock_argv(repository), (0,), None, None, (), None, key=key
                )
            time.sleep(min(LOCK_RETRY_SECONDS, max(0.0, deadline - time.monotonic())))


def describe_lock(text: str) -> str:
    match = re.search(r"locked (?:exclusively )?by PID (\d+) on (\S+) by (\S+)", text)
    if not match:
        return "holder unknown"
    since = re.search(r"lock was created at ([^(\n]+)", text)
    described = f"pid {match[1]} on {match[2]}, user {match[3]}"
    return described + (f", since {since[1].strip()}" if since else "")


def locked_hint(repository: Repository, text: str) -> str:
    """What to do about a lock that outlasted the wait. A lock of this host that is
    still there has a live holder (``restic unlock`` removed it otherwise): wait. One of
    another host is removed by restic once that host has not refreshed it for 30
    minutes, or by the user, once sure."""
    match = re.search(r"locked (?:exclusively )?by PID \d+ on (\S+)", text)
    if match is None or match[1] == locations.hostname():
        return HINTS[RepositoryLockedError]
    return (
        f"{HINTS[RepositoryLockedError]} The lock was taken on {match[1]}: restic removes "
        "it once it has not been refreshed for 30 minutes (a running restic refreshes its "
        f"lock every 5 minutes); once you are sure no process on {match[1]} uses the repository, "
        f"`homesafe repo break-lock {repository.name}` removes it now."
    )


def _run_restic_once(
    repository: Repository,
    argv: list[str],
    accept_returncodes: Sequence[int],
    working_directory: Path | None,
    stdout_path: Path | None,
    extra_secrets: Sequence[str],
    replace_argument: str | None,
    wrapper: Sequence[str] = (),
    on_stdout_record: execute.JsonRecordCallback | None = None,
    key: OwnKey | None = None,
) -> execute.Completed:
    removed = ["RESTIC_PASSWORD", "RESTIC_PASSWORD_COMMAND", "RESTIC_PASSWORD_FILE"]
    if repository.passphrase_environment:
        removed.append(repository.passphrase_environment)
    if key is not None:
        # restic tries the hinted key first; without the hint it may try the
        # passphrase's (half a second) before it. Before -r: after the subcommand's words.
        position = argv.index("-r")
        argv = [*argv[:position], "--key-hint", key.key_id, *argv[position:]]
    with password_pipes(repository, extra_secrets, key) as (environment, fds, secrets, paths):
        if on_stdout_record is not None:
            environment["RESTIC_PROGRESS_FPS"] = PROGRESS_FPS_SHOWN
        if replace_argument is not None:
            argv = [paths[0] if part == replace_argument else part for part in argv]
        try:
            completed = execute.run(
                [*wrapper, *argv],
                environment=environment,
                # The caller's, not ours (execute removes after adding).
                remove_environment=[name for name in removed if name not in environment],
                pass_fds=fds,
                secrets=secrets,
                accept_returncodes=accept_returncodes,
                working_directory=working_directory,
                stdout_path=stdout_path,
                on_stdout_record=on_stdout_record,
            )
        except CommandError as error:
            raise classify(error, repository) from error
    # A code the caller accepts (check's 1: damage found) may still mean "locked".
    if completed.returncode != 0 and LOCKED.search(completed.stderr):
        raise RepositoryLockedError(completed.stderr.strip(), hint=HINTS[RepositoryLockedError])
    return completed


def classify(error: CommandError, repository: Repository) -> EngineError:
    """The homesafe error for a failed restic call."""
    text = error.stderr_tail
    location = repository.parsed_location
    if location.uses_ssh:
        remote = classify_ssh_failure(text, repository)
        if remote is None and re.search(r"sftp|ssh", text, re.I) and "locked" not in text:
            remote = diagnose_ssh(repository)
        if remote is not None:
            return remote
    error_class: type[EngineError] = EngineError
    for pattern, candidate in ERRORS_BY_TEXT:
        if pattern.search(text):
            error_class = candidate
            break
    summary = {
        RepositoryNotFoundError: f"no restic repository at {repository.location}",
        PassphraseError: f"wrong passphrase for repository {repository.name!r}",
        RepositoryExistsError: f"a repository exists already at {repository.location}",
        RepositoryLockedError: f"repository {repository.name!r} is locked",
        ArchiveNotFoundError: f"no such archive in repository {repository.name!r}",
        HostUnreachableError: f"cannot reach {location.address}",
        AuthenticationRefusedError: f"{location.address} refused the access key",
    }.get(error_class, f"restic failed on repository {repository.name!r}")
    detail = text.strip() or error.message
    return error_class(f"{summary}: {detail}", hint=HINTS.get(error_class))


# Status lines a second while a progress bar is shown.
PROGRESS_FPS_SHOWN = "20"


def backup_progress(
    on_progress: ProgressCallback | None,
) -> execute.JsonRecordCallback | None:
    """A handler of ``restic backup --json`` output lines turning its status lines
    (PROGRESS_FPS_SHOWN a second) into Progress; None without ``on_progress``."""
    if on_progress is None:
        return None
    report = on_progress

    def on_record(record: dict[str, Any]) -> None:
        if record.get("message_type") != "status":
            return
        total = record.get("total_bytes")
        current = record.get("current_files") or [""]
        report(
            Progress(
                "create",
                current=float(record.get("bytes_done", 0) or 0),
                total=float(total) if total else None,
                message=str(current[-1]),
            )
        )

    return on_record


def _json_lines(text: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of ``text``'s lines that hold one; other lines are skipped."""
    lines = [line for line in text.splitlines() if line.startswith("{")]
    try:
        # One parse of them all: a listing has a line for each of many thousands of
        # entries, and one call of the parser costs less than one a line (by a third).
        values = json.loads(f"[{','.join(lines)}]")
    except ValueError:
        values = []
        for line in lines:
            try:
                values.append(json.loads(line))
            except ValueError:
                continue
    for value in values:
        if isinstance(value, dict):
            yield value


class ResticEngine:
    """:class:`homesafe.engines.base.Engine` on restic 0.14 and later."""

    name = "restic"
    # `restic restore` already uses every core.
    extract_concurrency = 1

    def __init__(self) -> None:
        # Per archive, keyed by (location, name): its snapshot's full id once a listing
        # told it.
        self._snapshot_ids: dict[tuple[str, str], str] = {}

    def repository_exists(self, repository: Repository) -> bool:
        """Local: the repository's files are there. Remote: restic opens it (a wrong
        passphrase still proves it exists)."""
        if not repository.is_remote:
            location = Path(repository.location)
            return (location / "config").is_file() and (location / "keys").is_dir()
        try:
            run_restic(repository, cat_config_argv(repository))
        except RepositoryNotFoundError:
            return False
        except PassphraseError:
            return True
        return True

    def initialize(self, repository: Repository) -> None:
        run_restic(repository, init_argv(repository), with_passphrase=True)
        # A new repository holds no snapshot: its first backup needs no listing.
        remember_listing(repository, [])
        self.attach(repository)

    def attach(self, repository: Repository) -> None:
        """Give homesafe a key of its own to the repository
        (:mod:`homesafe.engines.restic_key`) when its passphrase is kept in a file and
        homesafe has none there yet, nor was refused one. A key that cannot be made or
        written, or that restic does not accept, is logged and left out: the passphrase
        still opens the repository (and the next backup tries again)."""
        if (
            not restic_key.wanted(repository)
            or restic_key.load(repository) is not None
            or restic_key.declined(repository)
        ):
            return
        try:
            master_key = run_restic(
                repository, cat_masterkey_argv(repository), with_passphrase=True
            ).stdout
            self._add_own_key(repository, master_key)
        except (EngineError, OSError) as error:
            logger.warning(
                "homesafe could not add a key of its own to repository %r (%s); the "
                "passphrase opens it, at the cost of a key derivation (~0.5 s) per call",
                repository.name,
                error,
            )

    def _add_own_key(self, repository: Repository, master_key: str) -> OwnKey:
        """Write a new own key into the repository, check that restic opens the
        repository with it, and keep its password (only then)."""
        key, content = restic_key.new_key(repository, master_key)
        restic_key.put(repository, key.key_id, content)
        try:
            run_restic(repository, cat_config_argv(repository), own_key=key)
        except BaseException:
            with suppress(EngineError, OSError):
                restic_key.delete(repository, key.key_id)
            raise
        restic_key.save(repository, key)
        return key

    def snapshots(self, repository: Repository) -> list[dict[str, Any]]:
        """Every snapshot as restic describes it, oldest first."""
        listed = json.loads(run_restic(repository, snapshots_argv(repository)).stdout or "[]")
        return sorted(listed or [], key=lambda snapshot: str(snapshot.get("time", "")))

    def snapshot(self, repository: Repository, archive_name: str) -> dict[str, Any]:
        """The snapshot of one archive; ArchiveNotFoundError when there is none."""
        try:
            listed = json.loads(
                run_restic(repository, snapshots_argv(repository, archive_name)).stdout or "[]"
            )
        except ArchiveNotFoundError:
            listed = []
        if not listed:
            raise ArchiveNotFoundError(
                f"no archive {archive_name} in repository {repository.name!r}",
                hint=HINTS[ArchiveNotFoundError],
            )
        return dict(listed[-1])

    def _snapshots_for_create(
        self, repository: Repository, archive_name: str
    ) -> list[dict[str, Any]]:
        """Every snapshot, after making sure none bears ``archive_name`` already."""
        existing = self.snapshots(repository)
        if any(snapshot_name(snapshot) == archive_name for snapshot in existing):
            raise ArchiveExistsError(
                f"an archive named {archive_name} exists already in {repository.name!r}"
            )
        return existing

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
        """One ``restic backup``, with the parent (the snapshot whose files are compared
        with the disk, so that unchanged files are not read) taken from the snapshots
        this host remembers writing. A listing of the repository comes first only when
        it is needed: to refuse a name that may exist already (one not read from the
        clock, see :func:`homesafe.archives.from_the_clock`), to learn the snapshots of
        a repository this host has no record of, or when the remembered parent is gone.
        """
        absolute = [path for path in paths if path.startswith("/")]
        remembered = remembered_snapshots(repository)
        written_here = (restic_location(repository), archive_name) in _WRITTEN
        trusted_name = archives.from_the_clock(archive_name) and not written_here
        listed = None
        if remembered is None or not trusted_name:
            listed = self._snapshots_for_create(repository, archive_name)
            remembered = remember_listing(repository, listed)
        parent = choose_parent(listed if listed is not None else remembered, absolute)

        def backup(parent: str | None) -> execute.Completed:
            return run_restic(
                repository,
                backup_argv(
                    repository,
                    paths,
                    archive_tags(archive_name, comment),
                    parent=parent,
                    timestamp=timestamp,
                    view=view,
                ),
                accept_returncodes=(0, INCOMPLETE_SNAPSHOT),
                working_directory=working_directory,
                wrapper=view.wrapper if view is not None else (),
                on_stdout_record=backup_progress(on_progress),
            )

        try:
            completed = backup(parent)
        except ArchiveNotFoundError:
            if listed is not None or parent is None:
                raise
            # The remembered parent was deleted (by another host, or restic itself):
            # restic refused it before reading anything.
            forget_remembered(repository, [parent])
            listed = self._snapshots_for_create(repository, archive_name)
            remember_listing(repository, listed)
            completed = backup(choose_parent(listed, absolute))
        summary: dict[str, Any] = {}
        for record in _json_lines(completed.stdout):
            if record.get("message_type") == "summary":
                summary = record
        _WRITTEN.add((restic_location(repository), archive_name))
        if summary.get("snapshot_id"):
            remember_snapshot(repository, str(summary["snapshot_id"]), absolute)
        warnings = read_warnings(completed.stderr)
        if on_progress is not None:
            done = float(summary.get("total_bytes_processed", 0))
            on_progress(Progress("create", current=done, total=done, finished=True))
        return ArchiveStats(
            name=archive_name,
            original_size=int(summary.get("total_bytes_processed", 0)),
            compressed_size=int(summary.get("data_added", 0)),
            deduplicated_size=int(summary.get("data_added", 0)),
            file_count=int(summary.get("total_files_processed", 0)),
            duration=float(summary.get("total_duration", 0.0)),
            warnings=warnings,
            archive_id=str(summary.get("snapshot_id") or ""),
        )

    def list_archives(self, repository: Repository) -> list[ArchiveSummary]:
        return [
            ArchiveSummary(
                name=snapshot_name(snapshot),
                id=str(snapshot["id"]),
                time=str(snapshot.get("time", "")),
                comment=decode_comment(tag_value(snapshot.get("tags"), COMMENT_TAG) or ""),
            )
            for snapshot in self.snapshots(repository)
        ]

    def list_contents(
        self,
        repository: Repository,
        archive_name: str,
        paths: Sequence[str] = (),
        *,
        times: bool = False,
    ) -> list[ArchiveEntry]:
        key = (restic_location(repository), archive_name)
        completed = run_restic(repository, ls_argv(repository, archive_name))
        stored = stored_members([])
        entries = []
        wanted = within(path.strip("/") for path in paths) if paths else None
        for record in _json_lines(completed.stdout):
            if record.get("struct_type") == "snapshot":
                stored = stored_members(list(record.get("paths") or []))
                if record.get("id"):
                    self._snapshot_ids[key] = str(record["id"])
                continue
            path = str(record.get("path", "")).lstrip("/")
            if not path or not stored(path):
                continue
            if wanted is not None and not wanted(path):
                continue
            entries.append(
                ArchiveEntry(
                    path=path,
                    type=ENTRY_TYPES.get(str(record.get("type")), "?"),
                    mode=str(record.get("permissions", "")),
                    size=int(record.get("size", 0) or 0),
                    user=str(record.get("uid", "")),
                    group=str(record.get("gid", "")),
                    link_target=str(record.get("linktarget", "")),
                    # restic prints them whatever is asked (RFC 3339, to the nanosecond).
                    mtime=str(record.get("mtime", "")) if times else "",
                    ctime=str(record.get("ctime", "")) if times else "",
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
        excludes: Sequence[str] = (),
    ) -> list[str]:
        """``restic restore`` of ``paths``; the snapshot is named by its id once a
        listing (by this engine object) told it, so that what is extracted is what was
        listed. ``excludes`` are refused: `restic restore` takes includes or excludes,
        not both (homesafe asks for none: see ``extract_concurrency``)."""
        if excludes:
            raise EngineError(
                "restic cannot restore paths while leaving some of what lies below them "
                f"out ({', '.join(excludes[:3])}): its --include and --exclude do not mix"
            )
        snapshot = self._snapshot_ids.get((restic_location(repository), archive_name), archive_name)
        run_restic(repository, restore_argv(repository, snapshot, paths, target_root))
        if on_progress is not None:
            on_progress(Progress("extract", current=None, finished=True))
        return []

    def delete(self, repository: Repository, archive_names: Sequence[str]) -> None:
        if not archive_names:
            return
        by_name = {snapshot_name(snapshot): snapshot for snapshot in self.snapshots(repository)}
        missing = [name for name in archive_names if name not in by_name]
        if missing:
            raise ArchiveNotFoundError(
                f"no archive {', '.join(missing)} in repository {repository.name!r}; "
                "nothing was deleted",
                hint=HINTS[ArchiveNotFoundError],
            )
        snapshot_ids = [str(by_name[name]["id"]) for name in archive_names]
        run_restic(repository, forget_argv(repository, snapshot_ids))
        forget_remembered(repository, snapshot_ids)
        run_restic(repository, prune_argv(repository))

    def export_tar(
        self, repository: Repository, archive_name: str, file: Path, paths: Sequence[str] = ()
    ) -> None:
        """``restic dump`` of the whole snapshot, rewritten as borg's export-tar would
        write it: stored members only, ``paths`` selected, compressed by suffix."""
        snapshot = self.snapshot(repository, archive_name)
        stored = stored_members(list(snapshot.get("paths") or []))
        wanted = within(path.strip("/") for path in paths) if paths else None
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".homesafe-dump-", dir=file.parent) as scratch:
            dumped = Path(scratch) / "dump.tar"
            run_restic(repository, dump_argv(repository, str(snapshot["id"])), stdout_path=dumped)
            partial = Path(scratch) / file.name
            with tarfile.open(dumped, "r:") as source, _open_output(partial) as output:
                for member in source:
                    name = member.name.lstrip("/").rstrip("/")
                    if not name or not stored(name):
                        continue
                    if wanted is not None and not wanted(name):
                        continue
                    member.name = name
                    output.addfile(member, source.extractfile(member) if member.isfile() else None)
            os.replace(partial, file)

    def export_key(self, repository: Repository) -> str:
        """The key file the passphrase opens (JSON, encrypted by the passphrase): with
        it, the passphrase opens the repository even if its keys/ directory is lost."""
        keys = json.loads(
            run_restic(repository, key_list_argv(repository), with_passphrase=True).stdout or "[]"
        )
        current = next((key for key in keys if key.get("current")), None)
        if current is None:
            raise EngineError(f"restic did not say which key opens {repository.name!r}")
        # `key list` shows short ids only; `cat key` wants the whole one.
        listed = run_restic(repository, list_keys_argv(repository)).stdout.split()
        full = next((key for key in listed if key.startswith(str(current["id"]))), None)
        if full is None:
            raise EngineError(f"restic lists no key {current['id']} in {repository.name!r}")
        return run_restic(repository, cat_key_argv(repository, full)).stdout

    def repository_info(self, repository: Repository) -> RepositoryInfo:
        stats = json.loads(run_restic(repository, stats_argv(repository)).stdout or "{}")
        listed = self.snapshots(repository)
        return RepositoryInfo(
            archive_count=len(listed),
            last_archive_time=str(listed[-1].get("time", "")) if listed else "",
            stored_size=int(stats.get("total_size", 0)),
            original_size=int(stats.get("total_uncompressed_size", stats.get("total_size", 0))),
            encryption=repository.encryption,
        )

    def check(
        self,
        repository: Repository,
        *,
        verify_data: bool = False,
        sample_percent: float | None = None,
    ) -> CheckReport:
        """``restic check``; damaged packs are traced to the snapshots and files that
        use them with ``restic find --pack``."""
        started = time.monotonic()
        completed = run_restic(
            repository,
            check_argv(repository, verify_data=verify_data, sample_percent=sample_percent),
            accept_returncodes=(0, 1),
        )
        problems = [
            line.strip()
            for line in (completed.stdout + "\n" + completed.stderr).splitlines()
            if line.strip() and not CHECK_CHATTER.search(line)
        ]
        ok = completed.returncode == 0 and not problems
        affected: list[str] = []
        if not ok:
            packs = damaged_packs(problems)
            if packs:
                affected, files = self._trace_packs(repository, packs)
                problems += [f"affected: {name}: {path}" for name, path in files]
        if sample_percent is not None and not verify_data:
            verified = f"{sample_percent:g}%"
        else:
            verified = "all" if verify_data else "none"
        return CheckReport(
            ok=ok,
            verified_data=verified,
            problems=problems,
            affected_archives=affected,
            duration=time.monotonic() - started,
        )

    def _trace_packs(
        self, repository: Repository, packs: Sequence[str]
    ) -> tuple[list[str], list[tuple[str, str]]]:
        """The archives, and (archive, file) pairs, that use blobs of ``packs``."""
        try:
            found = json.loads(
                run_restic(
                    repository, find_pack_argv(repository, packs), accept_returncodes=(0, 1)
                ).stdout
                or "[]"
            )
            names = {
                str(snapshot["id"]): snapshot_name(snapshot)
                for snapshot in self.snapshots(repository)
            }
        except (EngineError, ValueError):
            return [], []
        archives_found: list[str] = []
        files: list[tuple[str, str]] = []
        for item in found if isinstance(found, list) else []:
            name = names.get(str(item.get("snapshot")), str(item.get("snapshot", ""))[:8])
            if name not in archives_found:
                archives_found.append(name)
            pair = (name, str(item.get("path", "")))
            if pair not in files:
                files.append(pair)
        return archives_found, files

    def prune(
        self, repository: Repository, policy: RetentionPolicy, *, dry_run: bool = False
    ) -> PruneReport:
        """``restic forget`` by ``policy`` (one group: the whole repository), then
        ``restic prune`` to give the space back."""
        if not policy.keeps_anything:
            raise EngineError("a retention policy that keeps nothing would delete every archive")
        groups = json.loads(
            run_restic(repository, forget_policy_argv(repository, policy, dry_run=dry_run)).stdout
            or "[]"
        )
        kept: list[str] = []
        removed: list[str] = []
        removed_ids: list[str] = []
        for group in groups or []:
            kept += [snapshot_name(snapshot) for snapshot in group.get("keep") or []]
            removed += [snapshot_name(snapshot) for snapshot in group.get("remove") or []]
            removed_ids += [str(snapshot.get("id")) for snapshot in group.get("remove") or []]
        if removed and not dry_run:
            forget_remembered(repository, removed_ids)
            run_restic(repository, prune_argv(repository))
        return PruneReport(kept=kept, removed=removed, dry_run=dry_run)

    def import_key(self, repository: Repository, file: Path) -> None:
        raise UsageError(
            "restic has no key import: its keys live in the repository, opened by the passphrase",
            hint="Restore the repository's keys/ directory from the file `homesafe key "
            "export` printed, or give the passphrase a key of the repository accepts.",
        )

    def change_passphrase(self, repository: Repository, new_passphrase: str) -> None:
        """``restic key passwd`` on the passphrase's key; then homesafe's own key, if it
        has one, is replaced by a new one under a new password, so that a change made
        because secrets leaked leaves no old password that opens the repository."""
        marker = "\0new-password-file\0"
        run_restic(
            repository,
            key_passwd_argv(repository, marker),
            extra_secrets=[new_passphrase],
            replace_argument=marker,
            with_passphrase=True,
        )
        old = restic_key.load(repository)
        if old is not None:
            self._replace_own_key(repository, old)

    def _replace_own_key(self, repository: Repository, old: OwnKey) -> None:
        """A new own key in place of ``old``. The passphrase has changed by now: a
        failure here is logged, not raised, for the caller to keep the new passphrase;
        the old key still opens the repository until it is removed."""
        try:
            master_key = run_restic(repository, cat_masterkey_argv(repository), own_key=old).stdout
            new = self._add_own_key(repository, master_key)
        except (EngineError, OSError) as error:
            logger.warning(
                "homesafe kept its own key %s to repository %r: no new one could be made (%s)",
                old.key_id[:8],
                repository.name,
                error,
            )
            return
        try:
            # restic refuses to remove the key it was opened with: opened with the new one.
            run_restic(repository, key_remove_argv(repository, old.key_id), own_key=new)
        except EngineError as error:
            logger.warning(
                "homesafe's former key %s is still in repository %r (%s): `restic key "
                "remove %s` removes it",
                old.key_id[:8],
                repository.name,
                error,
                old.key_id,
            )

    def break_lock(self, repository: Repository) -> None:
        run_restic(repository, unlock_argv(repository, remove_all=True))

    def destroy(self, repository: Repository) -> None:
        """Delete a local restic repository (restic has no command for it)."""
        if repository.is_remote:
            raise UsageError(
                f"homesafe cannot delete the remote restic repository {repository.location}",
                hint="Delete it on the server or in the bucket; `homesafe repo remove` "
                "without --delete-data forgets it here.",
            )
        location = Path(repository.location)
        if not self.repository_exists(repository) or not (location / "data").is_dir():
            raise RepositoryNotFoundError(f"no restic repository at {location}")
        shutil.rmtree(location)


ENTRY_TYPES = {
    "dir": "d",
    "file": "-",
    "symlink": "l",
    "dev": "b",
    "chardev": "c",
    "fifo": "p",
    "socket": "s",
}

# Lines of ``restic check`` that report progress, not problems.
CHECK_CHATTER = re.compile(
    r"^(using temporary cache|create exclusive lock|load indexes|check all packs|"
    r"check snapshots, trees and blobs|read all data|read \d+/\d+ of data|"
    r"read .* of data packs|\[\d+:\d+\]|no errors were found|created new cache|"
    r"Fatal: repository contains errors|$)"
)


# How `restic check` names a damaged pack: its stored id (the file name).
DAMAGED_PACK = re.compile(
    r"Pack ID does not match, want ([0-9a-f]{64})|pack ([0-9a-f]{64})[: ]|"
    r"pack file ([0-9a-f]{64})|([0-9a-f]{64}): .*(?:ciphertext|checksum|hash)"
)


def damaged_packs(problems: Sequence[str]) -> list[str]:
    """The ids of the packs ``restic check`` found damaged, in order of mention."""
    found: list[str] = []
    for problem in problems:
        for match in DAMAGED_PACK.finditer(problem):
            pack = next(group for group in match.groups() if group)
            if pack not in found:
                found.append(pack)
    return found


def read_warnings(stderr: str) -> list[str]:
    """``PATH: message`` for each file restic could not read (JSON or text form)."""
    warnings = []
    for line in stderr.splitlines():
        record = None
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
        if isinstance(record, dict) and record.get("message_type") == "error":
            error = record.get("error")
            message = error.get("message", "") if isinstance(error, dict) else str(error)
            warnings.append(f"{record.get('item', '')}: {message}")
        elif line.startswith("error: "):
            warnings.append(line[len("error: ") :])
    return warnings


def choose_parent(snapshots: Sequence[dict[str, Any]], absolute_paths: Sequence[str]) -> str | None:
    """The snapshot restic should compare files with: the newest one holding every
    path of this backup, else the newest sharing any. restic's own choice needs the very
    same path list, and homesafe's metadata directory differs every time."""
    wanted = set(absolute_paths)
    if not wanted:
        return None
    covering = [s for s in snapshots if wanted <= set(s.get("paths") or [])]
    sharing = [s for s in snapshots if wanted & set(s.get("paths") or [])]
    candidates = covering or sharing
    return str(candidates[-1]["id"]) if candidates else None


# -- the snapshots this host wrote, remembered between runs ---------------------------
#
# Choosing a parent needs the repository's snapshots, and a listing costs a restic
# process (its key derivation alone takes some 0.5 s; over S3 or sftp, round trips
# too). restic's own choice needs the very same path list every time, and homesafe's
# metadata directory differs every time. So each backup records the snapshot it wrote
# (id and absolute paths) in $HOMESAFE_HOME/restic-snapshots/<repository>.json, and the
# next backup takes its parent from there. The record only ever names a parent: a
# stale one costs speed (restic refuses an id it does not find, before reading
# anything; the backup then lists and tries again), never an archive's content.

SNAPSHOT_RECORDS_KEPT = 64
# (location, archive name) of every snapshot this process wrote: a name from the clock
# is trusted once per repository only.
_WRITTEN: set[tuple[str, str]] = set()


def snapshot_records_file(repository: Repository) -> Path | None:
    """Where the snapshots of ``repository`` are remembered; None for a name that
    cannot be a file name (a repository that was never registered)."""
    if not NAME_PATTERN.fullmatch(repository.name):
        return None
    return locations.home() / "restic-snapshots" / f"{repository.name}.json"


def remembered_snapshots(repository: Repository) -> list[dict[str, Any]] | None:
    """The snapshots remembered for ``repository`` (``id`` and absolute ``paths``),
    oldest first; None when there is no record of this very location."""
    file = snapshot_records_file(repository)
    if file is None:
        return None
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("location") != restic_location(repository):
        return None
    snapshots = record.get("snapshots")
    if not isinstance(snapshots, list):
        return None
    return [
        {"id": str(item["id"]), "paths": [str(path) for path in item["paths"]]}
        for item in snapshots
        if isinstance(item, dict) and item.get("id") and isinstance(item.get("paths"), list)
    ]


def remember_listing(
    repository: Repository, snapshots: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Replace the record of ``repository`` with ``snapshots`` (a whole listing,
    oldest first) and return what was kept."""
    records: list[dict[str, Any]] = []
    for snapshot in snapshots:
        records = _with_record(records, str(snapshot["id"]), snapshot.get("paths") or [])
    _write_records(repository, records)
    return records


def remember_snapshot(repository: Repository, snapshot_id: str, paths: Sequence[str]) -> None:
    """Add the snapshot a backup just wrote to the record of ``repository``, if there is
    one: a new record would hide the snapshots written before."""
    records = remembered_snapshots(repository)
    if records is not None:
        _write_records(repository, _with_record(records, snapshot_id, paths))


def forget_remembered(repository: Repository, snapshot_ids: Sequence[str]) -> None:
    """Drop deleted snapshots from the record of ``repository``."""
    records = remembered_snapshots(repository)
    if records is not None:
        gone = set(snapshot_ids)
        _write_records(repository, [record for record in records if record["id"] not in gone])


def _with_record(
    records: list[dict[str, Any]], snapshot_id: str, paths: Sequence[str]
) -> list[dict[str, Any]]:
    """``records`` with the snapshot added as the newest. Only the newest snapshot of
    each set of apps' paths can be a parent, so older ones of the same set go."""
    # The metadata directory's absolute path is new each time: it tells nothing.
    kept = sorted(
        str(path)
        for path in paths
        if str(path).startswith("/") and not str(path).endswith("/" + archives.METADATA_DIRECTORY)
    )
    others = [record for record in records if record["paths"] != kept]
    return [*others, {"id": snapshot_id, "paths": kept}][-SNAPSHOT_RECORDS_KEPT:]


def _write_records(repository: Repository, records: list[dict[str, Any]]) -> None:
    """Best effort: a record that cannot be written only costs the next backup a
    listing."""
    file = snapshot_records_file(repository)
    if file is None:
        return
    document = {"location": restic_location(repository), "snapshots": records}
    temporary: str | None = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Written aside and renamed: two backups at once leave one whole record.
        with tempfile.NamedTemporaryFile(
            "w", dir=file.parent, prefix=f".{file.name}.", delete=False
        ) as handle:
            temporary = handle.name
            json.dump(document, handle)
        os.replace(temporary, file)
    except OSError:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)


def _open_output(file: Path) -> tarfile.TarFile:
    """A tar file open for writing, compressed as the name's suffix says."""
    compression = TAR_MODES.get(file.suffix, "")
    if compression == "gz":
        return tarfile.open(file, "w:gz", format=tarfile.PAX_FORMAT)
    if compression == "bz2":
        return tarfile.open(file, "w:bz2", format=tarfile.PAX_FORMAT)
    if compression == "xz":
        return tarfile.open(file, "w:xz", format=tarfile.PAX_FORMAT)
    return tarfile.open(file, "w", format=tarfile.PAX_FORMAT)
