"""``homesafe repo``: add, list, show, check, prune, remove and trust repositories, and
break their locks; and the ``--repo NAME`` option every command that touches archives
takes."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from homesafe.cli.output import console, human_size, print_json
from homesafe.errors import EXIT_FAILURE

if TYPE_CHECKING:
    from homesafe.repositories import HostKey, Location, Repository

JSON_HELP = "Print JSON instead of text."
Command = TypeVar("Command", bound=Callable[..., Any])


def repository_option(command: Command) -> Command:
    """``--repo NAME``: which repository a command works on (default: the embedded one)."""
    return click.option(
        "--repo",
        "repository_name",
        metavar="NAME",
        default=None,
        help="The repository to use (see `homesafe repo list`; default: the embedded one).",
    )(command)


def resolve(name: str | None) -> Repository | None:
    """The registered repository ``name``; None (the API's default) when not given."""
    if name is None:
        return None
    from homesafe import repositories

    return repositories.get(name)


def resolve_one(name: str) -> Repository:
    """The repository ``name`` ("default": the embedded one)."""
    from homesafe import repositories

    return repositories.get(name)


@click.group("repo")
def repo_group() -> None:
    """Repositories: where archives go (local, ssh, sftp, S3; borg or restic).

    The embedded default repository needs no set-up; `homesafe repo add` registers
    others, and every command that touches archives takes `--repo NAME`.
    """


def _confirm_host_key(key: HostKey) -> bool:
    click.echo(f"The server {key.host} identifies itself with the {key.key_type} host key")
    click.echo(f"  {key.fingerprint}")
    click.echo("Compare it with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the server.")
    return click.confirm("Trust this host key?", default=False)


def _prepare_ssh(location: Location, fingerprint: str | None, replace: bool = False) -> None:
    """Show homesafe's client key, then trust the server's host key (on first use only
    with the person's confirmation or the given fingerprint)."""
    from homesafe import repositories

    public_key = repositories.ensure_client_key()
    click.echo(
        f"homesafe's ssh key, to add to ~{location.user}/.ssh/authorized_keys on {location.host}:"
    )
    click.echo(f"  {public_key}")
    key = repositories.trust_host(
        location, fingerprint=fingerprint, confirm=_confirm_host_key, replace=replace
    )
    click.echo(f"Host key of {key.host} trusted: {key.fingerprint}")


@repo_group.command("add")
@click.argument("name")
@click.argument("location")
@click.option(
    "--engine",
    type=click.Choice(["borg", "restic"]),
    help="Backup engine (default: borg for local and ssh:// locations, restic for sftp and s3).",
)
@click.option("--encryption", help="borg: repokey-blake2 (default), keyfile-blake2, none, ...")
@click.option("--compression", help="borg: e.g. zstd,3 (default), lz4; restic: auto, max, off.")
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A file (mode 0600) holding the passphrase (default: secrets/NAME.passphrase, "
    "generated for a new repository).",
)
@click.option(
    "--passphrase-env", metavar="VARIABLE", help="Read the passphrase from this variable."
)
@click.option(
    "--passcommand",
    metavar="COMMAND",
    help="A command printing the passphrase, e.g. 'pass show homesafe' (split like a shell "
    "would, run without one).",
)
@click.option("--host-key-fingerprint", metavar="SHA256:...", help="Trust this ssh host key.")
@click.option(
    "--lock-wait",
    type=click.FloatRange(min=1),
    default=60,
    show_default=True,
    help="Seconds to wait for a repository locked by another running process.",
)
def add_command(
    name: str,
    location: str,
    engine: str | None,
    encryption: str | None,
    compression: str | None,
    passphrase_file: Path | None,
    passphrase_env: str | None,
    passcommand: str | None,
    host_key_fingerprint: str | None,
    lock_wait: float,
) -> None:
    """Register a repository at LOCATION under NAME, creating it if nothing is there.

    \b
    LOCATION is one of:
      /path/to/repository                 local (borg or restic)
      ssh://user@host[:port]/path         borg over ssh (borg serve on the server)
      sftp://user@host[:port]/path        restic over sftp
      s3:http(s)://host[:port]/bucket/dir restic on S3 (keys from AWS_ACCESS_KEY_ID and
                                          AWS_SECRET_ACCESS_KEY, kept in secrets/)

    The passphrase comes from a 0600 file, an environment variable or a command; it
    is never stored in homesafe's database.
    """
    from homesafe import api, locations, repositories
    from homesafe.errors import UsageError

    repositories.check_name(name)
    if name == repositories.DEFAULT_NAME:
        raise UsageError(f"{name!r} is the embedded default repository's name; choose another")
    parsed = repositories.parse_location(location)
    engine = engine or ("restic" if parsed.kind in ("sftp", "s3") else "borg")
    repositories.check_location(engine, parsed)
    encryption = encryption or repositories.DEFAULT_ENCRYPTIONS[engine]
    if encryption not in repositories.ENCRYPTIONS[engine]:
        raise UsageError(
            f"{engine} does not know the encryption {encryption!r}",
            hint=f"Choose one of: {', '.join(repositories.ENCRYPTIONS[engine])}.",
        )
    if sum(option is not None for option in (passphrase_file, passphrase_env, passcommand)) > 1:
        raise UsageError("give one of --passphrase-file, --passphrase-env and --passcommand")
    if any(existing.name == name for existing in repositories.registered()):
        raise UsageError(f"a repository named {name!r} is registered already")
    command = tuple(shlex.split(passcommand)) if passcommand else None
    if passcommand is not None and not command:
        raise UsageError("--passcommand is empty")
    file = None
    if encryption != "none" and not passphrase_env and not command:
        file = (
            passphrase_file.absolute()
            if passphrase_file
            else repositories.passphrase_file_for(name)
        )
        if file.exists():
            repositories.check_secret_file(file)
    stored_location = parsed.path if parsed.kind == "local" else location
    repository = repositories.Repository(
        name=name,
        location=stored_location,
        engine=engine,
        encryption=encryption,
        passphrase_file=file,
        compression=compression or repositories.DEFAULT_COMPRESSIONS[engine],
        passphrase_environment=passphrase_env,
        passphrase_command=command,
        lock_wait=lock_wait,
    )
    if parsed.uses_ssh:
        _prepare_ssh(parsed, host_key_fingerprint)
    stored_credentials = parsed.kind == "s3" and _store_s3_credentials(name)
    try:
        created = api.initialize_repository(repository)
        repositories.register(repository)
    except BaseException:
        if stored_credentials:  # made for this repository only: nothing uses them now
            repositories.s3_credentials_file(name).unlink(missing_ok=True)
        raise
    if created:
        click.echo(f"Created {engine} repository {name!r} at {location}")
        if file is not None and file.parent == locations.secrets_directory():
            click.echo(
                f"Its passphrase is in {file}: run `homesafe key export --repo {name}` and "
                "keep what it prints somewhere safe."
            )
    else:
        click.echo(f"Registered the existing {engine} repository at {location} as {name!r}")


def _store_s3_credentials(name: str) -> bool:
    """Keep the S3 key pair of the environment in secrets/NAME.s3-credentials (0600);
    True when this call wrote the file."""
    import os

    from homesafe import locations, repositories
    from homesafe.errors import UsageError

    path = repositories.s3_credentials_file(name)
    if path.exists():
        repositories.check_secret_file(path)
        return False
    missing = [key for key in repositories.S3_CREDENTIAL_NAMES if not os.environ.get(key)]
    if missing:
        raise UsageError(
            f"S3 needs an access key pair: set {' and '.join(missing)}",
            hint=f"Or write AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines to {path} "
            "(mode 0600).",
        )
    locations.write_secret_file(
        path,
        "".join(f"{key}={os.environ[key]}\n" for key in repositories.S3_CREDENTIAL_NAMES),
    )
    return True


def _record(repository: Repository) -> dict[str, Any]:
    return {
        "name": repository.name,
        "engine": repository.engine,
        "location": repository.location,
        "encryption": repository.encryption,
        "compression": repository.compression,
        "passphrase": repository.passphrase_source(),
        "lock_wait_seconds": repository.lock_wait,
        "added": repository.added or None,
    }


@repo_group.command("list")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def list_command(as_json: bool) -> None:
    """List the repositories homesafe knows: the embedded default, then the others."""
    from homesafe import repositories

    rows = [_record(repositories.default_repository())]
    rows += [_record(repository) for repository in repositories.registered()]
    if as_json:
        print_json({"repositories": rows})
        return
    from rich.table import Table

    table = Table()
    for column in ("name", "engine", "location", "encryption"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["engine"], row["location"], row["encryption"])
    console().print(table)


@repo_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def show_command(name: str, as_json: bool) -> None:
    """Show a repository: where it is, its size, archive count and last backup."""
    from homesafe import api, repositories
    from homesafe.engines import restic_key

    repository = repositories.get(name)
    info = api.repository_info(repository)
    own_key = restic_key.load(repository)
    document = {**_record(repository), **info.to_dict()}
    if repository.engine == "restic":
        document["homesafe_key"] = own_key.key_id if own_key else None
    if as_json:
        print_json(document)
        return
    out = console()
    out.print(f"[bold]{repository.name}[/] ({repository.engine}) at {repository.location}")
    out.print(f"  encryption: {info.encryption}; passphrase from {repository.passphrase_source()}")
    if own_key is not None:
        out.print(
            f"  opened with homesafe's own key {own_key.key_id[:8]} "
            f"({restic_key.secret_file(repository.name)})"
        )
    out.print(
        f"  {info.archive_count} archive(s), last {info.last_archive_time or 'never'}; "
        f"{human_size(info.stored_size)} stored for {human_size(info.original_size)} of data"
    )


@repo_group.command("check")
@click.argument("name")
@click.option("--verify-data", is_flag=True, help="Read back and verify all data (slow).")
@click.option(
    "--sample",
    "sample_percent",
    type=click.FloatRange(min=0, min_open=True, max=100),
    metavar="PERCENT",
    help="Read back a random PERCENT of the data (restic).",
)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def check_command(
    name: str, verify_data: bool, sample_percent: float | None, as_json: bool
) -> None:
    """Check a repository's integrity; exit 1 and say what is affected when damaged."""
    from homesafe import api, repositories

    if verify_data and sample_percent is not None:
        raise click.UsageError("give --verify-data or --sample, not both")
    report = api.check_repository(
        repositories.get(name), verify_data=verify_data, sample_percent=sample_percent
    )
    if as_json:
        print_json({"repository": name, **report.to_dict()})
    elif report.ok:
        click.echo(
            f"Repository {name!r}: no problems found (data read back: {report.verified_data}, "
            f"{report.duration:.1f} s)."
        )
    else:
        click.echo(f"Repository {name!r} is damaged:", err=True)
        for problem in report.problems:
            click.echo(f"  {problem}", err=True)
        if report.affected_archives:
            click.echo(f"Affected archives: {', '.join(report.affected_archives)}", err=True)
    if not report.ok:
        sys.exit(EXIT_FAILURE)


@repo_group.command("prune")
@click.argument("name")
@click.option("--keep-daily", type=click.IntRange(min=0), default=0, help="Daily archives to keep.")
@click.option(
    "--keep-weekly", type=click.IntRange(min=0), default=0, help="Weekly archives to keep."
)
@click.option(
    "--keep-monthly", type=click.IntRange(min=0), default=0, help="Monthly archives to keep."
)
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def prune_command(
    name: str, keep_daily: int, keep_weekly: int, keep_monthly: int, dry_run: bool, as_json: bool
) -> None:
    """Delete the archives a retention policy does not keep, and reclaim their space.

    For each period (day, week, month) the newest archive of that period counts; borg
    counts an archive for one rule only, restic for every rule it satisfies. Every
    archive of the repository is considered.
    """
    from homesafe import api, repositories
    from homesafe.engines.base import RetentionPolicy

    report = api.prune_repository(
        repositories.get(name),
        RetentionPolicy(keep_daily, keep_weekly, keep_monthly),
        dry_run=dry_run,
    )
    if as_json:
        print_json({"repository": name, **report.to_dict()})
        return
    verb = "Would delete" if dry_run else "Deleted"
    click.echo(f"Kept {len(report.kept)}: {', '.join(report.kept) or '-'}")
    click.echo(f"{verb} {len(report.removed)}: {', '.join(report.removed) or '-'}")
    if report.reclaimed_bytes is not None:
        click.echo(f"Reclaimed {human_size(report.reclaimed_bytes)}")


@repo_group.command("remove")
@click.argument("name")
@click.option("--delete-data", is_flag=True, help="Also delete the repository and its archives.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def remove_command(name: str, delete_data: bool, yes: bool) -> None:
    """Forget a repository; its data stays where it is unless --delete-data."""
    from homesafe import api, repositories

    repository = repositories.get(name)
    if name == repositories.DEFAULT_NAME:
        raise click.UsageError("the embedded default repository cannot be removed")
    if delete_data and not yes:
        click.confirm(
            f"Delete repository {name!r} at {repository.location} and every archive in it?",
            abort=True,
        )
    api.remove_repository(name, delete_data=delete_data)
    if delete_data:
        click.echo(f"Deleted repository {name!r} and its archives")
    else:
        click.echo(f"Forgot repository {name!r}; its data is still at {repository.location}")


@repo_group.command("break-lock")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def break_lock_command(name: str, yes: bool) -> None:
    """Remove every lock of a repository, whoever holds it.

    A lock left by a dead process of this host is cleared without this; a lock taken on
    another host (or, over ssh, one the server cannot prove stale) stays until you break
    it. Do it only when no homesafe, borg or restic process on any host uses the
    repository: breaking a live process's lock can damage the repository.
    """
    from homesafe import api, repositories

    repository = repositories.get(name)
    if not yes:
        click.confirm(
            f"Remove every lock of repository {name!r} at {repository.location}? Only do this "
            "when no homesafe, borg or restic process on any host uses it.",
            abort=True,
        )
    api.break_lock(repository)
    click.echo(f"Removed the locks of repository {name!r}")


@repo_group.command("trust")
@click.argument("name")
@click.option("--host-key-fingerprint", metavar="SHA256:...", help="Trust this ssh host key.")
def trust_command(name: str, host_key_fingerprint: str | None) -> None:
    """Trust the ssh host key a repository's server shows now (after a reinstall).

    The key is shown and must be confirmed, or given with --host-key-fingerprint.
    """
    from homesafe import repositories

    location = repositories.get(name).parsed_location
    if not location.uses_ssh:
        raise click.UsageError(f"repository {name!r} is not reached over ssh")
    _prepare_ssh(location, host_key_fingerprint, replace=True)


@repo_group.command("ssh-key")
def ssh_key_command() -> None:
    """Print homesafe's public ssh key (made on first use), for authorized_keys."""
    from homesafe import repositories

    click.echo(repositories.ensure_client_key())
