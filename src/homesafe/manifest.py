"""The app manifest: what an app owns, how to hold it still, how to set it up.

A manifest is a TOML file in ``$HOMESAFE_CONFIG/apps.d/`` (or the ``manifest`` of a
Python app registered under the ``homesafe.apps`` entry point group). This module
validates one manifest; rules between apps (unique ids and paths, dependencies) are in
:mod:`homesafe.apps`.

Rules: unknown keys are errors; types are strict (``version = "2"`` is a mistake, not a
2); every path is absolute and normalised (no ``..``, no trailing ``/``, not ``/``
itself); commands are non-empty argv lists; a service given as a plain string is a
systemd unit, as in the reference design.

The model is made of frozen standard-library dataclasses, validated by pydantic through
the ``Annotated`` markers below. pydantic is imported only when a manifest is validated:
a backup whose manifests were validated before (see :mod:`homesafe.apps`) never pays
for it, which keeps homesafe's start-up within its budget.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from homesafe.errors import ManifestError, ManifestProblem

if TYPE_CHECKING:
    from pydantic import GetCoreSchemaHandler, TypeAdapter, ValidationError
    from pydantic_core import CoreSchema

APP_ID_PATTERN = r"[a-z0-9][a-z0-9_-]*"
# Archives keep homesafe's own files (metadata, settings) under this top-level name.
RESERVED_ARCHIVE_DIRECTORY = ".homesafe"

Strategy = Literal["auto", "snapshot", "clone", "stop", "live"]
OnError = Literal["fail", "continue"]


# -- validation markers: read by pydantic, inert otherwise ---------------------------


class _After:
    """Run ``check`` on the value once its type is validated (it raises ValueError)."""

    def __init__(self, check: Callable[[Any], Any]) -> None:
        self.check = check

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(self.check, handler(source))


class _Before:
    """Rewrite the raw value with ``convert`` before its type is validated."""

    def __init__(self, convert: Callable[[Any], Any]) -> None:
        self.convert = convert

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        from pydantic_core import core_schema

        return core_schema.no_info_before_validator_function(self.convert, handler(source))


class _Strict:
    """No coercion: ``true`` or ``"2"`` is not an int."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        from pydantic import Strict

        return handler(Annotated[source, Strict()])


class _TaggedBy:
    """A union told apart by the value of one key (``type`` for services)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        from pydantic import Field

        return handler(Annotated[source, Field(discriminator=self.key)])


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


def _check_argv(value: list[str]) -> list[str]:
    if not value:
        raise ValueError("a command must be a non-empty argv list")
    if not value[0]:
        raise ValueError("the program name cannot be empty")
    return value


def _check_not_empty(value: str) -> str:
    if not value:
        raise ValueError("cannot be empty")
    return value


def _check_app_id(value: str) -> str:
    if not re.fullmatch(APP_ID_PATTERN, value):
        raise ValueError(f"{value!r} is not an app id (it must match {APP_ID_PATTERN})")
    return value


def _check_app_ids(value: list[str]) -> list[str]:
    for item in value:
        _check_app_id(item)
    return value


def _check_positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _plain_string_is_systemd(value: Any) -> Any:
    if isinstance(value, list):
        return [
            {"type": "systemd", "name": item} if isinstance(item, str) else item for item in value
        ]
    return value


AbsolutePath = Annotated[str, _After(_check_absolute_path)]
Argv = Annotated[list[str], _After(_check_argv)]
Name = Annotated[str, _After(_check_not_empty)]

# Unknown keys are errors everywhere.
_CONFIG: dict[str, Any] = {"extra": "forbid"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PathSection:
    """Directories and files of one kind (config, data or secrets)."""

    __pydantic_config__: ClassVar[dict[str, Any]] = _CONFIG
    directories: list[AbsolutePath] = dataclasses.field(default_factory=list)
    files: list[AbsolutePath] = dataclasses.field(default_factory=list)

    def paths(self) -> list[str]:
        return [*self.directories, *self.files]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SystemdService:
    __pydantic_config__: ClassVar[dict[str, Any]] = _CONFIG
    type: Literal["systemd"] = "systemd"
    name: Name


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunitService:
    __pydantic_config__: ClassVar[dict[str, Any]] = _CONFIG
    type: Literal["runit"] = "runit"
    name: Name
    service_directory: str | None = None  # SVDIR, when not the system default


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpenrcService:
    __pydantic_config__: ClassVar[dict[str, Any]] = _CONFIG
    type: Literal["openrc"] = "openrc"
    name: Name


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApacheService:
    __pydantic_config__: ClassVar[dict[str, Any]] = _CONFIG
    type: Literal["apache"] = "apache"
    kind: Literal["site", "config", "module"]
    name: Name


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommandService:
    __pydantic_config__: ClassVar[dict[str, Any]] = _CONFIG
    type: Literal["command"] = "command"
    name: Name
    start: Argv
    stop: Argv
    status: Argv  # exit 0 means running


Service = Annotated[
    Union[SystemdService, RunitService, OpenrcService, ApacheService, CommandService],  # noqa: UP007
    _TaggedBy("type"),
]
SERVICE_TYPES: dict[str, type[Any]] = {
    "systemd": SystemdService,
    "runit": RunitService,
    "openrc": OpenrcService,
    "apache": ApacheService,
    "command": CommandService,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hooks:
    __pydantic_config__: ClassVar[dict[str, Any]] = _CONFIG
    backup_pre: Argv | None = None
    backup_post: Argv | None = None
    restore_pre: Argv | None = None
    restore_post: Argv | None = None
    timeout: Annotated[float, _Strict(), _After(_check_positive)] = 60.0
    on_error: OnError = "fail"


HOOK_NAMES = ("backup_pre", "backup_post", "restore_pre", "restore_post")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Lockdown:
    __pydantic_config__: ClassVar[dict[str, Any]] = _CONFIG
    enter: Argv | None = None
    leave: Argv | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
    __pydantic_config__: ClassVar[dict[str, Any]] = _CONFIG
    installed: Argv | None = None
    install: Argv | None = None
    health: Argv | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest:
    """One app's manifest, as DESIGN.md specifies it."""

    __pydantic_config__: ClassVar[dict[str, Any]] = _CONFIG
    id: Annotated[str, _After(_check_app_id)]
    name: str | None = None
    version: Annotated[int, _Strict()] = 0
    depends: Annotated[list[str], _After(_check_app_ids)] = dataclasses.field(default_factory=list)
    consistency: Strategy = "auto"
    settings: list[str] = dataclasses.field(default_factory=list)
    config: PathSection = dataclasses.field(default_factory=PathSection)
    data: PathSection = dataclasses.field(default_factory=PathSection)
    secrets: PathSection = dataclasses.field(default_factory=PathSection)
    services: Annotated[list[Service], _Before(_plain_string_is_systemd)] = dataclasses.field(
        default_factory=list
    )
    hooks: Hooks = dataclasses.field(default_factory=Hooks)
    lockdown: Lockdown = dataclasses.field(default_factory=Lockdown)
    setup: Setup = dataclasses.field(default_factory=Setup)

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain data (JSON-ready), in the TOML file's shape."""
        return dataclasses.asdict(self)

    @classmethod
    def from_validated(cls, data: dict[str, Any]) -> Manifest:
        """Rebuild a manifest from :meth:`to_dict` of one that passed validation.

        Nothing is checked: use it only on data homesafe validated and stored itself.
        """
        return cls(
            **{
                **data,
                "config": PathSection(**data["config"]),
                "data": PathSection(**data["data"]),
                "secrets": PathSection(**data["secrets"]),
                "services": [SERVICE_TYPES[item["type"]](**item) for item in data["services"]],
                "hooks": Hooks(**data["hooks"]),
                "lockdown": Lockdown(**data["lockdown"]),
                "setup": Setup(**data["setup"]),
            }
        )

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
        # The tagged union puts the type tag after services.N: drop it there.
        if len(location) > 2 and location[0] == "services" and isinstance(location[1], int):
            del location[2]
        field = ".".join(str(part) for part in location)
        message = detail["msg"]
        if detail["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
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


@cache
def _validator() -> TypeAdapter[Manifest]:
    from pydantic import TypeAdapter

    return TypeAdapter(Manifest)


def parse_manifest(data: Any, source: str) -> Manifest:
    """Validate a manifest given as a mapping (or a Manifest built in Python); raise
    ManifestError with every problem found."""
    from pydantic import ValidationError

    if isinstance(data, Manifest):
        data = data.to_dict()
    problems = consistency_problems(data, source)
    try:
        manifest = _validator().validate_python(data)
    except ValidationError as error:
        problems = problems_from_validation(source, error) + problems
    if problems:
        raise ManifestError(problems)
    return manifest


def load_manifest_file(path: Path) -> Manifest:
    """Read and validate one TOML manifest file."""
    import tomllib  # here: a manifest is read only when it changed (see apps.py)

    source = str(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        raise ManifestError([ManifestProblem(source, "", f"not valid TOML: {error}")]) from None
    except OSError as error:
        raise ManifestError([ManifestProblem(source, "", error.strerror or str(error))]) from None
    return parse_manifest(data, source)
