"""``homesafe alerts``: where failed and overdue backups are reported."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from homesafe.cli.output import console, print_json
from homesafe.cli.schedule import REPOSITORY_OPTION

EVENTS = ("start", "success", "failure", "overdue")


@click.group("alerts", invoke_without_command=True)
@click.pass_context
def alerts_group(context: click.Context) -> None:
    """Alert channels per repository: webhook, ntfy, email, healthchecks (default: list).

    Scheduled backups alert the channels on failure and when a backup is overdue;
    healthchecks-style channels are pinged at start, success and failure. A failing
    channel is logged; it never fails a backup.
    """
    if context.invoked_subcommand is None:
        context.invoke(list_command)


@alerts_group.command("list")
@click.option("--repository", "--repo", "repository_name", metavar="NAME", help="Only NAME's.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_command(repository_name: str | None = None, as_json: bool = False) -> None:
    """List the alert channels."""
    from homesafe import alerts

    channels = alerts.channels(repository_name)
    if as_json:
        print_json({"channels": [channel.to_dict() for channel in channels]})
        return
    from rich.table import Table

    table = Table()
    for column in ("repository", "name", "kind", "target", "events"):
        table.add_column(column)
    for channel in channels:
        table.add_row(
            channel.repository,
            channel.name,
            channel.kind,
            channel.target(),
            ", ".join(channel.events),
        )
    console().print(table)


@alerts_group.command("add")
@click.argument("kind", type=click.Choice(["webhook", "ntfy", "email", "healthchecks"]))
@click.argument("name")
@REPOSITORY_OPTION
@click.option("--url", help="webhook, ntfy topic or healthchecks ping URL.")
@click.option("--smtp-host", help="email: the SMTP server.")
@click.option("--smtp-port", type=int, help="email: its port (default by --smtp-security).")
@click.option(
    "--smtp-security",
    type=click.Choice(["starttls", "tls", "none"]),
    default="starttls",
    show_default=True,
    help="email: how the connection is protected.",
)
@click.option(
    "--smtp-ca-file",
    type=click.Path(exists=True, dir_okay=False),
    help="email: trust the server certificate signed by this CA (a private one).",
)
@click.option("--sender", "--from", "sender", help="email: the From address.")
@click.option("--to", "recipients", multiple=True, help="email: a recipient (repeatable).")
@click.option("--username", help="email: the SMTP login.")
@click.option(
    "--secret-stdin",
    is_flag=True,
    help="Read the SMTP password or access token from standard input (kept in a 0600 "
    "file under $HOMESAFE_HOME/secrets, never in the state database).",
)
@click.option(
    "--on", "events", multiple=True, type=click.Choice(EVENTS), help="Events to send (repeatable)."
)
def add_command(
    kind: str,
    name: str,
    repository_name: str,
    url: str | None,
    smtp_host: str | None,
    smtp_port: int | None,
    smtp_security: str,
    smtp_ca_file: str | None,
    sender: str | None,
    recipients: tuple[str, ...],
    username: str | None,
    secret_stdin: bool,
    events: tuple[str, ...],
) -> None:
    """Add (or replace) the alert channel NAME of a repository."""
    from homesafe import alerts
    from homesafe.cli.schedule import require_repository

    require_repository(repository_name)
    settings: dict[str, object]
    if kind == "email":
        settings = {
            "host": smtp_host,
            "port": smtp_port,
            "security": smtp_security,
            "to": list(recipients),
            "username": username,
        }
        if sender:
            settings["sender"] = sender
        if smtp_ca_file:
            settings["ca_file"] = str(Path(smtp_ca_file).resolve())
    else:
        settings = {"url": url}
    secret = sys.stdin.readline().rstrip("\n") if secret_stdin else None
    channel = alerts.add_channel(
        repository_name, name, kind, settings=settings, events=events or None, secret=secret
    )
    click.echo(
        f"Alert channel {channel.name} ({channel.kind} to {channel.target()}) on "
        f"{', '.join(channel.events)} for repository {channel.repository}"
    )


@alerts_group.command("remove")
@click.argument("name")
@REPOSITORY_OPTION
def remove_command(name: str, repository_name: str) -> None:
    """Remove the alert channel NAME (and its secret)."""
    from homesafe import alerts
    from homesafe.errors import UsageError

    if not alerts.remove_channel(repository_name, name):
        raise UsageError(f"repository {repository_name!r} has no alert channel {name!r}")
    click.echo(f"Removed alert channel {name}")


@alerts_group.command("test")
@click.argument("name")
@REPOSITORY_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def test_command(name: str, repository_name: str, as_json: bool) -> None:
    """Send a test alert to the channel NAME; exit 1 when it could not be delivered."""
    from homesafe import alerts
    from homesafe.errors import UsageError

    found = [channel for channel in alerts.channels(repository_name) if channel.name == name]
    if not found:
        raise UsageError(f"repository {repository_name!r} has no alert channel {name!r}")
    channel = found[0]
    event = alerts.Event(
        channel.events[0],
        repository_name,
        "Test alert from homesafe",
        f"This is a test of the alert channel {name} of repository {repository_name}.",
        {"test": True},
    )
    delivery = alerts.send(event, [channel])[0]
    if as_json:
        print_json(delivery.to_dict())
    elif delivery.delivered:
        click.echo(f"Sent a test {event.kind} alert to {channel.target()}")
    else:
        click.echo(f"homesafe: error: {name}: {delivery.error}", err=True)
    sys.exit(0 if delivery.delivered else 1)
