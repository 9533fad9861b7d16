"""Retention: which scheduled archives a schedule's keep counts no longer hold.

The rule is the reference design's: walk the scheduled archives newest first and keep
each one that is among the newest ``<period>_to_keep`` archives of any period it
serves. Only archives whose homesafe comment lists schedule periods are candidates:
manual archives, and archives homesafe did not write, are never pruned. Archives dated
in the future (the clock was set back) are neither counted nor pruned.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from homesafe import archives
from homesafe.engines.base import ArchiveSummary
from homesafe.schedules import PERIODS, Schedule

__all__ = ["Plan", "ScheduledArchive", "archive_time", "plan", "scheduled_archives"]

# Engines report up to nanoseconds (restic); Python reads six digits.
_EXTRA_DIGITS = re.compile(r"(\.\d{6})\d+")


@dataclass(frozen=True)
class ScheduledArchive:
    """An archive a schedule made: its name, its time (aware) and the periods it serves."""

    name: str
    time: datetime.datetime
    periods: frozenset[str]


@dataclass(frozen=True)
class Plan:
    """What retention decided: archives to delete and archives kept, newest first."""

    prune: tuple[str, ...]
    keep: tuple[str, ...]


def archive_time(text: str) -> datetime.datetime | None:
    """An engine's archive time as an aware datetime; a naive one (borg) is local time."""
    try:
        moment = datetime.datetime.fromisoformat(_EXTRA_DIGITS.sub(r"\1", text))
    except ValueError:
        return None
    return moment.astimezone() if moment.tzinfo is None else moment


def scheduled_archives(listing: Iterable[ArchiveSummary]) -> list[ScheduledArchive]:
    """The archives of an engine listing that a homesafe schedule made."""
    found = []
    for summary in listing:
        parsed = archives.parse_comment(summary.comment)
        moment = archive_time(summary.time)
        periods = frozenset(parsed.periods) & frozenset(PERIODS)
        if parsed.is_homesafe and periods and moment is not None:
            found.append(ScheduledArchive(summary.name, moment, periods))
    return found


def plan(schedule: Schedule, scheduled: Sequence[ScheduledArchive], now: datetime.datetime) -> Plan:
    """Which of the ``scheduled`` archives to prune at ``now`` under ``schedule``."""
    if now.tzinfo is None:
        raise ValueError("retention needs an aware time")
    # Ties (same second) keep the listing's order through the name, which sorts by time.
    candidates = sorted(
        (archive for archive in scheduled if archive.time <= now),
        key=lambda archive: (archive.time, archive.name),
        reverse=True,
    )
    seen = dict.fromkeys(PERIODS, 0)
    keep: list[str] = []
    prune: list[str] = []
    for archive in candidates:
        kept = False
        for period in PERIODS:
            if period in archive.periods:
                seen[period] += 1
                kept = kept or seen[period] <= schedule.keep(period)
        (keep if kept else prune).append(archive.name)
    return Plan(tuple(prune), tuple(keep))
