"""Archive names and the metadata homesafe stores inside every archive.

Inside an archive, homesafe's own files live under ``.homesafe/`` (a name no app may
own): ``archive.json`` describes the archive and every app in it, with the manifest as
it was at backup time; ``settings/<app>.json`` holds an app's settings. The archive
comment carries a compact JSON summary (the app ids and the user's comment) so that
listing the apps of many archives needs no extraction.

An app archive also holds ``.homesafe/run/<32 hex digits>``, an empty file whose name is
drawn at random for each backup run (:func:`write_run_marker`): it tells one archive
from any other of the same name in a listing, without extracting anything.

Besides, the host that wrote an archive keeps a *record* of it (:func:`save_record`,
under ``$HOMESAFE_HOME/archive-records/<repository>/<archive>/``): a copy of the
archive's own ``.homesafe/`` files (run marker included) and the size of each captured
path as measured after the engine read it, and, for restic, the snapshot's id. A
restore on that host plans from the record instead of reading the archive first (a
restic restore addresses the snapshot by the recorded id), and checks, in the archive's
listing, that the run marker is the record's before anything is swapped in.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from homesafe import __version__, locations
from homesafe.errors import ManifestError, ManifestProblem, UsageError
from homesafe.manifest import Manifest, parse_manifest

METADATA_DIRECTORY = ".homesafe"
METADATA_FILE = f"{METADATA_DIRECTORY}/archive.json"
SETTINGS_DIRECTORY = f"{METADATA_DIRECTORY}/settings"
METADATA_FORMAT = 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+@-]*")


# The names default_name and scheduled_name read from the clock in this process.
_CLOCK_NAMES: set[str] = set()


def default_name(now: datetime.datetime | None = None, host: str | None = None) -> str:
    """``<host>-<UTC time to the microsecond>Z``: sortable, and unique per host.

    One operation at a time runs per host, so two names can only meet if the clock is
    set back onto the very microsecond of an earlier backup; borg then refuses the
    duplicate instead of overwriting anything (see :func:`from_the_clock` for restic).
    """
    name = _timed_name(now, host)
    if now is None:
        _CLOCK_NAMES.add(name)
    return name


def scheduled_name(now: datetime.datetime | None = None, host: str | None = None) -> str:
    """``scheduled-<host>-<UTC time>Z``: a scheduled archive, told apart at a glance.

    Retention does not rely on the name (the comment's ``periods`` say what an archive
    serves): the prefix is for the people reading a listing.
    """
    name = f"scheduled-{_timed_name(now, host)}"
    if now is None:
        _CLOCK_NAMES.add(name)
    return name


def from_the_clock(name: str) -> bool:
    """Whether ``name`` is one that :func:`default_name` or :func:`scheduled_name` made
    from the clock in this process (not from a time the caller gave, which may come
    twice), or one :func:`known_to_be_free` vouched for: no earlier archive can bear
    it, so an engine whose duplicate check costs a call of its own (restic: a listing)
    may skip that check."""
    return name in _CLOCK_NAMES


def known_to_be_free(name: str) -> None:
    """Vouch for ``name`` as :func:`from_the_clock` does for names read from the clock:
    its caller has just listed the repository and no archive bears it (the scheduler,
    whose names carry this host and a time to the microsecond)."""
    _CLOCK_NAMES.add(name)


def _timed_name(now: datetime.datetime | None, host: str | None) -> str:
    now = now or datetime.datetime.now(datetime.UTC)
    host = host or locations.hostname().split(".")[0] or "host"
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


def comment_summary(
    app_ids: list[str],
    user_comment: str | None,
    periods: Sequence[str] = (),
    *,
    scope: str = "apps",
    subvolume: str | None = None,
) -> str:
    """The archive comment: compact JSON with the app ids and the user's comment.

    A scheduled archive also lists the schedule ``periods`` it serves (daily, weekly,
    monthly): retention prunes only archives that have them. A full-system archive
    (``scope`` "full") says so, with the ``subvolume`` it holds.
    """
    summary: dict[str, Any] = {"homesafe": METADATA_FORMAT, "apps": app_ids}
    if scope != "apps":
        summary["scope"] = scope
    if subvolume is not None:
        summary["subvolume"] = subvolume
    if user_comment:
        summary["comment"] = user_comment
    if periods:
        summary["periods"] = list(periods)
    return json.dumps(summary, separators=(",", ":"))


@dataclass
class CommentSummary:
    """What an archive comment tells: homesafe's or not, its apps, the user's text."""

    is_homesafe: bool
    apps: list[str] = field(default_factory=list)
    comment: str = ""
    # The schedule periods a scheduled homesafe archive serves; empty for manual ones.
    periods: list[str] = field(default_factory=list)
    # "apps", or "full" for a full-system archive (one whole btrfs subvolume).
    scope: str = "apps"


def parse_comment(comment: str) -> CommentSummary:
    """Read an archive comment; comments homesafe did not write are kept as text."""
    try:
        value = json.loads(comment) if comment else None
    except ValueError:
        value = None
    if isinstance(value, dict) and "homesafe" in value:
        apps = value.get("apps", [])
        periods = value.get("periods", [])
        return CommentSummary(
            True,
            [str(app) for app in apps] if isinstance(apps, list) else [],
            str(value.get("comment", "")),
            [str(period) for period in periods] if isinstance(periods, list) else [],
            str(value.get("scope", "apps")),
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


RUN_MARKER_DIRECTORY = f"{METADATA_DIRECTORY}/run"


def write_run_marker(directory: Path) -> str:
    """Write ``.homesafe/run/<id>`` below ``directory``: an empty file named by 128
    random bits, new for each backup run; returns the id."""
    run_id = os.urandom(16).hex()
    marker = directory / RUN_MARKER_DIRECTORY / run_id
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return run_id


def run_markers(paths: Sequence[str]) -> list[str]:
    """The run ids among archive ``paths`` (those of :func:`write_run_marker`)."""
    prefix = RUN_MARKER_DIRECTORY + "/"
    return [path[len(prefix) :] for path in paths if path.startswith(prefix)]


def build_metadata(
    *, archive_name: str, comment: str | None, apps: list[dict[str, Any]], scope: str = "apps"
) -> dict[str, Any]:
    """The document stored as ``.homesafe/archive.json``; ``scope`` is "apps", or "full"
    for a full-system archive (which has no apps)."""
    return {
        "format": METADATA_FORMAT,
        "scope": scope,
        "homesafe_version": __version__,
        "host": locations.hostname(),
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


# -- reading what an archive says about itself ----------------------------------------

# Archives written by the reference distribution keep their app list here (one JSON
# file whose name we must not compute) and each app's settings in the data folder.
REFERENCE_MANIFESTS = "var/lib/plinth/backups-manifests"
REFERENCE_DATA = "var/lib/plinth/backups-data"
# What to extract from an archive to learn what it holds, whoever wrote it.
DESCRIPTION_MEMBERS = (METADATA_DIRECTORY, REFERENCE_MANIFESTS)


@dataclass
class StoredApp:
    """One app as an archive describes it.

    ``paths`` are the paths actually captured (None: every path of the manifest);
    ``settings`` the settings saved with it. Reference archives keep an app's settings
    in a file of their own, ``settings_file`` (an archive path), read by
    :func:`load_reference_settings`.
    """

    manifest: Manifest
    paths: list[str] | None = None
    settings: dict[str, Any] | None = None
    settings_file: str | None = None
    strategy: str | None = None
    downtime_seconds: float | None = None


@dataclass
class ArchiveDescription:
    """What an archive holds: its format, its apps, and its raw metadata."""

    format: str  # "homesafe" or "reference"
    apps: dict[str, StoredApp]
    metadata: dict[str, Any]


def describe_extracted(
    directory: Path, source: str, known: Sequence[Manifest] = ()
) -> ArchiveDescription | None:
    """Read the description extracted below ``directory`` (DESCRIPTION_MEMBERS), or None
    when the archive is neither homesafe's nor the reference distribution's.

    ``known``: manifests validated before (the installed apps'). A stored manifest equal
    to one of them, field for field, is that manifest: it is not validated again.
    """
    metadata = read_metadata(directory)
    if metadata is not None:
        apps = {}
        for entry in metadata.get("apps", []):
            manifest = stored_manifest(entry["manifest"], f"{source}: app {entry.get('id')}", known)
            apps[manifest.id] = StoredApp(
                manifest,
                paths=entry.get("paths"),
                settings=read_settings(directory, manifest.id) or {},
                strategy=entry.get("strategy"),
                downtime_seconds=entry.get("downtime_seconds"),
            )
        return ArchiveDescription("homesafe", apps, metadata)
    manifests_directory = directory / REFERENCE_MANIFESTS
    files = sorted(manifests_directory.glob("*.json")) if manifests_directory.is_dir() else []
    if not files:
        return None
    try:
        document = json.loads(files[0].read_text())
    except ValueError as error:
        raise ManifestError(
            [ManifestProblem(f"{source}: {files[0].name}", "", f"not valid JSON: {error}")]
        ) from None
    entries = document.get("apps", []) if isinstance(document, dict) else document
    apps = {}
    for entry in entries if isinstance(entries, list) else []:
        app = reference_app(entry, source)
        apps[app.manifest.id] = app
    return ArchiveDescription("reference", apps, {"format": "reference", "apps": entries})


def stored_manifest(data: Any, source: str, known: Sequence[Manifest] = ()) -> Manifest:
    """A manifest stored in an archive: one of ``known`` when it is equal to it, else
    validated (which imports pydantic: some 0.15 s of a restore's critical path)."""
    for manifest in known:
        if isinstance(data, dict) and data.get("id") == manifest.id and data == manifest.to_dict():
            return manifest
    return parse_manifest(data, source)


def reference_app(entry: Any, source: str) -> StoredApp:
    """Turn one app entry of a reference archive into a homesafe manifest.

    Its services are systemd units (plain strings or ``{"type": "system"}``) or apache
    sites, configs and modules; its settings are read from its settings file.
    """
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ManifestError([ManifestProblem(source, "apps", f"not an app entry: {entry!r}")])
    app_id = entry["name"]
    backup = entry.get("backup") or {}
    data: dict[str, Any] = {"id": app_id, "version": entry.get("version", 0)}
    for section in ("config", "data", "secrets"):
        value = backup.get(section) or {}
        data[section] = {kind: list(value.get(kind) or []) for kind in ("directories", "files")}
    services = []
    for service in backup.get("services") or []:
        if isinstance(service, str):
            services.append({"type": "systemd", "name": service})
        elif service.get("type") == "apache":
            services.append({"type": "apache", "kind": service["kind"], "name": service["name"]})
        else:
            services.append({"type": "systemd", "name": service["name"]})
    data["services"] = services
    settings_keys = list(backup.get("settings") or [])
    data["settings"] = settings_keys
    settings_file = f"{REFERENCE_DATA}/{app_id}-settings.json" if settings_keys else None
    manifest = parse_manifest(data, f"{source}: app {app_id}")
    return StoredApp(manifest, settings={}, settings_file=settings_file)


def reference_settings_members(description: ArchiveDescription) -> list[str]:
    """The archive paths of a reference archive's settings files."""
    return [app.settings_file for app in description.apps.values() if app.settings_file]


def load_reference_settings(description: ArchiveDescription, directory: Path) -> None:
    """Read each app's settings from its settings file extracted below ``directory``;
    only the keys its manifest names are kept."""
    for app in description.apps.values():
        if not app.settings_file:
            continue
        try:
            values = json.loads((directory / app.settings_file).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(values, dict):
            app.settings = {key: values[key] for key in app.manifest.settings if key in values}


# -- the local record of an archive this host wrote ------------------------------------

RECORDS_DIRECTORY = "archive-records"
RECORD_FILE = "record.json"
RECORD_FORMAT = 1
# Records kept per repository, newest first: restores are mostly of recent archives,
# and an older archive without a record is read from the repository as before.
RECORDS_KEPT = 20


# A directory of at least this many bytes has the sizes of what it holds (its
# children) recorded, when they are at most SPLIT_CHILDREN_MAX: a restore may then
# extract them side by side (see homesafe.restore.plan_extractions). Each call names the
# children it takes, and the last one those it leaves, to the engine (borg: as one
# regular expression, one argument, which Linux caps at 128 KiB): hence the caps on
# their number and on their names' length. Two calls of 64 MiB (PARALLEL_EXTRACTION_MIN_BYTES)
# each pay borg's start-up (~0.1 s of CPU without its self-tests) and gain more: a
# 200 MB directory restored in 1.33 s, not 1.56 s (2 cores).
SPLIT_DIRECTORY_MIN_BYTES = 128 * 1024 * 1024
SPLIT_CHILDREN_MAX = 1000
SPLIT_NAMES_MAX_BYTES = 32 * 1024


def splittable_children(children: dict[str, int]) -> dict[str, int] | None:
    """``children`` (the bytes below each child of a directory, by name) if a restore
    may share them out: together at least SPLIT_DIRECTORY_MIN_BYTES, at most
    SPLIT_CHILDREN_MAX of them, and their names (UTF-8, one separator each) at most
    SPLIT_NAMES_MAX_BYTES; None otherwise."""
    if sum(children.values()) < SPLIT_DIRECTORY_MIN_BYTES:
        return None
    if not 0 < len(children) <= SPLIT_CHILDREN_MAX:
        return None
    names_bytes = sum(len(name.encode("utf-8", "surrogateescape")) + 1 for name in children)
    return children if names_bytes <= SPLIT_NAMES_MAX_BYTES else None


@dataclass(frozen=True)
class PathSize:
    """What one captured path held when measured: bytes of file data, and entries
    (files, directories, links), each of which takes at least a block when staged;
    for a large directory (SPLIT_DIRECTORY_MIN_BYTES), the bytes below each of its
    children by name (None: not measured), and its own ``times``: (mtime, ctime) in
    nanoseconds, when it had neither a default ACL nor a flag that keeps entries from
    being made or removed in it (None otherwise; see
    :func:`homesafe.restore.plan_extractions`)."""

    bytes: int
    entries: int
    children: dict[str, int] | None = None
    times: tuple[int, int] | None = None


@dataclass
class ArchiveRecord:
    """A record this host kept of an archive it wrote: ``directory`` holds a copy of
    the archive's ``.homesafe/`` files, ``run_id`` its run marker's id, ``sizes`` each
    captured path's size, ``archive_id`` the engine's id of the archive when it has
    one (restic's snapshot id; empty for borg, whose names are unique)."""

    directory: Path
    run_id: str
    sizes: dict[str, PathSize]
    archive_id: str = ""


def record_directory(home: Path, repository_name: str, archive_name: str) -> Path | None:
    """Where the record of ``archive_name`` in ``repository_name`` lives (None when the
    names cannot be directory names)."""
    for name in (repository_name, archive_name):
        if not name or "/" in name or name.startswith(".") or "\0" in name:
            return None
    return home / RECORDS_DIRECTORY / repository_name / archive_name


def save_record(
    directory: Path,
    metadata_root: Path,
    location: str,
    sizes: dict[str, PathSize],
    archive_id: str = "",
) -> None:
    """Record an archive just written: its ``.homesafe/`` files (read from
    ``metadata_root``, the directory the engine archived them from), ``sizes`` and the
    engine's ``archive_id`` (if any).

    Written into a new directory renamed into place, so a reader never sees half a
    record; an older record of the same name is replaced. Only the RECORDS_KEPT newest
    records of the repository are kept.
    """
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = parent / f".{directory.name}.{os.urandom(4).hex()}"
    try:
        shutil.copytree(metadata_root / METADATA_DIRECTORY, partial / METADATA_DIRECTORY)
        document = {
            "format": RECORD_FORMAT,
            "location": location,
            "sizes": {path: _size_document(size) for path, size in sizes.items()},
            "archive_id": archive_id,
        }
        (partial / RECORD_FILE).write_text(json.dumps(document, sort_keys=True))
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
        os.rename(partial, directory)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _prune_records(parent)


def _size_document(size: PathSize) -> list[Any]:
    """``[bytes, entries]``, then the children (if measured), then the times (if
    measured, which they are only with the children)."""
    document: list[Any] = [size.bytes, size.entries]
    if size.children is not None:
        document.append(size.children)
        if size.times is not None:
            document.append(list(size.times))
    return document


def _size_from_document(document: Any) -> PathSize:
    """The inverse of :func:`_size_document` (raises on anything else)."""
    children = document[2] if len(document) > 2 else None
    times = document[3] if len(document) > 3 else None
    return PathSize(
        int(document[0]),
        int(document[1]),
        {str(name): int(count) for name, count in children.items()}
        if children is not None
        else None,
        (int(times[0]), int(times[1])) if times is not None else None,
    )


def _prune_records(parent: Path) -> None:
    try:
        found = [(entry.stat().st_mtime, entry.path) for entry in os.scandir(parent)]
    except OSError:
        return
    found.sort(reverse=True)
    for _, path in found[RECORDS_KEPT:]:
        shutil.rmtree(path, ignore_errors=True)


def forget_records(home: Path, repository_name: str, archive_names: Sequence[str]) -> None:
    """Remove the records of ``archive_names`` in ``repository_name``: they are gone."""
    for name in archive_names:
        directory = record_directory(home, repository_name, name)
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


def forget_repository_records(home: Path, repository_name: str) -> None:
    """Remove every record of ``repository_name``: it is forgotten."""
    if repository_name and "/" not in repository_name and not repository_name.startswith("."):
        shutil.rmtree(home / RECORDS_DIRECTORY / repository_name, ignore_errors=True)


def load_record(directory: Path | None, location: str) -> ArchiveRecord | None:
    """The record in ``directory`` if there is a whole one for a repository at
    ``location``; None otherwise (no record, another repository, unreadable)."""
    if directory is None:
        return None
    try:
        document = json.loads((directory / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(document, dict)
        or document.get("format") != RECORD_FORMAT
        or document.get("location") != location
        or not (directory / METADATA_FILE).is_file()
    ):
        return None
    try:
        sizes = {str(path): _size_from_document(size) for path, size in document["sizes"].items()}
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None
    archive_id = document.get("archive_id", "")
    if not isinstance(archive_id, str):
        return None
    try:
        markers = os.listdir(directory / RUN_MARKER_DIRECTORY)
    except OSError:
        return None
    if len(markers) != 1:
        return None
    return ArchiveRecord(directory, markers[0], sizes, archive_id)
