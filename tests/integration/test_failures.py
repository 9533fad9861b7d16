"""Things going wrong in real backups and restores, and everything being put back.

In every case each service ends in the state it had before (a daemon that ran runs
again) and no lockdown flag is left behind.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable
from pathlib import Path

import pytest

from homesafe import api
from homesafe.errors import PassphraseError, RepositoryNotFoundError
from homesafe.repositories import Repository
from tests.conftest import Daemon, DaemonFactory, ManifestWriter, requires_program
from tests.support.apps import (
    actions,
    archive_paths,
    command_service,
    describe,
    errors_of,
    lockdown_flags,
    make_tree,
    sh,
    to_toml,
)

pytestmark = requires_program("borg")

REAL_BORG = "/usr/bin/borg"


def assert_put_back(
    homesafe_env: Path, running: Iterable[Daemon] = (), stopped: Iterable[Daemon] = ()
) -> None:
    """Every service in its original state, and no lockdown flag left."""
    for daemon in running:
        assert daemon.is_running(), f"{daemon.state.name} was running and is not any more"
    for daemon in stopped:
        assert not daemon.is_running(), f"{daemon.state.name} was not running and now is"
    assert lockdown_flags(homesafe_env) == []


def simple_app(
    write_manifest: ManifestWriter,
    homesafe_env: Path,
    app_id: str,
    daemons: Iterable[Daemon] = (),
    **extra: object,
) -> Path:
    """An app owning srv/<id> (one file), with one command service per daemon."""
    data = make_tree(homesafe_env / "srv" / app_id, {f"{app_id}.txt": f"{app_id} v1\n"})
    manifest: dict[str, object] = {"id": app_id, "data": {"directories": [str(data)]}}
    services = [command_service(daemon, daemon.state.name) for daemon in daemons]
    if services:
        manifest["services"] = services
    manifest.update(extra)
    write_manifest(app_id, to_toml(manifest))
    return data


def started(daemon_factory: DaemonFactory, *names: str) -> list[Daemon]:
    daemons = [daemon_factory(name) for name in names]
    for daemon in daemons:
        daemon.start()
    return daemons


def test_service_that_will_not_stop_fails_its_app_only(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    stubborn, other, fine = started(daemon_factory, "stubborn", "other", "fine")
    stubborn.fail_on("stop")
    hook_ran = homesafe_env / "stuck-hook-ran"
    # Stopped last first: "other" is stopped, then "stubborn" refuses.
    stuck_data = simple_app(
        write_manifest,
        homesafe_env,
        "stuck",
        [stubborn, other],
        hooks={"backup_pre": ["touch", str(hook_ran)]},
    )
    fine_data = simple_app(write_manifest, homesafe_env, "fine", [fine])

    result = api.backup_apps()

    assert result.status == "partial", describe(result)
    assert errors_of(result, "stuck") == [("service_stop", None)]
    assert "stubborn" in result.app("stuck").errors[0].message
    assert result.app("fine").status == "ok"
    stored = archive_paths(result.archive)
    assert f"{fine_data}/fine.txt" in stored
    assert not any(path.startswith(str(stuck_data)) for path in stored)
    assert not hook_ran.exists()
    # "other" had been stopped before "stubborn" failed: it is started again.
    assert actions(other) == ["start", "stop", "start"]
    stubborn.heal()
    assert_put_back(homesafe_env, running=[stubborn, other, fine])


def test_service_whose_stop_fails_after_stopping_it_is_started_again(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    (daemon,) = started(daemon_factory, "clumsy")
    # The stop command does stop the daemon, then reports failure anyway.
    service = command_service(daemon, "clumsy")
    service["stop"] = sh(f"{shlex.join(daemon.argv('stop'))}; echo 'stop: weird' >&2; exit 1")
    write_manifest(
        "clumsy",
        to_toml(
            {
                "id": "clumsy",
                "data": {"directories": [str(make_tree(homesafe_env / "srv/clumsy", {}))]},
                "services": [service],
            }
        ),
    )

    result = api.backup_apps()

    assert result.status == "failed", describe(result)
    assert errors_of(result, "clumsy") == [("service_stop", None)]
    assert actions(daemon) == ["start", "stop", "start"]
    assert_put_back(homesafe_env, running=[daemon])


def test_service_refusing_to_stop_for_a_restore_leaves_that_app_untouched(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    stubborn, fine = started(daemon_factory, "stubborn", "fine")
    stuck_data = simple_app(write_manifest, homesafe_env, "stuck", [stubborn])
    fine_data = simple_app(write_manifest, homesafe_env, "fine", [fine])
    backup = api.backup_apps()
    assert backup.status == "ok", describe(backup)
    (stuck_data / "stuck.txt").write_text("stuck v2\n")
    (fine_data / "fine.txt").write_text("fine v2\n")
    stubborn.fail_on("stop")

    restore = api.restore_apps(backup.archive)

    assert restore.status == "partial", describe(restore)
    assert errors_of(restore, "stuck") == [("service_stop", None)]
    assert (stuck_data / "stuck.txt").read_text() == "stuck v2\n"
    assert (fine_data / "fine.txt").read_text() == "fine v1\n"
    stubborn.heal()
    assert_put_back(homesafe_env, running=[stubborn, fine])


def test_service_that_will_not_start_again_is_reported_and_can_be_healed(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    fragile, sturdy, fine = started(daemon_factory, "fragile", "sturdy", "fine")
    # While it is stopped, make it refuse to start again.
    break_it = ["touch", str(fragile.state / "fail-start")]
    simple_app(
        write_manifest, homesafe_env, "phoenix", [fragile, sturdy], hooks={"backup_pre": break_it}
    )
    simple_app(write_manifest, homesafe_env, "fine", [fine])

    result = api.backup_apps()

    assert result.status == "partial", describe(result)
    assert errors_of(result, "phoenix") == [("service_start", None)]
    assert "fragile" in result.app("phoenix").errors[0].message
    assert result.app("fine").status == "ok"
    assert not fragile.is_running()
    # Every stopped service is tried, even after one failed to start.
    assert_put_back(homesafe_env, running=[sturdy, fine])

    # Healed, and without the breaking hook, the next backup stops and restarts it.
    fragile.heal()
    fragile.start()
    simple_app(write_manifest, homesafe_env, "phoenix", [fragile, sturdy])
    again = api.backup_apps()
    assert again.status == "ok", describe(again)
    assert actions(fragile)[-3:] == ["start", "stop", "start"]
    assert_put_back(homesafe_env, running=[fragile, sturdy, fine])


def test_wrong_passphrase_fails_the_backup_and_services_resume(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    (daemon,) = started(daemon_factory, "guarded")
    simple_app(write_manifest, homesafe_env, "guarded", [daemon])
    assert api.backup_apps().status == "ok"
    wrong = "not-the-passphrase-0123456789"
    (homesafe_env / "home/secrets/default.passphrase").write_text(wrong + "\n")

    result = api.backup_apps()

    assert result.status == "failed", describe(result)
    assert result.exit_code == 1
    assert [error.error_type for error in result.errors] == ["engine"]
    assert "passphrase" in result.errors[0].message
    assert errors_of(result, "guarded") == [("engine", None)]
    assert wrong not in describe(result)  # the passphrase is never echoed
    assert actions(daemon) == ["start", *["stop", "start"] * 2]
    assert_put_back(homesafe_env, running=[daemon])
    with pytest.raises(PassphraseError, match="passphrase"):
        api.list_archives()


def test_missing_repository_raises_before_any_service_is_touched(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    (daemon,) = started(daemon_factory, "untouched")
    hook_ran = homesafe_env / "hook-ran"
    simple_app(
        write_manifest,
        homesafe_env,
        "untouched",
        [daemon],
        hooks={"backup_pre": ["touch", str(hook_ran)]},
    )
    passphrase_file = homesafe_env / "other.passphrase"
    passphrase_file.write_text("whatever\n")
    missing = homesafe_env / "missing"
    repository = Repository(name="other", location=str(missing), passphrase_file=passphrase_file)

    with pytest.raises(RepositoryNotFoundError, match="missing"):
        api.backup_apps(repository=repository)

    assert daemon.calls() == ["start"]  # not even asked for its status
    assert not hook_ran.exists()
    assert not missing.exists()
    assert_put_back(homesafe_env, running=[daemon])


def test_path_vanishing_under_borg_fails_the_app_owning_it(
    homesafe_env: Path,
    write_manifest: ManifestWriter,
    daemon_factory: DaemonFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not os.access(REAL_BORG, os.X_OK):
        pytest.skip(f"the wrapper execs {REAL_BORG}, which is not there")
    (daemon,) = started(daemon_factory, "victim")
    srv = homesafe_env / "srv"
    make_tree(srv / "victim", {"vanishing.db": "v\n", "staying.conf": "s\n"})
    vanishing, staying = srv / "victim/vanishing.db", srv / "victim/staying.conf"
    write_manifest(
        "victim",
        to_toml(
            {
                "id": "victim",
                "data": {"files": [str(vanishing), str(staying)]},
                "services": [command_service(daemon, "victim")],
            }
        ),
    )
    bystander = simple_app(write_manifest, homesafe_env, "bystander")
    # A `borg` first on PATH: homesafe has checked the paths, then one goes away
    # just before the real borg reads it.
    wrapper_directory = homesafe_env / "bin"
    wrapper_directory.mkdir()
    marker = homesafe_env / "wrapper-ran"
    wrapper = wrapper_directory / "borg"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = create ]; then rm -f {shlex.quote(str(vanishing))}; '
        f"touch {shlex.quote(str(marker))}; fi\n"
        f'exec {REAL_BORG} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper_directory}{os.pathsep}{os.environ['PATH']}")

    # live: borg reads the live paths (a captured copy would not lose the file).
    result = api.backup_apps(strategy="live")

    assert marker.exists(), "the borg wrapper did not run"
    assert result.status == "partial", describe(result)
    assert errors_of(result, "victim") == [("engine", None)]
    message = result.app("victim").errors[0].message
    assert "incomplete copy" in message and str(vanishing) in message
    assert result.app("bystander").status == "ok"
    assert result.app("bystander").errors == []
    stored = archive_paths(result.archive)
    assert str(staying) in stored and f"{bystander}/bystander.txt" in stored
    assert str(vanishing) not in stored
    assert_put_back(homesafe_env, running=[daemon])


def test_failing_restore_pre_hook_leaves_that_app_untouched(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    guarded_daemon, open_daemon = started(daemon_factory, "guarded", "open")
    block = homesafe_env / "block-restore"
    guarded = simple_app(
        write_manifest,
        homesafe_env,
        "guarded",
        [guarded_daemon],
        hooks={"restore_pre": ["test", "!", "-e", str(block)], "on_error": "fail"},
    )
    opened = simple_app(write_manifest, homesafe_env, "open", [open_daemon])
    backup = api.backup_apps()
    assert backup.status == "ok", describe(backup)
    block.touch()
    (guarded / "guarded.txt").write_text("guarded v2\n")
    (guarded / "added.txt").write_text("new\n")
    (opened / "open.txt").write_text("open v2\n")

    restore = api.restore_apps(backup.archive)

    assert restore.status == "partial", describe(restore)
    assert errors_of(restore, "guarded") == [("hook", "restore_pre")]
    assert (guarded / "guarded.txt").read_text() == "guarded v2\n"
    assert (guarded / "added.txt").exists()
    assert restore.app("open").status == "ok"
    assert (opened / "open.txt").read_text() == "open v1\n"
    assert_put_back(homesafe_env, running=[guarded_daemon, open_daemon])


def test_restore_installs_a_missing_app_first_and_a_failed_install_restores_nothing(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    (daemon,) = started(daemon_factory, "broken")
    installed, never = homesafe_env / "installed-marker", homesafe_env / "never-marker"
    present = simple_app(
        write_manifest,
        homesafe_env,
        "present",
        setup={"installed": ["test", "-e", str(installed)], "install": ["touch", str(installed)]},
    )
    broken = simple_app(
        write_manifest,
        homesafe_env,
        "broken",
        [daemon],
        setup={
            "installed": ["test", "-e", str(never)],
            "install": sh("echo 'no network' >&2; exit 100"),
        },
    )
    installed.touch()
    never.touch()
    backup = api.backup_apps()
    assert backup.status == "ok", describe(backup)
    installed.unlink()
    never.unlink()
    (present / "present.txt").unlink()
    (broken / "broken.txt").write_text("broken v2\n")
    calls_before = len(daemon.calls())

    restore = api.restore_apps(backup.archive)

    assert restore.status == "partial", describe(restore)
    assert restore.app("present").status == "ok"
    assert installed.exists()
    assert (present / "present.txt").read_text() == "present v1\n"
    assert errors_of(restore, "broken") == [("install", None)]
    assert "setup.install" in restore.app("broken").errors[0].message
    assert (broken / "broken.txt").read_text() == "broken v2\n"
    assert not never.exists()
    # Not restored, so not stopped either.
    assert "stop" not in daemon.calls()[calls_before:]
    assert_put_back(homesafe_env, running=[daemon])


def test_restore_follows_the_manifest_stored_in_the_archive(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    (daemon,) = started(daemon_factory, "moving")
    old = simple_app(write_manifest, homesafe_env, "moving", [daemon])
    backup = api.backup_apps()
    assert backup.status == "ok", describe(backup)
    new = make_tree(homesafe_env / "srv/moved-elsewhere", {"moving.txt": "new place\n"})
    write_manifest(
        "moving",
        to_toml({"id": "moving", "data": {"directories": [str(new)]}}),
    )
    (old / "moving.txt").write_text("moving v2\n")

    restore = api.restore_apps(backup.archive)

    assert restore.status == "ok", describe(restore)
    assert restore.app("moving").paths == [str(old)]
    assert (old / "moving.txt").read_text() == "moving v1\n"
    assert (new / "moving.txt").read_text() == "new place\n"
    # The archived manifest's service, not the local one (which has none), was stopped.
    assert actions(daemon) == ["start", *["stop", "start"] * 2]
    assert_put_back(homesafe_env, running=[daemon])


def test_lockdown_enter_failure_fails_the_app_without_stopping_its_services(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    locked_daemon, fine_daemon = started(daemon_factory, "unlockable", "fine")
    left = homesafe_env / "leave-ran"
    unlockable = simple_app(
        write_manifest,
        homesafe_env,
        "unlockable",
        [locked_daemon],
        lockdown={
            "enter": sh("echo 'maintenance mode broken' >&2; exit 1"),
            "leave": ["touch", str(left)],
        },
    )
    simple_app(write_manifest, homesafe_env, "fine", [fine_daemon])

    result = api.backup_apps()

    assert result.status == "partial", describe(result)
    assert errors_of(result, "unlockable") == [("lockdown", None)]
    assert "maintenance mode broken" in result.app("unlockable").errors[0].message
    assert result.app("fine").status == "ok"
    assert "stop" not in locked_daemon.calls()
    assert not any(path.startswith(str(unlockable)) for path in archive_paths(result.archive))
    # The leave command still runs: enter may have half switched maintenance on.
    assert left.exists()
    assert_put_back(homesafe_env, running=[locked_daemon, fine_daemon])


def borg_wrapper(directory: Path, script: str) -> Path:
    """A `borg` running ``script`` (sh) with the real borg as $REAL_BORG."""
    directory.mkdir()
    wrapper = directory / "borg"
    wrapper.write_text(f"#!/bin/sh\nREAL_BORG={REAL_BORG}\n{script}\n")
    wrapper.chmod(0o755)
    return wrapper


def test_engine_failing_during_restore_rolls_the_app_back(
    homesafe_env: Path,
    write_manifest: ManifestWriter,
    daemon_factory: DaemonFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not os.access(REAL_BORG, os.X_OK):
        pytest.skip(f"the wrapper execs {REAL_BORG}, which is not there")
    (daemon,) = started(daemon_factory, "rolled")
    data = simple_app(write_manifest, homesafe_env, "rolled", [daemon])
    backup = api.backup_apps()
    assert backup.status == "ok", describe(backup)
    (data / "rolled.txt").write_text("rolled v2\n")
    # The app's extraction writes its files, then borg dies (exit 2) before the end.
    borg_wrapper(
        homesafe_env / "bin",
        # Reading the archive's description (.homesafe) works; extracting the app fails.
        'if [ "$1" = extract ]; then case " $* " in *" .homesafe "*) ;; *)\n'
        '  "$REAL_BORG" "$@"; echo "simulated crash" >&2; exit 2;; esac\n'
        "fi\n"
        'exec "$REAL_BORG" "$@"',
    )
    monkeypatch.setenv("PATH", f"{homesafe_env / 'bin'}{os.pathsep}{os.environ['PATH']}")

    restore = api.restore_apps(backup.archive)

    assert restore.status == "failed", describe(restore)
    assert errors_of(restore, "rolled") == [("engine", None)]
    assert_put_back(homesafe_env, running=[daemon])
    # Never half restored: a failed restore leaves the live files as they were.
    assert (data / "rolled.txt").read_text() == "rolled v2\n"


def test_restore_does_not_merge_over_files_created_after_the_backup(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    data = simple_app(write_manifest, homesafe_env, "exact")
    backup = api.backup_apps()
    assert backup.status == "ok", describe(backup)
    (data / "created-later.txt").write_text("not in the archive\n")

    restore = api.restore_apps(backup.archive)

    assert restore.status == "ok", describe(restore)
    assert (data / "exact.txt").read_text() == "exact v1\n"
    assert sorted(os.listdir(data)) == ["exact.txt"]


def test_app_whose_install_failed_is_not_locked_down_for_the_restore(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    tool = homesafe_env / "opt/absent/bin/absentctl"  # the app's own tool
    tool.parent.mkdir(parents=True)
    tool.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(homesafe_env / "tool.log"))}\n')
    tool.chmod(0o755)
    data = simple_app(
        write_manifest,
        homesafe_env,
        "absent",
        setup={"installed": ["test", "-x", str(tool)], "install": ["false"]},
        lockdown={"enter": [str(tool), "maintenance-on"], "leave": [str(tool), "maintenance-off"]},
    )
    backup = api.backup_apps()
    assert backup.status == "ok", describe(backup)
    # The app is uninstalled: its tool goes; its data stays behind, changed.
    tool.unlink()
    (data / "absent.txt").write_text("absent v2\n")

    restore = api.restore_apps(backup.archive)

    assert restore.status == "failed", describe(restore)
    assert (data / "absent.txt").read_text() == "absent v2\n"
    assert lockdown_flags(homesafe_env) == []
    assert errors_of(restore, "absent") == [("install", None)]
