"""Locks of remote repositories, with real processes: borg over ssh (``borg serve`` behind
a real sshd on 127.0.0.1) and restic on S3 (a real SeaweedFS on 127.0.0.1).

A lock left by a dead process of the host that took it is cleared and the command goes
on. A lock of another host cannot be proven dead: it is waited for, then named in an
error that says how to break it (``homesafe repo break-lock``), and only that breaks it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from homesafe import api, repositories
from homesafe.engines import borg, restic
from homesafe.errors import RepositoryLockedError
from homesafe.repositories import Repository
from tests.conftest import requires_program
from tests.integration.test_repo_locks import engine_environment, processes, wait_for
from tests.support import s3 as s3_support
from tests.support import sshd as sshd_support
from tests.support.s3 import SeaweedS3
from tests.support.sshd import Sshd

__all__ = ["processes"]  # a fixture

pytestmark = [requires_program("borg"), requires_program("restic")]

HOMESAFE = str(Path(sys.executable).parent / "homesafe")
OTHER_HOST = "elsewhere"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    reason = sshd_support.available()
    if reason:
        pytest.skip(reason)
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    reason = s3_support.available()
    if reason:
        pytest.skip(reason)
    server = SeaweedS3(tmp_path_factory.mktemp("weed"))
    server.start()
    yield server
    server.close()


def homesafe(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HOMESAFE, *arguments], capture_output=True, text=True, check=False, timeout=300
    )


# -- borg over ssh ---------------------------------------------------------------------


@pytest.fixture
def borg_over_ssh(homesafe_env: Path, sshd: Sshd, tmp_path: Path) -> Repository:
    """A registered borg repository on the test server, reached over ssh, made by
    homesafe; it waits 2 s for a lock."""
    sshd.authorize(repositories.ensure_client_key())
    key_type, key = sshd.host_key_line().split()
    location = f"ssh://root@127.0.0.1:{sshd.port}{tmp_path / 'remote-borg'}"
    repositories.trust_host(
        repositories.parse_location(location),
        fingerprint=repositories.HostKey("", key_type, key).fingerprint,
    )
    repository = Repository(
        name="offsite",
        location=location,
        engine="borg",
        encryption=repositories.DEFAULT_ENCRYPTIONS["borg"],
        passphrase_file=repositories.passphrase_file_for("offsite"),
        compression=repositories.DEFAULT_COMPRESSIONS["borg"],
        lock_wait=2,
    )
    assert api.initialize_repository(repository) is True
    repositories.register(repository)
    return repositories.get("offsite")


def server_side(repository: Repository) -> Path:
    """The repository's directory as the server sees it (the server is this machine)."""
    return Path(repository.parsed_location.path)


def borg_roster(repository: Repository) -> list[list[object]]:
    roster = json.loads((server_side(repository) / "lock.roster").read_text())
    return list(roster.get("exclusive", []))


def process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_borg_over_ssh_clears_the_lock_of_a_borg_serve_killed_on_the_server(
    borg_over_ssh: Repository, homesafe_env: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """The server crashed mid-command, say: its ``borg serve`` died holding the lock.
    The next ``borg serve`` on that server finds the holder, a process of its own host,
    gone, and removes the lock."""
    repository = borg_over_ssh
    holder = subprocess.Popen(
        ["borg", "with-lock", repository.location, "sleep", "60"],
        env={
            **engine_environment(repository, homesafe_env / "home"),
            "BORG_RSH": shlex.join(["ssh", *repositories.ssh_options()]),
        },
        start_new_session=True,
    )
    processes.append(holder)
    lock = server_side(repository) / "lock.exclusive"
    wait_for(lambda: lock.is_dir() and any(lock.iterdir()), "the lock of borg serve")
    [[host, serve_pid, _]] = borg_roster(repository)
    assert host == borg.borg_host_id()  # the server's own id (it is this machine)
    assert isinstance(serve_pid, int) and serve_pid != holder.pid  # borg serve's, not ours
    os.kill(serve_pid, signal.SIGKILL)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    wait_for(lambda: not process_exists(serve_pid), "borg serve to be reaped")
    assert any(lock.iterdir())  # left behind

    assert api.list_archives(repository) == []

    assert not lock.exists()


def left_by_another_host(repository: Repository, home: Path) -> int:
    """A real borg of another host (``BORG_HOST_ID``) killed while it held the lock of
    the repository's directory (a disk the hosts share): its pid is that of a dead
    process here, which proves nothing about a process of another host."""
    holder = subprocess.Popen(
        ["borg", "with-lock", str(server_side(repository)), "sleep", "60"],
        env={**engine_environment(repository, home), "BORG_HOST_ID": f"{OTHER_HOST}@1"},
        start_new_session=True,
    )
    lock = server_side(repository) / "lock.exclusive"
    wait_for(lambda: lock.is_dir() and any(lock.iterdir()), "the other host's lock")
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    return holder.pid


def test_borg_over_ssh_leaves_another_hosts_lock_and_says_how_to_break_it(
    borg_over_ssh: Repository, homesafe_env: Path
) -> None:
    repository = borg_over_ssh
    pid = left_by_another_host(repository, homesafe_env / "home")
    assert borg_roster(repository) == [[f"{OTHER_HOST}@1", pid, 0]]

    with pytest.raises(RepositoryLockedError) as raised:
        api.list_archives(repository)

    assert "is locked by another process" in raised.value.message
    assert "waited 2 s" in raised.value.message
    assert raised.value.hint is not None
    assert "homesafe repo break-lock offsite" in raised.value.hint
    assert borg_roster(repository) == [[f"{OTHER_HOST}@1", pid, 0]]  # never broken unasked
    # The command line says it too.
    failed = homesafe("archives", "list", "--repo", "offsite")
    assert failed.returncode == 1
    assert "homesafe repo break-lock offsite" in failed.stderr

    refused = homesafe("repo", "break-lock", "offsite")  # no confirmation: nothing done
    assert refused.returncode != 0
    assert (server_side(repository) / "lock.exclusive").exists()
    broken = homesafe("repo", "break-lock", "offsite", "--yes")

    assert broken.returncode == 0, broken.stderr
    assert not (server_side(repository) / "lock.exclusive").exists()
    assert api.list_archives(repository) == []


# -- restic on S3 ----------------------------------------------------------------------


@pytest.fixture
def restic_on_s3(
    homesafe_env: Path, s3_server: SeaweedS3, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Repository:  # fmt: skip
    """A registered restic repository in the test bucket, made by homesafe; it waits 2 s
    for a lock."""
    for variable, value in s3_server.environment().items():
        monkeypatch.setenv(variable, value)
    repository = Repository(
        name="bucket",
        location=s3_server.location("locks", request.node.name),
        engine="restic",
        encryption=repositories.DEFAULT_ENCRYPTIONS["restic"],
        passphrase_file=repositories.passphrase_file_for("bucket"),
        compression=repositories.DEFAULT_COMPRESSIONS["restic"],
        lock_wait=2,
    )
    assert api.initialize_repository(repository) is True
    repositories.register(repository)
    return repositories.get("bucket")


def raw_restic(repository: Repository, *arguments: str) -> list[str]:
    return ["restic", "-r", restic.restic_location(repository), *arguments]


def restic_locks(repository: Repository, home: Path) -> list[str]:
    """The ids of the repository's lock files, as restic lists them (taking no lock)."""
    completed = subprocess.run(
        raw_restic(repository, "--no-lock", "list", "locks"),
        env=engine_environment(repository, home),
        capture_output=True,
        text=True,
        check=True,
    )
    return completed.stdout.split()


def killed_restic_holder(repository: Repository, home: Path, hostname: str | None) -> int:
    """A real ``restic backup --stdin`` that took its lock and was killed with SIGKILL;
    with ``hostname`` it ran in a UTS namespace of its own under that host name."""
    argv = raw_restic(repository, "backup", "--stdin", "--stdin-filename", "x")
    if hostname is not None:
        become = "import os, socket, sys; socket.sethostname(sys.argv[1]); " + (
            "os.execvp(sys.argv[2], sys.argv[2:])"
        )
        argv = ["unshare", "--uts", "--", sys.executable, "-c", become, hostname, *argv]
    before = set(restic_locks(repository, home))
    holder = subprocess.Popen(
        argv,
        env=engine_environment(repository, home),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: set(restic_locks(repository, home)) - before, "restic's lock")
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        assert holder.stdin is not None
        holder.stdin.close()
    return holder.pid


def test_restic_on_s3_clears_the_lock_of_a_dead_restic_of_this_host(
    restic_on_s3: Repository, homesafe_env: Path
) -> None:
    home = homesafe_env / "home"
    killed_restic_holder(restic_on_s3, home, hostname=None)
    assert len(restic_locks(restic_on_s3, home)) == 1  # left behind

    report = api.check_repository(restic_on_s3)  # needs the repository alone

    assert report.ok, report.problems
    assert restic_locks(restic_on_s3, home) == []


def uts_namespaces() -> str | None:
    """None when this process may run a program under another host name."""
    try:
        subprocess.run(["unshare", "--uts", "true"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as error:
        return f"cannot make a UTS namespace for another host name: {error}"
    return None


def test_restic_on_s3_leaves_another_hosts_lock_and_says_how_to_break_it(
    restic_on_s3: Repository, homesafe_env: Path
) -> None:
    reason = uts_namespaces()
    if reason:
        pytest.skip(reason)
    home = homesafe_env / "home"
    pid = killed_restic_holder(restic_on_s3, home, hostname=OTHER_HOST)
    [lock] = restic_locks(restic_on_s3, home)

    with pytest.raises(RepositoryLockedError) as raised:
        api.check_repository(restic_on_s3)

    assert f"pid {pid} on {OTHER_HOST}" in raised.value.message
    assert "waited 2 s" in raised.value.message
    assert raised.value.hint is not None
    assert "30 minutes" in raised.value.hint
    assert "homesafe repo break-lock bucket" in raised.value.hint
    assert restic_locks(restic_on_s3, home) == [lock]  # restic's unlock left it

    broken = homesafe("repo", "break-lock", "bucket", "--yes")

    assert broken.returncode == 0, broken.stderr
    assert restic_locks(restic_on_s3, home) == []
    assert api.check_repository(restic_on_s3).ok
