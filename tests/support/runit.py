"""A real runit supervision tree for service tests: runsvdir, runsv, sleeping services.

``runsvdir -P SVDIR`` runs in a session of its own, inside a PID namespace of its own
(``unshare --pid --fork``): PID 1 of this machine does not reap orphans, and runsvdir
only reaps its runsv children every five seconds, so without the namespace a stopped
tree would leave zombies behind or make every teardown wait. Killing runsvdir, the
namespace's init, makes the kernel kill and reap every runsv and service below it;
``unshare`` (our child) then exits and is reaped by us.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.apps import alive

RUN_SCRIPT = """#!/bin/sh
exec {python} -c 'import time
while True:
    time.sleep(0.2)'
"""


class Runit:
    """A service directory supervised by a real runsvdir (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.seen_pids: set[int] = set()

    def add_service(self, name: str) -> None:
        """A service whose ``run`` execs a sleeping loop; add them before :meth:`start`."""
        service = self.directory / name
        service.mkdir()
        run = service / "run"
        run.write_text(RUN_SCRIPT.format(python=sys.executable))
        run.chmod(0o755)

    def environment(self) -> dict[str, str]:
        return {**os.environ, "SVDIR": str(self.directory)}

    def sv(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sv", *arguments],
            env=self.environment(),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def status(self, name: str) -> str:
        return self.sv("status", name).stdout.strip()

    def start(self) -> None:
        """Start runsvdir and wait until every service runs."""
        self.process = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "runsvdir", "-P", str(self.directory)],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        names = [path.name for path in self.directory.iterdir() if (path / "run").exists()]
        deadline = time.monotonic() + 15
        while not all(self.status(name).startswith("run:") for name in names):
            if time.monotonic() > deadline:
                raise AssertionError(f"runit services did not come up: {self.sv('status', *names)}")
            time.sleep(0.05)
        self.seen_pids |= self.tree_pids()

    def tree_pids(self) -> set[int]:
        """runsvdir, plus every process working in the service directory (runsv, run)."""
        found = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd == str(self.directory) or cwd.startswith(f"{self.directory}/"):
                found.add(int(entry))
        runsvdir = self.runsvdir_pid()
        if runsvdir is not None:
            found.add(runsvdir)
        return found

    def runsvdir_pid(self) -> int | None:
        """runsvdir is the only child of the unshare process we started."""
        if self.process is None:
            return None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            return None
        return int(pids[0]) if pids else None

    def close(self) -> None:
        """Kill the whole tree and check that no process of it is left, zombies included."""
        if self.process is None:
            return
        self.seen_pids |= self.tree_pids()
        runsvdir = self.runsvdir_pid()
        if runsvdir is not None:
            os.kill(runsvdir, signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()  # our own unshare: --kill-child takes runsvdir with it
            self.process.wait(timeout=10)
        self.process = None
        deadline = time.monotonic() + 5
        while any(os.path.exists(f"/proc/{pid}") for pid in self.seen_pids):
            if time.monotonic() > deadline:
                left = sorted(pid for pid in self.seen_pids if os.path.exists(f"/proc/{pid}"))
                living = [pid for pid in left if alive(pid)]
                raise AssertionError(f"runit processes left behind: {left} (alive: {living})")
            time.sleep(0.02)
