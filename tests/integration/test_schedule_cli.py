"""`homesafe schedule` driven as a user would: set, show, run (a real borg backup),
install and uninstall; exit statuses and JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ManifestWriter, requires_program

pytestmark = requires_program("borg")

HOMESAFE = shutil.which("homesafe", path=str(Path(sys.executable).parent)) or "homesafe"


def homesafe(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HOMESAFE, *arguments], capture_output=True, text=True,
        env={**os.environ, "COLUMNS": "200"}, check=False,
    )  # fmt: skip


@pytest.fixture
def apps(homesafe_env: Path, write_manifest: ManifestWriter) -> Path:
    srv = homesafe_env / "srv"
    for app_id in ("alpha", "beta"):
        (srv / app_id).mkdir(parents=True)
        (srv / app_id / "data.txt").write_text(f"{app_id}\n")
        write_manifest(
            app_id,
            f"""
            id = "{app_id}"
            [data]
            directories = ["{srv}/{app_id}"]
            [hooks]
            backup_pre = ["test", "!", "-e", "{homesafe_env}/break-{app_id}"]
            """,
        )
    return homesafe_env


def test_set_show_and_run(apps: Path) -> None:
    shown = homesafe("schedule")
    assert shown.returncode == 0, shown.stderr
    assert "disabled" in shown.stdout

    changed = homesafe(
        "schedule", "set", "--enable", "--daily", "2", "--weekly", "1", "--monthly", "0",
        "--hour", "3", "--timezone", "Europe/Berlin", "--exclude", "beta", "--json",
    )  # fmt: skip
    assert changed.returncode == 0, changed.stderr
    schedule = json.loads(changed.stdout)["schedule"]
    assert schedule["enabled"] is True
    assert (schedule["daily_to_keep"], schedule["weekly_to_keep"]) == (2, 1)
    assert (schedule["monthly_to_keep"], schedule["run_at_hour"]) == (0, 3)
    assert schedule["timezone"] == "Europe/Berlin"
    assert schedule["excluded_apps"] == ["beta"]
    assert schedule["enabled_since"]

    document = json.loads(homesafe("schedule", "show", "--json").stdout)
    assert document["decision"]["due"] == ["daily", "weekly"]
    assert document["alerts"] == []

    ran = homesafe("schedule", "run", "--json")
    assert ran.returncode == 0, ran.stderr
    (report,) = json.loads(ran.stdout)["schedules"]
    assert report["action"] == "backed-up"
    assert [app["app"] for app in report["backup"]["apps"]] == ["alpha"]
    listed = json.loads(homesafe("archives", "list", "--json").stdout)["archives"]
    assert [archive["name"] for archive in listed] == [report["backup"]["archive"]]

    again = homesafe("schedule", "run")
    assert again.returncode == 0, again.stderr
    assert "nothing due; next run" in again.stdout
    assert homesafe("schedule", "run", "--quiet").stdout == ""

    text = homesafe("schedule", "show")
    assert "excluded apps: beta" in text.stdout
    assert "next run:" in text.stdout
    included = homesafe("schedule", "set", "--include", "beta", "--json")
    assert json.loads(included.stdout)["schedule"]["excluded_apps"] == []
    history = json.loads(homesafe("history", "--json").stdout)["jobs"]
    assert [(job["trigger"], job["periods"]) for job in history] == [
        ("scheduled", ["daily", "weekly"])
    ]


def test_a_partial_scheduled_backup_exits_3(apps: Path) -> None:
    (apps / "break-beta").touch()
    assert homesafe("schedule", "set", "--enable").returncode == 0
    ran = homesafe("schedule", "run")
    assert ran.returncode == 3, ran.stdout + ran.stderr
    assert "(partial)" in ran.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "nothing to change"),
        (["--timezone", "Mars/Olympus_Mons"], "unknown time zone"),
        (["--hour", "24"], "not in the range"),
        (["--daily", "-1"], "not in the range"),
        (["--exclude", "alpha", "--include", "alpha"], "both excluded and included"),
        (["--repository", "nowhere", "--enable"], "no repository named 'nowhere'"),
    ],
)
def test_set_refuses_nonsense(apps: Path, arguments: list[str], message: str) -> None:
    refused = homesafe("schedule", "set", *arguments)
    assert refused.returncode == 2
    assert message in refused.stderr
    assert json.loads(homesafe("schedule", "show", "--json").stdout)["schedule"]["enabled"] is False


def test_install_and_uninstall(homesafe_env: Path) -> None:
    units = homesafe_env / "units"
    installed = homesafe(
        "schedule", "install", "--init", "systemd", "--directory", str(units), "--every", "10"
    )
    assert installed.returncode == 0, installed.stderr
    assert "systemctl enable --now homesafe-schedule.timer" in installed.stdout
    service = (units / "homesafe-schedule.service").read_text()
    assert f"ExecStart={HOMESAFE} schedule run --quiet\n" in service
    assert f"Environment=HOMESAFE_HOME={os.environ['HOMESAFE_HOME']}\n" in service
    assert "OnCalendar=*-*-* *:00/10:00\n" in (units / "homesafe-schedule.timer").read_text()

    cron = homesafe_env / "cron.d" / "homesafe"
    written = homesafe(
        "schedule", "install", "--init", "cron", "--cron-file", str(cron),
        "--command", "/usr/bin/homesafe",
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    assert cron.read_text().splitlines()[-1] == (
        "*/15 * * * * root /usr/bin/homesafe schedule run --quiet"
    )
    odd = homesafe_env / "odd"
    refused = homesafe("schedule", "install", "--every", "7", "--cron-file", str(odd))
    assert refused.returncode == 2
    assert "divide an hour" in refused.stderr
    assert not odd.exists()

    removed = homesafe("schedule", "uninstall", "--init", "systemd", "--directory", str(units))
    assert removed.returncode == 0, removed.stderr
    assert list(units.iterdir()) == []
    gone = homesafe("schedule", "uninstall", "--init", "cron", "--cron-file", str(cron))
    assert gone.returncode == 0, gone.stderr
    assert not cron.exists()
