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
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from typing import Any

from homesafe import locations

# One entry per table (or index), each owned by the module named in its comment.
SCHEMA = [
    # api: the settings store apps read and write
    """CREATE TABLE IF NOT EXISTS settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL          -- JSON
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
