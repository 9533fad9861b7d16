"""A real apache2 serving one test site on 127.0.0.1, for the apache service handler.

The machine's own ``/etc/apache2`` is used (a2ensite and friends know no other), so
:class:`Apache` copies it first and puts it back exactly, file for file and link for
link, when the test ends; the site's document root lives under ``/var/www`` (apache's
user cannot read the test's temp dirs) and is removed too. ``ports.conf`` is replaced by
a single ``Listen 127.0.0.1:<free port>``: nothing listens beyond loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.alert_servers import free_port
from tests.support.apps import alive

CONFIGURATION = Path("/etc/apache2")
PID_FILE = Path("/var/run/apache2/apache2.pid")
TOOLS = ("apache2ctl", "a2query", "a2ensite", "a2dissite", "a2enmod", "a2dismod")
SITE = """<VirtualHost 127.0.0.1:{port}>
    ServerName 127.0.0.1
    DocumentRoot {root}
</VirtualHost>
"""


def unavailable() -> str | None:
    """None when a test apache can run here, else why not (a skip reason)."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"apache2 is not installed (make test installs it): no {', '.join(missing)}"
    if os.geteuid() != 0:
        return "a2ensite and apache2ctl need root"
    if running_pid() is not None:
        return "an apache2 is running on this machine already; the test leaves it alone"
    return None


def running_pid() -> int | None:
    try:
        pid = int(PID_FILE.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def a2query(flag: str, name: str) -> bool:
    """Whether a2query says the site (-s), config (-c) or module (-m) is enabled."""
    return subprocess.run(["a2query", flag, name], capture_output=True, check=False).returncode == 0


def get(url: str) -> str | None:
    """The body at ``url``, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body: bytes = response.read()
            return body.decode(errors="replace")
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    except OSError:
        return None


class Apache:
    """Owns /etc/apache2 for one test: :meth:`close` puts everything back."""

    def __init__(self, snapshot_directory: Path) -> None:
        self.snapshot = snapshot_directory / "apache2"
        shutil.copytree(CONFIGURATION, self.snapshot, symlinks=True)
        self.port = free_port()
        self.document_root = Path(tempfile.mkdtemp(prefix="homesafe-test-", dir="/var/www"))
        self.document_root.chmod(0o755)
        self.started = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def add_site(self, name: str, content: str) -> None:
        """A site serving ``content`` at / on our port (not enabled yet)."""
        root = self.document_root / name
        root.mkdir(mode=0o755)
        (root / "index.html").write_text(content)
        (root / "index.html").chmod(0o644)
        site = CONFIGURATION / "sites-available" / f"{name}.conf"
        site.write_text(SITE.format(port=self.port, root=root))

    def listen_on_loopback(self) -> None:
        (CONFIGURATION / "ports.conf").write_text(f"Listen 127.0.0.1:{self.port}\n")

    def run(self, *argv: str) -> None:
        completed = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        assert completed.returncode == 0, f"{argv}: {completed.stdout}{completed.stderr}"

    def start(self) -> None:
        self.run("apache2ctl", "configtest")
        self.started = True
        self.run("apache2ctl", "start")
        self.wait_until(lambda: get(self.url) is not None, "apache did not answer")

    def stop(self) -> None:
        pid = running_pid()
        if pid is None:
            return
        self.run("apache2ctl", "stop")
        # apache2ctl returns before apache is gone; a zombie counts as gone.
        self.wait_until(lambda: not alive(pid), "apache did not stop")

    def wait_until(self, condition: object, message: str, timeout: float = 15) -> float:
        """Seconds until ``condition()`` held; fails after ``timeout``."""
        assert callable(condition)
        started = time.monotonic()
        while not condition():
            assert time.monotonic() - started < timeout, message
            time.sleep(0.02)
        return time.monotonic() - started

    def close(self) -> None:
        """Stop the apache we started, and put /etc/apache2 back exactly as it was."""
        try:
            if self.started:
                self.stop()
        finally:
            shutil.rmtree(CONFIGURATION)
            shutil.copytree(self.snapshot, CONFIGURATION, symlinks=True)
            shutil.rmtree(self.document_root, ignore_errors=True)
