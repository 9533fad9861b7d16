"""One backup written to several repositories at once (real borg and restic).

The apps are captured once (one stop of the service), then each repository gets the
same archive from its own engine process; a repository that fails, before the write
(missing) or during it (a wrong passphrase), does not fail the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from homesafe import api, history, repositories
from homesafe.engines import engine_for
from homesafe.repositories import Repository
from tests.conftest import DaemonFactory, ManifestWriter, requires_program
from tests.support.apps import command_service, describe, make_tree, to_toml
from tests.support.repositories import local_repository

pytestmark = [requires_program("borg"), requires_program("restic")]

HOMESAFE = str(Path(sys.executable).parent / "homesafe")


def register_local(name: str, engine: str, location: Path) -> Repository:
    repositories.register(local_repository(name, engine, location))
    return repositories.get(name)


@pytest.fixture
def app_with_service(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> Path:
    daemon = daemon_factory("shop")
    daemon.start()
    data = make_tree(homesafe_env / "srv" / "shop", {"orders.db": os.urandom(50_000)})
    write_manifest(
        "shop",
        to_toml(
            {
                "id": "shop",
                "data": {"directories": [str(data)]},
                "services": [command_service(daemon, "shop")],
            }
        ),
    )
    return daemon.state


def names_in(repository: Repository) -> list[str]:
    return [summary.name for summary in engine_for(repository.engine).list_archives(repository)]


def test_one_capture_written_to_borg_and_restic_repositories(
    app_with_service: Path, tmp_path: Path
) -> None:
    second = register_local("second", "borg", tmp_path / "second")
    third = register_local("third", "restic", tmp_path / "third")
    default = repositories.default_repository()

    result = api.backup_apps(["shop"], repositories=[default, second, third])

    assert result.status == "ok", describe(result)
    assert [(d.repository, d.status) for d in result.destinations] == [
        ("default", "ok"),
        ("second", "ok"),
        ("third", "ok"),
    ]
    for repository in (default, second, third):
        assert result.archive in names_in(repository)
    calls = (app_with_service / "calls").read_text().split()
    assert calls.count("stop") == 1, calls  # quiesced once for the three
    # Every repository restores the app.
    for repository in (second, third):
        target = tmp_path / f"restored-{repository.name}"
        target.mkdir()
        restored = api.restore_apps(result.archive, repository=repository, target_root=target)
        assert restored.status == "ok", describe(restored)
    # One history job per repository.
    jobs = history.jobs(archive=result.archive, operation="backup")
    assert sorted(job.repository for job in jobs) == ["default", "second", "third"]
    assert {job.status for job in jobs} == {"ok"}


def test_a_failing_repository_does_not_fail_the_others(
    app_with_service: Path, tmp_path: Path
) -> None:
    good = register_local("good", "borg", tmp_path / "good")
    wrong = register_local("wrong", "borg", tmp_path / "wrong")
    assert wrong.passphrase_file is not None
    wrong.passphrase_file.write_text("not the passphrase\n")  # fails inside borg create
    missing = Repository(name="missing", location=str(tmp_path / "nowhere"))

    result = api.backup_apps(["shop"], repositories=[missing, good, wrong])

    assert result.status == "partial", describe(result)
    assert result.exit_code == 3
    outcome = {d.repository: (d.status, d.error or "") for d in result.destinations}
    assert outcome["good"] == ("ok", "")
    assert outcome["missing"][0] == "failed" and "no repository" in outcome["missing"][1]
    assert outcome["wrong"][0] == "failed" and "passphrase" in outcome["wrong"][1].lower()
    assert result.app("shop").status == "ok"
    assert any("not in repository 'wrong'" in w for w in result.app("shop").warnings)
    assert names_in(good) == [result.archive]
    jobs = {job.repository: job for job in history.jobs(archive=result.archive)}
    assert jobs["good"].status == "ok"
    assert jobs["wrong"].status == "failed" and "not written to wrong" in jobs["wrong"].error


def test_every_repository_failing_fails_the_backup_and_restarts_the_service(
    app_with_service: Path, tmp_path: Path
) -> None:
    wrong = register_local("wrong", "borg", tmp_path / "wrong")
    assert wrong.passphrase_file is not None
    wrong.passphrase_file.write_text("not the passphrase\n")
    other = register_local("other", "borg", tmp_path / "other")
    assert other.passphrase_file is not None
    other.passphrase_file.write_text("not this one either\n")

    result = api.backup_apps(["shop"], repositories=[wrong, other])

    assert result.status == "failed"
    assert result.app("shop").status == "failed"
    assert {d.status for d in result.destinations} == {"failed"}
    calls = (app_with_service / "calls").read_text().split()
    assert calls[-1] == "start"


def test_backup_with_repo_twice_on_the_command_line(app_with_service: Path, tmp_path: Path) -> None:
    register_local("spare", "borg", tmp_path / "spare")

    completed = subprocess.run(
        [HOMESAFE, "backup", "--repo", "default", "--repo", "spare", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    assert [d["repository"] for d in document["destinations"]] == ["default", "spare"]
    assert all(d["engine"]["file_count"] >= 1 for d in document["destinations"])
    text = subprocess.run(
        [HOMESAFE, "backup", "--repo", "default", "--repo", "spare"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert text.returncode == 0, text.stderr
    assert "written to default" in text.stdout and "written to spare" in text.stdout


def test_only_the_repository_that_missed_the_archive_is_alerted(
    app_with_service: Path, tmp_path: Path
) -> None:
    from homesafe import alerts
    from tests.support.alert_servers import http_server

    register_local("good", "borg", tmp_path / "good")
    wrong = register_local("wrong", "borg", tmp_path / "wrong")
    assert wrong.passphrase_file is not None
    wrong.passphrase_file.write_text("not the passphrase\n")
    with http_server() as server:
        for name in ("good", "wrong"):
            alerts.add_channel(
                name, f"{name}-hook", "webhook", settings={"url": f"{server.url}/{name}"}
            )

        completed = subprocess.run(
            [HOMESAFE, "backup", "--repo", "good", "--repo", "wrong"],
            capture_output=True,
            text=True,
            check=False,
        )

        assert completed.returncode == 3, completed.stdout + completed.stderr
        assert "not written to wrong" in completed.stdout
        (request,) = server.wait_for(1)
        assert request.path == "/wrong"
        body = json.loads(request.body)
        assert body["event"] == "failure" and "Not written here" in body["message"]
        assert len(server.requests) == 1
