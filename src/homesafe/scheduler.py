"""Running the schedules: what ``homesafe schedule run`` does.

Safe to call every few minutes: under an flock (:mod:`homesafe.locks`) so that two runs
never overlap, each enabled schedule is asked what is due (:func:`schedules.decide`);
when something is, one backup serving every due period is made through
:func:`homesafe.api.backup_apps`, recorded in the history as a scheduled job, then
retention prunes the scheduled archives the keep counts no longer hold (through
:func:`homesafe.api.delete_archives`). Alerts go out when a run starts, succeeds or
fails, and once per day while a period is overdue.

The scheduler remembers its runs through the history; the archives themselves are the
second source (a state database lost or restored elsewhere does not start a burst of
backups): before a backup, scheduled archives the history does not know are counted too.

A run lists the repository once, before its backup: that listing serves the decision,
the new archive's name (known to be free, so restic need not list again to check it)
and retention afterwards (the archive just made added to it), so a run costs one
listing and one backup, plus the deletions retention asks for.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from homesafe import alerts, api, archives, history, locks, repositories, retention, schedules
from homesafe.apps import App, load_apps
from homesafe.engines import engine_for
from homesafe.errors import (
    EXIT_FAILURE,
    EXIT_PARTIAL,
    EXIT_SUCCESS,
    HomesafeError,
    RepositoryLockedError,
    RepositoryNotFoundError,
)
from homesafe.repositories import Repository
from homesafe.schedules import Decision, Run, Schedule

__all__ = ["LOCK_NAME", "Outcome", "Report", "repository_named", "run"]

logger = logging.getLogger(__name__)

UTC = datetime.UTC
LOCK_NAME = "schedule"
OVERDUE_REMINDER = datetime.timedelta(days=1)


@dataclass
class Report:
    """What one schedule's turn did.

    ``action``: disabled, nothing-due, repository-busy (another process holds the
    repository: tried again at the next check), backed-up or failed.
    """

    repository: str
    action: str
    decision: Decision | None = None
    job: int | None = None
    backup: dict[str, Any] | None = None
    pruned: list[str] = field(default_factory=list)
    error: str = ""
    deliveries: list[alerts.Delivery] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.action == "failed" or self.error:
            return EXIT_FAILURE
        if self.backup is not None and self.backup.get("status") == "partial":
            return EXIT_PARTIAL
        return EXIT_SUCCESS

    def to_dict(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "action": self.action,
            "decision": self.decision.to_dict() if self.decision else None,
            "job": self.job,
            "backup": self.backup,
            "pruned": self.pruned,
            "error": self.error,
            "alerts": [delivery.to_dict() for delivery in self.deliveries],
        }


@dataclass
class Outcome:
    """A whole ``schedule run``: busy (another run holds the lock) or one report each."""

    busy: bool
    reports: list[Report] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        codes = {report.exit_code for report in self.reports}
        for code in (EXIT_FAILURE, EXIT_PARTIAL):
            if code in codes:
                return code
        return EXIT_SUCCESS

    def to_dict(self) -> dict[str, Any]:
        return {"busy": self.busy, "schedules": [report.to_dict() for report in self.reports]}


def repository_named(name: str) -> Repository:
    """The repository a schedule names (the embedded default, or a registered one)."""
    return repositories.get(name)


def run(
    now: datetime.datetime | None = None,
    *,
    repository: str | None = None,
    apps: dict[str, App] | None = None,
) -> Outcome:
    """Run every enabled schedule (or only ``repository``'s) whose periods are due.

    ``now`` (aware; default: the clock) is the scheduler's notion of the time: it picks
    the periods due, names the archive and is recorded with the job. Returns at once,
    with ``busy``, when another run holds the lock.
    """
    now = (now or datetime.datetime.now(UTC)).astimezone(UTC)
    with locks.exclusive(LOCK_NAME) as held:
        if not held:
            logger.info("another scheduled run is in progress; nothing to do")
            return Outcome(busy=True)
        outcome = Outcome(busy=False)
        for schedule in schedules.all_schedules():
            if repository is not None and schedule.repository != repository:
                continue
            outcome.reports.append(_run_schedule(schedule, now, apps))
        return outcome


def history_runs(repository: str) -> list[Run]:
    """The scheduled runs the history remembers for ``repository``.

    A run is dated by the scheduler's clock when it decided; it served its periods when
    it left an archive (ok or partial). Runs still going or interrupted count as
    attempts (for the two-hour rule), not as successes.
    """
    found = []
    for job in history.scheduled_jobs(repository):
        moment = job.scheduled_at or job.started
        found.append(Run(moment, frozenset(job.periods), job.status in history.GOOD))
    return found


@dataclass
class _Listing:
    """What one listing of the repository told a run."""

    runs: list[Run]  # scheduled archives the history lacks, as runs
    scheduled: list[retention.ScheduledArchive]  # retention's candidates
    names: set[str]  # every archive's name


def _list_archives(repository: Repository, known_archives: set[str]) -> _Listing:
    """The repository's archives as a run needs them. A repository not created yet has
    none; a remote one is not probed first (a round trip of its own): its listing says
    whether it is there."""
    engine = engine_for(repository.engine)
    if not repository.is_remote and not engine.repository_exists(repository):
        return _Listing([], [], set())
    try:
        listed = engine.list_archives(repository)
    except RepositoryNotFoundError:
        return _Listing([], [], set())
    scheduled = retention.scheduled_archives(listed)
    runs = [
        Run(archive.time, archive.periods, True)
        for archive in scheduled
        if archive.name not in known_archives
    ]
    return _Listing(runs, scheduled, {summary.name for summary in listed})


def _run_schedule(
    schedule: Schedule, now: datetime.datetime, apps: dict[str, App] | None
) -> Report:
    if not schedule.enabled:
        return Report(schedule.repository, "disabled")
    runs = history_runs(schedule.repository)
    decision = schedules.decide(schedule, now, runs)
    report = Report(schedule.repository, "nothing-due", decision)
    if decision.due:
        report = _back_up(schedule, now, runs, apps)
    _alert_if_overdue(schedule, now, report)
    return report


def _back_up(
    schedule: Schedule,
    now: datetime.datetime,
    runs: list[Run],
    apps: dict[str, App] | None,
) -> Report:
    """Confirm what is due against the archives, back up, prune; alert on the way."""
    name = schedule.repository
    try:
        repository = repository_named(name)
        known = {job.archive for job in history.scheduled_jobs(name) if job.archive}
        listing = _list_archives(repository, known)
    except RepositoryLockedError as error:
        # Someone else (a manual backup, say) is using it: try again at the next check.
        logger.info("schedule of %s waits: %s", name, error.message)
        return Report(name, "repository-busy", schedules.decide(schedule, now, runs))
    except HomesafeError as error:
        return _failed_before_backup(schedule, now, schedules.decide(schedule, now, runs), error)
    decision = schedules.decide(schedule, now, [*runs, *listing.runs])
    report = Report(name, "nothing-due", decision)
    if not decision.due:
        return report
    try:
        known_apps = apps if apps is not None else load_apps()
    except HomesafeError as error:
        return _failed_before_backup(schedule, now, decision, error)
    app_ids = [app_id for app_id in known_apps if schedule.includes(app_id)]
    if not app_ids:
        # Nothing to back up is no success: a failed attempt, told like one (and, like
        # one, not tried again for two hours).
        problem = HomesafeError("every app is excluded from the schedule, or there is none")
        return _failed_before_backup(schedule, now, decision, problem)

    title_periods = ", ".join(decision.due)
    report.deliveries += alerts.send(
        alerts.Event(
            "start", name, f"Scheduled backup ({title_periods}) started",
            f"Scheduled {title_periods} backup of {len(app_ids)} apps to {name} started.",
        )
    )  # fmt: skip
    try:
        with history.job("backup", name, periods=decision.due, scheduled_at=now) as job:
            report.job = job.id
            result = _backup(repository, app_ids, known_apps, decision.due, now, listing.names)
    except HomesafeError as error:
        report.action = "failed"
        report.error = error.message
        report.deliveries += _send_failure(name, decision, error.message, {})
        return report
    report.backup = result.to_dict()
    if result.status == "failed":
        report.action = "failed"
        message = "; ".join(error.message for error in result.all_errors()) or "failed"
        report.error = message
        report.deliveries += _send_failure(name, decision, message, report.backup)
        return report
    report.action = "backed-up"
    failed_apps = [app.app for app in result.apps if app.status == "failed"]
    if failed_apps:
        message = f"Scheduled backup {result.archive} is partial: {', '.join(failed_apps)} failed."
        report.deliveries += _send_failure(name, decision, message, report.backup)
    else:
        report.deliveries += alerts.send(
            alerts.Event(
                "success", name, f"Scheduled backup ({title_periods}) succeeded",
                f"Scheduled backup {result.archive} of {len(result.apps)} apps succeeded.",
                {"archive": result.archive, "job": report.job},
            )
        )  # fmt: skip
    scheduled = with_archive_made(listing.scheduled, result.archive, now, decision.due)
    _prune(schedule, repository, now, report, scheduled)
    return report


def with_archive_made(
    scheduled: Sequence[retention.ScheduledArchive],
    archive_name: str,
    now: datetime.datetime,
    periods: Iterable[str],
) -> list[retention.ScheduledArchive]:
    """The scheduled archives listed before a run's backup, with the archive it made.

    The new archive is dated ``now``, the run's time, not when the engine wrote it (a
    moment later): retention ignores archives dated after the time it is given, and
    must count this one, the newest, so that the repository is left with the keep
    counts, the new archive among them (not one archive more until the next run).
    """
    return [*scheduled, retention.ScheduledArchive(archive_name, now, frozenset(periods))]


def _backup(
    repository: Repository,
    app_ids: Sequence[str],
    known_apps: dict[str, App],
    periods: Sequence[str],
    now: datetime.datetime,
    existing_names: set[str],
) -> api.OperationResult:
    name = archives.scheduled_name(now)
    if name not in existing_names:
        # Just listed, and only this host's scheduler (under its lock) makes its names.
        archives.known_to_be_free(name)
    return api.backup_apps(
        app_ids,
        repository=repository,
        archive_name=name,
        apps=known_apps,
        periods=periods,
    )


def _failed_before_backup(
    schedule: Schedule, now: datetime.datetime, decision: Decision, error: HomesafeError
) -> Report:
    """A run that could not even start a backup is still an attempt: recorded, alerted."""
    report = Report(schedule.repository, "failed", decision, error=error.message)
    report.job = history.record_failure(
        "backup", schedule.repository, error.message,
        trigger="scheduled", periods=decision.due, scheduled_at=now,
    )  # fmt: skip
    report.deliveries += _send_failure(schedule.repository, decision, error.message, {})
    return report


def _send_failure(
    repository: str, decision: Decision, message: str, details: dict[str, Any]
) -> list[alerts.Delivery]:
    periods = ", ".join(decision.due) or "scheduled"
    return alerts.send(
        alerts.Event(
            "failure",
            repository,
            f"Scheduled backup ({periods}) of {repository} failed",
            message,
            details,
        )
    )


def _prune(
    schedule: Schedule,
    repository: Repository,
    now: datetime.datetime,
    report: Report,
    scheduled: Sequence[retention.ScheduledArchive],
) -> None:
    """Delete the scheduled archives the keep counts no longer hold among ``scheduled``;
    record the prune."""
    started = datetime.datetime.now(UTC)
    try:
        plan = retention.plan(schedule, scheduled, now)
        if not plan.prune:
            return
        api.delete_archives(plan.prune, repository)
    except HomesafeError as error:
        report.error = f"pruning failed: {error.message}"
        history.record_job(
            "prune", schedule.repository, status="failed", started=started,
            error=error.message, trigger="scheduled", detail={"error": str(error)},
        )  # fmt: skip
        report.deliveries += alerts.send(
            alerts.Event(
                "failure", schedule.repository,
                f"Pruning old archives of {schedule.repository} failed", error.message,
            )
        )  # fmt: skip
        return
    report.pruned = list(plan.prune)
    history.record_job(
        "prune", schedule.repository, status="ok", started=started, trigger="scheduled",
        detail={"deleted": list(plan.prune), "kept": list(plan.keep)},
    )  # fmt: skip


def _alert_if_overdue(schedule: Schedule, now: datetime.datetime, report: Report) -> None:
    """Once a day while a period is overdue, tell the channels listening for it."""
    decision = schedules.decide(schedule, now, history_runs(schedule.repository))
    if not decision.overdue:
        return
    last_alert = schedules.overdue_alerted(schedule.repository)
    successes = [time for time in decision.last_success.values() if time is not None]
    last_success = max(successes, default=None)
    if (
        last_alert is not None
        and (last_success is None or last_alert > last_success)
        and now - last_alert < OVERDUE_REMINDER
    ):
        return
    since = {period: decision.last_success[period] for period in decision.overdue}
    described = ", ".join(
        f"{period} (last {time.isoformat() if time else 'never'})" for period, time in since.items()
    )
    report.deliveries += alerts.send(
        alerts.Event(
            "overdue", schedule.repository,
            f"Backups of {schedule.repository} are overdue",
            f"Scheduled backups of {schedule.repository} are overdue: {described}.",
            {"decision": decision.to_dict()},
        )
    )  # fmt: skip
    schedules.mark_overdue_alerted(schedule.repository, now)
