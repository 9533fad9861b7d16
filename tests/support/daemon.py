#!/usr/bin/env python3
"""A real little daemon for service tests, driven like a command-type service.

    daemon.py start STATE_DIR   fork a background process that ticks into STATE_DIR/ticks
    daemon.py stop STATE_DIR    SIGTERM it and wait until it is gone
    daemon.py status STATE_DIR  exit 0 when it runs, 3 when it does not

Failure injection, for tests: if STATE_DIR/fail-stop exists, ``stop`` exits 1 and leaves
the daemon running; if STATE_DIR/fail-start exists, ``start`` exits 1 and starts nothing
(STATE_DIR/fail-start-once: the same, once, then the marker is gone).
Every call is appended to STATE_DIR/calls, so tests can check the order of operations.

A writer, for consistency tests: if STATE_DIR/writes-to names a directory, every tick
also writes the tick's number to DIRECTORY/first and then, a moment later, to
DIRECTORY/second, and appends it to DIRECTORY/log. Stopped (SIGTERM), it finishes the
pair first: the two files hold the same number whenever the writer is not running, and
a copy taken while it runs often catches them different.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def running_pid(state: Path) -> int | None:
    try:
        pid = int((state / "pid").read_text())
    except (OSError, ValueError):
        return None
    try:
        # A killed daemon may linger as a zombie (PID 1 here does not reap): not running.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else pid


def writes_to(state: Path) -> Path | None:
    try:
        return Path((state / "writes-to").read_text().strip())
    except OSError:
        return None


def write_pair(target: Path, number: int) -> None:
    (target / "first").write_text(f"{number}\n")
    time.sleep(0.01)
    (target / "second").write_text(f"{number}\n")
    with open(target / "log", "a") as log:
        log.write(f"{number} {time.time()}\n")


def start(state: Path) -> int:
    once = state / "fail-start-once"
    if once.exists():
        once.unlink()
        print("refusing to start once: fail-start-once was set", file=sys.stderr)
        return 1
    if (state / "fail-start").exists():
        print("refusing to start: fail-start is set", file=sys.stderr)
        return 1
    if running_pid(state):
        return 0
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            for descriptor in (0, 1, 2):
                os.dup2(devnull, descriptor)
            (state / "pid").write_text(str(os.getpid()))
            target = writes_to(state)
            stopping: list[bool] = []
            if target is None:
                signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
            else:  # finish the pair first
                signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
            number = 0
            while not stopping:
                with open(state / "ticks", "a") as ticks:
                    ticks.write(f"{time.time()}\n")
                if target is not None:
                    number += 1
                    write_pair(target, number)
                time.sleep(0.05)
            os._exit(0)
        os._exit(0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if running_pid(state):
            return 0
        time.sleep(0.01)
    return 1


def stop(state: Path) -> int:
    if (state / "fail-stop").exists():
        print("refusing to stop: fail-stop is set", file=sys.stderr)
        return 1
    pid = running_pid(state)
    if pid is None:
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if running_pid(state) is None:
            return 0
        time.sleep(0.01)
    return 1


def main() -> int:
    command, state = sys.argv[1], Path(sys.argv[2])
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "calls", "a") as calls:
        calls.write(f"{command}\n")
    if command == "start":
        return start(state)
    if command == "stop":
        return stop(state)
    if command == "status":
        return 0 if running_pid(state) else 3
    print(f"unknown command {command}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
