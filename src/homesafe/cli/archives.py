"""``homesafe archives``: list, show and delete archives."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from homesafe.cli.output import console, human_size, print_json
from homesafe.cli.repo import repository_option, resolve

if TYPE_CHECKING:
    from homesafe.repositories import Repository


@click.group("archives", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@repository_option
@click.pass_context
def archives_group(context: click.Context, as_json: bool, repository_name: str | None) -> None:
    """List, show and delete the archives of the repository (default: list)."""
    # `archives --repo NAME show X` works as `archives show --repo NAME X` does.
    context.obj = repository_name
    if context.invoked_subcommand is None:
        context.invoke(list_command, as_json=as_json, repository_name=repository_name)


def _repository_name(own: str | None) -> str | None:
    return own if own is not None else click.get_current_context().obj


@archives_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@repository_option
def list_command(as_json: bool, repository_name: str | None) -> None:
    """List archives, oldest first, with the apps each holds."""
    from homesafe import api

    listed = api.list_archives(resolve(_repository_name(repository_name)))
    if as_json:
        print_json({"archives": [archive.to_dict() for archive in listed]})
        return
    from rich.table import Table

    table = Table()
    for column in ("name", "time", "apps", "comment"):
        table.add_column(column)
    for archive in listed:
        apps = ", ".join(archive.apps) if archive.homesafe else "(not a homesafe archive)"
        table.add_row(archive.name, archive.time, apps, archive.comment)
    console().print(table)


@archives_group.command("show")
@click.argument("archive")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@repository_option
def show_command(archive: str, as_json: bool, repository_name: str | None) -> None:
    """Show an archive: when, from where, and per app its version, strategy, downtime
    and size. Archives made by the reference distribution are read too."""
    from homesafe import api
    from homesafe.manifest import is_inside

    repository = resolve(_repository_name(repository_name))
    description, contents = api.read_archive(archive, repository)
    recorded = _downtimes_in_history(archive, repository)
    apps: list[dict[str, Any]] = []
    for app_id, stored in description.apps.items():
        paths = stored.paths if stored.paths is not None else stored.manifest.owned_paths()
        apps.append(
            {
                "id": app_id,
                "version": stored.manifest.version,
                "strategy": stored.strategy,
                # Not in archives whose apps were stopped for the whole run (known only
                # once the archive was written): this host's history has it.
                "downtime_seconds": (
                    stored.downtime_seconds
                    if stored.downtime_seconds is not None
                    else recorded.get(app_id)
                ),
                "paths": paths,
                "size": sum(
                    entry.size
                    for entry in contents
                    if entry.type == "-"
                    and any(is_inside(entry.path, path.lstrip("/")) for path in paths)
                ),
            }
        )
    if as_json:
        print_json(
            {
                "format": description.format,
                "metadata": description.metadata,
                "apps": apps,
                "contents": [
                    {"path": "/" + entry.path, "type": entry.type, "mode": entry.mode,
                     "size": entry.size}
                    for entry in contents
                ],
            }
        )  # fmt: skip
        return
    out = console()
    metadata = description.metadata
    if description.format == "reference":
        out.print(f"[bold]{archive}[/] (written by the reference distribution)")
    else:
        out.print(f"[bold]{archive}[/] created {metadata.get('created')} on {metadata.get('host')}")
    if metadata.get("comment"):
        out.print(f"comment: {metadata['comment']}")
    for app in apps:
        downtime = app["downtime_seconds"]
        shown = "not recorded" if downtime is None else f"{downtime:.3f} s"
        out.print(
            f"  {app['id']} (version {app['version']}): strategy {app['strategy'] or '-'}, "
            f"downtime {shown}, {human_size(app['size'])} in {len(app['paths'])} paths"
        )


def _downtimes_in_history(archive: str, repository: Repository | None) -> dict[str, float]:
    """Each app's downtime as the history of this host recorded the backup that wrote
    ``archive`` (nothing for an archive written elsewhere)."""
    from homesafe import history
    from homesafe.repositories import DEFAULT_NAME

    name = repository.name if repository is not None else DEFAULT_NAME
    for job in history.jobs(archive=archive, repository=name, operation="backup"):
        return {record.app: record.downtime for record in job.apps}
    return {}


@archives_group.command("delete")
@click.argument("archive_names", nargs=-1, required=True, metavar="ARCHIVE...")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@repository_option
def delete_command(archive_names: tuple[str, ...], yes: bool, repository_name: str | None) -> None:
    """Delete archives and reclaim the space they alone used."""
    from homesafe import api

    repository = resolve(_repository_name(repository_name))
    if not yes:
        click.confirm(f"Delete {len(archive_names)} archive(s) for good?", abort=True)
    api.delete_archives(archive_names, repository)
    click.echo(f"Deleted {', '.join(archive_names)}")
