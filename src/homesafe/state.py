"""The SQLite state database (``$HOMESAFE_HOME/state.db``).

It holds the settings store that apps read and write through the API. The schema is a
list of ``CREATE ... IF NOT EXISTS`` statements run on every connection (they cost
microseconds), so a table added by a later release appears in an existing database by
itself; a change to an existing table needs a migration keyed on ``PRAGMA
user_version``. Passphrases are never stored here.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager

from homesafe import TYPE_CHECKING, locations

if TYPE_CHECKING:  # typing is not imported before prestart starts borg
    from typing import Any

# One entry per table (or index), each owned by the module named in its comment.
SCHEMA = [
    # api: the settings store apps read and write
    """CREATE TABLE IF NOT EXISTS settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL          -- JSON
    )""",
    # history: one row per operation (backup, restore, prune, check, verify)
    """CREATE TABLE IF NOT EXISTS jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        operation TEXT NOT NULL,
        trigger TEXT NOT NULL,       -- manual | scheduled
        status TEXT NOT NULL,        -- running | ok | partial | failed
        repository TEXT NOT NULL,
        archive TEXT NOT NULL,
        started TEXT NOT NULL,       -- UTC, ISO 8601
        finished TEXT,               -- UTC, ISO 8601; NULL while running
        scheduled_at TEXT,           -- scheduled runs: the scheduler's clock when it decided
        periods TEXT NOT NULL,       -- JSON list: the schedule periods a run serves
        process INTEGER,             -- the pid that runs it, to tell interrupted runs
        error TEXT NOT NULL,         -- the first error, one line, for listings
        detail TEXT NOT NULL         -- JSON: the operation's whole result
    )""",
    # history
    "CREATE INDEX IF NOT EXISTS jobs_by_repository ON jobs (repository, operation, id)",
    # history: how each app fared in each job
    """CREATE TABLE IF NOT EXISTS job_apps (
        job INTEGER NOT NULL REFERENCES jobs (id),
        app TEXT NOT NULL,
        status TEXT NOT NULL,        -- ok | failed | skipped
        strategy TEXT NOT NULL,
        downtime REAL NOT NULL,      -- seconds
        size INTEGER NOT NULL,       -- bytes
        errors TEXT NOT NULL,        -- JSON list of BackupError dicts
        PRIMARY KEY (job, app)
    )""",
    # history
    "CREATE INDEX IF NOT EXISTS job_apps_by_app ON job_apps (app, job)",
    # schedules: one schedule per repository
    """CREATE TABLE IF NOT EXISTS schedules (
        repository TEXT PRIMARY KEY,
        settings TEXT NOT NULL,      -- JSON: keep counts, hour, time zone, excluded apps
        overdue_alerted TEXT         -- UTC, ISO 8601: when an overdue alert last went out
    )""",
    # alerts: where failures and overdue backups are reported, per repository
    """CREATE TABLE IF NOT EXISTS alert_channels (
        repository TEXT NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,          -- webhook | ntfy | email | healthchecks
        events TEXT NOT NULL,        -- JSON list: start, success, failure, overdue
        settings TEXT NOT NULL,      -- JSON; secrets live in $HOMESAFE_HOME/secrets
        PRIMARY KEY (repository, name)
    )""",
    # repositories: the registry of repositories besides the embedded default. A
    # passphrase source says where the passphrase comes from (file path, environment
    # variable name, or command argv), never the passphrase itself.
    """CREATE TABLE IF NOT EXISTS repositories (
        name TEXT PRIMARY KEY,
        location TEXT NOT NULL,
        engine TEXT NOT NULL,            -- borg | restic
        encryption TEXT NOT NULL,
        compression TEXT NOT NULL,
        passphrase_source TEXT NOT NULL, -- JSON: {"file"|"environment"|"command": ...}
        lock_wait REAL NOT NULL,         -- seconds to wait for a live lock
        added TEXT NOT NULL              -- UTC, ISO 8601
    )""",
]


@contextmanager
def connect() -> Iterator[sqlite3.Connection]:
    """A connection to the state database, committed on success, rolled back on error."""
    locations.ensure_home()
    with closing(sqlite3.connect(locations.state_database(), timeout=30)) as connection:
        for statement in SCHEMA:
            connection.execute(statement)
        with connection:
            yield connection


def registered_engines(names: Sequence[str]) -> list[str] | None:
    """The engines of the registered repositories among ``names``, read without making
    or changing anything (a missing database registers none); None if the database
    cannot be read. For start-up, before the registry's module is imported."""
    if not names:
        return []
    try:
        # Read-only, and never made.
        uri = f"{locations.state_database().as_uri()}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True)) as connection:
            rows = connection.execute(
                f"SELECT engine FROM repositories WHERE name IN ({','.join('?' * len(names))})",  # noqa: S608
                list(names),
            ).fetchall()
    except (sqlite3.Error, ValueError):
        return None
    return [str(engine) for (engine,) in rows]


def get_setting(key: str, default: Any = None) -> Any:
    """The value stored under ``key``, or ``default``."""
    with connect() as connection:
        row = connection.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return default if row is None else json.loads(row[0])


def set_setting(key: str, value: Any) -> None:
    """Store ``value`` (anything JSON can hold) under ``key``."""
    with connect() as connection:
        connection.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )


def delete_setting(key: str) -> None:
    with connect() as connection:
        connection.execute("DELETE FROM settings WHERE key = ?", (key,))


def read_settings(keys: Iterable[str]) -> dict[str, Any]:
    """The stored values of ``keys``; keys never set are left out."""
    keys = list(keys)
    if not keys:
        return {}
    with connect() as connection:
        rows = connection.execute(
            f"SELECT key, value FROM settings WHERE key IN ({','.join('?' * len(keys))})",  # noqa: S608
            keys,
        ).fetchall()
    return {key: json.loads(value) for key, value in rows}


def write_settings(values: dict[str, Any]) -> None:
    """Store every key of ``values`` in one transaction."""
    if not values:
        return
    with connect() as connection:
        connection.executemany(
            "INSERT INTO settings (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [(key, json.dumps(value)) for key, value in values.items()],
        )
