"""Archives made by the reference distribution, built here with plain borg: listed,
shown and restored by the manifests inside them, also from an exported tar.gz."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from homesafe import api, state
from tests.conftest import ManifestWriter, requires_program
from tests.integration.test_roundtrip import snapshot_tree
from tests.support.apps import describe

pytestmark = requires_program("borg")


def plain_borg(homesafe_env: Path, *arguments: str, cwd: Path | None = None) -> str:
    """borg as the reference distribution ran it: no homesafe in between."""
    environment = {
        **os.environ,
        "BORG_PASSPHRASE": (homesafe_env / "home/secrets/default.passphrase").read_text().strip(),
        "BORG_BASE_DIR": str(homesafe_env / "plain-borg"),
    }
    completed = subprocess.run(
        ["borg", *arguments], cwd=cwd, env=environment, capture_output=True, text=True, check=True
    )
    return completed.stdout


def reference_archive(
    homesafe_env: Path, write_manifest: ManifestWriter, *, bare_list: bool
) -> tuple[str, Path]:
    """A reference-format archive in homesafe's default repository, holding app "wiki"
    (a config file, a data directory, a systemd service, two settings)."""
    # A homesafe backup of an unrelated app creates the default repository.
    (homesafe_env / "srv/other").mkdir(parents=True)
    write_manifest("other", f'id = "other"\n[data]\ndirectories = ["{homesafe_env}/srv/other"]\n')
    assert api.backup_apps().status == "ok"

    wiki = homesafe_env / "srv/wiki"
    (wiki / "data/pages").mkdir(parents=True)
    (wiki / "data/pages/home.md").write_text("# Home\n")
    (wiki / "wiki.conf").write_text("title = Wiki\n")
    entry = {
        "name": "wiki",
        "version": 2,
        "backup": {
            "config": {"files": [str(wiki / "wiki.conf")]},
            "data": {"directories": [str(wiki / "data")]},
            "services": ["wiki-nonexistent-unit"],
            "settings": ["wiki.theme", "wiki.pages"],
        },
    }
    staging = homesafe_env / "reference-staging"
    manifests = staging / "var/lib/plinth/backups-manifests"
    manifests.mkdir(parents=True)
    document = [entry] if bare_list else {"apps": [entry]}
    (manifests / "a1b2c3.json").write_text(json.dumps(document))
    settings = staging / "var/lib/plinth/backups-data"
    settings.mkdir(parents=True)
    (settings / "wiki-settings.json").write_text(
        json.dumps({"wiki.theme": "solarized", "wiki.pages": 12, "unrelated": 1})
    )
    (settings / "wiki-database.sql").write_text("-- a dump the reference app made\n")
    name = "2024-05-01T02:00:03+02:00"
    plain_borg(
        homesafe_env,
        "create",
        "--comment",
        '{{"type":"scheduled","periods":["daily"]}}',
        f"{homesafe_env}/home/repository::{name}",
        "var/lib/plinth",
        str(wiki),
        cwd=staging,
    )
    return name, wiki


@pytest.mark.parametrize("bare_list", [False, True], ids=["apps-object", "bare-list"])
def test_reference_archive_is_listed_shown_and_restored(
    homesafe_env: Path, write_manifest: ManifestWriter, bare_list: bool
) -> None:
    name, wiki = reference_archive(homesafe_env, write_manifest, bare_list=bare_list)
    before = snapshot_tree(wiki)

    listed = {archive.name: archive for archive in api.list_archives()}
    assert listed[name].homesafe is False
    description, contents = api.read_archive(name)
    assert description.format == "reference"
    assert list(description.apps) == ["wiki"]
    stored = description.apps["wiki"]
    assert stored.manifest.version == 2
    assert stored.manifest.services[0].name == "wiki-nonexistent-unit"
    assert stored.settings == {"wiki.theme": "solarized", "wiki.pages": 12}
    assert f"{wiki}/data/pages/home.md".lstrip("/") in {entry.path for entry in contents}

    # Restore into another root: files only (the systemd unit cannot run here).
    (wiki / "data/pages/home.md").write_text("damaged\n")
    target = homesafe_env / "newroot"
    target.mkdir()
    result = api.restore_apps(name, ["wiki"], target_root=target)
    assert result.status == "ok", describe(result)
    assert snapshot_tree(target / str(wiki).lstrip("/")) == before


def test_reference_archive_restores_live_with_its_settings(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    name, wiki = reference_archive(homesafe_env, write_manifest, bare_list=False)
    before = snapshot_tree(wiki)
    (wiki / "data/pages/home.md").write_text("damaged\n")
    (wiki / "data/pages/extra.md").write_text("not in the archive\n")
    state.set_setting("wiki.theme", "plain")

    # The service is a systemd unit; systemd is not running here, so the unit reads as
    # not running and is left alone (the systemd handler's commands are unit-tested).
    result = api.restore_apps(name, ["wiki"])

    assert result.status == "ok", describe(result)
    assert snapshot_tree(wiki) == before
    assert state.get_setting("wiki.theme") == "solarized"
    assert state.get_setting("wiki.pages") == 12
    assert state.get_setting("unrelated") is None
    assert not Path("/var/lib/plinth/backups-data/wiki-settings.json").exists()


def test_reference_archive_restores_from_an_exported_tarball(
    homesafe_env: Path, write_manifest: ManifestWriter, tmp_path: Path
) -> None:
    name, wiki = reference_archive(homesafe_env, write_manifest, bare_list=False)
    before = snapshot_tree(wiki)
    tarball = tmp_path / "freedombox-backup.tar.gz"
    plain_borg(homesafe_env, "export-tar", f"{homesafe_env}/home/repository::{name}", str(tarball))
    (wiki / "data/pages/home.md").unlink()

    result = api.import_apps(tarball)

    assert result.status == "ok", describe(result)
    assert snapshot_tree(wiki) == before
    assert state.get_setting("wiki.pages") == 12
