"""``homesafe history`` and ``homesafe status``."""

from __future__ import annotations

import sys

import click

from homesafe.cli.output import console, human_size, print_json
from homesafe.cli.schedule import local_time

STATUS_STYLE = {
    "ok": "green",
    "partial": "yellow",
    "failed": "red",
    "running": "cyan",
    "interrupted": "red",
    "skipped": "yellow",
}


def _styled(status: str | None) -> str:
    if status is None:
        return "-"
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


@click.command("history")
@click.option("--app", "app_id", metavar="APP", help="Only the jobs that included APP.")
@click.option("--repository", "--repo", "repository_name", metavar="NAME", help="Only NAME's.")
@click.option(
    "--operation",
    type=click.Choice(["backup", "restore", "prune", "check", "verify", "break-lock"]),
    help="Only this kind of job.",
)
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with each whole result).")
def history_command(
    app_id: str | None,
    repository_name: str | None,
    operation: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Past backups, restores and prunes, newest first, with each app's outcome."""
    from homesafe import history

    found = history.jobs(app=app_id, repository=repository_name, operation=operation, limit=limit)
    if as_json:
        print_json({"jobs": [job.to_dict() for job in found]})
        return
    from rich.table import Table

    table = Table()
    if app_id:
        columns = ["id", "started", "operation", "archive", "status", "strategy", "downtime"]
        columns += ["size", "error"]
    else:
        columns = ["id", "started", "operation", "repository", "archive", "status", "time"]
        columns += ["apps", "error"]
    for column in columns:
        table.add_column(column, overflow="fold")
    for job in found:
        operation = job.operation + (" (scheduled)" if job.trigger == "scheduled" else "")
        started = local_time(job.started)
        archive = job.archive or "-"
        record = job.app(app_id) if app_id else None
        if app_id and record is not None:
            message = str(record.errors[0].get("message", "")) if record.errors else ""
            table.add_row(
                str(job.id), started, operation, archive, _styled(record.status),
                record.strategy, f"{record.downtime:.3f} s", human_size(record.size), message,
            )  # fmt: skip
        elif app_id:
            table.add_row(
                str(job.id), started, operation, archive, _styled(job.status),
                "-", "-", "-", job.error,
            )  # fmt: skip
        else:
            duration = f"{job.duration:.1f} s" if job.duration is not None else "-"
            apps = ", ".join(
                record.app if record.status == "ok" else f"{record.app} ({record.status})"
                for record in job.apps
            )
            table.add_row(
                str(job.id), started, operation, job.repository, archive,
                _styled(job.status), duration, apps or "-", job.error,
            )  # fmt: skip
    console().print(table)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def status_command(as_json: bool) -> None:
    """At a glance: each app's last good backup per repository, the next scheduled
    run, and anything failing or overdue. Exit status 1 when something is."""
    from homesafe.status import status

    current = status()
    if as_json:
        print_json(current.to_dict())
        sys.exit(0 if current.healthy else 1)
    from rich.table import Table

    out = console()
    if current.running:
        out.print(f"A scheduled run is in progress (pid {current.running}).")
    for repository in current.repositories:
        schedule = repository.schedule
        if schedule is None or not schedule.enabled:
            plan = "no schedule"
        else:
            next_run = repository.decision.next_run if repository.decision else None
            plan = f"next scheduled run {local_time(next_run)}"
        out.print(f"[bold]{repository.repository}[/]: {plan}")
        table = Table()
        for column in ("app", "last good backup", "archive", "last attempt", "scheduled"):
            table.add_column(column)
        for app in repository.apps:
            good = app.last_good
            table.add_row(
                app.app,
                local_time(good.started) if good else "[red]never[/]",
                good.archive if good else "-",
                _styled(app.last_attempt_status),
                "yes" if app.included else "excluded",
            )
        out.print(table)
    if current.healthy:
        out.print("[green]Nothing is failing or overdue.[/]")
        return
    for problem in current.problems:
        out.print(f"[red]problem[/]: {problem}")
    sys.exit(1)
