"""Every error homesafe raises on purpose, with the exit status the CLI gives it.

The tree::

    HomesafeError                      exit 1, the root of everything below
    ├── UsageError                     exit 2, the command line itself is wrong
    ├── ConfigurationError             a manifest or setting cannot be used
    │   ├── ManifestError              one or more manifest problems, all listed
    │   └── DependencyError            unknown dependency or a dependency cycle
    ├── AppNotFoundError               an app id nobody declared
    ├── CommandError                   a subprocess could not run or failed
    │   ├── CommandNotFoundError       the program is not installed
    │   └── CommandTimeoutError        it ran longer than allowed and was killed
    ├── EngineError                    the backup engine (borg, restic) failed
    │   ├── RepositoryNotFoundError
    │   ├── RepositoryExistsError
    │   ├── PassphraseError            wrong or missing passphrase
    │   ├── ArchiveNotFoundError
    │   ├── ArchiveExistsError
    │   ├── RepositoryLockedError
    │   └── RemoteAccessError          a remote repository cannot be reached or trusted
    │       ├── HostUnreachableError   wrong name or port, host down, firewall
    │       ├── AuthenticationRefusedError  the server refused homesafe's key
    │       ├── HostKeyChangedError    the host key is not the one trusted before
    │       └── HostKeyUnknownError    the host key was never trusted
    ├── ServiceError                   a service would not stop, start or report
    ├── HookError                      a pre/post hook failed with on_error = "fail"
    ├── OperationLockedError           another backup or restore holds this host's lock
    └── OperationFailedError           a backup or restore in which apps failed

Every class carries a message written for the person at the terminal: what is wrong and,
where we know it, what to do about it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

EXIT_SUCCESS = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


class HomesafeError(Exception):
    """Base class: ``str(error)`` is the message shown to the user."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n{self.hint}"
        return self.message


class UsageError(HomesafeError):
    """The command line asks for something that makes no sense."""

    exit_code = EXIT_USAGE


class ConfigurationError(HomesafeError):
    """Configuration (manifests, settings, repository records) cannot be used."""


@dataclass(frozen=True)
class ManifestProblem:
    """One thing wrong with one manifest: where it is and what it is."""

    source: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: {self.field}" if self.field else self.source
        return f"{where}: {self.message}"


class ManifestError(ConfigurationError):
    """One or more manifests are invalid; ``problems`` lists every one of them."""

    def __init__(self, problems: Sequence[ManifestProblem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        lines = [f"{count} problem{'s' if count != 1 else ''} in app manifests:"]
        lines += [f"  {problem}" for problem in self.problems]
        super().__init__(
            "\n".join(lines), hint="Fix the manifests, then run `homesafe apps check`."
        )


class DependencyError(ConfigurationError):
    """Apps depend on each other in a circle, or on an app that does not exist."""


class AppNotFoundError(HomesafeError):
    """An app id that no manifest declares."""

    exit_code = EXIT_USAGE


class CommandError(HomesafeError):
    """A subprocess failed. ``exit_code`` of the process is in ``returncode``."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        stderr_tail: str = "",
        message_ids: set[str] | None = None,
        hint: str | None = None,
    ) -> None:
        if stderr_tail:
            message = f"{message}\n{stderr_tail.rstrip()}"
        super().__init__(message, hint=hint)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        # The ids of the errors the program logged as JSON (borg's ``msgid``).
        self.message_ids = message_ids or set()


class CommandNotFoundError(CommandError):
    """The program to run is not installed (or not on PATH)."""


class CommandTimeoutError(CommandError):
    """The program ran past its timeout and was killed."""


class EngineError(HomesafeError):
    """The backup engine failed; the message carries the engine's own words."""


class RepositoryNotFoundError(EngineError):
    """No repository at the given location."""


class RepositoryExistsError(EngineError):
    """A repository already exists where one was to be created."""


class PassphraseError(EngineError):
    """The passphrase is wrong or cannot be read."""


class ArchiveNotFoundError(EngineError):
    """The repository holds no archive of that name."""


class ArchiveExistsError(EngineError):
    """An archive of that name exists already."""


class RepositoryLockedError(EngineError):
    """Another process holds the repository lock."""


class RemoteAccessError(EngineError):
    """A remote repository could not be reached or its server not trusted; one
    subclass per thing a person must do something different about."""


class HostUnreachableError(RemoteAccessError):
    """No connection to the host: wrong name or port, host down, firewall."""


class AuthenticationRefusedError(RemoteAccessError):
    """The server refused homesafe's client key (it is not in authorized_keys)."""


class HostKeyChangedError(RemoteAccessError):
    """The server shows a host key other than the one trusted before: stop, look why."""


class HostKeyUnknownError(RemoteAccessError):
    """The server's host key was never trusted (or trusting it was declined)."""


class ServiceError(HomesafeError):
    """A service could not be stopped, started, or asked for its state."""


class HookError(HomesafeError):
    """A hook failed and its app's policy is on_error = "fail"."""


class OperationLockedError(HomesafeError):
    """Another backup, restore, import or verify runs on this host, and it did not
    finish within the time we were told to wait."""


class OperationFailedError(HomesafeError):
    """A backup or restore finished, but not every app succeeded."""
