"""``homesafe recover``, and the operation bracket of backup, restore, import and verify.

Those four commands hold the host's operation lock while they run (a second one waits
up to ``--wait`` seconds, then fails) and, before anything else, put back what an
interrupted homesafe left (see :mod:`homesafe.journal`), saying so on stderr.
Interrupted themselves (Ctrl-C, SIGTERM), they undo whatever their journal still holds
once every ``finally`` has run, before exiting.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import click

from homesafe import journal
from homesafe.cli.output import print_json
from homesafe.errors import EXIT_FAILURE

WAIT_OPTION = click.option(
    "--wait",
    "lock_wait",
    type=click.FloatRange(min=0),
    default=journal.DEFAULT_WAIT_SECONDS,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for another backup or restore of this host to finish.",
)


def _tell_waiting(holder: int | None) -> None:
    who = f" (pid {holder})" if holder else ""
    click.echo(f"homesafe: waiting for another operation{who} to finish...", err=True)


def _print_recovery(report: journal.RecoveryReport, heading: str) -> None:
    """The report on stderr, so that a command's --json output stays clean."""
    if not report.actions:
        return
    click.echo(f"homesafe: {heading}:", err=True)
    for line in report.lines():
        click.echo(f"  {line}", err=True)
    if report.failed:
        click.echo(
            "homesafe: what could not be undone is kept; see `homesafe recover --dry-run`.",
            err=True,
        )


def guard_operation(command: click.Command) -> click.Command:
    """Give an operating command (backup, restore, import, verify) a ``--wait`` option
    and run it inside :func:`homesafe.journal.operation`; a ``--dry-run`` changes nothing,
    so it runs without the lock."""
    callback = command.callback
    assert callback is not None
    WAIT_OPTION(command)
    name = command.name or "operation"

    @functools.wraps(callback)
    def guarded(*arguments: Any, lock_wait: float, **keywords: Any) -> Any:
        if keywords.get("dry_run"):
            return callback(*arguments, **keywords)
        with journal.operation(
            name,
            wait=lock_wait,
            on_wait=_tell_waiting,
            on_recovered=lambda report: _print_recovery(
                report, "put back what an interrupted homesafe left"
            ),
        ):
            try:
                return callback(*arguments, **keywords)
            except KeyboardInterrupt:
                # Every finally has run by now; anything the journal still holds was
                # interrupted half-way: undo it before exiting.
                _print_recovery(journal.undo_own(), "interrupted; also put back")
                raise

    command.callback = guarded
    return command


@click.command("recover")
@click.option("--dry-run", is_flag=True, help="Say what would be put back; change nothing.")
@click.option(
    "--discard",
    is_flag=True,
    help="After trying, forget changes that cannot be undone (once you have put them "
    "back by hand).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@WAIT_OPTION
def recover_command(dry_run: bool, discard: bool, as_json: bool, lock_wait: float) -> None:
    """Put back what an interrupted backup or restore left behind.

    A homesafe killed mid-operation (even with SIGKILL) leaves a journal of what it had
    changed. This starts again the services it had stopped, lifts the lockdowns it had
    set, rolls half-swapped restores back to the previous files and removes staging
    areas, newest change first, and reports what it did. Every backup, restore, import
    and verify does the same before it starts. Operations running now are left alone.
    Exit status 1 when something could not be undone (it is kept for the next try).
    """
    if dry_run:
        report = journal.recover(dry_run=True)
    else:
        with journal.operation(
            "recovery", wait=lock_wait, on_wait=_tell_waiting, recover_first=False
        ):
            report = journal.recover(discard=discard)
    if as_json:
        print_json(report.to_dict())
    else:
        if not report.actions:
            click.echo("Nothing to recover.")
        for line in report.lines():
            click.echo(line)
        if report.busy:
            count = len(report.busy)
            click.echo(f"{count} operation{'s' if count != 1 else ''} running now: left alone.")
    if report.failed:
        sys.exit(EXIT_FAILURE)
