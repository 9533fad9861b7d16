"""A real OpenSSH server on 127.0.0.1 for remote-repository tests.

It runs in the foreground (``sshd -D``) as our child, with a config, host key,
authorized_keys and log of its own in a temp directory and a free port, so it touches
nothing of the machine's own ssh set-up. Logging in as root works with a key only
(``PermitRootLogin prohibit-password``); sftp is the internal one, so restic's sftp
backend and ``borg serve`` both work against it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"

CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {directory}/sshd.pid
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel VERBOSE
Subsystem sftp internal-sftp
"""


def available() -> str | None:
    """None when a test sshd can run here, else why not (for a skip reason)."""
    if not os.path.exists(SSHD):
        return "openssh-server is not installed (make test installs it)"
    if os.geteuid() != 0:
        return "sshd for root logins needs root"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen is not installed"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Sshd:
    """One sshd on 127.0.0.1:``port``; :meth:`close` stops it."""

    def __init__(self, directory: Path, port: int | None = None, extra_config: str = "") -> None:
        """``extra_config``: sshd_config lines added to the usual ones."""
        self.directory = directory
        self.extra_config = extra_config
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host_key = directory / "host_ed25519"
        self.authorized_keys = directory / "authorized_keys"
        self.authorized_keys.touch()
        self.config = directory / "sshd_config"
        self.log = directory / "sshd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.new_host_key()

    def new_host_key(self) -> None:
        """Give the server a new host key (takes effect on the next :meth:`start`)."""
        for path in (self.host_key, self.host_key.with_suffix(".pub")):
            path.unlink(missing_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)],
            check=True,
            capture_output=True,
        )

    def host_key_line(self) -> str:
        """The public host key as ``type base64``."""
        return " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])

    def authorize(self, public_key: str) -> None:
        with self.authorized_keys.open("a") as keys:
            keys.write(public_key.strip() + "\n")

    def revoke_all(self) -> None:
        self.authorized_keys.write_text("")

    def start(self) -> None:
        """Start sshd and wait until it accepts connections."""
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation dir
        self.config.write_text(
            CONFIG.format(
                port=self.port,
                host_key=self.host_key,
                directory=self.directory,
                authorized_keys=self.authorized_keys,
            )
            + self.extra_config
        )
        self.process = subprocess.Popen(
            [SSHD, "-D", "-f", str(self.config), "-E", str(self.log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"sshd exited at start: {self.log.read_text()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection,
            ):
                # sshd sends its banner first: reading it proves it serves, not just listens.
                if connection.recv(4).startswith(b"SSH-"):
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"sshd did not come up: {self.log.read_text()}")
            time.sleep(0.05)

    def close(self) -> None:
        """Stop sshd (the listener) and wait for it: it is our child, so nothing lingers."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.close()
        self.start()
