"""How long `homesafe backup` keeps an app's service down, strategy by strategy.

What is measured, in one run, on one generated data set copied onto three loop
filesystems (root only):

* an app whose data (``--size-mb``, 500 MB by default) is served by a real supervised
  process: a runit service (``runsvdir`` in a PID namespace of its own, ``sv``) that
  keeps rewriting pages of the app's data while it runs and logs every write with a
  ``CLOCK_MONOTONIC`` time stamp; the app's manifest declares it as ``type = "runit"``;
* per strategy, ``homesafe backup APP --strategy S --json`` (the whole command, as a
  subprocess): ``snapshot`` with the data in a btrfs subvolume, ``clone`` on XFS made
  with ``reflink=1``, ``stop`` (homesafe's staged copy: rsync while the app runs, brought
  up to date while it still runs, then, stopped, once more for what changed, and
  resume) on ext4. For each run: the
  ``downtime_seconds`` homesafe reports for the app, the writer's own view of it (the
  gap between its last write before it was stopped and its first write after it came
  back), the wall clock of the whole command, and the bytes the writer wrote between the
  start of the command and the stop (what changed during the first copy);
* next to each, on the same filesystem and data, the reference behaviour: the service
  stopped for the whole archive run (stopped by homesafe's own runit handler, a raw
  ``borg create`` of the same path with homesafe's options, started by the handler);
  its downtime is from the stop to the end of the start, as homesafe counts its own.

Both sides make a *first* backup (into a fresh, initialised repository holding only a
tiny bootstrap archive, so an empty files cache; for homesafe also an empty staging
area; page cache dropped before it when possible) and a *second* one, a few seconds
later, of the same data with what the writer changed meanwhile. Homesafe and the
reference alternate who goes first between repeats; every figure is a median over
``--repeat`` runs.

Targets: ``snapshot`` and ``clone`` downtime (as homesafe reports it) < 0.5 s whatever
the data size; ``stop`` (staged) downtime <= 10 % of the reference's when <= 5 % of the
data changed during the first copy. The writer's rate (``--write-rate-mb``, by default
0.5 % of the data per second) is meant to keep that share under 5 %; the share
measured is printed, and a target whose condition did not hold counts as missed.

The data set is deterministic (seeded ``random.Random``): a few thousand small files,
large incompressible and large compressible files, and the pages the writer rewrites
(10 % of the data). Every loop device, mount and the runit tree are removed however the
run ends; the work directory (``/var/tmp/homesafe-bench-downtime-*``) too, unless
``--keep``. The figures are also written as JSON to ``bench/results/downtime.json``.
Only the standard library is used.

    .venv/bin/python bench/downtime.py [--size-mb N] [--repeat N] [--keep] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random
from types import FrameType
from typing import Any

# The scripts of bench/ share common.py; loaded by path, this one needs its directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BORG_ENCRYPTION,
    BORG_WARNING,
    DEFAULT_HOMESAFE,
    KIBIBYTE,
    MEBIBYTE,
    MKFS,
    SEED,
    borg_create_arguments,
    describe_failure,
    drop_page_cache,
    exit_status,
    homesafe_environment,
    host_description,
    log,
    loop_filesystem,
    passphrase_pipe,
    raw_borg_environment,
    run,
    wait_for_quiet,
    write_json,
    write_large_files,
    write_manifest,
)

BOOTSTRAP_APP_ID = "bootstrap"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "downtime.json"

SNAPSHOT_DOWNTIME_TARGET = 0.5  # seconds, snapshot and clone
STAGED_RATIO_TARGET = 0.10  # staged downtime / reference downtime
STAGED_CHANGED_SHARE_LIMIT = 0.05  # ... when at most this share changed first

# (strategy asked for, filesystem it runs on)
CASES = (("snapshot", "btrfs"), ("clone", "xfs"), ("stop", "ext4"))
BACKUPS = ("first", "second")
SIDES = ("homesafe", "reference")

RING_SHARE = 0.10  # share of the data made of the pages the writer rewrites
SMALL_SHARE = 0.10  # at most this share in small files
SMALL_FILES = 4000
LARGE_FILES = 4
DEFAULT_WRITE_RATE_SHARE = 0.005  # of the data per second
WRITE_INTERVAL = 0.025  # seconds between writes, aimed at: the gap resolution
SECOND_BACKUP_DELAY = 2.0  # seconds of writes between the first and second backup
WRITER_WAIT = 15.0  # seconds to wait for the writer's first write after a start
MINIMUM_UPTIME = 1.5  # seconds the writer runs before a timed stop (see Runner.settle)
INTERRUPT_GRACE = 30.0  # seconds an interrupted command gets to clean up

# Random bytes mapped onto letters, spaces and newlines: compressible, never repeated.
TEXT_TABLE = bytes((b"etaoinshrdlucmfwypvbgkqjxz     \n" * 8)[:256])


# -- the work directory, the loop filesystems and the data set -----------------------


@dataclass
class Workspace:
    """Where one run keeps its filesystems, service tree, logs and backup state."""

    root: Path

    def filesystem(self, kind: str) -> Path:
        return self.root / "filesystems" / kind

    def app_data(self, kind: str) -> Path:
        return self.filesystem(kind) / "mnt" / "app"

    @property
    def service_directory(self) -> Path:
        return self.root / "runit"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def writer_log(self, kind: str) -> Path:
        return self.logs / f"writer-{kind}.log"

    @property
    def homesafe_config(self) -> Path:
        return self.root / "homesafe" / "config"

    def homesafe_home(self, kind: str) -> Path:
        return self.root / "homesafe" / f"home-{kind}"

    @property
    def bootstrap_data(self) -> Path:
        return self.root / "bootstrap-data"

    def raw_base(self, kind: str) -> Path:
        return self.root / "raw" / kind / "borg-base"

    def raw_repository(self, kind: str) -> Path:
        return self.root / "raw" / kind / "repository"


@contextmanager
def app_filesystem(directory: Path, kind: str, size_bytes: int) -> Iterator[Path]:
    """A fresh ``kind`` filesystem (see :func:`common.loop_filesystem`) holding the
    app's (empty) data directory, a btrfs subvolume on btrfs."""
    with loop_filesystem(directory, kind, size_bytes) as mount_point:
        if kind == "btrfs":
            run("btrfs", "subvolume", "create", mount_point / "app")
        else:
            (mount_point / "app").mkdir()
        yield mount_point / "app"


@dataclass
class DataSet:
    """What was generated, per kind (the same bytes on every filesystem)."""

    small_files: int = 0
    small_bytes: int = 0
    large_files: int = 0
    large_bytes: int = 0
    pages: int = 0
    page_size: int = 0
    seconds: float = 0.0

    @property
    def files(self) -> int:
        return self.small_files + self.large_files + self.pages

    @property
    def total_bytes(self) -> int:
        return self.small_bytes + self.large_bytes + self.pages * self.page_size


class Fanout:
    """Writes the same bytes to the same relative path below every root."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = roots

    def mkdir(self, relative: str) -> None:
        for root in self.roots:
            (root / relative).mkdir(parents=True, exist_ok=True)

    def write(self, relative: str, content: bytes) -> None:
        for root in self.roots:
            (root / relative).write_bytes(content)

    def write_large(self, relative: str, size: int, make_chunk: Callable[[int], bytes]) -> None:
        write_large_files(
            [root / relative for root in self.roots], size, lambda size, _offset: make_chunk(size)
        )


def page_size_for(write_rate: float) -> int:
    """Bytes per write so that writes come every WRITE_INTERVAL (4 KiB to 1 MiB)."""
    size = int(write_rate * WRITE_INTERVAL) // (4 * KIBIBYTE) * 4 * KIBIBYTE
    return min(max(size, 4 * KIBIBYTE), MEBIBYTE)


def generate_data_set(roots: list[Path], size_mb: int, page_size: int) -> DataSet:
    """Write the seeded data set below every root: small files, large incompressible
    and compressible files, and ``db/``, the pages the writer rewrites."""
    started = time.monotonic()
    generator = Random(SEED)
    fanout = Fanout(roots)
    budget = size_mb * MEBIBYTE
    data_set = DataSet(page_size=page_size)
    data_set.pages = max(int(budget * RING_SHARE) // page_size, 1)
    fanout.mkdir("db")
    for index in range(data_set.pages):
        fanout.write(f"db/page-{index:06d}.dat", generator.randbytes(page_size))
    small_files = min(SMALL_FILES, int(budget * SMALL_SHARE) // (8 * KIBIBYTE + 512))
    for index in range(small_files):
        directory = f"small/group-{index // 250:02d}/batch-{index // 50 % 5}"
        if index % 50 == 0:
            fanout.mkdir(directory)
        size = generator.randint(KIBIBYTE, 16 * KIBIBYTE)
        content = generator.randbytes(size)
        if index % 2:
            fanout.write(f"{directory}/blob-{index:05d}.bin", content)
        else:
            fanout.write(f"{directory}/note-{index:05d}.txt", content.translate(TEXT_TABLE))
        data_set.small_files += 1
        data_set.small_bytes += size
    remaining = max(budget - data_set.total_bytes, 0)
    large_size = remaining // (2 * LARGE_FILES)
    fanout.mkdir("media")
    fanout.mkdir("journal")
    for index in range(LARGE_FILES):
        fanout.write_large(f"media/media-{index}.bin", large_size, generator.randbytes)
        fanout.write_large(
            f"journal/journal-{index}.log",
            large_size,
            lambda size: generator.randbytes(size).translate(TEXT_TABLE),
        )
        data_set.large_files += 2
        data_set.large_bytes += 2 * large_size
    os.sync()
    data_set.seconds = time.monotonic() - started
    return data_set


# -- the app's service: a writer supervised by runit ---------------------------------


def run_writer(ring: Path, log: Path, write_rate: float, page_size: int) -> None:
    """The service itself (hidden option ``--writer``): rewrite one page of ``ring``
    every ``page_size / write_rate`` seconds, in place, and log each write
    (``write NS BYTES INDEX``), the start and SIGTERM, with CLOCK_MONOTONIC times
    (shared by every process of the machine, PID namespaces included)."""
    pages = sorted(ring.iterdir())
    generator = Random(time.monotonic_ns() ^ os.getpid())
    interval = page_size / write_rate
    with log.open("a", buffering=1) as stream:

        def terminate(_number: int, _frame: FrameType | None) -> None:
            stream.write(f"term {time.monotonic_ns()}\n")
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, terminate)
        stream.write(f"start {time.monotonic_ns()} {os.getpid()}\n")
        index = generator.randrange(len(pages))
        due = time.monotonic()
        while True:
            with pages[index].open("r+b") as page:
                page.write(generator.randbytes(page_size))
            stream.write(f"write {time.monotonic_ns()} {page_size} {index}\n")
            index = (index + 1) % len(pages)
            due += interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                due = time.monotonic()  # behind: carry on, without a burst


def service_name(kind: str) -> str:
    return f"writer-{kind}"


class RunitTree:
    """One ``runsvdir`` in a PID namespace of its own, supervising one writer per
    filesystem. Services are declared ``down`` (a ``down`` file): only the one of the
    filesystem being measured runs. Killing runsvdir, the namespace's init, makes the
    kernel kill every runsv and writer below it (see tests/support/runit.py)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def add_writer(self, kind: str, ring: Path, log: Path, write_rate: float, page: int) -> None:
        service = self.directory / service_name(kind)
        service.mkdir(parents=True)
        (service / "down").touch()
        argv = [
            sys.executable,
            os.path.abspath(__file__),
            "--writer",
            str(ring),
            "--writer-log",
            str(log),
            "--write-rate",
            repr(write_rate),
            "--page-size",
            str(page),
        ]
        errors = shlex.quote(str(log.with_suffix(".errors")))
        script = f"#!/bin/sh\nexec 2>>{errors}\nexec {shlex.join(argv)}\n"
        (service / "run").write_text(script)
        (service / "run").chmod(0o755)

    def environment(self) -> dict[str, str]:
        return {**os.environ, "SVDIR": str(self.directory)}

    def sv(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sv", *arguments],
            env=self.environment(),
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    def control(self, action: str, kind: str) -> None:
        """Stop or start the service as homesafe does: its own runit handler (``sv
        down|up``, then runsv's state file read until the service is down or up), so
        that the reference's stop and start cost what homesafe's do."""
        from homesafe.consistency.services import RunitHandler
        from homesafe.manifest import RunitService

        service = RunitService(
            type="runit", name=service_name(kind), service_directory=str(self.directory)
        )
        handler = RunitHandler(service)
        try:
            handler.stop() if action == "stop" else handler.start()
        except Exception as error:
            raise RuntimeError(f"{action} {service_name(kind)}: {error}") from error

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "runsvdir", "-P", str(self.directory)],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        names = [path.name for path in self.directory.iterdir()]
        deadline = time.monotonic() + 15
        while not all(self.sv("status", name).returncode == 0 for name in names):
            if time.monotonic() > deadline:
                raise RuntimeError(f"runsv did not come up: {self.sv('status', *names).stdout}")
            time.sleep(0.05)

    def close(self) -> None:
        if self.process is None:
            return
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        with suppress(OSError, ValueError):
            for pid in children.read_text().split():
                os.kill(int(pid), signal.SIGKILL)  # runsvdir, the namespace's init
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()  # our unshare: --kill-child takes runsvdir with it
            self.process.wait(timeout=10)
        self.process = None


@contextmanager
def runit_tree(directory: Path) -> Iterator[RunitTree]:
    tree = RunitTree(directory)
    try:
        yield tree
    finally:
        tree.close()


@dataclass
class WriterLog:
    """The writer's log: writes as (time ns, bytes), starts and stops (time ns)."""

    writes: list[tuple[int, int]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    terms: list[int] = field(default_factory=list)


def read_writer_log(path: Path) -> WriterLog:
    log = WriterLog()
    with suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) < 2:
                continue  # a line cut short by SIGKILL
            if parts[0] == "write" and len(parts) >= 3:
                log.writes.append((int(parts[1]), int(parts[2])))
            elif parts[0] == "start":
                log.starts.append(int(parts[1]))
            elif parts[0] == "term":
                log.terms.append(int(parts[1]))
    return log


def wait_for_write(path: Path, after_ns: int) -> bool:
    """Wait until the writer logged a write after ``after_ns``; False on time-out."""
    deadline = time.monotonic() + WRITER_WAIT
    while time.monotonic() < deadline:
        if any(at > after_ns for at, _ in read_writer_log(path).writes):
            return True
        time.sleep(0.02)
    return False


@dataclass
class Outage:
    """What the writer saw of one backup that started at ``started_ns``."""

    gap: float | None  # last write before the stop to first write after (seconds)
    quiesced_after: float | None  # backup start to the stop (seconds)
    changed_bytes: int  # written from the backup start to the stop


def outage(path: Path, started_ns: int, ended_ns: int) -> Outage:
    """The writer's view of the backup run between ``started_ns`` and ``ended_ns``."""
    log = read_writer_log(path)
    terms = [at for at in log.terms if started_ns <= at <= ended_ns]
    if not terms:
        changed = sum(size for at, size in log.writes if started_ns <= at <= ended_ns)
        return Outage(gap=None, quiesced_after=None, changed_bytes=changed)
    stopped, restarted = terms[0], terms[-1]
    before = [at for at, _ in log.writes if at < stopped]
    after = [at for at, _ in log.writes if at > restarted]
    gap = (min(after) - max(before)) / 1e9 if before and after else None
    changed = sum(size for at, size in log.writes if started_ns <= at < stopped)
    return Outage(gap=gap, quiesced_after=(stopped - started_ns) / 1e9, changed_bytes=changed)


# -- the two sides ---------------------------------------------------------------------


def declare_app(workspace: Workspace, app_id: str, directory: Path, kind: str | None) -> None:
    """Declare an app owning ``directory``, served by the writer of ``kind`` (if any)."""
    services = ""
    if kind is not None:
        services = (
            f'\n[[services]]\ntype = "runit"\nname = "{service_name(kind)}"\n'
            f"service_directory = {json.dumps(str(workspace.service_directory))}\n"
        )
    write_manifest(
        workspace.homesafe_config / "apps.d",
        app_id,
        [directory],
        title="Downtime benchmark",
        services=services,
    )


def app_id_for(kind: str) -> str:
    return f"app-{kind}"


def run_command(
    argv: list[str],
    environment: dict[str, str],
    cwd: Path | None = None,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.CompletedProcess[bytes]:
    """Run a timed command, output captured. Interrupted (Ctrl-C, SIGTERM), it asks the
    command to stop (homesafe then puts services back and stops its own children) and
    waits for it before the clean-up unmounts what it may still use."""
    with subprocess.Popen(
        argv,
        env=environment,
        cwd=cwd,
        pass_fds=pass_fds,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        try:
            stdout, stderr = process.communicate()
        except BaseException:
            process.terminate()
            try:
                process.wait(timeout=INTERRUPT_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


@dataclass
class Sample:
    """One backup run of one side."""

    side: str
    backup: str
    repeat: int
    total: float
    downtime: float | None
    gap: float | None
    quiesced_after: float | None
    changed_bytes: int
    cold: bool
    strategy: str | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class Runner:
    """Runs both sides for the filesystem ``kind`` of one workspace."""

    workspace: Workspace
    tree: RunitTree
    kind: str
    strategy: str
    command: str
    quiet_wait: float
    passphrase: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    raw_archives: int = 0

    @property
    def log(self) -> Path:
        return self.workspace.writer_log(self.kind)

    @property
    def data(self) -> Path:
        return self.workspace.app_data(self.kind)

    def run_homesafe(self, arguments: list[str]) -> subprocess.CompletedProcess[bytes]:
        environment = homesafe_environment(
            self.workspace.homesafe_home(self.kind), self.workspace.homesafe_config
        )
        return run_command([self.command, *arguments], environment)

    def raw_borg(self, arguments: list[str]) -> None:
        """One borg call with homesafe's environment and a passphrase pipe."""
        argv = ["borg", *arguments]
        with passphrase_pipe(self.passphrase) as read_end:
            environment = raw_borg_environment(self.workspace.raw_base(self.kind), read_end)
            completed = run_command(
                argv, environment, cwd=self.workspace.root, pass_fds=(read_end,)
            )
        accepted = (0, BORG_WARNING) if arguments[0] == "create" else (0,)
        if completed.returncode not in accepted:
            raise RuntimeError(describe_failure(argv, completed).strip())

    def raw_create(self, path: Path) -> None:
        self.raw_archives += 1
        comment = json.dumps({"homesafe": 1, "apps": [app_id_for(self.kind)]})
        archive = f"{self.workspace.raw_repository(self.kind)}::archive-{self.raw_archives}"
        self.raw_borg(borg_create_arguments(comment, archive, [path]))

    def reset_homesafe(self) -> None:
        """A fresh state directory (repository, borg cache, staging area) holding one
        tiny bootstrap archive, made before anything is timed."""
        home = self.workspace.homesafe_home(self.kind)
        if home.exists():
            shutil.rmtree(home)
        completed = self.run_homesafe(["backup", BOOTSTRAP_APP_ID])
        if completed.returncode != 0:
            raise RuntimeError(describe_failure([self.command, "backup"], completed).strip())

    def reset_reference(self) -> None:
        """A fresh raw repository and borg cache holding one tiny bootstrap archive."""
        base = self.workspace.raw_base(self.kind).parent
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        self.raw_archives = 0
        repository = self.workspace.raw_repository(self.kind)
        self.raw_borg(["init", "--log-json", "--encryption", BORG_ENCRYPTION, str(repository)])
        self.raw_create(self.workspace.bootstrap_data)

    def settle(self, cold: bool) -> bool:
        """Before a timed run: the writer runs, the machine is quiet, dirty pages are
        written out, and (``cold``) the page cache is dropped; True when it was."""
        if not wait_for_write(self.log, time.monotonic_ns()):
            raise RuntimeError(f"the writer of {self.kind} does not write: see {self.log}")
        # runsv waits a second before starting again a service that ran for less than
        # one (its guard against crash loops): that second is not the backup's doing.
        up = (time.monotonic_ns() - max(read_writer_log(self.log).starts)) / 1e9
        time.sleep(max(MINIMUM_UPTIME - up, 0.0))
        # The whole machine must be quiet, the writer's CPU time counted.
        wait_for_quiet(self.quiet_wait, exclude_own=False)
        os.sync()
        return cold and drop_page_cache()

    def observed(self, started_ns: int, ended_ns: int) -> Outage:
        wait_for_write(self.log, ended_ns)
        return outage(self.log, started_ns, ended_ns)

    def homesafe_backup(self, backup: str, repeat: int) -> Sample:
        cold = self.settle(backup == "first")
        arguments = ["backup", app_id_for(self.kind), "--strategy", self.strategy, "--json"]
        started_ns = time.monotonic_ns()
        completed = self.run_homesafe(arguments)
        ended_ns = time.monotonic_ns()
        seen = self.observed(started_ns, ended_ns)
        sample = Sample(
            "homesafe",
            backup,
            repeat,
            (ended_ns - started_ns) / 1e9,
            None,
            seen.gap,
            seen.quiesced_after,
            seen.changed_bytes,
            cold,
        )
        try:
            document = json.loads(completed.stdout)
            result = document["apps"][0]
        except (ValueError, KeyError, IndexError):
            sample.error = describe_failure([self.command, *arguments], completed).strip()
            return sample
        sample.downtime = result["downtime_seconds"]
        sample.strategy = result["strategy"]
        sample.warnings = list(result["warnings"])
        if completed.returncode != 0 or result["status"] != "ok":
            errors = [error.get("message", str(error)) for error in result["errors"]]
            errors += [error.get("message", str(error)) for error in document.get("errors", [])]
            sample.error = f"exit status {completed.returncode}, app {result['status']}: " + (
                "; ".join(errors) or completed.stderr.decode(errors="replace")[-2000:]
            )
        return sample

    def reference_backup(self, backup: str, repeat: int) -> Sample:
        cold = self.settle(backup == "first")
        started_ns = time.monotonic_ns()
        error = None
        self.tree.control("stop", self.kind)
        try:
            self.raw_create(self.data)
        except RuntimeError as failure:
            error = str(failure)
        finally:
            self.tree.control("start", self.kind)
        ended_ns = time.monotonic_ns()
        seen = self.observed(started_ns, ended_ns)
        seconds = (ended_ns - started_ns) / 1e9
        return Sample(
            "reference",
            backup,
            repeat,
            seconds,
            seconds,
            seen.gap,
            seen.quiesced_after,
            seen.changed_bytes,
            cold,
            strategy="stop for the run",
            error=error,
        )

    def sv_cycle(self, repeat: int) -> Sample:
        """A stop then a start with nothing between (homesafe's runit handler): the part
        of any downtime that stopping and starting the service takes."""
        self.settle(False)
        started_ns = time.monotonic_ns()
        self.tree.control("stop", self.kind)
        self.tree.control("start", self.kind)
        ended_ns = time.monotonic_ns()
        seen = self.observed(started_ns, ended_ns)
        seconds = (ended_ns - started_ns) / 1e9
        return Sample("sv-cycle", "none", repeat, seconds, seconds, seen.gap, None, 0, False)

    def ensure_running(self) -> None:
        """After a failed homesafe run the service may be down: bring it back."""
        if not self.tree.sv("status", service_name(self.kind)).stdout.startswith("run:"):
            self.tree.control("start", self.kind)

    def pair(self, side: str, repeat: int) -> list[Sample]:
        """A first backup into a fresh repository, then a second one."""
        if side == "homesafe":
            self.reset_homesafe()
            backup = self.homesafe_backup
        else:
            self.reset_reference()
            backup = self.reference_backup
        samples = []
        for number, kind in enumerate(BACKUPS):
            if number:
                time.sleep(SECOND_BACKUP_DELAY)
            samples.append(backup(kind, repeat))
            self.ensure_running()
        return samples


# -- measuring -------------------------------------------------------------------------


def measure_case(runner: Runner, repeats: int, log: Callable[[str], None]) -> list[Sample]:
    """Every repeat of both sides for one strategy, its writer running throughout."""
    runner.tree.control("start", runner.kind)
    samples: list[Sample] = []
    try:
        for repeat in range(repeats):
            sides = SIDES if repeat % 2 == 0 else tuple(reversed(SIDES))
            for side in sides:
                for sample in runner.pair(side, repeat):
                    samples.append(sample)
                    log(format_sample(runner, sample))
            samples.append(runner.sv_cycle(repeat))
            log(format_sample(runner, samples[-1]))
    finally:
        runner.tree.control("stop", runner.kind)
    return samples


def format_sample(runner: Runner, sample: Sample) -> str:
    label = runner.strategy if sample.side == "homesafe" else sample.side
    line = (
        f"  {runner.kind:<5} {label:<9} {sample.backup:<6} #{sample.repeat + 1} "
        f"total {sample.total:7.3f} s, downtime {seconds_text(sample.downtime)}, "
        f"writer gap {seconds_text(sample.gap)}, changed before the stop "
        f"{sample.changed_bytes / MEBIBYTE:.1f} MiB"
        f" ({'cold' if sample.cold else 'warm'})"
    )
    if sample.strategy and sample.side == "homesafe":
        line += f" [{sample.strategy}]"
    if sample.error:
        line += f"\n    FAILED: {sample.error}"
    return line


def seconds_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


# -- the report ------------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


@dataclass
class Row:
    """Medians of one strategy and one backup kind, with the reference next to it."""

    strategy: str
    kind: str
    backup: str
    runs: int
    failures: int
    strategies_used: list[str]
    downtime: float | None
    gap: float | None
    total: float | None
    quiesced_after: float | None
    changed_bytes: float | None
    changed_share: float | None
    reference_downtime: float | None
    reference_gap: float | None
    reference_failures: int
    sv_cycle: float | None
    sv_cycle_gap: float | None

    @property
    def ratio(self) -> float | None:
        if self.downtime is None or not self.reference_downtime:
            return None
        return self.downtime / self.reference_downtime


def summarise(strategy: str, kind: str, samples: list[Sample], data_bytes: int) -> list[Row]:
    rows = []
    cycles = [s for s in samples if s.side == "sv-cycle"]
    for backup in BACKUPS:
        ours = [s for s in samples if s.side == "homesafe" and s.backup == backup]
        theirs = [s for s in samples if s.side == "reference" and s.backup == backup]
        good = [s for s in ours if s.error is None]
        reference = [s for s in theirs if s.error is None]
        changed = median([float(s.changed_bytes) for s in good])
        rows.append(
            Row(
                strategy=strategy,
                kind=kind,
                backup=backup,
                runs=len(ours),
                failures=len(ours) - len(good),
                strategies_used=sorted({s.strategy for s in ours if s.strategy}),
                downtime=median([s.downtime for s in good]),
                gap=median([s.gap for s in good]),
                total=median([s.total for s in good]),
                quiesced_after=median([s.quiesced_after for s in good]),
                changed_bytes=changed,
                changed_share=None if changed is None else changed / data_bytes,
                reference_downtime=median([s.downtime for s in reference]),
                reference_gap=median([s.gap for s in reference]),
                reference_failures=len(theirs) - len(reference),
                sv_cycle=median([s.downtime for s in cycles]),
                sv_cycle_gap=median([s.gap for s in cycles]),
            )
        )
    return rows


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    checked = []
    for row in rows:
        target: dict[str, Any] = {"strategy": row.strategy, "backup": row.backup, "note": None}
        if row.strategy in ("snapshot", "clone"):
            target.update(
                measure="downtime_seconds",
                value=row.downtime,
                limit=SNAPSHOT_DOWNTIME_TARGET,
                passed=row.downtime is not None and row.downtime < SNAPSHOT_DOWNTIME_TARGET,
            )
        else:
            ratio = row.ratio
            target.update(
                measure="downtime / reference downtime",
                value=ratio,
                limit=STAGED_RATIO_TARGET,
                passed=ratio is not None and ratio <= STAGED_RATIO_TARGET,
            )
            if row.changed_share is None or row.changed_share > STAGED_CHANGED_SHARE_LIMIT:
                target["passed"] = False
                target["note"] = "condition not met: more than 5 % changed during the first copy"
        if row.failures or row.reference_failures:
            target["passed"] = False
            target["note"] = (
                f"{row.failures} homesafe and {row.reference_failures} reference runs failed"
            )
        checked.append(target)
    return checked


def optional(value: float | None, width: int, digits: int = 3) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def print_table(rows: list[Row], checked: list[dict[str, Any]]) -> None:
    header = (
        f"{'strategy':<9} {'fs':<5} {'backup':<6} {'n':>2} {'downtime':>9} {'gap':>7} "
        f"{'total':>7} {'changed MiB':>11} {'%':>5} | {'ref down':>9} {'ref gap':>8} "
        f"{'ratio':>6} {'sv only':>8}   target"
    )
    print(header)
    print("-" * len(header))
    for row, target in zip(rows, checked, strict=True):
        verdict = "PASS" if target["passed"] else "FAIL"
        if row.strategy == "stop":
            limit = f"<= {STAGED_RATIO_TARGET:.0%} of ref, if <= 5 % changed"
        else:
            limit = f"< {SNAPSHOT_DOWNTIME_TARGET} s"
        changed_mib = None if row.changed_bytes is None else row.changed_bytes / MEBIBYTE
        share = None if row.changed_share is None else 100 * row.changed_share
        print(
            f"{row.strategy:<9} {row.kind:<5} {row.backup:<6} {row.runs:>2} "
            f"{optional(row.downtime, 9)} {optional(row.gap, 7)} {optional(row.total, 7)} "
            f"{optional(changed_mib, 11, 1)} {optional(share, 5, 1)} | "
            f"{optional(row.reference_downtime, 9)} {optional(row.reference_gap, 8)} "
            f"{optional(row.ratio, 6)} {optional(row.sv_cycle, 8)}   {verdict} ({limit})"
        )
    print(
        "downtime: as homesafe reports it (downtime_seconds), or stop to end of start for "
        "the reference;\ngap: the writer's last write before the stop to its first write "
        "after; total: the whole command;\nchanged: written from the start of the backup to "
        "the stop;\nsv only: a stop and a start (homesafe's runit handler) with nothing between; "
        "medians, seconds."
    )
    for row, target in zip(rows, checked, strict=True):
        if row.strategies_used and row.strategies_used != [row.strategy]:
            print(f"  {row.strategy} {row.backup}: homesafe used {', '.join(row.strategies_used)}")
        if row.quiesced_after is not None:
            print(
                f"  {row.strategy} {row.backup}: the service was stopped "
                f"{row.quiesced_after:.3f} s after the command started"
            )
        if target["note"]:
            print(f"  {row.strategy} {row.backup}: {target['note']}")


def write_results(
    path: Path,
    options: argparse.Namespace,
    data_set: DataSet,
    write_rate: float,
    samples: dict[str, list[Sample]],
    rows: list[Row],
    checked: list[dict[str, Any]],
) -> None:
    document = {
        "benchmark": "downtime of homesafe backup per strategy against stop for the run",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": host_description(),
        "parameters": {"size_mb": options.size_mb, "repeat": options.repeat},
        "data_set": {**asdict(data_set), "files": data_set.files, "bytes": data_set.total_bytes},
        "writer": {
            "bytes_per_second": write_rate,
            "page_size": data_set.page_size,
            "share_per_second": write_rate / data_set.total_bytes,
        },
        "rows": [{**asdict(row), "ratio": row.ratio} for row in rows],
        "samples": {strategy: [asdict(s) for s in runs] for strategy, runs in samples.items()},
        "targets": checked,
    }
    write_json(path, document)


# -- main -------------------------------------------------------------------------------


@contextmanager
def workspace_directory(keep: bool) -> Iterator[Workspace]:
    """A fresh work directory under /var/tmp, removed at the end unless ``keep``."""
    root = Path(tempfile.mkdtemp(prefix="homesafe-bench-downtime-", dir="/var/tmp"))
    try:
        yield Workspace(root)
    finally:
        if keep:
            print(f"Work directory kept (unmounted, loop devices detached): {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP end the run like Ctrl-C: through every clean-up."""

    def leave(number: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + number)

    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, leave)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=500, help="data set size (500)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case (3)")
    parser.add_argument(
        "--write-rate-mb",
        type=float,
        help="the writer's MB/s (default: 0.5 %% of the data per second)",
    )
    parser.add_argument(
        "--strategies",
        default=",".join(strategy for strategy, _ in CASES),
        help="which of snapshot,clone,stop to measure (all)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=5.0,
        help="seconds to wait, at most, for an idle machine before each run (5)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--homesafe",
        default=DEFAULT_HOMESAFE,
        help="the homesafe command (default: next to this Python)",
    )
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON output")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--writer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--writer-log", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--write-rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--page-size", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def selected_cases(names: str) -> list[tuple[str, str]]:
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = set(wanted) - {strategy for strategy, _ in CASES}
    if unknown or not wanted:
        raise SystemExit(f"--strategies: unknown {', '.join(sorted(unknown)) or 'empty list'}")
    return [case for case in CASES if case[0] in wanted]


def check_prerequisites(homesafe: str, kinds: list[str]) -> None:
    if os.geteuid() != 0:
        raise SystemExit("this benchmark needs root (loop devices, mounts)")
    tools = ["borg", "sv", "runsvdir", "unshare", "losetup", "rsync"]
    tools += [MKFS[kind][0] for kind in kinds]
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if shutil.which(homesafe) is None:
        missing.append(homesafe)
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (see `make system-packages-test`)")


def main() -> int:
    options = parse_arguments()
    if options.writer is not None:
        run_writer(options.writer, options.writer_log, options.write_rate, options.page_size)
        return 0
    cases = selected_cases(options.strategies)
    kinds = [kind for _, kind in cases]
    check_prerequisites(options.homesafe, kinds)
    exit_on_signals()

    data_bytes = options.size_mb * MEBIBYTE
    write_rate = (
        options.write_rate_mb * MEBIBYTE
        if options.write_rate_mb
        else data_bytes * DEFAULT_WRITE_RATE_SHARE
    )
    page_size = page_size_for(write_rate)
    image_bytes = max(2 * data_bytes + 512 * MEBIBYTE, 1024 * MEBIBYTE)
    samples: dict[str, list[Sample]] = {}
    with ExitStack() as stack:
        workspace = stack.enter_context(workspace_directory(options.keep))
        roots = [
            stack.enter_context(app_filesystem(workspace.filesystem(kind), kind, image_bytes))
            for kind in kinds
        ]
        data_set = generate_data_set(roots, options.size_mb, page_size)
        log(
            f"Data set on {', '.join(kinds)}: {data_set.files} files, "
            f"{data_set.total_bytes / MEBIBYTE:.1f} MiB each ({data_set.pages} pages of "
            f"{page_size // KIBIBYTE} KiB rewritten by the writer at "
            f"{write_rate / MEBIBYTE:.2f} MiB/s) [{data_set.seconds:.1f} s]"
        )
        workspace.logs.mkdir()
        workspace.bootstrap_data.mkdir()
        (workspace.bootstrap_data / "hello.txt").write_text("bootstrap\n")
        declare_app(workspace, BOOTSTRAP_APP_ID, workspace.bootstrap_data, None)
        tree = stack.enter_context(runit_tree(workspace.service_directory))
        for kind, root in zip(kinds, roots, strict=True):
            tree.add_writer(kind, root / "db", workspace.writer_log(kind), write_rate, page_size)
            declare_app(workspace, app_id_for(kind), root, kind)
        tree.start()
        rows: list[Row] = []
        for strategy, kind in cases:
            runner = Runner(workspace, tree, kind, strategy, options.homesafe, options.quiet_wait)
            samples[strategy] = measure_case(runner, options.repeat, log)
            rows += summarise(strategy, kind, samples[strategy], data_set.total_bytes)
    checked = targets(rows)
    print()
    print_table(rows, checked)
    write_results(options.results, options, data_set, write_rate, samples, rows, checked)
    print(f"\nFigures written to {options.results}")
    return exit_status(checked, options.check)


if __name__ == "__main__":
    sys.exit(main())
