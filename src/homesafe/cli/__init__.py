"""The ``homesafe`` command: parse, call :mod:`homesafe.api`, print.

Exit status: 0 success, 1 failure, 2 usage error, 3 partial success (some apps failed).
"""

from __future__ import annotations

import gc
import importlib
import logging
import signal
import sys
from types import FrameType
from typing import Any

import click

from homesafe import __version__
from homesafe.errors import EXIT_FAILURE, HomesafeError

# Each command's module, imported only when that command runs (or help lists them all):
# a backup should not pay at start-up for the modules of every other command.
# name -> (module, attribute, runs an operation: takes the host's operation lock and
# recovers what a dead operation left behind first).
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "apps": ("homesafe.cli.apps", "apps_group", False),
    "backup": ("homesafe.cli.operations", "backup_command", True),
    "archives": ("homesafe.cli.archives", "archives_group", False),
    "restore": ("homesafe.cli.operations", "restore_command", True),
    "full": ("homesafe.cli.full", "full_group", False),
    "export": ("homesafe.cli.operations", "export_command", False),
    "import": ("homesafe.cli.operations", "import_command", True),
    "verify": ("homesafe.cli.operations", "verify_command", True),
    "recover": ("homesafe.cli.recover", "recover_command", False),
    "key": ("homesafe.cli.key", "key_group", False),
    "repo": ("homesafe.cli.repo", "repo_group", False),
    "schedule": ("homesafe.cli.schedule", "schedule_group", False),
    "history": ("homesafe.cli.history", "history_command", False),
    "status": ("homesafe.cli.history", "status_command", False),
    "alerts": ("homesafe.cli.alerts", "alerts_group", False),
}

# Commands once imported (guard_operation changes a command: it must run once).
_loaded: dict[str, click.Command] = {}


class HomesafeGroup(click.Group):
    """A click group that turns homesafe's errors into a message and an exit status,
    and imports each command's module only when it is needed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        if cmd_name not in _loaded:
            module_name, attribute, operation = COMMANDS[cmd_name]
            command: click.Command = getattr(importlib.import_module(module_name), attribute)
            if operation:
                from homesafe.cli.recover import guard_operation

                command = guard_operation(command)
            _loaded[cmd_name] = command
        return _loaded[cmd_name]

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HomesafeError as error:
            click.echo(f"homesafe: error: {error.message}", err=True)
            if error.hint:
                click.echo(error.hint, err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("homesafe: interrupted", err=True)
            sys.exit(EXIT_FAILURE)
        finally:
            # Nothing is left to free once a command is done: spare the interpreter's
            # last collection over everything imported (~0.04 s of every run).
            gc.freeze()


def _raise_interrupt(signal_number: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal_number}")


@click.group(cls=HomesafeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="homesafe")
@click.option("-v", "--verbose", count=True, help="Log more (-vv shows every command run).")
def main(verbose: int) -> None:
    """App-aware backup and restore for self-hosted servers.

    Apps declare what they own in TOML manifests under $HOMESAFE_CONFIG/apps.d/ (or as
    Python entry points). `homesafe backup` holds every app still, captures its config,
    data, secrets and settings into an encrypted, deduplicated archive, and puts the app
    back; `homesafe restore ARCHIVE` brings apps back from it.

    With no configuration, archives go to the embedded default repository
    $HOMESAFE_HOME/repository, created on first backup with a generated passphrase:
    run `homesafe key export` and keep what it prints somewhere safe.

    Exit status: 0 success, 1 failure, 2 usage error, 3 partial success.
    """
    # SIGTERM unwinds like Ctrl-C, so services and lockdown are put back on the way out.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="homesafe: %(levelname)s: %(message)s")
