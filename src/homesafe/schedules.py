"""Schedules: when a repository's periodic backup is due, and their settings.

One schedule per repository, with the reference design's settings as the floor: keep
counts for daily, weekly and monthly archives, the hour of the day to run at, and the
apps left out (a negative list, so that new apps are backed up without asking).

The decisions are pure functions of a schedule, the time ``now`` (always aware) and the
runs made so far, so that they can be tested over a simulated calendar:

* Each period has *slots*: every day (daily), every Sunday (weekly) and every 1st of
  the month (monthly) at ``run_at_hour`` in the schedule's time zone. On a day when the
  clock skips that hour (DST starts) the slot is the first instant after the gap; on a
  day when the hour happens twice (DST ends) it is the first of the two.
* A period is *pending* when its latest slot has not been served: no successful run
  with that period happened since two hours before the slot. A slot missed because the
  machine was off is caught up at the next check, however late; a run in the two hours
  before a slot serves it (it would have been too soon anyway).
* Nothing runs within two hours (:data:`MINIMUM_GAP`) of the previous scheduled run,
  whether it succeeded or not: a failing backup is retried, but not every few minutes.
* Every pending period is served by one archive; a period kept 0 times never runs.
* Runs dated in the future (the clock was set back) are ignored, except that one dated
  less than :data:`MINIMUM_GAP` ahead still blocks: a small step back of the clock must
  not start a second backup.
* A pending period is *overdue* one hour (:data:`OVERDUE_AFTER`) after its slot (or
  after the schedule was enabled, if that is later).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from homesafe import state
from homesafe.errors import UsageError

__all__ = [
    "MINIMUM_GAP",
    "OVERDUE_AFTER",
    "PERIODS",
    "Decision",
    "Run",
    "Schedule",
    "all_schedules",
    "decide",
    "load",
    "load_or_default",
    "local_timezone",
    "mark_overdue_alerted",
    "next_slot",
    "overdue_alerted",
    "save",
    "slot",
]

UTC = datetime.UTC
PERIODS = ("daily", "weekly", "monthly")
MINIMUM_GAP = datetime.timedelta(hours=2)
OVERDUE_AFTER = datetime.timedelta(hours=1)
SUNDAY = 6  # datetime.date.weekday()


def local_timezone() -> str:
    """The machine's IANA time zone name (``TZ``, /etc/timezone, /etc/localtime), or UTC."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    with contextlib.suppress(OSError):
        candidates.append(Path("/etc/timezone").read_text().strip())
    try:
        target = os.readlink("/etc/localtime")
        if "zoneinfo/" in target:
            candidates.append(target.split("zoneinfo/", 1)[1])
    except OSError:
        pass
    for name in candidates:
        if name and _valid_zone(name):
            return name
    return "UTC"


def _valid_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Schedule:
    """The periodic backup of one repository.

    ``enabled_since`` (UTC) is when the schedule was last switched on: a period cannot
    be overdue before it.
    """

    repository: str
    enabled: bool = False
    daily_to_keep: int = 5
    weekly_to_keep: int = 3
    monthly_to_keep: int = 3
    run_at_hour: int = 2
    timezone: str = field(default_factory=local_timezone)
    excluded_apps: tuple[str, ...] = ()
    enabled_since: datetime.datetime | None = None

    def __post_init__(self) -> None:
        for period in PERIODS:
            if self.keep(period) < 0:
                raise UsageError(f"{period} keep count must be 0 or more")
        if not 0 <= self.run_at_hour <= 23:
            raise UsageError(f"run_at_hour must be 0 to 23, not {self.run_at_hour}")
        if not _valid_zone(self.timezone):
            raise UsageError(
                f"unknown time zone {self.timezone!r}",
                hint="Use an IANA name such as Europe/Berlin or UTC.",
            )

    def keep(self, period: str) -> int:
        """How many archives of ``period`` retention keeps."""
        return int(getattr(self, f"{period}_to_keep"))

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def includes(self, app_id: str) -> bool:
        return app_id not in self.excluded_apps

    def changed(self, **changes: Any) -> Schedule:
        """A copy with ``changes``; switching it on records ``enabled_since``."""
        updated = replace(self, **changes)
        if updated.enabled and not self.enabled:
            updated = replace(updated, enabled_since=datetime.datetime.now(UTC))
        return updated

    def to_dict(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "enabled": self.enabled,
            "daily_to_keep": self.daily_to_keep,
            "weekly_to_keep": self.weekly_to_keep,
            "monthly_to_keep": self.monthly_to_keep,
            "run_at_hour": self.run_at_hour,
            "timezone": self.timezone,
            "excluded_apps": list(self.excluded_apps),
            "enabled_since": self.enabled_since.isoformat() if self.enabled_since else None,
        }

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Schedule:
        since = value.get("enabled_since")
        return cls(
            repository=str(value["repository"]),
            enabled=bool(value.get("enabled", False)),
            daily_to_keep=int(value.get("daily_to_keep", 5)),
            weekly_to_keep=int(value.get("weekly_to_keep", 3)),
            monthly_to_keep=int(value.get("monthly_to_keep", 3)),
            run_at_hour=int(value.get("run_at_hour", 2)),
            timezone=str(value.get("timezone") or local_timezone()),
            excluded_apps=tuple(str(app) for app in value.get("excluded_apps", [])),
            enabled_since=datetime.datetime.fromisoformat(since) if since else None,
        )


@dataclass(frozen=True)
class Run:
    """A scheduled run made before: when it was decided, which periods it served, and
    whether it left an archive (a failed run still counts for the two-hour rule)."""

    time: datetime.datetime
    periods: frozenset[str]
    succeeded: bool = True


@dataclass(frozen=True)
class Decision:
    """What a schedule asks for at one instant.

    ``due``: the periods to back up now, in one archive (empty when nothing runs);
    ``pending``: the periods whose latest slot is unserved (due unless the two-hour rule
    or a disabled schedule holds them back); ``overdue``: pending periods past
    :data:`OVERDUE_AFTER`; ``blocked_until``: the end of the two-hour gap, when it
    holds; ``next_run``: when a run is due next (``now`` when one is due now; None when
    the schedule is disabled or keeps nothing).
    """

    now: datetime.datetime
    due: tuple[str, ...]
    pending: tuple[str, ...]
    overdue: tuple[str, ...]
    blocked_until: datetime.datetime | None
    next_run: datetime.datetime | None
    last_success: dict[str, datetime.datetime | None]

    def to_dict(self) -> dict[str, Any]:
        def iso(value: datetime.datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "now": iso(self.now),
            "due": list(self.due),
            "pending": list(self.pending),
            "overdue": list(self.overdue),
            "blocked_until": iso(self.blocked_until),
            "next_run": iso(self.next_run),
            "last_success": {period: iso(time) for period, time in self.last_success.items()},
        }


# -- slots ----------------------------------------------------------------------------


def _at_hour(day: datetime.date, hour: int, zone: ZoneInfo) -> datetime.datetime:
    """``hour``:00 local on ``day``, as UTC.

    fold=0 gives the offset in force before a transition: a time in a spring-forward gap
    lands on the first instant after it, and a repeated hour means its first occurrence.
    """
    local = datetime.datetime(day.year, day.month, day.day, hour, tzinfo=zone)
    return local.astimezone(UTC)


def _matches(period: str, day: datetime.date) -> bool:
    if period == "daily":
        return True
    if period == "weekly":
        return day.weekday() == SUNDAY
    if period == "monthly":
        return day.day == 1
    raise ValueError(f"unknown period {period!r}")


def _previous_matching_day(period: str, day: datetime.date) -> datetime.date:
    """The latest day on or before ``day`` that has a slot of ``period``."""
    if period == "daily":
        return day
    if period == "weekly":
        return day - datetime.timedelta(days=(day.weekday() - SUNDAY) % 7)
    return day.replace(day=1)


def _next_matching_day(period: str, day: datetime.date) -> datetime.date:
    """The first day after ``day`` that has a slot of ``period``."""
    if period == "daily":
        return day + datetime.timedelta(days=1)
    if period == "weekly":
        return day + datetime.timedelta(days=(SUNDAY - day.weekday() - 1) % 7 + 1)
    return (day.replace(day=28) + datetime.timedelta(days=4)).replace(day=1)


def slot(schedule: Schedule, period: str, now: datetime.datetime) -> datetime.datetime:
    """The latest slot of ``period`` at or before ``now`` (UTC)."""
    _require_aware(now)
    zone = schedule.zone
    day = _previous_matching_day(period, now.astimezone(zone).date())
    candidate = _at_hour(day, schedule.run_at_hour, zone)
    if candidate > now:
        day = _previous_matching_day(period, day - datetime.timedelta(days=1))
        candidate = _at_hour(day, schedule.run_at_hour, zone)
    return candidate


def next_slot(schedule: Schedule, period: str, after: datetime.datetime) -> datetime.datetime:
    """The first slot of ``period`` strictly after ``after`` (UTC)."""
    _require_aware(after)
    zone = schedule.zone
    day = _previous_matching_day(period, after.astimezone(zone).date())
    candidate = _at_hour(day, schedule.run_at_hour, zone)
    while candidate <= after:
        day = _next_matching_day(period, day)
        candidate = _at_hour(day, schedule.run_at_hour, zone)
    return candidate


def _require_aware(moment: datetime.datetime) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{moment!r} has no time zone: schedules use aware times only")


# -- the decision ----------------------------------------------------------------------


def decide(schedule: Schedule, now: datetime.datetime, runs: Iterable[Run]) -> Decision:
    """What ``schedule`` asks for at ``now``, given the scheduled ``runs`` made so far."""
    _require_aware(now)
    now = now.astimezone(UTC)
    # In UTC: comparing aware times of two zones is never "equal" in a repeated hour.
    runs = [replace(run, time=run.time.astimezone(UTC)) for run in runs]
    past = [run for run in runs if run.time <= now]
    # A run dated a little ahead is one that just happened before the clock stepped back.
    near_future = [run for run in runs if now < run.time < now + MINIMUM_GAP]
    periods = [period for period in PERIODS if schedule.keep(period) > 0]

    last_success: dict[str, datetime.datetime | None] = {}
    for period in PERIODS:
        times = [run.time for run in past if run.succeeded and period in run.periods]
        last_success[period] = max(times, default=None)

    pending = tuple(
        period for period in periods if _unserved(last_success[period], slot(schedule, period, now))
    )

    blocked_until = None
    recent = [run.time for run in past if now - run.time < MINIMUM_GAP]
    if near_future:
        blocked_until = max(run.time for run in near_future) + MINIMUM_GAP
    elif recent:
        blocked_until = max(recent) + MINIMUM_GAP

    if not schedule.enabled:
        return Decision(now, (), pending, (), blocked_until, None, last_success)

    due = pending if blocked_until is None else ()
    overdue = tuple(
        period
        for period in pending
        if now >= _later(slot(schedule, period, now), schedule.enabled_since) + OVERDUE_AFTER
    )
    next_run = _next_run(schedule, now, periods, pending, last_success, blocked_until)
    return Decision(now, due, pending, overdue, blocked_until, next_run, last_success)


def _unserved(last: datetime.datetime | None, latest_slot: datetime.datetime) -> bool:
    return last is None or last < latest_slot - MINIMUM_GAP


def _later(moment: datetime.datetime, other: datetime.datetime | None) -> datetime.datetime:
    return moment if other is None or other < moment else other


def _next_run(
    schedule: Schedule,
    now: datetime.datetime,
    periods: Sequence[str],
    pending: Sequence[str],
    last_success: dict[str, datetime.datetime | None],
    blocked_until: datetime.datetime | None,
) -> datetime.datetime | None:
    candidates = []
    for period in periods:
        if period in pending:
            candidates.append(now)
            continue
        upcoming = next_slot(schedule, period, now)
        # A run in the two hours before a slot serves it: then the slot after is next.
        while not _unserved(last_success[period], upcoming):
            upcoming = next_slot(schedule, period, upcoming)
        candidates.append(upcoming)
    if not candidates:
        return None
    moment = min(candidates)
    return moment if blocked_until is None else max(moment, blocked_until)


# -- storage ---------------------------------------------------------------------------


def load(repository: str) -> Schedule | None:
    """The schedule of ``repository``, or None when it has never been set."""
    with state.connect() as connection:
        row = connection.execute(
            "SELECT settings FROM schedules WHERE repository = ?", (repository,)
        ).fetchone()
    return None if row is None else Schedule.from_dict(json.loads(row[0]))


def load_or_default(repository: str) -> Schedule:
    """The schedule of ``repository``, or the default one (disabled) when there is none."""
    return load(repository) or Schedule(repository)


def save(schedule: Schedule) -> None:
    """Store ``schedule``, replacing the repository's previous one."""
    with state.connect() as connection:
        connection.execute(
            "INSERT INTO schedules (repository, settings) VALUES (?, ?) "
            "ON CONFLICT (repository) DO UPDATE SET settings = excluded.settings",
            (schedule.repository, json.dumps(schedule.to_dict())),
        )


def all_schedules() -> list[Schedule]:
    """Every stored schedule, by repository name."""
    with state.connect() as connection:
        rows = connection.execute("SELECT settings FROM schedules ORDER BY repository").fetchall()
    return [Schedule.from_dict(json.loads(row[0])) for row in rows]


def overdue_alerted(repository: str) -> datetime.datetime | None:
    """When an overdue alert last went out for ``repository``'s schedule."""
    with state.connect() as connection:
        row = connection.execute(
            "SELECT overdue_alerted FROM schedules WHERE repository = ?", (repository,)
        ).fetchone()
    return datetime.datetime.fromisoformat(row[0]) if row and row[0] else None


def mark_overdue_alerted(repository: str, moment: datetime.datetime) -> None:
    with state.connect() as connection:
        connection.execute(
            "UPDATE schedules SET overdue_alerted = ? WHERE repository = ?",
            (moment.astimezone(UTC).isoformat(), repository),
        )
