"""Finding apps and putting them in order.

Apps come from two places: TOML manifests in ``$HOMESAFE_CONFIG/apps.d/`` and Python
objects registered under the entry point group ``homesafe.apps``. A Python app is any
object with a ``manifest`` attribute (a :class:`~homesafe.manifest.Manifest` or a
mapping in the same shape) and, optionally, the reference design's hook methods
``backup_pre``, ``backup_post``, ``restore_pre`` and ``restore_post``, each called
with the :class:`~homesafe.api.Packet`.

:func:`load_apps` validates everything at once and raises one
:class:`~homesafe.errors.ManifestError` listing every problem it found.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homesafe import __version__, execute, locations
from homesafe.errors import (
    AppNotFoundError,
    DependencyError,
    ManifestError,
    ManifestProblem,
)
from homesafe.manifest import (
    HOOK_NAMES,
    Manifest,
    is_inside,
    load_manifest_file,
    parse_manifest,
)

ENTRY_POINT_GROUP = "homesafe.apps"


@dataclass(frozen=True)
class App:
    """An app known to homesafe: its manifest, where it came from, its Python hooks."""

    manifest: Manifest
    source: str
    implementation: Any = None  # the Python object of an entry-point app

    @property
    def id(self) -> str:
        return self.manifest.id

    def python_hook(self, hook_name: str) -> Callable[[Any], Any] | None:
        """The Python method for ``hook_name``, if this app has one."""
        if hook_name not in HOOK_NAMES or self.implementation is None:
            return None
        method = getattr(self.implementation, hook_name, None)
        return method if callable(method) else None

    def is_installed(self) -> bool:
        """True unless the manifest's ``setup.installed`` command says otherwise."""
        command = self.manifest.setup.installed
        return command is None or execute.succeeds(command)

    def with_manifest(self, manifest: Manifest) -> App:
        """The same app (same Python hooks) described by another manifest."""
        return App(manifest=manifest, source=self.source, implementation=self.implementation)


def load_apps(apps_directory: Path | None = None, *, entry_points: bool = True) -> dict[str, App]:
    """Every declared app by id, validated as a whole.

    Raises ManifestError listing every problem of every manifest, including the rules
    between apps: unique ids, no path owned by two apps, dependencies that exist and
    form no cycle.
    """
    directory = apps_directory if apps_directory is not None else locations.apps_directory()
    problems: list[ManifestProblem] = []
    apps: list[App] = []
    cache = ManifestCache.load()
    for path in manifest_files(directory):
        try:
            status = check_manifest_permissions(path)
            manifest = cache.get(path, status)
            if manifest is None:
                manifest = load_manifest_file(path)
                cache.put(path, status, manifest)
            apps.append(App(manifest, str(path)))
        except ManifestError as error:
            problems.extend(error.problems)
    if entry_points:
        for name, value in cache.entry_points():
            source = f"entry point {name} ({value})"
            try:
                implementation = _load_entry_point(name, value)
                raw_manifest = implementation.manifest
            except Exception as error:
                problems.append(ManifestProblem(source, "", f"cannot be loaded: {error}"))
                continue
            try:
                apps.append(App(parse_manifest(raw_manifest, source), source, implementation))
            except ManifestError as error:
                problems.extend(error.problems)
    cache.save()
    problems.extend(cross_app_problems(apps))
    if problems:
        raise ManifestError(problems)
    return {app.id: app for app in apps}


def _load_entry_point(name: str, value: str) -> Any:
    """The object an entry point of ENTRY_POINT_GROUP names (importing its module)."""
    from importlib.metadata import EntryPoint

    return EntryPoint(name, value, ENTRY_POINT_GROUP).load()


def _installed_entry_points() -> list[tuple[str, str]]:
    """(name, value) of every entry point of ENTRY_POINT_GROUP the installed
    distributions declare."""
    from importlib import metadata

    return [(entry.name, entry.value) for entry in metadata.entry_points(group=ENTRY_POINT_GROUP)]


def _search_path_identity() -> list[list[Any]]:
    """sys.path with each entry's modification time: installing, upgrading or removing
    a distribution adds or removes its ``*.dist-info`` directory, which changes the
    time of the directory holding it."""
    identity: list[list[Any]] = []
    for entry in sys.path:
        try:
            modified: int | None = os.stat(entry or ".").st_mtime_ns
        except OSError:
            modified = None
        identity.append([entry, modified])
    return identity


def manifest_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.glob("*.toml") if path.is_file())


def check_manifest_permissions(path: Path) -> os.stat_result:
    """As root, refuse a manifest others could have written: it would run as root.

    Returns the manifest file's status.
    """
    file_status = path.stat()
    if not locations.running_as_root():
        return file_status
    for checked in (path, path.parent):
        status = checked.stat()
        if status.st_uid != 0:
            raise ManifestError(
                [ManifestProblem(str(path), "", f"{checked} is not owned by root; refusing it")]
            )
        if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ManifestError(
                [
                    ManifestProblem(
                        str(path),
                        "",
                        f"{checked} is writable by group or others "
                        f"(mode {stat.S_IMODE(status.st_mode):o}); run chmod go-w {checked}",
                    )
                ]
            )
    return file_status


class ManifestCache:
    """Manifests validated before, by file identity, kept in ``$HOMESAFE_HOME``.

    Validation imports pydantic, which alone costs more start-up time than homesafe may
    add to a backup; a manifest whose file has not changed (same inode, size, mtime and
    ctime, and the same homesafe version) is rebuilt from the cache instead. The app
    entry points installed are kept there too (see :meth:`entry_points`). The cache
    lives in the state directory (0700), so only who may change homesafe's state may
    change it; a cache that cannot be read or written is simply not used.
    """

    FILE_NAME = "manifest-cache.json"

    def __init__(self, entries: dict[str, Any], found_entry_points: Any = None) -> None:
        self.entries = entries
        # What entry_points() found last, and for which sys.path (see there).
        self.found_entry_points = found_entry_points
        self.changed = False

    @classmethod
    def load(cls) -> ManifestCache:
        try:
            document = json.loads((locations.home() / cls.FILE_NAME).read_text())
        except (OSError, ValueError):
            return cls({})
        if not isinstance(document, dict) or document.get("homesafe") != __version__:
            return cls({})
        entries = document.get("manifests")
        return cls(entries if isinstance(entries, dict) else {}, document.get("entry_points"))

    @staticmethod
    def identity(status: os.stat_result) -> list[int]:
        return [
            status.st_dev,
            status.st_ino,
            status.st_size,
            status.st_mtime_ns,
            status.st_ctime_ns,
        ]

    def get(self, path: Path, status: os.stat_result) -> Manifest | None:
        entry = self.entries.get(str(path))
        if not isinstance(entry, dict) or entry.get("identity") != self.identity(status):
            return None
        try:
            return Manifest.from_validated(entry["manifest"])
        except (KeyError, TypeError):
            return None

    def put(self, path: Path, status: os.stat_result, manifest: Manifest) -> None:
        self.entries[str(path)] = {
            "identity": self.identity(status),
            "manifest": manifest.to_dict(),
        }
        self.changed = True

    def entry_points(self) -> list[tuple[str, str]]:
        """The app entry points installed, as (name, value): from the cache while no
        directory of sys.path changed, else found by :mod:`importlib.metadata`, which
        is not even imported otherwise (its imports alone cost some 10-20 ms)."""
        identity = _search_path_identity()
        cached = self.found_entry_points
        if isinstance(cached, dict) and cached.get("search_path") == identity:
            try:
                return [(str(name), str(value)) for name, value in cached["entry_points"]]
            except (KeyError, TypeError, ValueError):
                pass
        found = _installed_entry_points()
        self.found_entry_points = {"search_path": identity, "entry_points": found}
        self.changed = True
        return found

    def save(self) -> None:
        if not self.changed:
            return
        document = {
            "homesafe": __version__,
            "manifests": self.entries,
            "entry_points": self.found_entry_points,
        }
        with contextlib.suppress(OSError):
            locations.ensure_home()
            locations.write_secret_file(locations.home() / self.FILE_NAME, json.dumps(document))


def cross_app_problems(apps: Sequence[App]) -> list[ManifestProblem]:
    """Problems between apps: duplicate ids, shared paths, missing dependencies, cycles."""
    problems: list[ManifestProblem] = []
    seen: dict[str, App] = {}
    for app in apps:
        if app.id in seen:
            problems.append(
                ManifestProblem(
                    app.source, "id", f"{app.id!r} is declared by {seen[app.id].source} too"
                )
            )
        else:
            seen[app.id] = app
    owners: list[tuple[str, App, str]] = []
    for app in apps:
        for section_name, section in app.manifest.sections():
            for kind in ("directories", "files"):
                for path in getattr(section, kind):
                    owners.append((path, app, f"{section_name}.{kind}"))
    for index, (path, app, field) in enumerate(owners):
        for other_path, other_app, _ in owners[index + 1 :]:
            if other_app is app:
                continue
            if is_inside(path, other_path) or is_inside(other_path, path):
                problems.append(
                    ManifestProblem(
                        app.source,
                        field,
                        f"{path} overlaps {other_path} of app {other_app.id!r}; "
                        "a path can belong to one app only",
                    )
                )
    for app in apps:
        for dependency in app.manifest.depends:
            if dependency not in seen:
                problems.append(
                    ManifestProblem(app.source, "depends", f"unknown app {dependency!r}")
                )
    try:
        dependency_order(list(seen.values()))
    except DependencyError as error:
        problems.append(ManifestProblem("apps", "depends", error.message))
    return problems


def dependency_order(apps: Iterable[App]) -> list[App]:
    """``apps`` with every app after the apps it depends on; ties keep id order.

    Dependencies outside ``apps`` are ignored (they are not part of this operation).
    Raises DependencyError naming the apps of a cycle.
    """
    by_id = {app.id: app for app in sorted(apps, key=lambda app: app.id)}
    ordered: list[App] = []
    state: dict[str, str] = {}

    def visit(app_id: str, trail: list[str]) -> None:
        if state.get(app_id) == "done":
            return
        if state.get(app_id) == "visiting":
            cycle = [*trail[trail.index(app_id) :], app_id]
            raise DependencyError(f"dependency cycle: {' -> '.join(cycle)}")
        state[app_id] = "visiting"
        for dependency in by_id[app_id].manifest.depends:
            if dependency in by_id:
                visit(dependency, [*trail, app_id])
        state[app_id] = "done"
        ordered.append(by_id[app_id])

    for app_id in by_id:
        visit(app_id, [])
    return ordered


def dependency_groups(ordered: Sequence[App]) -> list[list[App]]:
    """``ordered`` (in dependency order) split into groups of apps linked by
    dependencies, either way: apps of different groups have nothing to do with each
    other and can be held still one group at a time. Each group keeps the order of
    ``ordered``; groups come in the order of their first app."""
    group_of = {app.id: index for index, app in enumerate(ordered)}

    # Union-find over positions: each app points at the first app of its group.
    parent = list(range(len(ordered)))

    def find(position: int) -> int:
        while parent[position] != position:
            parent[position] = parent[parent[position]]
            position = parent[position]
        return position

    for position, app in enumerate(ordered):
        for dependency in app.manifest.depends:
            if dependency in group_of:
                first, second = find(position), find(group_of[dependency])
                parent[max(first, second)] = min(first, second)
    groups: dict[int, list[App]] = {}
    for position, app in enumerate(ordered):
        groups.setdefault(find(position), []).append(app)
    return [groups[key] for key in sorted(groups)]


def select(apps: dict[str, App], app_ids: Sequence[str] | None) -> list[App]:
    """The apps named (all when ``app_ids`` is empty or None), in dependency order."""
    if not app_ids:
        return dependency_order(apps.values())
    unknown = [app_id for app_id in app_ids if app_id not in apps]
    if unknown:
        known = ", ".join(sorted(apps)) or "none"
        raise AppNotFoundError(
            f"unknown app{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
            hint=f"Known apps: {known}.",
        )
    return dependency_order(apps[app_id] for app_id in dict.fromkeys(app_ids))
