"""Staged atomic restore with real borg: exact results, and failures at every step
(extraction, verification, swap, hook, service start, full disk) leave the app exactly
as it was, byte for byte."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homesafe import api, errors, restore
from tests.conftest import (
    Daemon,
    DaemonFactory,
    ManifestWriter,
    requires_program,
    requires_root,
)
from tests.integration.test_roundtrip import snapshot_tree
from tests.support.apps import (
    command_service,
    describe,
    errors_of,
    lockdown_flags,
    make_tree,
    sh,
    to_toml,
)

pytestmark = requires_program("borg")
REAL_BORG = shutil.which("borg") or "/usr/bin/borg"


def write_app(
    write_manifest: ManifestWriter,
    root: Path,
    app_id: str,
    *,
    daemon: Daemon | None = None,
    version: int = 1,
    hooks: dict[str, object] | None = None,
    health: list[str] | None = None,
) -> Path:
    """An app with a config file, a data tree and a secret below ``root/app_id``."""
    base = root / app_id
    (base / "data/sub").mkdir(parents=True, exist_ok=True)
    (base / "data/a.txt").write_text(f"{app_id} a\n")
    (base / "data/sub/b.bin").write_bytes(os.urandom(50_000))
    (base / "app.conf").write_text(f"[{app_id}]\n")
    (base / "secret").write_text("secret\n")
    (base / "secret").chmod(0o600)
    manifest: dict[str, object] = {
        "id": app_id,
        "version": version,
        "config": {"files": [str(base / "app.conf")]},
        "data": {"directories": [str(base / "data")]},
        "secrets": {"files": [str(base / "secret")]},
    }
    if daemon is not None:
        manifest["services"] = [command_service(daemon, app_id)]
    if hooks:
        manifest["hooks"] = hooks
    if health:
        manifest["setup"] = {"health": health}
    write_manifest(app_id, to_toml(manifest))
    return base


def change_everything(base: Path) -> None:
    """Change, add and delete files of an app, so a restore has work of every kind."""
    (base / "data/a.txt").write_text("changed after the backup\n")
    (base / "data/sub/b.bin").unlink()
    (base / "data/new.txt").write_text("created after the backup\n")
    (base / "data/newdir").mkdir()
    (base / "app.conf").write_text("changed\n")


def borg_wrapper(directory: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `borg` in ``directory``, put first on PATH, that runs ``script`` (sh) with
    REAL_BORG set."""
    directory.mkdir(parents=True, exist_ok=True)
    wrapper = directory / "borg"
    wrapper.write_text(f'#!/bin/sh\nREAL_BORG="{REAL_BORG}"\n{script}\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    return wrapper


def data_extraction(script: str) -> str:
    """A wrapper body running ``script`` for the extraction of app data only."""
    return (
        'if [ "$1" = extract ]; then case " $* " in *" .homesafe "*) ;; *)\n'
        f"{script}\n"
        ";; esac; fi\n"
        'exec "$REAL_BORG" "$@"'
    )


def test_restore_makes_the_app_exactly_what_the_archive_holds(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    base = write_app(write_manifest, homesafe_env / "srv", "exact")
    before = snapshot_tree(base)
    backup = api.backup_apps()
    change_everything(base)

    result = api.restore_apps(backup.archive)

    assert result.status == "ok", describe(result)
    assert snapshot_tree(base) == before
    assert not (base / "data/new.txt").exists()
    staging = [path for path in base.rglob(f"{restore.STAGING_PREFIX}*")]
    assert staging == []
    assert list((homesafe_env / "home/tmp").iterdir()) == []


def test_replaced_copies_are_removed_by_a_detached_process(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    """With remove_in_background (the CLI's way), the restore is final when it returns;
    the replaced copies go with their staging area, removed by a process of its own
    that journals them while it works and leaves nothing behind."""
    base = write_app(write_manifest, homesafe_env / "srv", "detached")
    # More than a small area's entries: a few are removed in place (the test below).
    make_tree(base / "data/many", {f"f{number}": "x" for number in range(100)})
    before = snapshot_tree(base)
    backup = api.backup_apps()
    change_everything(base)

    result = api.restore_apps(backup.archive, remove_in_background=True)

    assert result.status == "ok", describe(result)
    assert snapshot_tree(base) == before
    scratch = homesafe_env / "home/tmp"
    journals = homesafe_env / "home/journal"
    deadline = time.monotonic() + 30
    while any(scratch.iterdir()) or (journals.is_dir() and any(journals.iterdir())):
        assert time.monotonic() < deadline, (list(scratch.iterdir()), list(journals.iterdir()))
        time.sleep(0.05)
    assert not any(base.parent.rglob(f"{restore.STAGING_PREFIX}*"))
    assert snapshot_tree(base) == before


def test_a_staging_area_of_few_entries_is_removed_before_the_restore_returns(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    """Handing a handful of entries to a detached remover costs more than removing
    them (restore.SMALL_AREA_ENTRIES): they are gone, journal and all, on return."""
    base = write_app(write_manifest, homesafe_env / "srv", "small")
    before = snapshot_tree(base)
    backup = api.backup_apps()
    change_everything(base)

    result = api.restore_apps(backup.archive, remove_in_background=True)

    assert result.status == "ok", describe(result)
    assert snapshot_tree(base) == before
    assert list((homesafe_env / "home/tmp").iterdir()) == []
    journals = homesafe_env / "home/journal"
    assert not journals.is_dir() or list(journals.iterdir()) == []


def test_a_path_missing_at_backup_time_is_missing_after_restore(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    base = write_app(write_manifest, homesafe_env / "srv", "partial")
    (base / "secret").unlink()
    backup = api.backup_apps()
    (base / "secret").write_text("created later\n")

    result = api.restore_apps(backup.archive)

    assert result.status == "ok", describe(result)
    assert not (base / "secret").exists()


def test_verification_failure_leaves_the_app_untouched(
    homesafe_env: Path, write_manifest: ManifestWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = write_app(write_manifest, homesafe_env / "srv", "checked")
    backup = api.backup_apps()
    change_everything(base)
    before = snapshot_tree(base)
    # borg extracts everything, then one staged file loses a byte: verification sees it.
    borg_wrapper(
        homesafe_env / "bin",
        data_extraction(
            '"$REAL_BORG" "$@" || exit $?\nfind . -name a.txt -exec truncate -s 1 {} \\;\nexit 0'
        ),
        monkeypatch,
    )

    result = api.restore_apps(backup.archive)

    assert result.status == "failed"
    assert errors_of(result, "checked") == [("verify", None)]
    assert "a.txt" in result.app("checked").errors[0].message
    assert snapshot_tree(base) == before


def test_a_staged_directory_turned_into_a_link_fails_verification(
    homesafe_env: Path, write_manifest: ManifestWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = write_app(write_manifest, homesafe_env / "srv", "linked")
    backup = api.backup_apps()
    change_everything(base)
    before = snapshot_tree(base)
    # The staged directory data/sub becomes a link to a directory with the same files:
    # everything below it is found through the link, but it is not what was archived.
    borg_wrapper(
        homesafe_env / "bin",
        data_extraction(
            '"$REAL_BORG" "$@" || exit $?\n'
            'sub=$(find . -type d -name sub)\nmv "$sub" "$sub.moved"\nln -s sub.moved "$sub"\n'
            "exit 0"
        ),
        monkeypatch,
    )

    result = api.restore_apps(backup.archive)

    assert result.status == "failed"
    assert errors_of(result, "linked") == [("verify", None)]
    assert "data/sub is not a directory" in result.app("linked").errors[0].message
    assert snapshot_tree(base) == before


@requires_root()
@pytest.mark.skipif(shutil.which("chattr") is None, reason="chattr (e2fsprogs) is missing")
def test_swap_failure_rolls_back_what_was_already_swapped(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    base = write_app(write_manifest, homesafe_env / "srv", "swapped")
    backup = api.backup_apps()
    change_everything(base)
    before = snapshot_tree(base)
    # The config file is swapped first; the data directory cannot be renamed (immutable).
    subprocess.run(["chattr", "+i", str(base / "data")], check=True)
    try:
        result = api.restore_apps(backup.archive)
    finally:
        subprocess.run(["chattr", "-i", str(base / "data")], check=True)

    assert result.status == "failed"
    assert errors_of(result, "swapped") == [("swap", None)]
    assert snapshot_tree(base) == before


def test_failing_restore_post_hook_rolls_the_app_back(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    daemon = daemon_factory("hooked")
    daemon.start()
    marker = homesafe_env / "break"
    base = write_app(
        write_manifest,
        homesafe_env / "srv",
        "hooked",
        daemon=daemon,
        hooks={"restore_post": sh(f"test ! -e {marker}")},
    )
    backup = api.backup_apps()
    change_everything(base)
    before = snapshot_tree(base)
    marker.touch()

    result = api.restore_apps(backup.archive)

    assert result.status == "failed"
    assert errors_of(result, "hooked") == [("hook", "restore_post")]
    assert snapshot_tree(base) == before
    assert daemon.is_running()
    assert lockdown_flags(homesafe_env) == []


def test_service_that_will_not_start_on_restored_data_rolls_the_app_back(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    daemon = daemon_factory("picky")
    daemon.start()
    base = write_app(
        write_manifest,
        homesafe_env / "srv",
        "picky",
        daemon=daemon,
        # The first start after the swap fails; the start after the rollback works.
        hooks={"restore_post": ["touch", str(daemon.state / "fail-start-once")]},
    )
    backup = api.backup_apps()
    change_everything(base)
    before = snapshot_tree(base)

    result = api.restore_apps(backup.archive)

    assert result.status == "failed", describe(result)
    assert errors_of(result, "picky") == [("service_start", None)]
    assert any("rolled back" in warning for warning in result.app("picky").warnings)
    assert snapshot_tree(base) == before
    assert daemon.is_running()
    assert lockdown_flags(homesafe_env) == []


def test_one_failing_app_does_not_roll_back_the_others(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    marker = homesafe_env / "break"
    good = write_app(write_manifest, homesafe_env / "srv", "good")
    bad = write_app(
        write_manifest,
        homesafe_env / "srv",
        "bad",
        hooks={"restore_post": sh(f"test ! -e {marker}")},
    )
    backup = api.backup_apps()
    good_state = snapshot_tree(good)
    change_everything(good)
    change_everything(bad)
    bad_before = snapshot_tree(bad)
    marker.touch()

    result = api.restore_apps(backup.archive)

    assert result.status == "partial"
    assert result.app("good").status == "ok"
    assert snapshot_tree(good) == good_state
    assert snapshot_tree(bad) == bad_before


def test_newer_data_is_refused_unless_forced(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    base = write_app(write_manifest, homesafe_env / "srv", "versioned", version=3)
    backup = api.backup_apps()
    write_app(write_manifest, homesafe_env / "srv", "versioned", version=2)
    change_everything(base)
    before = snapshot_tree(base)

    refused = api.restore_apps(backup.archive)
    assert refused.status == "failed"
    assert errors_of(refused, "versioned") == [("version", None)]
    assert "--force" in refused.app("versioned").errors[0].message
    assert snapshot_tree(base) == before

    forced = api.restore_apps(backup.archive, force=True)
    assert forced.status == "ok", describe(forced)
    assert (base / "data/a.txt").read_text() == "versioned a\n"


def test_dry_run_lists_changes_and_changes_nothing(
    homesafe_env: Path, write_manifest: ManifestWriter, daemon_factory: DaemonFactory
) -> None:
    daemon = daemon_factory("previewed")
    daemon.start()
    base = write_app(write_manifest, homesafe_env / "srv", "previewed", daemon=daemon)
    backup = api.backup_apps()
    change_everything(base)
    before = snapshot_tree(base)
    calls_before = daemon.calls()

    preview = api.preview_restore(backup.archive)

    (app,) = preview.apps
    assert app.added == [f"{base}/data/sub/b.bin"]
    assert f"{base}/data/a.txt" in app.replaced
    assert f"{base}/app.conf" in app.replaced
    assert app.removed == [f"{base}/data/new.txt", f"{base}/data/newdir"]
    assert app.services == ["previewed"]
    assert preview.possible
    assert all(check.sufficient for check in preview.space)
    assert snapshot_tree(base) == before
    assert [call for call in daemon.calls() if call != "status"] == [
        call for call in calls_before if call != "status"
    ]


# -- a small filesystem -------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 64 MB ext4 filesystem on a loop device, mounted for the test."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a loop mount")
    image = tmp_path / "small.img"
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], check=False)
    if mounted.returncode != 0:
        pytest.skip("loop devices cannot be mounted here")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_restore_that_does_not_fit_is_refused_before_anything_changes(
    homesafe_env: Path, write_manifest: ManifestWriter, small_filesystem: Path
) -> None:
    base = write_app(write_manifest, small_filesystem, "roomy")
    (base / "data/big.bin").write_bytes(os.urandom(8_000_000))
    backup = api.backup_apps()
    (base / "data/big.bin").unlink()
    # Fill the filesystem so that the 8 MB cannot be staged any more.
    (small_filesystem / "filler").write_bytes(b"\0" * 40_000_000)
    before = snapshot_tree(base)

    with pytest.raises(restore.InsufficientSpaceError, match="not enough space"):
        api.restore_apps(backup.archive)
    assert snapshot_tree(base) == before
    assert not any(small_filesystem.rglob(f"{restore.STAGING_PREFIX}*"))
    preview = api.preview_restore(backup.archive)
    assert not preview.possible


def test_disk_full_during_extraction_leaves_the_app_untouched(
    homesafe_env: Path,
    write_manifest: ManifestWriter,
    small_filesystem: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = write_app(write_manifest, small_filesystem, "crowded")
    (base / "data/big.bin").write_bytes(os.urandom(6_000_000))
    backup = api.backup_apps()
    change_everything(base)
    before = snapshot_tree(base)
    filler = small_filesystem / "filler"
    # The space check passes; then, just before borg writes, something fills the disk.
    borg_wrapper(
        homesafe_env / "bin",
        data_extraction(f'dd if=/dev/zero of={filler} bs=1M 2>/dev/null\n"$REAL_BORG" "$@"'),
        monkeypatch,
    )

    result = api.restore_apps(backup.archive)

    assert result.status == "failed"
    assert errors_of(result, "crowded") == [("engine", None)]
    filler.unlink()
    assert snapshot_tree(base) == before
    assert not any(small_filesystem.rglob(f"{restore.STAGING_PREFIX}*"))


# -- restore drills -----------------------------------------------------------------


def test_verify_runs_the_health_check_in_a_sandbox(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    srv = homesafe_env / "srv"
    base = write_app(
        write_manifest,
        srv,
        "drilled",
        health=sh(f'test "$(cat "$HOMESAFE_ROOT{srv}/drilled/data/a.txt")" = "drilled a"'),
    )
    backup = api.backup_apps()
    change_everything(base)
    before = snapshot_tree(base)

    result = api.verify_archive(backup.archive)

    assert result.status == "ok", describe(result)
    drilled = result.app("drilled")
    assert drilled.healthy_after is not None and drilled.healthy_after > 0
    assert [outcome.hook for outcome in drilled.hooks] == ["health"]
    assert snapshot_tree(base) == before
    assert list((homesafe_env / "home/tmp").iterdir()) == []


def test_verify_reports_an_unhealthy_restore(
    homesafe_env: Path, write_manifest: ManifestWriter
) -> None:
    write_app(write_manifest, homesafe_env / "srv", "sick", health=sh("echo broken >&2; exit 1"))
    backup = api.backup_apps()

    result = api.verify_archive(backup.archive)

    assert result.status == "failed"
    assert errors_of(result, "sick") == [("health", None)]
    assert result.app("sick").healthy_after is None


# -- import from tar files ----------------------------------------------------------


def test_import_of_an_exported_archive_restores_the_app(
    homesafe_env: Path, write_manifest: ManifestWriter, tmp_path: Path
) -> None:
    base = write_app(write_manifest, homesafe_env / "srv", "imported")
    before = snapshot_tree(base)
    backup = api.backup_apps()
    exported = tmp_path / "export.tar.gz"
    api.export_archive(backup.archive, exported)
    change_everything(base)

    result = api.import_apps(exported)

    assert result.status == "ok", describe(result)
    assert snapshot_tree(base) == before


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd is missing (make test installs it)")
def test_import_reads_zstd_tarballs(
    homesafe_env: Path, write_manifest: ManifestWriter, tmp_path: Path
) -> None:
    base = write_app(write_manifest, homesafe_env / "srv", "zipped")
    before = snapshot_tree(base)
    backup = api.backup_apps()
    plain = tmp_path / "export.tar"
    api.export_archive(backup.archive, plain)
    subprocess.run(["zstd", "-q", str(plain), "-o", str(tmp_path / "export.tar.zst")], check=True)
    change_everything(base)

    result = api.import_apps(tmp_path / "export.tar.zst")

    assert result.status == "ok", describe(result)
    assert snapshot_tree(base) == before


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("dotdot", "contains '..'"),
        ("absolute", "absolute path"),
        ("symlink-out", "points outside"),
        ("symlink-up", "points outside"),
        ("hardlink-out", "hard link"),
        ("device", "device file"),
        ("fifo", "device file or FIFO"),
        ("stranger", "belongs to no app"),
    ],
)
def test_hostile_tar_is_refused_and_nothing_is_written(
    homesafe_env: Path,
    write_manifest: ManifestWriter,
    tmp_path: Path,
    kind: str,
    expected: str,
) -> None:
    base = write_app(write_manifest, homesafe_env / "srv", "target")
    backup = api.backup_apps()
    exported = tmp_path / "export.tar"
    api.export_archive(backup.archive, exported)
    data = str(base / "data").lstrip("/")
    member = tarfile.TarInfo()
    member.name = {
        "dotdot": f"{data}/../../../../etc/evil",
        "absolute": "/etc/evil",
        "symlink-out": f"{data}/evil-link",
        "symlink-up": f"{data}/evil-link",
        "hardlink-out": f"{data}/evil-hardlink",
        "device": f"{data}/evil-device",
        "fifo": f"{data}/evil-fifo",
        "stranger": "etc/cron.d/evil",
    }[kind]
    if kind == "symlink-out":
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/shadow"
    elif kind == "symlink-up":
        member.type, member.linkname = tarfile.SYMTYPE, "../" * 12 + "etc/shadow"
    elif kind == "hardlink-out":
        member.type, member.linkname = tarfile.LNKTYPE, "etc/shadow"
    elif kind == "device":
        member.type, member.devmajor, member.devminor = tarfile.CHRTYPE, 1, 3
    elif kind == "fifo":
        member.type = tarfile.FIFOTYPE
    with tarfile.open(exported, "a") as tar:
        tar.addfile(member, None)
    change_everything(base)
    before = snapshot_tree(base)

    with pytest.raises(errors.HomesafeError, match=expected) as caught:
        api.import_apps(exported)

    assert "nothing was written" in str(caught.value)
    assert snapshot_tree(base) == before
    assert not Path("/etc/evil").exists()
    assert not (homesafe_env / "etc").exists()
