"""``homesafe schedule``: set, show, run and install periodic backups."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from homesafe.cli.output import console, print_json

if TYPE_CHECKING:
    from homesafe.scheduler import Report

JSON_HELP = "Print JSON instead of text."
REPOSITORY_OPTION = click.option(
    "--repository",
    "--repo",
    "repository_name",
    default="default",
    show_default=True,
    metavar="NAME",
    help="The repository whose schedule this is.",
)


def local_time(value: Any) -> str:
    """An aware datetime (or None) as local time for people."""
    if value is None:
        return "-"
    return str(value.astimezone().strftime("%Y-%m-%d %H:%M %Z"))


@click.group("schedule", invoke_without_command=True)
@click.pass_context
def schedule_group(context: click.Context) -> None:
    """Periodic backups of a repository, and their retention (default: show).

    A schedule backs up every app but the excluded ones at the hour given, daily,
    weekly (Sundays) and monthly (on the 1st), one archive serving every period due,
    and keeps the newest N archives of each period. A missed run (the machine was
    off) is caught up at the next check; no scheduled run starts within 2 hours of
    the previous one. Manual archives are never pruned.

    `homesafe schedule install` makes the system call `homesafe schedule run` every
    few minutes; it only backs up when something is due.
    """
    if context.invoked_subcommand is None:
        context.invoke(show_command)


def require_repository(name: str) -> None:
    from homesafe import scheduler

    scheduler.repository_named(name)  # raises a usage error for an unknown repository


@schedule_group.command("show")
@REPOSITORY_OPTION
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def show_command(repository_name: str = "default", as_json: bool = False) -> None:
    """Show the schedule, when it runs next, and what is due or overdue."""
    _show(repository_name, as_json)


def _show(repository_name: str, as_json: bool) -> None:
    import datetime

    from homesafe import alerts, schedules
    from homesafe.scheduler import history_runs

    schedule = schedules.load_or_default(repository_name)
    decision = schedules.decide(
        schedule, datetime.datetime.now(datetime.UTC), history_runs(repository_name)
    )
    channels = alerts.channels(repository_name)
    if as_json:
        print_json(
            {
                "schedule": schedule.to_dict(),
                "decision": decision.to_dict(),
                "alerts": [channel.to_dict() for channel in channels],
            }
        )
        return
    out = console()
    state = "[green]enabled[/]" if schedule.enabled else "[yellow]disabled[/]"
    out.print(f"Schedule of repository [bold]{schedule.repository}[/]: {state}")
    out.print(
        f"  runs at {schedule.run_at_hour:02d}:00 {schedule.timezone}; keeps "
        f"{schedule.daily_to_keep} daily, {schedule.weekly_to_keep} weekly (Sundays), "
        f"{schedule.monthly_to_keep} monthly (1st) archives"
    )
    out.print(f"  excluded apps: {', '.join(schedule.excluded_apps) or '-'}")
    for period in schedules.PERIODS:
        out.print(f"  last {period}: {local_time(decision.last_success[period])}")
    if schedule.enabled:
        out.print(f"  next run: {local_time(decision.next_run)}")
        if decision.overdue:
            out.print(f"  [red]overdue[/]: {', '.join(decision.overdue)}")
    for channel in channels:
        out.print(
            f"  alert {channel.name}: {channel.kind} to {channel.target()} "
            f"on {', '.join(channel.events)}"
        )


@schedule_group.command("set")
@REPOSITORY_OPTION
@click.option("--enable/--disable", "enabled", default=None, help="Switch the schedule on or off.")
@click.option("--daily", type=click.IntRange(min=0), help="Daily archives to keep (0: none).")
@click.option("--weekly", type=click.IntRange(min=0), help="Weekly archives to keep (0: none).")
@click.option("--monthly", type=click.IntRange(min=0), help="Monthly archives to keep (0: none).")
@click.option("--hour", type=click.IntRange(0, 23), help="The hour of the day to run at.")
@click.option("--timezone", help="IANA time zone of that hour (default: the machine's).")
@click.option("--exclude", multiple=True, metavar="APP", help="Leave APP out (repeatable).")
@click.option("--include", multiple=True, metavar="APP", help="Stop leaving APP out.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def set_command(
    repository_name: str,
    enabled: bool | None,
    daily: int | None,
    weekly: int | None,
    monthly: int | None,
    hour: int | None,
    timezone: str | None,
    exclude: tuple[str, ...],
    include: tuple[str, ...],
    as_json: bool,
) -> None:
    """Change the schedule; options not given keep their value.

    New apps are backed up without asking: the schedule lists the apps it leaves out.
    """
    from homesafe import schedules
    from homesafe.apps import load_apps
    from homesafe.errors import UsageError

    require_repository(repository_name)
    current = schedules.load_or_default(repository_name)
    changes: dict[str, Any] = {}
    for key, value in (
        ("enabled", enabled),
        ("daily_to_keep", daily),
        ("weekly_to_keep", weekly),
        ("monthly_to_keep", monthly),
        ("run_at_hour", hour),
        ("timezone", timezone),
    ):
        if value is not None:
            changes[key] = value
    if exclude or include:
        clash = set(exclude) & set(include)
        if clash:
            raise UsageError(f"both excluded and included: {', '.join(sorted(clash))}")
        excluded = [app for app in current.excluded_apps if app not in include]
        excluded += [app for app in exclude if app not in excluded]
        changes["excluded_apps"] = tuple(excluded)
        unknown = sorted(set(exclude) - set(load_apps()))
        if unknown:
            click.echo(f"homesafe: note: no app is called {', '.join(unknown)} (yet)", err=True)
    if not changes:
        raise UsageError("nothing to change", hint="See `homesafe schedule set --help`.")
    updated = current.changed(**changes)
    schedules.save(updated)
    if as_json:
        print_json({"schedule": updated.to_dict()})
    else:
        _show(repository_name, as_json=False)


@schedule_group.command("run")
@REPOSITORY_OPTION
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option("--quiet", is_flag=True, help="Print only failures (for timers and cron).")
def run_command(repository_name: str, as_json: bool, quiet: bool) -> None:
    """Run what is due now, then prune; safe to call every few minutes.

    Without --repository every enabled schedule is checked. Runs never overlap: when
    another run is in progress this one does nothing. Exit status: 0 when nothing
    failed, 1 when a backup failed, 3 when it was partial.
    """
    from homesafe import scheduler

    # The option defaults to "default" for the other commands; here, no option means all.
    source = click.get_current_context().get_parameter_source("repository_name")
    only = repository_name if source is click.core.ParameterSource.COMMANDLINE else None
    outcome = scheduler.run(repository=only)
    if as_json:
        print_json(outcome.to_dict())
        sys.exit(outcome.exit_code)
    if outcome.busy:
        if not quiet:
            click.echo("Another scheduled run is in progress; nothing to do.")
        return
    for report in outcome.reports:
        _print_report(report, quiet)
    sys.exit(outcome.exit_code)


def _print_report(report: Report, quiet: bool) -> None:
    failed = report.exit_code != 0
    if quiet and not failed:
        return
    name = report.repository
    if report.action == "disabled":
        line = f"{name}: the schedule is disabled"
    elif report.action == "nothing-due":
        next_run = report.decision.next_run if report.decision else None
        line = f"{name}: nothing due; next run {local_time(next_run)}"
    elif report.action == "backed-up":
        backup = report.backup or {}
        line = f"{name}: backed up {backup.get('archive')} ({backup.get('status')})"
        if report.pruned:
            line += f"; pruned {', '.join(report.pruned)}"
    else:
        line = f"{name}: {report.action}"
    if report.error:
        line += f": {report.error}"
    # Alert channels that failed are logged (as warnings) by homesafe.alerts already.
    click.echo(line, err=failed)


@schedule_group.command("install")
@click.option(
    "--init",
    "kind",
    type=click.Choice(["auto", "systemd", "cron"]),
    default="auto",
    show_default=True,
    help="systemd timer, or a cron line (auto: systemd when it is running).",
)
@click.option(
    "--directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/etc/systemd/system"),
    show_default=True,
    help="Where the systemd units go.",
)
@click.option(
    "--cron-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("/etc/cron.d/homesafe"),
    show_default=True,
    help="Where the cron line goes.",
)
@click.option(
    "--every",
    "every_minutes",
    type=int,
    default=15,
    show_default=True,
    help="Minutes between checks (a divisor of 60).",
)
@click.option("--command", "command", help="The homesafe executable (default: this one).")
def install_command(
    kind: str, directory: Path, cron_file: Path, every_minutes: int, command: str | None
) -> None:
    """Make the system run `homesafe schedule run` every few minutes."""
    from homesafe import timers

    argv = [command, "schedule", "run", "--quiet"] if command else None
    installed = timers.install(
        kind=kind, directory=directory, cron_path=cron_file, every_minutes=every_minutes,
        command=argv,
    )  # fmt: skip
    for path in installed.files:
        click.echo(f"Wrote {path}")
    if installed.kind == "systemd" and not installed.activated:
        click.echo(
            f"Enable it with: systemctl daemon-reload && systemctl enable --now {timers.TIMER_NAME}"
        )


@schedule_group.command("uninstall")
@click.option(
    "--init",
    "kind",
    type=click.Choice(["auto", "systemd", "cron"]),
    default="auto",
    show_default=True,
)
@click.option(
    "--directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/etc/systemd/system"),
    show_default=True,
)
@click.option(
    "--cron-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("/etc/cron.d/homesafe"),
    show_default=True,
)
def uninstall_command(kind: str, directory: Path, cron_file: Path) -> None:
    """Remove what `homesafe schedule install` wrote (schedules stay as they are)."""
    from homesafe import timers

    removed = timers.uninstall(kind=kind, directory=directory, cron_path=cron_file)
    for path in removed:
        click.echo(f"Removed {path}")
    if not removed:
        click.echo("Nothing was installed there.")
