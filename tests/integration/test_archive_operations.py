"""Archive maintenance on real borg repositories: delete + compact, export, key export,
and the errors a user gets for a missing repository or archive."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from homesafe import api
from homesafe.errors import ArchiveNotFoundError, RepositoryNotFoundError
from tests.conftest import DaemonFactory, ManifestWriter, requires_program
from tests.support.apps import describe, make_tree, to_toml

pytestmark = requires_program("borg")

FIVE_MB = 5 * 1024 * 1024


def disk_usage(directory: Path) -> int:
    """Bytes of every file below ``directory`` (what the repository takes on disk)."""
    return sum(
        (Path(root) / name).stat().st_size
        for root, _, files in os.walk(directory)
        for name in files
    )


@pytest.fixture
def files_app(homesafe_env: Path, write_manifest: ManifestWriter) -> Path:
    """An app "files" owning srv/files (a directory) and srv/files.conf."""
    data = make_tree(homesafe_env / "srv/files", {"readme.txt": "read me\n", "sub/deep.txt": "d"})
    conf = homesafe_env / "srv/files.conf"
    conf.write_text("conf = 1\n")
    write_manifest(
        "files",
        to_toml(
            {
                "id": "files",
                "version": 4,
                "config": {"files": [str(conf)]},
                "data": {"directories": [str(data)]},
            }
        ),
    )
    return data


def test_deleting_an_archive_reclaims_its_space(homesafe_env: Path, files_app: Path) -> None:
    kept = api.backup_apps()
    assert kept.status == "ok", describe(kept)
    big = files_app / "big.bin"
    big.write_bytes(os.urandom(FIVE_MB))  # random: neither compressible nor deduplicated
    doomed = api.backup_apps()
    assert doomed.status == "ok", describe(doomed)
    big.unlink()
    repository = homesafe_env / "home/repository"
    before = disk_usage(repository)

    # A name that does not exist deletes nothing, not even the names that do.
    with pytest.raises(ArchiveNotFoundError, match="no-such-archive"):
        api.delete_archives([doomed.archive, "no-such-archive"])
    assert [archive.name for archive in api.list_archives()] == [kept.archive, doomed.archive]

    api.delete_archives([doomed.archive])

    after = disk_usage(repository)
    assert before - after > FIVE_MB * 0.9, (before, after)
    assert [archive.name for archive in api.list_archives()] == [kept.archive]
    # What is left still restores.
    (files_app / "readme.txt").write_text("changed\n")
    restore = api.restore_apps(kept.archive)
    assert restore.status == "ok", describe(restore)
    assert (files_app / "readme.txt").read_text() == "read me\n"


def test_export_writes_a_tar_gz_with_relative_paths_and_metadata(
    homesafe_env: Path, files_app: Path, tmp_path: Path
) -> None:
    backup = api.backup_apps(comment="for the move")
    assert backup.status == "ok", describe(backup)
    exported = tmp_path / "export.tar.gz"

    api.export_archive(backup.archive, exported)

    assert exported.read_bytes()[:2] == b"\x1f\x8b"  # gzip magic
    with tarfile.open(exported, "r:gz") as tar:
        names = tar.getnames()
        assert not any(name.startswith("/") for name in names), names
        relative = str(files_app).lstrip("/")
        assert f"{relative}/readme.txt" in names
        assert f"{relative}/sub/deep.txt" in names
        assert str(homesafe_env / "srv/files.conf").lstrip("/") in names
        member = tar.extractfile(f"{relative}/readme.txt")
        assert member is not None and member.read() == b"read me\n"
        metadata_file = tar.extractfile(".homesafe/archive.json")
        assert metadata_file is not None
        metadata = json.loads(metadata_file.read())
    assert metadata["comment"] == "for the move"
    assert [(app["id"], app["version"]) for app in metadata["apps"]] == [("files", 4)]


def test_key_export_gives_the_passphrase_and_the_borg_key(
    homesafe_env: Path, files_app: Path
) -> None:
    assert api.backup_apps().status == "ok"

    exported = api.export_key()

    passphrase_file = homesafe_env / "home/secrets/default.passphrase"
    assert exported["passphrase"] == passphrase_file.read_text().strip()
    assert len(exported["passphrase"]) >= 32
    assert exported["key"].startswith("BORG_KEY ")
    assert exported["repository"] == str(homesafe_env / "home/repository")
    assert exported["encryption"] == "repokey-blake2"


def test_list_archives_without_a_repository_says_how_to_get_one(homesafe_env: Path) -> None:
    with pytest.raises(RepositoryNotFoundError) as raised:
        api.list_archives()

    assert str(homesafe_env / "home/repository") in raised.value.message
    assert raised.value.hint and "homesafe backup" in raised.value.hint
    # Listing must not create the repository as a side effect.
    assert not (homesafe_env / "home/repository").exists()


def test_restoring_an_archive_that_does_not_exist_touches_nothing(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    daemon = daemon_factory("bystander")
    daemon.start()
    data = make_tree(homesafe_env / "srv/app", {"a.txt": "a\n"})
    services = [
        {
            "type": "command",
            "name": "bystander",
            "start": daemon.argv("start"),
            "stop": daemon.argv("stop"),
            "status": daemon.argv("status"),
        }
    ]
    write_manifest(
        "app", to_toml({"id": "app", "data": {"directories": [str(data)]}, "services": services})
    )
    backup = api.backup_apps()
    assert backup.status == "ok", describe(backup)
    calls = len(daemon.calls())

    with pytest.raises(ArchiveNotFoundError) as raised:
        api.restore_apps("no-such-archive")

    assert "no-such-archive" in str(raised.value)
    assert daemon.calls()[calls:] == []
    assert daemon.is_running()
    with pytest.raises(ArchiveNotFoundError):
        api.export_archive("no-such-archive", homesafe_env / "x.tar")
