"""homesafe against the raw engine, per engine and location, in one run.

Targets: borg on a local path, borg over ssh (``borg serve`` behind a real sshd on
127.0.0.1), restic on a local path, restic on S3 (a real SeaweedFS on 127.0.0.1). For
each, on one generated data set:

* **full**: the first backup of the data set into an empty repository (homesafe's
  manifests validated before, untimed, as on any machine it has run on);
* **unchanged**: another backup of the same data;
* **5% changed**: a backup after rewriting 5% of the files (the same files for both);
* **restore**: the latest archive into an empty directory.

The homesafe side is the ``homesafe`` command run as a subprocess (start-up, manifests,
registry, everything around the engine, the engine, exit): ``backup bench --repo NAME``
and ``restore ARCHIVE --repo NAME --target-root DIR``. The raw side is the engine command
homesafe runs, with the same options, into a repository of its own (``borg create
--compression zstd,3``; ``restic backup --compression auto``; ``borg extract``;
``restic restore``); a raw restic repository starts as a copy of homesafe's, just
initialized, so that both derive their key at the same cost (restic calibrates it anew
at each ``init``). The app declares one directory: from 128 MiB on, homesafe's borg
restore shares its entries out between ``borg extract`` calls side by side (over ssh
too, each call of 96 MiB at least; the first also extracts the directory itself, whose
times homesafe sets afterwards from the record: see ``homesafe.restore``), where the
raw side runs one. homesafe's first borg call runs in a borg interpreter started when
homesafe starts (``homesafe.prestart``): the same borg script, argv, environment and
passphrase pipe, started earlier. homesafe opens its restic repository with its own key
(``homesafe.engines.restic_key``: a random password, a key derivation of a millisecond);
the raw side opens its copy with the passphrase, as restic typed by hand does, and pays
restic's calibrated derivation (~0.5 s) each call: that is most of homesafe's lead on
restic. The copy holds homesafe's key too; restic tries it first or not, at a millisecond's
cost either way. Likewise borg runs its self-tests (~0.05 s) in every raw call, and in
homesafe's only in its first call after borg changed and once a day
(``homesafe.engines.borg``, ``BORG_SELFTEST``). Over ssh both sides use homesafe's key
and known_hosts; the raw side leaves the cipher to ssh's default order (chacha20-poly1305
first), as ``borg`` typed by hand does, where homesafe puts AES-GCM first on a CPU with
AES instructions (``homesafe.repositories.ssh_options``). The two sides alternate who goes
first, and each figure is the median of ``--repeats`` runs of the whole sequence (new
repositories each time). Caches are warm; dirty pages are written out (``sync``,
untimed) before each timed command. Beside the ratio of the medians, ``paired`` is the
median of each round's own ratio, the figure judged: the target is homesafe / raw <= 1.05.
Figures also go to ``bench/results/engines.json``.

Everything (data set, repositories, restored copies, homesafe's state, the S3 server's
volumes) is on a fresh ext4 file system with a journal, as a server's would have, made
on a loop device: the root file system of the machines these figures come from is an
ext4 *without* a journal, where a new inode is allocated only after stepping over each
one freed in the last minute or more, every step a lookup. Restores there cost whatever
the run before had deleted: 100 MB that raw ``borg extract`` wrote in 1.9 s on the loop
file system took 2.5, 5.5 and 8.3 s in three runs in a row, each after removing the last
one's copy (up to 8 s of system time, in ext4's ``recently_deleted``).

homesafe's modules are byte-compiled first, as an installed homesafe's are (and as
borg's are): a checkout run with ``PYTHONDONTWRITEBYTECODE`` set would otherwise compile
every module it imports on every timed run (see ``bench/overhead.py``).

    .venv/bin/python bench/engines.py [--size-mb N] [--repeats N] [--targets a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from random import Random

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
# The scripts of bench/ share common.py; loaded by path, this one needs its directory.
sys.path.insert(0, str(ROOT / "bench"))

from common import (  # noqa: E402
    DEFAULT_HOMESAFE,
    MEBIBYTE,
    compile_homesafe,
    declare_bench_app,
    loop_filesystem,
    write_json,
)

from tests.support.s3 import SeaweedS3  # noqa: E402
from tests.support.sshd import Sshd  # noqa: E402

SEED = 20241126
HOMESAFE = DEFAULT_HOMESAFE
TARGETS = ["borg-local", "borg-ssh", "restic-local", "restic-s3"]
S3_BUCKET = "bench"
CASES = ["full", "unchanged", "changed", "restore"]
RESULTS = ROOT / "bench" / "results" / "engines.json"
TARGET_RATIO = 1.05


def make_data(directory: Path, size_mb: int) -> list[Path]:
    """Deterministic: 70% of the bytes in 4-64 KiB files, 30% in a few 8 MiB ones."""
    generator = Random(SEED)
    files = []
    small_budget = int(size_mb * 0.7 * 1024 * 1024)
    index = 0
    while small_budget > 0:
        size = generator.randint(4096, 65536)
        path = directory / f"d{index // 100:03d}" / f"f{index:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        half = size // 2
        path.write_bytes(generator.randbytes(half) + b"text line\n" * (half // 10))
        files.append(path)
        small_budget -= size
        index += 1
    for big in range(max(1, int(size_mb * 0.3) // 8)):
        path = directory / "big" / f"big{big}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(generator.randbytes(8 * 1024 * 1024))
        files.append(path)
    return files


def change_files(files: list[Path], share: float, round_number: int) -> None:
    generator = Random(SEED + round_number)
    for path in generator.sample(files, max(1, int(len(files) * share))):
        data = bytearray(path.read_bytes())
        for _ in range(4):
            data[generator.randrange(len(data))] ^= 0xFF
        path.write_bytes(bytes(data))


def settle() -> None:
    """Write out dirty pages before a timed command (untimed), so that neither side pays
    for the writeback of what the command before it wrote: a restore leaves ~200 MB
    dirty, and a command run while the kernel flushes it took up to twice as long."""
    os.sync()


def timed(argv: list[str], environment: dict[str, str], cwd: Path | None = None) -> float:
    settle()
    started = time.monotonic()
    completed = subprocess.run(
        argv, env=environment, cwd=cwd, capture_output=True, text=True, check=False
    )
    elapsed = time.monotonic() - started
    if completed.returncode not in (0, 1) or (
        completed.returncode == 1 and argv[0] in ("restic", HOMESAFE)
    ):
        raise SystemExit(f"{shlex.join(argv)} failed:\n{completed.stdout}\n{completed.stderr}")
    return elapsed


class Target:
    """One engine x location: a homesafe repository and a raw one side by side."""

    def __init__(self, kind: str, work: Path, data: Path, sshd: Sshd | None, s3: SeaweedS3 | None):
        self.kind = kind
        self.engine = kind.split("-")[0]
        self.work = work
        self.data = data
        self.sshd = sshd
        self.s3 = s3
        self.home = work / "home"
        self.environment = {
            **declare_bench_app(work, data),
            **(s3.environment() if s3 else {}),
        }
        self.passphrase = work / "passphrase"
        self.passphrase.write_text("bench passphrase 0123456789\n")
        self.passphrase.chmod(0o600)
        self.archive = ""
        self.raw_archives = 0

    def location(self, side: str) -> str:
        path = self.work / f"{side}-repository"
        if self.kind.endswith("ssh"):
            assert self.sshd is not None
            return f"ssh://root@127.0.0.1:{self.sshd.port}{path}"
        if self.kind.endswith("s3"):
            assert self.s3 is not None
            return self.s3.location(S3_BUCKET, self.s3_prefix(side))
        return str(path)

    def s3_prefix(self, side: str) -> str:
        return f"{self.work.name}-{side}"

    def set_up(self) -> None:
        os.environ.update({"HOMESAFE_HOME": str(self.home)})
        from homesafe import api, repositories

        if self.kind.endswith("ssh"):
            assert self.sshd is not None
            self.sshd.authorize(repositories.ensure_client_key())
            key_type, key = self.sshd.host_key_line().split()
            repositories.trust_host(
                repositories.parse_location(self.location("homesafe")),
                fingerprint=repositories.HostKey("", key_type, key).fingerprint,
            )
        repository = repositories.Repository(
            name="bench",
            location=self.location("homesafe"),
            engine=self.engine,
            encryption=repositories.DEFAULT_ENCRYPTIONS[self.engine],
            passphrase_file=self.passphrase,
            compression=repositories.DEFAULT_COMPRESSIONS[self.engine],
        )
        if self.s3:
            os.environ.update(self.s3.environment())
        api.initialize_repository(repository)
        repositories.register(repository)
        # The manifests are validated once, untimed, as on any machine where homesafe has
        # run before: a manifest is validated when it changes, not at every backup, and
        # its first validation (0.15 s: pydantic) is no part of a repository's first
        # backup. By the command, so that the cache is keyed as its later runs look.
        subprocess.run([HOMESAFE, "apps", "list"], env=self.environment, check=True,
                       capture_output=True)  # fmt: skip
        self.raw_environment = {
            **self.environment,
            "BORG_BASE_DIR": str(self.work / "raw-borg"),
            "BORG_PASSCOMMAND": f"cat {self.passphrase}",
            "RESTIC_PASSWORD_FILE": str(self.passphrase),
            "RESTIC_CACHE_DIR": str(self.work / "raw-restic-cache"),
        }
        if self.kind.endswith("ssh"):
            self.raw_environment["BORG_RSH"] = shlex.join(
                ["ssh", *repositories.ssh_access_options()]
            )
        if self.engine == "borg":
            self.raw(["borg", "init", "--encryption", "repokey-blake2", self.location("raw")])
        else:
            self.copy_restic_repository()

    def copy_restic_repository(self) -> None:
        """Make the raw restic repository a copy of homesafe's, just initialized (its
        config and key), rather than a ``restic init`` of its own.

        restic calibrates its key derivation at ``init`` (scrypt's ``p``, to take about
        0.5 s on the machine at that moment), so two repositories made a second apart
        differ: on this machine, p = 4 for one and 7 for the next, which made every
        command on the second 0.3 s slower (200 MB unchanged backups: 0.81 s against
        1.12 s, the same command). As a copy, both sides derive the same key at the
        same cost. The copy shares homesafe's repository id; each side has a cache of
        its own."""
        if self.s3 is not None:
            copied = self.s3.copy_objects(
                S3_BUCKET, self.s3_prefix("homesafe"), self.s3_prefix("raw")
            )
            assert copied >= 2, "a restic repository holds a config and a key"
            return
        shutil.copytree(self.location("homesafe"), self.location("raw"))

    def raw(self, argv: list[str], cwd: Path | None = None) -> float:
        return timed(argv, self.raw_environment, cwd)

    def homesafe_backup(self) -> float:
        settle()
        started = time.monotonic()
        completed = subprocess.run(
            [HOMESAFE, "backup", "bench", "--repo", "bench", "--json"],
            env=self.environment, capture_output=True, text=True, check=False,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        if completed.returncode != 0:
            raise SystemExit(f"homesafe backup failed:\n{completed.stdout}\n{completed.stderr}")
        self.archive = json.loads(completed.stdout)["archive"]
        return elapsed

    def raw_backup(self) -> float:
        self.raw_archives += 1
        name = f"raw-{self.raw_archives}"
        if self.engine == "borg":
            return self.raw(
                ["borg", "create", "--json", "--log-json", "--compression", "zstd,3",
                 "--comment", '{{"homesafe":1,"apps":["bench"]}}',  # braces doubled, as homesafe
                 f"{self.location('raw')}::{name}", str(self.data)]
            )  # fmt: skip
        return self.raw(
            ["restic", "backup", "-r", self.location("raw"), "--json", "--compression", "auto",
             "--tag", f"homesafe.name={name}", str(self.data)]
        )  # fmt: skip

    def homesafe_restore(self, target: Path) -> float:
        target.mkdir()
        return timed(
            [HOMESAFE, "restore", self.archive, "--repo", "bench", "--target-root", str(target)],
            self.environment,
        )

    def raw_restore(self, target: Path) -> float:
        target.mkdir()
        name = f"raw-{self.raw_archives}"
        if self.engine == "borg":
            return self.raw(["borg", "extract", f"{self.location('raw')}::{name}"], cwd=target)
        return self.raw(
            ["restic", "restore", "-r", self.location("raw"), "latest", "--tag",
             f"homesafe.name={name}", "--target", str(target)]
        )  # fmt: skip


def run_once(
    kind: str, data: Path, files: list[Path], work: Path, sshd: Sshd | None,
    s3: SeaweedS3 | None, round_number: int,
) -> dict[str, tuple[float, float]]:  # fmt: skip
    target = Target(kind, work, data, sshd, s3)
    target.set_up()
    figures: dict[str, tuple[float, float]] = {}
    homesafe_first = round_number % 2 == 0

    def pair(homesafe: Callable[[], float], raw: Callable[[], float]) -> tuple[float, float]:
        if homesafe_first:
            first = homesafe()
            return first, raw()
        second = raw()
        return homesafe(), second

    figures["full"] = pair(target.homesafe_backup, target.raw_backup)
    figures["unchanged"] = pair(target.homesafe_backup, target.raw_backup)
    change_files(files, 0.05, round_number)
    figures["changed"] = pair(target.homesafe_backup, target.raw_backup)
    figures["restore"] = pair(
        lambda: target.homesafe_restore(work / "restore-homesafe"),
        lambda: target.raw_restore(work / "restore-raw"),
    )
    return figures


def paired_ratio(homesafe_runs: list[float], raw_runs: list[float]) -> float:
    """The median of each round's homesafe / raw: the two sides of a round ran one
    after the other on the same machine state, so a round the machine was slow in
    weighs on both sides of its ratio, where the ratio of the two medians can set one
    side's slow round against the other side's fast one. It is the figure judged
    against the target."""
    return statistics.median(
        homesafe / raw if raw else float("inf")
        for homesafe, raw in zip(homesafe_runs, raw_runs, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--targets", default=",".join(TARGETS))
    arguments = parser.parse_args()
    targets = arguments.targets.split(",")
    compile_homesafe()
    # Room for the data set, and for one round of one target: two repositories and two
    # restored copies of it, each about its size.
    image_bytes = max(4096, arguments.size_mb * 8) * MEBIBYTE
    with (
        tempfile.TemporaryDirectory(prefix="homesafe-bench-engines-") as scratch,
        loop_filesystem(Path(scratch), "ext4", image_bytes) as base,
    ):
        data = base / "data"
        files = make_data(data, arguments.size_mb)
        size = sum(path.stat().st_size for path in files)
        sshd = None
        try:
            if "borg-ssh" in targets:
                sshd = Sshd(base / "sshd")
                sshd.start()
            runs: dict[str, list[dict[str, tuple[float, float]]]] = {kind: [] for kind in targets}
            for round_number in range(arguments.repeats):
                for kind in targets:
                    work = base / f"{kind}-{round_number}"
                    work.mkdir()
                    # A new S3 server each round, with room for both repositories.
                    s3 = (
                        SeaweedS3(work / "weed", capacity_mb=4 * arguments.size_mb + 512)
                        if kind == "restic-s3"
                        else None
                    )
                    try:
                        if s3 is not None:
                            s3.start()
                        runs[kind].append(run_once(kind, data, files, work, sshd, s3, round_number))
                    finally:
                        if s3 is not None:
                            s3.close()
                    shutil.rmtree(work, ignore_errors=True)
        finally:
            if sshd is not None:
                sshd.close()
    table = {}
    print(f"data set: {len(files)} files, {size / 1e6:.0f} MB; median of {arguments.repeats}")
    print(
        f"{'target':<13} {'case':<10} {'homesafe s':>10} {'raw s':>8} {'ratio':>6} {'paired':>6}"
        f"   {'homesafe min-max':>16} {'raw min-max':>13}"
    )
    for kind, rounds in runs.items():
        table[kind] = {}
        for case in CASES:
            homesafe_runs = [run[case][0] for run in rounds]
            raw_runs = [run[case][1] for run in rounds]
            homesafe = statistics.median(homesafe_runs)
            raw = statistics.median(raw_runs)
            ratio = homesafe / raw if raw else float("inf")
            paired = paired_ratio(homesafe_runs, raw_runs)
            table[kind][case] = {
                "homesafe": homesafe,
                "raw": raw,
                "ratio": ratio,
                "paired_ratio": paired,
                "homesafe_runs": homesafe_runs,
                "raw_runs": raw_runs,
            }
            flag = "" if paired <= TARGET_RATIO else "  (over target)"
            spread = (
                f"{min(homesafe_runs):7.2f}-{max(homesafe_runs):<7.2f}"
                f"  {min(raw_runs):6.2f}-{max(raw_runs):<6.2f}"
            )
            figures = f"{homesafe:10.2f} {raw:8.2f} {ratio:6.2f} {paired:6.2f}"
            print(f"{kind:<13} {case:<10} {figures}   {spread}{flag}")
    write_json(
        RESULTS,
        {
            "size_bytes": size,
            "files": len(files),
            "repeats": arguments.repeats,
            "target_ratio": TARGET_RATIO,
            "results": table,
        },
    )


if __name__ == "__main__":
    main()
