"""restore.plan_extractions: which engine calls stage a restore, and which paths each
extracts, planned from sizes as a backup's record gives them (no engine involved); and
restore.join_hard_links, which links again in staging what two calls copied."""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

import pytest

from homesafe import archives, restore
from homesafe.engines.base import ArchiveEntry
from tests.conftest import requires_root
from tests.support.apps import DEFAULT_ACL

MIB = 1024 * 1024


def app_plan(app_id: str, area: restore.StagingArea, sizes: dict[str, int]) -> restore.AppPlan:
    paths = [
        restore.PathPlan(path, Path(path), True, area, expected_bytes=size)
        for path, size in sizes.items()
    ]
    return restore.AppPlan(app_id, paths, [], listed=False)


def calls(extractions: list[restore.Extraction]) -> list[tuple[list[str], int]]:
    return [(extraction.paths, extraction.size // MIB) for extraction in extractions]


def test_paths_are_dealt_out_largest_first_to_the_lightest_call(tmp_path: Path) -> None:
    area = restore.StagingArea(1, tmp_path)
    plans = [
        app_plan(
            "big",
            area,
            {"/srv/big/media": 230 * MIB, "/srv/big/logs": 220 * MIB, "/srv/big/db": 40 * MIB},
        ),
        app_plan("small", area, {"/srv/small": 5 * MIB}),
    ]

    extractions = restore.plan_extractions(plans, concurrency=2, minimum_bytes=64 * MIB)

    assert calls(extractions) == [
        (["srv/big/media", "srv/small"], 235),
        (["srv/big/logs", "srv/big/db"], 260),
    ]
    assert all(extraction.area is area for extraction in extractions)


def test_no_call_is_made_for_less_than_the_minimum(tmp_path: Path) -> None:
    area = restore.StagingArea(1, tmp_path)
    plans = [app_plan("app", area, {"/a": 70 * MIB, "/b": 60 * MIB, "/c": 10 * MIB})]

    extractions = restore.plan_extractions(plans, concurrency=4, minimum_bytes=64 * MIB)

    # 140 MiB make two calls of at least 64 MiB, not three.
    assert calls(extractions) == [(["a"], 70), (["b", "c"], 70)]


def test_one_call_per_area_without_concurrency_or_size(tmp_path: Path) -> None:
    first = restore.StagingArea(1, tmp_path / "one")
    second = restore.StagingArea(2, tmp_path / "two")
    plans = [
        app_plan("app", first, {"/x": 500 * MIB, "/y": 500 * MIB}),
        app_plan("other", second, {"/z": 1 * MIB}),
    ]

    single = restore.plan_extractions(plans, concurrency=1, minimum_bytes=64 * MIB)
    small = restore.plan_extractions(plans, concurrency=4, minimum_bytes=2000 * MIB)

    assert calls(single) == [(["x", "y"], 1000), (["z"], 1)]
    assert calls(small) == calls(single)
    assert [extraction.area for extraction in single] == [first, second]


def test_a_path_inside_another_goes_with_it(tmp_path: Path) -> None:
    area = restore.StagingArea(1, tmp_path)
    plans = [
        app_plan("outer", area, {"/srv/tree": 100 * MIB, "/srv/other": 100 * MIB}),
        app_plan("inner", area, {"/srv/tree/inner": 100 * MIB}),
    ]

    extractions = restore.plan_extractions(plans, concurrency=3, minimum_bytes=1)

    assert calls(extractions) == [(["srv/tree"], 200), (["srv/other"], 100)]


def test_paths_the_archive_lacks_are_not_extracted(tmp_path: Path) -> None:
    area = restore.StagingArea(1, tmp_path)
    plan = app_plan("app", area, {"/kept": 100 * MIB, "/gone": 100 * MIB})
    plan.paths[1].in_archive = False

    extractions = restore.plan_extractions([plan], concurrency=2, minimum_bytes=1)

    assert calls(extractions) == [(["kept"], 100)]


def test_a_large_directory_is_split_into_its_children_and_extracted_last(
    tmp_path: Path,
) -> None:
    area = restore.StagingArea(1, tmp_path)
    plan = app_plan("big", area, {"/srv/big/data": 900 * MIB, "/srv/big/etc": 1 * MIB})
    plan.paths[0].expected_children = {"a": 400 * MIB, "b": 300 * MIB, "c": 200 * MIB}

    extractions = restore.plan_extractions([plan], concurrency=2, minimum_bytes=64 * MIB)

    assert [(call.paths, call.size // MIB, call.excludes, call.last) for call in extractions] == [
        (["srv/big/data/a", "srv/big/etc"], 401, [], False),
        (["srv/big/data/b", "srv/big/data/c"], 500, [], False),
        (["srv/big/data"], 0, ["srv/big/data/a", "srv/big/data/b", "srv/big/data/c"], True),
    ]


@requires_root()
def test_a_directory_with_recorded_times_is_extracted_by_its_first_call_when_settled(
    tmp_path: Path,
) -> None:
    """Its first call extracts it but for the children the other calls extract; no call
    is made last. Without settling, or without recorded times, the last call stays."""
    area = restore.StagingArea(1, tmp_path)
    plan = app_plan("big", area, {"/srv/big/data": 900 * MIB, "/srv/big/etc": 1 * MIB})
    plan.paths[0].expected_children = {"a": 400 * MIB, "b": 300 * MIB, "c": 200 * MIB}
    plan.paths[0].expected_times = (1_600_000_000_123_456_789, 1_600_000_001_000_000_000)

    settled = restore.plan_extractions([plan], 2, 64 * MIB, settle=True)
    unsettled = restore.plan_extractions([plan], 2, 64 * MIB)
    plan.paths[0].expected_times = None
    untimed = restore.plan_extractions([plan], 2, 64 * MIB, settle=True)

    described = [
        (call.paths, call.size // MIB, call.excludes, call.last, call.settled) for call in settled
    ]
    assert described == [
        (["srv/big/etc", "srv/big/data"], 401, ["srv/big/data/b", "srv/big/data/c"], False,
         ["srv/big/data"]),
        (["srv/big/data/b", "srv/big/data/c"], 500, [], False, []),
    ]  # fmt: skip
    for planned in (unsettled, untimed):
        assert [call.last for call in planned] == [False, False, True]
        assert not any(call.settled for call in planned)


def test_a_directory_within_its_share_or_without_concurrency_is_not_split(
    tmp_path: Path,
) -> None:
    area = restore.StagingArea(1, tmp_path)
    plan = app_plan("even", area, {"/one": 500 * MIB, "/two": 500 * MIB})
    plan.paths[0].expected_children = {"a": 250 * MIB, "b": 250 * MIB}

    shared = restore.plan_extractions([plan], concurrency=2, minimum_bytes=64 * MIB)
    alone = restore.plan_extractions([plan], concurrency=1, minimum_bytes=64 * MIB)

    assert calls(shared) == [(["one"], 500), (["two"], 500)]
    assert calls(alone) == [(["one", "two"], 1000)]
    assert not any(call.last or call.excludes for call in [*shared, *alone])


def test_children_come_from_the_listing_when_planned_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archives, "SPLIT_DIRECTORY_MIN_BYTES", 100)
    area = restore.StagingArea(1, tmp_path)
    entries = [
        ArchiveEntry("data", "d", "drwxr-xr-x", 0),
        ArchiveEntry("data/x", "d", "drwxr-xr-x", 0),
        ArchiveEntry("data/x/1", "-", "-rw-r--r--", 300),
        ArchiveEntry("data/x/2", "-", "-rw-r--r--", 300),
        ArchiveEntry("data/y", "-", "-rw-r--r--", 500),
        ArchiveEntry("data/z", "-", "-rw-r--r--", 10),
    ]
    plan = restore.plan([("app", ["/data"])], entries, tmp_path)[0]
    plan.paths[0].area = area

    assert restore.staged_children(plan, plan.paths[0]) == {"x": 600, "y": 500, "z": 10}
    extractions = restore.plan_extractions([plan], concurrency=2, minimum_bytes=1)
    assert [(call.paths, call.excludes, call.last) for call in extractions] == [
        (["data/x"], [], False),
        (["data/y", "data/z"], [], False),
        (["data"], ["data/x", "data/y", "data/z"], True),
    ]
    monkeypatch.setattr(archives, "SPLIT_CHILDREN_MAX", 2)
    assert restore.staged_children(plan, plan.paths[0]) is None


def staged_link(tmp_path: Path) -> tuple[restore.AppPlan, Path]:
    """A plan of paths /one and /two whose staged copies (below the returned ``new``)
    hold two copies of one hard-linked file: two/link links to one/file."""
    entries = [
        ArchiveEntry("one/file", "-", "-rw-r--r--", 5),
        ArchiveEntry("two/link", "-", "hrw-r--r--", 5, link_target="one/file"),
    ]
    area = restore.StagingArea(1, tmp_path, root=tmp_path / "staging")
    new = tmp_path / "staging/new"
    for path in ("one/file", "two/link"):
        (new / path).parent.mkdir(parents=True)
        (new / path).write_text("data\n")
    path_plans = [
        restore.PathPlan(path, tmp_path / path[1:], True, area) for path in ("/one", "/two")
    ]
    return restore.AppPlan("app", path_plans, entries), new


def test_copies_of_hard_links_are_linked_again_keeping_their_directory_times(
    tmp_path: Path,
) -> None:
    plan, new = staged_link(tmp_path)
    os.utime(new / "two", ns=(1_000_000_000, 1_500_000_000_123_456_789))

    assert restore.join_hard_links([plan]) == []

    assert os.path.samefile(new / "one/file", new / "two/link")
    assert sorted(os.listdir(new / "two")) == ["link"]
    assert (new / "two").stat().st_mtime_ns == 1_500_000_000_123_456_789
    assert restore.join_hard_links([plan]) == []  # nothing left to do


@requires_root()
def test_a_link_the_filesystem_refuses_leaves_the_copy_and_warns(tmp_path: Path) -> None:
    plan, new = staged_link(tmp_path)
    # An immutable file cannot be linked to (EPERM).
    subprocess.run(["chattr", "+i", str(new / "one/file")], check=True)
    try:
        warnings = restore.join_hard_links([plan])
    finally:
        subprocess.run(["chattr", "-i", str(new / "one/file")], check=True)

    assert len(warnings) == 1 and "/two/link is restored as a copy of /one/file" in warnings[0]
    assert not os.path.samefile(new / "one/file", new / "two/link")
    assert (new / "two/link").read_text() == "data\n"
    assert sorted(os.listdir(new / "two")) == ["link"]


NANOSECONDS = 1_600_000_000_123_456_789  # 2020-09-13T12:26:40.123456789Z


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # As borg lists it: local time without a zone, rounded to the microsecond.
        (datetime.datetime.fromtimestamp(NANOSECONDS / 1e9).isoformat(), True),
        ("2020-09-13T12:26:40.123457+00:00", True),
        ("2020-09-13T12:26:40.123456789+00:00", True),  # as restic lists it
        ("2020-09-13T12:26:40.123466+00:00", False),  # 10 us later
        ("2020-09-13T12:26:41.123457+00:00", False),
        ("", False),
        ("not a time", False),
    ],
)
def test_a_listed_time_is_compared_to_the_microsecond(text: str, expected: bool) -> None:
    assert restore.same_time(text, NANOSECONDS) is expected


@requires_root()
def test_directory_times_are_kept_only_where_entries_may_be_made_freely(
    tmp_path: Path,
) -> None:
    from homesafe import api

    plain, with_acl, frozen, appended = (tmp_path / name for name in ("a", "b", "c", "d"))
    for directory in (plain, with_acl, frozen, appended):
        directory.mkdir()
    file = tmp_path / "file"
    file.write_text("x\n")
    try:
        os.setxattr(with_acl, "system.posix_acl_default", DEFAULT_ACL)
    except OSError as error:
        pytest.skip(f"no ACLs on this file system: {error}")
    subprocess.run(["chattr", "+i", str(frozen)], check=True)
    subprocess.run(["chattr", "+a", str(appended)], check=True)
    try:
        status = plain.lstat()
        assert api._directory_times(str(plain), status) == (
            status.st_mtime_ns,
            status.st_ctime_ns,
        )
        for refused in (with_acl, frozen, appended, file):
            assert api._directory_times(str(refused), refused.lstat()) is None, refused
    finally:
        subprocess.run(["chattr", "-i", "-a", str(frozen), str(appended)], check=True)
