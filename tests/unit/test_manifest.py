"""Validation of one app manifest: every rule names the file and the dotted field."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from homesafe.errors import ConfigurationError, ManifestError, ManifestProblem
from homesafe.manifest import (
    ApacheService,
    CommandService,
    Manifest,
    PathSection,
    RunitService,
    SystemdService,
    load_manifest_file,
    parse_manifest,
)

# The example of DESIGN.md, copied verbatim.
DESIGN_EXAMPLE = """\
id = "notes"                      # [a-z0-9][a-z0-9_-]*, unique
name = "Notes"
version = 2                       # the app's data format version
depends = ["postgresql"]          # ids of apps restored/backed up before this one
consistency = "auto"              # auto | snapshot | clone | stop | live
settings = ["notes.theme"]        # keys of the settings store saved with the app

[config]
files = ["/etc/notes/notes.toml"]
[data]
directories = ["/var/lib/notes"]
[secrets]
files = ["/etc/notes/secret.key"]

[[services]]                      # stopped in reverse order, restarted in order
type = "command"                  # systemd | runit | openrc | apache | command
name = "notes"
start = ["/usr/local/bin/notesctl", "start"]
stop = ["/usr/local/bin/notesctl", "stop"]
status = ["/usr/local/bin/notesctl", "status"]   # exit 0 = running

[[services]]
type = "apache"
kind = "site"                     # site | config | module
name = "notes"

[hooks]                           # backup_pre, backup_post, restore_pre, restore_post
backup_pre = ["/usr/local/bin/notesctl", "flush"]
restore_post = ["/usr/local/bin/notesctl", "reindex"]
timeout = 60
on_error = "fail"                 # fail | continue

[lockdown]                        # besides homesafe's own lock flag
enter = ["/usr/local/bin/notesctl", "maintenance", "on"]
leave = ["/usr/local/bin/notesctl", "maintenance", "off"]

[setup]                           # used to install a missing app before restore
installed = ["test", "-x", "/usr/local/bin/notesctl"]
install = ["apt-get", "install", "-y", "notes"]
health = ["/usr/local/bin/notesctl", "check"]    # used by restore drills
"""


def write(tmp_path: Path, text: str, name: str = "app.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path: Path, text: str) -> tuple[Path, list[ManifestProblem]]:
    """Load ``text`` as a manifest file that must be invalid; return its problems."""
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as caught:
        load_manifest_file(path)
    return path, caught.value.problems


def single_problem(tmp_path: Path, text: str) -> ManifestProblem:
    path, problems = problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    (problem,) = problems
    assert problem.source == str(path)
    return problem


# -- paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "kind", "value", "message"),
    [
        ("data", "directories", "var/lib/notes", "'var/lib/notes' is not an absolute path"),
        ("config", "files", "notes.toml", "'notes.toml' is not an absolute path"),
        ("data", "directories", "/a/../b", "'/a/../b' is not normalised (expected '/b')"),
        ("secrets", "files", "/a/./b", "'/a/./b' is not normalised (expected '/a/b')"),
        ("data", "directories", "/a/", "'/a/' is not normalised (expected '/a')"),
        ("data", "directories", "/a//b", "'/a//b' is not normalised (expected '/a/b')"),
        ("data", "directories", "/", "'/' itself cannot be an app path"),
        ("data", "directories", "/.homesafe", "/.homesafe is reserved for homesafe"),
        ("secrets", "files", "/.homesafe/archive.json", "/.homesafe is reserved for homesafe"),
    ],
)
def test_bad_path_is_reported_with_file_and_dotted_field(
    tmp_path: Path, section: str, kind: str, value: str, message: str
) -> None:
    problem = single_problem(
        tmp_path,
        f"""
        id = "notes"
        [{section}]
        {kind} = ["/srv/fine", "{value}"]
        """,
    )
    assert problem.field == f"{section}.{kind}.1"
    assert message in problem.message


def test_double_leading_slash_is_not_normalised(tmp_path: Path) -> None:
    problem = single_problem(tmp_path, 'id = "notes"\n[data]\ndirectories = ["//a"]\n')
    assert problem.field == "data.directories.0"
    assert "'//a' is not normalised" in problem.message


def test_double_leading_slash_message_suggests_the_normalised_path(tmp_path: Path) -> None:
    problem = single_problem(tmp_path, 'id = "notes"\n[data]\ndirectories = ["//a"]\n')
    assert "expected '/a'" in problem.message


def test_a_name_that_only_starts_like_the_reserved_directory_is_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, 'id = "notes"\n[data]\ndirectories = ["/.homesafe-old", "/srv/x"]\n')
    assert load_manifest_file(path).owned_paths() == ["/.homesafe-old", "/srv/x"]


# -- unknown keys --------------------------------------------------------------------


def test_unknown_key_at_top_level(tmp_path: Path) -> None:
    problem = single_problem(tmp_path, 'id = "notes"\ncolour = "blue"\n')
    assert (problem.field, problem.message) == ("colour", "unknown key")


def test_unknown_key_in_a_section(tmp_path: Path) -> None:
    problem = single_problem(tmp_path, 'id = "notes"\n[data]\ndirs = ["/srv/notes"]\n')
    assert (problem.field, problem.message) == ("data.dirs", "unknown key")


def test_unknown_key_in_hooks(tmp_path: Path) -> None:
    problem = single_problem(tmp_path, 'id = "notes"\n[hooks]\nbackup_before = ["true"]\n')
    assert (problem.field, problem.message) == ("hooks.backup_before", "unknown key")


def test_unknown_key_in_a_service(tmp_path: Path) -> None:
    problem = single_problem(
        tmp_path,
        """
        id = "notes"
        [[services]]
        type = "systemd"
        name = "nginx"
        [[services]]
        type = "systemd"
        name = "notes"
        restart = "always"
        """,
    )
    assert (problem.field, problem.message) == ("services.1.restart", "unknown key")


def test_unknown_key_named_like_a_service_type_keeps_its_field(tmp_path: Path) -> None:
    problem = single_problem(tmp_path, 'id = "notes"\ncommand = ["true"]\n')
    assert (problem.field, problem.message) == ("command", "unknown key")


# -- id ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["Notes", "-notes", "_notes", "no tes", "notes!", "", "nötes"])
def test_bad_id_pattern(tmp_path: Path, bad_id: str) -> None:
    problem = single_problem(tmp_path, f'id = "{bad_id}"\n')
    assert problem.field == "id"
    assert "[a-z0-9][a-z0-9_-]*" in problem.message


@pytest.mark.parametrize("good_id", ["notes", "0ad", "my_app-2", "a"])
def test_good_ids(tmp_path: Path, good_id: str) -> None:
    assert load_manifest_file(write(tmp_path, f'id = "{good_id}"\n')).id == good_id


def test_missing_id(tmp_path: Path) -> None:
    problem = single_problem(tmp_path, 'name = "Notes"\n')
    assert problem.field == "id"
    assert "required" in problem.message.lower()


def test_id_with_trailing_newline_is_refused() -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest({"id": "notes\n"}, "inline")
    assert [problem.field for problem in caught.value.problems] == ["id"]


@pytest.mark.parametrize(
    "bad_dependency",
    [
        "Postgres",
        "postgres\n",
    ],
)
def test_dependency_must_be_an_app_id(bad_dependency: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest({"id": "notes", "depends": [bad_dependency]}, "inline")
    (problem,) = caught.value.problems
    assert problem.field == "depends"
    assert "is not an app id" in problem.message


# -- commands ------------------------------------------------------------------------

ARGV_PLACES = [
    ("hooks", "backup_pre"),
    ("hooks", "backup_post"),
    ("hooks", "restore_pre"),
    ("hooks", "restore_post"),
    ("setup", "installed"),
    ("setup", "install"),
    ("setup", "health"),
    ("lockdown", "enter"),
    ("lockdown", "leave"),
]


@pytest.mark.parametrize(("section", "key"), ARGV_PLACES)
def test_empty_argv_is_refused(tmp_path: Path, section: str, key: str) -> None:
    problem = single_problem(tmp_path, f'id = "notes"\n[{section}]\n{key} = []\n')
    assert problem.field == f"{section}.{key}"
    assert problem.message == "a command must be a non-empty argv list"


@pytest.mark.parametrize(("section", "key"), ARGV_PLACES)
def test_empty_program_name_is_refused(tmp_path: Path, section: str, key: str) -> None:
    problem = single_problem(tmp_path, f'id = "notes"\n[{section}]\n{key} = ["", "--flag"]\n')
    assert problem.field == f"{section}.{key}"
    assert problem.message == "the program name cannot be empty"


def test_shell_string_is_not_a_command(tmp_path: Path) -> None:
    problem = single_problem(tmp_path, 'id = "notes"\n[hooks]\nbackup_pre = "notesctl flush"\n')
    assert problem.field == "hooks.backup_pre"
    assert "list" in problem.message


@pytest.mark.parametrize("key", ["start", "stop", "status"])
def test_command_service_argv_rules(tmp_path: Path, key: str) -> None:
    commands = {"start": '["a", "start"]', "stop": '["a", "stop"]', "status": '["a", "status"]'}
    commands[key] = "[]"
    lines = "\n".join(f"{name} = {value}" for name, value in commands.items())
    problem = single_problem(
        tmp_path, f'id = "notes"\n[[services]]\ntype = "command"\nname = "n"\n{lines}\n'
    )
    assert problem.field == f"services.0.{key}"
    assert problem.message == "a command must be a non-empty argv list"

    commands[key] = '[""]'
    lines = "\n".join(f"{name} = {value}" for name, value in commands.items())
    problem = single_problem(
        tmp_path, f'id = "notes"\n[[services]]\ntype = "command"\nname = "n"\n{lines}\n'
    )
    assert problem.field == f"services.0.{key}"
    assert problem.message == "the program name cannot be empty"


def test_command_service_needs_all_three_commands(tmp_path: Path) -> None:
    path, problems = problems_of(
        tmp_path, 'id = "notes"\n[[services]]\ntype = "command"\nname = "n"\nstart = ["a"]\n'
    )
    assert {problem.field for problem in problems} == {"services.0.stop", "services.0.status"}
    assert all(problem.source == str(path) for problem in problems)


# -- services ------------------------------------------------------------------------


def test_unknown_service_type(tmp_path: Path) -> None:
    problem = single_problem(
        tmp_path, 'id = "notes"\n[[services]]\ntype = "upstart"\nname = "notes"\n'
    )
    assert problem.field == "services.0"
    assert "'upstart'" in problem.message
    for known in ("systemd", "runit", "openrc", "apache", "command"):
        assert known in problem.message


def test_apache_kind_invalid(tmp_path: Path) -> None:
    problem = single_problem(
        tmp_path, 'id = "notes"\n[[services]]\ntype = "apache"\nkind = "vhost"\nname = "notes"\n'
    )
    assert problem.field == "services.0.kind"
    for kind in ("site", "config", "module"):
        assert f"'{kind}'" in problem.message


def test_service_name_cannot_be_empty(tmp_path: Path) -> None:
    problem = single_problem(tmp_path, 'id = "notes"\nservices = [""]\n')
    assert problem.field == "services.0.name"


def test_plain_string_service_is_a_systemd_unit() -> None:
    manifest = parse_manifest(
        {"id": "notes", "services": ["nginx.service", {"type": "runit", "name": "notes"}]},
        "inline",
    )
    assert manifest.services == [
        SystemdService(type="systemd", name="nginx.service"),
        RunitService(type="runit", name="notes"),
    ]
    assert isinstance(manifest.services[0], SystemdService)


def test_service_table_without_type_is_refused(tmp_path: Path) -> None:
    problem = single_problem(tmp_path, 'id = "notes"\n[[services]]\nname = "notes"\n')
    assert problem.field == "services.0"
    assert "type" in problem.message


# -- overlaps and dependencies -------------------------------------------------------


def test_same_path_twice(tmp_path: Path) -> None:
    problem = single_problem(
        tmp_path,
        """
        id = "notes"
        [config]
        files = ["/etc/notes/notes.toml"]
        [secrets]
        files = ["/etc/notes/notes.toml"]
        """,
    )
    assert problem.message == "/etc/notes/notes.toml is listed twice"


def test_file_inside_a_listed_directory(tmp_path: Path) -> None:
    problem = single_problem(
        tmp_path,
        """
        id = "notes"
        [config]
        files = ["/var/lib/notes/notes.toml"]
        [data]
        directories = ["/var/lib/notes"]
        """,
    )
    assert (
        problem.message
        == "/var/lib/notes/notes.toml lies inside /var/lib/notes, which is listed too"
    )


def test_directory_inside_a_listed_directory_either_order(tmp_path: Path) -> None:
    problem = single_problem(
        tmp_path,
        'id = "notes"\n[data]\ndirectories = ["/srv/notes", "/srv/notes/cache"]\n',
    )
    assert problem.message == "/srv/notes/cache lies inside /srv/notes, which is listed too"


def test_sibling_with_common_prefix_is_no_overlap(tmp_path: Path) -> None:
    path = write(tmp_path, 'id = "notes"\n[data]\ndirectories = ["/srv/notes", "/srv/notes2"]\n')
    assert load_manifest_file(path).owned_paths() == ["/srv/notes", "/srv/notes2"]


def test_overlap_names_the_dotted_field(tmp_path: Path) -> None:
    problem = single_problem(
        tmp_path,
        'id = "notes"\n[config]\nfiles = ["/srv/n/a"]\n[data]\ndirectories = ["/srv/n"]\n',
    )
    assert problem.field.startswith(("config.files", "data.directories"))


def test_self_dependency(tmp_path: Path) -> None:
    problem = single_problem(tmp_path, 'id = "notes"\ndepends = ["postgresql", "notes"]\n')
    assert problem.message == "an app cannot depend on itself"


def test_self_dependency_names_the_depends_field(tmp_path: Path) -> None:
    problem = single_problem(tmp_path, 'id = "notes"\ndepends = ["notes"]\n')
    assert problem.field == "depends"


# -- other fields --------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        '"two"',
        "2.5",
        "[2]",
        "true",
        '"2"',
    ],
)
def test_non_integer_version(tmp_path: Path, value: str) -> None:
    problem = single_problem(tmp_path, f'id = "notes"\nversion = {value}\n')
    assert problem.field == "version"
    assert "integer" in problem.message


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('consistency = "freeze"', "consistency"),
        ('depends = "postgresql"', "depends"),
        ("settings = [1]", "settings.0"),
        ('name = ["Notes"]', "name"),
    ],
)
def test_wrong_value_of_a_top_level_field(tmp_path: Path, line: str, field: str) -> None:
    problem = single_problem(tmp_path, f'id = "notes"\n{line}\n')
    assert problem.field == field


@pytest.mark.parametrize(
    ("line", "field", "fragment"),
    [
        ("timeout = 0", "hooks.timeout", "greater than 0"),
        ("timeout = -5", "hooks.timeout", "greater than 0"),
        ('on_error = "ignore"', "hooks.on_error", "'fail' or 'continue'"),
    ],
)
def test_hook_policy_values(tmp_path: Path, line: str, field: str, fragment: str) -> None:
    problem = single_problem(tmp_path, f'id = "notes"\n[hooks]\n{line}\n')
    assert problem.field == field
    assert fragment in problem.message


def test_invalid_toml(tmp_path: Path) -> None:
    problem = single_problem(tmp_path, 'id = "notes"\n[data\ndirectories = ["/srv"]\n')
    assert problem.field == ""
    assert problem.message.startswith("not valid TOML:")
    assert "line 2" in problem.message


def test_missing_file_is_a_manifest_problem(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ManifestError) as caught:
        load_manifest_file(path)
    (problem,) = caught.value.problems
    assert problem.source == str(path)


# -- several problems ----------------------------------------------------------------


def test_several_problems_in_one_file_are_reported_at_once(tmp_path: Path) -> None:
    path, problems = problems_of(
        tmp_path,
        """
        id = "Notes"
        colour = "blue"
        [data]
        directories = ["/srv/notes/", "relative"]
        [[services]]
        type = "upstart"
        name = "notes"
        [hooks]
        backup_pre = []
        [setup]
        install = [""]
        """,
    )
    fields = [problem.field for problem in problems]
    assert len(fields) == len(problems) == 7
    assert set(fields) == {
        "id",
        "colour",
        "data.directories.0",
        "data.directories.1",
        "services.0",
        "hooks.backup_pre",
        "setup.install",
    }
    assert all(problem.source == str(path) for problem in problems)


def test_manifest_error_message_lists_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, 'id = "notes"\ncolour = 1\n[data]\ndirectories = ["x"]\n')
    with pytest.raises(ManifestError) as caught:
        load_manifest_file(path)
    error = caught.value
    assert isinstance(error, ConfigurationError)
    text = str(error)
    assert text.splitlines()[0] == "2 problems in app manifests:"
    assert f"  {path}: colour: unknown key" in text.splitlines()
    assert f"  {path}: data.directories.0: 'x' is not an absolute path" in text.splitlines()
    assert "homesafe apps check" in text


def test_overlap_is_reported_together_with_field_problems(tmp_path: Path) -> None:
    _, problems = problems_of(
        tmp_path, 'id = "notes"\ncolour = 1\n[data]\ndirectories = ["/srv/n", "/srv/n"]\n'
    )
    messages = [problem.message for problem in problems]
    assert "unknown key" in messages
    assert "/srv/n is listed twice" in messages


def test_overlap_and_self_dependency_are_both_reported(tmp_path: Path) -> None:
    _, problems = problems_of(
        tmp_path, 'id = "notes"\ndepends = ["notes"]\n[data]\ndirectories = ["/n", "/n"]\n'
    )
    messages = " | ".join(problem.message for problem in problems)
    assert "/n is listed twice" in messages
    assert "an app cannot depend on itself" in messages


# -- defaults and accessors ----------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    manifest = load_manifest_file(write(tmp_path, 'id = "notes"\n'))
    assert manifest.consistency == "auto"
    assert manifest.hooks.timeout == 60
    assert manifest.hooks.on_error == "fail"
    assert manifest.version == 0
    assert manifest.depends == []
    assert manifest.services == []
    assert manifest.owned_paths() == []
    assert manifest.display_name == "notes"
    assert manifest.setup.installed is None
    assert manifest.lockdown.enter is None
    assert manifest.hook_command("backup_pre") is None


def test_owned_paths_order_is_config_data_secrets_directories_before_files() -> None:
    manifest = parse_manifest(
        {
            "id": "notes",
            "secrets": {"files": ["/s/f"], "directories": ["/s/d"]},
            "data": {"files": ["/d/f"], "directories": ["/d/d2", "/d/d1"]},
            "config": {"files": ["/c/f"], "directories": ["/c/d"]},
        },
        "inline",
    )
    assert manifest.owned_paths() == ["/c/d", "/c/f", "/d/d2", "/d/d1", "/d/f", "/s/d", "/s/f"]
    assert manifest.directories == ["/c/d", "/d/d2", "/d/d1", "/s/d"]
    assert manifest.files == ["/c/f", "/d/f", "/s/f"]


def test_parse_manifest_accepts_a_manifest_built_in_python() -> None:
    manifest = parse_manifest({"id": "notes"}, "inline")
    assert parse_manifest(manifest, "elsewhere") == manifest


def test_parse_manifest_checks_a_manifest_built_in_python() -> None:
    built = Manifest(id="notes", data=PathSection(directories=["/srv/n", "/srv/n/x"]))
    with pytest.raises(ManifestError) as caught:
        parse_manifest(built, "entry point notes")
    [problem] = caught.value.problems
    assert problem.source == "entry point notes"
    assert problem.field == "data.directories.1"
    assert problem.message == "/srv/n/x lies inside /srv/n, which is listed too"


def test_manifest_is_frozen() -> None:
    manifest = parse_manifest({"id": "notes"}, "inline")
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest.id = "other"  # type: ignore[misc]


def test_design_example_validates(tmp_path: Path) -> None:
    manifest = load_manifest_file(write(tmp_path, DESIGN_EXAMPLE, "notes.toml"))
    assert isinstance(manifest, Manifest)
    assert manifest.id == "notes"
    assert manifest.display_name == "Notes"
    assert manifest.version == 2
    assert manifest.depends == ["postgresql"]
    assert manifest.settings == ["notes.theme"]
    assert manifest.owned_paths() == [
        "/etc/notes/notes.toml",
        "/var/lib/notes",
        "/etc/notes/secret.key",
    ]
    assert manifest.services == [
        CommandService(
            type="command",
            name="notes",
            start=["/usr/local/bin/notesctl", "start"],
            stop=["/usr/local/bin/notesctl", "stop"],
            status=["/usr/local/bin/notesctl", "status"],
        ),
        ApacheService(type="apache", kind="site", name="notes"),
    ]
    assert manifest.hook_command("backup_pre") == ["/usr/local/bin/notesctl", "flush"]
    assert manifest.hook_command("restore_post") == ["/usr/local/bin/notesctl", "reindex"]
    assert manifest.hook_command("backup_post") is None
    assert manifest.hooks.timeout == 60
    assert manifest.lockdown.leave == ["/usr/local/bin/notesctl", "maintenance", "off"]
    assert manifest.setup.installed == ["test", "-x", "/usr/local/bin/notesctl"]
    assert manifest.setup.health == ["/usr/local/bin/notesctl", "check"]
