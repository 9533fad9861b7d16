"""Shared fixtures: an isolated homesafe (state and config in temp dirs), manifests,
and a real daemon for service tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SUPPORT = Path(__file__).parent / "support"
DAEMON = SUPPORT / "daemon.py"


@pytest.fixture
def homesafe_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOMESAFE_HOME and HOMESAFE_CONFIG in a temp dir; returns that dir."""
    home = tmp_path / "home"
    config = tmp_path / "config"
    (config / "apps.d").mkdir(parents=True)
    monkeypatch.setenv("HOMESAFE_HOME", str(home))
    monkeypatch.setenv("HOMESAFE_CONFIG", str(config))
    return tmp_path


ManifestWriter = Callable[[str, str], Path]


@pytest.fixture
def write_manifest(homesafe_env: Path) -> ManifestWriter:
    """Write ``apps.d/<name>.toml`` with the given (dedented) TOML text."""

    def write(name: str, text: str) -> Path:
        path = homesafe_env / "config" / "apps.d" / f"{name}.toml"
        path.write_text(textwrap.dedent(text))
        path.chmod(0o644)
        return path

    return write


class Daemon:
    """A real background process behind a command-type service."""

    def __init__(self, state: Path) -> None:
        self.state = state
        state.mkdir(parents=True, exist_ok=True)

    def argv(self, command: str) -> list[str]:
        return [sys.executable, str(DAEMON), command, str(self.state)]

    def manifest_service(self, name: str) -> str:
        """A [[services]] TOML block for this daemon."""

        def quoted(argv: list[str]) -> str:
            return "[" + ", ".join(f'"{part}"' for part in argv) + "]"

        return textwrap.dedent(
            f"""
            [[services]]
            type = "command"
            name = "{name}"
            start = {quoted(self.argv("start"))}
            stop = {quoted(self.argv("stop"))}
            status = {quoted(self.argv("status"))}
            """
        )

    def run(self, command: str) -> int:
        return subprocess.run(self.argv(command), check=False).returncode

    def start(self) -> None:
        assert self.run("start") == 0

    def is_running(self) -> bool:
        return self.run("status") == 0

    def calls(self) -> list[str]:
        path = self.state / "calls"
        return path.read_text().split() if path.exists() else []

    def write_into(self, directory: Path) -> None:
        """Make the daemon, from its next start, keep writing pairs of equal numbers
        into ``directory`` (see daemon.py): a consistent copy holds equal ones."""
        (self.state / "writes-to").write_text(str(directory))

    def fail_on(self, command: str) -> None:
        (self.state / f"fail-{command}").touch()

    def heal(self) -> None:
        for command in ("start", "stop"):
            (self.state / f"fail-{command}").unlink(missing_ok=True)

    def kill(self) -> None:
        self.heal()
        self.run("stop")


DaemonFactory = Callable[[str], Daemon]


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Make real daemons; every one is stopped at the end of the test."""
    made: list[Daemon] = []

    def make(name: str) -> Daemon:
        daemon = Daemon(tmp_path / "daemons" / name)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill()


def requires_root() -> pytest.MarkDecorator:
    return pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def requires_program(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        shutil.which(name) is None, reason=f"{name} is not installed (make test installs it)"
    )
