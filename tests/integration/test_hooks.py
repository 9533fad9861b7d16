"""Pre/post hooks around real backups and restores: argv and Python hooks, order,
on_error policies, timeouts, and a custom handler in place of borg."""

from __future__ import annotations

import shlex
import threading
import time
from pathlib import Path
from typing import Any

from homesafe import api
from homesafe.apps import App
from homesafe.manifest import parse_manifest
from tests.conftest import DaemonFactory, ManifestWriter, requires_program
from tests.support.apps import (
    archive_paths,
    command_service,
    describe,
    errors_of,
    lockdown_flag,
    lockdown_flags,
    make_tree,
    only,
    process_state,
    sh,
    to_toml,
)

pytestmark = requires_program("borg")

ENVIRONMENT_LINE = 'echo "$HOMESAFE_OPERATION|$HOMESAFE_APP|$HOMESAFE_ROOT|$HOMESAFE_ARCHIVE"'


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def test_argv_hooks_run_at_every_point_with_their_environment_and_output_kept(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    data = make_tree(homesafe_env / "srv/notes", {"note.txt": "original\n"})
    note, dump = data / "note.txt", data / "dump.sql"
    write_manifest(
        "notes",
        to_toml(
            {
                "id": "notes",
                "data": {"directories": [str(data)]},
                "hooks": {
                    # The dump written by backup_pre must be in the archive.
                    "backup_pre": sh(
                        f"{ENVIRONMENT_LINE}; echo dumped > {dump}; echo on-stderr >&2"
                    ),
                    "backup_post": sh(ENVIRONMENT_LINE),
                    "restore_pre": sh(f"{ENVIRONMENT_LINE}; cat {note}"),
                    "restore_post": sh(f"{ENVIRONMENT_LINE}; cat {note}"),
                },
            }
        ),
    )

    backup = api.backup_apps()

    assert backup.status == "ok", describe(backup)
    hooks = backup.app("notes").hooks
    assert [(hook.hook, hook.succeeded) for hook in hooks] == [
        ("backup_pre", True),
        ("backup_post", True),
    ]
    line = f"backup|notes|/|{backup.archive}"
    assert lines(hooks[0].output) == [line, "on-stderr"]
    assert hooks[1].output == line
    assert str(dump) in archive_paths(backup.archive)

    note.write_text("changed\n")
    dump.unlink()
    restore = api.restore_apps(backup.archive)

    assert restore.status == "ok", describe(restore)
    hooks = restore.app("notes").hooks
    assert [hook.hook for hook in hooks] == ["restore_pre", "restore_post"]
    line = f"restore|notes|/|{backup.archive}"
    # restore_pre sees the live files, restore_post the restored ones.
    assert lines(hooks[0].output) == [line, "changed"]
    assert lines(hooks[1].output) == [line, "original"]
    assert dump.read_text() == "dumped\n"


class Recorder:
    """A Python app implementation: every hook records what its packet said."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.packets: list[api.Packet] = []

    def _record(self, hook: str, packet: api.Packet) -> str:
        self.packets.append(packet)
        self.calls.append(
            {
                "hook": hook,
                "operation": packet.operation,
                "scope": packet.scope,
                "root": packet.root,
                "apps": [app.id for app in packet.apps],
                "directories": list(packet.directories),
                "files": list(packet.files),
                "path": packet.path,
            }
        )
        return f"{hook} done"

    def backup_pre(self, packet: api.Packet) -> str:
        return self._record("backup_pre", packet)

    def backup_post(self, packet: api.Packet) -> str:
        return self._record("backup_post", packet)

    def restore_pre(self, packet: api.Packet) -> str:
        return self._record("restore_pre", packet)

    def restore_post(self, packet: api.Packet) -> str:
        return self._record("restore_post", packet)


def python_app(manifest: dict[str, Any], implementation: Any = None) -> App:
    return App(parse_manifest(manifest, "test"), "test", implementation)


def test_python_hooks_receive_the_packet(homesafe_env: Path) -> None:
    srv = homesafe_env / "srv"
    config = make_tree(srv / "py/etc", {"py.conf": "a = 1\n"})
    data = make_tree(srv / "py/data", {"rows": "1\n"})
    other_data = make_tree(srv / "other/data", {"x": "x\n"})
    secret = srv / "py/secret.key"
    secret.write_text("k\n")
    recorder = Recorder()
    apps = {
        "pyapp": python_app(
            {
                "id": "pyapp",
                "config": {"directories": [str(config)]},
                "data": {"directories": [str(data)]},
                "secrets": {"files": [str(secret)]},
            },
            recorder,
        ),
        "other": python_app({"id": "other", "data": {"directories": [str(other_data)]}}),
    }
    expected = {
        "scope": "apps",
        "root": "/",
        "apps": ["other", "pyapp"],
        "directories": [str(other_data), str(config), str(data)],
        "files": [str(secret)],
    }

    backup = api.backup_apps(apps=apps)

    assert backup.status == "ok", describe(backup)
    assert recorder.calls == [
        {"hook": hook, "operation": "backup", "path": backup.archive, **expected}
        for hook in ("backup_pre", "backup_post")
    ]
    assert [hook.output for hook in backup.app("pyapp").hooks] == [
        "backup_pre done",
        "backup_post done",
    ]
    assert backup.app("other").hooks == []

    recorder.calls.clear()
    (data / "rows").write_text("2\n")
    restore = api.restore_apps(backup.archive, apps=apps)

    assert restore.status == "ok", describe(restore)
    assert recorder.calls == [
        {"hook": hook, "operation": "restore", "path": backup.archive, **expected}
        for hook in ("restore_pre", "restore_post")
    ]
    assert (data / "rows").read_text() == "1\n"


def test_hooks_run_in_dependency_order_for_backup_and_restore(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    log = shlex.quote(str(homesafe_env / "hooks.log"))
    # Dependency order: cedar -> apple -> birch (not the id order).
    for app_id, depends in {"cedar": [], "apple": ["cedar"], "birch": ["apple"]}.items():
        hooks = {
            name: sh(f'echo "{name} $HOMESAFE_APP" >> {log}')
            for name in ("backup_pre", "backup_post", "restore_pre", "restore_post")
        }
        data = make_tree(homesafe_env / "srv" / app_id, {"f": "1"})
        write_manifest(
            app_id,
            to_toml(
                {
                    "id": app_id,
                    "depends": depends,
                    "data": {"directories": [str(data)]},
                    "hooks": hooks,
                }
            ),
        )

    backup = api.backup_apps(["birch", "apple", "cedar"])
    restore = api.restore_apps(backup.archive)

    assert backup.status == restore.status == "ok", describe(restore)
    order = ["cedar", "apple", "birch"]
    expected = [
        f"{hook} {app_id}"
        for hook in ("backup_pre", "backup_post", "restore_pre", "restore_post")
        for app_id in order
    ]
    assert (homesafe_env / "hooks.log").read_text().splitlines() == expected


def test_failing_hook_fails_its_app_and_everything_is_put_back(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    bad_daemon, good_daemon = daemon_factory("bad"), daemon_factory("good")
    bad_daemon.start()
    good_daemon.start()
    bad_data = make_tree(homesafe_env / "srv/bad", {"b.txt": "b\n"})
    good_data = make_tree(homesafe_env / "srv/good", {"g.txt": "g\n"})
    left = homesafe_env / "bad-left"
    write_manifest(
        "bad",
        to_toml(
            {
                "id": "bad",
                "data": {"directories": [str(bad_data)]},
                "services": [command_service(bad_daemon, "bad")],
                "hooks": {
                    "backup_pre": sh("echo boom >&2; exit 7"),
                    "backup_post": ["touch", str(homesafe_env / "bad-post")],
                    "on_error": "fail",
                },
                "lockdown": {"leave": ["touch", str(left)]},
            }
        ),
    )
    write_manifest(
        "good",
        to_toml(
            {
                "id": "good",
                "data": {"directories": [str(good_data)]},
                "services": [command_service(good_daemon, "good")],
                "hooks": {"backup_post": ["touch", str(homesafe_env / "good-post")]},
            }
        ),
    )

    result = api.backup_apps()

    assert result.status == "partial", describe(result)
    assert result.exit_code == 3
    bad = result.app("bad")
    assert bad.status == "failed"
    assert errors_of(result, "bad") == [("hook", "backup_pre")]
    assert "backup_pre" in bad.errors[0].message
    hook = only(bad.hooks)
    assert not hook.succeeded
    assert "boom" in hook.output
    assert result.app("good").status == "ok"
    assert result.app("good").errors == []

    stored = archive_paths(result.archive)
    assert f"{good_data}/g.txt" in stored
    assert not any(path.startswith(str(bad_data)) for path in stored)
    assert [archive.apps for archive in api.list_archives()] == [["good"]]
    # The failed app's post hook does not run; the other app's does.
    assert not (homesafe_env / "bad-post").exists()
    assert (homesafe_env / "good-post").exists()
    assert bad_daemon.is_running() and good_daemon.is_running()
    assert "start" in bad_daemon.calls()
    assert lockdown_flags(homesafe_env) == []
    assert left.exists()


def test_failing_hook_with_on_error_continue_keeps_the_app(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    data = make_tree(homesafe_env / "srv/lenient", {"l.txt": "l\n"})
    write_manifest(
        "lenient",
        to_toml(
            {
                "id": "lenient",
                "data": {"directories": [str(data)]},
                "hooks": {"backup_pre": sh("exit 3"), "on_error": "continue"},
            }
        ),
    )

    result = api.backup_apps()

    assert result.status == "ok", describe(result)
    assert result.exit_code == 0
    lenient = result.app("lenient")
    assert lenient.errors == []
    warning = only(lenient.warnings)
    assert "backup_pre" in warning and "continue" in warning
    assert not only(lenient.hooks).succeeded
    assert f"{data}/l.txt" in archive_paths(result.archive)


def test_python_hook_exception_is_recorded_in_result_and_packet(homesafe_env: Path) -> None:
    class Exploding:
        def __init__(self) -> None:
            self.packet: api.Packet | None = None

        def backup_pre(self, packet: api.Packet) -> None:
            self.packet = packet
            raise RuntimeError("disk on fire")

    exploding = Exploding()
    command_ran = homesafe_env / "command-ran"
    apps = {
        "boom": python_app(
            {
                "id": "boom",
                "data": {"directories": [str(make_tree(homesafe_env / "srv/boom", {"a": "1"}))]},
                # Skipped: the Python hook of the same point failed first.
                "hooks": {"backup_pre": ["touch", str(command_ran)]},
            },
            exploding,
        ),
        "calm": python_app(
            {"id": "calm", "data": {"directories": [str(make_tree(homesafe_env / "srv/calm", {}))]}}
        ),
    }

    result = api.backup_apps(apps=apps)

    assert result.status == "partial", describe(result)
    assert errors_of(result, "boom") == [("hook", "backup_pre")]
    assert "RuntimeError: disk on fire" in result.app("boom").errors[0].message
    assert any(error.error_type == "hook" and error.app == "boom" for error in result.all_errors())
    assert exploding.packet is not None
    assert api.BackupError("hook", "boom", "backup_pre") in exploding.packet.errors
    outcome = only(result.app("boom").hooks)
    assert "Traceback" in outcome.output and "disk on fire" in outcome.output
    assert not command_ran.exists()
    assert result.app("calm").status == "ok"


def test_hanging_hook_is_killed_at_its_timeout_and_services_resume(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    daemon = daemon_factory("hung")
    daemon.start()
    pid_file = homesafe_env / "hook.pid"
    write_manifest(
        "hung",
        to_toml(
            {
                "id": "hung",
                "data": {"directories": [str(make_tree(homesafe_env / "srv/hung", {"h": "h"}))]},
                "services": [command_service(daemon, "hung")],
                "hooks": {"backup_pre": sh(f"echo $$ > {pid_file}; exec sleep 30"), "timeout": 1},
            }
        ),
    )

    started = time.monotonic()
    result = api.backup_apps()
    elapsed = time.monotonic() - started

    assert elapsed < 10, elapsed
    assert result.status == "failed", describe(result)
    assert errors_of(result, "hung") == [("hook", "backup_pre")]
    assert "1 s" in result.app("hung").errors[0].message
    assert process_state(int(pid_file.read_text())) is None  # killed and reaped
    assert daemon.is_running()
    assert lockdown_flags(homesafe_env) == []


def test_hanging_python_hook_is_abandoned_at_its_timeout_and_services_resume(
    homesafe_env: Path, daemon_factory: DaemonFactory
) -> None:
    # A Python function cannot be killed: past its timeout it is left running in its
    # thread, the outcome says so, and the app is resumed all the same.
    daemon = daemon_factory("stuck")
    daemon.start()
    release = threading.Event()
    returned: list[str] = []

    class Hanging:
        def backup_pre(self, packet: api.Packet) -> str:
            release.wait(30)
            returned.append("late")
            return "late"

    apps = {
        "stuck": python_app(
            {
                "id": "stuck",
                "data": {"directories": [str(make_tree(homesafe_env / "srv/stuck", {"s": "s"}))]},
                "services": [command_service(daemon, "stuck")],
                "hooks": {"timeout": 1},
            },
            Hanging(),
        )
    }

    started = time.monotonic()
    try:
        result = api.backup_apps(apps=apps)
        elapsed = time.monotonic() - started
        assert returned == []  # still hanging when the backup was over
    finally:
        release.set()

    assert elapsed < 10, elapsed
    assert result.status == "failed", describe(result)
    assert errors_of(result, "stuck") == [("hook", "backup_pre")]
    outcome = only(result.app("stuck").hooks)
    assert not outcome.succeeded
    assert outcome.error is not None
    assert "did not finish within 1 s" in outcome.error and "abandoned" in outcome.error
    assert 1 <= outcome.duration < 5
    assert daemon.is_running()
    assert lockdown_flags(homesafe_env) == []


def test_custom_handler_is_called_instead_of_borg(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    daemon = daemon_factory("handled")
    daemon.start()
    data = make_tree(homesafe_env / "srv/handled", {"h.txt": "h\n"})
    write_manifest(
        "handled",
        to_toml(
            {
                "id": "handled",
                "data": {"directories": [str(data)]},
                "services": [command_service(daemon, "handled")],
            }
        ),
    )
    calls: list[tuple[api.Packet, dict[str, Any], bool, bool]] = []

    def handler(packet: api.Packet, **keywords: Any) -> None:
        flag = lockdown_flag(homesafe_env, "handled").exists()
        calls.append((packet, keywords, daemon.is_running(), flag))

    result = api.backup_apps(["handled"], handler=handler, encryption_passphrase="horse")

    assert result.status == "ok", describe(result)
    packet, keywords, running_during, locked_during = only(calls)
    assert isinstance(packet, api.Packet)
    assert keywords == {"encryption_passphrase": "horse"}
    assert packet.operation == "backup"
    assert [app.id for app in packet.apps] == ["handled"]
    assert packet.directories == [str(data)]
    assert packet.path == result.archive
    assert not running_during and locked_during
    assert daemon.is_running()
    assert lockdown_flags(homesafe_env) == []
    # borg was not used: no repository was created, no engine statistics.
    assert not (homesafe_env / "home" / "repository").exists()
    assert result.engine_stats is None


def test_custom_handler_failure_is_not_lost_and_services_resume(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    daemon = daemon_factory("handled")
    daemon.start()
    write_manifest(
        "handled",
        to_toml(
            {
                "id": "handled",
                "data": {"directories": [str(make_tree(homesafe_env / "srv/h", {"h": "h"}))]},
                "services": [command_service(daemon, "handled")],
            }
        ),
    )

    def handler(packet: api.Packet, **keywords: Any) -> None:
        raise OSError("upload target went away")

    result = api.backup_apps(handler=handler)

    assert result.status == "failed", describe(result)
    assert "upload target went away" in describe(result)
    assert result.app("handled").errors[0].error_type == "engine"
    assert daemon.is_running()
    assert lockdown_flags(homesafe_env) == []
