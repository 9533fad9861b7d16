"""What starts ``homesafe schedule run`` every few minutes: a systemd timer and
service, or a cron line where systemd is not running.

The run itself decides whether anything is due and holds a lock, so the timer only has
to call it often; ``Persistent=true`` makes systemd call it at boot when a call was
missed. ``HOMESAFE_HOME`` and ``HOMESAFE_CONFIG``, when set for the installing process,
are written into the unit (or the cron file) so that the timer sees the same homesafe.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from homesafe import execute
from homesafe.errors import UsageError

__all__ = [
    "CRON_FILE",
    "SERVICE_NAME",
    "SYSTEMD_DIRECTORY",
    "TIMER_NAME",
    "Installed",
    "command_path",
    "cron_file",
    "install",
    "systemd_is_running",
    "systemd_units",
    "uninstall",
]

SYSTEMD_DIRECTORY = Path("/etc/systemd/system")
CRON_FILE = Path("/etc/cron.d/homesafe")
SERVICE_NAME = "homesafe-schedule.service"
TIMER_NAME = "homesafe-schedule.timer"
ENVIRONMENT_NAMES = ("HOMESAFE_HOME", "HOMESAFE_CONFIG")


@dataclass(frozen=True)
class Installed:
    """What :func:`install` wrote, and whether systemd was told about it."""

    kind: str  # systemd | cron
    files: tuple[Path, ...]
    activated: bool


def systemd_is_running() -> bool:
    """True when systemd is the init system (sd_booted(3) checks the same directory)."""
    return Path("/run/systemd/system").is_dir()


def command_path() -> str:
    """The ``homesafe`` executable: the one next to this Python, else the one on PATH."""
    beside = Path(sys.executable).parent / "homesafe"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("homesafe")
    if found is None:
        raise UsageError("cannot find the homesafe command", hint="Give it with --command.")
    return str(Path(found).resolve())


def _environment() -> dict[str, str]:
    return {name: os.environ[name] for name in ENVIRONMENT_NAMES if os.environ.get(name)}


def _check_every(every_minutes: int) -> None:
    if not 1 <= every_minutes <= 60 or 60 % every_minutes:
        raise UsageError(
            f"--every must divide an hour (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30 or 60), "
            f"not {every_minutes}"
        )


def _systemd_quote(argument: str, *, expands_variables: bool = True) -> str:
    """One argument quoted as systemd.service(5) reads it: ``%`` specifiers always, and
    ``$`` variables in ExecStart (not in Environment=), are escaped."""
    if argument and not any(character in argument for character in " \t\"'\\$%;"):
        return argument
    escaped = argument.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if expands_variables:
        escaped = escaped.replace("$", "$$")
    return f'"{escaped}"'


def systemd_units(
    command: Sequence[str], every_minutes: int, environment: Mapping[str, str]
) -> dict[str, str]:
    """The service and timer files, by file name."""
    _check_every(every_minutes)
    exec_start = " ".join(_systemd_quote(part) for part in command)
    environment_lines = "".join(
        f"Environment={_systemd_quote(f'{name}={value}', expands_variables=False)}\n"
        for name, value in sorted(environment.items())
    )
    service = (
        "[Unit]\n"
        "Description=homesafe scheduled backups (runs what is due)\n"
        "Documentation=man:homesafe(1)\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={exec_start}\n"
        f"{environment_lines}"
        "# A backup may take hours; homesafe's own lock keeps runs from overlapping.\n"
        "TimeoutStartSec=infinity\n"
        "Nice=10\n"
        "IOSchedulingClass=best-effort\n"
        "IOSchedulingPriority=7\n"
    )
    minutes = "00" if every_minutes == 60 else f"00/{every_minutes}"
    timer = (
        "[Unit]\n"
        "Description=Check homesafe's schedules every few minutes\n"
        "\n"
        "[Timer]\n"
        f"OnCalendar=*-*-* *:{minutes}:00\n"
        "# Run at boot when a check was missed while the machine was off.\n"
        "Persistent=true\n"
        "AccuracySec=1min\n"
        f"Unit={SERVICE_NAME}\n"
        "\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )
    return {SERVICE_NAME: service, TIMER_NAME: timer}


def cron_file(command: Sequence[str], every_minutes: int, environment: Mapping[str, str]) -> str:
    """The /etc/cron.d file: the environment, then one line run as root."""
    _check_every(every_minutes)
    minutes = "0" if every_minutes == 60 else f"*/{every_minutes}"
    lines = [
        "# Written by `homesafe schedule install`: checks homesafe's schedules and runs",
        "# what is due. homesafe's own lock keeps runs from overlapping.",
        "SHELL=/bin/sh",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ]
    for name, value in sorted(environment.items()):
        if "\n" in value:
            raise UsageError(f"{name} cannot hold a line break in a cron file")
        lines.append(f"{name}={value}")
    # cron turns an unescaped % of the command into a line break.
    escaped = shlex.join(command).replace("%", "\\%")
    lines.append(f"{minutes} * * * * root {escaped}")
    return "\n".join(lines) + "\n"


def _write(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(content)
    temporary.chmod(0o644)
    os.replace(temporary, path)


def install(
    *,
    kind: str = "auto",
    directory: Path = SYSTEMD_DIRECTORY,
    cron_path: Path = CRON_FILE,
    every_minutes: int = 15,
    command: Sequence[str] | None = None,
) -> Installed:
    """Write the timer and service (``kind`` systemd) or the cron file (``kind`` cron).

    ``auto`` picks systemd when it is the running init system, cron otherwise. With
    systemd running and ``directory`` its system unit directory, the timer is enabled
    and started at once (``systemctl daemon-reload`` and ``enable --now``).
    """
    if kind == "auto":
        kind = "systemd" if systemd_is_running() else "cron"
    argv = list(command) if command else [command_path(), "schedule", "run", "--quiet"]
    environment = _environment()
    if kind == "systemd":
        written = []
        for name, content in systemd_units(argv, every_minutes, environment).items():
            _write(directory / name, content)
            written.append(directory / name)
        activated = systemd_is_running() and directory == SYSTEMD_DIRECTORY
        if activated:
            execute.run(["systemctl", "daemon-reload"], timeout=120)
            execute.run(["systemctl", "enable", "--now", TIMER_NAME], timeout=120)
        return Installed("systemd", tuple(written), activated)
    if kind == "cron":
        _write(cron_path, cron_file(argv, every_minutes, environment))
        return Installed("cron", (cron_path,), False)
    raise UsageError(f"unknown timer kind {kind!r}: use auto, systemd or cron")


def uninstall(
    *,
    kind: str = "auto",
    directory: Path = SYSTEMD_DIRECTORY,
    cron_path: Path = CRON_FILE,
) -> list[Path]:
    """Remove what :func:`install` wrote (stopping the timer first); the paths removed."""
    if kind == "auto":
        kind = "systemd" if systemd_is_running() else "cron"
    removed = []
    if kind == "systemd":
        timer = directory / TIMER_NAME
        if timer.exists() and systemd_is_running() and directory == SYSTEMD_DIRECTORY:
            execute.run(["systemctl", "disable", "--now", TIMER_NAME], timeout=120)
        for name in (TIMER_NAME, SERVICE_NAME):
            if (directory / name).exists():
                (directory / name).unlink()
                removed.append(directory / name)
        if removed and systemd_is_running() and directory == SYSTEMD_DIRECTORY:
            execute.run(["systemctl", "daemon-reload"], timeout=120)
    elif kind == "cron":
        if cron_path.exists():
            cron_path.unlink()
            removed.append(cron_path)
    else:
        raise UsageError(f"unknown timer kind {kind!r}: use auto, systemd or cron")
    return removed
