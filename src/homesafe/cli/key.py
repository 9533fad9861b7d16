"""``homesafe key``: what you must keep to open your repository elsewhere."""

from __future__ import annotations

from pathlib import Path

import click

from homesafe.cli.output import print_json
from homesafe.cli.repo import repository_option, resolve


@click.group("key")
def key_group() -> None:
    """Repository keys and passphrases."""


@key_group.command("export")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@repository_option
def export_command(as_json: bool, repository_name: str | None) -> None:
    """Print the repository key and passphrase: keep both somewhere safe, offline.

    Without them the encrypted archives cannot be read on a new machine.
    """
    from homesafe import api

    repository = resolve(repository_name)
    exported = api.export_key(repository)
    if as_json:
        print_json(exported)
        return
    click.echo(f"Repository: {exported['repository']}")
    click.echo(f"Encryption: {exported['encryption']}")
    click.echo(f"Passphrase: {exported['passphrase']}")
    if repository is not None and repository.engine == "restic":
        click.echo("Key (a copy of the repository's keys/ file the passphrase opens):")
    else:
        click.echo(
            "Key (`homesafe key import FILE` or borg key import REPOSITORY FILE reads it back):"
        )
    click.echo(exported["key"].rstrip())
    if repository is None:
        click.echo(
            "\nTo restore on a new machine: install homesafe, put the passphrase into\n"
            "$HOMESAFE_HOME/secrets/default.passphrase (mode 0600), copy the repository to\n"
            "$HOMESAFE_HOME/repository, then run `homesafe archives list`."
        )
    else:
        click.echo(
            "\nTo restore on a new machine: install homesafe, put the passphrase into a 0600\n"
            f"file, then `homesafe repo add {repository.name} {repository.location} "
            "--passphrase-file FILE`."
        )


@key_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@repository_option
def import_command(file: Path, repository_name: str | None) -> None:
    """Put a borg key printed by `homesafe key export` back into the repository
    (for a keyfile repository on a new machine, or a repository whose key was damaged)."""
    from homesafe import api

    api.import_key(file, resolve(repository_name))
    click.echo(f"Imported the key from {file}")


@key_group.command("change-passphrase")
@repository_option
def change_passphrase_command(repository_name: str | None) -> None:
    """Give the repository a new passphrase.

    With a passphrase file (the default), a new random passphrase replaces the file's
    once the repository accepts it. With a passphrase from an environment variable or a
    command, type the new one; then update that source yourself.
    """
    from homesafe import api, repositories

    repository = repositories.get(repository_name)
    new = None
    if repository.passphrase_environment or repository.passphrase_command:
        new = click.prompt("New passphrase", hide_input=True, confirmation_prompt=True)
    api.change_passphrase(repository, new)
    if new is None:
        click.echo(
            f"Changed the passphrase of {repository.name!r}; the new one is in "
            f"{repository.passphrase_file}. Run `homesafe key export` again and keep it."
        )
    else:
        click.echo(
            f"Changed the passphrase of {repository.name!r}: now update "
            f"{repository.passphrase_source()} to give the new one."
        )
