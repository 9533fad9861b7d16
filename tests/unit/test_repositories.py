"""Repository records: locations, the registry, passphrase sources, host keys and the
ssh failures each error stands for."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from pathlib import Path

import pytest

from homesafe import repositories
from homesafe.errors import (
    AuthenticationRefusedError,
    ConfigurationError,
    HostKeyChangedError,
    HostKeyUnknownError,
    HostUnreachableError,
    PassphraseError,
    UsageError,
)
from homesafe.repositories import (
    HostKey,
    Location,
    Repository,
    parse_location,
)

SECRET = "correct horse battery staple 9"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/srv/backups", Location("local", "/srv/backups")),
        (
            "ssh://backup@nas.example:2222/srv/borg",
            Location("ssh", "/srv/borg", "backup", "nas.example", 2222),
        ),
        ("ssh://u@h/~/repo", Location("ssh", "/~/repo", "u", "h", None)),
        ("sftp://u@h:22/data/restic", Location("sftp", "/data/restic", "u", "h", 22)),
        ("sftp:u@h:/data/restic", Location("sftp", "/data/restic", "u", "h", None)),
        (
            "s3:http://127.0.0.1:8333/bucket/some/prefix",
            Location("s3", "bucket/some/prefix", endpoint="http://127.0.0.1:8333"),
        ),
        ("s3:https://s3.example/bucket", Location("s3", "bucket", endpoint="https://s3.example")),
    ],
)
def test_locations_parse(text: str, expected: Location) -> None:
    assert parse_location(text) == expected


def test_a_relative_local_path_becomes_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_location("repo") == Location("local", str(tmp_path / "repo"))


@pytest.mark.parametrize(
    "text",
    [
        "ssh://host/path",
        "ssh://u@h",
        "ssh://u@h:port/x",
        "sftp:host",
        "s3:bucket",
        "ftp://u@h/x",
        "",
    ],
)
def test_unusable_locations_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_location(text)


def test_known_hosts_name_has_the_port_unless_22() -> None:
    assert parse_location("ssh://u@h:2222/x").known_hosts_name == "[h]:2222"
    assert parse_location("ssh://u@h:22/x").known_hosts_name == "h"
    assert parse_location("sftp:u@h:/x").known_hosts_name == "h"


@pytest.mark.parametrize(
    ("engine", "location", "usable"),
    [
        ("borg", "/x", True),
        ("borg", "ssh://u@h/x", True),
        ("borg", "sftp://u@h/x", False),
        ("borg", "s3:http://h/b", False),
        ("restic", "/x", True),
        ("restic", "sftp://u@h/x", True),
        ("restic", "s3:http://h/b", True),
        ("restic", "ssh://u@h/x", False),
    ],
)
def test_each_engine_takes_its_locations(engine: str, location: str, usable: bool) -> None:
    if usable:
        repositories.check_location(engine, parse_location(location))
    else:
        with pytest.raises(UsageError, match=f"{engine} cannot use"):
            repositories.check_location(engine, parse_location(location))


def test_registry_round_trip_keeps_no_passphrase(homesafe_env: Path) -> None:
    file = repositories.passphrase_file_for("offsite")
    file.write_text(SECRET + "\n")
    offsite = Repository(
        name="offsite",
        location="ssh://u@h:2222/srv/borg",
        passphrase_file=file,
        lock_wait=12,
    )
    by_command = Repository(
        name="cloud",
        location="s3:http://h:1/b/p",
        engine="restic",
        encryption="repokey",
        compression="auto",
        passphrase_command=("pass", "show", "homesafe"),
    )
    by_environment = Repository(name="env", location="/x", passphrase_environment="MY_PASSPHRASE")

    for repository in (offsite, by_command, by_environment):
        repositories.register(repository)

    assert [repository.name for repository in repositories.registered()] == [
        "cloud",
        "env",
        "offsite",
    ]
    assert repositories.get("offsite") == offsite
    assert repositories.get("cloud") == by_command
    assert repositories.get("env") == by_environment
    assert repositories.get("default") == repositories.default_repository()
    assert repositories.get(None) == repositories.default_repository()
    with sqlite3.connect(homesafe_env / "home/state.db") as connection:
        dumped = "\n".join(connection.iterdump())
    assert SECRET not in dumped
    assert "pass" in dumped and "MY_PASSPHRASE" in dumped  # where from, not what

    repositories.unregister("env")
    with pytest.raises(UsageError, match="no repository named 'env'"):
        repositories.get("env")
    with pytest.raises(UsageError, match="registered already"):
        repositories.register(offsite)


@pytest.mark.parametrize("name", ["default", "Upper", "-dash", "a b", "x" * 65])
def test_reserved_and_bad_names_are_refused(homesafe_env: Path, name: str) -> None:
    with pytest.raises(UsageError):
        repositories.register(Repository(name=name, location="/x"))


def test_passphrase_sources(
    homesafe_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "passphrase"
    file.write_text(SECRET + "\n")
    assert Repository(name="f", location="/x", passphrase_file=file).passphrase() == SECRET

    from_environment = Repository(name="e", location="/x", passphrase_environment="HS_TEST_PASS")
    with pytest.raises(PassphraseError, match="HS_TEST_PASS, which is not set"):
        from_environment.passphrase()
    monkeypatch.setenv("HS_TEST_PASS", SECRET)
    assert from_environment.passphrase() == SECRET

    from_command = Repository(name="c", location="/x", passphrase_command=("cat", str(file)))
    assert from_command.passphrase() == SECRET
    failing = Repository(name="c", location="/x", passphrase_command=("false",))
    with pytest.raises(PassphraseError, match="passphrase command"):
        failing.passphrase()
    silent = Repository(name="c", location="/x", passphrase_command=("true",))
    with pytest.raises(PassphraseError, match="printed nothing"):
        silent.passphrase()

    assert Repository(name="n", location="/x", encryption="none").passphrase() is None


def test_secret_files_must_be_private(tmp_path: Path) -> None:
    file = tmp_path / "secret"
    file.write_text("x")
    file.chmod(0o640)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        repositories.check_secret_file(file)
    file.chmod(0o600)
    repositories.check_secret_file(file)


def test_generated_passphrases_are_written_only_for_a_missing_file(homesafe_env: Path) -> None:
    file = repositories.passphrase_file_for("new")
    repository = Repository(name="new", location="/x", passphrase_file=file)

    repositories.generate_passphrase(repository)
    first = file.read_text()
    repositories.generate_passphrase(repository)

    assert file.read_text() == first
    assert len(first.strip()) >= 32
    assert file.stat().st_mode & 0o777 == 0o600
    by_environment = Repository(name="e", location="/x", passphrase_environment="X")
    repositories.generate_passphrase(by_environment)  # nothing to write


def test_host_key_fingerprint_is_ssh_keygens() -> None:
    blob = b"\x00\x00\x00\x0bssh-ed25519" + bytes(range(36))
    encoded = base64.b64encode(blob).decode()
    expected = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")

    assert HostKey("h", "ssh-ed25519", encoded).fingerprint == f"SHA256:{expected}"
    assert repositories.normalize_fingerprint(expected) == f"SHA256:{expected}"


def test_forget_host_keeps_other_hosts(homesafe_env: Path) -> None:
    known = repositories.known_hosts_file()
    key = base64.b64encode(b"key").decode()
    known.write_text(f"[h]:2222 ssh-ed25519 {key}\nother ssh-ed25519 {key}\n")
    location = parse_location("ssh://u@h:2222/x")
    assert [item.host for item in repositories.known_host_keys(location)] == ["[h]:2222"]

    repositories.forget_host(location)

    assert known.read_text() == f"other ssh-ed25519 {key}\n"
    assert repositories.known_host_keys(location) == []


@pytest.mark.parametrize(
    ("stderr", "error"),
    [
        ("ssh: connect to host 10.0.0.9 port 22: Connection refused", HostUnreachableError),
        ("ssh: Could not resolve hostname nas: Name or service not known", HostUnreachableError),
        ("ssh: connect to host h port 22: Connection timed out", HostUnreachableError),
        ("root@h: Permission denied (publickey).", AuthenticationRefusedError),
        (
            "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\n"
            "SHA256:abcDEF123 .\nHost key verification failed.",
            HostKeyChangedError,
        ),
        (
            "No ED25519 host key is known for [h]:2222 and you have requested strict checking.\n"
            "Host key verification failed.",
            HostKeyUnknownError,
        ),
        ("Connection closed by remote host. Is borg working on the server?", None),
    ],
)
def test_ssh_failures_are_told_apart(
    homesafe_env: Path, stderr: str, error: type[Exception] | None
) -> None:
    repository = Repository(name="r", location="ssh://u@h:2222/x")
    classified = repositories.classify_ssh_failure(stderr, repository)
    if error is None:
        assert classified is None
    else:
        assert type(classified) is error
        assert classified is not None and "h" in classified.message


def test_s3_credentials_come_from_the_secret_file_or_the_environment(
    homesafe_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    repository = Repository(name="cloud", location="s3:http://h/b", engine="restic")
    with pytest.raises(ConfigurationError, match="no S3 credentials"):
        repository.s3_credentials()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    assert repository.s3_credentials()["AWS_ACCESS_KEY_ID"] == "from-env"
    repositories.s3_credentials_file("cloud").write_text(
        "AWS_ACCESS_KEY_ID=from-file\nAWS_SECRET_ACCESS_KEY=file-secret\n"
    )
    assert repository.s3_credentials() == {
        "AWS_ACCESS_KEY_ID": "from-file",
        "AWS_SECRET_ACCESS_KEY": "file-secret",
    }


@pytest.mark.parametrize(
    ("cpu_information", "expected"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 aes avx2\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2\n", False),
        ("processor\t: 0\nFeatures\t: fp asimd aes pmull sha1\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd\n", False),
        # Only a whole word counts: "vaes" alone is no "aes".
        ("flags\t\t: vaes\n", False),
        ("", False),
    ],
)
def test_aes_instructions_are_read_from_cpuinfo(
    tmp_path: Path, cpu_information: str, expected: bool
) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(cpu_information)
    assert repositories.has_aes_instructions(path) is expected


def test_an_unreadable_cpuinfo_means_no_aes_instructions(tmp_path: Path) -> None:
    assert repositories.has_aes_instructions(tmp_path / "missing") is False


@pytest.mark.parametrize("aes", [True, False])
def test_ssh_options_put_aes_gcm_first_only_with_aes_instructions(
    homesafe_env: Path, monkeypatch: pytest.MonkeyPatch, aes: bool
) -> None:
    monkeypatch.setattr(repositories, "has_aes_instructions", lambda: aes)

    options = repositories.ssh_options()

    ciphers = [option for option in options if option.startswith("Ciphers=")]
    if aes:
        assert ciphers == ["Ciphers=" + ",".join(repositories.AES_FIRST_CIPHERS)]
        assert repositories.AES_FIRST_CIPHERS[0].startswith("aes256-gcm")
    else:
        assert ciphers == []
    assert options[: len(repositories.ssh_access_options())] == repositories.ssh_access_options()
