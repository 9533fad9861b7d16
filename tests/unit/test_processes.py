"""Telling whether the process that wrote a record (a lockdown flag, a history row)
still runs, with real processes: a pid reused by a process started after the record is
not the one that wrote it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from homesafe import processes


def test_a_running_process_that_wrote_the_record_is_alive() -> None:
    assert processes.alive(os.getpid())
    assert processes.alive(os.getpid(), recorded_at=time.time())


def test_a_process_started_after_the_record_is_not_the_writer() -> None:
    """What a pid reused since the record looks like: the process started an hour
    after the record was written."""
    assert not processes.alive(os.getpid(), recorded_at=time.time() - 3600)


def test_a_process_that_exited_or_is_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    # Exited but not reaped: a zombie.
    while processes._stat_fields(child.pid)[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not processes.alive(child.pid)
    child.wait()
    assert not processes.alive(child.pid)
    assert not processes.alive(None) and not processes.alive(0) and not processes.alive(-1)
