"""Archive names and the summary kept in archive comments."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from homesafe import archives
from homesafe.archives import (
    CommentSummary,
    check_name,
    comment_summary,
    default_name,
    parse_comment,
)
from homesafe.errors import ManifestError, UsageError
from homesafe.manifest import Manifest, parse_manifest

UTC = datetime.UTC
MOMENT = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


# -- default names -------------------------------------------------------------------


def test_default_name_format() -> None:
    assert default_name(MOMENT, "server") == "server-2024-05-06T07:08:09.123456Z"


def test_default_names_a_microsecond_apart_differ() -> None:
    later = MOMENT + datetime.timedelta(microseconds=1)
    first, second = default_name(MOMENT, "server"), default_name(later, "server")
    assert first != second
    assert first < second


def test_default_names_sort_in_time_order() -> None:
    moments = [
        datetime.datetime(2023, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime.datetime(2024, 1, 1, tzinfo=UTC),
        datetime.datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime.datetime(2024, 2, 1, 9, tzinfo=UTC),
        datetime.datetime(2024, 10, 1, 10, tzinfo=UTC),
        datetime.datetime(2024, 10, 1, 10, 0, 1, tzinfo=UTC),
    ]
    names = [default_name(moment, "host") for moment in moments]
    assert sorted(names) == names
    assert len(set(names)) == len(names)


def test_default_name_is_in_utc() -> None:
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    local = datetime.datetime(2024, 5, 6, 9, 8, 9, 123456, tzinfo=plus_two)
    assert default_name(local, "server") == default_name(MOMENT, "server")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("my_host.example", "my-host-example"),
        ("web 01", "web-01"),
        ("höst", "h-st"),
        ("plain-Host9", "plain-Host9"),
    ],
)
def test_default_name_sanitises_the_host(host: str, expected: str) -> None:
    name = default_name(MOMENT, host)
    assert name == f"{expected}-2024-05-06T07:08:09.123456Z"
    assert check_name(name) == name


def test_default_name_without_arguments_is_a_valid_name() -> None:
    before = default_name(datetime.datetime.now(UTC), "h")
    name = default_name()
    assert check_name(name) == name
    assert name.endswith("Z")
    stamp = name[-len("2024-05-06T07:08:09.123456Z") :]
    assert stamp >= before[-len(stamp) :]


def test_only_names_read_from_the_clock_are_trusted_unique() -> None:
    assert archives.from_the_clock(default_name())
    assert archives.from_the_clock(archives.scheduled_name())
    # A time the caller gives may be given twice; a name the user gives may exist.
    assert not archives.from_the_clock(default_name(MOMENT, "server"))
    assert not archives.from_the_clock(archives.scheduled_name(MOMENT, "server"))
    assert not archives.from_the_clock("nightly")


# -- checking names ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "9",
        "server-2024-05-06T07:08:09.123456Z",
        "before.upgrade_v2+fix@home:1",
        "x" * 200,
    ],
)
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "-starts-with-dash",
        ".hidden",
        "_under",
        "has space",
        "a/b",
        "repo::archive",
        "x" * 201,
        "ümlaut",
        "tab\there",
        "{hostname}",
        "trailing-newline\n",
    ],
)
def test_check_name_refuses(name: str) -> None:
    with pytest.raises(UsageError) as caught:
        check_name(name)
    assert repr(name) in caught.value.message
    assert caught.value.hint is not None
    assert caught.value.exit_code == 2


# -- comments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("app_ids", "user_comment"),
    [
        (["notes", "wiki"], "before the upgrade"),
        (["notes"], None),
        ([], ""),
        (["db"], 'braces {hostname} and "quotes" and ünïcode'),
    ],
)
def test_comment_round_trip(app_ids: list[str], user_comment: str | None) -> None:
    comment = comment_summary(app_ids, user_comment)
    assert "\n" not in comment
    assert " " not in comment.split('"comment"')[0]  # compact separators
    parsed = parse_comment(comment)
    assert parsed == CommentSummary(True, app_ids, user_comment or "")


def test_comment_summary_is_compact_json() -> None:
    comment = comment_summary(["notes", "wiki"], "hi")
    assert comment == '{"homesafe":1,"apps":["notes","wiki"],"comment":"hi"}'
    assert json.loads(comment)["homesafe"] == archives.METADATA_FORMAT


@pytest.mark.parametrize(
    "comment",
    [
        '{"type":"scheduled","periods":["daily"]}',
        "weekly backup before the upgrade",
        "[1, 2, 3]",
        '"just a json string"',
        "{not json",
    ],
)
def test_foreign_comments_are_kept_as_text(comment: str) -> None:
    assert parse_comment(comment) == CommentSummary(False, [], comment)


def test_empty_comment_is_not_homesafe() -> None:
    assert parse_comment("") == CommentSummary(False, [], "")


def test_odd_homesafe_comment_is_read_safely() -> None:
    assert parse_comment('{"homesafe":1,"apps":"notes"}') == CommentSummary(True, [], "")
    assert parse_comment('{"homesafe":1,"apps":[1,"a"]}') == CommentSummary(True, ["1", "a"], "")


# -- metadata files ------------------------------------------------------------------


def test_metadata_round_trip(tmp_path: Path) -> None:
    metadata = archives.build_metadata(
        archive_name="a", comment=None, apps=[{"id": "notes", "version": 2}]
    )
    assert metadata["format"] == archives.METADATA_FORMAT
    assert metadata["comment"] == ""
    assert metadata["archive"] == "a"
    archives.write_metadata(tmp_path, metadata, {"notes": {"notes.theme": "dark"}})
    assert (tmp_path / ".homesafe" / "archive.json").is_file()
    assert archives.read_metadata(tmp_path) == metadata
    assert archives.read_settings(tmp_path, "notes") == {"notes.theme": "dark"}
    assert archives.read_settings(tmp_path, "wiki") is None
    assert archives.read_metadata(tmp_path / "elsewhere") is None


# -- manifests stored in archives -------------------------------------------------------


def known_manifest() -> Manifest:
    return parse_manifest(
        {"id": "notes", "version": 2, "data": {"directories": ["/var/lib/notes"]}}, "test"
    )


def test_a_stored_manifest_equal_to_a_known_one_is_that_one() -> None:
    known = known_manifest()
    stored = json.loads(json.dumps(known.to_dict()))  # as archive.json holds it

    assert archives.stored_manifest(stored, "archive", [known]) is known


def test_a_stored_manifest_that_differs_is_validated() -> None:
    known = known_manifest()
    newer = {**known.to_dict(), "version": 3}
    broken = {**known.to_dict(), "data": {"directories": ["relative/path"], "files": []}}

    parsed = archives.stored_manifest(newer, "archive", [known])

    assert parsed is not known
    assert parsed.version == 3
    with pytest.raises(ManifestError, match=r"data\.directories"):
        archives.stored_manifest(broken, "archive", [known])


# -- local records of archives written here ------------------------------------------------


def written_metadata(tmp_path: Path, name: str) -> tuple[Path, str]:
    """A staging directory holding what a backup archives as .homesafe/, and its run id."""
    staging = tmp_path / f"staging-{name}"
    metadata = archives.build_metadata(archive_name=name, comment=None, apps=[])
    archives.write_metadata(staging, metadata, {})
    return staging, archives.write_run_marker(staging)


def test_a_record_holds_the_metadata_run_marker_and_sizes(tmp_path: Path) -> None:
    staging, run_id = written_metadata(tmp_path, "a")
    directory = archives.record_directory(tmp_path / "home", "default", "a")
    assert directory is not None
    sizes = {
        "/srv/notes": archives.PathSize(1234, 7),
        "/srv/media": archives.PathSize(9000, 5, {"films": 8000, "poster.png": 1000}),
        "/srv/photos": archives.PathSize(
            7000, 3, {"2024": 7000}, (1_600_000_000_123_456_789, 1_600_000_001_000_000_001)
        ),
    }

    archives.save_record(directory, staging, "/repo", sizes)

    record = archives.load_record(directory, "/repo")
    assert record is not None
    assert record.run_id == run_id and len(run_id) == 32
    assert record.sizes == sizes
    assert archives.read_metadata(record.directory) == archives.read_metadata(staging)
    assert archives.run_markers([f".homesafe/run/{run_id}", ".homesafe/run", "srv"]) == [run_id]
    # Another repository under the same name is not this record's.
    assert archives.load_record(directory, "/elsewhere") is None


def test_records_are_replaced_kept_to_the_newest_and_forgotten(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for number in range(archives.RECORDS_KEPT + 3):
        staging, _ = written_metadata(tmp_path, f"a{number}")
        directory = archives.record_directory(home, "default", f"a{number}")
        assert directory is not None
        archives.save_record(directory, staging, "/repo", {})
    records = home / archives.RECORDS_DIRECTORY / "default"
    assert len(list(records.iterdir())) == archives.RECORDS_KEPT
    newest = archives.record_directory(home, "default", f"a{archives.RECORDS_KEPT + 2}")
    assert newest is not None and newest.is_dir()
    staging, run_id = written_metadata(tmp_path, "again")
    archives.save_record(newest, staging, "/repo", {})
    record = archives.load_record(newest, "/repo")
    assert record is not None and record.run_id == run_id

    archives.forget_records(home, "default", [newest.name])
    assert not newest.exists()
    archives.forget_repository_records(home, "default")
    assert not records.exists()
    assert archives.record_directory(home, "default", "../x") is None


def test_the_size_walk_measures_a_large_directory_child_by_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from homesafe.api import _tree_size

    media = tmp_path / "media"
    (media / "films/old").mkdir(parents=True)
    (media / "films/a.mkv").write_bytes(b"x" * 600)
    (media / "films/old/b.mkv").write_bytes(b"x" * 300)
    (media / "poster.png").write_bytes(b"x" * 100)
    (media / "empty").mkdir()
    (media / "link").symlink_to("poster.png")

    small = _tree_size(str(media))
    monkeypatch.setattr(archives, "SPLIT_DIRECTORY_MIN_BYTES", 1000)
    large = _tree_size(str(media))
    monkeypatch.setattr(archives, "SPLIT_CHILDREN_MAX", 3)
    crowded = _tree_size(str(media))

    assert small == archives.PathSize(1000 + len("poster.png"), 8)
    assert large.children == {"films": 900, "poster.png": 100, "empty": 0, "link": 10}
    assert (large.bytes, large.entries) == (small.bytes, small.entries)
    assert crowded.children is None
    assert _tree_size(str(media / "poster.png")) == archives.PathSize(100, 1)


def test_children_are_shared_out_only_within_the_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    """At least SPLIT_DIRECTORY_MIN_BYTES in all, at most SPLIT_CHILDREN_MAX children,
    their names (and a separator each) at most SPLIT_NAMES_MAX_BYTES."""
    monkeypatch.setattr(archives, "SPLIT_DIRECTORY_MIN_BYTES", 100)
    many = {f"d{number:03d}": 1 for number in range(archives.SPLIT_CHILDREN_MAX)}
    assert archives.splittable_children(many) == many
    assert archives.splittable_children({**many, "one-more": 1}) is None
    assert archives.splittable_children({"a": 99}) is None
    assert archives.splittable_children({}) is None
    # 255 bytes each, and a separator: 128 of them fill SPLIT_NAMES_MAX_BYTES exactly.
    long_names = {"é" * 126 + f"{number:03d}": 100 for number in range(129)}
    assert archives.SPLIT_NAMES_MAX_BYTES == 128 * 256
    assert archives.splittable_children(long_names) is None
    assert archives.splittable_children(dict(list(long_names.items())[:128])) is not None
