"""The apache service handler against a real apache2 serving on 127.0.0.1.

An app's apache site, config and module are its "services": enabled ones are disabled
for the backup (a graceful reload makes it real: the site stops being served) and
enabled again after; disabled ones stay disabled, and apache is reloaded only when it
runs. What a2query reports afterwards is what it reported before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from homesafe import api
from homesafe.apps import App
from homesafe.manifest import parse_manifest
from tests.conftest import requires_program
from tests.support.apache import CONFIGURATION, Apache, a2query, get, running_pid, unavailable
from tests.support.apps import describe, lockdown_flags, make_tree

pytestmark = requires_program("borg")

SERVED = "homesafe-test-served"
IDLE = "homesafe-test-idle"
MARKER = "served by the homesafe test site"

# (a2query flag, manifest kind, name, enabled before the backup)
SERVICES = [
    ("-s", "site", SERVED, True),
    ("-s", "site", IDLE, False),
    ("-c", "config", "serve-cgi-bin", True),
    ("-m", "module", "status", True),
    ("-m", "module", "headers", False),
]


def states() -> dict[str, bool]:
    return {f"{kind} {name}": a2query(flag, name) for flag, kind, name, _ in SERVICES}


def enabled_links() -> dict[str, list[str]]:
    return {
        directory: sorted(os.listdir(CONFIGURATION / directory))
        for directory in ("sites-enabled", "conf-enabled", "mods-enabled")
    }


@pytest.fixture
def apache(tmp_path: Path) -> Iterator[Apache]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = Apache(tmp_path)
    try:
        server.listen_on_loopback()
        server.add_site(SERVED, f"<p>{MARKER}</p>\n")
        server.add_site(IDLE, "<p>never enabled</p>\n")
        server.run("a2ensite", "-q", SERVED)
        server.run("a2dismod", "-q", "headers")  # make the "disabled" ones sure
        server.run("a2dissite", "-q", IDLE)
        yield server
    finally:
        server.close()


class Probe:
    """The app's Python backup_pre hook: what a client and a2query saw meanwhile."""

    def __init__(self, server: Apache) -> None:
        self.server = server
        self.states: dict[str, bool] = {}
        self.body: str | None = None
        self.seconds_to_stop = -1.0
        self.apache_pid: int | None = None

    def backup_pre(self, packet: api.Packet) -> str:
        self.states = states()
        self.apache_pid = running_pid()
        if self.apache_pid is not None:
            # A graceful reload: new connections see the new configuration at once.
            self.seconds_to_stop = self.server.wait_until(
                lambda: MARKER not in (get(self.server.url) or ""),
                "the disabled site is still served",
                timeout=5,
            )
            self.body = get(self.server.url)
        return "probed"


def web_app(homesafe_env: Path, probe: Probe) -> dict[str, App]:
    data = make_tree(homesafe_env / "srv" / "web", {"index.php": "<?php echo 1;"})
    manifest: dict[str, Any] = {
        "id": "web",
        "data": {"directories": [str(data)]},
        "services": [
            {"type": "apache", "kind": kind, "name": name} for _, kind, name, _ in SERVICES
        ],
    }
    return {"web": App(parse_manifest(manifest, "test"), "test", probe)}


def test_enabled_parts_are_disabled_for_the_backup_and_served_again_after(
    homesafe_env: Path, apache: Apache
) -> None:
    apache.start()
    assert MARKER in (get(apache.url) or "")
    before = states()
    assert before == {f"{kind} {name}": enabled for _, kind, name, enabled in SERVICES}
    links = enabled_links()
    pid = running_pid()
    probe = Probe(apache)

    result = api.backup_apps(apps=web_app(homesafe_env, probe))

    assert result.status == "ok", describe(result)
    # During the backup: everything of the app disabled, and the site really not served.
    assert probe.states == {key: False for key in before}
    assert probe.body is not None and MARKER not in probe.body
    assert 0 <= probe.seconds_to_stop < 5
    # After: served again, and exactly the prior state.
    apache.wait_until(lambda: MARKER in (get(apache.url) or ""), "the site is not served again")
    assert states() == before
    assert enabled_links() == links
    assert running_pid() == pid  # reloaded gracefully, never restarted
    web = result.app("web")
    assert web.strategy == "staged" and web.downtime > 0
    assert lockdown_flags(homesafe_env) == []


def test_a_stopped_apache_is_not_reloaded_into_running(homesafe_env: Path, apache: Apache) -> None:
    assert running_pid() is None
    before = states()
    probe = Probe(apache)

    result = api.backup_apps(apps=web_app(homesafe_env, probe))

    assert result.status == "ok", describe(result)
    assert probe.states == {key: False for key in before}
    assert probe.apache_pid is None
    assert states() == before
    # `apache2ctl graceful` would have started it: homesafe reloads only a running one.
    assert running_pid() is None
    assert get(apache.url) is None
