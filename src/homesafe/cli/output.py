"""Printing for the CLI: JSON for scripts, rich tables and progress bars for people."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console

    from homesafe.api import OperationResult, RestorePreview
    from homesafe.engines.base import Progress, ProgressCallback


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


PRELOAD_DELAY_SECONDS = 0.3


def preload_tables() -> None:
    """Import what :func:`print_operation` needs, in a daemon thread a moment later, and
    return at once.

    For commands that wait for an engine for a while (a restore): rich's modules take
    some 60 ms to import, which would otherwise come after the engine is done, between
    the end of the work and its report. Nothing else happens in the thread.
    """

    def load() -> None:
        import rich.console
        import rich.table  # noqa: F401

    # After a moment: until the engine has started, the thread would only take the
    # interpreter lock from the start-up work in front of it.
    timer = threading.Timer(PRELOAD_DELAY_SECONDS, load)
    timer.name = "preload-rich"
    timer.daemon = True
    timer.start()


def human_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


@contextmanager
def progress_bar(description: str, enabled: bool) -> Iterator[ProgressCallback | None]:
    """A progress callback drawing a bar on a terminal's stderr, or None elsewhere."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import Progress as ProgressDisplay

    bar = ProgressDisplay(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[path]}", style="dim"),
        console=console(stderr=True),
        transient=True,
    )
    task = bar.add_task(description, total=None, path="")
    largest_total = 0.0

    def update(report: Progress) -> None:
        nonlocal largest_total
        # Totals come from homesafe's measure of the paths and from the engine's own
        # count, which grows while it still scans (restic): the largest is the nearest.
        if report.total and report.total > largest_total:
            largest_total = report.total
            bar.update(task, total=report.total)
        if report.current is not None:
            bar.update(task, completed=report.current, path=report.message[-50:])

    with bar:
        yield update


def print_operation(result: OperationResult) -> None:
    """A table of per-app outcomes, then every error and warning."""
    from rich.table import Table

    out = console()
    verb = {"backup": "Backup", "restore": "Restore", "verify": "Restore drill of"}.get(
        result.operation, result.operation.capitalize()
    )
    table = Table(title=f"{verb} {result.archive} ({result.status})", title_justify="left")
    for column in ("app", "status", "strategy", "downtime", "size"):
        table.add_column(column, justify="right" if column in ("downtime", "size") else "left")
    style = {"ok": "green", "failed": "red", "skipped": "yellow"}
    for app in result.apps:
        table.add_row(
            app.app,
            f"[{style[app.status]}]{app.status}[/]",
            app.strategy,
            f"{app.downtime:.3f} s",
            human_size(app.size),
        )
    out.print(table)
    if result.engine_stats is not None:
        stats = result.engine_stats
        out.print(
            f"Archive {stats.name}: {stats.file_count} files, "
            f"{human_size(stats.original_size)} read, "
            f"{human_size(stats.deduplicated_size)} new after deduplication, "
            f"in {result.duration:.1f} s"
        )
    for destination in result.destinations:
        if destination.status == "ok" and destination.engine_stats is not None:
            new = human_size(destination.engine_stats.deduplicated_size)
            out.print(
                f"  [green]written[/] to {destination.repository}: {new} new, "
                f"in {destination.duration:.1f} s"
            )
        else:
            out.print(f"  [red]not written[/] to {destination.repository}: {destination.error}")
    for app in result.apps:
        if app.healthy_after is not None:
            out.print(f"{app.app}: healthy {app.healthy_after:.1f} s after the drill began")
    for error in result.all_errors():
        where = f"{error.app}" + (f" ({error.hook})" if error.hook else "")
        out.print(f"[red]error[/]: {where}: {error.message}")
    for app in result.apps:
        for warning in app.warnings:
            out.print(f"[yellow]warning[/]: {app.app}: {warning}")


def print_preview(preview: RestorePreview) -> None:
    """What a restore would change, app by app, and the space it needs."""
    out = console()
    out.print(f"[bold]Dry run[/]: restoring {preview.archive} into {preview.target_root}")
    for app in preview.apps:
        out.print(
            f"  [bold]{app.app}[/]: {len(app.added)} added, {len(app.replaced)} replaced, "
            f"{len(app.removed)} removed, {app.unchanged} unchanged; "
            f"{human_size(app.size)} to write"
        )
        for label, paths in (("+", app.added), ("~", app.replaced), ("-", app.removed)):
            for path in paths[:10]:
                out.print(f"      {label} {path}", highlight=False)
            if len(paths) > 10:
                out.print(f"      {label} ... and {len(paths) - 10} more")
        if app.services:
            out.print(f"    stops and restarts: {', '.join(app.services)}")
        for error in app.errors:
            out.print(f"    [red]refused[/]: {error}")
    for check in preview.space:
        verdict = "[green]enough[/]" if check.sufficient else "[red]NOT ENOUGH[/]"
        out.print(
            f"  space on the filesystem of {check.anchor}: needs "
            f"{human_size(check.required)}, {human_size(check.available)} free: {verdict}"
        )
    out.print(
        "Nothing was changed." if preview.possible else "[red]This restore would be refused.[/]"
    )
