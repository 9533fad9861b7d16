"""Alerts received by real servers on 127.0.0.1: webhook, ntfy and healthchecks pings
over HTTP, e-mail over SMTP (aiosmtpd, plain with a login, and STARTTLS); failing
channels logged, never raised; secrets kept out of the state database."""

from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from homesafe import alerts, locations
from tests.support.alert_servers import RecordingServer, free_port, http_server, smtp_server

HOMESAFE = shutil.which("homesafe", path=str(Path(sys.executable).parent)) or "homesafe"


@pytest.fixture
def server(homesafe_env: Path) -> Iterator[RecordingServer]:
    with http_server() as running:
        yield running


def failure(message: str = "notes: backup_pre hook failed") -> alerts.Event:
    return alerts.Event(
        "failure", "default", "Scheduled backup (daily) failed", message, {"job": 7}
    )


def state_bytes() -> bytes:
    return locations.state_database().read_bytes()


def test_webhook_posts_the_event_as_json_with_its_token(server: RecordingServer) -> None:
    alerts.add_channel(
        "default", "hook", "webhook", settings={"url": f"{server.url}/hooks/backup"},
        secret="t0ken-s3cret",
    )  # fmt: skip
    deliveries = alerts.send(failure())
    assert [delivery.to_dict() for delivery in deliveries] == [
        {"channel": "hook", "kind": "webhook", "event": "failure", "delivered": True,
         "error": ""}
    ]  # fmt: skip
    (request,) = server.requests
    assert (request.method, request.path) == ("POST", "/hooks/backup")
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Authorization"] == "Bearer t0ken-s3cret"
    body = json.loads(request.body)
    assert body["event"] == "failure"
    assert body["repository"] == "default"
    assert body["message"] == "notes: backup_pre hook failed"
    assert body["details"] == {"job": 7}
    assert body["host"]
    assert b"t0ken-s3cret" not in state_bytes()
    secret_file = alerts.channels("default")[0].secret_file
    assert secret_file.stat().st_mode & 0o777 == 0o600


def test_a_channel_gets_only_the_events_it_listens_to(server: RecordingServer) -> None:
    alerts.add_channel("default", "hook", "webhook", settings={"url": server.url})
    success = alerts.Event("success", "default", "Scheduled backup succeeded", "fine")
    assert alerts.send(success) == []
    assert alerts.send(alerts.Event("overdue", "default", "Overdue", "late"))[0].delivered
    assert [json.loads(request.body)["event"] for request in server.requests] == ["overdue"]
    # And only the channels of the event's repository.
    other = alerts.Event("failure", "elsewhere", "Failed", "failed")
    assert alerts.send(other) == []


def test_ntfy_posts_the_message_to_the_topic(server: RecordingServer) -> None:
    alerts.add_channel(
        "default", "phone", "ntfy", settings={"url": f"{server.url}/homesafe-alerts"},
        secret="tk_abc",
    )  # fmt: skip
    event = alerts.Event("failure", "default", "Sauvegarde échouée", "notes failed")
    assert alerts.send(event)[0].delivered
    (request,) = server.requests
    assert (request.method, request.path) == ("POST", "/homesafe-alerts")
    assert request.body == b"notes failed"
    assert request.headers["Priority"] == "high"
    assert request.headers["Tags"] == "rotating_light"
    assert request.headers["Authorization"] == "Bearer tk_abc"
    # Non-ASCII titles travel as an RFC 2047 encoded word, which ntfy decodes.
    assert request.headers["Title"].startswith("=?utf-8?")
    from email.header import decode_header

    ((raw, charset),) = decode_header(request.headers["Title"])
    assert isinstance(raw, bytes) and raw.decode(charset or "ascii") == "Sauvegarde échouée"


def test_healthchecks_pings_start_success_and_fail(server: RecordingServer) -> None:
    alerts.add_channel(
        "default", "hc", "healthchecks", settings={"url": f"{server.url}/ping/1234-abcd/"}
    )
    for kind in ("start", "success", "failure", "overdue"):
        alerts.send(alerts.Event(kind, "default", kind, f"{kind} message"))
    # Overdue is not a ping: the healthchecks server notices a missing ping by itself.
    assert [(request.method, request.path) for request in server.requests] == [
        ("POST", "/ping/1234-abcd/start"),
        ("POST", "/ping/1234-abcd"),
        ("POST", "/ping/1234-abcd/fail"),
    ]
    assert server.requests[2].body == b"failure message"


def test_email_is_sent_over_smtp_with_a_login(homesafe_env: Path) -> None:
    with smtp_server(password="mail-pa55word") as (inbox, port):
        alerts.add_channel(
            "default", "mail", "email",
            settings={"host": "127.0.0.1", "port": port, "security": "none",
                      "to": ["admin@example.org", "ops@example.org"],
                      "sender": "homesafe@box.example.org", "username": "homesafe"},
            secret="mail-pa55word",
        )  # fmt: skip
        deliveries = alerts.send(failure("engine: borg failed"))
    assert deliveries[0].delivered, deliveries
    assert inbox.logins == [("homesafe", "mail-pa55word")]
    ((sender, recipients, message),) = inbox.messages
    assert sender == "homesafe@box.example.org"
    assert recipients == ["admin@example.org", "ops@example.org"]
    assert message["Subject"] == "[homesafe] Scheduled backup (daily) failed"
    assert message["To"] == "admin@example.org, ops@example.org"
    body = message.get_content()
    assert "engine: borg failed" in body
    assert "Repository: default" in body
    assert b"mail-pa55word" not in state_bytes()


def test_email_over_starttls_with_a_private_ca(homesafe_env: Path) -> None:
    certificate, key = homesafe_env / "smtp.crt", homesafe_env / "smtp.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(certificate)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    with smtp_server(tls_context=context) as (inbox, port):
        alerts.add_channel(
            "default", "mail", "email",
            settings={"host": "127.0.0.1", "port": port, "security": "starttls",
                      "to": ["admin@example.org"], "ca_file": str(certificate)},
        )  # fmt: skip
        trusted = alerts.send(failure())
        alerts.add_channel(
            "default", "mail", "email",
            settings={"host": "127.0.0.1", "port": port, "security": "starttls",
                      "to": ["admin@example.org"]},
        )  # fmt: skip
        untrusted = alerts.send(failure())
    assert trusted[0].delivered, trusted
    assert len(inbox.messages) == 1
    assert inbox.tls_sessions == 1
    assert not untrusted[0].delivered
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted[0].error


def test_failing_channels_are_logged_and_the_others_still_receive(
    server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    closed = free_port()
    with http_server() as broken:
        broken.status = 500
        alerts.add_channel("default", "a-refused", "webhook",
                           settings={"url": f"http://127.0.0.1:{closed}/x"})  # fmt: skip
        alerts.add_channel("default", "b-error", "ntfy", settings={"url": f"{broken.url}/t"})
        alerts.add_channel(
            "default", "c-mail", "email",
            settings={"host": "127.0.0.1", "port": closed, "security": "none",
                      "to": ["admin@example.org"]},
        )  # fmt: skip
        alerts.add_channel("default", "d-good", "webhook", settings={"url": server.url})
        with caplog.at_level(logging.WARNING, logger="homesafe.alerts"):
            deliveries = alerts.send(failure())
        assert len(broken.requests) == 1
    outcome = {delivery.channel: (delivery.delivered, delivery.error) for delivery in deliveries}
    assert outcome["a-refused"][0] is False
    assert "cannot connect" in outcome["a-refused"][1]
    assert outcome["b-error"] == (False, "HTTP 500 Internal Server Error")
    assert outcome["c-mail"][0] is False
    assert "ConnectionRefusedError" in outcome["c-mail"][1]
    assert outcome["d-good"] == (True, "")
    assert len(server.requests) == 1
    logged = [record.getMessage() for record in caplog.records]
    assert len(logged) == 3
    assert any("'b-error' (ntfy)" in line and "HTTP 500" in line for line in logged)


def test_channels_are_validated(homesafe_env: Path) -> None:
    from homesafe.errors import UsageError

    with pytest.raises(UsageError, match="not an http"):
        alerts.add_channel("default", "x", "webhook", settings={"url": "file:///etc/passwd"})
    with pytest.raises(UsageError, match="unknown alert kind"):
        alerts.add_channel("default", "x", "pager", settings={})
    with pytest.raises(UsageError, match="unknown event"):
        alerts.add_channel("default", "x", "ntfy", settings={"url": "http://a/b"}, events=["x"])
    with pytest.raises(UsageError, match="recipient"):
        alerts.add_channel("default", "x", "email", settings={"host": "mail"})
    with pytest.raises(UsageError, match="channel name"):
        alerts.add_channel("default", "../x", "ntfy", settings={"url": "http://a/b"})
    assert alerts.channels() == []


def homesafe(*arguments: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HOMESAFE, *arguments], input=stdin, capture_output=True, text=True,
        env=os.environ.copy(), check=False,
    )  # fmt: skip


def test_the_alerts_commands(server: RecordingServer) -> None:
    added = homesafe(
        "alerts", "add", "webhook", "hook", "--url", f"{server.url}/h", "--on", "failure",
        "--on", "success", "--secret-stdin", stdin="from-stdin\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    listed = homesafe("alerts", "list", "--json")
    (channel,) = json.loads(listed.stdout)["channels"]
    assert channel["events"] == ["failure", "success"]
    assert channel["has_secret"] is True
    assert "from-stdin" not in listed.stdout
    tested = homesafe("alerts", "test", "hook")
    assert tested.returncode == 0, tested.stderr
    (request,) = server.requests
    assert request.headers["Authorization"] == "Bearer from-stdin"
    assert json.loads(request.body)["title"] == "Test alert from homesafe"

    server.status = 503
    failed = homesafe("alerts", "test", "hook")
    assert failed.returncode == 1
    assert "HTTP 503" in failed.stderr

    assert homesafe("alerts", "remove", "hook").returncode == 0
    assert homesafe("alerts", "remove", "hook").returncode == 2
    assert json.loads(homesafe("alerts", "list", "--json").stdout) == {"channels": []}
    assert not (locations.home() / "secrets" / "alert-default-hook.secret").exists()
    unknown_repository = homesafe("alerts", "add", "ntfy", "x", "--repository", "nowhere",
                                  "--url", server.url)  # fmt: skip
    assert unknown_repository.returncode == 2
    assert "nowhere" in unknown_repository.stderr
