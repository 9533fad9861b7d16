"""``homesafe key``: what you must keep to open your repository elsewhere."""

from __future__ import annotations

import click

from homesafe.cli.output import print_json


@click.group("key")
def key_group() -> None:
    """Repository keys and passphrases."""


@key_group.command("export")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def export_command(as_json: bool) -> None:
    """Print the repository key and passphrase: keep both somewhere safe, offline.

    Without them the encrypted archives cannot be read on a new machine.
    """
    from homesafe import api

    exported = api.export_key()
    if as_json:
        print_json(exported)
        return
    click.echo(f"Repository: {exported['repository']}")
    click.echo(f"Encryption: {exported['encryption']}")
    click.echo(f"Passphrase: {exported['passphrase']}")
    click.echo("Key (borg key import REPOSITORY FILE reads it back):")
    click.echo(exported["key"].rstrip())
    click.echo(
        "\nTo restore on a new machine: install homesafe, put the passphrase into\n"
        "$HOMESAFE_HOME/secrets/default.passphrase (mode 0600), copy the repository to\n"
        "$HOMESAFE_HOME/repository, then run `homesafe archives list`."
    )
