"""The app manifest: what an app owns, how to hold it still, how to set it up.

A manifest is a TOML file in ``$HOMESAFE_CONFIG/apps.d/`` (or the ``manifest`` of a
Python app registered under the ``homesafe.apps`` entry point group). This module only
validates one manifest; rules between apps (unique ids and paths, dependencies) are in
:mod:`homesafe.apps`.

Rules: unknown keys are errors; every path is absolute and normalised (no ``..``, no
trailing ``/``, not ``/`` itself); commands are non-empty argv lists; a service given as
a plain string is a systemd unit, as in the reference design.
"""

from __future__ import annotations

import posixpath
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from homesafe.errors import ManifestError, ManifestProblem

APP_ID_PATTERN = r"[a-z0-9][a-z0-9_-]*"
# Archives keep homesafe's own files (metadata, settings) under this top-level name.
RESERVED_ARCHIVE_DIRECTORY = ".homesafe"

Strategy = Literal["auto", "snapshot", "clone", "stop", "live"]
OnError = Literal["fail", "continue"]


def _check_absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not an absolute path")
    if value == "/":
        raise ValueError("'/' itself cannot be an app path (use a full-system backup)")
    normalised = "/" + posixpath.normpath(value).lstrip("/")
    if normalised != value:
        raise ValueError(f"{value!r} is not normalised (expected {normalised!r})")
    if "\x00" in value:
        raise ValueError("paths cannot contain NUL bytes")
    if value.split("/")[1] == RESERVED_ARCHIVE_DIRECTORY:
        raise ValueError(f"/{RESERVED_ARCHIVE_DIRECTORY} is reserved for homesafe")
    return value


AbsolutePath = Annotated[str, AfterValidator(_check_absolute_path)]


def _check_argv(value: list[str]) -> list[str]:
    if not value:
        raise ValueError("a command must be a non-empty argv list")
    if not value[0]:
        raise ValueError("the program name cannot be empty")
    return value


Argv = Annotated[list[str], AfterValidator(_check_argv)]


class Model(BaseModel):
    # Strict: TOML has real types, so `version = "2"` or `true` is a mistake, not a 2 or 1.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PathSection(Model):
    """Directories and files of one kind (config, data or secrets)."""

    directories: list[AbsolutePath] = Field(default_factory=list)
    files: list[AbsolutePath] = Field(default_factory=list)

    def paths(self) -> list[str]:
        return [*self.directories, *self.files]


class SystemdService(Model):
    type: Literal["systemd"] = "systemd"
    name: str = Field(min_length=1)


class RunitService(Model):
    type: Literal["runit"]
    name: str = Field(min_length=1)
    service_directory: str | None = None  # SVDIR, when not the system default


class OpenrcService(Model):
    type: Literal["openrc"]
    name: str = Field(min_length=1)


class ApacheService(Model):
    type: Literal["apache"]
    kind: Literal["site", "config", "module"]
    name: str = Field(min_length=1)


class CommandService(Model):
    type: Literal["command"]
    name: str = Field(min_length=1)
    start: Argv
    stop: Argv
    status: Argv  # exit 0 means running


Service = Annotated[
    SystemdService | RunitService | OpenrcService | ApacheService | CommandService,
    Field(discriminator="type"),
]


class Hooks(Model):
    backup_pre: Argv | None = None
    backup_post: Argv | None = None
    restore_pre: Argv | None = None
    restore_post: Argv | None = None
    timeout: float = Field(default=60, gt=0)
    on_error: OnError = "fail"


HOOK_NAMES = ("backup_pre", "backup_post", "restore_pre", "restore_post")


class Lockdown(Model):
    enter: Argv | None = None
    leave: Argv | None = None


class Setup(Model):
    installed: Argv | None = None
    install: Argv | None = None
    health: Argv | None = None


class Manifest(Model):
    """One app's manifest, as DESIGN.md specifies it."""

    id: str = Field(pattern=f"^{APP_ID_PATTERN}$")
    name: str | None = None
    version: int = 0
    depends: list[str] = Field(default_factory=list)
    consistency: Strategy = "auto"
    settings: list[str] = Field(default_factory=list)
    config: PathSection = Field(default_factory=PathSection)
    data: PathSection = Field(default_factory=PathSection)
    secrets: PathSection = Field(default_factory=PathSection)
    services: list[Service] = Field(default_factory=list)
    hooks: Hooks = Field(default_factory=Hooks)
    lockdown: Lockdown = Field(default_factory=Lockdown)
    setup: Setup = Field(default_factory=Setup)

    @field_validator("services", mode="before")
    @classmethod
    def _plain_string_is_systemd(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [
                {"type": "systemd", "name": item} if isinstance(item, str) else item
                for item in value
            ]
        return value

    @field_validator("depends")
    @classmethod
    def _depends_are_ids(cls, value: list[str]) -> list[str]:
        for item in value:
            if not re.fullmatch(APP_ID_PATTERN, item):
                raise ValueError(f"{item!r} is not an app id")
        return value

    @property
    def display_name(self) -> str:
        return self.name or self.id

    def sections(self) -> Iterator[tuple[str, PathSection]]:
        yield "config", self.config
        yield "data", self.data
        yield "secrets", self.secrets

    def owned_paths(self) -> list[str]:
        """Every path of the config, data and secrets sections, in manifest order."""
        return [path for _, section in self.sections() for path in section.paths()]

    @property
    def directories(self) -> list[str]:
        return [path for _, section in self.sections() for path in section.directories]

    @property
    def files(self) -> list[str]:
        return [path for _, section in self.sections() for path in section.files]

    def hook_command(self, hook_name: str) -> list[str] | None:
        command: list[str] | None = getattr(self.hooks, hook_name)
        return command


def is_inside(path: str, other: str) -> bool:
    """True when ``path`` is ``other`` or lies below it."""
    return path == other or path.startswith(other.rstrip("/") + "/")


def problems_from_validation(source: str, error: ValidationError) -> list[ManifestProblem]:
    """Turn pydantic's errors into problems naming the file and the dotted field."""
    problems = []
    for detail in error.errors():
        location = list(detail["loc"])
        # The discriminated union puts the type tag after services.N: drop it there.
        if len(location) > 2 and location[0] == "services" and isinstance(location[1], int):
            del location[2]
        field = ".".join(str(part) for part in location)
        message = detail["msg"]
        if detail["type"] == "extra_forbidden":
            message = "unknown key"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        problems.append(ManifestProblem(source, field, message))
    return problems


def _is_valid_path(value: str) -> bool:
    try:
        _check_absolute_path(value)
    except ValueError:
        return False  # reported by the field's own validation
    return True


def consistency_problems(data: Any, source: str) -> list[ManifestProblem]:
    """Rules across fields of one manifest: no path listed twice or inside another, no
    dependency on itself. Checked on the raw mapping, so they are reported together with
    every field problem of the same file."""
    if not isinstance(data, dict):
        return []
    paths: list[tuple[str, str]] = []
    for section in ("config", "data", "secrets"):
        table = data.get(section)
        if not isinstance(table, dict):
            continue
        for kind in ("directories", "files"):
            items = table.get(kind)
            if isinstance(items, list):
                paths += [
                    (f"{section}.{kind}.{index}", item)
                    for index, item in enumerate(items)
                    if isinstance(item, str) and _is_valid_path(item)
                ]
    problems = []
    for index, (field, path) in enumerate(paths):
        for _, earlier in paths[:index]:
            if path == earlier:
                message = f"{path} is listed twice"
            elif is_inside(path, earlier):
                message = f"{path} lies inside {earlier}, which is listed too"
            elif is_inside(earlier, path):
                message = f"{earlier} lies inside {path}, which is listed too"
            else:
                continue
            problems.append(ManifestProblem(source, field, message))
    depends = data.get("depends")
    if isinstance(depends, list) and data.get("id") in depends:
        problems.append(ManifestProblem(source, "depends", "an app cannot depend on itself"))
    return problems


def parse_manifest(data: Any, source: str) -> Manifest:
    """Validate a manifest given as a mapping (or a Manifest built in Python); raise
    ManifestError with every problem found."""
    if isinstance(data, Manifest):
        data = data.model_dump(mode="python")
    problems = consistency_problems(data, source)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as error:
        problems = problems_from_validation(source, error) + problems
    if problems:
        raise ManifestError(problems)
    return manifest


def load_manifest_file(path: Path) -> Manifest:
    """Read and validate one TOML manifest file."""
    source = str(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        raise ManifestError([ManifestProblem(source, "", f"not valid TOML: {error}")]) from None
    except OSError as error:
        raise ManifestError([ManifestProblem(source, "", error.strerror or str(error))]) from None
    return parse_manifest(data, source)
