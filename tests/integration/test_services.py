"""Services and lockdown around a real backup: real daemons, real runit, real borg."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homesafe import api
from homesafe.errors import CommandError
from tests.conftest import Daemon, DaemonFactory, ManifestWriter, requires_program, requires_root
from tests.support.apps import (
    actions,
    command_service,
    describe,
    lockdown_flag,
    lockdown_flags,
    make_tree,
    only,
    sh,
    ticks,
    to_toml,
)
from tests.support.runit import Runit

pytestmark = requires_program("borg")


def wait_for_new_ticks(daemon: Daemon, count: int, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(ticks(daemon)) > count:
            return True
        time.sleep(0.02)
    return False


def test_running_service_is_stopped_for_the_backup_and_running_again_after(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    daemon = daemon_factory("web")
    daemon.start()
    data = make_tree(homesafe_env / "srv/web", {"index.html": "hello\n"})
    probe = homesafe_env / "probe"
    ticks_file = shlex.quote(str(daemon.state / "ticks"))
    # While services are stopped: the status command answers, and no tick is written
    # during 0.3 s (the daemon ticks every 0.05 s while it runs).
    hook = sh(
        f"{shlex.join(daemon.argv('status'))}; echo status=$? > {probe}; "
        f"before=$(wc -l < {ticks_file}); sleep 0.3; after=$(wc -l < {ticks_file}); "
        f"echo ticks=$((after - before)) >> {probe}"
    )
    write_manifest(
        "web",
        to_toml(
            {
                "id": "web",
                "data": {"directories": [str(data)]},
                "services": [command_service(daemon, "web")],
                "hooks": {"backup_pre": hook},
            }
        ),
    )

    result = api.backup_apps()

    assert result.status == "ok", describe(result)
    assert probe.read_text().split() == ["status=3", "ticks=0"]  # 3: not running
    assert daemon.is_running()
    assert wait_for_new_ticks(daemon, len(ticks(daemon))), "the daemon does not tick again"
    web = result.app("web")
    assert web.strategy == "staged"  # ext4: a staged copy, services stopped for its last pass
    assert 0.3 < web.downtime < result.duration
    assert actions(daemon) == ["start", "stop", "start"]
    assert lockdown_flags(homesafe_env) == []


def test_service_that_was_not_running_is_neither_stopped_nor_started(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    running, idle, idle_alone = (daemon_factory(name) for name in ("running", "idle", "alone"))
    running.start()
    write_manifest(
        "mixed",
        to_toml(
            {
                "id": "mixed",
                "data": {"directories": [str(make_tree(homesafe_env / "srv/mixed", {"a": "1"}))]},
                "services": [
                    command_service(running, "running"),
                    command_service(idle, "idle"),
                ],
            }
        ),
    )
    write_manifest(
        "quiet",
        to_toml(
            {
                "id": "quiet",
                "data": {"directories": [str(make_tree(homesafe_env / "srv/quiet", {"b": "2"}))]},
                "services": [command_service(idle_alone, "alone")],
            }
        ),
    )

    result = api.backup_apps()

    assert result.status == "ok", describe(result)
    assert running.is_running()
    assert not idle.is_running()
    assert not idle_alone.is_running()
    assert set(idle.calls()) == {"status"}
    assert set(idle_alone.calls()) == {"status"}
    assert actions(running) == ["start", "stop", "start"]
    assert result.app("mixed").downtime > 0
    # Nothing was stopped for "quiet": no downtime to report.
    assert result.app("quiet").downtime == 0.0


def test_services_stop_last_app_first_and_start_in_dependency_order(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    # Dependency order zulu -> alpha -> mike differs from id order and its reverse.
    log = homesafe_env / "order.log"
    dependencies = {"zulu": [], "alpha": ["zulu"], "mike": ["alpha"]}
    daemons = []
    for app_id, depends in dependencies.items():
        services = []
        for number in (1, 2):
            daemon = daemon_factory(f"{app_id}-{number}")
            daemon.start()
            daemons.append(daemon)
            services.append(command_service(daemon, f"{app_id}-{number}", log=log))
        record = shlex.quote(str(log))
        data = make_tree(homesafe_env / "srv" / app_id, {"f": app_id})
        write_manifest(
            app_id,
            to_toml(
                {
                    "id": app_id,
                    "depends": depends,
                    "data": {"directories": [str(data)]},
                    "services": services,
                    "hooks": {
                        name: sh(f'echo "{name} $HOMESAFE_APP" >> {record}')
                        for name in ("backup_pre", "backup_post", "restore_pre", "restore_post")
                    },
                }
            ),
        )

    def expected(operation: str) -> list[str]:
        post = [f"{operation}_post zulu", f"{operation}_post alpha", f"{operation}_post mike"]
        starts = [
            "start zulu-1",
            "start zulu-2",
            "start alpha-1",
            "start alpha-2",
            "start mike-1",
            "start mike-2",
        ]
        return [
            "stop mike-2",
            "stop mike-1",
            "stop alpha-2",
            "stop alpha-1",
            "stop zulu-2",
            "stop zulu-1",
            f"{operation}_pre zulu",
            f"{operation}_pre alpha",
            f"{operation}_pre mike",
            # A backup resumes the apps once they are captured, before the archive is
            # written and its post hooks run; a restore holds them until it is done.
            *([*starts, *post] if operation == "backup" else [*post, *starts]),
        ]

    backup = api.backup_apps()

    assert backup.status == "ok", describe(backup)
    assert [app.app for app in backup.apps] == ["zulu", "alpha", "mike"]
    assert log.read_text().splitlines() == expected("backup")
    assert all(daemon.is_running() for daemon in daemons)

    log.unlink()
    restore = api.restore_apps(backup.archive)

    assert restore.status == "ok", describe(restore)
    assert log.read_text().splitlines() == expected("restore")
    assert all(daemon.is_running() for daemon in daemons)


@pytest.fixture
def runit(tmp_path: Path) -> Iterator[Runit]:
    """A real runsvdir over tmp_path/sv; killed, with everything below it, afterwards."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is needed to run runsvdir in its own PID namespace")
    supervisor = Runit(tmp_path / "sv")
    try:
        yield supervisor
    finally:
        supervisor.close()


@requires_root()
@requires_program("runsvdir")
@requires_program("sv")
def test_runit_service_is_down_during_the_backup_and_runs_again_after(
    homesafe_env: Path, write_manifest: ManifestWriter, runit: Runit
) -> None:
    runit.add_service("sleeper")
    runit.add_service("resting")
    runit.start()
    assert runit.sv("-w", "10", "down", "resting").returncode == 0
    before = runit.status("sleeper")
    svdir = str(runit.directory)
    write_manifest(
        "sleepy",
        to_toml(
            {
                "id": "sleepy",
                "data": {"directories": [str(make_tree(homesafe_env / "srv/sleepy", {"z": "z"}))]},
                "services": [
                    {"type": "runit", "name": "sleeper", "service_directory": svdir},
                    {"type": "runit", "name": "resting", "service_directory": svdir},
                ],
                "hooks": {"backup_pre": ["env", f"SVDIR={svdir}", "sv", "status", "sleeper"]},
            }
        ),
    )

    result = api.backup_apps()

    assert result.status == "ok", describe(result)
    during = only(result.app("sleepy").hooks).output
    assert during.startswith("down: sleeper:"), during
    after = runit.status("sleeper")
    assert after.startswith("run: sleeper:"), after
    assert before.split("(pid ")[1].split(")")[0] != after.split("(pid ")[1].split(")")[0]
    # It was down before the backup (normally up): homesafe must not start it.
    assert runit.status("resting").startswith("down: resting:")
    assert result.app("sleepy").strategy == "staged"
    assert result.app("sleepy").downtime > 0


@requires_root()
@requires_program("runsvdir")
@requires_program("sv")
def test_a_runit_check_script_decides_when_the_service_is_up_again(
    homesafe_env: Path, runit: Runit
) -> None:
    """homesafe reads runsv's state to know a service stopped or started; a service
    with a ``check`` script is up only when the script says so (sv runs it)."""
    from homesafe.consistency.services import RunitHandler
    from homesafe.manifest import RunitService

    service = runit.directory / "slow"
    service.mkdir()
    ready = homesafe_env / "ready"
    (service / "run").write_text(
        f"#!/bin/sh\nrm -f {ready}\nsleep 0.6\ntouch {ready}\nexec sleep 1000\n"
    )
    (service / "check").write_text(f"#!/bin/sh\ntest -e {ready}\n")
    for script in ("run", "check"):
        (service / script).chmod(0o755)
    runit.start()
    handler = RunitHandler(
        RunitService(type="runit", name="slow", service_directory=str(runit.directory))
    )
    fast = RunitHandler(
        RunitService(type="runit", name="quick", service_directory=str(runit.directory))
    )

    handler.stop()
    assert handler.state() == "down" and not handler.is_running()
    ready.unlink(missing_ok=True)  # the run script makes it 0.6 s after it starts
    handler.start()
    assert ready.exists(), "start returned before the check script said the service is up"
    assert handler.state() == "run" and handler.is_running()
    # Without a check script, runsv's state alone says it (no 0.42 s polls of sv -w).
    assert fast.state() is None  # no such service: sv waits, and says why it failed
    with pytest.raises(CommandError):
        fast.stop()


def test_lockdown_flag_and_commands_bracket_backup_and_restore(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    daemon = daemon_factory("locked")
    daemon.start()
    entered, left = homesafe_env / "entered", homesafe_env / "left"
    flag = lockdown_flag(homesafe_env, "vault")
    probe = homesafe_env / "probe"

    def during(operation: str) -> list[str]:
        # Copies the flag as the hook sees it, and whether enter/leave had run yet.
        copy = shlex.quote(f"{probe}.{operation}.flag")
        return sh(
            f"cp {shlex.quote(str(flag))} {copy}; "
            f"test -e {entered} && echo entered >> {probe}.{operation}; "
            f"test -e {left} || echo not-left >> {probe}.{operation}"
        )

    write_manifest(
        "vault",
        to_toml(
            {
                "id": "vault",
                "data": {"directories": [str(make_tree(homesafe_env / "srv/vault", {"v": "1"}))]},
                "services": [command_service(daemon, "locked")],
                "hooks": {"backup_pre": during("backup"), "restore_pre": during("restore")},
                "lockdown": {
                    "enter": sh(f"rm -f {left}; touch {entered}"),
                    "leave": sh(f"rm -f {entered}; touch {left}"),
                },
            }
        ),
    )

    backup = api.backup_apps()

    assert backup.status == "ok", describe(backup)
    assert Path(f"{probe}.backup").read_text().split() == ["entered", "not-left"]
    record = json.loads(Path(f"{probe}.backup.flag").read_text())
    assert record["operation"] == "backup"
    assert record["pid"] == os.getpid()
    assert not flag.exists()
    assert left.exists() and not entered.exists()
    assert daemon.is_running()

    restore = api.restore_apps(backup.archive)

    assert restore.status == "ok", describe(restore)
    assert Path(f"{probe}.restore").read_text().split() == ["entered", "not-left"]
    assert json.loads(Path(f"{probe}.restore.flag").read_text())["operation"] == "restore"
    assert lockdown_flags(homesafe_env) == []
    assert left.exists() and not entered.exists()
    assert daemon.is_running()


def test_an_app_declared_live_keeps_its_services_running(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    daemon = daemon_factory("cache")
    daemon.start()
    data = make_tree(homesafe_env / "srv" / "cache", {"entries": "x"})
    write_manifest(
        "cache",
        to_toml(
            {
                "id": "cache",
                "consistency": "live",
                "data": {"directories": [str(data)]},
                "services": [command_service(daemon, "cache")],
            }
        ),
    )

    result = api.backup_apps()

    assert result.status == "ok", describe(result)
    cache = result.app("cache")
    assert (cache.strategy, cache.downtime) == ("live", 0.0)
    assert "stop" not in daemon.calls()
    assert lockdown_flags(homesafe_env) == []
