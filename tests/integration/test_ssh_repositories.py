"""Remote repositories over ssh with a real sshd on 127.0.0.1: homesafe's own client key
and known_hosts, trust on first use, and one distinct error for each of an unreachable
host, a refused key and a changed host key, from borg (``borg serve``) and restic
(sftp) alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from homesafe import api, repositories
from homesafe.errors import (
    AuthenticationRefusedError,
    HostKeyChangedError,
    HostKeyUnknownError,
    HostUnreachableError,
)
from homesafe.repositories import (
    HostKey,
    Repository,
)
from tests.conftest import ManifestWriter, requires_program
from tests.support import sshd as sshd_support
from tests.support.apps import make_tree, to_toml
from tests.support.sshd import Sshd, free_port

pytestmark = [requires_program("borg"), requires_program("restic")]

HOMESAFE = str(Path(sys.executable).parent / "homesafe")
ENGINES = {"borg": "ssh", "restic": "sftp"}


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A server of this test's own: tests here change its host key and stop it."""
    reason = sshd_support.available()
    if reason:
        pytest.skip(reason)
    server = Sshd(tmp_path / "sshd")
    server.start()
    yield server
    server.close()


def fingerprint_of(server: Sshd) -> str:
    key_type, key = server.host_key_line().split()
    return HostKey("", key_type, key).fingerprint


def remote(server: Sshd, engine: str, path: Path, port: int | None = None) -> Repository:
    """A repository record for ``path`` on ``server`` (nothing is created)."""
    scheme = ENGINES[engine]
    return Repository(
        name=f"remote-{engine}",
        location=f"{scheme}://root@127.0.0.1:{port or server.port}{path}",
        engine=engine,
        encryption=repositories.DEFAULT_ENCRYPTIONS[engine],
        passphrase_file=repositories.passphrase_file_for(f"remote-{engine}"),
        compression=repositories.DEFAULT_COMPRESSIONS[engine],
        lock_wait=5,
    )


def trusted(server: Sshd, repository: Repository, authorize: bool = True) -> Repository:
    if authorize:
        server.authorize(repositories.ensure_client_key())
    repositories.trust_host(repository.parsed_location, fingerprint=fingerprint_of(server))
    return repository


def homesafe(*arguments: str, input_text: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HOMESAFE, *arguments],
        capture_output=True,
        text=True,
        input=input_text,
        env=os.environ.copy(),
        check=False,
        timeout=300,
    )


def test_repo_add_shows_the_key_and_trusts_the_host_only_when_confirmed(
    homesafe_env: Path, write_manifest: ManifestWriter, sshd: Sshd, tmp_path: Path
) -> None:
    location = f"ssh://root@127.0.0.1:{sshd.port}{tmp_path}/offsite"

    declined = homesafe("repo", "add", "offsite", location, input_text="n\n")

    assert declined.returncode == 1, declined.stderr
    assert fingerprint_of(sshd) in declined.stdout
    public_key = (homesafe_env / "home/ssh/id_ed25519.pub").read_text().strip()
    assert public_key in declined.stdout  # shown for installing on the server
    assert "not trusted" in declined.stderr
    assert not (tmp_path / "offsite").exists()
    assert json.loads(homesafe("repo", "list", "--json").stdout)["repositories"][1:] == []

    sshd.authorize(public_key)
    accepted = homesafe("repo", "add", "offsite", location, input_text="y\n")

    assert accepted.returncode == 0, accepted.stderr
    assert "Created borg repository 'offsite'" in accepted.stdout
    known_hosts = (homesafe_env / "home/ssh/known_hosts").read_text()
    assert f"[127.0.0.1]:{sshd.port} {sshd.host_key_line()}" in known_hosts
    # Nothing of the machine's own ssh set-up was used or changed.
    assert (tmp_path / "offsite/config").is_file()

    data = make_tree(homesafe_env / "srv/app", {"a.txt": "remote\n"})
    write_manifest("app", to_toml({"id": "app", "data": {"directories": [str(data)]}}))
    backup = homesafe("backup", "--repo", "offsite", "--json")
    assert backup.returncode == 0, backup.stderr
    shown = json.loads(homesafe("repo", "show", "offsite", "--json").stdout)
    assert shown["archive_count"] == 1
    assert shown["encryption"] == "repokey-blake2"
    assert shown["passphrase"] == f"file {homesafe_env}/home/secrets/offsite.passphrase"


def test_host_key_fingerprint_option_trusts_without_asking_and_refuses_a_mismatch(
    homesafe_env: Path, sshd: Sshd, tmp_path: Path
) -> None:
    sshd.authorize(repositories.ensure_client_key())
    location = f"sftp://root@127.0.0.1:{sshd.port}{tmp_path}/restic"
    wrong = "SHA256:" + "A" * 43

    refused = homesafe("repo", "add", "r", location, "--host-key-fingerprint", wrong)

    assert refused.returncode == 1
    assert f"not the expected {wrong}" in refused.stderr
    assert fingerprint_of(sshd) in refused.stderr

    added = homesafe("repo", "add", "r", location, "--host-key-fingerprint", fingerprint_of(sshd))

    assert added.returncode == 0, added.stderr
    assert "Trust this host key?" not in added.stdout
    assert "Created restic repository 'r'" in added.stdout
    assert (tmp_path / "restic/config").is_file()


@pytest.mark.parametrize("engine", ENGINES)
def test_unreachable_host_is_its_own_error(
    homesafe_env: Path, sshd: Sshd, tmp_path: Path, engine: str
) -> None:
    repository = trusted(sshd, remote(sshd, engine, tmp_path / "repository"))
    sshd.close()  # the host keeps its trust; nothing listens on the port any more

    with pytest.raises(HostUnreachableError) as raised:
        api.initialize_repository(repository)

    assert f"127.0.0.1:{sshd.port}" in raised.value.message
    assert "Connection refused" in raised.value.message
    # Trusting a host that does not answer says the same.
    with pytest.raises(HostUnreachableError):
        repositories.trust_host(remote(sshd, engine, tmp_path, port=free_port()).parsed_location)


@pytest.mark.parametrize("engine", ENGINES)
def test_refused_key_is_its_own_error(
    homesafe_env: Path, sshd: Sshd, tmp_path: Path, engine: str
) -> None:
    repository = trusted(sshd, remote(sshd, engine, tmp_path / "repository"), authorize=False)

    with pytest.raises(AuthenticationRefusedError) as raised:
        api.initialize_repository(repository)

    assert "refused homesafe's ssh key" in raised.value.message
    public_key = (homesafe_env / "home/ssh/id_ed25519.pub").read_text().strip()
    assert raised.value.hint is not None and public_key in raised.value.hint
    assert not (tmp_path / "repository").exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_changed_host_key_is_its_own_error_until_the_new_key_is_trusted(
    homesafe_env: Path, sshd: Sshd, tmp_path: Path, engine: str
) -> None:
    repository = trusted(sshd, remote(sshd, engine, tmp_path / "repository"))
    old_fingerprint = fingerprint_of(sshd)
    sshd.new_host_key()
    sshd.restart()
    new_fingerprint = fingerprint_of(sshd)

    with pytest.raises(HostKeyChangedError) as raised:
        api.initialize_repository(repository)

    assert "has changed" in raised.value.message
    assert new_fingerprint in raised.value.message
    assert old_fingerprint in raised.value.message
    assert not (tmp_path / "repository").exists()  # nothing was sent to it
    # Trusting it again on first-use terms is refused too: it is not a first use.
    with pytest.raises(HostKeyChangedError):
        repositories.trust_host(repository.parsed_location, confirm=lambda key: True)

    repositories.register(repository)
    trust = homesafe("repo", "trust", repository.name, "--host-key-fingerprint", new_fingerprint)
    assert trust.returncode == 0, trust.stderr

    assert api.initialize_repository(repository) is True
    assert api.list_archives(repository) == []


def test_unknown_host_key_is_refused_by_the_engines_too(
    homesafe_env: Path, sshd: Sshd, tmp_path: Path
) -> None:
    repository = remote(sshd, "borg", tmp_path / "repository")
    sshd.authorize(repositories.ensure_client_key())  # authorized, but never trusted

    with pytest.raises(HostKeyUnknownError) as raised:
        api.initialize_repository(repository)

    assert raised.value.hint is not None and "homesafe repo trust" in raised.value.hint


def negotiated_cipher(server: Sshd, repository: Repository) -> str:
    """The cipher homesafe's ssh options make ssh agree with ``server`` on, as ``ssh -v``
    reports it."""
    argv = repositories.ssh_command(repository.parsed_location)
    completed = subprocess.run(
        [argv[0], "-v", *argv[1:], "true"], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    reported = [
        line.split("cipher:", 1)[1].split()[0]
        for line in completed.stderr.splitlines()
        if "kex: client->server cipher:" in line
    ]
    assert len(reported) == 1, completed.stderr
    return reported[0]


def test_ssh_prefers_aes_gcm_where_the_cpu_has_aes_instructions(
    homesafe_env: Path, sshd: Sshd, tmp_path: Path
) -> None:
    repository = trusted(sshd, remote(sshd, "borg", tmp_path / "repository"))

    expected = (
        "aes256-gcm@openssh.com"
        if repositories.has_aes_instructions()
        else "chacha20-poly1305@openssh.com"
    )
    assert negotiated_cipher(sshd, repository) == expected


def test_a_server_that_allows_other_ciphers_only_is_still_reached(
    homesafe_env: Path, tmp_path: Path
) -> None:
    reason = sshd_support.available()
    if reason:
        pytest.skip(reason)
    server = Sshd(tmp_path / "sshd", extra_config="Ciphers aes256-ctr\n")
    server.start()
    try:
        repository = trusted(server, remote(server, "borg", tmp_path / "repository"))

        assert negotiated_cipher(server, repository) == "aes256-ctr"
        assert api.initialize_repository(repository) is True
        assert api.list_archives(repository) == []
    finally:
        server.close()
