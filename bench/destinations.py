"""One backup to several repositories against the slowest of them alone, in one run.

``homesafe backup --repo A --repo B ...`` captures the apps once and writes the archive
to every repository at the same time. On one generated data set (the one of
``bench/engines.py``) this times, each as a whole ``homesafe backup`` subprocess:

* **single**: a first backup into each destination alone (a new repository each);
* **together**: a first backup into all of them at once (new repositories again).

Target: together / slowest single <= 1.2 (one sequential run would take their sum,
printed too). Destinations are ``borg`` (a local borg repository) and ``restic`` (a
local restic repository), repeatable: the default ``borg,borg`` is two local borg
repositories, which on a machine with two cores or more is what the target is about;
each engine process is single-threaded for borg, multi-threaded for restic, so
``borg,restic`` on two cores measures contention as much as homesafe. The order of the
cases alternates between repeats; figures are medians. Caches are warm. Results also
go to ``bench/results/destinations.json``; ``--check`` exits 1 when the target is
missed.

    .venv/bin/python bench/destinations.py [--size-mb N] [--repeats N] [--destinations borg,borg]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from common import DEFAULT_HOMESAFE, declare_bench_app, write_json  # noqa: E402
from engines import make_data  # noqa: E402

HOMESAFE = DEFAULT_HOMESAFE
RESULTS = ROOT / "results" / "destinations.json"
TARGET_RATIO = 1.2
ENCRYPTIONS = {"borg": "repokey-blake2", "restic": "repokey"}


class Workspace:
    """One HOMESAFE_HOME with the app ``bench`` owning the data set."""

    def __init__(self, directory: Path, data: Path) -> None:
        self.directory = directory
        self.environment = declare_bench_app(directory, data)
        self.counter = 0

    def homesafe(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        completed = subprocess.run(
            [HOMESAFE, *arguments],
            env=self.environment, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if completed.returncode != 0:
            raise SystemExit(
                f"homesafe {' '.join(arguments)} failed:\n{completed.stdout}{completed.stderr}"
            )
        return completed

    def new_repository(self, engine: str) -> str:
        """A new local repository of ``engine``, registered; its name."""
        self.counter += 1
        name = f"{engine}{self.counter}"
        self.homesafe(
            "repo", "add", name, str(self.directory / name), "--engine", engine,
            "--encryption", ENCRYPTIONS[engine],
        )  # fmt: skip
        return name

    def backup(self, names: list[str]) -> float:
        """Seconds of one ``homesafe backup`` into ``names``; checks every one got it."""
        arguments = ["backup", "bench", "--json"]
        for name in names:
            arguments += ["--repo", name]
        started = time.monotonic()
        completed = self.homesafe(*arguments)
        elapsed = time.monotonic() - started
        document = json.loads(completed.stdout)
        if len(names) > 1:
            written = [d["repository"] for d in document["destinations"] if d["status"] == "ok"]
            if written != names:
                raise SystemExit(f"not written everywhere: {document['destinations']}")
        return elapsed


def run_once(workspace: Workspace, engines: list[str], round_number: int) -> dict[str, object]:
    def singles() -> list[float]:
        return [workspace.backup([workspace.new_repository(engine)]) for engine in engines]

    def together() -> float:
        return workspace.backup([workspace.new_repository(engine) for engine in engines])

    if round_number % 2 == 0:
        single = singles()
        both = together()
    else:
        both = together()
        single = singles()
    return {"single": single, "together": both}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--destinations", default="borg,borg")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    arguments = parser.parse_args()
    engines = arguments.destinations.split(",")
    if len(engines) < 2 or not set(engines) <= set(ENCRYPTIONS):
        parser.error("--destinations: two or more of borg, restic")
    with tempfile.TemporaryDirectory(prefix="homesafe-bench-destinations-") as scratch:
        base = Path(scratch)
        files = make_data(base / "data", arguments.size_mb)
        size = sum(path.stat().st_size for path in files)
        workspace = Workspace(base / "work", base / "data")
        workspace.backup([workspace.new_repository("borg")])  # warms the page cache
        rounds = [run_once(workspace, engines, number) for number in range(arguments.repeats)]
    singles = [
        statistics.median(run["single"][index] for run in rounds)  # type: ignore[index]
        for index in range(len(engines))
    ]
    together = statistics.median(run["together"] for run in rounds)  # type: ignore[misc]
    slowest = max(singles)
    ratio = together / slowest
    print(f"data set: {len(files)} files, {size / 1e6:.0f} MB; median of {arguments.repeats}")
    for engine, seconds in zip(engines, singles, strict=True):
        print(f"  {engine + ' alone':<24} {seconds:7.2f} s")
    print(f"  {'sum of the single runs':<24} {sum(singles):7.2f} s (one after the other)")
    print(f"  {'all at once':<24} {together:7.2f} s")
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"together / slowest single = {ratio:.2f} (target <= {TARGET_RATIO}: {verdict})")
    write_json(
        RESULTS,
        {
            "size_bytes": size,
            "files": len(files),
            "repeats": arguments.repeats,
            "destinations": engines,
            "single_seconds": singles,
            "together_seconds": together,
            "ratio": ratio,
            "target_ratio": TARGET_RATIO,
            "rounds": rounds,
        },
    )
    return 1 if arguments.check and ratio > TARGET_RATIO else 0


if __name__ == "__main__":
    sys.exit(main())
