"""Status at a glance: per repository, the last good backup of each app, the next
scheduled run, and anything failing or overdue.

Read-only: it asks the history and the schedules, never a repository, so that it
answers at once even while a backup holds the repository lock.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from homesafe import history, locks, schedules
from homesafe.apps import App, load_apps
from homesafe.errors import HomesafeError
from homesafe.repositories import DEFAULT_NAME
from homesafe.scheduler import LOCK_NAME, history_runs
from homesafe.schedules import Decision, Schedule

__all__ = ["AppStatus", "RepositoryStatus", "Status", "status"]

UTC = datetime.UTC
RECENT_JOBS = 20  # enough to find the latest scheduled one among manual backups


@dataclass
class AppStatus:
    """One app in one repository: its last good backup and its last attempt."""

    app: str
    last_good: history.Job | None
    last_attempt: history.Job | None
    last_attempt_status: str | None
    last_error: str
    included: bool  # in the repository's schedule (True when there is none)

    @property
    def failing(self) -> bool:
        return self.last_attempt_status == "failed"

    def to_dict(self) -> dict[str, Any]:
        good = self.last_good
        return {
            "app": self.app,
            "last_good_backup": None
            if good is None
            else {"time": good.started.isoformat(), "archive": good.archive, "job": good.id},
            "last_attempt": None
            if self.last_attempt is None
            else {
                "time": self.last_attempt.started.isoformat(),
                "status": self.last_attempt_status,
                "job": self.last_attempt.id,
            },
            "failing": self.failing,
            "last_error": self.last_error,
            "scheduled": self.included,
        }


@dataclass
class RepositoryStatus:
    """One repository: its schedule and what it asks for now, its apps, its problems."""

    repository: str
    schedule: Schedule | None
    decision: Decision | None
    last_backup: history.Job | None
    apps: list[AppStatus] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "schedule": self.schedule.to_dict() if self.schedule else None,
            "next_run": self.decision.next_run.isoformat()
            if self.decision and self.decision.next_run
            else None,
            "due": list(self.decision.due) if self.decision else [],
            "overdue": list(self.decision.overdue) if self.decision else [],
            "last_backup": self.last_backup.to_dict(detail=False) if self.last_backup else None,
            "apps": [app.to_dict() for app in self.apps],
            "problems": self.problems,
        }


@dataclass
class Status:
    """Everything ``homesafe status`` shows; ``problems`` gathers every repository's."""

    now: datetime.datetime
    repositories: list[RepositoryStatus]
    problems: list[str]
    running: int | None  # the pid of a scheduled run in progress

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "healthy": self.healthy,
            "scheduled_run_in_progress": self.running,
            "repositories": [repository.to_dict() for repository in self.repositories],
            "problems": self.problems,
        }


def status(now: datetime.datetime | None = None, *, apps: dict[str, App] | None = None) -> Status:
    """The status of every repository that has a schedule or a history."""
    now = (now or datetime.datetime.now(UTC)).astimezone(UTC)
    problems: list[str] = []
    if apps is None:
        try:
            apps = load_apps()
        except HomesafeError as error:
            problems.append(f"apps cannot be loaded: {error.message}")
            apps = {}
    stored = {schedule.repository: schedule for schedule in schedules.all_schedules()}
    good = history.last_good_backups()
    attempts = history.last_app_attempts()
    names = sorted(
        {DEFAULT_NAME, *stored, *history.repositories()},
        key=lambda name: (name != DEFAULT_NAME, name),
    )
    repositories = []
    for name in names:
        schedule = stored.get(name)
        jobs = history.jobs(repository=name, operation="backup", limit=RECENT_JOBS)
        repository = _repository_status(name, schedule, jobs, apps, good, attempts, now)
        problems += repository.problems
        repositories.append(repository)
    return Status(now, repositories, problems, locks.holder(LOCK_NAME))


def _repository_status(
    name: str,
    schedule: Schedule | None,
    jobs: list[history.Job],
    apps: dict[str, App],
    good: dict[tuple[str, str], tuple[history.Job, history.AppRecord]],
    attempts: dict[tuple[str, str], tuple[history.Job, history.AppRecord]],
    now: datetime.datetime,
) -> RepositoryStatus:
    decision = None
    if schedule is not None:
        decision = schedules.decide(schedule, now, history_runs(name))
    result = RepositoryStatus(name, schedule, decision, jobs[0] if jobs else None)
    scheduled = schedule is not None and schedule.enabled

    app_ids = sorted({*apps, *(app for repository, app in attempts if repository == name)})
    for app_id in app_ids:
        last_good = good.get((name, app_id))
        attempt = attempts.get((name, app_id))
        record = attempt[1] if attempt else None
        error = ""
        if record is not None and record.errors:
            error = str(record.errors[0].get("message", ""))
        included = schedule is None or schedule.includes(app_id)
        app_status = AppStatus(
            app_id,
            last_good[0] if last_good else None,
            attempt[0] if attempt else None,
            record.status if record else None,
            error,
            included,
        )
        result.apps.append(app_status)
        if app_status.failing:
            result.problems.append(
                f"{app_id}: the last backup to {name} failed: {error or 'see homesafe history'}"
            )
        elif scheduled and included and app_id in apps and last_good is None:
            result.problems.append(f"{app_id}: never backed up to {name}")

    if decision is not None and decision.overdue:
        for period in decision.overdue:
            last = decision.last_success[period]
            when = f"last one {last.isoformat()}" if last else "none yet"
            result.problems.append(f"{name}: the {period} backup is overdue ({when})")
    scheduled_jobs = [job for job in jobs if job.trigger == "scheduled"]
    if scheduled_jobs and scheduled_jobs[0].status == "interrupted":
        started = scheduled_jobs[0].started.isoformat()
        result.problems.append(f"{name}: the scheduled backup started {started} was interrupted")
    if scheduled and not apps:
        result.problems.append(f"{name}: the schedule is on, but there are no apps to back up")
    prunes = history.jobs(repository=name, operation="prune", limit=1)
    if prunes and prunes[0].status == "failed":
        result.problems.append(f"{name}: pruning old archives failed: {prunes[0].error}")
    return result
