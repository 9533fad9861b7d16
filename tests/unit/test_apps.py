"""Discovery of apps (manifest folder and entry points), rules between apps, ordering."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from homesafe import apps as apps_module
from homesafe.apps import App, dependency_order, load_apps, select
from homesafe.errors import (
    AppNotFoundError,
    DependencyError,
    ManifestError,
    ManifestProblem,
)
from homesafe.manifest import parse_manifest
from tests.conftest import ManifestWriter

as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="manifest ownership and mode are only checked as root"
)
NOBODY = 65534


def make_app(app_id: str, *depends: str, paths: tuple[str, ...] = ()) -> App:
    manifest = parse_manifest(
        {"id": app_id, "depends": list(depends), "data": {"directories": list(paths)}},
        f"{app_id}.toml",
    )
    return App(manifest, f"{app_id}.toml")


def ids(apps: list[App]) -> list[str]:
    return [app.id for app in apps]


def load_problems(directory: Path | None = None) -> list[ManifestProblem]:
    with pytest.raises(ManifestError) as caught:
        load_apps(directory, entry_points=False)
    return caught.value.problems


@pytest.fixture
def apps_directory(homesafe_env: Path) -> Path:
    directory = homesafe_env / "config" / "apps.d"
    directory.chmod(0o755)
    return directory


# -- loading a directory -------------------------------------------------------------


def test_load_apps_reads_every_manifest_of_the_config_directory(
    apps_directory: Path, write_manifest: ManifestWriter
) -> None:
    notes = write_manifest("notes", 'id = "notes"\ndepends = ["db"]\n')
    db = write_manifest("db", 'id = "db"\n[data]\ndirectories = ["/var/lib/db"]\n')
    (apps_directory / "README.txt").write_text("not a manifest")
    found = load_apps(entry_points=False)
    assert sorted(found) == ["db", "notes"]
    assert found["notes"].source == str(notes)
    assert found["db"].source == str(db)
    assert found["db"].manifest.owned_paths() == ["/var/lib/db"]
    assert found["db"].implementation is None
    assert found["db"].python_hook("backup_pre") is None


def test_missing_directory_means_no_apps(tmp_path: Path) -> None:
    assert load_apps(tmp_path / "absent", entry_points=False) == {}


def test_duplicate_ids_across_files(apps_directory: Path, write_manifest: ManifestWriter) -> None:
    first = write_manifest("a-notes", 'id = "notes"\n')
    second = write_manifest("b-notes", 'id = "notes"\n')
    (problem,) = load_problems()
    assert problem.source == str(second)
    assert problem.field == "id"
    assert problem.message == f"'notes' is declared by {first} too"


@pytest.mark.parametrize(
    ("first_paths", "second_paths", "message"),
    [
        (
            'directories = ["/srv/shared"]',
            'directories = ["/srv/shared"]',
            "/srv/shared overlaps /srv/shared",
        ),
        ('directories = ["/srv/a"]', 'files = ["/srv/a/b.conf"]', "/srv/a overlaps /srv/a/b.conf"),
        ('files = ["/srv/a/b.conf"]', 'directories = ["/srv/a"]', "/srv/a/b.conf overlaps /srv/a"),
    ],
    ids=["equal", "second-inside-first", "first-inside-second"],
)
def test_a_path_owned_by_two_apps(
    apps_directory: Path,
    write_manifest: ManifestWriter,
    first_paths: str,
    second_paths: str,
    message: str,
) -> None:
    first = write_manifest("first", f'id = "first"\n[data]\n{first_paths}\n')
    write_manifest("second", f'id = "second"\n[config]\n{second_paths}\n')
    (problem,) = load_problems()
    assert problem.source == str(first)
    assert problem.field in {"data.directories", "data.files"}
    assert problem.message == f"{message} of app 'second'; a path can belong to one app only"


def test_sibling_paths_of_two_apps_do_not_overlap(
    apps_directory: Path, write_manifest: ManifestWriter
) -> None:
    write_manifest("a", 'id = "a"\n[data]\ndirectories = ["/srv/app"]\n')
    write_manifest("b", 'id = "b"\n[data]\ndirectories = ["/srv/app-old"]\n')
    assert sorted(load_apps(entry_points=False)) == ["a", "b"]


def test_unknown_dependency(apps_directory: Path, write_manifest: ManifestWriter) -> None:
    notes = write_manifest("notes", 'id = "notes"\ndepends = ["postgresql"]\n')
    (problem,) = load_problems()
    assert (problem.source, problem.field) == (str(notes), "depends")
    assert problem.message == "unknown app 'postgresql'"


def test_dependency_cycle_is_named(apps_directory: Path, write_manifest: ManifestWriter) -> None:
    write_manifest("a", 'id = "a"\ndepends = ["b"]\n')
    write_manifest("b", 'id = "b"\ndepends = ["c"]\n')
    write_manifest("c", 'id = "c"\ndepends = ["a"]\n')
    (problem,) = load_problems()
    assert problem.field == "depends"
    assert problem.message == "dependency cycle: a -> b -> c -> a"


def test_all_problems_of_several_files_in_one_error(
    apps_directory: Path, write_manifest: ManifestWriter
) -> None:
    bad_field = write_manifest("a", 'id = "a"\ncolour = "red"\n')
    bad_toml = write_manifest("b", 'id = "b\n')
    write_manifest("c", 'id = "dup"\n[data]\ndirectories = ["/srv/c"]\n')
    duplicate = write_manifest("d", 'id = "dup"\n')
    unknown = write_manifest("e", 'id = "e"\ndepends = ["nobody"]\n[data]\nfiles = ["/srv/c/x"]\n')
    with pytest.raises(ManifestError) as caught:
        load_apps(entry_points=False)
    found = {(problem.source, problem.field) for problem in caught.value.problems}
    assert (str(bad_field), "colour") in found
    assert (str(bad_toml), "") in found
    assert (str(duplicate), "id") in found
    assert (str(unknown), "depends") in found
    assert any("overlaps" in problem.message for problem in caught.value.problems)
    assert len(caught.value.problems) == 5
    assert str(caught.value).startswith("5 problems in app manifests:")


# -- permissions (root only) ---------------------------------------------------------


@as_root
@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_group_or_other_writable_manifest_is_refused(
    apps_directory: Path, write_manifest: ManifestWriter, mode: int
) -> None:
    path = write_manifest("notes", 'id = "notes"\n')
    path.chmod(mode)
    (problem,) = load_problems()
    assert problem.source == str(path)
    assert f"mode {mode:o}" in problem.message
    assert f"chmod go-w {path}" in problem.message


@as_root
def test_group_writable_apps_directory_is_refused(
    apps_directory: Path, write_manifest: ManifestWriter
) -> None:
    path = write_manifest("notes", 'id = "notes"\n')
    apps_directory.chmod(0o775)
    (problem,) = load_problems()
    assert problem.source == str(path)
    assert f"chmod go-w {apps_directory}" in problem.message


@as_root
def test_manifest_not_owned_by_root_is_refused_and_others_still_load(
    apps_directory: Path, write_manifest: ManifestWriter
) -> None:
    path = write_manifest("notes", 'id = "notes"\n')
    write_manifest("good", 'id = "good"\ncolour = 1\n')
    os.chown(path, NOBODY, NOBODY)
    problems = load_problems()
    messages = {problem.source: problem.message for problem in problems}
    assert messages[str(path)] == f"{path} is not owned by root; refusing it"
    # The other manifest was still read and validated.
    assert any(problem.field == "colour" for problem in problems)


@as_root
def test_apps_directory_not_owned_by_root_is_refused(
    apps_directory: Path, write_manifest: ManifestWriter
) -> None:
    path = write_manifest("notes", 'id = "notes"\n')
    os.chown(apps_directory, NOBODY, NOBODY)
    (problem,) = load_problems()
    assert problem.source == str(path)
    assert problem.message == f"{apps_directory} is not owned by root; refusing it"


@as_root
def test_root_owned_non_writable_manifest_is_accepted(
    apps_directory: Path, write_manifest: ManifestWriter
) -> None:
    write_manifest("notes", 'id = "notes"\n').chmod(0o600)
    assert list(load_apps(entry_points=False)) == ["notes"]


# -- ordering and selection ----------------------------------------------------------


def test_dependency_order_puts_dependencies_first() -> None:
    apps = [
        make_app("web", "api", "cache"),
        make_app("api", "db"),
        make_app("db"),
        make_app("cache"),
    ]
    ordered = ids(dependency_order(apps))
    assert sorted(ordered) == ["api", "cache", "db", "web"]
    assert ordered.index("db") < ordered.index("api") < ordered.index("web")
    assert ordered.index("cache") < ordered.index("web")


def test_dependency_order_ties_by_id() -> None:
    apps = [make_app("zeta"), make_app("alpha"), make_app("mu"), make_app("beta")]
    assert ids(dependency_order(apps)) == ["alpha", "beta", "mu", "zeta"]


def test_dependency_order_is_independent_of_input_order() -> None:
    apps = [make_app("c", "a"), make_app("b"), make_app("a"), make_app("d", "b")]
    expected = ids(dependency_order(apps))
    assert ids(dependency_order(reversed(apps))) == expected
    assert expected.index("a") < expected.index("c")
    assert expected.index("b") < expected.index("d")


def test_dependency_order_ignores_dependencies_outside_the_selection() -> None:
    apps = [make_app("notes", "postgresql"), make_app("wiki", "postgresql")]
    assert ids(dependency_order(apps)) == ["notes", "wiki"]


def test_dependency_order_cycle_names_only_the_cycle() -> None:
    apps = [make_app("a", "b"), make_app("b", "c"), make_app("c", "b")]
    with pytest.raises(DependencyError) as caught:
        dependency_order(apps)
    assert caught.value.message == "dependency cycle: b -> c -> b"


def test_select_all_when_no_ids() -> None:
    apps = {app.id: app for app in [make_app("b", "a"), make_app("a"), make_app("c")]}
    assert ids(select(apps, None)) == ["a", "b", "c"]
    assert ids(select(apps, [])) == ["a", "b", "c"]


def test_select_named_apps_in_dependency_order_without_duplicates() -> None:
    apps = {
        app.id: app
        for app in [make_app("notes", "db"), make_app("db"), make_app("wiki", "db"), make_app("x")]
    }
    assert ids(select(apps, ["notes", "db", "notes"])) == ["db", "notes"]
    # A dependency that is not selected is not pulled in.
    assert ids(select(apps, ["wiki"])) == ["wiki"]


def test_select_unknown_ids() -> None:
    apps = {app.id: app for app in [make_app("notes"), make_app("db")]}
    with pytest.raises(AppNotFoundError) as caught:
        select(apps, ["notes", "wikii", "mail"])
    error = caught.value
    assert error.message == "unknown apps: wikii, mail"
    assert error.hint == "Known apps: db, notes."
    assert "Known apps: db, notes." in str(error)
    assert error.exit_code == 2


def test_select_one_unknown_id_with_no_apps() -> None:
    with pytest.raises(AppNotFoundError) as caught:
        select({}, ["notes"])
    assert caught.value.message == "unknown app: notes"
    assert caught.value.hint == "Known apps: none."


def test_is_installed_runs_the_setup_command() -> None:
    installed = parse_manifest({"id": "a", "setup": {"installed": ["true"]}}, "a")
    missing = parse_manifest({"id": "b", "setup": {"installed": ["false"]}}, "b")
    nothing = parse_manifest({"id": "c"}, "c")
    assert App(installed, "a").is_installed()
    assert not App(missing, "b").is_installed()
    assert App(nothing, "c").is_installed()


# -- Python apps from entry points ---------------------------------------------------

MODULE_SOURCE = """
calls = []


class FakeApp:
    manifest = {
        "id": "fakeapp",
        "data": {"directories": ["/srv/fakeapp"]},
        "hooks": {"timeout": 5},
    }
    backup_post = "not callable"

    def backup_pre(self, packet):
        calls.append(("backup_pre", packet))
        return "flushed"


class BadApp:
    manifest = {"id": "Bad App", "data": {"directories": ["relative"]}}


app = FakeApp()
bad = BadApp()
nothing = object()
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, homesafe_env: Path) -> Iterator[Any]:
    """A function that installs a fake distribution with entry points on sys.path
    (homesafe's state, where found entry points are cached, in the test's directory)."""
    directory = tmp_path / "site"
    directory.mkdir()
    modules: list[str] = []

    def install(entry_points: dict[str, str], module_source: str = MODULE_SOURCE) -> str:
        module = f"fakeapp_{os.getpid()}_{abs(hash(tmp_path))}"
        modules.append(module)
        (directory / f"{module}.py").write_text(textwrap.dedent(module_source))
        dist_info = directory / "fakeapp-1.0.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeapp\nVersion: 1.0\n")
        lines = [f"{name} = {value.format(module=module)}" for name, value in entry_points.items()]
        (dist_info / "entry_points.txt").write_text("[homesafe.apps]\n" + "\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(directory))
        importlib.invalidate_caches()
        return module

    yield install
    for module in modules:
        sys.modules.pop(module, None)


def test_entry_point_app_is_found_with_its_hooks(site: Any, tmp_path: Path) -> None:
    module = site({"fakeapp": "{module}:app"})
    found = load_apps(tmp_path / "no-manifests")
    assert "fakeapp" in found
    app = found["fakeapp"]
    assert app.source == f"entry point fakeapp ({module}:app)"
    assert app.manifest.owned_paths() == ["/srv/fakeapp"]
    assert app.manifest.hooks.timeout == 5
    assert app.implementation is sys.modules[module].app
    hook = app.python_hook("backup_pre")
    assert hook is not None
    packet = object()
    assert hook(packet) == "flushed"
    assert sys.modules[module].calls == [("backup_pre", packet)]
    # Not callable, not defined, or not a hook name at all: no hook.
    assert app.python_hook("backup_post") is None
    assert app.python_hook("restore_pre") is None
    assert app.python_hook("__init__") is None


def test_entry_point_app_keeps_its_hooks_with_another_manifest(site: Any, tmp_path: Path) -> None:
    site({"fakeapp": "{module}:app"})
    app = load_apps(tmp_path / "none")["fakeapp"]
    other = app.with_manifest(parse_manifest({"id": "fakeapp", "version": 3}, "archive"))
    assert other.manifest.version == 3
    assert other.python_hook("backup_pre") is not None
    assert other.source == app.source


def test_entry_point_app_joins_the_rules_between_apps(
    site: Any, apps_directory: Path, write_manifest: ManifestWriter
) -> None:
    site({"fakeapp": "{module}:app"})
    write_manifest("other", 'id = "other"\n[data]\ndirectories = ["/srv/fakeapp/sub"]\n')
    with pytest.raises(ManifestError) as caught:
        load_apps()
    (problem,) = caught.value.problems
    assert "overlaps" in problem.message


def test_entry_point_with_invalid_manifest_is_reported(site: Any, tmp_path: Path) -> None:
    module = site({"badapp": "{module}:bad"})
    with pytest.raises(ManifestError) as caught:
        load_apps(tmp_path / "none")
    source = f"entry point badapp ({module}:bad)"
    fields = {(problem.source, problem.field) for problem in caught.value.problems}
    assert fields == {(source, "id"), (source, "data.directories.0")}
    assert f"{source}: id:" in str(caught.value)


def test_entry_point_that_fails_to_import_is_reported(site: Any, tmp_path: Path) -> None:
    site(
        {"ghost": "no_such_module_for_homesafe_tests:app", "plain": "{module}:nothing"},
    )
    with pytest.raises(ManifestError) as caught:
        load_apps(tmp_path / "none")
    by_source = {problem.source: problem.message for problem in caught.value.problems}
    ghost = "entry point ghost (no_such_module_for_homesafe_tests:app)"
    assert by_source[ghost].startswith("cannot be loaded: ")
    assert "no_such_module_for_homesafe_tests" in by_source[ghost]
    plain = next(source for source in by_source if source.startswith("entry point plain"))
    assert "manifest" in by_source[plain]
    assert len(caught.value.problems) == 2


def test_entry_point_module_raising_on_import_is_reported(site: Any, tmp_path: Path) -> None:
    site({"boom": "{module}:app"}, module_source="raise RuntimeError('boom at import')\n")
    with pytest.raises(ManifestError) as caught:
        load_apps(tmp_path / "none")
    (problem,) = caught.value.problems
    assert problem.source.startswith("entry point boom (")
    assert problem.message == "cannot be loaded: boom at import"


def test_entry_points_can_be_left_out(site: Any, tmp_path: Path) -> None:
    site({"fakeapp": "{module}:app"})
    assert load_apps(tmp_path / "none", entry_points=False) == {}
    assert apps_module.ENTRY_POINT_GROUP == "homesafe.apps"


def test_entry_points_found_once_are_not_looked_for_again_until_something_is_installed(
    site: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Looking for entry points imports importlib.metadata and reads every installed
    distribution: done once, then again only when a directory of sys.path changed."""
    site({"fakeapp": "{module}:app"})
    assert list(load_apps(tmp_path / "none")) == ["fakeapp"]
    looked = 0
    real = apps_module._installed_entry_points

    def counting() -> list[tuple[str, str]]:
        nonlocal looked
        looked += 1
        return real()

    monkeypatch.setattr(apps_module, "_installed_entry_points", counting)
    assert list(load_apps(tmp_path / "none")) == ["fakeapp"]
    assert list(load_apps(tmp_path / "none")) == ["fakeapp"]
    assert looked == 0
    # Another distribution installed beside it: its directory changed.
    other = tmp_path / "site" / "otherapp-2.0.dist-info"
    other.mkdir()
    (other / "METADATA").write_text("Metadata-Version: 2.1\nName: otherapp\nVersion: 2.0\n")
    (other / "entry_points.txt").write_text(
        "[homesafe.apps]\nghost = no_such_module_for_homesafe_tests:app\n"
    )
    with pytest.raises(ManifestError, match="entry point ghost"):
        load_apps(tmp_path / "none")
    assert looked == 1


def test_a_backup_without_app_entry_points_does_not_import_importlib_metadata(
    homesafe_env: Path,
) -> None:
    """Once the cache knows there are none, loading the apps imports nothing of
    importlib.metadata (some 10-20 ms of start-up)."""
    program = (
        "import sys; from homesafe import apps; apps.load_apps(); "
        "print('importlib.metadata' in sys.modules)"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    ]
    assert runs == ["True", "False"]
