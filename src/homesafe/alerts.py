"""Alerts: telling someone when a backup fails or is overdue.

Channels are configured per repository, each of one kind:

* ``webhook``: a JSON POST of the event to a URL;
* ``ntfy``: a POST of the message to an ntfy topic URL (title, priority and tags in
  headers, an optional access token as a bearer token);
* ``email``: a mail over SMTP (plain, STARTTLS or TLS; optional login);
* ``healthchecks``: healthchecks.io-style pings: ``URL/start`` when a run starts,
  ``URL`` when it succeeds, ``URL/fail`` when it fails (the server then notices a run
  that never came by itself).

Events are ``start``, ``success``, ``failure`` and ``overdue``; each channel listens to
some of them (pings: start, success, failure; the others: failure and overdue).

A channel's secret (SMTP password, access token) is kept in
``$HOMESAFE_HOME/secrets/alert-<repository>-<name>.secret`` (0600), never in the state
database, in argv or in logs. A channel that fails is logged and reported in the
returned deliveries; it never fails the operation that sent the alert.
"""

from __future__ import annotations

import datetime
import json
import logging
import smtplib
import sqlite3
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from homesafe import locations, state
from homesafe.errors import UsageError

__all__ = [
    "DEFAULT_EVENTS",
    "EVENTS",
    "KINDS",
    "Channel",
    "Delivery",
    "Event",
    "add_channel",
    "channels",
    "remove_channel",
    "send",
]

logger = logging.getLogger(__name__)

KINDS = ("webhook", "ntfy", "email", "healthchecks")
EVENTS = ("start", "success", "failure", "overdue")
DEFAULT_EVENTS: dict[str, tuple[str, ...]] = {
    "webhook": ("failure", "overdue"),
    "ntfy": ("failure", "overdue"),
    "email": ("failure", "overdue"),
    "healthchecks": ("start", "success", "failure"),
}
SMTP_SECURITY = ("none", "starttls", "tls")
TIMEOUT_SECONDS = 15.0
USER_AGENT = "homesafe-alerts"


@dataclass(frozen=True)
class Event:
    """Something worth telling: what happened, to which repository, and the details."""

    kind: str  # one of EVENTS
    repository: str
    title: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    host: str = field(default_factory=locations.hostname)
    time: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "repository": self.repository,
            "host": self.host,
            "time": self.time.isoformat(),
            "title": self.title,
            "message": self.message,
            "details": self.details,
        }


@dataclass(frozen=True)
class Channel:
    """Where alerts of one repository go. ``settings`` never holds the secret."""

    repository: str
    name: str
    kind: str
    events: tuple[str, ...]
    settings: dict[str, Any]

    @property
    def secret_file(self) -> Path:
        return locations.home() / "secrets" / f"alert-{self.repository}-{self.name}.secret"

    def secret(self) -> str | None:
        try:
            return self.secret_file.read_text().rstrip("\n") or None
        except FileNotFoundError:
            return None

    def target(self) -> str:
        """Where it sends, for listings (no credentials, no path: those can be secret)."""
        if self.kind == "email":
            return f"{', '.join(self.settings.get('to', []))} via {self.settings.get('host')}"
        parsed = urllib.parse.urlsplit(str(self.settings.get("url", "")))
        return f"{parsed.scheme}://{parsed.hostname}{f':{parsed.port}' if parsed.port else ''}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "name": self.name,
            "kind": self.kind,
            "events": list(self.events),
            "settings": self.settings,
            "has_secret": self.secret_file.exists(),
        }


@dataclass(frozen=True)
class Delivery:
    """The outcome of sending one event to one channel."""

    channel: str
    kind: str
    event: str
    delivered: bool
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "kind": self.kind,
            "event": self.event,
            "delivered": self.delivered,
            "error": self.error,
        }


# -- configuration -----------------------------------------------------------------------


def _check_url(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"{url!r} is not an http(s) URL")
    return url


def add_channel(
    repository: str,
    name: str,
    kind: str,
    *,
    settings: dict[str, Any],
    events: Sequence[str] | None = None,
    secret: str | None = None,
) -> Channel:
    """Add (or replace) the channel ``name`` of ``repository``.

    ``settings``: ``url`` for webhook, ntfy and healthchecks; for email ``host``,
    ``port``, ``security`` (none, starttls, tls), ``ca_file`` (to trust a private CA),
    ``sender``, ``to`` (a list) and ``username``. ``secret`` (SMTP password or access
    token) goes to a 0600 file.
    """
    if kind not in KINDS:
        raise UsageError(f"unknown alert kind {kind!r}", hint=f"Kinds: {', '.join(KINDS)}.")
    if not name or not all(character.isalnum() or character in "-_" for character in name):
        raise UsageError(f"{name!r} cannot be a channel name: use letters, digits, - and _")
    chosen = tuple(events) if events else DEFAULT_EVENTS[kind]
    unknown = [event for event in chosen if event not in EVENTS]
    if unknown:
        raise UsageError(
            f"unknown event {', '.join(unknown)}", hint=f"Events: {', '.join(EVENTS)}."
        )
    settings = dict(settings)
    if kind == "email":
        if not settings.get("host") or not settings.get("to"):
            raise UsageError("an email channel needs an SMTP host and at least one recipient")
        security = settings.setdefault("security", "starttls")
        if security not in SMTP_SECURITY:
            raise UsageError(f"SMTP security must be one of {', '.join(SMTP_SECURITY)}")
        default_port = {"none": 25, "starttls": 587, "tls": 465}[security]
        settings["port"] = int(settings.get("port") or default_port)
        settings["to"] = list(settings["to"])
        settings.setdefault("sender", f"homesafe@{locations.hostname()}")
    else:
        _check_url(str(settings.get("url", "")))
    channel = Channel(repository, name, kind, chosen, settings)
    with state.connect() as connection:
        connection.execute(
            "INSERT INTO alert_channels (repository, name, kind, events, settings) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (repository, name) DO UPDATE SET "
            "kind = excluded.kind, events = excluded.events, settings = excluded.settings",
            (repository, name, kind, json.dumps(list(chosen)), json.dumps(settings)),
        )
    if secret is not None:
        locations.write_secret_file(channel.secret_file, secret + "\n")
    return channel


def remove_channel(repository: str, name: str) -> bool:
    """Remove a channel and its secret; False when there was no such channel."""
    with state.connect() as connection:
        removed = connection.execute(
            "DELETE FROM alert_channels WHERE repository = ? AND name = ?", (repository, name)
        ).rowcount
    Channel(repository, name, "webhook", (), {}).secret_file.unlink(missing_ok=True)
    return removed > 0


def channels(repository: str | None = None) -> list[Channel]:
    """The channels of ``repository`` (all channels when None), by name."""
    query = "SELECT repository, name, kind, events, settings FROM alert_channels"
    parameters: tuple[str, ...] = ()
    if repository is not None:
        query += " WHERE repository = ?"
        parameters = (repository,)
    with state.connect() as connection:
        rows = connection.execute(query + " ORDER BY repository, name", parameters).fetchall()
    return [
        Channel(repository_name, name, kind, tuple(json.loads(events)), json.loads(settings))
        for repository_name, name, kind, events, settings in rows
    ]


# -- delivery ----------------------------------------------------------------------------


def send(event: Event, targets: Iterable[Channel] | None = None) -> list[Delivery]:
    """Send ``event`` to every channel of its repository that listens to it.

    Never raises for a channel's failure: each one is logged as a warning and returned
    as an undelivered :class:`Delivery`.
    """
    try:
        chosen = channels(event.repository) if targets is None else list(targets)
    except sqlite3.Error as error:
        logger.warning("cannot read the alert channels of %s: %s", event.repository, error)
        return []
    deliveries = []
    for channel in chosen:
        if event.kind not in channel.events:
            continue
        try:
            SENDERS[channel.kind](channel, event)
        except Exception as error:  # a broken channel must never break a backup
            reason = _describe_failure(error)
            logger.warning(
                "alert channel %r (%s) could not send the %s alert: %s",
                channel.name,
                channel.kind,
                event.kind,
                reason,
            )
            deliveries.append(Delivery(channel.name, channel.kind, event.kind, False, reason))
        else:
            deliveries.append(Delivery(channel.name, channel.kind, event.kind, True))
    return deliveries


def _describe_failure(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"cannot connect: {error.reason}"
    if isinstance(error, smtplib.SMTPException):
        return f"SMTP: {error}"
    if isinstance(error, OSError):
        return f"{type(error).__name__}: {error.strerror or error}"
    return f"{type(error).__name__}: {error}"


def _post(url: str, body: bytes, headers: dict[str, str], *, method: str = "POST") -> None:
    request = urllib.request.Request(  # noqa: S310 (the scheme is checked: http or https)
        _check_url(url),
        data=body if method == "POST" else None,
        method=method,
        headers={"User-Agent": USER_AGENT, **headers},
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310
        response.read()


def _send_webhook(channel: Channel, event: Event) -> None:
    headers = {"Content-Type": "application/json"}
    token = channel.secret()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    _post(channel.settings["url"], json.dumps(event.to_dict()).encode(), headers)


NTFY_PRIORITY = {"failure": "high", "overdue": "high", "start": "low", "success": "default"}
NTFY_TAGS = {"failure": "rotating_light", "overdue": "warning", "start": "hourglass",
             "success": "white_check_mark"}  # fmt: skip


def _send_ntfy(channel: Channel, event: Event) -> None:
    # Header values must be latin-1: ntfy reads RFC 2047 encoded words for the rest.
    title = event.title
    if not title.isascii():
        from email.header import Header

        title = Header(title, "utf-8").encode()
    headers = {
        "Title": title,
        "Priority": NTFY_PRIORITY[event.kind],
        "Tags": NTFY_TAGS[event.kind],
        "Content-Type": "text/plain; charset=utf-8",
    }
    token = channel.secret()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    _post(channel.settings["url"], event.message.encode(), headers)


def _send_healthchecks(channel: Channel, event: Event) -> None:
    base = str(channel.settings["url"]).rstrip("/")
    suffix = {"start": "/start", "success": "", "failure": "/fail", "overdue": "/fail"}
    # The body shows in the check's log on the server: the message is enough there.
    _post(base + suffix[event.kind], event.message.encode()[:100_000], {})


def _send_email(channel: Channel, event: Event) -> None:
    settings = channel.settings
    message = EmailMessage()
    message["Subject"] = f"[homesafe] {event.title}"
    message["From"] = settings["sender"]
    message["To"] = ", ".join(settings["to"])
    message.set_content(
        f"{event.message}\n\nHost: {event.host}\nRepository: {event.repository}\n"
        f"Time: {event.time.isoformat()}\n\n"
        f"Details:\n{json.dumps(event.details, indent=2, sort_keys=True)}\n"
    )
    security = settings.get("security", "starttls")
    host, port = str(settings["host"]), int(settings["port"])
    # A self-hosted mail server often has a certificate of a private CA: ca_file names it.
    context = ssl.create_default_context(cafile=settings.get("ca_file") or None)
    client: smtplib.SMTP
    if security == "tls":
        client = smtplib.SMTP_SSL(host, port, timeout=TIMEOUT_SECONDS, context=context)
    else:
        client = smtplib.SMTP(host, port, timeout=TIMEOUT_SECONDS)
    with client:
        if security == "starttls":
            client.starttls(context=context)
        password = channel.secret()
        if settings.get("username") and password:
            client.login(str(settings["username"]), password)
        client.send_message(message)


SENDERS = {
    "webhook": _send_webhook,
    "ntfy": _send_ntfy,
    "email": _send_email,
    "healthchecks": _send_healthchecks,
}
