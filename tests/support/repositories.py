"""Local repositories of either engine for tests, created for real."""

from __future__ import annotations

from pathlib import Path

from homesafe import api, repositories
from homesafe.repositories import Repository


def local_repository(name: str, engine: str, location: Path, lock_wait: float = 5) -> Repository:
    """A new, initialised repository of ``engine`` at ``location`` (not registered),
    with a generated passphrase in homesafe's secrets directory."""
    repository = Repository(
        name=name,
        location=str(location),
        engine=engine,
        encryption=repositories.DEFAULT_ENCRYPTIONS[engine],
        passphrase_file=repositories.passphrase_file_for(name),
        compression=repositories.DEFAULT_COMPRESSIONS[engine],
        lock_wait=lock_wait,
    )
    assert api.initialize_repository(repository) is True
    return repository
