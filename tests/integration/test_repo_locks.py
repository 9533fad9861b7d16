"""Repository locks with real borg and restic processes: a live lock is waited for up to
the repository's lock_wait and then named in a clear error; a lock left by a dead
process is cleared and the command goes on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homesafe import api
from homesafe.engines import borg
from homesafe.errors import RepositoryLockedError
from homesafe.repositories import Repository
from tests.conftest import requires_program
from tests.support import repositories as support

pytestmark = [requires_program("borg"), requires_program("restic")]


def local_repository(engine: str, location: Path, lock_wait: float) -> Repository:
    return support.local_repository(engine, engine, location, lock_wait)


def engine_environment(repository: Repository, home: Path) -> dict[str, str]:
    """The environment a raw borg or restic needs to open ``repository``."""
    passphrase = repository.passphrase() or ""
    return {
        **os.environ,
        "BORG_PASSPHRASE": passphrase,
        "BORG_BASE_DIR": str(home / "borg"),
        "RESTIC_PASSWORD": passphrase,
        "RESTIC_CACHE_DIR": str(home / "restic-cache"),
    }


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; each is ended and reaped at the end, zombies included."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        if process.stdin is not None:
            process.stdin.close()


def wait_for(condition: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def borg_lock_holder(
    repository: Repository, home: Path, seconds: float, processes: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """A real ``borg with-lock`` holding the repository's exclusive lock."""
    process = subprocess.Popen(
        ["borg", "with-lock", repository.location, "sleep", str(seconds)],
        env=engine_environment(repository, home),
        start_new_session=True,
    )
    processes.append(process)
    lock = Path(repository.location) / "lock.exclusive"
    wait_for(lambda: lock.is_dir() and any(lock.iterdir()), "borg's lock")
    return process


def test_borg_waits_for_a_live_lock_then_names_its_holder(
    homesafe_env: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    home = homesafe_env / "home"
    repository = local_repository("borg", tmp_path / "repository", lock_wait=2)
    holder = borg_lock_holder(repository, home, 8, processes)

    started = time.monotonic()
    with pytest.raises(RepositoryLockedError) as raised:
        api.list_archives(repository)

    assert time.monotonic() - started >= 2
    assert f"pid {holder.pid} on this host" in raised.value.message
    assert "waited 2 s" in raised.value.message
    assert holder.poll() is None  # a live holder's lock is never broken


def test_borg_gets_the_lock_when_the_holder_finishes_within_the_wait(
    homesafe_env: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    repository = local_repository("borg", tmp_path / "repository", lock_wait=20)
    borg_lock_holder(repository, homesafe_env / "home", 2, processes)

    started = time.monotonic()
    assert api.list_archives(repository) == []

    assert time.monotonic() - started >= 1


def stale_borg_lock(repository: Repository, pid: int) -> None:
    """Leave the lock a borg killed with SIGKILL leaves: its files, naming ``pid``."""
    host = borg.borg_host_id()
    location = Path(repository.location)
    (location / "lock.exclusive").mkdir()
    (location / "lock.exclusive" / f"{host}.{pid}-0").touch()
    (location / "lock.roster").write_text(json.dumps({"exclusive": [[host, pid, 0]]}))


def test_borg_lock_of_a_dead_process_is_cleared(homesafe_env: Path, tmp_path: Path) -> None:
    repository = local_repository("borg", tmp_path / "repository", lock_wait=5)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale_borg_lock(repository, dead.pid)

    assert api.list_archives(repository) == []

    assert not (Path(repository.location) / "lock.exclusive").exists()


def test_borg_lock_of_a_zombie_is_cleared_by_homesafe(
    homesafe_env: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """A killed process nobody reaped is dead, but borg's own check (kill -0) takes it
    for alive and would wait for ever; homesafe reads /proc and breaks the lock."""
    repository = local_repository("borg", tmp_path / "repository", lock_wait=1)
    zombie = subprocess.Popen(["sleep", "60"], start_new_session=True)
    processes.append(zombie)
    os.kill(zombie.pid, signal.SIGKILL)
    wait_for(
        lambda: Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
        "the zombie",
    )
    stale_borg_lock(repository, zombie.pid)

    assert api.list_archives(repository) == []

    assert not (Path(repository.location) / "lock.exclusive").exists()


def restic_lock_holder(
    repository: Repository, home: Path, processes: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """A real ``restic backup --stdin`` that holds its (shared) lock until its stdin
    closes."""
    process = subprocess.Popen(
        ["restic", "-r", repository.location, "backup", "--stdin", "--stdin-filename", "x"],
        env=engine_environment(repository, home),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    processes.append(process)
    locks = Path(repository.location) / "locks"
    wait_for(lambda: any(locks.iterdir()), "restic's lock")
    return process


def test_restic_waits_for_a_live_lock_then_names_its_holder(
    homesafe_env: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    repository = local_repository("restic", tmp_path / "repository", lock_wait=3)
    holder = restic_lock_holder(repository, homesafe_env / "home", processes)

    # Listing shares the lock with a running backup...
    assert api.list_archives(repository) == []
    started = time.monotonic()
    with pytest.raises(RepositoryLockedError) as raised:
        api.check_repository(repository)  # ...checking needs it alone.

    assert time.monotonic() - started >= 3
    assert f"pid {holder.pid} on {socket.gethostname()}" in raised.value.message
    assert "waited 3 s" in raised.value.message
    assert holder.poll() is None
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(timeout=30)


def test_restic_lock_of_a_dead_process_is_cleared(
    homesafe_env: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    repository = local_repository("restic", tmp_path / "repository", lock_wait=10)
    holder = restic_lock_holder(repository, homesafe_env / "home", processes)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert any((Path(repository.location) / "locks").iterdir())  # left behind

    report = api.check_repository(repository)  # needs the exclusive lock

    assert report.ok, report.problems
    assert not any((Path(repository.location) / "locks").iterdir())
