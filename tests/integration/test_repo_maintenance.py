"""Retention and integrity on real borg and restic repositories: `homesafe repo prune`
keeps exactly the archives each engine's rules keep and gives the space back; `homesafe
repo check` finds a real byte flip in a data file and says which archives it hurts."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from homesafe import api, archives, repositories
from homesafe.engines import engine_for
from homesafe.errors import EngineError
from homesafe.repositories import Repository
from tests.conftest import requires_program

pytestmark = [requires_program("borg"), requires_program("restic")]

HOMESAFE = str(Path(sys.executable).parent / "homesafe")
MEBIBYTE = 1024 * 1024


def homesafe(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HOMESAFE, *arguments],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        check=False,
        timeout=300,
    )


def add_local(engine: str, location: Path) -> Repository:
    """`homesafe repo add` a new local repository of ``engine`` and return its record."""
    added = homesafe("repo", "add", engine, str(location), "--engine", engine, "--lock-wait", "5")
    assert added.returncode == 0, added.stderr
    return repositories.get(engine)


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC)


# Newest first. Both engines keep a1 and a3 (days) and a6, a7 (weeks: W09, W08; a1's
# week W10 is the first); months differ: restic counts a1 (March) and a7 (February) for
# the monthly rule too, borg counts an archive for one rule only and so keeps the next
# two months, a9 (January) and a10 (December).
ARCHIVES = {
    "a1": "2024-03-10T18:00:00",
    "a2": "2024-03-10T12:00:00",
    "a3": "2024-03-09T12:00:00",
    "a4": "2024-03-08T12:00:00",
    "a5": "2024-03-04T12:00:00",
    "a6": "2024-03-01T12:00:00",
    "a7": "2024-02-25T12:00:00",
    "a8": "2024-02-15T12:00:00",
    "a9": "2024-01-20T12:00:00",
    "a10": "2023-12-31T12:00:00",
}
KEPT = {
    "borg": ["a1", "a3", "a6", "a7", "a9", "a10"],
    "restic": ["a1", "a3", "a6", "a7"],
}


@pytest.mark.parametrize("engine", ["borg", "restic"])
def test_prune_keeps_exactly_the_expected_archives_and_reclaims_space(
    homesafe_env: Path, tmp_path: Path, engine: str
) -> None:
    repository = add_local(engine, tmp_path / "repository")
    data = tmp_path / "data"
    data.mkdir()
    (data / "small.txt").write_text("kept by every archive\n")
    backend = engine_for(engine)
    for name, moment in reversed(ARCHIVES.items()):
        big = data / "only-in-a8.bin"
        if name == "a8":  # random, so only a8 holds these bytes: pruning it frees them
            big.write_bytes(os.urandom(3 * MEBIBYTE))
        backend.create(
            repository,
            name,
            [str(data)],
            working_directory=tmp_path,
            comment=archives.comment_summary(["data"], None),
            timestamp=at(moment),
        )
        big.unlink(missing_ok=True)
    policy = ["--keep-daily", "2", "--keep-weekly", "2", "--keep-monthly", "2"]

    dry = homesafe("repo", "prune", engine, *policy, "--dry-run", "--json")

    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert sorted(planned["kept"]) == sorted(KEPT[engine])
    assert sorted(planned["removed"]) == sorted(set(ARCHIVES) - set(KEPT[engine]))
    assert planned["reclaimed_bytes"] is None
    assert len(api.list_archives(repository)) == len(ARCHIVES)  # nothing deleted

    pruned = homesafe("repo", "prune", engine, *policy, "--json")

    assert pruned.returncode == 0, pruned.stderr
    report = json.loads(pruned.stdout)
    assert sorted(report["removed"]) == sorted(set(ARCHIVES) - set(KEPT[engine]))
    remaining = [archive.name for archive in api.list_archives(repository)]
    assert sorted(remaining) == sorted(KEPT[engine])
    # a8's 3 MiB of random bytes are gone from storage (borg: compacted; restic: pruned).
    assert report["reclaimed_bytes"] > 2.5 * MEBIBYTE, report


def test_prune_needs_a_rule(homesafe_env: Path, tmp_path: Path) -> None:
    add_local("borg", tmp_path / "repository")

    refused = homesafe("repo", "prune", "borg")

    assert refused.returncode == 2
    assert "--keep-daily" in refused.stderr


def largest_data_file(repository: Path) -> Path:
    files = [path for path in (repository / "data").rglob("*") if path.is_file()]
    return max(files, key=lambda path: path.stat().st_size)


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("engine", ["borg", "restic"])
def test_check_finds_a_flipped_byte_and_names_the_archive(
    homesafe_env: Path, tmp_path: Path, engine: str
) -> None:
    location = tmp_path / "repository"
    repository = add_local(engine, location)
    data = tmp_path / "data"
    data.mkdir()
    (data / "payload.bin").write_bytes(os.urandom(2 * MEBIBYTE))
    engine_for(engine).create(
        repository, "victim", [str(data)], working_directory=tmp_path, comment=""
    )
    clean = homesafe("repo", "check", engine, "--verify-data", "--json")
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["ok"] is True

    flip_byte(largest_data_file(location), MEBIBYTE)
    damaged = homesafe("repo", "check", engine, "--verify-data", "--json")

    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    report = json.loads(damaged.stdout)
    assert report["ok"] is False
    assert report["verified_data"] == "all"
    assert report["problems"]
    assert report["affected_archives"] == ["victim"], report
    text = homesafe("repo", "check", engine, "--verify-data")
    assert "is damaged" in text.stderr
    assert "Affected archives: victim" in text.stderr


def test_check_of_a_sample_reads_that_share_of_restic_data(
    homesafe_env: Path, tmp_path: Path
) -> None:
    location = tmp_path / "repository"
    repository = add_local("restic", location)
    data = tmp_path / "data"
    data.mkdir()
    (data / "payload.bin").write_bytes(os.urandom(2 * MEBIBYTE))
    engine_for("restic").create(
        repository, "one", [str(data)], working_directory=tmp_path, comment=""
    )
    # A structural check reads no data, so it cannot see a flipped data byte...
    flip_byte(largest_data_file(location), MEBIBYTE)
    assert api.check_repository(repository).ok is True

    # ...a sample of all of it does.
    report = api.check_repository(repository, sample_percent=100)

    assert report.ok is False
    assert report.verified_data == "100%"
    assert report.affected_archives == ["one"]


def test_borg_refuses_a_sample_clearly(homesafe_env: Path, tmp_path: Path) -> None:
    add_local("borg", tmp_path / "repository")

    refused = homesafe("repo", "check", "borg", "--sample", "10")

    assert refused.returncode == 1
    assert "borg cannot check a sample" in refused.stderr
    with pytest.raises(EngineError):
        api.check_repository(repositories.get("borg"), sample_percent=10)
