"""Pure argv builders: borg commands, error classification, service handlers."""

from __future__ import annotations

from pathlib import Path

import pytest

from homesafe.consistency.services import (
    ApacheHandler,
    CommandHandler,
    OpenrcHandler,
    RunitHandler,
    SystemdHandler,
    handler_for,
)
from homesafe.engines import borg
from homesafe.errors import (
    ArchiveExistsError,
    ArchiveNotFoundError,
    CommandError,
    EngineError,
    PassphraseError,
    RepositoryExistsError,
    RepositoryLockedError,
    RepositoryNotFoundError,
)
from homesafe.manifest import (
    ApacheService,
    CommandService,
    OpenrcService,
    RunitService,
    SystemdService,
)
from homesafe.repositories import Repository

PASSPHRASE = "correct horse battery staple 42"
ARCHIVE = "host-2024-05-06T07:08:09.123456Z"


@pytest.fixture
def repository(tmp_path: Path) -> Repository:
    passphrase_file = tmp_path / "secrets" / "test.passphrase"
    passphrase_file.parent.mkdir()
    passphrase_file.write_text(PASSPHRASE + "\n")
    return Repository(
        name="test",
        location=str(tmp_path / "repository"),
        passphrase_file=passphrase_file,
        compression="lz4",
    )


def all_argvs(repository: Repository) -> dict[str, list[str]]:
    paths = ["/etc/notes", "/var/lib/notes"]
    return {
        "init": borg.init_argv(repository),
        "create": borg.create_argv(repository, ARCHIVE, paths, "a comment", progress=True),
        "list": borg.list_archives_argv(repository),
        "list_contents": borg.list_contents_argv(repository, ARCHIVE, paths),
        "extract": borg.extract_argv(repository, ARCHIVE, paths, progress=True),
        "delete": borg.delete_argv(repository, [ARCHIVE, "other"]),
        "compact": borg.compact_argv(repository),
        "export_tar": borg.export_tar_argv(repository, ARCHIVE, Path("/tmp/x.tar"), paths),
        "key_export": borg.key_export_argv(repository),
    }


def test_every_borg_argv_is_a_borg_call_with_json_logs(repository: Repository) -> None:
    for name, argv in all_argvs(repository).items():
        assert argv[0] == "borg", name
        assert "--log-json" in argv, name
        assert all(isinstance(part, str) for part in argv), name


def test_no_passphrase_in_any_argv(repository: Repository) -> None:
    assert repository.passphrase() == PASSPHRASE
    for name, argv in all_argvs(repository).items():
        joined = "\0".join(argv)
        assert PASSPHRASE not in joined, name
        assert not any(part.lower().startswith("--pass") for part in argv), name
        assert not any("BORG_PASSPHRASE" in part for part in argv), name


def test_init_argv(repository: Repository) -> None:
    assert borg.init_argv(repository) == [
        "borg",
        "init",
        "--log-json",
        "--encryption",
        "repokey-blake2",
        repository.location,
    ]


def test_create_argv(repository: Repository) -> None:
    argv = borg.create_argv(
        repository, ARCHIVE, ["/etc/notes", "-odd-name"], "nightly", progress=False
    )
    assert argv[:2] == ["borg", "create"]
    assert "--json" in argv
    assert "--progress" not in argv
    assert argv[argv.index("--compression") + 1] == "lz4"
    assert argv[argv.index("--comment") + 1] == "nightly"
    separator = argv.index("--")
    assert argv[separator + 1 :] == [f"{repository.location}::{ARCHIVE}", "/etc/notes", "-odd-name"]
    # Every option comes before the separator.
    assert all(not part.startswith("--") for part in argv[separator + 1 :])


def test_create_argv_with_progress_and_a_comment_that_looks_like_an_option(
    repository: Repository,
) -> None:
    argv = borg.create_argv(repository, ARCHIVE, ["/srv"], "--dry-run", progress=True)
    assert "--progress" in argv[: argv.index("--")]
    assert argv[argv.index("--comment") + 1] == "--dry-run"


def test_list_archives_argv(repository: Repository) -> None:
    argv = borg.list_archives_argv(repository)
    assert argv[:2] == ["borg", "list"]
    assert "--json" in argv
    assert argv[-1] == repository.location
    assert "::" not in argv[-1]


@pytest.mark.parametrize(
    "builder",
    [
        lambda r, p: borg.list_contents_argv(r, ARCHIVE, p),
        lambda r, p: borg.extract_argv(r, ARCHIVE, p, progress=False),
        lambda r, p: borg.export_tar_argv(r, ARCHIVE, Path("/tmp/out.tar"), p),
    ],
    ids=["list_contents", "extract", "export_tar"],
)
def test_separator_precedes_repository_archive(repository: Repository, builder: object) -> None:
    paths = ["etc/notes", "-looks-like-an-option"]
    argv = builder(repository, paths)  # type: ignore[operator]
    separator = argv.index("--")
    assert argv[separator + 1] == f"{repository.location}::{ARCHIVE}"
    assert argv[-2:] == paths
    assert argv.count("--") == 1


def test_extract_argv(repository: Repository) -> None:
    assert borg.extract_argv(repository, ARCHIVE, ["etc"], progress=True) == [
        "borg",
        "extract",
        "--log-json",
        "--progress",
        "--",
        f"{repository.location}::{ARCHIVE}",
        "etc",
    ]


def test_extract_argv_turns_many_paths_and_excludes_into_one_pattern_per_parent(
    repository: Repository,
) -> None:
    """Beyond PATH_PATTERNS_MAX, borg gets one regular expression per parent directory
    (its pattern matching is a Python loop over the patterns), and no path: a last
    pattern excludes what none of them includes."""
    paths = [f"srv/data/d{number:03d}" for number in range(40)] + ["etc/app"]
    excludes = [f"srv/data/e{number:03d}" for number in range(40)]

    argv = borg.extract_argv(repository, ARCHIVE, paths, progress=False, excludes=excludes)

    assert argv[:3] == ["borg", "extract", "--log-json"]
    options = argv[3 : argv.index("--")]
    assert options[0] == "--exclude"
    assert options[1].startswith("re:^srv/data/e")
    assert [pattern[:23] for pattern in options[2:4]] == [
        "--pattern=+re:^etc/app(",
        "--pattern=+re:^srv/data",
    ]
    assert options[4:] == ["--pattern=-re:^"]
    assert argv[argv.index("--") + 1 :] == [f"{repository.location}::{ARCHIVE}"]


def test_extract_argv_names_a_few_paths_and_excludes_one_by_one(repository: Repository) -> None:
    argv = borg.extract_argv(repository, ARCHIVE, ["a/b", "c"], progress=False, excludes=["a/b/c"])
    archive = f"{repository.location}::{ARCHIVE}"
    assert argv[3:] == ["--exclude", "pp:a/b/c", "--", archive, "a/b", "c"]


def test_prefix_regexes_match_exactly_the_paths_and_what_lies_below_them() -> None:
    """Against every path, every proper beginning and every longer name of a path:
    names sharing beginnings, one a beginning of another, and characters that mean
    something in a regular expression."""
    import random
    import re

    generator = random.Random(20261127)
    alphabet = "ab.*+?()[]{}|^$\\ -é\n"
    names = {"".join(generator.choices(alphabet, k=generator.randint(1, 6))) for _ in range(300)}
    names |= {"a", "ab", "abc", "data", "data.old"}
    paths = [f"srv/app/{name}" for name in sorted(names)] + ["var/lib/x", "top"]
    patterns = borg.prefix_regexes(paths)
    assert len(patterns) == 3
    assert all(pattern.startswith("re:") for pattern in patterns)
    compiled = [re.compile(pattern[3:]) for pattern in patterns]

    def matched(path: str) -> bool:
        return any(expression.search(path) for expression in compiled)

    for path in paths:
        assert matched(path), path
        assert matched(path + "/below/it"), path
        assert not matched(path + "z"), path
        for end in range(1, len(path)):
            assert matched(path[:end]) == (path[:end] in paths), path[:end]
    assert not matched("srv/app")
    assert not matched("other/srv/app/a")


def test_list_contents_argv_asks_for_nul_separated_fields(repository: Repository) -> None:
    argv = borg.list_contents_argv(repository, ARCHIVE, [])
    assert argv[argv.index("--format") + 1] == (
        "{type}{NUL}{mode}{NUL}{size}{NUL}{user}{NUL}{group}{NUL}{linktarget}{NUL}{path}{NUL}"
    )
    assert argv[-1] == f"{repository.location}::{ARCHIVE}"
    timed = borg.list_contents_argv(repository, ARCHIVE, [], times=True)
    assert timed[timed.index("--format") + 1].endswith("{path}{NUL}{isomtime}{NUL}{isoctime}{NUL}")


def test_parse_contents_reads_the_times_when_asked_for() -> None:
    output = "d\0drwxr-xr-x\x000\0root\0root\0\0srv/data\0"
    output += "2020-09-13T12:26:40.123457\x002020-09-13T12:26:41.000000\x00"

    [entry] = borg.parse_contents(output, times=True)

    assert (entry.path, entry.mtime, entry.ctime) == (
        "srv/data",
        "2020-09-13T12:26:40.123457",
        "2020-09-13T12:26:41.000000",
    )
    with pytest.raises(EngineError):
        borg.parse_contents(output)  # read as a listing without times


def test_parse_contents_reads_every_field_of_every_entry() -> None:
    output = (
        "d\0drwxr-xr-x\x000\0root\0root\0\0var/lib/notes\0"
        "-\0-rw-r-----\x0012\0notes\0adm\0\0var/lib/notes/a file\twith\nodd names\0"
        "l\0lrwxrwxrwx\x000\0root\0root\0../target\0var/lib/notes/link\0"
    )

    entries = borg.parse_contents(output)

    assert [(e.type, e.path, e.size, e.user, e.group, e.link_target) for e in entries] == [
        ("d", "var/lib/notes", 0, "root", "root", ""),
        ("-", "var/lib/notes/a file\twith\nodd names", 12, "notes", "adm", ""),
        ("l", "var/lib/notes/link", 0, "root", "root", "../target"),
    ]
    assert entries[1].mode == "-rw-r-----"
    assert borg.parse_contents("") == []


def test_parse_contents_refuses_a_truncated_listing() -> None:
    with pytest.raises(EngineError, match="cannot read"):
        borg.parse_contents("d\0drwxr-xr-x\x000\0root\0")


def test_export_tar_argv_puts_the_file_after_the_archive(repository: Repository) -> None:
    argv = borg.export_tar_argv(repository, ARCHIVE, Path("/tmp/out.tar"), [])
    assert argv[-2:] == [f"{repository.location}::{ARCHIVE}", "/tmp/out.tar"]


def test_delete_argv(repository: Repository) -> None:
    argv = borg.delete_argv(repository, [ARCHIVE, "-other"])
    assert argv[:2] == ["borg", "delete"]
    assert argv[argv.index("--") + 1 :] == [repository.location, ARCHIVE, "-other"]


def test_compact_and_key_export_argv(repository: Repository) -> None:
    assert borg.compact_argv(repository) == ["borg", "compact", "--log-json", repository.location]
    assert borg.key_export_argv(repository) == [
        "borg",
        "key",
        "export",
        "--log-json",
        repository.location,
    ]


def test_archive_argument(repository: Repository) -> None:
    assert borg.archive_argument(repository, "a") == f"{repository.location}::a"


# -- comments ------------------------------------------------------------------------


def test_escape_comment_doubles_braces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(borg, "version", lambda: (1, 2, 4))
    assert borg.escape_comment('{"homesafe":1,"apps":["a"]}') == '{{"homesafe":1,"apps":["a"]}}'
    assert borg.escape_comment("{hostname} }{") == "{{hostname}} }}{{"
    assert borg.escape_comment("no braces") == "no braces"


def test_escape_comment_on_a_borg_without_placeholders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(borg, "version", lambda: (1, 1, 18))
    assert borg.escape_comment("{x}") == "{x}"


def test_features_follow_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(borg, "version", lambda: (1, 2, 4))
    assert borg.has_feature("compact")
    assert not borg.has_feature("slashdot_paths")
    monkeypatch.setattr(borg, "version", lambda: (1, 4, 0))
    assert borg.has_feature("slashdot_paths")


# -- classifying borg failures -------------------------------------------------------


def failure(message_ids: set[str], stderr_tail: str = "borg said no") -> CommandError:
    return CommandError(
        "borg failed", argv=["borg"], returncode=2, stderr_tail=stderr_tail, message_ids=message_ids
    )


@pytest.mark.parametrize(
    ("message_id", "error_class"),
    [
        ("Repository.DoesNotExist", RepositoryNotFoundError),
        ("Repository.InvalidRepository", RepositoryNotFoundError),
        ("Repository.AlreadyExists", RepositoryExistsError),
        ("PassphraseWrong", PassphraseError),
        ("PasscommandFailure", PassphraseError),
        ("Archive.DoesNotExist", ArchiveNotFoundError),
        ("Archive.AlreadyExists", ArchiveExistsError),
        ("LockTimeout", RepositoryLockedError),
        ("LockFailed", RepositoryLockedError),
    ],
)
def test_classify_by_message_id(
    repository: Repository, message_id: str, error_class: type[EngineError]
) -> None:
    error = borg.classify(failure({message_id}), repository)
    assert type(error) is error_class
    assert error.message.endswith(": borg said no")


def test_classify_messages_and_hints(repository: Repository) -> None:
    not_found = borg.classify(failure({"Repository.DoesNotExist"}), repository)
    assert not_found.message.startswith(f"no borg repository at {repository.location}")
    assert not_found.hint is not None
    wrong = borg.classify(failure({"PassphraseWrong"}), repository)
    assert wrong.message.startswith("wrong passphrase for repository 'test'")
    assert wrong.hint is not None
    assert "secrets" in wrong.hint
    locked = borg.classify(failure({"LockTimeout"}), repository)
    assert locked.message.startswith("repository 'test' is locked")
    missing_archive = borg.classify(failure({"Archive.DoesNotExist"}), repository)
    assert "archives list" in (missing_archive.hint or "")


def test_classify_unknown_message_id_is_a_plain_engine_error(repository: Repository) -> None:
    error = borg.classify(failure({"SomethingElse"}), repository)
    assert type(error) is EngineError
    assert error.message == "borg failed on repository 'test': borg said no"


def test_classify_without_stderr_uses_the_command_message(repository: Repository) -> None:
    error = borg.classify(failure(set(), stderr_tail=""), repository)
    assert type(error) is EngineError
    assert error.message == "borg failed on repository 'test': borg failed"


def test_classify_falls_back_to_the_text(repository: Repository) -> None:
    passphrase = borg.classify(
        failure(set(), "passphrase supplied in BORG_PASSPHRASE_FD is incorrect."), repository
    )
    assert type(passphrase) is PassphraseError
    missing = borg.classify(failure(set(), "Repository /x does not exist."), repository)
    assert type(missing) is RepositoryNotFoundError


# -- service handlers ----------------------------------------------------------------


def test_systemd_handler_argv() -> None:
    """The commands the systemd handler runs.

    systemd is not PID 1 here (nor in CI), so systemctl cannot actually run: only the
    argv is checked.
    """
    handler = SystemdHandler(SystemdService(name="nginx.service"))
    assert handler.status_argv() == ["systemctl", "is-active", "--quiet", "nginx.service"]
    assert handler.stop_argv() == ["systemctl", "stop", "nginx.service"]
    assert handler.start_argv() == ["systemctl", "start", "nginx.service"]
    assert handler.label == "systemd unit nginx.service"


def test_openrc_handler_argv() -> None:
    """The commands the OpenRC handler runs.

    OpenRC is not the init system here (nor in CI), so rc-service cannot actually run:
    only the argv is checked.
    """
    handler = OpenrcHandler(OpenrcService(type="openrc", name="sshd"))
    assert handler.status_argv() == ["rc-service", "sshd", "status"]
    assert handler.stop_argv() == ["rc-service", "sshd", "stop"]
    assert handler.start_argv() == ["rc-service", "sshd", "start"]
    assert handler.label == "OpenRC service sshd"


def test_runit_handler_argv_and_service_directory() -> None:
    handler = RunitHandler(RunitService(type="runit", name="notes"))
    assert handler.status_argv() == ["sv", "status", "notes"]
    assert handler.stop_argv() == ["sv", "down", "notes"]
    assert handler.start_argv() == ["sv", "up", "notes"]
    assert handler.waiting_argv("start") == ["sv", "-w", "30", "start", "notes"]
    assert handler.environment() is None
    custom = RunitHandler(RunitService(type="runit", name="notes", service_directory="/srv/sv"))
    assert custom.environment() == {"SVDIR": "/srv/sv"}
    assert custom.label == "runit service notes"


@pytest.mark.parametrize(
    ("kind", "query_flag", "enable", "disable"),
    [
        ("site", "-s", "a2ensite", "a2dissite"),
        ("config", "-c", "a2enconf", "a2disconf"),
        ("module", "-m", "a2enmod", "a2dismod"),
    ],
)
def test_apache_handler_argv(kind: str, query_flag: str, enable: str, disable: str) -> None:
    handler = ApacheHandler(ApacheService(type="apache", kind=kind, name="notes"))
    assert handler.status_argv() == ["a2query", query_flag, "notes"]
    assert handler.stop_argv() == [disable, "-q", "notes"]
    assert handler.start_argv() == [enable, "-q", "notes"]
    assert handler.reload_argv() == ["apache2ctl", "graceful"]
    assert handler.label == f"apache {kind} notes"


def test_apache_is_running_reads_the_pid_file(tmp_path: Path) -> None:
    import os

    service = ApacheService(type="apache", kind="site", name="notes")
    pid_file = tmp_path / "apache2.pid"
    assert not ApacheHandler(service, pid_file=str(pid_file)).apache_is_running()
    pid_file.write_text(f"{os.getpid()}\n")
    assert ApacheHandler(service, pid_file=str(pid_file)).apache_is_running()
    pid_file.write_text("garbage")
    assert not ApacheHandler(service, pid_file=str(pid_file)).apache_is_running()


def test_handler_for_each_service_type() -> None:
    command = CommandService(type="command", name="notes", start=["a"], stop=["b"], status=["c"])
    assert type(handler_for(SystemdService(name="x"))) is SystemdHandler
    assert type(handler_for(RunitService(type="runit", name="x"))) is RunitHandler
    assert type(handler_for(OpenrcService(type="openrc", name="x"))) is OpenrcHandler
    assert type(handler_for(ApacheService(type="apache", kind="site", name="x"))) is ApacheHandler
    handler = handler_for(command)
    assert type(handler) is CommandHandler
    assert handler.label == "service notes"


def test_command_handler_runs_the_manifest_commands(tmp_path: Path) -> None:
    flag = tmp_path / "running"
    service = CommandService(
        type="command",
        name="notes",
        start=["touch", str(flag)],
        stop=["rm", "-f", str(flag)],
        status=["test", "-e", str(flag)],
    )
    handler = CommandHandler(service)
    assert not handler.is_running()
    handler.start()
    assert flag.exists()
    assert handler.is_running()
    handler.stop()
    assert not flag.exists()
    assert not handler.is_running()


def test_borg_log_json_progress_records_become_progress_reports() -> None:
    from homesafe.engines.base import Progress

    seen: list[Progress] = []
    borg.create_progress(seen.append)(
        {"type": "archive_progress", "original_size": 5, "path": "srv/a", "finished": False}
    )
    borg.extract_progress(seen.append)(
        {"type": "progress_percent", "current": 1, "total": 4, "info": ["srv/b"]}
    )
    borg.create_progress(seen.append)({"type": "log_message", "message": "not progress"})
    assert [(p.operation, p.current, p.total, p.message) for p in seen] == [
        ("create", 5.0, None, "srv/a"),
        ("extract", 1.0, 4.0, "srv/b"),
    ]
    borg.create_progress(None)({"type": "archive_progress", "original_size": 1})
