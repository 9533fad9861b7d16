"""Archive names and the metadata homesafe stores inside every archive.

Inside an archive, homesafe's own files live under ``.homesafe/`` (a name no app may
own): ``archive.json`` describes the archive and every app in it, with the manifest as
it was at backup time; ``settings/<app>.json`` holds an app's settings. The archive
comment carries a compact JSON summary (the app ids and the user's comment) so that
listing the apps of many archives needs no extraction.
"""

from __future__ import annotations

import datetime
import json
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from homesafe import __version__
from homesafe.errors import UsageError

METADATA_DIRECTORY = ".homesafe"
METADATA_FILE = f"{METADATA_DIRECTORY}/archive.json"
SETTINGS_DIRECTORY = f"{METADATA_DIRECTORY}/settings"
METADATA_FORMAT = 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+@-]*")


def default_name(now: datetime.datetime | None = None, host: str | None = None) -> str:
    """``<host>-<UTC time to the microsecond>Z``: sortable, and unique per host.

    One operation at a time runs per host, so two names can only meet if the clock is
    set back; the engine then refuses the duplicate instead of overwriting anything.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    host = host or socket.gethostname().split(".")[0] or "host"
    host = re.sub(r"[^A-Za-z0-9-]", "-", host)
    return f"{host}-{now.astimezone(datetime.UTC):%Y-%m-%dT%H:%M:%S.%f}Z"


def check_name(name: str) -> str:
    """``name`` if it can be an archive name, else a UsageError saying why."""
    if len(name) > 200 or not NAME_PATTERN.fullmatch(name) or "::" in name:
        raise UsageError(
            f"{name!r} cannot be an archive name",
            hint="Use letters, digits and . _ : + @ - (starting with a letter or digit).",
        )
    return name


def comment_summary(app_ids: list[str], user_comment: str | None) -> str:
    """The archive comment: compact JSON with the app ids and the user's comment."""
    summary: dict[str, Any] = {"homesafe": METADATA_FORMAT, "apps": app_ids}
    if user_comment:
        summary["comment"] = user_comment
    return json.dumps(summary, separators=(",", ":"))


@dataclass
class CommentSummary:
    """What an archive comment tells: homesafe's or not, its apps, the user's text."""

    is_homesafe: bool
    apps: list[str] = field(default_factory=list)
    comment: str = ""


def parse_comment(comment: str) -> CommentSummary:
    """Read an archive comment; comments homesafe did not write are kept as text."""
    try:
        value = json.loads(comment) if comment else None
    except ValueError:
        value = None
    if isinstance(value, dict) and "homesafe" in value:
        apps = value.get("apps", [])
        return CommentSummary(
            True,
            [str(app) for app in apps] if isinstance(apps, list) else [],
            str(value.get("comment", "")),
        )
    return CommentSummary(False, [], comment)


def settings_member(app_id: str) -> str:
    return f"{SETTINGS_DIRECTORY}/{app_id}.json"


def write_metadata(
    directory: Path, metadata: dict[str, Any], settings: dict[str, dict[str, Any]]
) -> None:
    """Write ``.homesafe/archive.json`` and the settings files below ``directory``."""
    (directory / SETTINGS_DIRECTORY).mkdir(parents=True, exist_ok=True)
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    for app_id, values in settings.items():
        (directory / settings_member(app_id)).write_text(json.dumps(values, sort_keys=True))


def build_metadata(
    *, archive_name: str, comment: str | None, apps: list[dict[str, Any]]
) -> dict[str, Any]:
    """The document stored as ``.homesafe/archive.json``."""
    return {
        "format": METADATA_FORMAT,
        "homesafe_version": __version__,
        "host": socket.gethostname(),
        "archive": archive_name,
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "comment": comment or "",
        "apps": apps,
    }


def read_metadata(directory: Path) -> dict[str, Any] | None:
    """The metadata extracted below ``directory``, or None when there is none."""
    try:
        value = json.loads((directory / METADATA_FILE).read_text())
    except FileNotFoundError:
        return None
    return value if isinstance(value, dict) else None


def read_settings(directory: Path, app_id: str) -> dict[str, Any] | None:
    """The settings of ``app_id`` extracted below ``directory``, or None."""
    try:
        value = json.loads((directory / settings_member(app_id)).read_text())
    except FileNotFoundError:
        return None
    return value if isinstance(value, dict) else None
