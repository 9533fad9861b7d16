"""Record every borg, restic and ssh process homesafe starts, by putting recorders in
front of the real programs on PATH.

Each recorder appends its argv (JSON, one line) to a log and then becomes the real
program (``os.execv``), so the engine does the real work: the tests read how many
processes an operation cost, not what a fake said.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

PROGRAMS = ("borg", "restic", "ssh")

RECORDER = """\
#!{python}
import json, os, sys
with open({log!r}, "a") as log:
    log.write(json.dumps([{name!r}, *sys.argv[1:]]) + "\\n")
os.execv({real!r}, [{real!r}, *sys.argv[1:]])
"""


class EngineCalls:
    """The processes started since the recorders went in (or since :meth:`clear`)."""

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log = directory / "calls.jsonl"
        bin_directory = directory / "bin"
        bin_directory.mkdir(parents=True)
        for name in PROGRAMS:
            real = shutil.which(name)
            if real is None:
                continue
            recorder = bin_directory / name
            recorder.write_text(
                RECORDER.format(python=sys.executable, log=str(self.log), name=name, real=real)
            )
            recorder.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_directory}{os.pathsep}{os.environ['PATH']}")
        self.clear()

    def clear(self) -> None:
        self.log.write_text("")

    def all(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def commands(self, program: str) -> list[str]:
        """The subcommand of each call of ``program`` (borg, restic), in order (homesafe
        puts no option before it)."""
        return [call[1] for call in self.all() if call[0] == program]

    def count(self, program: str) -> int:
        return sum(1 for call in self.all() if call[0] == program)
