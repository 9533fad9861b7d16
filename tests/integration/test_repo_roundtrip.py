"""Every engine x location, through the same flows as the embedded default repository.

The round trips of tests/integration/test_roundtrip.py run here unchanged against a
restic repository on a local path, restic over sftp (a real sshd on 127.0.0.1), restic on
S3 (a real SeaweedFS on 127.0.0.1) and borg over ssh (``borg serve`` behind that sshd):
the API's default repository is pointed at the repository under test, so each flow is
the very code that tests the default. Then the CLI's ``--repo NAME`` is driven through
backup, archives list/show/delete, export, key export and restore.

restic derives its key slowly (about 0.5 s a call, 3 s to create a repository), so a
repository is created once per module and copied for each test where it is a directory.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from homesafe import api, archives, locations, repositories
from homesafe.engines.base import Progress
from homesafe.repositories import Repository
from tests.conftest import requires_program
from tests.integration import test_roundtrip as roundtrip
from tests.integration.test_roundtrip import two_apps  # noqa: F401 (a fixture)
from tests.support import s3 as s3_support
from tests.support import sshd as sshd_support
from tests.support.engine_calls import EngineCalls
from tests.support.s3 import SeaweedS3
from tests.support.sshd import Sshd

pytestmark = [requires_program("borg"), requires_program("restic")]

KINDS = ["restic-local", "restic-sftp", "restic-s3", "borg-ssh"]
PASSPHRASE = "the module's restic passphrase"
HOMESAFE = str(Path(sys.executable).parent / "homesafe")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    reason = sshd_support.available()
    if reason:
        pytest.skip(reason)
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    reason = s3_support.available()
    if reason:
        pytest.skip(reason)
    server = SeaweedS3(tmp_path_factory.mktemp("weed"))
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def restic_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An empty restic repository and its passphrase file, to copy."""
    directory = tmp_path_factory.mktemp("restic-template")
    passphrase = directory / "passphrase"
    passphrase.write_text(PASSPHRASE + "\n")
    passphrase.chmod(0o600)
    repository = directory / "repository"
    subprocess.run(
        ["restic", "init", "-q", "-r", str(repository), "--repository-version", "2"],
        env={**os.environ, "RESTIC_PASSWORD_FILE": str(passphrase),
             "RESTIC_CACHE_DIR": str(directory / "cache")},
        check=True,
        capture_output=True,
    )  # fmt: skip
    return repository, passphrase


def connect_ssh(server: Sshd) -> None:
    """Authorize homesafe's client key (made now, in this test's HOMESAFE_HOME) and trust
    the server's host key by its fingerprint, as `repo add --host-key-fingerprint` does."""
    server.authorize(repositories.ensure_client_key())
    key_type, key = server.host_key_line().split()
    fingerprint = repositories.HostKey("", key_type, key).fingerprint
    repositories.trust_host(repositories.parse_location(ssh_url(server)), fingerprint=fingerprint)


def ssh_url(server: Sshd, scheme: str = "ssh", path: str = "/unused") -> str:
    return f"{scheme}://root@127.0.0.1:{server.port}{path}"


def remote_location(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, scheme: str, path: Path
) -> str:
    """A repository location over ``scheme`` (ssh, sftp: ``path`` on this module's sshd,
    homesafe's key authorized and the host key trusted; s3: a prefix of this test's own
    on the module's SeaweedFS, its keys in the environment)."""
    if scheme == "s3":
        weed: SeaweedS3 = request.getfixturevalue("s3_server")
        for variable, value in weed.environment().items():
            monkeypatch.setenv(variable, value)
        return weed.location("homesafe", request.node.name.replace("[", "-").strip("]"))
    server: Sshd = request.getfixturevalue("sshd")
    connect_ssh(server)
    return ssh_url(server, scheme, str(path))


MakeRepository = Callable[[str], Repository]


@pytest.fixture
def make_repository(
    request: pytest.FixtureRequest,
    homesafe_env: Path,
    tmp_path: Path,
    restic_template: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> MakeRepository:
    """Make and register a repository of a kind (see KINDS), ready for archives."""

    def make(kind: str) -> Repository:
        template, passphrase = restic_template
        name = kind.replace("-", "")
        directory = tmp_path / f"{name}-repository"
        if kind in ("restic-local", "restic-sftp"):
            shutil.copytree(template, directory)
        if kind == "restic-local":
            location = str(directory)
        else:
            scheme = {"restic-sftp": "sftp", "restic-s3": "s3", "borg-ssh": "ssh"}[kind]
            location = remote_location(request, monkeypatch, scheme, directory)
        engine = kind.split("-")[0]
        repository = Repository(
            name=name,
            location=location,
            engine=engine,
            encryption=repositories.DEFAULT_ENCRYPTIONS[engine],
            # borg's is generated when the repository is created.
            passphrase_file=passphrase
            if engine == "restic"
            else repositories.passphrase_file_for(name),
            compression=repositories.DEFAULT_COMPRESSIONS[engine],
            lock_wait=10,
        )
        if kind in ("restic-s3", "borg-ssh"):
            assert api.initialize_repository(repository) is True
        repositories.register(repository)
        return repositories.get(name)

    return make


FLOWS: dict[str, Callable[[Path, Path], None]] = {
    "round_trip": lambda apps, _: (
        roundtrip.test_round_trip_restores_content_modes_owners_links_and_empty_dirs(apps)
    ),
    "one_app": lambda apps, _: roundtrip.test_restore_of_one_app_leaves_the_other_alone(apps),
    "target_root": roundtrip.test_restore_into_target_root_leaves_the_live_system_alone,
    "metadata": lambda apps, _: (
        roundtrip.test_archive_metadata_carries_manifests_and_comment_summary(apps)
    ),
    "distinct_names": lambda apps, _: (
        roundtrip.test_two_backups_in_the_same_second_get_distinct_names(apps)
    ),
}


# restic on a local path runs every flow: that is the engine. Over sftp, S3 and ssh only
# the transport differs, so the two flows that touch every engine call (create, list,
# list contents, extract of metadata and of files) run there, besides the CLI test below:
# the whole matrix would take minutes of restic's key derivation and ssh set-up.
REMOTE_FLOWS = ("round_trip", "metadata")
CASES = [
    pytest.param(kind, flow, id=f"{kind}-{flow}")
    for kind in KINDS
    for flow in FLOWS
    if kind == "restic-local" or flow in REMOTE_FLOWS
]


@pytest.mark.parametrize(("kind", "flow"), CASES)
def test_round_trip_flows_work_on_every_engine_and_location(
    kind: str,
    flow: str,
    make_repository: MakeRepository,
    monkeypatch: pytest.MonkeyPatch,
    two_apps: Path,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    repository = make_repository(kind)
    # The API's default repository becomes the one under test.
    monkeypatch.setattr(
        api, "_resolve_repository", lambda given: given if given is not None else repository
    )

    FLOWS[flow](two_apps, tmp_path)

    assert api.list_archives(repository)
    assert not (Path(os.environ["HOMESAFE_HOME"]) / "repository").exists()


def homesafe(*arguments: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HOMESAFE, *arguments],
        capture_output=True,
        text=True,
        input=input_text,
        env=os.environ.copy(),
        check=False,
        timeout=300,
    )


# The CLI only resolves --repo and hands the record to the API: one local and one remote
# kind show it (borg over ssh is driven through the CLI in test_ssh_repositories.py).
@pytest.mark.parametrize("kind", ["restic-local", "restic-s3"])
def test_every_archive_command_takes_repo(
    kind: str,
    make_repository: MakeRepository,
    two_apps: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    repository = make_repository(kind)
    name = repository.name

    backup = homesafe("backup", "--repo", name, "--json", "--comment", "via cli")
    assert backup.returncode == 0, backup.stderr
    archive = json.loads(backup.stdout)["archive"]
    assert json.loads(backup.stdout)["repository"] == name

    listed = homesafe("archives", "list", "--repo", name, "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)["archives"]
    assert (entry["name"], entry["apps"], entry["comment"]) == (
        archive, ["alpha", "beta"], "via cli"
    )  # fmt: skip
    # The default repository was not touched (it does not even exist).
    assert homesafe("archives", "list").returncode != 0

    shown = homesafe("archives", "--repo", name, "show", archive, "--json")
    assert shown.returncode == 0, shown.stderr
    assert f"{two_apps}/alpha/data/notes.txt" in {
        item["path"] for item in json.loads(shown.stdout)["contents"]
    }

    exported = tmp_path / "export.tar.gz"
    export = homesafe("export", "--repo", name, archive, str(exported))
    assert export.returncode == 0, export.stderr
    with tarfile.open(exported, "r:gz") as tar:
        names = tar.getnames()
    assert f"{str(two_apps).lstrip('/')}/alpha/data/notes.txt" in names
    assert ".homesafe/archive.json" in names
    assert not any(name.startswith("/") for name in names)
    # Only what was stored: not the parent directories of the apps' paths.
    assert str(two_apps).lstrip("/").split("/")[0] not in names

    key = homesafe("key", "export", "--repo", name, "--json")
    assert key.returncode == 0, key.stderr
    assert json.loads(key.stdout)["passphrase"] == repository.passphrase()
    assert json.loads(key.stdout)["key"].strip()

    (two_apps / "beta/data/b.txt").write_text("changed\n")
    restore = homesafe("restore", "--repo", name, archive, "beta", "--json")
    assert restore.returncode == 0, restore.stderr + restore.stdout
    assert (two_apps / "beta/data/b.txt").read_text() == "beta\n"

    delete = homesafe("archives", "delete", "--repo", name, "--yes", archive)
    assert delete.returncode == 0, delete.stderr
    assert api.list_archives(repository) == []


# -- restic: parents and names without a listing -----------------------------------------


def restic_snapshots(repository: Repository) -> list[dict[str, Any]]:
    """The repository's snapshots as restic itself lists them, oldest first."""
    completed = subprocess.run(
        ["restic", "-r", repository.location, "snapshots", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "RESTIC_PASSWORD": repository.passphrase() or ""},
        check=True,
    )
    return sorted(json.loads(completed.stdout), key=lambda snapshot: snapshot["time"])


def test_restic_backups_take_the_snapshot_written_before_as_parent(
    make_repository: MakeRepository,
    two_apps: Path,  # noqa: F811
) -> None:
    repository = make_repository("restic-local")
    # The first backup lists the repository (homesafe has no record of it) ...
    assert api.backup_apps(repository=repository).status == "ok"
    # ... and the next ones take their parent from the record of the one before.
    assert api.backup_apps(["beta"], repository=repository).status == "ok"
    assert api.backup_apps(repository=repository).status == "ok"
    first, beta_only, both = restic_snapshots(repository)
    assert "parent" not in first
    # Every app's paths are in the first snapshot: the newest holding them all.
    assert beta_only["parent"] == first["id"]
    assert both["parent"] == first["id"]

    # A parent deleted behind homesafe's back (another host's prune, say) is refused by
    # restic before it reads anything: the backup lists the repository and goes on.
    subprocess.run(
        ["restic", "-r", repository.location, "forget", both["id"]],
        capture_output=True,
        env={**os.environ, "RESTIC_PASSWORD": repository.passphrase() or ""},
        check=True,
    )
    (two_apps / "beta/data/b.txt").write_text("changed\n")
    result = api.backup_apps(repository=repository)
    assert result.status == "ok", result.to_dict()
    *_, latest = restic_snapshots(repository)
    assert latest["parent"] == first["id"]
    assert [archive.name for archive in api.list_archives(repository)][-1] == result.archive


def test_restic_refuses_an_archive_name_given_twice(
    make_repository: MakeRepository,
    two_apps: Path,  # noqa: F811
) -> None:
    repository = make_repository("restic-local")
    assert api.backup_apps(repository=repository, archive_name="nightly").status == "ok"
    # A name the caller gives may exist: it is looked for, even with a record of the
    # repository's snapshots at hand.
    again = api.backup_apps(repository=repository, archive_name="nightly")
    assert again.status == "failed"
    assert "exists already" in again.errors[0].message
    assert [archive.name for archive in api.list_archives(repository)] == ["nightly"]
    assert len(restic_snapshots(repository)) == 1


def test_restic_extracts_the_snapshot_it_listed(
    make_repository: MakeRepository,
    two_apps: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    from homesafe import archives
    from homesafe.engines.restic import NAME_TAG, ResticEngine

    repository = make_repository("restic-local")
    result = api.backup_apps(repository=repository)
    assert result.status == "ok"
    engine = ResticEngine()
    described = tmp_path / "described"
    described.mkdir()
    # The description first (the listing starts alongside), then the listing ...
    engine.extract(repository, result.archive, archives.DESCRIPTION_MEMBERS, described)
    listed = {entry.path for entry in engine.list_contents(repository, result.archive)}
    assert f"{str(two_apps).lstrip('/')}/beta/data/b.txt" in listed
    # ... then another snapshot bearing the same name, written by something else.
    (two_apps / "beta/data/b.txt").write_text("written later\n")
    subprocess.run(
        ["restic", "-r", repository.location, "backup", "--tag", NAME_TAG + result.archive,
         str(two_apps / "beta")],
        capture_output=True,
        env={**os.environ, "RESTIC_PASSWORD": repository.passphrase() or ""},
        check=True,
    )  # fmt: skip
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    engine.extract(repository, result.archive, [str(two_apps / "beta")], extracted)
    assert (extracted / str(two_apps).lstrip("/") / "beta/data/b.txt").read_text() == "beta\n"
    assert (described / archives.METADATA_FILE).is_file()


# -- what each operation costs in engine processes ---------------------------------------


@pytest.mark.parametrize("kind", ["restic-local", "restic-s3", "borg-ssh"])
def test_a_backup_is_one_engine_call_and_a_restore_reads_each_part_once(
    kind: str,
    make_repository: MakeRepository,
    two_apps: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every engine process costs its start-up (restic: ~0.5 s of key derivation; borg
    over ssh: a connection and ``borg serve``): a backup makes one, as the engine's own
    command would, and a restore on the host that wrote the archive makes two side by
    side, the extraction and the listing (no description: the host's record has it)."""
    calls = EngineCalls(tmp_path / "calls", monkeypatch)
    repository = make_repository(kind)
    engine = repository.engine
    if kind != "restic-local":
        # Made by homesafe: a listing says nothing is there (no probe before it), then
        # the repository is made; restic's gets homesafe's own key (the master key is
        # read, then the new key opens the config).
        made = [command for command in calls.commands(engine) if command != "--version"]
        assert made == (
            ["snapshots", "init", "cat", "cat"] if engine == "restic" else ["list", "init"]
        )
    calls.clear()
    assert api.backup_apps(repository=repository).status == "ok"
    if kind != "restic-local":  # made by homesafe: even its first backup is one call
        assert len(calls.commands(engine)) == 1, calls.all()
    calls.clear()

    (two_apps / "beta/data/b.txt").write_text("changed\n")
    result = api.backup_apps(repository=repository)

    assert result.status == "ok", result.to_dict()
    assert calls.commands(engine) == ["backup" if engine == "restic" else "create"]
    assert calls.count("ssh") == (1 if kind == "borg-ssh" else 0)

    calls.clear()
    target = tmp_path / "target"
    target.mkdir()
    restored = api.restore_apps(repository=repository, archive_name=result.archive,
                                target_root=target)  # fmt: skip

    assert restored.status == "ok", restored.to_dict()
    assert (target / str(two_apps).lstrip("/") / "beta/data/b.txt").read_text() == "changed\n"
    if engine == "restic":
        assert sorted(calls.commands("restic")) == ["ls", "restore"]
        # Both address the very snapshot the backup wrote, by the id it reported.
        record = archives.load_record(
            archives.record_directory(locations.home(), repository.name, result.archive),
            repository.location,
        )
        # restic 0.14 reports the short id of a new snapshot, later ones the full id.
        assert record is not None and re.fullmatch("[0-9a-f]{8,64}", record.archive_id)
        for argv in calls.all():
            assert record.archive_id in argv and "--tag" not in argv, argv
    else:
        # This host wrote the archive: its local record stands in for the description,
        # and the listing runs beside the extraction.
        assert sorted(calls.commands("borg")) == ["extract", "list"]
        assert calls.count("ssh") == 2


def test_a_restic_backup_reports_its_progress_while_it_runs(
    make_repository: MakeRepository,
    two_apps: Path,  # noqa: F811
) -> None:
    """restic's status lines become progress reports as they come: bytes done out of
    restic's count of the bytes to read, the file it is reading."""
    repository = make_repository("restic-local")
    (two_apps / "alpha/data/large.bin").write_bytes(os.urandom(48 * 1024 * 1024))
    reports: list[Progress] = []

    result = api.backup_apps(repository=repository, on_progress=reports.append)

    assert result.status == "ok", result.to_dict()
    running = [report for report in reports if report.operation == "create" and report.current]
    from_restic = [report for report in running if not report.finished and report.message]
    assert from_restic, [(r.current, r.total, r.message, r.finished) for r in reports]
    assert any(report.message.startswith(str(two_apps)) for report in from_restic)
    done = [report.current for report in from_restic]
    assert done == sorted(done) and 0 < done[-1] <= 49 * 1024 * 1024
    assert all(report.total and report.total >= report.current for report in from_restic)
    assert reports[-1].finished


def test_a_restic_record_whose_snapshot_is_gone_is_found_out(
    make_repository: MakeRepository,
    two_apps: Path,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A restic archive deleted and written again under the same name: the record
    kept of the first names a snapshot id that is gone, so the restore reads the
    archive by its name instead, restores exactly what it holds, and drops the record."""
    repository = make_repository("restic-local")
    api.backup_apps(repository=repository, archive_name="again")
    record = archives.record_directory(locations.home(), repository.name, "again")
    assert record is not None
    stale = two_apps.parent / "stale-record"
    shutil.copytree(record, stale)
    api.delete_archives(["again"], repository=repository)
    assert not record.exists()  # deleting forgets the record
    (two_apps / "beta/data/late.txt").write_text("written after the first backup\n")
    expected = roundtrip.snapshot_tree(two_apps)
    api.backup_apps(repository=repository, archive_name="again")
    shutil.rmtree(record)
    shutil.copytree(stale, record)
    (two_apps / "beta/data/late.txt").write_text("changed since\n")
    (two_apps / "alpha/data/notes.txt").unlink()

    result = api.restore_apps("again", repository=repository)

    assert result.status == "ok", result.to_dict()
    assert roundtrip.snapshot_tree(two_apps) == expected
    assert not record.exists()
    assert "the local record of archive again is stale" in caplog.text


@pytest.mark.parametrize("kind", ["restic-s3", "borg-ssh"])
def test_a_scheduled_run_lists_once_backs_up_once_and_prunes_from_that_listing(
    kind: str,
    make_repository: MakeRepository,
    two_apps: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The listing made before a scheduled backup serves the decision, the archive's
    name (restic does not list again to look for it) and retention afterwards."""
    from homesafe import scheduler, schedules

    calls = EngineCalls(tmp_path / "calls", monkeypatch)
    repository = make_repository(kind)
    now = datetime.datetime.now(datetime.UTC)
    schedule = schedules.load_or_default(repository.name).changed(
        enabled=True, timezone="UTC", run_at_hour=(now.hour + 12) % 24,
        daily_to_keep=1, weekly_to_keep=0, monthly_to_keep=0,
    )  # fmt: skip
    schedules.save(schedule)
    listing, backup = ("snapshots", "backup") if kind == "restic-s3" else ("list", "create")
    # A deletion looks its names up first, so that a name that is not there deletes
    # nothing (restic deletes by id; borg would be half done).
    deletion = (
        [listing, "forget", "prune"] if kind == "restic-s3" else [listing, "delete", "compact"]
    )
    calls.clear()

    first = scheduler.run(now).reports[0]

    assert first.action == "backed-up", first.to_dict()
    assert calls.commands(repository.engine) == [listing, backup]
    calls.clear()

    second = scheduler.run(now + datetime.timedelta(days=1)).reports[0]

    assert second.action == "backed-up", second.to_dict()
    assert first.backup is not None and second.backup is not None
    assert second.pruned == [first.backup["archive"]]
    assert calls.commands(repository.engine) == [listing, backup, *deletion]
    assert [archive.name for archive in api.list_archives(repository)] == [second.backup["archive"]]


@pytest.mark.parametrize("remote_minimum", [None, 1], ids=["default", "one-byte"])
def test_a_restore_over_ssh_shares_out_only_what_pays_for_another_connection(
    make_repository: MakeRepository,
    two_apps: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    remote_minimum: int | None,
) -> None:
    """Each `borg extract` over ssh opens a connection and starts `borg serve`: where
    calls on a local repository would share the apps out (any size, here), one over
    ssh takes them all unless each call gets REMOTE_PARALLEL_EXTRACTION_MIN_BYTES (a
    restore from a record, as here)."""
    from homesafe import restore
    from homesafe.engines import engine_for

    if engine_for("borg").extract_concurrency < 2:
        pytest.skip("one core: nothing is extracted side by side")
    monkeypatch.setattr(restore, "PARALLEL_EXTRACTION_MIN_BYTES", 1)
    if remote_minimum is not None:
        monkeypatch.setattr(restore, "REMOTE_PARALLEL_EXTRACTION_MIN_BYTES", remote_minimum)
    repository = make_repository("borg-ssh")
    backup = api.backup_apps(repository=repository)
    assert backup.status == "ok", backup.to_dict()
    calls = EngineCalls(tmp_path / "calls", monkeypatch)
    target = tmp_path / "target"
    target.mkdir()

    restored = api.restore_apps(backup.archive, repository=repository, target_root=target)

    assert restored.status == "ok", restored.to_dict()
    extractions = calls.commands("borg").count("extract")
    assert (extractions == 1) if remote_minimum is None else (extractions > 1)
