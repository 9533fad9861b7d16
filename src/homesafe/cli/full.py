"""``homesafe full backup`` and ``homesafe full restore``: a whole btrfs subvolume.

A command group of its own rather than flags on ``backup`` and ``restore``: a
full-system restore does not touch the running system at all but changes what the next
boot mounts, which is another operation than putting apps back, with other options.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from homesafe.cli.output import human_size, print_json, progress_bar
from homesafe.cli.recover import guard_operation
from homesafe.cli.repo import repository_option, resolve

if TYPE_CHECKING:
    from homesafe.api import OperationResult


@click.group("full")
def full_group() -> None:
    """Back up and restore the whole system: one btrfs subvolume (default /).

    \b
    homesafe full backup [--subvolume PATH]        snapshot, archive, delete the snapshot
    homesafe full restore ARCHIVE [--mount-point PATH]
                                                   new subvolume, made the default

    Needs root and btrfs. Subvolumes nested in the one backed up, and other
    filesystems mounted below it, are not in the archive (a snapshot holds neither):
    the result names them. App archives are made and restored with `homesafe backup`
    and `homesafe restore`.
    """


@full_group.command("backup", short_help="Snapshot a btrfs subvolume (default /) and archive it.")
@click.option(
    "--subvolume",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=Path("/"),
    show_default=True,
    help="The btrfs subvolume to back up (its root directory, e.g. where it is mounted).",
)
@click.option("--comment", help="A comment stored with the archive.")
@click.option("--name", "archive_name", help="Archive name (default: HOST-UTCTIME).")
@click.option(
    "--exclude-contents",
    "excludes",
    multiple=True,
    metavar="DIR",
    help="Leave out what is inside DIR (relative to the subvolume; repeatable). "
    "Default for /: dev, proc, sys, run, tmp; for other subvolumes: nothing.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@repository_option
def full_backup_command(
    subvolume: Path,
    comment: str | None,
    archive_name: str | None,
    excludes: tuple[str, ...],
    as_json: bool,
    repository_name: str | None,
) -> None:
    """Back up the whole btrfs subvolume --subvolume (default /) into one archive.

    A read-only snapshot is taken (nothing is stopped: the archive holds the system
    as it was at that instant), archived by borg with the original paths, and deleted,
    also on failure. Exit status 0 on success, 1 on failure.
    """
    from homesafe import api

    with progress_bar("full backup", enabled=not as_json) as on_progress:
        result = api.backup_full(
            subvolume,
            repository=resolve(repository_name),
            archive_name=archive_name,
            comment=comment,
            on_progress=on_progress,
            excludes=list(excludes) if excludes else None,
        )
    _finish(result, as_json)


@full_group.command("restore", short_help="Restore into a new subvolume and make it the default.")
@click.argument("archive")
@click.option(
    "--mount-point",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=Path("/"),
    show_default=True,
    help="Where the subvolume to replace is mounted; the new one is created next to it.",
)
@click.option(
    "--subvolume-name",
    metavar="NAME",
    help="Name of the new subvolume (default: <current name>.restored-<UTC time>).",
)
@click.option(
    "--no-space-check",
    "skip_space_check",
    is_flag=True,
    help="Do not refuse an archive larger than the free space (a compressed filesystem "
    "may hold it; a restore that runs out of space is undone).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@repository_option
def full_restore_command(
    archive: str,
    mount_point: Path,
    subvolume_name: str | None,
    skip_space_check: bool,
    as_json: bool,
    repository_name: str | None,
) -> None:
    """Restore the full-system ARCHIVE into a new btrfs subvolume and make it the default.

    The new subvolume is created next to the one mounted at --mount-point, on the same
    filesystem, and the archive extracted into it; then it becomes the default
    subvolume: the next mount without subvol= (the next boot, for /) uses it. Nothing
    mounted now changes, and the old subvolume is kept: the output prints the command
    that switches back. If /etc/fstab or the kernel command line names the root
    subvolume (subvol=...), the output says what to change. A failed extraction removes
    the new subvolume and leaves the default as it was; an archive larger than the
    filesystem's free space is refused before anything is made (--no-space-check).
    """
    from homesafe import api

    with progress_bar("full restore", enabled=not as_json) as on_progress:
        result = api.restore_full(
            archive,
            repository=resolve(repository_name),
            mount_point=mount_point,
            subvolume_name=subvolume_name,
            on_progress=on_progress,
            check_space=not skip_space_check,
        )
    _finish(result, as_json)


# Like backup and restore: --wait for another operation, recovery of what an interrupted
# one left first, and on Ctrl-C or SIGTERM whatever this one still holds put back.
guard_operation(full_backup_command)
guard_operation(full_restore_command)


def _finish(result: OperationResult, as_json: bool) -> None:
    from homesafe.full import FullSystemResult

    if as_json:
        print_json(result.to_dict())
        sys.exit(result.exit_code)
    # Plain lines, never wrapped: the rollback command must survive a copy and paste.
    verb = "Full backup" if result.operation == "backup" else "Full restore"
    colour = "green" if result.status == "ok" else "red"
    click.echo(f"{verb} {result.archive}: " + click.style(result.status, fg=colour))
    stats = result.engine_stats
    if stats is not None:
        click.echo(
            f"  {stats.file_count} files, {human_size(stats.original_size)} read, "
            f"{human_size(stats.deduplicated_size)} new after deduplication, "
            f"in {result.duration:.1f} s"
        )
    if isinstance(result, FullSystemResult):
        if result.snapshot:
            click.echo(f"  snapshot taken in {result.snapshot_seconds:.3f} s, then deleted")
        for note in result.notes:
            click.echo(f"  {note}")
        for warning in result.warnings:
            click.echo(click.style("warning", fg="yellow") + f": {warning}")
    for error in result.all_errors():
        click.echo(click.style("error", fg="red") + f": {error.message}")
    sys.exit(result.exit_code)
