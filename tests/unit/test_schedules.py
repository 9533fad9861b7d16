"""The scheduler's decisions over a simulated calendar: slots in explicit time zones,
DST both ways, month and year ends, catch-up, the two-hour rule, one archive for every
period due, keep counts of 0, overdue periods, and clocks that jump backwards."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from zoneinfo import ZoneInfo

import pytest

from homesafe.errors import UsageError
from homesafe.schedules import (
    MINIMUM_GAP,
    PERIODS,
    Run,
    Schedule,
    decide,
    next_slot,
    slot,
)

UTC = datetime.UTC
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
HOUR = datetime.timedelta(hours=1)
QUARTER = datetime.timedelta(minutes=15)
ALL = frozenset(PERIODS)


def at(zone: ZoneInfo, *parts: int) -> datetime.datetime:
    """A local time in ``zone`` (fold=0: the first of a repeated hour)."""
    return datetime.datetime(*parts, tzinfo=zone)  # type: ignore[misc]


def schedule(**settings: object) -> Schedule:
    values: dict[str, object] = {"repository": "default", "enabled": True}
    values["timezone"] = "Europe/Berlin"
    values.update(settings)
    return Schedule(**values)  # type: ignore[arg-type]


def simulate(
    plan: Schedule,
    start: datetime.datetime,
    end: datetime.datetime,
    *,
    step: datetime.timedelta = HOUR,
    runs: list[Run] | None = None,
    machine_off: tuple[datetime.datetime, datetime.datetime] | None = None,
    succeeds: Callable[[datetime.datetime], bool] = lambda now: True,
) -> list[Run]:
    """Check the schedule every ``step`` from start to end, as a timer would; each due
    decision makes one run. Returns every run, the seeded ones first."""
    made = list(runs or [])
    # Steps in UTC: adding to a local time adds wall-clock time, which DST bends.
    now, end = start.astimezone(UTC), end.astimezone(UTC)
    while now < end:
        if machine_off is None or not machine_off[0] <= now < machine_off[1]:
            decision = decide(plan, now, made)
            if decision.due:
                made.append(Run(now, frozenset(decision.due), succeeds(now)))
        now += step
    return made


def local_runs(runs: list[Run], zone: ZoneInfo) -> list[tuple[str, list[str]]]:
    return [
        (
            run.time.astimezone(zone).strftime("%Y-%m-%d %H:%M"),
            [period for period in PERIODS if period in run.periods],
        )
        for run in runs
    ]


# -- slots and the basic rules -------------------------------------------------------


def test_the_first_check_backs_up_every_period_kept_in_one_archive() -> None:
    decision = decide(schedule(), at(BERLIN, 2024, 5, 8, 14), [])
    assert decision.due == ("daily", "weekly", "monthly")
    assert decide(schedule(weekly_to_keep=0), at(BERLIN, 2024, 5, 8, 14), []).due == (
        "daily",
        "monthly",
    )


def test_daily_weekly_and_monthly_slots_at_the_hour_in_the_schedule_time_zone() -> None:
    """Two weeks from 1 May 2024 (a Wednesday): one run a day at 02:00 Berlin time,
    weekly ones on the Sundays, nothing else."""
    first = Run(at(BERLIN, 2024, 5, 1, 2), ALL)
    runs = simulate(
        schedule(), at(BERLIN, 2024, 5, 1, 2, 15), at(BERLIN, 2024, 5, 15, 12),
        step=QUARTER, runs=[first],
    )  # fmt: skip
    made = local_runs(runs[1:], BERLIN)
    assert [time for time, _ in made] == [f"2024-05-{day:02d} 02:00" for day in range(2, 16)]
    weekly = [time for time, periods in made if "weekly" in periods]
    assert weekly == ["2024-05-05 02:00", "2024-05-12 02:00"]  # the Sundays
    assert not [time for time, periods in made if "monthly" in periods]


def test_the_same_schedule_in_another_time_zone_runs_at_another_instant() -> None:
    now = at(UTC, 2024, 5, 8, 12)
    assert slot(schedule(), "daily", now) == at(UTC, 2024, 5, 8, 0)  # 02:00 CEST
    assert slot(schedule(timezone="UTC"), "daily", now) == at(UTC, 2024, 5, 8, 2)
    assert slot(schedule(timezone="Pacific/Auckland"), "daily", now) == at(UTC, 2024, 5, 7, 14)


def test_times_without_a_time_zone_are_refused() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        decide(schedule(), datetime.datetime(2024, 5, 8, 12), [])


def test_settings_are_checked() -> None:
    with pytest.raises(UsageError, match="time zone"):
        schedule(timezone="Mars/Olympus_Mons")
    with pytest.raises(UsageError, match="run_at_hour"):
        schedule(run_at_hour=24)
    with pytest.raises(UsageError, match="keep count"):
        schedule(daily_to_keep=-1)


def test_a_disabled_schedule_never_runs_and_has_no_next_run() -> None:
    decision = decide(schedule(enabled=False), at(BERLIN, 2024, 5, 8, 12), [])
    assert decision.due == ()
    assert decision.pending == ("daily", "weekly", "monthly")
    assert decision.next_run is None
    assert decision.overdue == ()


def test_a_period_kept_zero_times_never_runs() -> None:
    runs = simulate(
        schedule(weekly_to_keep=0, monthly_to_keep=0),
        at(BERLIN, 2024, 4, 20), at(BERLIN, 2024, 6, 10),
    )  # fmt: skip
    assert runs
    assert all(run.periods == {"daily"} for run in runs)
    nothing = schedule(daily_to_keep=0, weekly_to_keep=0, monthly_to_keep=0)
    assert simulate(nothing, at(BERLIN, 2024, 4, 20), at(BERLIN, 2024, 5, 10)) == []
    assert decide(nothing, at(BERLIN, 2024, 5, 1, 3), []).next_run is None


# -- month and year ends -------------------------------------------------------------


def test_month_and_year_ends() -> None:
    """Across 2024/2025: the monthly archive on 1 January at 02:00, together with the
    daily one; leap-year February ends on the 29th and March starts on the 1st."""
    start = at(BERLIN, 2024, 12, 20, 3)
    runs = simulate(schedule(), start, at(BERLIN, 2025, 1, 10), runs=[Run(start, ALL)])
    made = dict(local_runs(runs[1:], BERLIN))
    assert made["2025-01-01 02:00"] == ["daily", "monthly"]
    assert made["2024-12-22 02:00"] == ["daily", "weekly"]
    assert made["2024-12-29 02:00"] == ["daily", "weekly"]
    assert made["2024-12-31 02:00"] == ["daily"]
    assert [time for time, periods in made.items() if "monthly" in periods] == ["2025-01-01 02:00"]
    assert slot(schedule(), "monthly", at(BERLIN, 2024, 2, 29, 23)) == at(BERLIN, 2024, 2, 1, 2)
    assert next_slot(schedule(), "monthly", at(BERLIN, 2024, 2, 29, 23)) == at(
        BERLIN, 2024, 3, 1, 2
    )
    assert next_slot(schedule(), "monthly", at(BERLIN, 2024, 12, 31, 3)) == at(
        BERLIN, 2025, 1, 1, 2
    )


def test_one_archive_serves_every_period_due_at_once() -> None:
    """1 September 2024 is a Sunday: daily, weekly and monthly are one run."""
    start = at(BERLIN, 2024, 8, 30, 3)
    runs = simulate(schedule(), start, at(BERLIN, 2024, 9, 2), runs=[Run(start, ALL)])
    assert local_runs(runs[1:], BERLIN) == [
        ("2024-08-31 02:00", ["daily"]),
        ("2024-09-01 02:00", ["daily", "weekly", "monthly"]),
    ]


# -- daylight saving time ------------------------------------------------------------


def test_dst_starts_the_slot_in_the_skipped_hour_runs_right_after_the_gap() -> None:
    """Berlin, Sunday 31 March 2024: 02:00 jumps to 03:00. One run, at 03:00 CEST."""
    start = at(BERLIN, 2024, 3, 30, 3)
    runs = simulate(
        schedule(), start, at(BERLIN, 2024, 4, 1, 12), step=QUARTER, runs=[Run(start, ALL)]
    )
    assert local_runs(runs[1:], BERLIN) == [
        ("2024-03-31 03:00", ["daily", "weekly"]),
        ("2024-04-01 02:00", ["daily", "monthly"]),
    ]
    assert runs[1].time == at(UTC, 2024, 3, 31, 1)
    # 23 hours later by the clock on the wall, 23 real hours too: nothing in between.
    assert runs[2].time - runs[1].time == datetime.timedelta(hours=23)


def test_dst_ends_the_repeated_hour_runs_once() -> None:
    """Berlin, Sunday 27 October 2024: 02:00-03:00 happens twice; one run, the first."""
    start = at(BERLIN, 2024, 10, 26, 3)
    runs = simulate(
        schedule(), start, at(BERLIN, 2024, 10, 28, 12), step=QUARTER, runs=[Run(start, ALL)]
    )
    assert [run.time for run in runs[1:]] == [
        at(UTC, 2024, 10, 27, 0),  # 02:00 CEST, the first 02:00
        at(UTC, 2024, 10, 28, 1),  # 02:00 CET, 25 hours later
    ]


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        # Spring forward: 02:00 EST -> 03:00 EDT on 10 March 2024.
        ((2024, 3, 9, 4), (2024, 3, 11, 4), ["2024-03-10 07:00", "2024-03-11 06:00"]),
        # Fall back: 02:00 EDT -> 01:00 EST on 3 November 2024; 02:00 is not repeated.
        ((2024, 11, 2, 4), (2024, 11, 4, 4), ["2024-11-03 07:00", "2024-11-04 07:00"]),
    ],
)
def test_dst_in_new_york(start: tuple[int, ...], end: tuple[int, ...], expected: list[str]) -> None:
    plan = schedule(timezone="America/New_York")
    begin = at(NEW_YORK, *start)
    runs = simulate(plan, begin, at(NEW_YORK, *end), step=QUARTER, runs=[Run(begin, ALL)])
    assert [run.time.strftime("%Y-%m-%d %H:%M") for run in runs[1:]] == expected


def test_dst_ends_in_new_york_with_the_repeated_hour_chosen() -> None:
    """run_at_hour 1 in New York on 3 November 2024: 01:00 happens twice; one run."""
    plan = schedule(timezone="America/New_York", run_at_hour=1)
    begin = at(NEW_YORK, 2024, 11, 2, 4)
    runs = simulate(plan, begin, at(NEW_YORK, 2024, 11, 4, 4), step=QUARTER, runs=[Run(begin, ALL)])
    assert [run.time for run in runs[1:]] == [
        at(UTC, 2024, 11, 3, 5),  # 01:00 EDT
        at(UTC, 2024, 11, 4, 6),  # 01:00 EST
    ]


# -- catch-up and the two-hour rule --------------------------------------------------


def test_a_machine_off_for_a_week_catches_up_once_at_boot() -> None:
    """Off from Wednesday 28 August 10:00 to Wednesday 4 September 15:00 2024: the
    missed daily, weekly (Sunday 1st) and monthly (1st) slots make one archive at boot;
    the next daily one comes at the next 02:00."""
    start = at(BERLIN, 2024, 8, 20, 3)
    runs = simulate(
        schedule(), start, at(BERLIN, 2024, 9, 6, 12), runs=[Run(start, ALL)],
        machine_off=(at(BERLIN, 2024, 8, 28, 10), at(BERLIN, 2024, 9, 4, 15)),
    )  # fmt: skip
    made = local_runs(runs, BERLIN)
    after_boot = [entry for entry in made if entry[0] >= "2024-09-04"]
    assert after_boot == [
        ("2024-09-04 15:00", ["daily", "weekly", "monthly"]),
        ("2024-09-05 02:00", ["daily"]),
        ("2024-09-06 02:00", ["daily"]),
    ]
    assert not [entry for entry in made if "2024-08-29" <= entry[0] < "2024-09-04 15:00"]


def test_a_daily_slot_missed_by_a_timer_that_was_late_is_caught_up() -> None:
    """Checks only every 90 minutes, never exactly at 02:00: still one run a day."""
    start = at(BERLIN, 2024, 5, 1, 2, 10)
    runs = simulate(
        schedule(), start, at(BERLIN, 2024, 5, 5), step=datetime.timedelta(minutes=90),
        runs=[Run(at(BERLIN, 2024, 5, 1, 2), ALL)],
    )  # fmt: skip
    days = [run.time.astimezone(BERLIN).date().day for run in runs[1:]]
    assert days == [2, 3, 4]
    assert all(2 <= run.time.astimezone(BERLIN).hour < 4 for run in runs[1:])


def test_nothing_runs_within_two_hours_of_a_failed_run_then_it_is_retried() -> None:
    """The 02:00 run fails (and so does its retry at 04:00); the one at 06:00 works."""
    start = at(BERLIN, 2024, 5, 1, 3)
    runs = simulate(
        schedule(), start, at(BERLIN, 2024, 5, 2, 12), step=QUARTER,
        runs=[Run(at(BERLIN, 2024, 5, 1, 2), ALL)],
        succeeds=lambda now: now >= at(BERLIN, 2024, 5, 2, 5),
    )  # fmt: skip
    assert [(run.time.astimezone(BERLIN).strftime("%H:%M"), run.succeeded) for run in runs[1:]] == [
        ("02:00", False),
        ("04:00", False),
        ("06:00", True),
    ]


def test_a_run_in_the_two_hours_before_a_slot_serves_it() -> None:
    """A catch-up at 01:00 counts for the 02:00 slot: no second archive at 03:00."""
    plan = schedule()
    catch_up = Run(at(BERLIN, 2024, 5, 2, 1), ALL)
    runs = simulate(
        plan, at(BERLIN, 2024, 5, 2, 1, 15), at(BERLIN, 2024, 5, 3, 12), step=QUARTER,
        runs=[catch_up],
    )  # fmt: skip
    assert local_runs(runs[1:], BERLIN) == [("2024-05-03 02:00", ["daily"])]
    # ... while one at 23:00 the night before does not.
    evening = Run(at(BERLIN, 2024, 5, 1, 23), ALL)
    assert decide(plan, at(BERLIN, 2024, 5, 2, 2), [evening]).due == ("daily",)


def test_the_two_hour_rule_reports_when_it_ends() -> None:
    attempt = Run(at(BERLIN, 2024, 5, 2, 2), ALL, succeeded=False)
    decision = decide(schedule(), at(BERLIN, 2024, 5, 2, 3), [attempt])
    assert decision.due == ()
    assert decision.pending == ("daily", "weekly", "monthly")
    assert decision.blocked_until == attempt.time + MINIMUM_GAP
    assert decision.next_run == attempt.time + MINIMUM_GAP


# -- clocks that jump backwards ------------------------------------------------------


def test_a_small_step_back_of_the_clock_starts_no_second_backup() -> None:
    """A run at 02:30, then the clock is set back to 02:10: the run is 'in the future'
    but it just happened; nothing runs until two hours after it."""
    made = Run(at(BERLIN, 2024, 5, 2, 2, 30), frozenset({"daily"}))
    seed = Run(at(BERLIN, 2024, 5, 1, 2), ALL)
    decision = decide(schedule(), at(BERLIN, 2024, 5, 2, 2, 10), [seed, made])
    assert decision.due == ()
    assert decision.blocked_until == made.time + MINIMUM_GAP


def test_the_clock_set_back_an_hour_after_a_run_repeats_nothing() -> None:
    """Checked every 15 minutes; at 03:00, after the 02:00 run, the clock goes back
    to 01:45 and runs on from there: still one run that day."""
    plan = schedule()
    runs = simulate(
        plan, at(BERLIN, 2024, 5, 2, 1), at(BERLIN, 2024, 5, 2, 3), step=QUARTER,
        runs=[Run(at(BERLIN, 2024, 5, 1, 2), ALL)],
    )  # fmt: skip
    assert len(runs) == 2
    runs = simulate(
        plan, at(BERLIN, 2024, 5, 2, 1, 45), at(BERLIN, 2024, 5, 3), step=QUARTER, runs=runs
    )
    assert len(runs) == 2


def test_runs_dated_far_in_the_future_are_ignored() -> None:
    """The clock was reset to a year earlier (a dead RTC battery): the archives dated
    ahead of it cannot say what is due, so the schedule starts afresh."""
    later = [Run(at(BERLIN, 2025, 5, day, 2), ALL) for day in range(1, 4)]
    decision = decide(schedule(), at(BERLIN, 2024, 5, 2, 12), later)
    assert decision.due == ("daily", "weekly", "monthly")
    assert decision.last_success == {"daily": None, "weekly": None, "monthly": None}


# -- overdue and next run ------------------------------------------------------------


def test_a_period_is_overdue_an_hour_after_its_unserved_slot() -> None:
    plan = schedule()
    runs = [
        Run(at(BERLIN, 2024, 5, 1, 2), ALL),
        Run(at(BERLIN, 2024, 5, 2, 2), frozenset({"daily"}), succeeded=False),
    ]
    assert decide(plan, at(BERLIN, 2024, 5, 2, 2, 59), runs).overdue == ()
    overdue = decide(plan, at(BERLIN, 2024, 5, 2, 3), runs)
    assert overdue.overdue == ("daily",)
    assert overdue.last_success["daily"] == at(BERLIN, 2024, 5, 1, 2)


def test_nothing_is_overdue_before_the_schedule_was_enabled() -> None:
    plan = schedule(enabled_since=at(BERLIN, 2024, 5, 2, 10))
    assert decide(plan, at(BERLIN, 2024, 5, 2, 10, 30), []).overdue == ()
    assert decide(plan, at(BERLIN, 2024, 5, 2, 11), []).overdue == (
        "daily",
        "weekly",
        "monthly",
    )


def test_next_run_is_the_next_unserved_slot() -> None:
    plan = schedule()
    runs = [Run(at(BERLIN, 2024, 5, 2, 2), ALL)]
    assert decide(plan, at(BERLIN, 2024, 5, 2, 12), runs).next_run == at(BERLIN, 2024, 5, 3, 2)
    # A run at 01:00 serves the 02:00 slot: the next one is the day after.
    early = [Run(at(BERLIN, 2024, 5, 3, 1), ALL)]
    assert decide(plan, at(BERLIN, 2024, 5, 3, 1, 30), early).next_run == at(BERLIN, 2024, 5, 4, 2)
    # Weekly and monthly only: the next Sunday.
    sparse = schedule(daily_to_keep=0)
    assert decide(sparse, at(BERLIN, 2024, 5, 2, 12), runs).next_run == at(BERLIN, 2024, 5, 5, 2)


def test_changed_records_when_the_schedule_was_switched_on() -> None:
    off = schedule(enabled=False)
    assert off.enabled_since is None
    on = off.changed(enabled=True)
    assert on.enabled_since is not None
    assert on.changed(daily_to_keep=7).enabled_since == on.enabled_since
    assert Schedule.from_dict(on.to_dict()) == on
