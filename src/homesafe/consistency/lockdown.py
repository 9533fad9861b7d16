"""Lockdown: a flag per app saying "a backup or restore is working on me".

The flag is a file ``$HOMESAFE_HOME/lockdown/<app id>`` holding who set it and when;
``homesafe apps`` shows it, and apps (or their web front ends) can check
:func:`is_locked` to refuse changes meanwhile. A manifest's ``lockdown.enter`` and
``lockdown.leave`` commands run after the flag is set and before it is cleared, so an
app can switch on its own maintenance mode.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from homesafe import execute, locations
from homesafe.manifest import Manifest


def flag_path(app_id: str) -> Path:
    """Where the app's lockdown flag is (whether or not it is set)."""
    return locations.lockdown_directory() / app_id


def enter(manifest: Manifest, operation: str) -> None:
    """Set the app's flag, then run its ``lockdown.enter`` command (errors propagate)."""
    directory = locations.lockdown_directory()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    record = {"operation": operation, "pid": os.getpid(), "since": time.time()}
    flag_path(manifest.id).write_text(json.dumps(record))
    if manifest.lockdown.enter:
        execute.run(manifest.lockdown.enter, timeout=manifest.hooks.timeout)


def leave(manifest: Manifest) -> None:
    """Run the app's ``lockdown.leave`` command, then clear its flag.

    The flag is cleared even when the command fails; the command's error propagates.
    """
    try:
        if manifest.lockdown.leave:
            execute.run(manifest.lockdown.leave, timeout=manifest.hooks.timeout)
    finally:
        flag_path(manifest.id).unlink(missing_ok=True)


def is_locked(app_id: str) -> bool:
    return bool(flag_path(app_id).exists())


def lock_record(app_id: str) -> dict[str, Any] | None:
    """Who locked the app and when, or None when it is not locked."""
    try:
        value = json.loads(flag_path(app_id).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
