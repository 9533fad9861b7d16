"""Whether a process homesafe recorded by its pid (in a lockdown flag, a history row)
is still the one running.

A pid alone is not enough: pids are reused, within hours on a busy host and from the
first ones after a reboot, so a row or flag left by a killed homesafe could name a
process started since. The process's start time, from ``/proc``, tells them apart: the
process that wrote a record had started before it wrote it.
"""

from __future__ import annotations

import functools
import os

__all__ = ["alive"]

# The boot time in /proc/stat is whole seconds, and a process's start time is in clock
# ticks: allow that much between a process's start and the record it wrote.
START_TOLERANCE_SECONDS = 1.0


def alive(pid: int | None, *, recorded_at: float | None = None) -> bool:
    """Whether process ``pid`` runs (a zombie does not), and, given ``recorded_at`` (a
    ``time.time()`` at which the process wrote the record), whether it had started by
    then: a pid reused by a process started later is not the one that wrote it."""
    if not pid or pid <= 0:
        return False
    try:
        fields = _stat_fields(pid)
    except (OSError, IndexError):
        return False
    if fields[0] in ("Z", "X"):
        return False
    if recorded_at is None:
        return True
    started = _start_time(fields)
    return started is None or started <= recorded_at + START_TOLERANCE_SECONDS


def _stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (which may hold spaces
    and parentheses): the first is the state, the 20th the start time."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def _start_time(fields: list[str]) -> float | None:
    """When the process started, as a ``time.time()``; None if it cannot be told."""
    boot = _boot_time()
    if boot is None:
        return None
    try:
        ticks = int(fields[19])
    except (IndexError, ValueError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


@functools.cache
def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None
