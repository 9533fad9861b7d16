"""What the benchmark scripts of ``bench/`` share.

The scripts run as ``python bench/X.py`` (or are loaded by path), and put their own
directory on ``sys.path`` before they import this module. Everything here is what two
or more of them do the same way: the seeded generation of log-like and large files,
byte-compiling homesafe, writing out and dropping the page cache, waiting for a quiet
machine and counting the CPU time of the rest of it, the environments homesafe and raw
borg run in (the passphrase handed over through a pipe), app manifests, work
directories, and the host description and JSON file of the results. Only the standard
library is used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any

KIBIBYTE = 1024
MEBIBYTE = 1024 * KIBIBYTE
# The seed of the data sets of overhead.py, restore.py and downtime.py: every run of
# them backs up the same bytes.
SEED = 20240611
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
# The homesafe command run by default: the one installed next to this Python.
DEFAULT_HOMESAFE = str(Path(sys.executable).with_name("homesafe"))

# A machine is quiet when it uses less than QUIET_CPUS over a QUIET_SAMPLE_SECONDS sample.
QUIET_CPUS = 0.25
QUIET_SAMPLE_SECONDS = 1.0

# What homesafe gives borg besides the archive and the paths (see engines/borg.py).
BORG_COMPRESSION = "zstd,3"
BORG_ENCRYPTION = "repokey-blake2"
BORG_ENVIRONMENT = {
    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "no",
    "BORG_DISPLAY_PASSPHRASE": "no",
    "BORG_EXIT_CODES": "legacy",
}
PASSPHRASE_VARIABLES = ("BORG_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_NEW_PASSPHRASE")
BORG_WARNING = 1

WORDS = (
    "request",
    "accepted",
    "rejected",
    "worker",
    "queue",
    "session",
    "token",
    "cache",
    "miss",
    "hit",
    "upstream",
    "timeout",
    "retry",
    "database",
    "index",
    "vacuum",
    "checkpoint",
    "replica",
    "primary",
    "user",
    "login",
    "logout",
    "upload",
    "download",
    "thumbnail",
    "calendar",
    "contact",
    "note",
    "folder",
    "share",
    "sync",
    "conflict",
)
LEVELS = ("DEBUG", "INFO", "INFO", "INFO", "WARNING", "ERROR")


# -- data generation -------------------------------------------------------------------


def text_bytes(generator: Random, size: int, first_line: int = 0) -> bytes:
    """Log-like lines: each one different, all of them very compressible."""
    lines = []
    written = 0
    number = first_line
    while written < size:
        words = " ".join(generator.choices(WORDS, k=generator.randint(3, 9)))
        line = (
            f"2024-06-{1 + number // 86400 % 28:02d}T{number // 3600 % 24:02d}:"
            f"{number // 60 % 60:02d}:{number % 60:02d}Z {generator.choice(LEVELS)} "
            f"worker-{generator.randint(1, 16)} id={number} {words}\n"
        )
        lines.append(line)
        written += len(line)
        number += 1
    return "".join(lines).encode()[:size]


def write_small_files(
    generator: Random, root: Path, count: int, largest: int, per_directory: int
) -> int:
    """``count`` files of 1 KiB to ``largest`` bytes, half random, half text, in groups
    of five directories of ``per_directory`` files below ``root``; bytes written."""
    written = 0
    for index in range(count):
        directory = (
            root
            / f"group-{index // (5 * per_directory):02d}"
            / f"batch-{index // per_directory % 5}"
        )
        if index % per_directory == 0:
            directory.mkdir(parents=True, exist_ok=True)
        size = generator.randint(KIBIBYTE, largest)
        if index % 2:
            content = generator.randbytes(size)
            path = directory / f"blob-{index:05d}.bin"
        else:
            content = text_bytes(generator, size, first_line=index * 1000)
            path = directory / f"note-{index:05d}.txt"
        path.write_bytes(content)
        written += size
    return written


def write_large_files(
    paths: list[Path], size: int, make_chunk: Callable[[int, int], bytes]
) -> None:
    """Write the same ``size`` bytes to every one of ``paths``, in chunks of at most
    4 MiB made by ``make_chunk(chunk size, offset)``: each chunk is made once, so a
    seeded generator gives the same bytes whatever the number of paths."""
    streams = [path.open("wb") for path in paths]
    try:
        offset = 0
        while offset < size:
            chunk = make_chunk(min(4 * MEBIBYTE, size - offset), offset)
            for stream in streams:
                stream.write(chunk)
            offset += len(chunk)
    finally:
        for stream in streams:
            stream.close()


@dataclass
class DataSet:
    """What ``write_data_set`` wrote: counts and sizes by kind (``reused``: a data set
    of the same parameters was found already written, and kept)."""

    small_files: int = 0
    small_bytes: int = 0
    incompressible_files: int = 0
    incompressible_bytes: int = 0
    compressible_files: int = 0
    compressible_bytes: int = 0
    reused: bool = False

    @property
    def files(self) -> int:
        return self.small_files + self.incompressible_files + self.compressible_files

    @property
    def total_bytes(self) -> int:
        return self.small_bytes + self.incompressible_bytes + self.compressible_bytes


LARGE_FILE_COUNT = 4  # of each kind, incompressible and compressible


def write_data_set(
    generator: Random,
    small_root: Path,
    incompressible_root: Path,
    compressible_root: Path,
    size_mb: int,
    small_files: int,
) -> DataSet:
    """About ``size_mb`` MiB made by ``generator``: up to ``small_files`` small files
    (1-16 KiB, half random, half text, at most half of the size) below ``small_root``,
    then the rest in LARGE_FILE_COUNT large random files below ``incompressible_root``
    and as many large text files below ``compressible_root``. The caller makes
    ``small_root`` if it must exist when no small file fits."""
    budget = size_mb * MEBIBYTE
    # Small files get at most half of the budget (their mean size is 8.5 KiB).
    small_files = min(small_files, budget // 2 // (8 * KIBIBYTE + KIBIBYTE // 2))
    data_set = DataSet(small_files=small_files)
    data_set.small_bytes = write_small_files(generator, small_root, small_files, 16 * KIBIBYTE, 50)
    remaining = max(budget - data_set.small_bytes, 0)
    incompressible_size = remaining // 2 // LARGE_FILE_COUNT
    compressible_size = (remaining - remaining // 2) // LARGE_FILE_COUNT
    incompressible_root.mkdir(parents=True, exist_ok=True)
    compressible_root.mkdir(parents=True, exist_ok=True)
    for index in range(LARGE_FILE_COUNT):
        write_large_files(
            [incompressible_root / f"media-{index}.bin"],
            incompressible_size,
            lambda size, _offset: generator.randbytes(size),
        )
        data_set.incompressible_files += 1
        data_set.incompressible_bytes += incompressible_size
        write_large_files(
            [compressible_root / f"journal-{index}.log"],
            compressible_size,
            lambda size, offset: text_bytes(generator, size, first_line=offset // 64),
        )
        data_set.compressible_files += 1
        data_set.compressible_bytes += compressible_size
    return data_set


# -- the machine -----------------------------------------------------------------------


def compile_homesafe() -> str:
    """Byte-compile the homesafe package this interpreter imports; say where it is.

    An installed homesafe has its bytecode (its installer wrote it, as borg's did); a
    checkout installed in editable mode writes it on first import, or never when
    ``PYTHONDONTWRITEBYTECODE`` is set, and then compiles every module it imports again
    on every timed run. ``compileall`` writes only what is missing or stale, so an
    installed homesafe is left as its installer compiled it.
    """
    spec = importlib.util.find_spec("homesafe")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{sys.executable} cannot import homesafe: run this with its venv")
    package = next(iter(spec.submodule_search_locations))
    subprocess.run([sys.executable, "-m", "compileall", "-q", package], check=True)
    return package


def drop_page_cache() -> bool:
    """Write dirty pages out and drop the page cache; False when not allowed."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (all CPUs, steal included)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields)
    busy = user + nice + system + irq + softirq + steal
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def others_cpu_counter() -> Callable[[], float]:
    """Start counting the CPU seconds used outside this process and its waited-for
    children (other processes, kernel threads); the function returned gives those used
    since the call."""
    busy, own = busy_cpu_seconds(), own_cpu_seconds()
    return lambda: busy_cpu_seconds() - busy - (own_cpu_seconds() - own)


def wait_for_quiet(limit: float, exclude_own: bool) -> float:
    """Wait, up to ``limit`` seconds, until the machine is nearly idle (less than
    QUIET_CPUS busy over a sample); returns the seconds waited.

    With ``exclude_own``, the CPU time of this process and its waited-for children is
    not counted (the rest of the machine must be quiet); without it, every process
    counts, a service the benchmark runs itself included.
    """
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if exclude_own:
            others = others_cpu_counter()
            time.sleep(QUIET_SAMPLE_SECONDS)
            used = others()
        else:
            busy = busy_cpu_seconds()
            time.sleep(QUIET_SAMPLE_SECONDS)
            used = busy_cpu_seconds() - busy
        if used < QUIET_CPUS * QUIET_SAMPLE_SECONDS:
            break
    return time.monotonic() - started


def median_wall_clock(argv: list[str], environment: dict[str, str], repeats: int) -> float:
    """The median wall clock of ``repeats`` runs of ``argv`` (which must succeed)."""
    samples = []
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run(argv, env=environment, capture_output=True, check=True)
        samples.append(time.monotonic() - started)
    return statistics.median(samples)


def start_up_references(environment: dict[str, str], repeats: int) -> tuple[float, float]:
    """Medians of ``repeats`` wall clocks, for reference next to a profile: a bare
    interpreter (``python -c pass``, start-up and exit), then a process that imports
    ``homesafe.cli`` and ``homesafe.api``."""
    interpreter = median_wall_clock([sys.executable, "-c", "pass"], environment, repeats)
    import_homesafe = median_wall_clock(
        [sys.executable, "-c", "import homesafe.cli, homesafe.api"], environment, repeats
    )
    return interpreter, import_homesafe


@dataclass
class InstrumentedRun:
    """One instrumented homesafe run of ``--profile``, in seconds: its wall clock, its
    start-up (launch to the first line of the instrumented code), its exit (the last
    line to the end of the process), the imports by label, the command, and the steps
    by label with their number of calls."""

    wall: float
    start_up: float
    exit: float
    imports: dict[str, float]
    command: float
    steps: dict[str, float]
    calls: dict[str, int]


def import_homesafe_timed() -> dict[str, float]:
    """Import ``homesafe.cli``, then ``homesafe.api``, in this process; the seconds of
    each import by label (``--profile`` runs call it before patching homesafe)."""
    imports = {}
    started = time.perf_counter()
    import homesafe.cli

    imports["import homesafe.cli (click, homesafe.cli.*)"] = time.perf_counter() - started
    started = time.perf_counter()
    import homesafe.api  # noqa: F401

    imports["import homesafe.api (pydantic, manifest, engines, ...)"] = (
        time.perf_counter() - started
    )
    return imports


# -- homesafe and raw borg -------------------------------------------------------------


def homesafe_environment(home: Path, config: Path) -> dict[str, str]:
    """This process's environment without borg's variables (homesafe sets its own), with
    ``HOMESAFE_HOME`` and ``HOMESAFE_CONFIG``."""
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("BORG_")
    }
    environment["HOMESAFE_HOME"] = str(home)
    environment["HOMESAFE_CONFIG"] = str(config)
    return environment


def raw_borg_environment(base: Path, passphrase_fd: int) -> dict[str, str]:
    """The environment homesafe gives borg: no passphrase variable but
    ``BORG_PASSPHRASE_FD``, homesafe's BORG_ENVIRONMENT, and ``BORG_BASE_DIR``."""
    environment = {
        name: value for name, value in os.environ.items() if name not in PASSPHRASE_VARIABLES
    }
    environment.update(BORG_ENVIRONMENT)
    environment["BORG_BASE_DIR"] = str(base)
    environment["BORG_PASSPHRASE_FD"] = str(passphrase_fd)
    return environment


@contextmanager
def passphrase_pipe(passphrase: str) -> Iterator[int]:
    """A pipe holding ``passphrase``, as homesafe hands it to borg: yields the read end
    (for ``BORG_PASSPHRASE_FD`` and ``pass_fds``), closed on the way out."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, passphrase.encode())
        os.close(write_end)
        yield read_end
    finally:
        os.close(read_end)


def borg_create_arguments(comment: str, archive: str, paths: list[Path]) -> list[str]:
    """The arguments of the ``borg create`` homesafe runs, for ``archive``
    (``REPOSITORY::NAME``) of ``paths``, with ``comment`` (its braces doubled, as
    homesafe doubles them: borg >= 1.2 expands {placeholders} in comments)."""
    return [
        "create",
        "--json",
        "--log-json",
        "--compression",
        BORG_COMPRESSION,
        "--comment",
        comment.replace("{", "{{").replace("}", "}}"),
        "--",
        archive,
        *map(str, paths),
    ]


def describe_failure(argv: list[str], completed: subprocess.CompletedProcess[bytes]) -> str:
    """The command, its exit status and the last 2,000 characters of its output."""
    output = (completed.stdout or b"").decode(errors="replace")[-2000:]
    errors = (completed.stderr or b"").decode(errors="replace")[-2000:]
    return f"{' '.join(argv)} exited with {completed.returncode}\n{output}\n{errors}"


def write_manifest(
    apps_directory: Path,
    app_id: str,
    directories: list[Path],
    title: str = "Benchmark data",
    services: str = "",
) -> Path:
    """Declare an app owning ``directories``, named ``title (app_id)``, ``services``
    (TOML tables) appended; mode 0644 and its directory 0755: homesafe as root checks
    them."""
    apps_directory.mkdir(parents=True, exist_ok=True)
    os.chmod(apps_directory, 0o755)
    listed = ", ".join(json.dumps(str(directory)) for directory in directories)
    path = apps_directory / f"{app_id}.toml"
    path.write_text(
        f'id = "{app_id}"\nname = "{title} ({app_id})"\n\n'
        f"[data]\ndirectories = [{listed}]\n{services}"
    )
    os.chmod(path, 0o644)
    return path


def declare_bench_app(directory: Path, data: Path) -> dict[str, str]:
    """A homesafe configuration below ``directory`` declaring the app ``bench`` owning
    ``data`` (a minimal manifest); the environment that points homesafe at it, with
    ``HOMESAFE_HOME`` at ``directory/home``."""
    config = directory / "config" / "apps.d"
    config.mkdir(parents=True)
    (config / "bench.toml").write_text(f'id = "bench"\n[data]\ndirectories = ["{data}"]\n')
    return {
        **os.environ,
        "HOMESAFE_HOME": str(directory / "home"),
        "HOMESAFE_CONFIG": str(directory / "config"),
    }


# -- file systems on loop devices (root only) ------------------------------------------


def run(*argv: str | os.PathLike[str]) -> str:
    """Run a set-up command; its stdout, or RuntimeError with its stderr."""
    completed = subprocess.run(
        [os.fspath(part) for part in argv], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: {completed.stderr.strip()}")
    return completed.stdout


def mounts_below(directory: Path, device: str) -> list[str]:
    """Mount points below ``directory`` or of ``device``, latest (deepest) first."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        source, mount_point = (part.encode().decode("unicode_escape") for part in line.split()[:2])
        if source == device or mount_point.startswith(f"{directory}/"):
            found.append(mount_point)
    return list(reversed(found))


MKFS = {
    "btrfs": ["mkfs.btrfs", "-q"],
    "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}


@contextmanager
def loop_filesystem(directory: Path, kind: str, size_bytes: int) -> Iterator[Path]:
    """A fresh ``kind`` filesystem on a loop device (a sparse image in ``directory``),
    mounted at ``directory/mnt``, which it yields. Everything mounted below
    ``directory`` is unmounted and the device detached on the way out.

    ext4 is made with a journal, as mkfs makes it and as a server's is: the root file
    system of the machines these figures come from has none, and there each new inode
    is found by stepping over every one freed in the last minute or more (ext4's
    ``recently_deleted``), so that a run pays for what the run before it deleted."""
    directory.mkdir(parents=True, exist_ok=True)
    image = directory / "image"
    run("truncate", "-s", str(size_bytes), image)
    run(*MKFS[kind], image)
    device = run("losetup", "--find", "--show", image).strip()
    try:
        mount_point = directory / "mnt"
        mount_point.mkdir(exist_ok=True)
        run("mount", device, mount_point)
        yield mount_point
    finally:
        for _ in range(3):
            remaining = mounts_below(directory, device)
            if not remaining:
                break
            for mount in remaining:
                if subprocess.run(["umount", mount], check=False).returncode != 0:
                    subprocess.run(["umount", "--lazy", mount], check=False)
        subprocess.run(["losetup", "--detach", device], check=False)
        image.unlink(missing_ok=True)


# -- work directories ------------------------------------------------------------------


@dataclass
class BenchWorkspace:
    """Where one benchmark run keeps its data and homesafe's state."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def homesafe_home(self) -> Path:
        return self.root / "homesafe" / "home"

    @property
    def homesafe_config(self) -> Path:
        return self.root / "homesafe" / "config"

    @property
    def apps_directory(self) -> Path:
        return self.homesafe_config / "apps.d"

    def homesafe_environment(self) -> dict[str, str]:
        return homesafe_environment(self.homesafe_home, self.homesafe_config)


@contextmanager
def work_directory(
    given: Path | None, keep: bool, prefix: str, marker_file: str, description: str
) -> Iterator[Path]:
    """The work directory: a fresh ``/var/tmp/PREFIX*`` unless one is ``given``.

    A given directory must be missing, empty, or one the same benchmark made before (it
    holds ``marker_file``, written with ``description``). It is removed at the end
    unless ``keep``.
    """
    if given is None:
        root = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    else:
        root = given.resolve()
        if root.exists() and any(root.iterdir()) and not (root / marker_file).exists():
            raise SystemExit(f"{root} is not empty and was not made by this benchmark")
        root.mkdir(parents=True, exist_ok=True)
    (root / marker_file).write_text(f"{description}\n")
    try:
        yield root
    finally:
        if keep:
            print(f"Work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


# -- running and reporting -------------------------------------------------------------


def require_command(command: str) -> None:
    """Exit with a message when ``command`` (the homesafe command) cannot be found."""
    if shutil.which(command) is None:
        raise SystemExit(f"cannot find the homesafe command {command!r}")


def log(message: str) -> None:
    """Print a progress line at once (the output may be a pipe)."""
    print(message, flush=True)


def borg_version() -> str:
    completed = subprocess.run(["borg", "--version"], capture_output=True, text=True, check=True)
    return completed.stdout.strip()


def host_description() -> dict[str, Any]:
    """The ``host`` of a results file: Python, borg, CPUs and kernel."""
    return {
        "python": platform.python_version(),
        "borg": borg_version(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write a results file (its directory made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def exit_status(checked: list[dict[str, Any]], check: bool) -> int:
    """1 when ``check`` (``--check``) is asked for and a target was missed, else 0."""
    missed = [target for target in checked if not target["passed"]]
    return 1 if check and missed else 0
