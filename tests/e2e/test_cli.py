"""The installed `homesafe` command, driven as a user would: exit codes and JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from homesafe.consistency import snapshots
from tests.conftest import ManifestWriter, requires_program

pytestmark = requires_program("borg")

HOMESAFE = shutil.which("homesafe", path=str(Path(sys.executable).parent)) or "homesafe"


def homesafe(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HOMESAFE, *arguments], capture_output=True, text=True, env=os.environ.copy(), check=False
    )


def json_of(completed: subprocess.CompletedProcess[str]) -> dict:  # type: ignore[type-arg]
    assert completed.stdout, completed.stderr
    value = json.loads(completed.stdout)
    assert isinstance(value, dict)
    return value


@pytest.fixture
def apps(homesafe_env: Path, write_manifest: ManifestWriter) -> Path:
    """Apps "good" with a file and "flaky" whose backup_pre hook fails when a marker exists."""
    srv = homesafe_env / "srv"
    (srv / "good").mkdir(parents=True)
    (srv / "good/data.txt").write_text("good data\n")
    (srv / "flaky").mkdir()
    (srv / "flaky/data.txt").write_text("flaky data\n")
    marker = homesafe_env / "break-flaky"
    write_manifest(
        "good",
        f"""
        id = "good"
        [data]
        directories = ["{srv}/good"]
        """,
    )
    write_manifest(
        "flaky",
        f"""
        id = "flaky"
        [data]
        directories = ["{srv}/flaky"]
        [hooks]
        backup_pre = ["sh", "-c", "test ! -e {marker}"]
        """,
    )
    return homesafe_env


def test_backup_list_show_restore_with_json(apps: Path) -> None:
    backup = homesafe("backup", "--comment", "e2e {braces}", "--json")
    assert backup.returncode == 0, backup.stderr
    result = json_of(backup)
    assert result["status"] == "ok"
    assert {app["app"] for app in result["apps"]} == {"good", "flaky"}
    assert set(result["apps"][0]) >= {"status", "strategy", "downtime_seconds", "size", "errors"}
    assert result["engine"]["file_count"] >= 2

    listed = json_of(homesafe("archives", "list", "--json"))["archives"]
    assert [archive["name"] for archive in listed] == [result["archive"]]
    assert listed[0]["comment"] == "e2e {braces}"
    assert sorted(listed[0]["apps"]) == ["flaky", "good"]

    shown = json_of(homesafe("archives", "show", result["archive"], "--json"))
    assert {app["id"] for app in shown["metadata"]["apps"]} == {"good", "flaky"}
    assert f"{apps}/srv/good/data.txt" in {entry["path"] for entry in shown["contents"]}

    (apps / "srv/good/data.txt").write_text("damaged\n")
    restore = homesafe("restore", result["archive"], "good", "--json")
    assert restore.returncode == 0, restore.stderr
    assert json_of(restore)["apps"][0]["app"] == "good"
    assert (apps / "srv/good/data.txt").read_text() == "good data\n"


def test_partial_failure_exits_3_and_names_the_hook(apps: Path) -> None:
    (apps / "break-flaky").touch()
    completed = homesafe("backup", "--json")
    assert completed.returncode == 3, completed.stderr
    result = json_of(completed)
    assert result["status"] == "partial"
    flaky = next(app for app in result["apps"] if app["app"] == "flaky")
    assert flaky["status"] == "failed"
    assert flaky["errors"][0]["hook"] == "backup_pre"
    table = homesafe("backup")
    assert table.returncode == 3
    assert "backup_pre" in table.stdout


def test_total_failure_exits_1(apps: Path) -> None:
    assert homesafe("backup", "good").returncode == 0
    passphrase = apps / "home/secrets/default.passphrase"
    passphrase.write_text("not the passphrase\n")
    completed = homesafe("backup", "good", "--json")
    assert completed.returncode == 1
    result = json_of(completed)
    assert result["status"] == "failed"
    assert "passphrase" in result["errors"][0]["message"]


def test_usage_errors_exit_2(apps: Path) -> None:
    unknown_app = homesafe("backup", "nosuchapp")
    assert unknown_app.returncode == 2
    assert "nosuchapp" in unknown_app.stderr
    assert homesafe("backup", "--no-such-option").returncode == 2
    bad_name = homesafe("backup", "--name", "../evil")
    assert bad_name.returncode == 2
    assert "archive name" in bad_name.stderr


def test_missing_repository_is_a_clear_error(apps: Path) -> None:
    completed = homesafe("archives", "list")
    assert completed.returncode == 1
    assert "no repository" in completed.stderr
    assert "homesafe backup" in completed.stderr


def test_apps_check_lists_every_problem(apps: Path, write_manifest: ManifestWriter) -> None:
    assert homesafe("apps", "check").returncode == 0
    write_manifest("broken", 'id = "broken"\nversion = "x"\n[data]\ndirectories = ["rel"]\n')
    completed = homesafe("apps", "check", "--json")
    assert completed.returncode == 1
    problems = json_of(completed)["problems"]
    assert {problem["field"] for problem in problems} == {"version", "data.directories.0"}
    assert all(problem["source"].endswith("broken.toml") for problem in problems)
    text = homesafe("apps", "check")
    assert "2 problems" in text.stderr


def test_apps_list_and_show_json(apps: Path) -> None:
    listed = json_of(homesafe("apps", "list", "--json"))["apps"]
    assert [app["id"] for app in listed] == ["flaky", "good"]
    assert listed[0]["locked"] is False
    shown = json_of(homesafe("apps", "show", "good", "--json"))
    assert shown["manifest"]["data"]["directories"] == [f"{apps}/srv/good"]


def test_dry_run_touches_nothing(apps: Path) -> None:
    completed = homesafe("backup", "--dry-run", "--json")
    assert completed.returncode == 0
    plan = json_of(completed)
    assert plan["dry_run"] is True
    assert {entry["app"] for entry in plan["apps"]} == {"good", "flaky"}
    assert {entry["strategy"] for entry in plan["apps"]} == {"live"}  # nothing to stop
    assert not (apps / "home/repository").exists()
    forced = json_of(homesafe("backup", "--dry-run", "--json", "--strategy", "snapshot"))
    kind = snapshots.filesystem_type(apps)
    for entry in forced["apps"]:
        if kind == "btrfs":
            assert entry["strategy"] == "snapshot"
        else:
            assert entry["strategy"] is None
            assert f"is on {kind}, neither btrfs nor an LVM thin volume" in entry["problem"]
    text = homesafe("backup", "--dry-run", "--strategy", "stop")
    assert text.returncode == 0, text.stderr
    assert "strategy: " in text.stdout


def test_strategy_on_the_command_line_is_used_and_shown(apps: Path) -> None:
    completed = homesafe("backup", "good", "--strategy", "live", "--json")
    assert completed.returncode == 0, completed.stderr
    result = json_of(completed)
    assert result["apps"][0]["strategy"] == "live"
    shown = homesafe("archives", "show", result["archive"])
    assert "good (version 0): strategy live, downtime 0.000 s" in shown.stdout, shown.stdout
    refused = homesafe("backup", "--strategy", "staged")
    assert refused.returncode == 2
    assert "staged" in refused.stderr


def test_key_export_and_export_tar(apps: Path, tmp_path: Path) -> None:
    backup = json_of(homesafe("backup", "--json"))
    key = json_of(homesafe("key", "export", "--json"))
    passphrase = (apps / "home/secrets/default.passphrase").read_text().strip()
    assert key["passphrase"] == passphrase
    assert key["key"].startswith("BORG_KEY ")
    assert oct((apps / "home/secrets/default.passphrase").stat().st_mode & 0o777) == "0o600"

    tarball = tmp_path / "out.tar.gz"
    exported = homesafe("export", backup["archive"], str(tarball))
    assert exported.returncode == 0, exported.stderr
    import tarfile

    with tarfile.open(tarball) as archive:
        names = archive.getnames()
    assert f"{apps}/srv/good/data.txt".lstrip("/") in names
    assert ".homesafe/archive.json" in names


def test_archives_delete(apps: Path) -> None:
    first = json_of(homesafe("backup", "good", "--json"))["archive"]
    second = json_of(homesafe("backup", "good", "--json"))["archive"]
    assert homesafe("archives", "delete", "--yes", first).returncode == 0
    listed = json_of(homesafe("archives", "list", "--json"))["archives"]
    assert [archive["name"] for archive in listed] == [second]


def test_help_describes_every_command() -> None:
    completed = homesafe("--help")
    assert completed.returncode == 0
    for command in ("apps", "backup", "archives", "restore", "export", "key"):
        assert command in completed.stdout


def test_deleting_a_missing_archive_deletes_nothing(apps: Path) -> None:
    kept = json_of(homesafe("backup", "good", "--json"))["archive"]
    completed = homesafe("archives", "delete", "--yes", kept, "no-such-archive")
    assert completed.returncode == 1
    assert "no-such-archive" in completed.stderr
    listed = json_of(homesafe("archives", "list", "--json"))["archives"]
    assert [archive["name"] for archive in listed] == [kept]


def test_the_borg_under_test_is_the_one_asked_for(homesafe_env: Path) -> None:
    """make test runs the engine tests twice: with Debian's borg 1.2 and with borg 1.4."""
    from homesafe.engines import borg

    found = ".".join(map(str, borg.version()))
    expected = os.environ.get("HOMESAFE_TEST_BORG_VERSION")
    if expected:
        assert found == expected
    else:
        assert found.startswith(("1.2.", "1.4."))


def test_restore_dry_run_import_and_verify(apps: Path, tmp_path: Path) -> None:
    archive = json_of(homesafe("backup", "--json"))["archive"]
    (apps / "srv/good/data.txt").write_text("damaged\n")
    (apps / "srv/good/extra.txt").write_text("created after the backup\n")

    preview = homesafe("restore", archive, "good", "--dry-run", "--json")
    assert preview.returncode == 0, preview.stderr
    plan = json_of(preview)
    assert plan["possible"] is True
    (good,) = plan["apps"]
    assert good["replaced"] == [f"{apps}/srv/good/data.txt"]
    assert good["removed"] == [f"{apps}/srv/good/extra.txt"]
    assert (apps / "srv/good/data.txt").read_text() == "damaged\n"

    drill = homesafe("verify", archive, "--json")
    assert drill.returncode == 0, drill.stderr
    assert json_of(drill)["operation"] == "verify"

    tarball = tmp_path / "export.tar.gz"
    assert homesafe("export", archive, str(tarball)).returncode == 0
    imported = homesafe("import", str(tarball), "good", "--json")
    assert imported.returncode == 0, imported.stderr
    assert (apps / "srv/good/data.txt").read_text() == "good data\n"
    assert not (apps / "srv/good/extra.txt").exists()


def test_import_of_a_hostile_tar_exits_1_and_writes_nothing(apps: Path, tmp_path: Path) -> None:
    import tarfile

    archive = json_of(homesafe("backup", "--json"))["archive"]
    tarball = tmp_path / "export.tar"
    assert homesafe("export", archive, str(tarball)).returncode == 0
    evil = tarfile.TarInfo(f"{apps}/srv/good/../../../evil".lstrip("/"))
    with tarfile.open(tarball, "a") as tar:
        tar.addfile(evil, None)
    (apps / "srv/good/data.txt").write_text("damaged\n")

    completed = homesafe("import", str(tarball))
    assert completed.returncode == 1
    assert "contains '..'" in completed.stderr
    assert "nothing was written" in completed.stderr
    assert (apps / "srv/good/data.txt").read_text() == "damaged\n"


def test_a_failed_manual_backup_alerts_the_repository_channels(apps: Path) -> None:
    from homesafe import alerts
    from tests.support.alert_servers import http_server

    with http_server() as server:
        alerts.add_channel("default", "hook", "webhook", settings={"url": f"{server.url}/x"})
        assert homesafe("backup", "good").returncode == 0
        (apps / "break-flaky").touch()
        assert homesafe("backup").returncode == 3
        (request,) = server.wait_for(1)
    body = json.loads(request.body)
    assert body["event"] == "failure"
    assert body["repository"] == "default"
    assert "flaky failed" in body["message"]
