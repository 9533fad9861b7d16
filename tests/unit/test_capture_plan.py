"""Choosing capture strategies, dependency groups, and the argv that reads a view.

Filesystem facts come from the real mount table: the temp directory is on the
machine's own filesystem (ext4 here: neither snapshots nor reflinks); btrfs and XFS are
exercised by tests/integration/test_capture.py on loop devices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from homesafe.apps import App, dependency_groups, dependency_order
from homesafe.consistency import capture, snapshots, view
from homesafe.engines import borg, restic
from homesafe.engines.base import ReadView
from homesafe.manifest import parse_manifest
from homesafe.repositories import Repository

COMMAND_SERVICE = {
    "type": "command", "name": "x", "start": ["true"], "stop": ["true"], "status": ["true"],
}  # fmt: skip


def manifest(app_id: str = "notes", **fields: Any) -> Any:
    return parse_manifest({"id": app_id, **fields}, f"{app_id}.toml")


def app(app_id: str, *depends: str) -> App:
    return App(manifest(app_id, depends=list(depends)), f"{app_id}.toml")


def plain_filesystem(tmp_path: Path) -> str:
    kind = snapshots.filesystem_type(tmp_path)
    if kind in capture.REFLINK_FILESYSTEMS:
        pytest.skip(f"the temp directory is on {kind}: these cases need one without reflinks")
    return kind


def test_an_app_with_nothing_to_hold_still_is_read_live_under_auto(tmp_path: Path) -> None:
    plan = capture.plan_app("notes", manifest(), [str(tmp_path)], views=True)
    assert (plan.strategy, plan.problem, plan.notes) == ("live", None, [])
    assert [entry.method for entry in plan.paths] == ["live"]


def test_auto_stages_a_copy_on_a_filesystem_without_snapshots_or_reflinks(
    tmp_path: Path,
) -> None:
    plain_filesystem(tmp_path)
    with_service = manifest(services=[COMMAND_SERVICE])
    plan = capture.plan_app("notes", with_service, [str(tmp_path)], views=True)
    assert plan.strategy == "staged"
    assert not plan.holds_still_for_the_run


def test_a_lockdown_command_alone_is_something_to_hold_still(tmp_path: Path) -> None:
    plain_filesystem(tmp_path)
    locked = manifest(lockdown={"enter": ["true"], "leave": ["true"]})
    assert capture.plan_app("notes", locked, [str(tmp_path)], views=True).strategy == "staged"


def test_without_views_every_app_that_needs_holding_still_stops_for_the_run(
    tmp_path: Path,
) -> None:
    plan = capture.plan_app(
        "notes", manifest(services=[COMMAND_SERVICE]), [str(tmp_path)], views=False
    )
    assert plan.strategy == "stop" and plan.holds_still_for_the_run
    assert "needs a private mount namespace" in plan.notes[0]
    asked = capture.plan_app(
        "notes", manifest(services=[COMMAND_SERVICE]), [str(tmp_path)], "stop", views=False
    )
    assert (asked.strategy, asked.notes) == ("stop", [])  # asked for: nothing to explain


def test_an_impossible_request_is_a_problem_named_with_the_filesystem(tmp_path: Path) -> None:
    kind = plain_filesystem(tmp_path)
    for wanted in ("snapshot", "clone"):
        plan = capture.plan_app("notes", manifest(consistency=wanted), [str(tmp_path)], views=True)
        assert plan.problem is not None
        assert f"consistency = {wanted} is impossible" in plan.problem
        assert kind in plan.problem and str(tmp_path) in plan.problem


def test_the_command_line_overrides_the_manifest(tmp_path: Path) -> None:
    plain_filesystem(tmp_path)
    declared_live = manifest(consistency="live", services=[COMMAND_SERVICE])
    assert capture.plan_app("n", declared_live, [str(tmp_path)], views=True).strategy == "live"
    plan = capture.plan_app("n", declared_live, [str(tmp_path)], "stop", views=True)
    assert plan.strategy == "staged"


def test_symlinks_are_read_as_they_are(tmp_path: Path) -> None:
    plain_filesystem(tmp_path)
    link = tmp_path / "link"
    link.symlink_to("elsewhere")
    data = tmp_path / "data"
    data.mkdir()
    plan = capture.plan_app(
        "n", manifest(services=[COMMAND_SERVICE]), [str(link), str(data)], views=True
    )
    assert [(entry.path, entry.method) for entry in plan.paths] == [
        (str(link), "live"),
        (str(data), "staged"),
    ]
    assert plan.strategy == "staged"


def test_dependency_groups_link_apps_either_way_and_keep_dependency_order() -> None:
    apps = dependency_order(
        [app("site", "database"), app("database"), app("mail"), app("search", "site")]
    )
    groups = dependency_groups(apps)
    assert [[member.id for member in group] for group in groups] == [
        ["database", "site", "search"],
        ["mail"],
    ]
    assert dependency_groups([]) == []


def test_two_dependents_of_one_app_are_one_group() -> None:
    apps = dependency_order([app("a", "base"), app("b", "base"), app("base"), app("c")])
    assert [[member.id for member in group] for group in dependency_groups(apps)] == [
        ["base", "a", "b"],
        ["c"],
    ]


def test_the_view_wrapper_is_an_argv_that_ends_where_the_command_begins() -> None:
    argv = view.wrapper_argv([("/snap/notes", "/srv/notes"), ("/copy/file", "/etc/notes.toml")])
    assert argv[:5] == ["unshare", "--mount", "--propagation", "private", "--"]
    assert argv[-7:] == [
        "--bind", "/snap/notes", "/srv/notes",
        "--bind", "/copy/file", "/etc/notes.toml",
        "--",
    ]  # fmt: skip
    assert view.parse_arguments([*argv[8:], "borg", "create"]) == (
        [("/snap/notes", "/srv/notes"), ("/copy/file", "/etc/notes.toml")],
        ["borg", "create"],
    )


@pytest.mark.parametrize(
    "arguments",
    [["--bind", "/a"], ["--bind", "/a", "/b", "borg"], ["--"], []],
)
def test_a_malformed_view_command_line_is_refused_before_anything_is_mounted(
    arguments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert view.main(arguments) == view.EXIT_VIEW_FAILED
    assert capsys.readouterr().err.startswith("homesafe view: ")


def test_engines_leave_out_what_the_view_excludes_and_keep_their_change_rule() -> None:
    repository = Repository(name="r", location="/repository")
    view = ReadView(wrapper=("unshare",), excludes=("/srv/x/.h",))
    argv = borg.create_argv(repository, "a", ["/srv/x"], "", progress=False, view=view)
    assert argv[argv.index("--exclude") + 1] == "pp:/srv/x/.h"
    # Unchanged files are told by borg's default rule (change time, size, inode): a
    # copy's files are read again rather than trusted by modification time alone.
    assert not any(part.startswith("--files-cache") for part in argv)
    restic_repository = Repository(name="r", location="/repository", engine="restic")
    argv = restic.backup_argv(restic_repository, ["/srv/x"], [], view=view)
    assert not {"--ignore-inode", "--ignore-ctime"} & set(argv)
    assert argv[argv.index("--exclude") + 1] == "/srv/x/.h"


def test_auto_snapshots_a_path_on_an_lvm_thin_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem on an LVM thin volume is snapshot, whatever the filesystem. LVM
    cannot run here (no device-mapper in this kernel): the volume lookup is replaced
    by its answer for a thin volume; tests/integration/test_capture.py takes such a
    snapshot with a block-level copy standing in for lvcreate."""
    thin = snapshots.LogicalVolume("vg0", "data", "pool0", "Vwi-aotz--", "/dev/vg0/data")
    held = manifest(services=[COMMAND_SERVICE])
    monkeypatch.setattr(snapshots, "thin_volume_of", lambda path: thin)
    assert capture.plan_app("notes", held, [str(tmp_path)], views=True).strategy == "snapshot"
    monkeypatch.setattr(snapshots, "thin_volume_of", lambda path: None)
    plan = capture.plan_app("notes", held, [str(tmp_path)], "snapshot", views=True)
    assert plan.problem is not None and "LVM thin volume" in plan.problem
