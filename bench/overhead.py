"""How much time `homesafe backup` adds to the `borg create` it runs.

What is measured, in one run and on one generated data set:

* **homesafe**: the wall clock (``time.monotonic``) of the whole ``homesafe backup
  bench`` command, run as a subprocess: interpreter start-up, imports, manifest
  loading, everything homesafe does around borg, the ``borg create`` it starts, and
  process exit.
* **raw borg**: the wall clock of ``borg create`` alone, with the options homesafe
  gives it (``--json --log-json --compression zstd,3 --comment ...``), into a
  ``repokey-blake2`` repository, the passphrase handed over through
  ``BORG_PASSPHRASE_FD`` and ``BORG_BASE_DIR`` pointing at a directory of its own, as
  homesafe points it at ``$HOMESAFE_HOME/borg``.

Each side has its own repository and its own borg cache. Two cases are timed:

* **first backup**: the data set goes into a repository that holds nothing of it. The
  repository is created *before* the timed run and is not part of it: for homesafe by
  a ``homesafe backup`` of a tiny bootstrap app (which makes homesafe create its
  default repository, passphrase, borg cache and borg-version cache, and validate the
  manifests installed, the data set's app's included: validation happens when a
  manifest changes, not at every backup), for raw borg by
  ``borg init`` and a ``borg create`` of the same tiny directory. Every repeat starts
  again from nothing. The page cache is dropped before each timed run when
  ``/proc/sys/vm/drop_caches`` is writable (else the runs are reported as warm).
* **unchanged backup**: another backup of the same, unchanged data into the same
  repository (borg's files cache makes this mostly a metadata walk). These runs are
  warm unless ``--drop-caches all`` is given.

Before anything is timed, homesafe's modules are byte-compiled (``compileall``), as
installing homesafe from a wheel or a distribution package does, and as borg's are: a
checkout installed in editable mode otherwise writes its bytecode on first import, or
never when ``PYTHONDONTWRITEBYTECODE`` is set, and then compiles every module again on
every run, a cost no installed homesafe has.

The order of homesafe and raw borg alternates between repeats, and each figure is the
median of its repeats. Targets: first backup ratio (homesafe / raw) <= 1.05; unchanged
backup added time (homesafe - raw) <= 0.3 s. ``--profile`` then breaks down one
unchanged ``homesafe backup`` (imports by package, and the time of each step around
the borg subprocess).

The data set is deterministic (seeded ``random.Random``, not ``os.urandom``, so that
every run backs up the same bytes): thousands of small files (1-16 KiB, half random,
half text) in nested directories, a few large incompressible files and a few large
compressible text files. The figures are also written as JSON to
``bench/results/overhead.json``. Only the standard library is used.

    .venv/bin/python bench/overhead.py [--size-mb N] [--work-dir DIR] [--keep] [--check]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random
from typing import Any

# The scripts of bench/ share common.py; loaded by path, this one needs its directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BORG_ENCRYPTION,
    BORG_WARNING,
    DEFAULT_HOMESAFE,
    MEBIBYTE,
    SEED,
    BenchWorkspace,
    DataSet,
    InstrumentedRun,
    borg_create_arguments,
    compile_homesafe,
    describe_failure,
    drop_page_cache,
    exit_status,
    host_description,
    import_homesafe_timed,
    log,
    median_wall_clock,
    passphrase_pipe,
    raw_borg_environment,
    require_command,
    start_up_references,
    work_directory,
    write_data_set,
    write_json,
    write_manifest,
)

APP_ID = "bench"
BOOTSTRAP_APP_ID = "bootstrap"
MARKER_FILE = ".homesafe-bench"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "overhead.json"

FIRST_BACKUP_RATIO_TARGET = 1.05
UNCHANGED_ADDED_SECONDS_TARGET = 0.3


# -- the work directory and the data set ---------------------------------------------


@dataclass
class Workspace(BenchWorkspace):
    """Where one benchmark run keeps its data, homesafe's state and raw borg's state."""

    @property
    def data_directories(self) -> list[Path]:
        return [self.data / "small", self.data / "incompressible", self.data / "compressible"]

    @property
    def bootstrap_data(self) -> Path:
        return self.root / "bootstrap-data"

    @property
    def raw_base(self) -> Path:
        return self.root / "raw" / "borg-base"

    @property
    def raw_repository(self) -> Path:
        return self.root / "raw" / "repository"

    @property
    def raw_working_directory(self) -> Path:
        return self.root / "raw" / "cwd"


def generate_data_set(workspace: Workspace, size_mb: int, small_files: int) -> DataSet:
    """Write the data set under ``workspace.data`` (or reuse the one already there)."""
    wanted = {"size_mb": size_mb, "small_files": small_files, "seed": SEED, "format": 1}
    marker = workspace.data / MARKER_FILE
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("parameters") == wanted:
            return DataSet(**recorded["data_set"], reused=True)
    if workspace.data.exists():
        shutil.rmtree(workspace.data)
    data_set = write_data_set(
        Random(SEED), *workspace.data_directories, size_mb=size_mb, small_files=small_files
    )
    recorded_data_set = {
        name: value for name, value in asdict(data_set).items() if name != "reused"
    }
    marker.write_text(json.dumps({"parameters": wanted, "data_set": recorded_data_set}))
    return data_set


# -- running the two sides -----------------------------------------------------------


@dataclass
class Runner:
    """Runs homesafe and raw borg against one workspace; each call returns seconds."""

    workspace: Workspace
    homesafe: str
    passphrase: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    raw_archives: int = 0
    last_raw_stats: dict[str, Any] = field(default_factory=dict)

    def homesafe_backup(self, app_id: str) -> float:
        argv = [self.homesafe, "backup", app_id]
        started = time.monotonic()
        completed = subprocess.run(
            argv,
            env=self.workspace.homesafe_environment(),
            capture_output=True,
            check=False,
        )
        elapsed = time.monotonic() - started
        if completed.returncode != 0:
            raise RuntimeError(describe_failure(argv, completed))
        return elapsed

    def raw_borg(self, arguments: list[str], accept_warning: bool = False) -> float:
        """One borg call with homesafe's environment and a passphrase pipe."""
        argv = ["borg", *arguments]
        self.workspace.raw_working_directory.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with passphrase_pipe(self.passphrase) as read_end:
            completed = subprocess.run(
                argv,
                env=raw_borg_environment(self.workspace.raw_base, read_end),
                cwd=self.workspace.raw_working_directory,
                pass_fds=(read_end,),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
        elapsed = time.monotonic() - started
        if completed.returncode not in ((0, BORG_WARNING) if accept_warning else (0,)):
            raise RuntimeError(describe_failure(argv, completed))
        if arguments[0] == "create":
            self.last_raw_stats = json.loads(completed.stdout)["archive"]["stats"]
        return elapsed

    def raw_create(self, paths: list[Path]) -> float:
        self.raw_archives += 1
        comment = json.dumps({"homesafe": 1, "apps": [APP_ID]}, separators=(",", ":"))
        archive = f"{self.workspace.raw_repository}::archive-{self.raw_archives}"
        return self.raw_borg(borg_create_arguments(comment, archive, paths), accept_warning=True)

    def reset_and_bootstrap(self) -> None:
        """Fresh, initialised repositories on both sides, holding one tiny archive."""
        for directory in (self.workspace.root / "homesafe", self.workspace.root / "raw"):
            if directory.exists():
                shutil.rmtree(directory)
        self.raw_archives = 0
        bootstrap = self.workspace.bootstrap_data
        bootstrap.mkdir(parents=True, exist_ok=True)
        (bootstrap / "hello.txt").write_text("bootstrap\n")
        write_manifest(self.workspace.apps_directory, BOOTSTRAP_APP_ID, [bootstrap])
        # The app's manifest is installed before, as on a real server, where manifests
        # change when apps do, not between backups: the bootstrap backup validates it
        # (every manifest is), so the timed run finds it in the validated-manifest cache.
        write_manifest(self.workspace.apps_directory, APP_ID, self.workspace.data_directories)
        self.homesafe_backup(BOOTSTRAP_APP_ID)
        (self.workspace.apps_directory / f"{BOOTSTRAP_APP_ID}.toml").unlink()
        self.workspace.raw_repository.parent.mkdir(parents=True, exist_ok=True)
        self.raw_borg(
            [
                "init",
                "--log-json",
                "--encryption",
                BORG_ENCRYPTION,
                str(self.workspace.raw_repository),
            ]
        )
        self.raw_create([bootstrap])


@dataclass
class Timing:
    """The seconds of each repeat of one case, for both sides."""

    case: str
    cold: bool
    raw_seconds: list[float] = field(default_factory=list)
    homesafe_seconds: list[float] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    @property
    def raw_median(self) -> float:
        return statistics.median(self.raw_seconds)

    @property
    def homesafe_median(self) -> float:
        return statistics.median(self.homesafe_seconds)

    @property
    def ratio(self) -> float:
        return self.homesafe_median / self.raw_median

    @property
    def added_seconds(self) -> float:
        return self.homesafe_median - self.raw_median


def timed_pair(
    runner: Runner, timing: Timing, repeat: int, drop_caches: bool, log: Callable[[str], None]
) -> None:
    """Time homesafe and raw borg once each, homesafe first on even repeats."""
    sides = ["homesafe", "raw"] if repeat % 2 == 0 else ["raw", "homesafe"]
    timing.order.append("+".join(sides))
    for side in sides:
        # The previous run's dirty pages are written out first, not during this run.
        os.sync()
        cold = drop_caches and drop_page_cache()
        if side == "homesafe":
            seconds = runner.homesafe_backup(APP_ID)
            timing.homesafe_seconds.append(seconds)
        else:
            seconds = runner.raw_create(runner.workspace.data_directories)
            timing.raw_seconds.append(seconds)
        state = "cold" if cold else "warm"
        log(f"  {timing.case} #{repeat + 1} {side:<8} {seconds:8.3f} s ({state} page cache)")


def measure(
    runner: Runner,
    first_repeats: int,
    unchanged_repeats: int,
    drop_caches: str,
    log: Callable[[str], None],
) -> list[Timing]:
    can_drop = drop_caches != "never" and drop_page_cache()
    first = Timing("first backup", cold=can_drop)
    for repeat in range(first_repeats):
        runner.reset_and_bootstrap()
        timed_pair(runner, first, repeat, can_drop, log)
    unchanged_cold = can_drop and drop_caches == "all"
    unchanged = Timing("unchanged backup", cold=unchanged_cold)
    for repeat in range(unchanged_repeats):
        timed_pair(runner, unchanged, repeat, unchanged_cold, log)
    return [first, unchanged]


# -- the report -----------------------------------------------------------------------


def targets(timings: list[Timing]) -> list[dict[str, Any]]:
    first, unchanged = timings
    return [
        {
            "case": first.case,
            "measure": "ratio",
            "value": first.ratio,
            "limit": FIRST_BACKUP_RATIO_TARGET,
            "passed": first.ratio <= FIRST_BACKUP_RATIO_TARGET,
        },
        {
            "case": unchanged.case,
            "measure": "added_seconds",
            "value": unchanged.added_seconds,
            "limit": UNCHANGED_ADDED_SECONDS_TARGET,
            "passed": unchanged.added_seconds <= UNCHANGED_ADDED_SECONDS_TARGET,
        },
    ]


def print_table(timings: list[Timing], checked: list[dict[str, Any]]) -> None:
    header = (
        f"{'case':<18} {'cache':<5} {'n':>2} {'raw borg s':>11} {'homesafe s':>11} "
        f"{'ratio':>7} {'added s':>8}   target"
    )
    print(header)
    print("-" * len(header))
    for timing, target in zip(timings, checked, strict=True):
        verdict = "PASS" if target["passed"] else "FAIL"
        limit = (
            f"ratio <= {target['limit']:.2f}"
            if target["measure"] == "ratio"
            else f"added <= {target['limit']:.1f} s"
        )
        print(
            f"{timing.case:<18} {'cold' if timing.cold else 'warm':<5} "
            f"{len(timing.raw_seconds):>2} {timing.raw_median:>11.3f} "
            f"{timing.homesafe_median:>11.3f} {timing.ratio:>7.3f} "
            f"{timing.added_seconds:>+8.3f}   {verdict} ({limit})"
        )
    for timing in timings:
        print(
            f"  {timing.case}: raw borg {min(timing.raw_seconds):.3f}-"
            f"{max(timing.raw_seconds):.3f} s, homesafe {min(timing.homesafe_seconds):.3f}-"
            f"{max(timing.homesafe_seconds):.3f} s (min-max over {len(timing.raw_seconds)})"
        )


def write_results(
    path: Path,
    timings: list[Timing],
    checked: list[dict[str, Any]],
    data_set: DataSet,
    raw_stats: dict[str, Any],
    profile: dict[str, Any] | None,
) -> None:
    document = {
        "benchmark": "homesafe backup overhead over raw borg create",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {
            **host_description(),
            # homesafe's bytecode is compiled before the runs whatever this says
            "python_dont_write_bytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
        },
        "data_set": {**asdict(data_set), "files": data_set.files, "bytes": data_set.total_bytes},
        "raw_borg_stats_last_run": raw_stats,
        "cases": [
            {
                "case": timing.case,
                "page_cache": "cold" if timing.cold else "warm",
                "order": timing.order,
                "raw_seconds": timing.raw_seconds,
                "homesafe_seconds": timing.homesafe_seconds,
                "raw_median": timing.raw_median,
                "homesafe_median": timing.homesafe_median,
                "ratio": timing.ratio,
                "added_seconds": timing.added_seconds,
            }
            for timing in timings
        ],
        "targets": checked,
        "profile": profile,
    }
    write_json(path, document)


# -- profile of one unchanged homesafe backup -----------------------------------------

# Functions of homesafe timed by --profile, as (module, class or None, attribute, label).
# Each is patched where its callers look it up; none of them calls another one of the
# list, except that a subprocess runs inside the borg version check when its cache is cold.
INSTRUMENTED: tuple[tuple[str, str | None, str, str], ...] = (
    ("homesafe.api", None, "load_apps", "load manifests (apps.load_apps)"),
    ("homesafe.api", None, "_ensure_repository", "repository exists? (api._ensure_repository)"),
    ("homesafe.repositories", "Repository", "passphrase", "read the passphrase file"),
    ("homesafe.state", None, "read_settings", "read settings (state.read_settings)"),
    ("homesafe.api", None, "_tree_size", "size walk over the files (api._tree_size)"),
    ("homesafe.api", None, "_write_backup_metadata", "write the archive metadata"),
    ("homesafe.engines.borg", None, "version", "borg version check (engines.borg.version)"),
    ("homesafe.execute", None, "run", "subprocess"),
    ("homesafe.cli.operations", None, "print_operation", "print the result (rich, incl. import)"),
)


def instrumented_backup(output: Path) -> None:
    """Run ``homesafe backup bench`` in this process, timing the steps of INSTRUMENTED.

    Called in a subprocess by ``--profile`` (hidden option ``--instrumented-run``); the
    wall-clock times of its start and end let the caller tell start-up and exit apart.
    """
    started_at = time.time()
    phases: dict[str, float] = {}
    calls: dict[str, int] = {}

    def wrap(label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*arguments: Any, **keywords: Any) -> Any:
            name = label
            if label == "subprocess":
                name = "subprocess: " + " ".join(str(part) for part in arguments[0][:2])
            started = time.perf_counter()
            try:
                return function(*arguments, **keywords)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - started
                calls[name] = calls.get(name, 0) + 1

        return timed

    phases.update(import_homesafe_timed())
    import homesafe.cli  # imported (and timed) just above: this only binds the name

    for module_name, class_name, attribute, label in INSTRUMENTED:
        target: Any = importlib.import_module(module_name)
        if class_name is not None:
            target = getattr(target, class_name)
        setattr(target, attribute, wrap(label, getattr(target, attribute)))
    started = time.perf_counter()
    try:
        homesafe.cli.main(["backup", APP_ID], standalone_mode=False)
    except SystemExit as exit_request:
        if exit_request.code not in (0, None):
            raise
    command_seconds = time.perf_counter() - started
    document = {
        "started_at": started_at,
        "imports": {
            label: seconds for label, seconds in phases.items() if label.startswith("import")
        },
        "command_seconds": command_seconds,
        "steps": {
            label: seconds for label, seconds in phases.items() if not label.startswith("import")
        },
        "calls": calls,
        "finished_at": time.time(),
    }
    output.write_text(json.dumps(document))


@dataclass
class ImportProfile:
    """Import self time (seconds, modules) by top-level package, and by module."""

    packages: list[tuple[str, float, int]]
    modules: list[tuple[str, float]]


def import_times(runner: Runner, repeats: int) -> ImportProfile:
    """Import self times during real homesafe backups (``-X importtime``), medians."""
    argv = [
        sys.executable,
        "-X",
        "importtime",
        "-c",
        f"import sys; from homesafe.cli import main; sys.argv = ['homesafe', 'backup', "
        f"{APP_ID!r}]; main()",
    ]
    package_runs: list[dict[str, float]] = []
    module_runs: list[dict[str, float]] = []
    package_modules: dict[str, int] = {}
    for _ in range(repeats):
        completed = subprocess.run(
            argv, env=runner.workspace.homesafe_environment(), capture_output=True, text=True
        )
        if completed.returncode != 0:
            raise RuntimeError(completed.stderr[-2000:])
        by_package: dict[str, float] = {}
        by_module: dict[str, float] = {}
        package_modules.clear()
        for line in completed.stderr.splitlines():
            # "import time:   self |   cumulative | <indent>module", in microseconds
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            self_part, _cumulative_part, module_part = line.split("|", 2)
            module = module_part.strip()
            package = module.split(".")[0]
            if package in sys.stdlib_module_names or package.startswith("_"):
                package = "(standard library)"
            seconds = int(self_part.split(":")[1]) / 1e6
            by_package[package] = by_package.get(package, 0.0) + seconds
            by_module[module] = seconds
            package_modules[package] = package_modules.get(package, 0) + 1
        package_runs.append(by_package)
        module_runs.append(by_module)
    packages = [
        (name, statistics.median(run.get(name, 0.0) for run in package_runs), count)
        for name, count in package_modules.items()
    ]
    modules = [
        (name, statistics.median(run.get(name, 0.0) for run in module_runs))
        for name in module_runs[0]
    ]
    return ImportProfile(
        packages=sorted(packages, key=lambda item: -item[1]),
        modules=sorted(modules, key=lambda item: -item[1]),
    )


@dataclass
class ProfileSample(InstrumentedRun):
    """One instrumented homesafe run and the raw borg run timed next to it."""

    raw_borg: float


def instrumented_sample(runner: Runner) -> ProfileSample:
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "phases.json"
        os.sync()
        launched_at = time.time()
        subprocess.run(
            [sys.executable, __file__, "--instrumented-run", str(output)],
            env=runner.workspace.homesafe_environment(),
            capture_output=True,
            check=True,
        )
        exited_at = time.time()
        document = json.loads(output.read_text())
    os.sync()
    raw_borg = runner.raw_create(runner.workspace.data_directories)
    return ProfileSample(
        wall=exited_at - launched_at,
        start_up=document["started_at"] - launched_at,
        exit=exited_at - document["finished_at"],
        imports=document["imports"],
        command=document["command_seconds"],
        steps=document["steps"],
        calls=document["calls"],
        raw_borg=raw_borg,
    )


def profile_unchanged(runner: Runner, repeats: int) -> dict[str, Any]:
    """Where the time of an unchanged ``homesafe backup`` goes (printed and returned).

    The figures are medians over ``repeats`` instrumented runs, each followed by a raw
    ``borg create`` of the same data, so that the borg call inside homesafe can be set
    against borg alone.
    """
    environment = runner.workspace.homesafe_environment()
    interpreter, import_homesafe = start_up_references(environment, repeats)
    borg_version_seconds = median_wall_clock(["borg", "--version"], environment, repeats)
    samples = [instrumented_sample(runner) for _ in range(repeats)]

    def median_of(value: Callable[[ProfileSample], float]) -> float:
        return statistics.median(value(sample) for sample in samples)

    imports = {
        label: median_of(lambda sample, label=label: sample.imports.get(label, 0.0))
        for label in samples[0].imports
    }
    step_labels = sorted({label for sample in samples for label in sample.steps})
    steps = {
        label: median_of(lambda sample, label=label: sample.steps.get(label, 0.0))
        for label in step_labels
    }
    command = median_of(lambda sample: sample.command)
    steps["rest of the command (click, api, result building)"] = max(
        command
        - sum(
            value
            for label, value in steps.items()
            # borg --version runs inside the version check, when its cache is cold
            if not label.startswith("subprocess: borg --version")
        ),
        0.0,
    )
    wall = median_of(lambda sample: sample.wall)
    start_up = median_of(lambda sample: sample.start_up)
    exit_seconds = median_of(lambda sample: sample.exit)
    raw_borg = median_of(lambda sample: sample.raw_borg)
    borg_create = steps.get("subprocess: borg create", 0.0)
    imports_profile = import_times(runner, repeats)

    def line(label: str, seconds: float, indent: int = 2) -> None:
        print(f"{' ' * indent}{label:<{70 - indent}} {seconds:7.3f} s")

    print()
    print(f"Profile of an unchanged `homesafe backup {APP_ID}` (medians of {repeats}):")
    line("wall clock of one run (homesafe called in-process, instrumented)", wall)
    line("start-up: interpreter + bench/overhead.py's own imports", start_up, 4)
    for label, seconds in imports.items():
        line(label, seconds, 4)
    line("command (click main)", command, 4)
    for label, seconds in sorted(steps.items(), key=lambda item: -item[1]):
        count = samples[0].calls.get(label)
        suffix = f" ({count} call{'s' if count != 1 else ''})" if count else ""
        line(label + suffix, seconds, 6)
    line("interpreter exit (finalisation)", exit_seconds, 4)
    line("raw borg create of the same data, timed right after", raw_borg)
    line("borg create inside homesafe minus raw borg create", borg_create - raw_borg)
    own_seconds = import_homesafe + command - borg_create
    line("homesafe's own time: import process (below) + command - borg create", own_seconds)
    print("  for reference:")
    line("python -c pass (bare interpreter start-up and exit)", interpreter, 4)
    line("python -c 'import homesafe.cli, homesafe.api' (whole process)", import_homesafe, 4)
    line("borg --version (what an uncached version check would cost)", borg_version_seconds, 4)
    print("  imports of a real run (-X importtime, self times; importtime slows them):")
    for name, seconds, count in imports_profile.packages[:10]:
        line(f"package {name} ({count} modules)", seconds, 4)
    for name, seconds in imports_profile.modules[:10]:
        line(f"module {name}", seconds, 4)
    return {
        "repeats": repeats,
        "wall_seconds": wall,
        "start_up_seconds": start_up,
        "imports_seconds": imports,
        "command_seconds": command,
        "steps_seconds": steps,
        "calls": samples[0].calls,
        "exit_seconds": exit_seconds,
        "raw_borg_create_seconds": raw_borg,
        "homesafe_own_seconds_estimate": own_seconds,
        "bare_interpreter_seconds": interpreter,
        "import_homesafe_process_seconds": import_homesafe,
        "borg_version_seconds": borg_version_seconds,
        "imports_by_package": [
            {"package": name, "seconds": seconds, "modules": count}
            for name, seconds, count in imports_profile.packages
        ],
        "slowest_imports": [
            {"module": name, "seconds": seconds} for name, seconds in imports_profile.modules[:25]
        ],
    }


# -- main -------------------------------------------------------------------------------


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200, help="data set size (200)")
    parser.add_argument("--small-files", type=int, default=5000, help="small files (5000)")
    parser.add_argument("--work-dir", type=Path, help="work directory (fresh under /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--first-repeats", type=int, default=2, help="first backups (2)")
    parser.add_argument("--unchanged-repeats", type=int, default=3, help="unchanged backups (3)")
    parser.add_argument(
        "--drop-caches",
        choices=("first", "all", "never"),
        default="first",
        help="drop the page cache before timed first backups (default), all runs, or never",
    )
    parser.add_argument(
        "--homesafe",
        default=DEFAULT_HOMESAFE,
        help="the homesafe command (default: next to this Python)",
    )
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON output")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--profile", action="store_true", help="also break down an unchanged homesafe backup"
    )
    parser.add_argument("--instrumented-run", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    options = parse_arguments()
    if options.instrumented_run is not None:
        instrumented_backup(options.instrumented_run)
        return 0
    require_command(options.homesafe)

    with work_directory(
        options.work_dir,
        options.keep,
        prefix="homesafe-bench-",
        marker_file=MARKER_FILE,
        description="homesafe overhead benchmark work directory",
    ) as root:
        workspace = Workspace(root)
        started = time.monotonic()
        data_set = generate_data_set(workspace, options.size_mb, options.small_files)
        log(
            f"Data set in {workspace.data}: {data_set.files} files, "
            f"{data_set.total_bytes / MEBIBYTE:.1f} MiB ({data_set.small_files} small, "
            f"{data_set.incompressible_files} incompressible, "
            f"{data_set.compressible_files} compressible)"
            + (" [reused]" if data_set.reused else f" [{time.monotonic() - started:.1f} s]")
        )
        package = compile_homesafe()
        log(f"Bytecode of {package} compiled (as an installation would have it)")
        runner = Runner(workspace, options.homesafe)
        timings = measure(
            runner, options.first_repeats, options.unchanged_repeats, options.drop_caches, log
        )
        checked = targets(timings)
        print()
        print_table(timings, checked)
        profile = profile_unchanged(runner, 3) if options.profile else None
        write_results(options.results, timings, checked, data_set, runner.last_raw_stats, profile)
        print(f"\nFigures written to {options.results}")
    return exit_status(checked, options.check)


if __name__ == "__main__":
    sys.exit(main())
