"""Repository records and where their passphrases come from.

This release knows one repository: the embedded default, a borg repository at
``$HOMESAFE_HOME/repository`` encrypted with ``repokey-blake2`` and a generated
passphrase kept in ``$HOMESAFE_HOME/secrets/default.passphrase`` (mode 0600). The
passphrase is read from its file each time it is needed and handed to the engine
through a pipe, never through argv or the state database.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from homesafe import locations
from homesafe.errors import PassphraseError

DEFAULT_NAME = "default"
DEFAULT_ENCRYPTION = "repokey-blake2"


@dataclass(frozen=True)
class Repository:
    """Where archives go: a name, a location, an engine, and a passphrase source."""

    name: str
    location: str
    engine: str = "borg"
    encryption: str = DEFAULT_ENCRYPTION
    passphrase_file: Path | None = None
    compression: str = "zstd,3"

    def passphrase(self) -> str | None:
        """The passphrase, or None for an unencrypted repository."""
        if self.encryption == "none":
            return None
        if self.passphrase_file is None:
            raise PassphraseError(f"no passphrase is configured for repository {self.name!r}")
        try:
            return self.passphrase_file.read_text().rstrip("\n")
        except FileNotFoundError:
            raise PassphraseError(
                f"the passphrase file of repository {self.name!r} is missing: "
                f"{self.passphrase_file}",
                hint="Restore it from your key export (`homesafe key export` printed it).",
            ) from None
        except OSError as error:
            raise PassphraseError(
                f"cannot read the passphrase file {self.passphrase_file}: {error.strerror}"
            ) from None


def default_passphrase_file() -> Path:
    return locations.secrets_directory() / f"{DEFAULT_NAME}.passphrase"


def default_repository() -> Repository:
    """The embedded default repository (nothing is created by this call)."""
    return Repository(
        name=DEFAULT_NAME,
        location=str(locations.default_repository()),
        passphrase_file=default_passphrase_file(),
    )


def generate_passphrase(repository: Repository) -> None:
    """Give a repository about to be created a new random passphrase (0600 file).

    An existing passphrase file is kept: it may belong to a repository moved away.
    """
    if repository.passphrase_file is None or repository.passphrase_file.exists():
        return
    locations.write_secret_file(repository.passphrase_file, secrets.token_urlsafe(32) + "\n")
