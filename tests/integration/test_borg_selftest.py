"""borg's self-tests with real borg: run by homesafe's first borg call after borg
changed and once a day, switched off (``BORG_SELFTEST=disabled``) in the calls between,
and run again after a call that ran them failed."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from homesafe import api
from homesafe.engines import borg
from tests.conftest import ManifestWriter, requires_program
from tests.support.apps import make_tree, to_toml

pytestmark = requires_program("borg")

# A borg in front of the real one on PATH: it notes the BORG_SELFTEST each call gets,
# then becomes the real borg.
RECORDER = """\
#!{python}
import os, sys
with open({log!r}, "a") as log:
    log.write(os.environ.get("BORG_SELFTEST", "run") + "\\n")
os.execv({real!r}, [{real!r}, *sys.argv[1:]])
"""


@pytest.fixture
def recorded(homesafe_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The log of the recorder borg put first on PATH: one line per borg call (``run``
    or ``disabled``), `borg --version` calls left out by the caller."""
    real = shutil.which("borg")
    assert real is not None
    directory = homesafe_env / "recorder"
    directory.mkdir()
    log = directory / "calls"
    recorder = directory / "borg"
    recorder.write_text(RECORDER.format(python=sys.executable, log=str(log), real=real))
    recorder.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    return log


@pytest.fixture
def app(homesafe_env: Path, write_manifest: ManifestWriter) -> Path:
    data = make_tree(homesafe_env / "srv/app", {"a.txt": "content\n"})
    write_manifest("app", to_toml({"id": "app", "data": {"directories": [str(data)]}}))
    return data


def calls(log: Path) -> list[str]:
    lines = log.read_text().splitlines() if log.exists() else []
    log.write_text("")
    return lines


def test_self_tests_run_once_then_not_until_a_day_passed_or_borg_changed(
    homesafe_env: Path, app: Path, recorded: Path
) -> None:
    # Creating the embedded repository: `borg --version`, then `borg init` with the
    # self-tests (the first call of this borg), then `borg create` without them.
    assert api.backup_apps().status == "ok"
    assert calls(recorded) == ["run", "run", "disabled"]
    assert api.backup_apps().status == "ok"
    assert calls(recorded) == ["disabled"]

    # A day later they run again, once.
    version_file = homesafe_env / "home/borg-version.json"
    noted = json.loads(version_file.read_text())
    noted["selftest_passed"] -= borg.SELFTEST_INTERVAL_SECONDS + 60
    version_file.write_text(json.dumps(noted))
    assert api.backup_apps().status == "ok"
    assert api.backup_apps().status == "ok"
    assert calls(recorded) == ["run", "disabled"]

    # Another borg (here: the same, reinstalled) runs them again, after its version.
    recorder = recorded.parent / "borg"
    later = time.time() + 5
    os.utime(recorder, (later, later))
    assert api.backup_apps().status == "ok"
    assert calls(recorded) == ["run", "run"]
    assert api.backup_apps().status == "ok"
    assert calls(recorded) == ["disabled"]


def test_self_tests_run_again_after_a_call_that_ran_them_failed(
    homesafe_env: Path, app: Path, recorded: Path
) -> None:
    """A call that fails says nothing of the self-tests: the next call runs them."""
    assert api.backup_apps().status == "ok"
    version_file = homesafe_env / "home/borg-version.json"
    noted = json.loads(version_file.read_text())
    noted["selftest_passed"] -= borg.SELFTEST_INTERVAL_SECONDS + 60
    version_file.write_text(json.dumps(noted))
    passphrase = homesafe_env / "home/secrets/default.passphrase"
    kept = passphrase.read_text()
    passphrase.write_text("not the passphrase\n")
    calls(recorded)

    assert api.backup_apps().status == "failed"
    assert calls(recorded) == ["run"]
    passphrase.write_text(kept)
    assert api.backup_apps().status == "ok"
    assert api.backup_apps().status == "ok"
    assert calls(recorded) == ["run", "disabled"]
