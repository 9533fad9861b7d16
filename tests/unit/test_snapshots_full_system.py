"""Pure parts of full-system backup and restore: the borg argv, the patterns left out,
fstab reading, and the result document."""

from __future__ import annotations

from pathlib import Path

import pytest

from homesafe import full
from homesafe.repositories import Repository

ARCHIVE = "host-2024-05-06T07:08:09.123456Z"


@pytest.fixture
def repository(homesafe_env: Path) -> Repository:
    return Repository(name="test", location=str(homesafe_env / "repository"), encryption="none")


def test_create_argv_reads_dot_and_excludes_before_the_archive(repository: Repository) -> None:
    argv = full.create_argv(
        repository, ARCHIVE, "{}", ["pp:.homesafe-snapshots", "sh:tmp/*"], progress=False
    )
    separator = argv.index("--")
    assert argv[:2] == ["borg", "create"]
    assert argv[separator:] == ["--", f"{repository.location}::{ARCHIVE}", "."]
    assert argv[separator - 4 : separator] == [
        "--exclude", "pp:.homesafe-snapshots", "--exclude", "sh:tmp/*",
    ]  # fmt: skip


def test_extract_argv_uses_numeric_ids_and_leaves_the_metadata(repository: Repository) -> None:
    argv = full.extract_argv(repository, ARCHIVE, progress=True)
    assert argv[:2] == ["borg", "extract"]
    assert "--numeric-ids" in argv and "--progress" in argv
    assert argv[argv.index("--exclude") + 1] == "pp:.homesafe"
    assert argv[argv.index("--") :] == ["--", f"{repository.location}::{ARCHIVE}"]


def test_exclude_patterns_leave_out_homesafe_inside_the_subvolume(
    homesafe_env: Path, repository: Repository
) -> None:
    # The subvolume holds HOMESAFE_HOME and the repository: both are left out.
    patterns = full.exclude_patterns(homesafe_env, full.SYSTEM_EXCLUDES, repository)
    assert patterns == [
        "pp:.homesafe-snapshots",
        "pp:home/tmp",
        "pp:repository",
        "sh:dev/*", "sh:proc/*", "sh:sys/*", "sh:run/*", "sh:tmp/*",
    ]  # fmt: skip
    # A subvolume elsewhere: only its snapshots directory, and what was asked.
    elsewhere = homesafe_env / "srv"
    elsewhere.mkdir()
    assert full.exclude_patterns(elsewhere, ["/cache/"], repository) == [
        "pp:.homesafe-snapshots",
        "sh:cache/*",
    ]


def test_fstab_entries_pinning_the_root_subvolume_are_found() -> None:
    fstab = (
        "# / was on /dev/sda2 during installation\n"
        "UUID=abc /     btrfs defaults,subvol=@,compress=zstd 0 0\n"
        "UUID=abc /home btrfs defaults,subvol=@home 0 0\n"
        "#UUID=abc / btrfs subvolid=300 0 0\n"
        "UUID=efi /boot/efi vfat umask=0077 0 1\n"
    )
    assert full.fstab_subvolume_options(fstab) == ["subvol=@"]
    assert full.fstab_subvolume_options("UUID=abc / btrfs subvolid=256 0 0\n") == ["subvolid=256"]
    assert full.fstab_subvolume_options("UUID=abc / btrfs defaults 0 0\n") == []


def test_result_fails_on_errors_only_and_says_it_is_full() -> None:
    result = full.FullSystemResult("backup", "default", ARCHIVE, subvolume="/")
    assert result.status == "ok" and result.exit_code == 0  # no apps, and that is right
    document = result.to_dict()
    assert document["scope"] == "full"
    assert document["apps"] == []
    assert document["full_system"]["subvolume"] == "/"
    from homesafe.api import BackupError

    result.errors.append(BackupError("engine", "*", None, "borg failed"))
    assert result.status == "failed" and result.exit_code == 1
