"""Back up and restore apps with real borg: content, modes, owners, links, settings."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from homesafe import api
from tests.conftest import ManifestWriter, requires_program

pytestmark = requires_program("borg")


def snapshot_tree(root: Path) -> dict[str, tuple[str, int, int, int, str]]:
    """Everything that must survive a round trip, for every path below ``root``."""
    found = {}
    for directory, subdirectories, files in os.walk(root):
        for name in [*subdirectories, *files]:
            path = Path(directory, name)
            status = path.lstat()
            if path.is_symlink():
                kind, content = "link", os.readlink(path)
            elif path.is_dir():
                kind, content = "dir", ""
            else:
                kind, content = "file", path.read_bytes().hex()
            found[str(path.relative_to(root))] = (
                kind,
                stat.S_IMODE(status.st_mode),
                status.st_uid,
                status.st_gid,
                content,
            )
    return found


@pytest.fixture
def two_apps(homesafe_env: Path, write_manifest: ManifestWriter) -> Path:
    """Apps "alpha" (config, data, secrets) and "beta" (data, depends on alpha)."""
    srv = homesafe_env / "srv"
    (srv / "alpha/etc").mkdir(parents=True)
    (srv / "alpha/etc/alpha.conf").write_text("setting = 1\n")
    data = srv / "alpha/data"
    (data / "nested/deeper").mkdir(parents=True)
    (data / "empty").mkdir()
    (data / "nested/deeper/blob.bin").write_bytes(os.urandom(200_000))
    (data / "notes.txt").write_text("hello\n")
    (data / "notes.txt").chmod(0o640)
    (data / "link").symlink_to("notes.txt")
    (data / "dangling").symlink_to("/nonexistent/target")
    secret = srv / "alpha/secret.key"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(data / "notes.txt", 1234, 2345)
    (srv / "beta/data").mkdir(parents=True)
    (srv / "beta/data/b.txt").write_text("beta\n")
    write_manifest(
        "alpha",
        f"""
        id = "alpha"
        version = 3
        settings = ["alpha.theme", "alpha.count"]
        [config]
        files = ["{srv}/alpha/etc/alpha.conf"]
        [data]
        directories = ["{srv}/alpha/data"]
        [secrets]
        files = ["{srv}/alpha/secret.key"]
        """,
    )
    write_manifest(
        "beta",
        f"""
        id = "beta"
        depends = ["alpha"]
        [data]
        directories = ["{srv}/beta/data"]
        """,
    )
    return srv


def test_round_trip_restores_content_modes_owners_links_and_empty_dirs(two_apps: Path) -> None:
    before = snapshot_tree(two_apps)
    api.set_setting("alpha.theme", "dark")
    api.set_setting("alpha.count", 7)

    backup = api.backup_apps()
    assert backup.status == "ok", backup.to_dict()
    assert [app.app for app in backup.apps] == ["alpha", "beta"]
    assert backup.engine_stats is not None and backup.engine_stats.file_count >= 6

    # Damage: change, delete, and drift the settings.
    (two_apps / "alpha/data/notes.txt").write_text("changed\n")
    (two_apps / "alpha/data/nested/deeper/blob.bin").unlink()
    (two_apps / "alpha/data/empty").rmdir()
    (two_apps / "alpha/secret.key").unlink()
    (two_apps / "beta/data/b.txt").unlink()
    api.set_setting("alpha.theme", "light")

    restore = api.restore_apps(backup.archive)
    assert restore.status == "ok", restore.to_dict()
    assert snapshot_tree(two_apps) == before
    assert api.get_setting("alpha.theme") == "dark"
    assert api.get_setting("alpha.count") == 7


def test_restore_of_one_app_leaves_the_other_alone(two_apps: Path) -> None:
    backup = api.backup_apps()
    (two_apps / "alpha/data/notes.txt").write_text("changed\n")
    (two_apps / "beta/data/b.txt").write_text("changed too\n")

    restore = api.restore_apps(backup.archive, ["beta"])

    assert [app.app for app in restore.apps] == ["beta"]
    assert (two_apps / "beta/data/b.txt").read_text() == "beta\n"
    assert (two_apps / "alpha/data/notes.txt").read_text() == "changed\n"


def test_restore_into_target_root_leaves_the_live_system_alone(
    two_apps: Path, tmp_path: Path
) -> None:
    backup = api.backup_apps(["alpha"])
    (two_apps / "alpha/data/notes.txt").write_text("live change\n")
    target = tmp_path / "newroot"
    target.mkdir()

    restore = api.restore_apps(backup.archive, target_root=target)

    assert restore.status == "ok", restore.to_dict()
    restored = target / str(two_apps).lstrip("/") / "alpha"
    assert (restored / "data/notes.txt").read_text() == "hello\n"
    assert (restored / "secret.key").read_text() == "s3cret\n"
    assert (two_apps / "alpha/data/notes.txt").read_text() == "live change\n"


def test_archive_metadata_carries_manifests_and_comment_summary(two_apps: Path) -> None:
    backup = api.backup_apps(comment="before upgrade")

    listed = {archive.name: archive for archive in api.list_archives()}
    assert listed[backup.archive].apps == ["alpha", "beta"]
    assert listed[backup.archive].comment == "before upgrade"
    description, contents = api.read_archive(backup.archive)
    metadata = description.metadata
    assert metadata["comment"] == "before upgrade"
    alpha = next(app for app in metadata["apps"] if app["id"] == "alpha")
    assert alpha["version"] == 3
    assert alpha["manifest"]["settings"] == ["alpha.theme", "alpha.count"]
    assert alpha["strategy"] == "live"
    paths = {"/" + entry.path for entry in contents}
    assert f"{two_apps}/alpha/secret.key" in paths
    assert not any(path.startswith("/.homesafe") for path in paths)


def test_two_backups_in_the_same_second_get_distinct_names(two_apps: Path) -> None:
    names = {api.backup_apps(["beta"]).archive for _ in range(2)}
    assert len(names) == 2
    assert {archive.name for archive in api.list_archives()} == names
