"""``homesafe apps``: list, show and check the declared apps."""

from __future__ import annotations

import sys

import click

from homesafe.cli.output import console, print_json
from homesafe.errors import EXIT_FAILURE, ManifestError

JSON_HELP = "Print JSON instead of a table."


@click.group("apps", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_context
def apps_group(context: click.Context, as_json: bool) -> None:
    """List, show and check the apps homesafe knows (default: list).

    Apps come from TOML manifests in $HOMESAFE_CONFIG/apps.d/ and from Python packages
    registering the entry point group `homesafe.apps`.
    """
    if context.invoked_subcommand is None:
        context.invoke(list_command, as_json=as_json)


def _app_rows() -> list[dict[str, object]]:
    from homesafe.apps import dependency_order, load_apps
    from homesafe.consistency import lockdown

    rows = []
    for app in dependency_order(load_apps().values()):
        manifest = app.manifest
        rows.append(
            {
                "id": app.id,
                "name": manifest.display_name,
                "version": manifest.version,
                "consistency": manifest.consistency,
                "depends": manifest.depends,
                "services": [service.name for service in manifest.services],
                "paths": manifest.owned_paths(),
                "locked": lockdown.is_locked(app.id),
                "source": app.source,
            }
        )
    return rows


@apps_group.command("list")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def list_command(as_json: bool) -> None:
    """List apps in dependency order, with their lockdown state."""
    rows = _app_rows()
    if as_json:
        print_json({"apps": rows})
        return
    from rich.table import Table

    table = Table()
    for column in ("id", "name", "version", "services", "paths", "lockdown"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["id"]),
            str(row["name"]),
            str(row["version"]),
            ", ".join(row["services"]) or "-",  # type: ignore[arg-type]
            str(len(row["paths"])),  # type: ignore[arg-type]
            "[red]locked[/]" if row["locked"] else "-",
        )
    console().print(table)


@apps_group.command("show")
@click.argument("app_id")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def show_command(app_id: str, as_json: bool) -> None:
    """Show one app's manifest, as homesafe understood it."""
    from homesafe.apps import load_apps, select
    from homesafe.consistency import lockdown

    app = select(load_apps(), [app_id])[0]
    document = {
        "source": app.source,
        "locked": lockdown.lock_record(app.id),
        "python_hooks": [
            name
            for name in ("backup_pre", "backup_post", "restore_pre", "restore_post")
            if app.python_hook(name)
        ],
        "manifest": app.manifest.to_dict(),
    }
    if as_json:
        print_json(document)
        return
    import json

    from rich.syntax import Syntax

    console().print(f"[bold]{app.manifest.display_name}[/] ({app.id}) from {app.source}")
    console().print(Syntax(json.dumps(document, indent=2), "json", background_color="default"))


@apps_group.command("check")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def check_command(as_json: bool) -> None:
    """Validate every manifest; list every problem and exit 1 if there is any."""
    from homesafe.apps import load_apps

    try:
        apps = load_apps()
    except ManifestError as error:
        if as_json:
            print_json(
                {
                    "valid": False,
                    "problems": [
                        {"source": p.source, "field": p.field, "message": p.message}
                        for p in error.problems
                    ],
                }
            )
        else:
            click.echo(error.message, err=True)
        sys.exit(EXIT_FAILURE)
    if as_json:
        print_json({"valid": True, "apps": sorted(apps)})
    else:
        click.echo(f"{len(apps)} app{'s' if len(apps) != 1 else ''}, no problems.")
