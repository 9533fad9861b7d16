"""homesafe's own key to a restic repository (homesafe.engines.restic_key), with real
restic on a local path, over sftp (a real sshd on 127.0.0.1) and on S3 (a real SeaweedFS
on 127.0.0.1): restic accepts the key homesafe seals and writes, homesafe opens the
repository with it and with nothing else, falls back to the passphrase when the key is
gone, and replaces it when the passphrase changes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

from homesafe import api, repositories
from homesafe.engines import restic_key
from homesafe.repositories import Repository
from tests.conftest import ManifestWriter, requires_program
from tests.integration.test_repo_roundtrip import (  # noqa: F401 (fixtures)
    remote_location,
    s3_server,
    sshd,
)
from tests.support.apps import make_tree, to_toml
from tests.support.engine_calls import EngineCalls

pytestmark = [requires_program("restic")]

PASSPHRASE = "the passphrase of the own-key tests"


@pytest.fixture
def app(homesafe_env: Path, write_manifest: ManifestWriter) -> Path:
    data = make_tree(homesafe_env / "srv/app", {"a.txt": "content\n", "sub/b.txt": "more\n"})
    write_manifest("app", to_toml({"id": "app", "data": {"directories": [str(data)]}}))
    return data


def add_repository(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> Repository:
    """Create and register a restic repository of ``kind`` (local, sftp, s3) whose
    passphrase is kept in a file, as `homesafe repo add` does."""
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(PASSPHRASE + "\n")
    passphrase.chmod(0o600)
    location = str(tmp_path / "repository")
    if kind != "local":
        location = remote_location(request, monkeypatch, kind, tmp_path / "repository")
    repository = Repository(
        name="offsite",
        location=location,
        engine="restic",
        encryption=repositories.DEFAULT_ENCRYPTIONS["restic"],
        passphrase_file=passphrase,
        compression=repositories.DEFAULT_COMPRESSIONS["restic"],
        lock_wait=10,
    )
    assert api.initialize_repository(repository) is True
    repositories.register(repository)
    return repositories.get("offsite")


def raw_restic(
    repository: Repository, *arguments: str, password_file: Path, key_hint: str = ""
) -> subprocess.CompletedProcess[str]:
    """restic itself on the repository, with this password (and key hint)."""
    from homesafe.engines.restic import common_options

    argv = ["restic", *arguments, *common_options(repository)]
    if key_hint:
        argv += ["--key-hint", key_hint]
    return subprocess.run(
        argv,
        env={**os.environ, "RESTIC_PASSWORD_FILE": str(password_file)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def own_password_file(tmp_path: Path, key: restic_key.OwnKey) -> Path:
    path = tmp_path / "own-password"
    path.write_text(key.password + "\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("kind", ["local", "sftp", "s3"])
def test_restic_opens_the_repository_with_homesafes_own_key_and_homesafe_uses_only_it(
    request: pytest.FixtureRequest,
    homesafe_env: Path,
    app: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    repository = add_repository(request, tmp_path, monkeypatch, kind)

    key = restic_key.load(repository)
    assert key is not None
    secret = restic_key.secret_file("offsite")
    assert secret.stat().st_mode & 0o777 == 0o600
    # The repository has two keys: the passphrase's and homesafe's, named homesafe@host.
    listed = raw_restic(repository, "key", "list", "--json", password_file=tmp_path / "passphrase")
    assert listed.returncode == 0, listed.stderr
    keys = json.loads(listed.stdout)
    assert len(keys) == 2
    own = [entry for entry in keys if entry["userName"] == restic_key.USERNAME]
    assert len(own) == 1 and key.key_id.startswith(own[0]["id"])
    # Its derivation is cheap, and restic itself opens the repository with it alone.
    stored = raw_restic(repository, "cat", "key", key.key_id, password_file=tmp_path / "passphrase")
    assert stored.returncode == 0, stored.stderr
    assert {name: json.loads(stored.stdout)[name] for name in ("N", "r", "p")} == (
        restic_key.SCRYPT_PARAMETERS
    )
    opened = raw_restic(
        repository,
        "cat",
        "config",
        password_file=own_password_file(tmp_path, key),
        key_hint=key.key_id,
    )
    assert opened.returncode == 0, opened.stderr

    # With a wrong passphrase in the file, homesafe still backs up, lists and restores:
    # it opens the repository with its own key, named in every restic call.
    (tmp_path / "passphrase").write_text("not the passphrase\n")
    calls = EngineCalls(tmp_path / "calls", monkeypatch)
    backed_up = api.backup_apps(repository=repository)
    assert backed_up.status == "ok", backed_up.to_dict()
    target = tmp_path / "target"
    target.mkdir()
    restored = api.restore_apps(backed_up.archive, repository=repository, target_root=target)
    assert restored.status == "ok", restored.to_dict()
    assert (target / str(app).lstrip("/") / "sub/b.txt").read_text() == "more\n"
    restic_calls = [call for call in calls.all() if call[0] == "restic"]
    assert restic_calls
    for call in restic_calls:
        assert call[call.index("--key-hint") + 1] == key.key_id, call
    # The password is handed over by pipe: never in argv.
    assert all(key.password not in part for call in calls.all() for part in call)

    # Forgetting the repository forgets the password of the key.
    api.remove_repository("offsite")
    assert not secret.exists()


def test_a_key_gone_from_the_repository_is_declined_and_the_passphrase_opens_it(
    request: pytest.FixtureRequest,
    homesafe_env: Path,
    app: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    repository = add_repository(request, tmp_path, monkeypatch, "local")
    key = restic_key.load(repository)
    assert key is not None
    (tmp_path / "repository/keys" / key.key_id).unlink()

    caplog.set_level(logging.WARNING)
    result = api.backup_apps(repository=repository)

    assert result.status == "ok", result.to_dict()
    assert "no longer opens repository 'offsite'" in caplog.text
    assert restic_key.load(repository) is None
    assert key.password not in restic_key.secret_file("offsite").read_text()
    # Whoever removed it meant it: the next backup makes no new one.
    calls = EngineCalls(tmp_path / "calls", monkeypatch)
    assert api.backup_apps(repository=repository).status == "ok"
    assert calls.commands("restic") == ["backup"]
    assert all("--key-hint" not in call for call in calls.all())
    assert len(list((tmp_path / "repository/keys").iterdir())) == 1


def test_a_repository_registered_without_one_gets_it_at_its_next_backup(
    homesafe_env: Path, app: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restic repository registered before homesafe made its own keys."""
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(PASSPHRASE + "\n")
    passphrase.chmod(0o600)
    initialized = subprocess.run(
        ["restic", "init", "-q", "-r", str(tmp_path / "repository")],
        env={**os.environ, "RESTIC_PASSWORD_FILE": str(passphrase)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert initialized.returncode == 0, initialized.stderr
    repositories.register(
        Repository(
            name="offsite",
            location=str(tmp_path / "repository"),
            engine="restic",
            encryption=repositories.DEFAULT_ENCRYPTIONS["restic"],
            passphrase_file=passphrase,
            compression=repositories.DEFAULT_COMPRESSIONS["restic"],
        )
    )
    repository = repositories.get("offsite")
    calls = EngineCalls(tmp_path / "calls", monkeypatch)

    assert api.backup_apps(repository=repository).status == "ok"

    key = restic_key.load(repository)
    assert key is not None
    # The master key read with the passphrase, the new key tried, then the backup with it
    # (after a listing: homesafe has no record of the repository's snapshots).
    assert calls.commands("restic") == ["cat", "cat", "snapshots", "backup"]
    first, *later = calls.all()
    assert "--key-hint" not in first
    for call in later:
        assert call[call.index("--key-hint") + 1] == key.key_id, call
    calls.clear()
    assert api.backup_apps(repository=repository).status == "ok"
    assert calls.commands("restic") == ["backup"]


def test_a_passphrase_change_replaces_homesafes_own_key(
    request: pytest.FixtureRequest,
    homesafe_env: Path,
    app: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repository = add_repository(request, tmp_path, monkeypatch, "local")
    old = restic_key.load(repository)
    assert old is not None
    old_password = own_password_file(tmp_path, old)

    api.change_passphrase(repository, "a new passphrase for the own-key test")

    new = restic_key.load(repository)
    assert new is not None and new.key_id != old.key_id and new.password != old.password
    stored = sorted(path.name for path in (tmp_path / "repository/keys").iterdir())
    assert new.key_id in stored and old.key_id not in stored and len(stored) == 2
    refused = raw_restic(
        repository, "cat", "config", password_file=old_password, key_hint=old.key_id
    )
    assert refused.returncode != 0
    assert "wrong password or no key found" in refused.stderr
    (tmp_path / "passphrase").write_text("a new passphrase for the own-key test\n")
    assert api.backup_apps(repository=repository).status == "ok"


def test_no_key_of_its_own_where_the_passphrase_is_not_kept_in_a_file(
    homesafe_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OFFSITE_PASSPHRASE", PASSPHRASE)
    repository = Repository(
        name="offsite",
        location=str(tmp_path / "repository"),
        engine="restic",
        encryption=repositories.DEFAULT_ENCRYPTIONS["restic"],
        passphrase_environment="OFFSITE_PASSPHRASE",
        compression=repositories.DEFAULT_COMPRESSIONS["restic"],
    )
    assert api.initialize_repository(repository) is True

    assert not restic_key.secret_file("offsite").exists()
    assert len(list((tmp_path / "repository/keys").iterdir())) == 1
