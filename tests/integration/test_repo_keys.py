"""Passphrases and keys with real borg and restic: the three passphrase sources, a wrong
passphrase, passphrase change, borg key export and import; and that no passphrase
reaches argv, the logs or the state database."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from homesafe import api, repositories
from homesafe.engines import restic_key
from homesafe.errors import PassphraseError
from homesafe.repositories import Repository
from tests.conftest import ManifestWriter, requires_program
from tests.support.apps import make_tree, to_toml

pytestmark = [requires_program("borg"), requires_program("restic")]

HOMESAFE = str(Path(sys.executable).parent / "homesafe")
SECRET = "a passphrase nobody may see 7f3a"


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


@pytest.fixture
def app(homesafe_env: Path, write_manifest: ManifestWriter) -> Path:
    data = make_tree(homesafe_env / "srv/app", {"a.txt": "content\n"})
    write_manifest("app", to_toml({"id": "app", "data": {"directories": [str(data)]}}))
    return data


@pytest.mark.parametrize("engine", ["borg", "restic"])
@pytest.mark.parametrize("source", ["environment", "command"])
def test_passphrase_from_environment_or_command_never_leaks(
    homesafe_env: Path,
    app: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    engine: str,
    source: str,
) -> None:
    if source == "environment":
        monkeypatch.setenv("OFFSITE_PASSPHRASE", SECRET)
        option = ["--passphrase-env", "OFFSITE_PASSPHRASE"]
    else:
        holder = tmp_path / "vault"
        holder.write_text(SECRET + "\n")
        option = ["--passcommand", f"cat {holder}"]
    added = homesafe("repo", "add", "offsite", str(tmp_path / "repo"), "--engine", engine, *option)
    assert added.returncode == 0, added.stderr
    assert not (homesafe_env / "home/secrets/offsite.passphrase").exists()
    # No key of homesafe's own either: its password would be a secret at rest.
    assert not (homesafe_env / "home/secrets/offsite.restic-key").exists()

    caplog.set_level(logging.DEBUG)
    result = api.backup_apps(repository=repositories.get("offsite"))

    assert result.status == "ok", result.to_dict()
    assert SECRET not in caplog.text
    assert "running " in caplog.text  # the commands were logged, masked
    state = (homesafe_env / "home/state.db").read_bytes()
    assert SECRET.encode() not in state
    shown = homesafe("repo", "show", "offsite", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["archive_count"] == 1
    assert SECRET not in shown.stdout
    if source == "environment":
        monkeypatch.setenv("OFFSITE_PASSPHRASE", "not it")
        with pytest.raises(PassphraseError):
            api.list_archives(repositories.get("offsite"))


@pytest.mark.parametrize("engine", ["borg", "restic"])
def test_wrong_passphrase_is_a_passphrase_error(
    homesafe_env: Path, tmp_path: Path, engine: str
) -> None:
    added = homesafe("repo", "add", "r", str(tmp_path / "repo"), "--engine", engine)
    assert added.returncode == 0, added.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    wrong.chmod(0o600)
    repository = repositories.get("r")
    impostor = Repository(**{**repository.__dict__, "passphrase_file": wrong})
    # homesafe's own restic key opens the repository whatever the passphrase file says
    # (tests/integration/test_restic_own_key.py): without it, the passphrase is tried.
    restic_key.forget("r")

    with pytest.raises(PassphraseError) as raised:
        api.list_archives(impostor)

    assert "wrong passphrase for repository 'r'" in raised.value.message
    listed = homesafe("archives", "list", "--repo", "r")
    assert listed.returncode == 0, listed.stderr
    # Registering the existing repository with a new (generated) passphrase is refused
    # and leaves no passphrase file behind.
    again = homesafe("repo", "add", "again", str(tmp_path / "repo"), "--engine", engine)
    assert again.returncode == 1
    assert "a new passphrase cannot open it" in again.stderr
    assert not (homesafe_env / "home/secrets/again.passphrase").exists()


def test_passphrase_file_must_be_private(homesafe_env: Path, tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.write_text(SECRET + "\n")
    loose.chmod(0o644)

    refused = homesafe("repo", "add", "r", str(tmp_path / "repo"), "--passphrase-file", str(loose))

    assert refused.returncode == 1
    assert "chmod 600" in refused.stderr
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("engine", ["borg", "restic"])
def test_passphrase_change_replaces_the_file_only_once_the_repository_took_it(
    homesafe_env: Path, app: Path, tmp_path: Path, engine: str
) -> None:
    added = homesafe("repo", "add", "r", str(tmp_path / "repo"), "--engine", engine)
    assert added.returncode == 0, added.stderr
    file = homesafe_env / "home/secrets/r.passphrase"
    old = file.read_text().strip()
    assert api.backup_apps(repository=repositories.get("r")).status == "ok"

    changed = homesafe("key", "change-passphrase", "--repo", "r")

    assert changed.returncode == 0, changed.stderr
    new = file.read_text().strip()
    assert new != old and len(new) >= 32
    assert oct(file.stat().st_mode & 0o777) == "0o600"
    assert not file.with_name("r.passphrase.new").exists()
    # The passphrases themselves, not homesafe's own restic key, must open it or not.
    restic_key.forget("r")
    assert len(api.list_archives(repositories.get("r"))) == 1
    stale = tmp_path / "old"
    stale.write_text(old + "\n")
    with pytest.raises(PassphraseError):
        api.list_archives(
            Repository(**{**repositories.get("r").__dict__, "passphrase_file": stale})
        )


def test_borg_key_export_and_import_bring_a_lost_keyfile_back(
    homesafe_env: Path, app: Path, tmp_path: Path
) -> None:
    added = homesafe("repo", "add", "k", str(tmp_path / "repo"), "--encryption", "keyfile-blake2")
    assert added.returncode == 0, added.stderr
    assert api.backup_apps(repository=repositories.get("k")).status == "ok"
    exported = homesafe("key", "export", "--repo", "k", "--json")
    assert exported.returncode == 0, exported.stderr
    key = json.loads(exported.stdout)["key"]
    assert key.startswith("BORG_KEY ")
    key_file = tmp_path / "kept.key"
    key_file.write_text(key)
    # A new machine: borg's key directory is gone.
    shutil.rmtree(homesafe_env / "home/borg/.config/borg/keys")
    assert homesafe("archives", "list", "--repo", "k").returncode == 1

    imported = homesafe("key", "import", "--repo", "k", str(key_file))

    assert imported.returncode == 0, imported.stderr
    assert len(api.list_archives(repositories.get("k"))) == 1


def test_restic_key_export_is_the_key_file_and_import_is_refused_clearly(
    homesafe_env: Path, tmp_path: Path
) -> None:
    added = homesafe("repo", "add", "r", str(tmp_path / "repo"), "--engine", "restic")
    assert added.returncode == 0, added.stderr

    exported = json.loads(homesafe("key", "export", "--repo", "r", "--json").stdout)

    # The passphrase's key, not homesafe's own (whose password is no passphrase).
    own = restic_key.load(repositories.get("r"))
    assert own is not None
    [key_file] = [path for path in (tmp_path / "repo/keys").iterdir() if path.name != own.key_id]
    assert json.loads(exported["key"]) == json.loads(key_file.read_text())
    refused = homesafe("key", "import", "--repo", "r", str(key_file))
    assert refused.returncode == 2
    assert "restic has no key import" in refused.stderr


def test_repo_list_show_and_remove(homesafe_env: Path, app: Path, tmp_path: Path) -> None:
    assert homesafe("repo", "add", "one", str(tmp_path / "one")).returncode == 0
    added = homesafe("repo", "add", "two", str(tmp_path / "two"), "--engine", "restic")
    assert added.returncode == 0, added.stderr
    assert (homesafe_env / "home/secrets/two.restic-key").exists()
    assert homesafe("repo", "add", "one", str(tmp_path / "x")).returncode == 2
    assert homesafe("repo", "add", "default", str(tmp_path / "x")).returncode == 2

    listed = json.loads(homesafe("repo", "list", "--json").stdout)["repositories"]
    assert [(row["name"], row["engine"]) for row in listed] == [
        ("default", "borg"),
        ("one", "borg"),
        ("two", "restic"),
    ]
    assert homesafe("backup", "--repo", "two").returncode == 0
    shown = json.loads(homesafe("repo", "show", "two", "--json").stdout)
    own = restic_key.load(repositories.get("two"))
    assert own is not None and shown["homesafe_key"] == own.key_id
    assert shown["archive_count"] == 1
    assert shown["last_archive_time"].startswith("20")
    assert shown["stored_size"] > 0
    assert homesafe("repo", "show", "nope").returncode == 2

    kept = homesafe("repo", "remove", "one")
    assert kept.returncode == 0, kept.stderr
    assert (tmp_path / "one/config").is_file()  # the data stays
    assert (homesafe_env / "home/secrets/one.passphrase").exists()
    deleted = homesafe("repo", "remove", "two", "--delete-data", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert not (tmp_path / "two").exists()
    assert not (homesafe_env / "home/secrets/two.passphrase").exists()
    assert not (homesafe_env / "home/secrets/two.restic-key").exists()
    names = [
        row["name"] for row in json.loads(homesafe("repo", "list", "--json").stdout)["repositories"]
    ]
    assert names == ["default"]
