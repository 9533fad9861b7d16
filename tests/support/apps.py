"""Helpers for integration tests: manifests written from dicts, argv hooks, probes.

Manifests are built as plain dicts and turned into TOML here, so that a test reads as
data; argv hooks that need a shell say so explicitly (``sh -c`` is still an argv list).
"""

from __future__ import annotations

import json
import os
import shlex
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from homesafe import api

Argv = list[str]


def sh(script: str) -> Argv:
    """An argv that runs ``script`` with /bin/sh."""
    return ["sh", "-c", script]


def _value(value: Any) -> str:
    # JSON strings, numbers, booleans and arrays of them are valid TOML values.
    return json.dumps(value)


def to_toml(data: dict[str, Any]) -> str:
    """A manifest dict as TOML: scalars first, then tables, then arrays of tables."""
    lines = []
    tables = []
    arrays = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            arrays.append((key, value))
        else:
            lines.append(f"{key} = {_value(value)}")
    for key, table in tables:
        lines.append(f"\n[{key}]")
        lines += [f"{name} = {_value(value)}" for name, value in table.items()]
    for key, items in arrays:
        for item in items:
            lines.append(f"\n[[{key}]]")
            lines += [f"{name} = {_value(value)}" for name, value in item.items()]
    return "\n".join(lines) + "\n"


def command_service(daemon: Any, name: str, log: Path | None = None) -> dict[str, Any]:
    """A command-type service driving ``daemon`` (a tests.conftest.Daemon).

    With ``log``, every stop and start is first appended to that shared file as
    "<action> <name>", so that the order across services and apps can be checked.
    """

    def command(action: str) -> Argv:
        argv: Argv = daemon.argv(action)
        if log is None:
            return argv
        return sh(f"echo '{action} {name}' >> {shlex.quote(str(log))} && exec {shlex.join(argv)}")

    return {
        "type": "command",
        "name": name,
        "start": command("start"),
        "stop": command("stop"),
        "status": daemon.argv("status"),
    }


def make_tree(directory: Path, files: dict[str, str | bytes]) -> Path:
    """Create ``directory`` with the given relative files and contents."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return directory


def lockdown_flags(homesafe_env: Path) -> list[str]:
    """The app ids that still have a lockdown flag under ``$HOMESAFE_HOME/lockdown``."""
    directory = homesafe_env / "home" / "lockdown"
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def lockdown_flag(homesafe_env: Path, app_id: str) -> Path:
    return homesafe_env / "home" / "lockdown" / app_id


def archive_paths(archive_name: str) -> set[str]:
    """Every path stored in the archive (absolute again), homesafe's own files left out."""
    _, contents = api.read_archive(archive_name)
    return {"/" + entry.path for entry in contents}


def errors_of(result: api.OperationResult, app_id: str) -> list[tuple[str, str | None]]:
    return [(error.error_type, error.hook) for error in result.app(app_id).errors]


def describe(result: api.OperationResult) -> str:
    """The whole result as JSON, for assertion messages."""
    return json.dumps(result.to_dict(), indent=1)


def process_state(pid: int) -> str | None:
    """The state letter of a process (R, S, Z...), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    return process_state(pid) not in (None, "Z", "X")


def actions(daemon: Any) -> list[str]:
    """The daemon's calls without the status queries: its starts and stops."""
    return [call for call in daemon.calls() if call != "status"]


def ticks(daemon: Any) -> list[float]:
    path = daemon.state / "ticks"
    return [float(line) for line in path.read_text().split()] if path.exists() else []


def only(items: Sequence[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]


# A minimal default ACL, in the binary form of the system.posix_acl_default attribute
# (set without setfacl): version 2, then (tag, permissions, id) for the owner (rwx), the
# group (r-x) and others (r-x).
DEFAULT_ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, permissions, 0xFFFFFFFF)
    for tag, permissions in ((0x01, 7), (0x04, 5), (0x20, 5))
)
