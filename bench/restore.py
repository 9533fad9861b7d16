"""How long `homesafe restore` takes: selective against full, and against raw `borg extract`.

What is measured, in one run, on one generated data set backed up (untimed) by one
``homesafe backup`` into one archive holding two apps:

* **large**: the default 500 MiB app: thousands of small files (1-16 KiB, half random,
  half text) in nested directories, a few large incompressible and a few large
  compressible files;
* **small**: a ~5 MiB app of a few hundred files (1-32 KiB, half random, half text).

The large app declares its three directories (small files, incompressible files,
compressible files); with ``--layout one-directory`` it declares one directory holding
them, as an app whose data is one directory does.

Each app is declared by a manifest of its own in ``$HOMESAFE_CONFIG/apps.d``;
``HOMESAFE_HOME`` and ``HOMESAFE_CONFIG`` are in the work directory. Timed, each as the
wall clock (``time.monotonic``) of one whole subprocess (interpreter start-up, imports,
everything homesafe does around borg, the borg calls, process exit):

* **full restore, live**: ``homesafe restore ARCHIVE`` (both apps) into the live
  system, over live data damaged just before (untimed): a third of the small files
  deleted, the large files truncated to half, the start of some files overwritten, a
  stray file added. homesafe extracts everything into a staging area next to the
  targets, verifies it, renames the damaged paths aside and the staged ones into place,
  then removes the damaged copies: that removal is part of its time. homesafe runs up
  to one ``borg extract`` per core side by side, each with a share of the apps'
  declared paths (by default the large app declares three directories; one of 128 MiB
  or more is shared out by its entries, then extracted itself by a last call);
  the raw extracts are one ``borg extract``, as a user would type it.
* **raw extract after damage**: ``borg extract`` of the same archive, every path, into
  an *empty* directory on the same filesystem, with what homesafe gives borg: the same
  repository, ``BORG_BASE_DIR=$HOMESAFE_HOME/borg``, the passphrase through
  ``BORG_PASSPHRASE_FD`` (a pipe), ``--lock-wait 60 --log-json``; run, like the live
  restore, right after the same damage of the live data (so that whatever that churn of
  deletions and truncations costs the filesystem afterwards counts on both sides), which
  an untimed ``homesafe restore`` repairs afterwards. The live restore is set against it.
* **raw extract, all paths**: the same, without the damage before it. An empty
  directory means borg has nothing to replace or remove, so the next case is the fair
  one:
* **full restore, empty root**: ``homesafe restore ARCHIVE --target-root DIR`` (both
  apps) into an empty directory: the same work as the raw extract plus homesafe's own
  (the description and listing calls, staging, verification, renames).
* **selective restore**: ``homesafe restore ARCHIVE small`` (live, over the small app's
  damaged data), set against the raw extract of every path: the time of a selective
  restore should grow with the app restored, not with the archive holding it. (Not
  against homesafe's full restore: that one extracts side by side, which one small app
  cannot, so the ratio would grow with what the full restore gained.)
* **raw extract, small app**: ``borg extract`` of the small app's paths only, for
  reference (what borg alone needs to pick one app out of the archive).

Every timed run is checked afterwards (untimed): the restored trees must have the
digest (paths, sizes, contents) of the generated data. Before each timed run, the dirty
pages are written out, the benchmark waits (up to ``--quiet-wait`` seconds) for the rest
of the machine to be nearly idle, and the page cache is dropped when
``/proc/sys/vm/drop_caches`` is writable (run as root), else the runs are reported as
warm. The CPU time the rest of the machine used during each run (other processes, kernel
threads) is recorded next to it, to tell a noisy run from a slow one. The order of the
cases is reversed every other repeat, so homesafe and raw borg alternate; each figure is
the median of its repeats, with the min-max.

Targets: full restore / raw extract <= 1.10 (the live restore against the raw extract
after damage, the empty-root restore against the plain one); selective restore / raw
extract of every path <= 0.25 (the small app holds ~1 % of the archive: a selective
restore that grew with the archive would come near a full restore, 0.8-1.1 of the raw
extract, while its floor is homesafe's start-up and two borg calls).
``--profile`` then breaks down full live restores (start-up, imports, journal, the
description and listing calls, staging, verification, renames, fsyncs, removals, exit),
each against a raw extract after damage timed next to it.

The figures are printed as a table and written as JSON to ``bench/results/restore.json``;
``--check`` exits 1 when a target is missed. Only the standard library is used.

    .venv/bin/python bench/restore.py [--size-mb N] [--small-mb N] [--repeats N]
        [--layout three-directories|one-directory] [--work-dir DIR] [--keep] [--check]
        [--profile] [--quiet-wait SECONDS]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

# The scripts of bench/ share common.py; loaded by path, this one needs its directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BORG_WARNING,
    DEFAULT_HOMESAFE,
    KIBIBYTE,
    MEBIBYTE,
    SEED,
    BenchWorkspace,
    InstrumentedRun,
    compile_homesafe,
    describe_failure,
    drop_page_cache,
    exit_status,
    host_description,
    import_homesafe_timed,
    log,
    loop_filesystem,
    others_cpu_counter,
    passphrase_pipe,
    raw_borg_environment,
    require_command,
    start_up_references,
    wait_for_quiet,
    work_directory,
    write_data_set,
    write_json,
    write_manifest,
    write_small_files,
)

ARCHIVE_NAME = "bench-restore"
LARGE_APP = "large"
SMALL_APP = "small"
MARKER_FILE = ".homesafe-bench-restore"
STRAY_FILE = "stray-after-backup.txt"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "restore.json"

FULL_RATIO_TARGET = 1.10
SELECTIVE_RATIO_TARGET = 0.25

BORG_LOCK_WAIT = "60"  # the default repository's lock_wait, as homesafe passes it
# borg polls the mutex of its lock roster every lock_wait / 10 seconds (the default of its
# TimeoutTimer): of two borg processes opening the repository at the same instant, one
# may sleep that long. --profile flags runs whose description or listing call took so long.
BORG_LOCK_POLL_SECONDS = int(BORG_LOCK_WAIT) / 10


# -- the work directory and the data set ---------------------------------------------


@dataclass
class Workspace(BenchWorkspace):
    """Where one benchmark run keeps its data, homesafe's state and its scratch dirs."""

    @property
    def repository(self) -> Path:
        """homesafe's default repository (created by its first backup)."""
        return self.homesafe_home / "repository"

    @property
    def passphrase_file(self) -> Path:
        return self.homesafe_home / "secrets" / "default.passphrase"

    @property
    def borg_base(self) -> Path:
        return self.homesafe_home / "borg"

    @property
    def scratch(self) -> Path:
        """Empty directories for raw extracts and target roots (same filesystem)."""
        return self.root / "scratch"


@dataclass
class AppData:
    """One app's directories and what they hold when intact."""

    app_id: str
    directories: list[Path]
    files: int = 0
    bytes: int = 0
    digest: str = ""

    @property
    def archive_paths(self) -> list[str]:
        return [str(directory).lstrip("/") for directory in self.directories]

    def summary(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "digest": self.digest,
            "directories": [str(directory) for directory in self.directories],
        }


# How the large app declares its data: three directories (files, media, journals), or
# one directory holding the three.
LAYOUTS = ("three-directories", "one-directory")


def app_data(workspace: Workspace, layout: str) -> dict[str, AppData]:
    large = workspace.data / LARGE_APP
    declared = [large] if layout == "one-directory" else large_app_roots(large)
    return {
        LARGE_APP: AppData(LARGE_APP, declared),
        SMALL_APP: AppData(SMALL_APP, [workspace.data / SMALL_APP]),
    }


def large_app_roots(large: Path) -> list[Path]:
    return [large / "files", large / "media", large / "journals"]


def generate_large_app(large: Path, size_mb: int, small_files: int) -> None:
    """The data set of bench/overhead.py, in the three directories below ``large``
    (whether the app declares them or ``large``)."""
    files_root, media_root, journals_root = large_app_roots(large)
    # Made even when no small file fits: the manifest declares it.
    files_root.mkdir(parents=True)
    write_data_set(Random(SEED), files_root, media_root, journals_root, size_mb, small_files)


def generate_small_app(app: AppData, small_mb: int) -> None:
    generator = Random(SEED + 1)
    # Files of 1-32 KiB: 16.5 KiB on average.
    count = max(small_mb * MEBIBYTE // (16 * KIBIBYTE + KIBIBYTE // 2), 10)
    (root,) = app.directories
    root.mkdir(parents=True)
    write_small_files(generator, root, count, 32 * KIBIBYTE, 20)


def tree_digest(root: Path) -> tuple[int, int, str]:
    """Files, bytes and a digest of the names, sizes and contents below ``root``."""
    digest = hashlib.blake2b(digest_size=16)
    files = total = 0
    if not root.is_dir():
        return 0, 0, "missing"
    for directory, subdirectories, names in os.walk(root):
        subdirectories.sort()
        relative = os.path.relpath(directory, root)
        digest.update(f"d {relative}\n".encode())
        for name in sorted(names):
            path = os.path.join(directory, name)
            size = os.lstat(path).st_size
            digest.update(f"f {relative}/{name} {size}\n".encode())
            with open(path, "rb") as stream:
                while chunk := stream.read(MEBIBYTE):
                    digest.update(chunk)
            files += 1
            total += size
    return files, total, digest.hexdigest()


def app_digest(app: AppData, below: Path = Path("/")) -> tuple[int, int, str]:
    """The app's files, bytes and digest, its directories read below ``below``."""
    files = total = 0
    digest = hashlib.blake2b(digest_size=16)
    for directory in app.directories:
        counted, size, tree = tree_digest(below / str(directory).lstrip("/"))
        files += counted
        total += size
        digest.update(f"{directory} {tree}\n".encode())
    return files, total, digest.hexdigest()


def generate_data_set(
    workspace: Workspace, size_mb: int, small_files: int, small_mb: int, layout: str
) -> tuple[dict[str, AppData], bool]:
    """Write both apps' data (or reuse the intact data already there); True if reused."""
    apps = app_data(workspace, layout)
    wanted = {
        "size_mb": size_mb,
        "small_files": small_files,
        "small_mb": small_mb,
        "layout": layout,
        "seed": SEED,
        "format": 1,
    }
    marker = workspace.data / MARKER_FILE
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("parameters") == wanted:
            for app in apps.values():
                summary = recorded["apps"][app.app_id]
                app.files, app.bytes, app.digest = (
                    summary["files"],
                    summary["bytes"],
                    summary["digest"],
                )
            # A kept work directory may hold damaged data (an interrupted run).
            if all(app_digest(app)[2] == app.digest for app in apps.values()):
                return apps, True
    if workspace.data.exists():
        shutil.rmtree(workspace.data)
    workspace.data.mkdir(parents=True)
    generate_large_app(workspace.data / LARGE_APP, size_mb, small_files)
    generate_small_app(apps[SMALL_APP], small_mb)
    for app in apps.values():
        app.files, app.bytes, app.digest = app_digest(app)
    marker.write_text(
        json.dumps(
            {
                "parameters": wanted,
                "apps": {app.app_id: app.summary() for app in apps.values()},
            }
        )
    )
    return apps, False


def damage(app: AppData) -> None:
    """Damage an intact app the same way every time, so that each restore has the same
    real work: a third of its small files deleted, its large files truncated to half,
    the first KiB of some others overwritten, a stray file added."""
    for directory in app.directories:
        files = sorted(path for path in directory.rglob("*") if path.is_file())
        for index, path in enumerate(files):
            size = path.stat().st_size
            if size >= MEBIBYTE:
                os.truncate(path, size // 2)
            elif index % 3 == 0:
                path.unlink()
            elif index % 7 == 1:
                with path.open("r+b") as stream:
                    stream.write(bytes(min(KIBIBYTE, size)))
        (directory / STRAY_FILE).write_text("not in the archive\n")


# -- running homesafe and raw borg ---------------------------------------------------


@dataclass
class Runner:
    """Runs homesafe and raw borg against one workspace; each call returns seconds."""

    workspace: Workspace
    homesafe: str

    def homesafe_command(self, arguments: list[str]) -> float:
        argv = [self.homesafe, *arguments]
        started = time.monotonic()
        completed = subprocess.run(
            argv,
            env=self.workspace.homesafe_environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        elapsed = time.monotonic() - started
        if completed.returncode != 0:
            raise RuntimeError(describe_failure(argv, completed))
        return elapsed

    def backup(self) -> float:
        return self.homesafe_command(["backup", "--name", ARCHIVE_NAME])

    def restore(self, app_ids: list[str], target_root: Path | None = None) -> float:
        arguments = ["restore", ARCHIVE_NAME, *app_ids]
        if target_root is not None:
            arguments += ["--target-root", str(target_root)]
        return self.homesafe_command(arguments)

    def raw_extract(self, into: Path, paths: list[str]) -> float:
        """``borg extract`` into ``into`` as homesafe would run it (paths: all if empty)."""
        argv = [
            "borg",
            "extract",
            "--lock-wait",
            BORG_LOCK_WAIT,
            "--log-json",
            "--",
            f"{self.workspace.repository}::{ARCHIVE_NAME}",
            *paths,
        ]
        passphrase = self.workspace.passphrase_file.read_text().rstrip("\n")
        started = time.monotonic()
        with passphrase_pipe(passphrase) as read_end:
            completed = subprocess.run(
                argv,
                env=raw_borg_environment(self.workspace.borg_base, read_end),
                cwd=into,
                pass_fds=(read_end,),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
        elapsed = time.monotonic() - started
        if completed.returncode not in (0, BORG_WARNING):
            raise RuntimeError(describe_failure(argv, completed))
        return elapsed


# -- the cases -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    side: str  # "homesafe" or "raw"


CASES = (
    Case("full_live", "homesafe restore, both apps, live", "homesafe"),
    Case("raw_full_damaged", "raw borg extract, all, after damage", "raw"),
    Case("raw_full", "raw borg extract, all paths", "raw"),
    Case("full_empty_root", "homesafe restore, both apps, empty root", "homesafe"),
    Case("selective", "homesafe restore small, live", "homesafe"),
    Case("raw_small", "raw borg extract, small app's paths", "raw"),
)
CASES_BY_KEY = {case.key: case for case in CASES}
# (case, reference case, limit): the case's median / the reference's median <= limit.
# A live restore runs right after the damage (deletions, truncations) of the live data,
# which may slow the next writes to the filesystem: it is set against a raw extract run
# right after the same damage.
TARGETS = (
    ("full_live", "raw_full_damaged", FULL_RATIO_TARGET),
    ("full_empty_root", "raw_full", FULL_RATIO_TARGET),
    ("selective", "raw_full", SELECTIVE_RATIO_TARGET),
)
# Ratios shown for reference, without a target.
REFERENCES = {"raw_full_damaged": "raw_full", "raw_small": "raw_full"}


@dataclass
class Sample:
    """One timed run: its seconds, and what else happened on the machine meanwhile."""

    seconds: float
    cold: bool
    # CPU seconds used outside the timed process tree during the run: other processes
    # and kernel threads (the writeback of the run's own writes included).
    others_cpu: float
    waited: float  # seconds waited for a quiet machine before the run
    # Live restores: seconds from homesafe's exit until the detached process removing
    # the replaced copies was done (its journal gone); None when nothing was left.
    removal: float | None = None

    def describe(self) -> str:
        removal = ""
        if self.removal is not None:
            removal = f", replaced copies gone {self.removal:.2f} s later"
        return (
            f"{self.seconds:8.3f} s ({'cold' if self.cold else 'warm'} page cache, "
            f"others {self.others_cpu:.2f} CPU-s, waited {self.waited:.0f} s{removal})"
        )


@dataclass
class Timing:
    """The runs of one case."""

    case: Case
    samples: list[Sample] = field(default_factory=list)

    @property
    def seconds(self) -> list[float]:
        return [sample.seconds for sample in self.samples]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def others_cpu_median(self) -> float:
        return statistics.median(sample.others_cpu for sample in self.samples)


@dataclass
class Bench:
    """Prepares, times and checks each case; every timed run starts from the same state."""

    runner: Runner
    apps: dict[str, AppData]
    drop_caches: bool
    quiet_wait: float
    cold_runs: int = 0
    warm_runs: int = 0

    @property
    def workspace(self) -> Workspace:
        return self.runner.workspace

    def timed(self, run: Callable[[], float]) -> Sample:
        # The preparation's dirty pages are written out first, not during the run.
        os.sync()
        waited = wait_for_quiet(self.quiet_wait, exclude_own=True)
        cold = self.drop_caches and drop_page_cache()
        if cold:
            self.cold_runs += 1
        else:
            self.warm_runs += 1
        others = others_cpu_counter()
        seconds = run()
        return Sample(seconds, cold, max(others(), 0.0), waited)

    def wait_for_removal(self, limit: float = 120.0) -> float | None:
        """Seconds until no homesafe journal is left (the detached removal of the
        replaced copies done), from now; None when there was none to wait for."""
        journals = self.workspace.homesafe_home / "journal"
        started = time.monotonic()
        waited = False
        while journals.is_dir() and any(journals.iterdir()):
            if time.monotonic() - started > limit:
                raise RuntimeError(f"{journals} still holds a journal after {limit:g} s")
            waited = True
            time.sleep(0.005)
        return time.monotonic() - started if waited else None

    def check(self, app_ids: list[str], below: Path = Path("/")) -> None:
        """Each app's tree below ``below`` is exactly what was backed up."""
        for app_id in app_ids:
            app = self.apps[app_id]
            found = app_digest(app, below)
            if found != (app.files, app.bytes, app.digest):
                raise RuntimeError(
                    f"{app_id} below {below} is not what was backed up: {found[0]} files, "
                    f"{found[1]} bytes (expected {app.files} files, {app.bytes} bytes)"
                )

    @contextmanager
    def empty_directory(self, name: str) -> Iterator[Path]:
        directory = self.workspace.scratch / name
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        try:
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def run(self, case: Case) -> Sample:
        """Prepare (untimed), time, check (untimed) one case."""
        everything = [LARGE_APP, SMALL_APP]
        if case.key in ("full_live", "selective"):
            restored = everything if case.key == "full_live" else [SMALL_APP]
            for app_id in restored:
                damage(self.apps[app_id])
            app_ids = [] if case.key == "full_live" else [SMALL_APP]
            sample = self.timed(lambda: self.runner.restore(app_ids))
            sample.removal = self.wait_for_removal()
            self.check(restored)
            return sample
        if case.key == "raw_full_damaged":
            for app_id in everything:
                damage(self.apps[app_id])
            with self.empty_directory(case.key) as directory:
                sample = self.timed(lambda: self.runner.raw_extract(directory, []))
                self.check(everything, directory)
            self.runner.restore([])  # the live data intact again, untimed
            self.check(everything)
            return sample
        with self.empty_directory(case.key) as directory:
            if case.key == "full_empty_root":
                sample = self.timed(lambda: self.runner.restore([], directory))
                self.check(everything, directory)
            elif case.key == "raw_full":
                sample = self.timed(lambda: self.runner.raw_extract(directory, []))
                self.check(everything, directory)
            else:
                paths = self.apps[SMALL_APP].archive_paths
                sample = self.timed(lambda: self.runner.raw_extract(directory, paths))
                self.check([SMALL_APP], directory)
        return sample


def measure(bench: Bench, repeats: int, log: Callable[[str], None]) -> dict[str, Timing]:
    """Every case once per repeat, in reversed order every other repeat."""
    timings = {case.key: Timing(case) for case in CASES}
    for repeat in range(repeats):
        order = CASES if repeat % 2 == 0 else tuple(reversed(CASES))
        for case in order:
            sample = bench.run(case)
            timings[case.key].samples.append(sample)
            log(f"  #{repeat + 1} {case.label:<40} {sample.describe()}")
    return timings


# -- the report ------------------------------------------------------------------------


def targets(timings: dict[str, Timing]) -> list[dict[str, Any]]:
    checked = []
    for key, reference, limit in TARGETS:
        ratio = timings[key].median / timings[reference].median
        checked.append(
            {
                "case": key,
                "reference": reference,
                "measure": "ratio",
                "value": ratio,
                "limit": limit,
                "passed": ratio <= limit,
            }
        )
    return checked


def print_table(timings: dict[str, Timing], checked: list[dict[str, Any]], cold: bool) -> None:
    """One line per case: median seconds, min-max, others' CPU, ratio and target."""
    by_case = {target["case"]: target for target in checked}
    numbers = {key: f"({index})" for index, key in enumerate(timings, start=1)}
    header = (
        f"{'':<3} {'case':<40} {'n':>2} {'seconds':>8} {'min-max':>12} {'others':>7} "
        f"{'ratio':>12}   target"
    )
    print(header)
    print("-" * (len(header) + 14))
    for key, timing in timings.items():
        spread = f"{min(timing.seconds):.2f}-{max(timing.seconds):.2f}"
        target = by_case.get(key)
        reference = target["reference"] if target else REFERENCES.get(key)
        if reference is None:
            ratio_text, verdict = "", "baseline"
        else:
            ratio = timing.median / timings[reference].median
            ratio_text = f"{ratio:.3f} of {numbers[reference]}"
            verdict = (
                f"<= {target['limit']:.2f}  {'PASS' if target['passed'] else 'FAIL'}"
                if target
                else "(reference)"
            )
        print(
            f"{numbers[key]:<3} {timing.case.label:<40} {len(timing.seconds):>2} "
            f"{timing.median:>8.3f} {spread:>12} {timing.others_cpu_median:>7.2f} "
            f"{ratio_text:>12}   {verdict}"
        )
    print(
        "seconds: median of whole subprocesses (min-max over the repeats), "
        + ("page cache dropped before each run" if cold else "WARM page cache (not root?)")
        + ";\nothers: median CPU seconds used meanwhile outside the timed process tree "
        "(other processes, kernel threads);\nthe raw extracts write into an empty directory; "
        "the live restores replace damaged data (and remove\nit) and are set against the raw "
        "extract run right after the same damage; the empty-root restore\nwrites into an "
        "empty --target-root like the plain raw extract."
    )
    for key in ("full_live", "selective"):
        removals = [sample.removal for sample in timings[key].samples if sample.removal is not None]
        if removals:
            print(
                f"{timings[key].case.label}: the replaced copies were removed by a detached "
                f"process, done {statistics.median(removals):.2f} s (median) after homesafe "
                "returned;\nthat time is not in the figures above (the next run waits for it)."
            )


def write_results(
    path: Path,
    timings: dict[str, Timing],
    checked: list[dict[str, Any]],
    apps: dict[str, AppData],
    cold: bool,
    orders: list[list[str]],
    profile: dict[str, Any] | None,
) -> None:
    document = {
        "benchmark": "homesafe restore: selective against full, full against raw borg extract",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": host_description(),
        "apps": {app.app_id: app.summary() for app in apps.values()},
        "page_cache": "cold" if cold else "warm",
        "orders": orders,
        "cases": [
            {
                "case": timing.case.key,
                "label": timing.case.label,
                "side": timing.case.side,
                "seconds": timing.seconds,
                "others_cpu_seconds": [sample.others_cpu for sample in timing.samples],
                "waited_seconds": [sample.waited for sample in timing.samples],
                "removal_seconds_after": [sample.removal for sample in timing.samples],
                "cold": [sample.cold for sample in timing.samples],
                "median": timing.median,
                "min": min(timing.seconds),
                "max": max(timing.seconds),
            }
            for timing in timings.values()
        ],
        "targets": checked,
        "profile": profile,
    }
    write_json(path, document)


# -- profile of full live restores -----------------------------------------------------

# Functions of homesafe timed by --profile, as (module, class or None, attribute, label,
# top level). Top-level steps follow one another inside the command; the others run
# inside one of them (the description and the listing side by side, in two threads).
# Labels of INSTRUMENTED used in the accounting of homesafe's extra time.
DESCRIBE_AND_LIST = "description + listing, side by side"
STAGE_FROM_RECORD = "staging from the record: extract and listing side by side"
STAGE = "stage: borg extract into staging (restore.stage)"
VERIFY = "verification walk (restore.verify)"
COMMIT = "remove the damaged copies (Swap.commit)"
FSYNC_LABEL = "os.fsync (journal entries, state files)"
INSTRUMENTED: tuple[tuple[str, str | None, str, str, bool], ...] = (
    ("homesafe.journal", None, "recover", "journal: recover dead operations first", True),
    ("homesafe.api", None, "_describe_and_list", DESCRIBE_AND_LIST, True),
    ("homesafe.sources", "EngineSource", "describe", "description (borg extract .homesafe)", False),
    ("homesafe.sources", "EngineSource", "listing", "listing (borg list, parse)", False),
    ("homesafe.api", None, "_stage_from_record", STAGE_FROM_RECORD, False),
    ("homesafe.restore", None, "attach_listing", "attach the listing", False),
    ("homesafe.api", None, "_local_apps_or_none", "load the installed manifests", True),
    ("homesafe.restore", None, "plan", "plan (restore.plan)", True),
    ("homesafe.restore", None, "require_space", "space check (restore.require_space)", True),
    ("homesafe.restore", None, "stage", STAGE, True),
    ("homesafe.restore", None, "verify", VERIFY, True),
    ("homesafe.api", "_Quiesced", "enter", "lockdown enter (api._Quiesced.enter)", True),
    ("homesafe.restore", "Swap", "apply", "renames into place (Swap.apply)", True),
    ("homesafe.api", "_Quiesced", "leave", "lockdown leave (api._Quiesced.leave)", True),
    ("homesafe.restore", "Swap", "commit", COMMIT, True),
    ("homesafe.restore", None, "remove_staging", "remove the staging areas", True),
    (
        "homesafe.restore",
        None,
        "remove_detached",
        "hand them to a detached remover (restore.remove_detached)",
        False,
    ),
    ("homesafe.api", None, "_install_if_missing", "installed? (api._install_if_missing)", True),
    ("homesafe.api", None, "_record_in_history", "record in the history", True),
    ("homesafe.cli.operations", None, "print_operation", "print the result (rich)", True),
    ("homesafe.execute", None, "run", "subprocess", False),
    ("os", None, "fsync", FSYNC_LABEL, False),
)
TIMELINE_FSYNC_SECONDS = 0.01


def subprocess_label(argv: Any) -> str:
    parts = [str(part) for part in argv]
    label = "subprocess: " + " ".join(parts[:2])
    if len(parts) > 1 and parts[1] == "extract":
        after = parts[parts.index("--") + 2 :] if "--" in parts else []
        label += " (metadata)" if any(".homesafe" in part for part in after) else " (data)"
    return label


def instrumented_restore(output: Path, app_ids: list[str]) -> None:
    """Run ``homesafe restore ARCHIVE [APP...]`` in this process, timing the steps of INSTRUMENTED.

    Called in a subprocess by ``--profile`` (hidden option ``--instrumented-run``); the
    wall-clock times of its start and end let the caller tell start-up and exit apart.
    """
    started_at = time.time()
    events: list[tuple[str, float, float]] = []
    lock = threading.Lock()
    origin = time.perf_counter()
    missing = []

    def wrap(label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*arguments: Any, **keywords: Any) -> Any:
            name = subprocess_label(arguments[0]) if label == "subprocess" else label
            started = time.perf_counter()
            try:
                return function(*arguments, **keywords)
            finally:
                with lock:
                    events.append((name, started - origin, time.perf_counter() - origin))

        return timed

    imports = import_homesafe_timed()
    import homesafe.cli  # imported (and timed) just above: this only binds the name

    for module_name, class_name, attribute, label, _top in INSTRUMENTED:
        target: Any = importlib.import_module(module_name)
        if class_name is not None:
            target = getattr(target, class_name, None)
        if target is None or not hasattr(target, attribute):
            missing.append(f"{module_name}.{class_name or ''}.{attribute}")
            continue
        setattr(target, attribute, wrap(label, getattr(target, attribute)))
    command_started = time.perf_counter() - origin
    try:
        homesafe.cli.main(["restore", ARCHIVE_NAME, *app_ids], standalone_mode=False)
    except SystemExit as exit_request:
        if exit_request.code not in (0, None):
            raise
    command_ended = time.perf_counter() - origin
    document = {
        "started_at": started_at,
        "imports": imports,
        "command_started": command_started,
        "command_seconds": command_ended - command_started,
        "events": events,
        "missing": missing,
        "finished_at": time.time(),
    }
    output.write_text(json.dumps(document))


@dataclass
class ProfileSample(InstrumentedRun):
    """One instrumented full live restore and the raw extract timed next to it."""

    timeline: list[tuple[str, float, float]]
    missing: list[str]
    raw_extract: float


def instrumented_sample(bench: Bench, homesafe_first: bool) -> ProfileSample:
    workspace = bench.workspace
    raw_seconds = 0.0

    def raw() -> None:
        nonlocal raw_seconds
        raw_seconds = bench.run(CASES_BY_KEY["raw_full_damaged"]).seconds

    if not homesafe_first:
        raw()
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "phases.json"
        for app in bench.apps.values():
            damage(app)
        launched_at = 0.0

        def launch() -> float:
            nonlocal launched_at
            launched_at = time.time()
            subprocess.run(
                [sys.executable, __file__, "--instrumented-run", str(output)],
                env=workspace.homesafe_environment(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=True,
            )
            return time.time() - launched_at

        wall = bench.timed(launch).seconds
        document = json.loads(output.read_text())
    bench.check([LARGE_APP, SMALL_APP])
    if homesafe_first:
        raw()
    steps: dict[str, float] = {}
    calls: dict[str, int] = {}
    for label, started, ended in document["events"]:
        steps[label] = steps.get(label, 0.0) + ended - started
        calls[label] = calls.get(label, 0) + 1
    offset = document["command_started"]
    return ProfileSample(
        wall=wall,
        start_up=document["started_at"] - launched_at,
        exit=launched_at + wall - document["finished_at"],
        imports=document["imports"],
        command=document["command_seconds"],
        steps=steps,
        calls=calls,
        timeline=[
            (label, start - offset, end - offset) for label, start, end in document["events"]
        ],
        missing=document["missing"],
        raw_extract=raw_seconds,
    )


def top_level_labels() -> set[str]:
    return {label for _module, _class, _attribute, label, top in INSTRUMENTED if top}


def lock_stalled(sample: ProfileSample) -> bool:
    """Whether a description or listing call waited one lock poll (see BORG_LOCK_POLL_SECONDS)."""
    engine_calls = [
        seconds
        for label, seconds in sample.steps.items()
        if label.startswith(("subprocess: borg list", "subprocess: borg extract (metadata)"))
    ]
    return max(engine_calls, default=0.0) >= 0.9 * BORG_LOCK_POLL_SECONDS


def extra_time(sample: ProfileSample) -> dict[str, float]:
    """homesafe's wall clock minus the raw extract's, split by cause (sums exactly)."""
    command_steps = sum(
        seconds for label, seconds in sample.steps.items() if label in top_level_labels()
    )
    causes = {
        "start-up": sample.wall - sample.command,
        "describe+list": sample.steps.get(DESCRIBE_AND_LIST, 0.0),
        "stage-raw": sample.steps.get(STAGE, 0.0) - sample.raw_extract,
        # Planned from the record: the reads beside the extraction that outlast it.
        "reads after": (
            sample.steps[STAGE_FROM_RECORD] - sample.steps.get(STAGE, 0.0)
            if STAGE_FROM_RECORD in sample.steps
            else 0.0
        ),
        "verify": sample.steps.get(VERIFY, 0.0),
        "rm damaged": sample.steps.get(COMMIT, 0.0),
    }
    named = sum(causes.values()) - causes["start-up"] + sample.raw_extract
    causes["other"] = sample.command - named
    causes["(uninstrumented part)"] = sample.command - command_steps
    return causes


def profile_full_restore(bench: Bench, repeats: int) -> dict[str, Any]:
    """Where the time of a full live ``homesafe restore`` goes (printed and returned).

    ``repeats`` instrumented runs, each next to a raw ``borg extract`` of the whole
    archive into an empty directory (alternating order), so that homesafe's data
    extraction can be set against borg's alone. Steps are medians; the extra time is
    split by cause run by run (each run's causes add up to its homesafe - raw).
    """
    environment = bench.workspace.homesafe_environment()
    interpreter, import_homesafe = start_up_references(environment, repeats)
    samples = [instrumented_sample(bench, repeat % 2 == 0) for repeat in range(repeats)]

    def median_of(value: Callable[[ProfileSample], float]) -> float:
        return statistics.median(value(sample) for sample in samples)

    imports = {
        label: median_of(lambda sample, label=label: sample.imports.get(label, 0.0))
        for label in samples[0].imports
    }
    labels = [label for _module, _class, _attribute, label, _top in INSTRUMENTED]
    labels += sorted({label for sample in samples for label in sample.steps} - set(labels))
    steps = {
        label: median_of(lambda sample, label=label: sample.steps.get(label, 0.0))
        for label in labels
        if any(label in sample.steps for sample in samples)
    }
    extras = [extra_time(sample) for sample in samples]

    def line(label: str, seconds: float, indent: int = 2) -> None:
        print(f"{' ' * indent}{label:<{72 - indent}} {seconds:7.3f} s")

    print()
    print(
        f"Profile of `homesafe restore {ARCHIVE_NAME}` (both apps, live, over damaged data; "
        f"{'cold' if bench.drop_caches else 'warm'} page cache; medians of {repeats}):"
    )
    line(
        "wall clock of one run (homesafe called in-process, instrumented)",
        median_of(lambda sample: sample.wall),
    )
    line(
        "start-up: interpreter + bench/restore.py's own imports",
        median_of(lambda sample: sample.start_up),
        4,
    )
    for label, seconds in imports.items():
        line(label, seconds, 4)
    line("command (click main)", median_of(lambda sample: sample.command), 4)
    for label, seconds in steps.items():
        indent = 6 if label in top_level_labels() else 8
        count = samples[0].calls.get(label, 0)
        suffix = f" ({count} calls)" if count > 1 else ""
        line(label + suffix, seconds, indent)
    line(
        "not instrumented (click, api, result building, ...)",
        statistics.median(extra["(uninstrumented part)"] for extra in extras),
        6,
    )
    line("interpreter exit (finalisation)", median_of(lambda sample: sample.exit), 4)
    line(
        "raw borg extract (all, into an empty dir, after damage), next to it",
        median_of(lambda sample: sample.raw_extract),
    )
    print("  for reference:")
    line("python -c pass (bare interpreter start-up and exit)", interpreter, 4)
    line("python -c 'import homesafe.cli, homesafe.api' (whole process)", import_homesafe, 4)
    causes = [cause for cause in extras[0] if not cause.startswith("(")]
    print()
    print("homesafe's extra time over the raw extract, run by run (seconds; causes add up):")
    print(
        "  start-up: interpreter, imports, exit; describe+list: the two engine calls side by "
        "side\n  (an archive without a local record); stage-raw: staging extract minus the raw "
        "extract;\n  reads after: the listing made beside the extraction (an archive with a "
        "local\n  record), where it outlasts it; verify: verification walk; "
        "rm damaged: removal of the\n  replaced copies in the command (none when a detached "
        "process removes them); other: the\n  rest of the command (journal, renames, "
        "history, print...)"
    )
    widths = [max(len(cause), 7) for cause in causes]
    print(
        f"  {'run':>3} {'homesafe':>8} {'raw':>6} {'extra':>6}  "
        + "  ".join(f"{cause:>{width}}" for cause, width in zip(causes, widths, strict=True))
    )
    rows = [
        (f"{index}{'*' if lock_stalled(sample) else ''}", sample.wall, sample.raw_extract, extra)
        for index, (sample, extra) in enumerate(zip(samples, extras, strict=True), start=1)
    ]
    rows.append(
        (
            "med",
            median_of(lambda sample: sample.wall),
            median_of(lambda sample: sample.raw_extract),
            {cause: statistics.median(extra[cause] for extra in extras) for cause in causes},
        )
    )
    for name, wall, raw, extra in rows:
        print(
            f"  {name:>3} {wall:8.2f} {raw:6.2f} {wall - raw:6.2f}  "
            + "  ".join(
                f"{extra[cause]:>{width}.2f}" for cause, width in zip(causes, widths, strict=True)
            )
        )
    print("  (med: medians column by column; they need not add up)")
    if any(lock_stalled(sample) for sample in samples):
        print(
            f"  *: a description or listing call took >= {BORG_LOCK_POLL_SECONDS:g} s: the two "
            "borg processes started side by side\n     met on the repository's lock roster, "
            f"and borg polls it every lock_wait/10 = {BORG_LOCK_POLL_SECONDS:g} s"
        )
    print(
        "\nTimeline of the first run (seconds from the start of the command; "
        f"fsyncs under {TIMELINE_FSYNC_SECONDS} s left out):"
    )
    for label, started, ended in sorted(samples[0].timeline, key=lambda event: event[1]):
        if label != FSYNC_LABEL or ended - started >= TIMELINE_FSYNC_SECONDS:
            print(f"  {started:7.3f} - {ended:7.3f}  {label}")
    if samples[0].missing:
        print(f"  not instrumented (not found): {', '.join(samples[0].missing)}")
    return {
        "repeats": repeats,
        "imports_seconds": imports,
        "steps_seconds_median": steps,
        "bare_interpreter_seconds": interpreter,
        "import_homesafe_process_seconds": import_homesafe,
        "timeline_first_run": samples[0].timeline,
        "samples": [
            {
                "wall": sample.wall,
                "start_up": sample.start_up,
                "command": sample.command,
                "exit": sample.exit,
                "raw_extract": sample.raw_extract,
                "steps": sample.steps,
                "calls": sample.calls,
                "extra_by_cause": extra,
                "lock_stall": lock_stalled(sample),
            }
            for sample, extra in zip(samples, extras, strict=True)
        ],
    }


# -- main -------------------------------------------------------------------------------


def prepare_homesafe(runner: Runner, apps: dict[str, AppData]) -> float:
    """Fresh homesafe state, both manifests, and one backup of both apps (seconds)."""
    workspace = runner.workspace
    for directory in (workspace.root / "homesafe", workspace.scratch):
        if directory.exists():
            shutil.rmtree(directory)
    for app in apps.values():
        write_manifest(workspace.apps_directory, app.app_id, app.directories)
    return runner.backup()


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=500, help="large app's size (500)")
    parser.add_argument(
        "--small-files", type=int, default=5000, help="large app's small files (5000)"
    )
    parser.add_argument("--small-mb", type=int, default=5, help="small app's size (5)")
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=LAYOUTS[0],
        help=f"the large app declares its three directories, or one holding them ({LAYOUTS[0]})",
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs of each case (5)")
    parser.add_argument(
        "--work-dir", type=Path, help="work directory (default: a fresh ext4 on a loop device)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--no-drop-caches", action="store_true", help="never drop the page cache (warm runs)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="before each timed run, wait up to this many seconds for a quiet machine (15)",
    )
    parser.add_argument(
        "--homesafe",
        default=DEFAULT_HOMESAFE,
        help="the homesafe command (default: next to this Python)",
    )
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON output")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--profile", action="store_true", help="also break down full live restores")
    parser.add_argument("--instrumented-run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--instrumented-apps", nargs="*", default=[], help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    options = parse_arguments()
    if options.instrumented_run is not None:
        instrumented_restore(options.instrumented_run, options.instrumented_apps)
        return 0
    require_command(options.homesafe)

    # A given work directory is reused when its data set has the same parameters and
    # is intact. Else the work is done on a fresh ext4 with a journal (see
    # common.loop_filesystem: the root file system here has none).
    with ExitStack() as stack:
        work_dir = options.work_dir
        if work_dir is None:
            if options.keep:
                raise SystemExit(
                    "--keep needs --work-dir: the default work directory is a loop device"
                )
            scratch = Path(tempfile.mkdtemp(prefix="homesafe-bench-restore-", dir="/var/tmp"))
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
            image_bytes = max(4096, (options.size_mb + options.small_mb) * 6) * MEBIBYTE
            work_dir = stack.enter_context(loop_filesystem(scratch, "ext4", image_bytes)) / "work"
        root = stack.enter_context(
            work_directory(
                work_dir,
                options.keep,
                prefix="homesafe-bench-restore-",
                marker_file=MARKER_FILE,
                description="homesafe restore benchmark work directory",
            )
        )
        workspace = Workspace(root)
        started = time.monotonic()
        apps, reused = generate_data_set(
            workspace, options.size_mb, options.small_files, options.small_mb, options.layout
        )
        for app in apps.values():
            log(
                f"App {app.app_id}: {app.files} files, {app.bytes / MEBIBYTE:.1f} MiB in "
                f"{', '.join(str(directory) for directory in app.directories)}"
            )
        log(
            "Data set "
            + ("reused" if reused else f"generated in {time.monotonic() - started:.1f} s")
        )
        log(f"homesafe byte-compiled in {compile_homesafe()}")
        runner = Runner(workspace, options.homesafe)
        backup_seconds = prepare_homesafe(runner, apps)
        log(f"homesafe backup --name {ARCHIVE_NAME} (untimed): {backup_seconds:.1f} s")
        bench = Bench(runner, apps, not options.no_drop_caches, options.quiet_wait)
        timings = measure(bench, options.repeats, log)
        cold = bench.warm_runs == 0
        checked = targets(timings)
        print()
        print_table(timings, checked, cold)
        profile = profile_full_restore(bench, options.repeats) if options.profile else None
        orders = [
            [case.key for case in (CASES if repeat % 2 == 0 else tuple(reversed(CASES)))]
            for repeat in range(options.repeats)
        ]
        write_results(options.results, timings, checked, apps, cold, orders, profile)
        print(f"\nFigures written to {options.results}")
    return exit_status(checked, options.check)


if __name__ == "__main__":
    sys.exit(main())
