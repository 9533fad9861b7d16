"""Retention over a simulated calendar: keep counts, scheduled archives only (manual and
foreign ones are never pruned), archives dated in the future ignored."""

from __future__ import annotations

import datetime
from zoneinfo import ZoneInfo

import pytest

from homesafe import archives, scheduler
from homesafe.engines.base import ArchiveSummary
from homesafe.retention import ScheduledArchive, archive_time, plan, scheduled_archives
from homesafe.schedules import PERIODS, Run, Schedule, decide

UTC = datetime.UTC
BERLIN = ZoneInfo("Europe/Berlin")
HOUR = datetime.timedelta(hours=1)


def at(*parts: int) -> datetime.datetime:
    return datetime.datetime(*parts, tzinfo=BERLIN)  # type: ignore[misc]


def name_of(moment: datetime.datetime) -> str:
    return f"scheduled-host-{moment.astimezone(UTC):%Y-%m-%dT%H:%M:%S}Z"


def run_for_days(
    schedule: Schedule, start: datetime.datetime, end: datetime.datetime, *, prune: bool
) -> tuple[list[ScheduledArchive], list[str]]:
    """Check hourly; each due decision makes an archive, and (with ``prune``) retention
    runs after it as the scheduler does (the new archive joins the candidates as the
    scheduler adds it). Returns the archives left and those pruned."""
    runs: list[Run] = []
    existing: list[ScheduledArchive] = []
    pruned: list[str] = []
    now, end = start.astimezone(UTC), end.astimezone(UTC)
    while now < end:
        decision = decide(schedule, now, runs)
        if decision.due:
            runs.append(Run(now, frozenset(decision.due)))
            existing = scheduler.with_archive_made(existing, name_of(now), now, decision.due)
            if prune:
                result = plan(schedule, existing, now)
                pruned += result.prune
                existing = [archive for archive in existing if archive.name not in result.prune]
        now += HOUR
    return existing, pruned


def local_days(items: list[ScheduledArchive]) -> list[str]:
    return sorted(archive.time.astimezone(BERLIN).strftime("%m-%d") for archive in items)


def test_keep_counts_after_four_months_of_daily_pruning() -> None:
    """From 1 May 2024 to 10 September 2024 with the reference's counts (5 daily,
    3 weekly, 3 monthly): what is left is exactly the newest of each period."""
    schedule = Schedule("default", enabled=True, timezone="Europe/Berlin")
    left, pruned = run_for_days(schedule, at(2024, 5, 1, 3), at(2024, 9, 10, 12), prune=True)
    assert local_days(left) == sorted(
        [
            "07-01", "08-01",  # monthly (with 09-01 below)
            "08-25",  # weekly (with 09-01 and 09-08)
            "09-01",  # daily, weekly and monthly in one
            "09-06", "09-07", "09-08", "09-09", "09-10",  # daily (09-08 weekly too)
        ]
    )  # fmt: skip
    # The first archive (1 May, every period) went when the monthly count passed it.
    assert name_of(at(2024, 5, 1, 3)) in pruned
    assert len(left) + len(pruned) == 133  # one archive a day, nothing lost track of


@pytest.mark.parametrize(
    ("daily", "weekly", "monthly"),
    [(5, 3, 3), (7, 0, 0), (0, 4, 0), (0, 0, 2), (1, 1, 1), (0, 0, 0)],
)
def test_each_period_keeps_its_newest_archives_and_nothing_else(
    daily: int, weekly: int, monthly: int
) -> None:
    schedule = Schedule(
        "default", enabled=True, timezone="Europe/Berlin",
        daily_to_keep=max(daily, 1), weekly_to_keep=weekly, monthly_to_keep=monthly,
    )  # fmt: skip
    made, _ = run_for_days(schedule, at(2024, 1, 1), at(2024, 4, 15), prune=False)
    counts = {"daily": daily, "weekly": weekly, "monthly": monthly}
    retained = Schedule(
        "default", timezone="Europe/Berlin",
        daily_to_keep=daily, weekly_to_keep=weekly, monthly_to_keep=monthly,
    )  # fmt: skip
    result = plan(retained, made, at(2024, 4, 15))
    expected: set[str] = set()
    for period in PERIODS:
        if counts[period]:
            with_period = sorted(
                (archive for archive in made if period in archive.periods),
                key=lambda archive: archive.time,
            )
            expected |= {archive.name for archive in with_period[-counts[period] :]}
    assert set(result.keep) == expected
    assert set(result.prune) == {archive.name for archive in made} - expected


def test_archives_dated_in_the_future_are_neither_counted_nor_pruned() -> None:
    schedule = Schedule("default", daily_to_keep=2, weekly_to_keep=0, monthly_to_keep=0)
    daily = frozenset({"daily"})
    made = [ScheduledArchive(f"day-{day}", at(2024, 5, day, 2), daily) for day in range(1, 6)]
    ahead = ScheduledArchive("ahead", at(2025, 1, 1, 2), daily)
    result = plan(schedule, [*made, ahead], at(2024, 5, 5, 12))
    assert result.keep == ("day-5", "day-4")
    assert set(result.prune) == {"day-1", "day-2", "day-3"}
    assert "ahead" not in result.prune


def test_only_archives_with_schedule_periods_are_candidates() -> None:
    """Manual homesafe archives, archives of other tools, and the reference
    distribution's own scheduled archives are never pruned."""
    listing = [
        ArchiveSummary(
            "scheduled-a", "1", "2024-05-01T02:00:00.000000",
            archives.comment_summary(["notes"], None, ["daily", "weekly"]),
        ),
        ArchiveSummary(
            "manual", "2", "2024-05-01T03:00:00.000000",
            archives.comment_summary(["notes"], "before upgrade"),
        ),
        ArchiveSummary("foreign", "3", "2024-05-01T04:00:00", "made by hand"),
        ArchiveSummary(
            "reference", "4", "2024-05-01T05:00:00+02:00",
            '{"type":"scheduled","periods":["daily"]}',
        ),
        ArchiveSummary(
            "unknown-period", "5", "2024-05-01T06:00:00",
            archives.comment_summary(["notes"], None, ["hourly"]),
        ),
    ]  # fmt: skip
    found = scheduled_archives(listing)
    assert [(archive.name, archive.periods) for archive in found] == [
        ("scheduled-a", frozenset({"daily", "weekly"}))
    ]
    nothing_kept = Schedule("default", daily_to_keep=0, weekly_to_keep=0, monthly_to_keep=0)
    assert plan(nothing_kept, found, at(2024, 6, 1)).prune == ("scheduled-a",)


def test_comment_summary_keeps_periods_only_for_scheduled_archives() -> None:
    scheduled = archives.parse_comment(archives.comment_summary(["a"], "x", ["monthly"]))
    assert (scheduled.is_homesafe, scheduled.apps, scheduled.comment, scheduled.periods) == (
        True, ["a"], "x", ["monthly"],
    )  # fmt: skip
    manual = archives.comment_summary(["a"], None)
    assert "periods" not in manual
    assert archives.parse_comment(manual).periods == []
    assert archives.scheduled_name(at(2024, 5, 1, 2), "box") == (
        "scheduled-box-2024-05-01T00:00:00.000000Z"
    )


def test_archive_times_from_both_engines() -> None:
    # borg: local time without an offset; restic: nanoseconds and an offset.
    borg = archive_time("2024-05-01T02:00:03.123456")
    assert borg is not None and borg.tzinfo is not None
    assert borg.replace(tzinfo=None) == datetime.datetime(2024, 5, 1, 2, 0, 3, 123456)
    assert archive_time("2024-05-01T02:00:03.123456789+02:00") == datetime.datetime(
        2024, 5, 1, 0, 0, 3, 123456, tzinfo=UTC
    )
    assert archive_time("2024-05-01T00:00:03Z") == datetime.datetime(
        2024, 5, 1, 0, 0, 3, tzinfo=UTC
    )
    assert archive_time("yesterday") is None


def test_a_run_leaves_the_keep_counts_with_its_new_archive_among_them() -> None:
    """The archive a run just made is written a moment after the run's time: it still
    counts, so a run keeping 2 daily archives leaves 2, not 3 until the next run."""
    schedule = Schedule("default", enabled=True, daily_to_keep=2, weekly_to_keep=0,
                        monthly_to_keep=0)  # fmt: skip
    now = datetime.datetime(2024, 5, 10, 2, tzinfo=UTC)
    daily = frozenset({"daily"})
    listed = [ScheduledArchive(name_of(now - day * 24 * HOUR), now - day * 24 * HOUR, daily)
              for day in (2, 1)]  # fmt: skip

    candidates = scheduler.with_archive_made(listed, name_of(now), now, ["daily"])

    assert plan(schedule, candidates, now).prune == (name_of(now - 48 * HOUR),)
