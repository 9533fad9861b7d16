"""Locks that a dead process cannot leave behind: ``flock`` on files in
``$HOMESAFE_HOME/locks/``.

The kernel releases an flock when the process holding it exits, however it exits
(killed, crashed, power cut), so there is no stale lock to clean up. The file keeps the
holder's pid for people asking who holds it; the lock itself is the flock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from homesafe import locations

__all__ = ["exclusive", "holder", "lock_path"]


def lock_path(name: str) -> Path:
    return locations.home() / "locks" / f"{name}.lock"


@contextmanager
def exclusive(name: str) -> Iterator[bool]:
    """Hold the lock ``name`` for the ``with`` block if nobody else does.

    Yields True when it is held, False when another process holds it (without waiting).
    """
    path = lock_path(name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        try:
            yield True
        finally:
            os.ftruncate(descriptor, 0)
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def holder(name: str) -> int | None:
    """The pid holding the lock ``name``, or None when it is free."""
    path = lock_path(name)
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)
