"""``homesafe backup``, ``restore`` and ``export``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from homesafe.cli.output import print_json, print_operation, progress_bar


@click.command("backup")
@click.argument("app_ids", nargs=-1, metavar="[APP]...")
@click.option("--comment", help="A comment stored with the archive.")
@click.option("--name", "archive_name", help="Archive name (default: HOST-UTCTIME).")
@click.option("--dry-run", is_flag=True, help="Show what would be backed up; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def backup_command(
    app_ids: tuple[str, ...],
    comment: str | None,
    archive_name: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Back up apps (every app when none is named) into one new archive.

    Each app is locked down and its running services are stopped (last app first)
    while it is captured, then restarted in order. Failures of one app do not stop
    the others: the exit status is 3 when some apps failed, 1 when all did.
    """
    from homesafe import api
    from homesafe.apps import load_apps, select

    if dry_run:
        selected = select(load_apps(), app_ids)
        plan = [
            {
                "app": app.id,
                "paths": app.manifest.owned_paths(),
                "services_to_stop": [service.name for service in reversed(app.manifest.services)],
                "settings": app.manifest.settings,
            }
            for app in selected
        ]
        if as_json:
            print_json({"dry_run": True, "apps": plan})
        else:
            for entry in plan:
                click.echo(f"{entry['app']}:")
                for path in entry["paths"]:
                    click.echo(f"  {path}")
                if entry["services_to_stop"]:
                    click.echo(f"  stops: {', '.join(entry['services_to_stop'])}")
        return
    with progress_bar("backup", enabled=not as_json) as on_progress:
        result = api.backup_apps(
            app_ids, archive_name=archive_name, comment=comment, on_progress=on_progress
        )
    if as_json:
        print_json(result.to_dict())
    else:
        print_operation(result)
    sys.exit(result.exit_code)


@click.command("restore")
@click.argument("archive")
@click.argument("app_ids", nargs=-1, metavar="[APP]...")
@click.option(
    "--target-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/"),
    show_default=True,
    help="Restore below this directory instead of the live system (services, hooks "
    "and settings are then left alone).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def restore_command(
    archive: str, app_ids: tuple[str, ...], target_root: Path, as_json: bool
) -> None:
    """Restore apps from ARCHIVE (every app in it when none is named).

    The manifests stored in the archive say which paths, services and settings each
    app has. Missing apps are installed first (setup.install); each app is locked down
    and its services are stopped while its files are put back.
    """
    from homesafe import api

    with progress_bar("restore", enabled=not as_json) as on_progress:
        result = api.restore_apps(
            archive, app_ids, target_root=target_root, on_progress=on_progress
        )
    if as_json:
        print_json(result.to_dict())
    else:
        print_operation(result)
    sys.exit(result.exit_code)


@click.command("export")
@click.argument("archive")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def export_command(archive: str, file: Path) -> None:
    """Write ARCHIVE to FILE as a tar (compressed by suffix: .tar.gz, .tar.xz, ...)."""
    from homesafe import api

    if file.exists():
        raise click.UsageError(f"{file} exists already; choose another name")
    api.export_archive(archive, file)
    click.echo(f"Exported {archive} to {file}")
