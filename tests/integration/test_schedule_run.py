"""`schedule run` for real: borg backups and retention in a temp repository, alerts to
real local servers, the history after successes and failures, and the lock that keeps
two runs apart (and that a dead process cannot leave behind)."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homesafe import alerts, api, archives, history, locations, locks, scheduler, schedules
from homesafe.repositories import default_passphrase_file
from tests.conftest import ManifestWriter, requires_program
from tests.support.alert_servers import RecordingServer, http_server

pytestmark = requires_program("borg")

UTC = datetime.UTC
HOMESAFE = shutil.which("homesafe", path=str(Path(sys.executable).parent)) or "homesafe"


@pytest.fixture
def apps(homesafe_env: Path, write_manifest: ManifestWriter) -> Path:
    """Apps "alpha" and "beta" with a file each; "beta"'s backup_pre hook fails while
    the file ``break-beta`` exists, and waits while ``hold-beta`` exists."""
    srv = homesafe_env / "srv"
    for app_id in ("alpha", "beta"):
        (srv / app_id).mkdir(parents=True)
        (srv / app_id / "data.txt").write_text(f"{app_id} data\n")
    write_manifest(
        "alpha",
        f"""
        id = "alpha"
        [data]
        directories = ["{srv}/alpha"]
        """,
    )
    breaker, holder = homesafe_env / "break-beta", homesafe_env / "hold-beta"
    started = homesafe_env / "beta-started"
    script = f"touch {started}; while [ -e {holder} ]; do sleep 0.05; done; test ! -e {breaker}"
    write_manifest(
        "beta",
        f"""
        id = "beta"
        [data]
        directories = ["{srv}/beta"]
        [hooks]
        backup_pre = ["sh", "-c", "{script}"]
        """,
    )
    return homesafe_env


@pytest.fixture
def server(homesafe_env: Path) -> Iterator[RecordingServer]:
    with http_server() as running:
        alerts.add_channel("default", "hook", "webhook", settings={"url": f"{running.url}/hook"})
        alerts.add_channel("default", "hc", "healthchecks", settings={"url": f"{running.url}/hc"})
        yield running


def enable(**settings: object) -> schedules.Schedule:
    """Switch the default schedule on; its hour is 12 hours away from now (UTC), so
    that no new slot comes up during a test that moves the clock a few hours on."""
    settings.setdefault("timezone", "UTC")
    settings.setdefault("run_at_hour", (datetime.datetime.now(UTC).hour + 12) % 24)
    schedule = schedules.load_or_default("default").changed(enabled=True, **settings)
    schedules.save(schedule)
    return schedule


def scheduled_archives() -> dict[str, archives.CommentSummary]:
    """The archives listed with a schedule period, by name (as retention reads them)."""
    from homesafe.engines import engine_for
    from homesafe.repositories import default_repository

    repository = default_repository()
    listing = engine_for(repository.engine).list_archives(repository)
    return {summary.name: archives.parse_comment(summary.comment) for summary in listing}


def events(server: RecordingServer) -> list[str]:
    """What the channels received: webhook events by name, pings by path."""
    seen = []
    for request in server.requests:
        if request.path == "/hook":
            seen.append(json.loads(request.body)["event"])
        else:
            seen.append(request.path)
    return seen


def test_a_run_backs_up_what_is_due_once_and_records_it(
    apps: Path, server: RecordingServer
) -> None:
    enable(excluded_apps=("beta",))
    now = datetime.datetime.now(UTC)

    outcome = scheduler.run(now)

    (report,) = outcome.reports
    assert report.action == "backed-up", report.to_dict()
    assert outcome.exit_code == 0
    assert report.backup is not None
    archive = report.backup["archive"]
    assert archive.startswith("scheduled-")
    listed = scheduled_archives()
    assert listed[archive].apps == ["alpha"]  # beta is excluded
    assert listed[archive].periods == ["daily", "weekly", "monthly"]
    (job,) = history.jobs()
    assert (job.operation, job.trigger, job.status, job.archive) == (
        "backup", "scheduled", "ok", archive,
    )  # fmt: skip
    assert job.periods == ["daily", "weekly", "monthly"]
    assert job.scheduled_at == now
    assert [(record.app, record.status) for record in job.apps] == [("alpha", "ok")]
    assert job.apps[0].size == len("alpha data\n")
    assert events(server) == ["/hc/start", "/hc"]

    # Idempotent: called again (a timer every few minutes), nothing is due.
    again = scheduler.run(now + datetime.timedelta(minutes=10))
    assert again.reports[0].action == "nothing-due"
    assert again.reports[0].decision is not None
    assert again.reports[0].decision.next_run is not None
    assert len(scheduled_archives()) == 1
    assert len(history.jobs()) == 1


def test_retention_prunes_old_scheduled_archives_and_never_manual_ones(
    apps: Path, server: RecordingServer
) -> None:
    enable(daily_to_keep=2, weekly_to_keep=0, monthly_to_keep=0, excluded_apps=("beta",))
    start = datetime.datetime.now(UTC)
    made = []
    for day in range(4):
        if day == 1:
            manual = api.backup_apps(["alpha"], comment="by hand")
            assert manual.status == "ok"
        report = scheduler.run(start + datetime.timedelta(days=day)).reports[0]
        assert report.action == "backed-up", report.to_dict()
        assert report.backup is not None
        made.append(report.backup["archive"])
        if day >= 2:
            assert report.pruned == [made[day - 2]]

    left = scheduled_archives()
    assert set(left) == {made[2], made[3], manual.archive}
    assert left[manual.archive].periods == []
    prunes = history.jobs(operation="prune")
    assert [job.detail["deleted"] for job in reversed(prunes)] == [[made[0]], [made[1]]]
    assert all(job.status == "ok" and job.trigger == "scheduled" for job in prunes)
    assert [job.trigger for job in history.jobs(operation="backup")].count("manual") == 1


def test_a_failing_backup_is_recorded_alerted_retried_and_overdue(
    apps: Path, server: RecordingServer
) -> None:
    enable(excluded_apps=("alpha",))
    (apps / "break-beta").touch()
    start = datetime.datetime.now(UTC)

    first = scheduler.run(start).reports[0]

    assert first.action == "failed"
    assert "backup_pre hook failed" in first.error
    assert first.job is not None
    (job,) = history.jobs()
    assert (job.id, job.status, job.trigger) == (first.job, "failed", "scheduled")
    assert "backup_pre hook failed" in job.error
    assert job.app("beta") is not None and job.app("beta").status == "failed"  # type: ignore[union-attr]
    assert events(server) == ["/hc/start", "/hc/fail", "failure"]
    failure = json.loads(server.requests[2].body)
    assert failure["details"]["apps"][0]["errors"][0]["hook"] == "backup_pre"

    # Within two hours: nothing is retried, but an hour on the periods are overdue.
    blocked = scheduler.run(start + datetime.timedelta(minutes=70)).reports[0]
    assert blocked.action == "nothing-due"
    assert blocked.decision is not None and blocked.decision.blocked_until is not None
    assert events(server)[3:] == ["overdue"]
    # ... told once, not at every check.
    scheduler.run(start + datetime.timedelta(minutes=90))
    assert events(server)[4:] == []

    retry = scheduler.run(start + datetime.timedelta(hours=2, minutes=1)).reports[0]
    assert retry.action == "failed"
    (apps / "break-beta").unlink()
    healed = scheduler.run(start + datetime.timedelta(hours=4, minutes=2)).reports[0]
    assert healed.action == "backed-up", healed.to_dict()
    assert [job.status for job in history.jobs()] == ["ok", "failed", "failed"]
    assert events(server)[4:] == ["/hc/start", "/hc/fail", "failure", "/hc/start", "/hc"]


def test_a_run_that_cannot_start_its_backup_is_recorded_and_alerted(
    apps: Path, server: RecordingServer
) -> None:
    api.backup_apps(["alpha"])  # creates the repository and its passphrase
    passphrase = default_passphrase_file().read_text().strip()
    default_passphrase_file().rename(default_passphrase_file().with_suffix(".moved"))
    enable()

    report = scheduler.run().reports[0]

    assert report.action == "failed"
    assert "passphrase file" in report.error
    scheduled = history.jobs(operation="backup")[0]
    assert (scheduled.status, scheduled.trigger) == ("failed", "scheduled")
    assert "passphrase file" in scheduled.error
    assert scheduled.periods == ["daily", "weekly", "monthly"]
    # It failed reading the archives, before the backup (and its start ping).
    assert events(server) == ["/hc/fail", "failure"]
    # The passphrase is nowhere in the state database.
    assert passphrase.encode() not in locations.state_database().read_bytes()


def test_a_lost_state_database_does_not_start_a_burst_of_backups(
    apps: Path, server: RecordingServer
) -> None:
    """The archives are the second memory: their periods say what was served."""
    enable(excluded_apps=("beta",))
    assert scheduler.run().reports[0].action == "backed-up"
    locations.state_database().unlink()
    enable(excluded_apps=("beta",))
    report = scheduler.run(datetime.datetime.now(UTC) + datetime.timedelta(minutes=5))
    assert report.reports[0].action == "nothing-due"
    assert len(scheduled_archives()) == 1


def test_a_lock_held_by_another_process_makes_a_run_wait_its_turn(
    apps: Path, server: RecordingServer
) -> None:
    """While another process holds the lock, a run does nothing; once that process is
    killed (-9, no clean-up at all) the next run goes ahead."""
    enable(excluded_apps=("beta",))
    path = locks.lock_path(scheduler.LOCK_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, f'{os.getpid()}'.encode())\n"
         "print('held', flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert locks.holder(scheduler.LOCK_NAME) == holder.pid
        busy = scheduler.run()
        assert busy.busy and busy.reports == []
        assert history.jobs() == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    assert locks.holder(scheduler.LOCK_NAME) is None
    assert scheduler.run().reports[0].action == "backed-up"


def test_two_schedule_run_commands_never_overlap(apps: Path, server: RecordingServer) -> None:
    """The first run is held inside beta's backup_pre hook; a second `homesafe schedule
    run` meanwhile does nothing and says so; the first then finishes its backup."""
    enable()
    (apps / "hold-beta").touch()
    environment = os.environ.copy()
    first = subprocess.Popen(
        [HOMESAFE, "schedule", "run", "--json"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=environment,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (apps / "beta-started").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(
            [HOMESAFE, "schedule", "run"], capture_output=True, text=True, env=environment,
            check=False,
        )  # fmt: skip
        assert second.returncode == 0, second.stderr
        assert "in progress" in second.stdout
        running = history.jobs()
        assert [(job.status, job.trigger) for job in running] == [("running", "scheduled")]
    finally:
        (apps / "hold-beta").unlink()
    output, errors = first.communicate(timeout=120)
    assert first.returncode == 0, errors
    (report,) = json.loads(output)["schedules"]
    assert report["action"] == "backed-up"
    assert [app["app"] for app in report["backup"]["apps"]] == ["alpha", "beta"]
    assert [job.status for job in history.jobs()] == ["ok"]


def test_a_running_row_whose_pid_was_reused_since_is_shown_interrupted(apps: Path) -> None:
    """A row left 'running' by a killed run, whose pid a process started later has
    taken (here: this test's own process, for a row dated before it started)."""
    from homesafe import state

    opened = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    with state.connect() as connection:
        connection.execute(
            "INSERT INTO jobs (operation, trigger, status, repository, archive, started, "
            "scheduled_at, periods, process, error, detail) "
            "VALUES ('backup', 'scheduled', 'running', 'default', '', ?, NULL, '[]', ?, "
            "'', '{}')",
            (opened.isoformat(), os.getpid()),
        )
    (job,) = history.jobs()
    assert job.status == "interrupted"


def test_an_interrupted_run_is_shown_as_such_and_counts_as_an_attempt(
    apps: Path, server: RecordingServer
) -> None:
    """A run killed half way leaves its row 'running' with a pid that is gone: the
    history shows it as interrupted, and the two-hour rule counts it."""
    enable()
    (apps / "hold-beta").touch()
    run = subprocess.Popen(
        [HOMESAFE, "schedule", "run"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=os.environ.copy(), start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (apps / "beta-started").exists():
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    (apps / "hold-beta").unlink()
    (job,) = history.jobs()
    assert job.status == "interrupted"
    assert scheduler.run().reports[0].action == "nothing-due"
    from homesafe.status import status

    assert any("interrupted" in problem for problem in status().problems)
    # The lockdown flags a killed run leaves are the journal's business, not ours.


def test_a_schedule_with_every_app_excluded_is_a_failure_not_a_silence(
    apps: Path, server: RecordingServer
) -> None:
    enable(excluded_apps=("alpha", "beta"))
    start = datetime.datetime.now(UTC)
    report = scheduler.run(start).reports[0]
    assert report.action == "failed"
    assert "every app is excluded" in report.error
    (job,) = history.jobs()
    assert (job.status, job.trigger) == ("failed", "scheduled")
    assert events(server) == ["/hc/fail", "failure"]
    # A failed attempt like any other: not repeated at every check.
    assert scheduler.run(start + datetime.timedelta(minutes=15)).reports[0].action == (
        "nothing-due"
    )
