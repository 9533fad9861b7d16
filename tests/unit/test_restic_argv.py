"""The restic engine's pure parts: argv builders, tags, names, paths and the retention
and lock arguments of borg, without running anything."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from homesafe import archives
from homesafe.engines import borg, restic
from homesafe.engines.base import RetentionPolicy
from homesafe.errors import CommandError, PassphraseError, RepositoryLockedError
from homesafe.repositories import Repository

PASSPHRASE = "restic passphrase 1234"


@pytest.fixture
def repository(tmp_path: Path) -> Repository:
    file = tmp_path / "passphrase"
    file.write_text(PASSPHRASE + "\n")
    return Repository(
        name="r",
        location=str(tmp_path / "repo"),
        engine="restic",
        encryption="repokey",
        passphrase_file=file,
        compression="auto",
    )


def every_argv(repository: Repository) -> list[list[str]]:
    policy = RetentionPolicy(keep_daily=7, keep_weekly=4, keep_monthly=6)
    return [
        restic.init_argv(repository),
        restic.backup_argv(repository, ["/srv"], ["t"], parent="abc"),
        restic.snapshots_argv(repository),
        restic.ls_argv(repository, "host-2024"),
        restic.restore_argv(repository, "host-2024", ["srv/x"], Path("/tmp/t")),
        restic.forget_argv(repository, ["abc"]),
        restic.forget_policy_argv(repository, policy, dry_run=True),
        restic.prune_argv(repository),
        restic.dump_argv(repository, "host-2024"),
        restic.check_argv(repository, verify_data=True, sample_percent=None),
        restic.stats_argv(repository),
        restic.key_passwd_argv(repository, "/dev/fd/9"),
        restic.unlock_argv(repository),
    ]


def test_every_restic_argv_names_the_repository_and_never_the_passphrase(
    repository: Repository,
) -> None:
    for argv in every_argv(repository):
        assert argv[0] == "restic"
        assert argv[argv.index("-r") + 1] == repository.location
        assert PASSPHRASE not in "\0".join(argv)
        assert not any("password" in part and "=" in part for part in argv)


def test_backup_argv_tags_the_name_and_comment_and_ends_options(repository: Repository) -> None:
    comment = archives.comment_summary(["notes", "wiki"], "before, upgrade")
    tags = restic.archive_tags("host-2024-01-01T00:00:00.000000Z", comment)
    moment = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)

    argv = restic.backup_argv(repository, [".homesafe", "-odd"], tags, timestamp=moment)

    assert argv[argv.index("--") + 1 :] == [".homesafe", "-odd"]
    given = [argv[index + 1] for index, part in enumerate(argv) if part == "--tag"]
    assert given[0] == "homesafe.name=host-2024-01-01T00:00:00.000000Z"
    assert "homesafe.app=notes" in given and "homesafe.app=wiki" in given
    assert not any("," in tag for tag in given)  # restic splits tags at commas
    encoded = restic.tag_value(given, restic.COMMENT_TAG)
    assert encoded is not None and restic.decode_comment(encoded) == comment
    assert argv[argv.index("--time") + 1] == moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def test_archives_are_named_by_tag_or_by_id() -> None:
    assert restic.snapshot_arguments("host-2024") == ["latest", "--tag", "homesafe.name=host-2024"]
    assert restic.snapshot_arguments("1a2b3c4d") == ["1a2b3c4d"]
    tagged = {"short_id": "1a2b3c4d", "tags": ["x", "homesafe.name=n"]}
    assert restic.snapshot_name(tagged) == "n"
    assert restic.snapshot_name({"short_id": "1a2b3c4d", "tags": None}) == "1a2b3c4d"


def test_restore_includes_are_literal_absolute_paths(repository: Repository) -> None:
    argv = restic.restore_argv(repository, "n", ["srv/a[1]/*.txt", ".homesafe"], Path("/t"))
    includes = [argv[index + 1] for index, part in enumerate(argv) if part == "--include"]
    assert includes == [r"/srv/a\[1]/\*.txt", "/.homesafe"]


def test_listings_leave_out_the_parents_restic_adds() -> None:
    stored_member = restic.stored_members(["/srv/app/data", "/tmp/operation-x/.homesafe"])
    assert stored_member("srv/app/data")
    assert stored_member("srv/app/data/file")
    assert stored_member(".homesafe/archive.json")
    assert not stored_member("srv")
    assert not stored_member("srv/app")
    assert not stored_member("tmp")
    assert stored_member("srv/app/database")  # not a parent restic added


def test_json_lines_are_read_whole_or_line_by_line() -> None:
    text = '{"a": 1}\nwarning: not JSON\n[1, 2]\n{"b": [2]}\n'
    assert list(restic._json_lines(text)) == [{"a": 1}, {"b": [2]}]
    # One line that is not JSON after all: the others are still read.
    assert list(restic._json_lines(text + '{"broken\n{"c": 3}\n')) == [
        {"a": 1},
        {"b": [2]},
        {"c": 3},
    ]


def test_sftp_and_s3_locations(tmp_path: Path, homesafe_env: Path) -> None:
    sftp = Repository(name="s", location="sftp://backup@h:2222/srv/restic", engine="restic")
    options = restic.common_options(sftp)
    assert options[:2] == ["-r", "sftp:backup@h:/srv/restic"]
    command = options[options.index("-o") + 1]
    assert command.startswith("sftp.command=ssh -i ")
    assert "StrictHostKeyChecking=yes" in command and "-p 2222 backup@h -s sftp" in command
    s3 = Repository(name="c", location="s3:http://127.0.0.1:8333/b/p", engine="restic")
    assert restic.common_options(s3) == ["-r", "s3:http://127.0.0.1:8333/b/p"]


def test_retention_policy_groups_the_whole_repository(repository: Repository) -> None:
    argv = restic.forget_policy_argv(repository, RetentionPolicy(3, 0, 2), dry_run=False)
    assert argv[argv.index("--group-by") + 1] == ""
    assert argv[argv.index("--keep-daily") + 1] == "3"
    assert argv[argv.index("--keep-monthly") + 1] == "2"
    assert "--keep-weekly" not in argv and "--dry-run" not in argv
    with pytest.raises(ValueError, match="negative"):
        RetentionPolicy(-1)


def test_restic_errors_are_classified_by_their_words(repository: Repository) -> None:
    def failed(text: str) -> CommandError:
        return CommandError("restic failed", stderr_tail=text, returncode=1)

    assert type(restic.classify(failed("Fatal: wrong password or no key found"), repository)) is (
        PassphraseError
    )
    locked = restic.classify(
        failed("unable to create lock in backend: repository is already locked by PID 42 on vm"),
        repository,
    )
    assert type(locked) is RepositoryLockedError
    assert (
        restic.describe_lock(
            "repository is already locked exclusively by PID 42 on vm by root (UID 0, GID 0)\n"
            "lock was created at 2024-01-01 10:00:00 (3s ago)"
        )
        == "pid 42 on vm, user root, since 2024-01-01 10:00:00"
    )


def test_damaged_packs_are_read_from_check_output() -> None:
    want, got = "a" * 64, "b" * 64
    assert restic.damaged_packs([f"Pack ID does not match, want {want}, got {got}"]) == [want]


def test_borg_gets_lock_wait_after_the_subcommand(tmp_path: Path) -> None:
    repository = Repository(name="b", location=str(tmp_path), lock_wait=42)
    assert borg.with_lock_wait(repository, ["borg", "list", "x"]) == [
        "borg", "list", "--lock-wait", "42", "x"
    ]  # fmt: skip
    assert borg.with_lock_wait(repository, ["borg", "key", "export", "x"])[:5] == [
        "borg", "key", "export", "--lock-wait", "42"
    ]  # fmt: skip
    assert borg.with_lock_wait(repository, ["borg", "--version"]) == ["borg", "--version"]
    policy = RetentionPolicy(keep_daily=7, keep_monthly=6)
    argv = borg.prune_argv(repository, policy, dry_run=True)
    assert argv[:2] == ["borg", "prune"] and "--dry-run" in argv and "--list" in argv
    assert argv[argv.index("--keep-daily") + 1] == "7" and "--keep-weekly" not in argv


def test_snapshot_records_keep_the_newest_of_each_path_set(
    repository: Repository, homesafe_env: Path
) -> None:
    assert restic.remembered_snapshots(repository) is None
    metadata = f"/tmp/staging-1/{archives.METADATA_DIRECTORY}"
    restic.remember_listing(
        repository,
        [
            {"id": "a" * 64, "paths": [metadata, "/srv/x", "/srv/y"]},
            {"id": "b" * 64, "paths": ["/srv/x"]},
        ],
    )
    restic.remember_snapshot(repository, "c" * 64, ["/srv/y", "/srv/x"])
    remembered = restic.remembered_snapshots(repository)
    # The metadata directory's path (new every time) is left out, so "c" replaces "a".
    assert remembered == [
        {"id": "b" * 64, "paths": ["/srv/x"]},
        {"id": "c" * 64, "paths": ["/srv/x", "/srv/y"]},
    ]
    assert restic.choose_parent(remembered, ["/srv/x"]) == "c" * 64
    assert restic.choose_parent(remembered, ["/srv/z"]) is None
    restic.forget_remembered(repository, ["c" * 64])
    assert restic.choose_parent(restic.remembered_snapshots(repository) or [], ["/srv/x"]) == (
        "b" * 64
    )


def test_snapshot_records_are_of_one_location_only(
    repository: Repository, homesafe_env: Path
) -> None:
    restic.remember_listing(repository, [])
    assert restic.remembered_snapshots(repository) == []
    moved = Repository(
        name=repository.name,
        location=repository.location + "-elsewhere",
        engine="restic",
        encryption="repokey",
        passphrase_file=repository.passphrase_file,
        compression="auto",
    )
    assert restic.remembered_snapshots(moved) is None
    # Without a record, a backup's snapshot starts none (it would hide older ones).
    restic.remember_snapshot(moved, "d" * 64, ["/srv/x"])
    assert restic.remembered_snapshots(moved) is None
