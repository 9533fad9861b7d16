"""``homesafe backup``, ``restore`` and ``export``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from homesafe.cli.output import (
    preload_tables,
    print_json,
    print_operation,
    print_preview,
    progress_bar,
)
from homesafe.cli.repo import repository_option, resolve, resolve_one
from homesafe.errors import EXIT_FAILURE

if TYPE_CHECKING:
    from homesafe.api import OperationResult, RestorePreview


@click.command("backup")
@click.argument("app_ids", nargs=-1, metavar="[APP]...")
@click.option("--comment", help="A comment stored with the archive.")
@click.option("--name", "archive_name", help="Archive name (default: HOST-UTCTIME).")
@click.option(
    "--strategy",
    type=click.Choice(["auto", "snapshot", "clone", "stop", "live"]),
    help="How to hold every app still, instead of each manifest's `consistency`.",
)
@click.option("--dry-run", is_flag=True, help="Show what would be backed up; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--repo",
    "repository_names",
    metavar="NAME",
    multiple=True,
    help="The repository to write to (default: the embedded one). Given more than once, "
    "the apps are captured once and the archive written to every one at the same time; "
    "one that fails does not stop the others (exit status 3).",
)
def backup_command(
    app_ids: tuple[str, ...],
    comment: str | None,
    archive_name: str | None,
    strategy: str | None,
    dry_run: bool,
    as_json: bool,
    repository_names: tuple[str, ...],
) -> None:
    """Back up apps (every app when none is named) into one new archive.

    Apps linked by dependencies are held still together, one group at a time: locked
    down, running services stopped (dependents first), captured, and restarted in
    order at once. How an app is captured is its strategy (the manifest's
    `consistency`, or --strategy): `snapshot` (btrfs or LVM thin: read-only snapshots,
    held still for milliseconds), `clone` (XFS/btrfs reflink copies), `stop` (a staged
    copy brought up to date while the app runs, then once more for what changed while
    it is stopped; or stopped for the whole archive run when the staging area is short of
    space), `live` (not held still), and `auto`, the default: the cheapest safe one
    for each path. The archive is then written from the captured copies, under the
    original paths. Failures of one app do not stop the others: the exit status is 3
    when some apps failed, 1 when all did.
    """
    from homesafe import api
    from homesafe.apps import load_apps, select

    if dry_run:
        from homesafe.consistency.capture import plan_app

        selected = select(load_apps(), app_ids)
        plan: list[dict[str, Any]] = []
        for app in selected:
            existing = [path for path in app.manifest.owned_paths() if Path(path).exists()]
            capture = plan_app(app.id, app.manifest, existing, strategy)
            plan.append(
                {
                    "app": app.id,
                    "paths": app.manifest.owned_paths(),
                    "strategy": capture.strategy if capture.problem is None else None,
                    "problem": capture.problem,
                    "notes": capture.notes,
                    "services_to_stop": [
                        service.name for service in reversed(app.manifest.services)
                    ],
                    "settings": app.manifest.settings,
                }
            )
        if as_json:
            print_json({"dry_run": True, "apps": plan})
        else:
            for entry in plan:
                click.echo(f"{entry['app']}:")
                for path in entry["paths"]:
                    click.echo(f"  {path}")
                if entry["services_to_stop"]:
                    click.echo(f"  stops: {', '.join(entry['services_to_stop'])}")
                click.echo(f"  strategy: {entry['strategy'] or entry['problem']}")
        return
    with progress_bar("backup", enabled=not as_json) as on_progress:
        several = len(set(repository_names)) > 1
        result = api.backup_apps(
            app_ids,
            repository=None if several else resolve(next(iter(repository_names), None)),
            repositories=[resolve_one(name) for name in dict.fromkeys(repository_names)]
            if several
            else (),
            archive_name=archive_name,
            comment=comment,
            on_progress=on_progress,
            strategy=strategy,
        )
    _alert_failure(result)
    _finish(result, as_json)


TARGET_ROOT_OPTION = click.option(
    "--target-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/"),
    show_default=True,
    help="Restore below this directory instead of the live system (services, hooks "
    "and settings are then left alone): for migrating to a new machine.",
)
FORCE_OPTION = click.option(
    "--force", is_flag=True, help="Restore data newer than the installed app's version."
)
DRY_RUN_OPTION = click.option(
    "--dry-run",
    is_flag=True,
    help="Show what would change (files added, replaced, removed; services; free space) "
    "and change nothing.",
)


@click.command("restore")
@click.argument("archive")
@click.argument("app_ids", nargs=-1, metavar="[APP]...")
@TARGET_ROOT_OPTION
@FORCE_OPTION
@DRY_RUN_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@repository_option
def restore_command(
    archive: str,
    app_ids: tuple[str, ...],
    target_root: Path,
    force: bool,
    dry_run: bool,
    as_json: bool,
    repository_name: str | None,
) -> None:
    """Restore apps from ARCHIVE (every app in it when none is named).

    The manifests stored in the archive say which paths, services and settings each
    app has (archives of the reference distribution are read too). Each app's files are
    extracted next to their targets and verified while the app still runs; then the app
    is locked down, its services stopped, and the files swapped in. If anything fails,
    the app is put back exactly as it was. Missing apps are installed first.
    """
    from homesafe import api

    repository = resolve(repository_name)
    if dry_run:
        _print_preview(
            api.preview_restore(
                archive, app_ids, repository=repository, target_root=target_root, force=force
            ),
            as_json,
        )
        return
    if not as_json:
        preload_tables()
    with progress_bar("restore", enabled=not as_json) as on_progress:
        result = api.restore_apps(
            archive,
            app_ids,
            repository=repository,
            target_root=target_root,
            force=force,
            on_progress=on_progress,
            remove_in_background=True,
        )
    _finish(result, as_json)


@click.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.argument("app_ids", nargs=-1, metavar="[APP]...")
@TARGET_ROOT_OPTION
@FORCE_OPTION
@DRY_RUN_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def import_command(
    file: Path,
    app_ids: tuple[str, ...],
    target_root: Path,
    force: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Restore apps from an exported tar FILE (.tar, .tar.gz, .tar.zst, ...).

    Works like `restore`, for a backup downloaded or exported earlier (by homesafe or by
    the reference distribution). The file is checked first: a member with `..`, an
    absolute path, a link pointing outside, a device file, or a path of no app in the
    archive refuses the whole file, and nothing is written.
    """
    from homesafe import api

    if dry_run:
        preview = api.preview_restore(
            str(file), app_ids, file=file, target_root=target_root, force=force
        )
        _print_preview(preview, as_json)
        return
    with progress_bar("import", enabled=not as_json) as on_progress:
        result = api.import_apps(
            file, app_ids, target_root=target_root, force=force, on_progress=on_progress
        )
    _finish(result, as_json)


@click.command("verify")
@click.argument("archive")
@click.argument("app_ids", nargs=-1, metavar="[APP]...")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@repository_option
def verify_command(
    archive: str, app_ids: tuple[str, ...], as_json: bool, repository_name: str | None
) -> None:
    """Drill a restore: restore ARCHIVE's apps into a sandbox and check they are healthy.

    Each app's `setup.health` command runs against the sandbox (its path is in
    HOMESAFE_ROOT); the time to a healthy restore is reported, and the sandbox removed.
    The live system is not touched.
    """
    from homesafe import api

    _finish(api.verify_archive(archive, app_ids, repository=resolve(repository_name)), as_json)


def _alert_failure(result: OperationResult) -> None:
    """Tell the repository's alert channels about a failed or partial manual backup
    (scheduled runs send their own alerts). A broken channel is logged, never fatal."""
    if result.status == "ok":
        return
    from homesafe import alerts

    failed = [app.app for app in result.apps if app.status == "failed"]
    message = f"Backup {result.archive} is {result.status}"
    message += f": {', '.join(failed)} failed." if failed else "."
    details = {"archive": result.archive, "errors": [e.to_dict() for e in result.all_errors()]}
    destinations = result.destinations or []
    if not destinations or failed:
        names = [d.repository for d in destinations] or [result.repository]
    else:  # the apps are whole: only the repositories that missed the archive hear of it
        names = [d.repository for d in destinations if d.status == "failed"]
    for name in names:
        missed = next((d for d in destinations if d.repository == name and d.error), None)
        text = message if missed is None else f"{message} Not written here: {missed.error}"
        alerts.send(alerts.Event("failure", name, f"Backup {result.status}", text, details))


def _finish(result: OperationResult, as_json: bool) -> None:
    if as_json:
        print_json(result.to_dict())
    else:
        print_operation(result)
    sys.exit(result.exit_code)


def _print_preview(preview: RestorePreview, as_json: bool) -> None:
    if as_json:
        print_json(preview.to_dict())
    else:
        print_preview(preview)
    if not preview.possible:
        sys.exit(EXIT_FAILURE)


@click.command("export")
@click.argument("archive")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@repository_option
def export_command(archive: str, file: Path, repository_name: str | None) -> None:
    """Write ARCHIVE to FILE as a tar (compressed by suffix: .tar.gz, .tar.xz, ...)."""
    from homesafe import api

    if file.exists():
        raise click.UsageError(f"{file} exists already; choose another name")
    api.export_archive(archive, file, resolve(repository_name))
    click.echo(f"Exported {archive} to {file}")
