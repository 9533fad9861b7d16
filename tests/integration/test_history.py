"""The history of real operations (manual backups, a restore, failures) and what
`homesafe history` and `homesafe status` show of it."""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from homesafe import api, history, locations, schedules
from homesafe.engines.base import RetentionPolicy
from homesafe.status import status
from tests.conftest import ManifestWriter, requires_program

pytestmark = requires_program("borg")

UTC = datetime.UTC
HOMESAFE = shutil.which("homesafe", path=str(Path(sys.executable).parent)) or "homesafe"


def homesafe(*arguments: str) -> subprocess.CompletedProcess[str]:
    # A wide "terminal", so that table cells are not folded across lines.
    return subprocess.run(
        [HOMESAFE, *arguments], capture_output=True, text=True,
        env={**os.environ, "COLUMNS": "250"}, check=False,
    )  # fmt: skip


@pytest.fixture
def apps(homesafe_env: Path, write_manifest: ManifestWriter) -> Path:
    """ "alpha" (a 1000-byte file) and "beta", whose backup_pre hook fails while the
    file ``break-beta`` exists."""
    srv = homesafe_env / "srv"
    (srv / "alpha").mkdir(parents=True)
    (srv / "alpha/data.bin").write_bytes(b"a" * 1000)
    (srv / "beta").mkdir()
    (srv / "beta/data.txt").write_text("beta\n")
    write_manifest(
        "alpha",
        f"""
        id = "alpha"
        [data]
        directories = ["{srv}/alpha"]
        """,
    )
    write_manifest(
        "beta",
        f"""
        id = "beta"
        [data]
        directories = ["{srv}/beta"]
        [hooks]
        backup_pre = ["test", "!", "-e", "{homesafe_env}/break-beta"]
        """,
    )
    return homesafe_env


def test_every_backup_is_a_job_with_its_apps(apps: Path) -> None:
    good = api.backup_apps()
    (apps / "break-beta").touch()
    partial = api.backup_apps(comment="with a failure")

    newest, oldest = history.jobs()
    assert (oldest.operation, oldest.trigger, oldest.status) == ("backup", "manual", "ok")
    assert oldest.archive == good.archive
    assert oldest.repository == "default"
    assert oldest.error == ""
    assert oldest.started == datetime.datetime.fromisoformat(good.started)
    assert oldest.duration == pytest.approx(good.duration, abs=0.01)
    alpha = oldest.app("alpha")
    assert alpha is not None
    assert (alpha.status, alpha.strategy, alpha.size) == ("ok", "live", 1000)
    assert oldest.detail["engine"]["file_count"] >= 1

    assert (newest.status, newest.archive) == ("partial", partial.archive)
    assert "backup_pre hook failed" in newest.error
    beta = newest.app("beta")
    assert beta is not None and beta.status == "failed"
    assert beta.errors[0]["hook"] == "backup_pre"
    assert [job.id for job in history.jobs(app="beta")] == [newest.id, oldest.id]
    assert history.jobs(operation="restore") == []


def test_history_commands(apps: Path) -> None:
    api.backup_apps()
    (apps / "break-beta").touch()
    api.backup_apps()

    listed = homesafe("history", "--json")
    assert listed.returncode == 0, listed.stderr
    jobs = json.loads(listed.stdout)["jobs"]
    assert [job["status"] for job in jobs] == ["partial", "ok"]
    assert jobs[0]["detail"]["operation"] == "backup"
    assert {app["app"]: app["status"] for app in jobs[0]["apps"]} == {
        "alpha": "ok", "beta": "failed",
    }  # fmt: skip
    one = json.loads(homesafe("history", "--json", "--limit", "1").stdout)["jobs"]
    assert [job["id"] for job in one] == [jobs[0]["id"]]

    table = homesafe("history", "--app", "beta")
    assert table.returncode == 0, table.stderr
    assert "failed" in table.stdout and "backup_pre" in table.stdout
    assert homesafe("history", "--app", "nobody", "--json").stdout.strip() == '{\n  "jobs": []\n}'
    assert homesafe("history", "--operation", "nonsense").returncode == 2


def test_status_shows_last_good_backups_and_what_is_failing(apps: Path) -> None:
    first = api.backup_apps()
    (apps / "break-beta").touch()
    api.backup_apps()

    current = status()
    (repository,) = current.repositories
    by_app = {app.app: app for app in repository.apps}
    assert by_app["alpha"].last_good is not None
    assert by_app["alpha"].last_good.archive != first.archive  # the newer one
    assert by_app["beta"].last_good is not None
    assert by_app["beta"].last_good.archive == first.archive  # still the first
    assert by_app["beta"].failing
    assert current.problems == [
        f"beta: the last backup to default failed: {by_app['beta'].last_error}"
    ]
    assert "backup_pre hook failed" in by_app["beta"].last_error

    shown = homesafe("status", "--json")
    assert shown.returncode == 1
    document = json.loads(shown.stdout)
    assert document["healthy"] is False
    (entry,) = document["repositories"]
    assert entry["next_run"] is None  # no schedule
    alpha = next(app for app in entry["apps"] if app["app"] == "alpha")
    assert alpha["last_good_backup"]["archive"] == history.jobs()[0].archive
    text = homesafe("status")
    assert text.returncode == 1
    assert "beta: the last backup to default failed" in text.stdout

    (apps / "break-beta").unlink()
    api.backup_apps(["beta"])
    healed = homesafe("status")
    assert healed.returncode == 0, healed.stdout
    assert "Nothing is failing or overdue" in healed.stdout


def test_status_with_a_schedule_shows_next_run_and_overdue(apps: Path) -> None:
    now = datetime.datetime.now(UTC)
    schedule = schedules.Schedule(
        "default", enabled=True, timezone="UTC", excluded_apps=("beta",),
        enabled_since=now - datetime.timedelta(days=3),
    )  # fmt: skip
    schedules.save(schedule)
    current = status(now)
    (repository,) = current.repositories
    assert repository.decision is not None
    assert repository.decision.next_run == now  # never ran: due now
    assert set(repository.decision.overdue) == {"daily", "weekly", "monthly"}
    assert "alpha: never backed up to default" in current.problems
    assert not any(problem.startswith("beta") for problem in current.problems)
    assert any("daily backup is overdue" in problem for problem in current.problems)
    excluded = next(app for app in repository.apps if app.app == "beta")
    assert excluded.included is False
    document = json.loads(homesafe("status", "--json").stdout)
    assert document["repositories"][0]["schedule"]["excluded_apps"] == ["beta"]
    assert document["repositories"][0]["overdue"] == ["daily", "weekly", "monthly"]


def test_a_restore_is_recorded_too(apps: Path, tmp_path: Path) -> None:
    backup = api.backup_apps(["alpha"])
    (tmp_path / "target").mkdir()
    restored = api.restore_apps(backup.archive, ["alpha"], target_root=tmp_path / "target")
    (job,) = history.jobs(operation="restore")
    assert (job.archive, job.status) == (backup.archive, restored.status)
    assert [record.app for record in job.apps] == ["alpha"]


def test_verify_check_and_prune_are_recorded(apps: Path) -> None:
    backup = api.backup_apps(["alpha"])
    drill = api.verify_archive(backup.archive)
    (verify_job,) = history.jobs(operation="verify")
    assert (verify_job.archive, verify_job.status) == (backup.archive, drill.status)

    report = api.check_repository()
    (check_job,) = history.jobs(operation="check")
    assert check_job.status == ("ok" if report.ok else "failed")

    api.backup_apps(["alpha"])
    api.prune_repository(None, RetentionPolicy(keep_daily=1))
    (prune_job,) = history.jobs(operation="prune")
    assert prune_job.status == "ok"


def test_a_history_that_cannot_be_written_never_fails_the_operation(
    apps: Path, caplog: pytest.LogCaptureFixture
) -> None:
    result = api.backup_apps(["alpha"])
    database = locations.state_database()
    database.unlink()
    database.mkdir()  # sqlite cannot open a directory
    with caplog.at_level(logging.WARNING, logger="homesafe.history"):
        assert history.record_operation(result) is None
    assert "could not record the backup in the history" in caplog.text
