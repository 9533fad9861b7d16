"""Repository records: where archives go, how to reach them, and where passphrases come from.

A repository has a name, an engine (borg or restic), a location and a passphrase
source. The embedded default (borg, ``$HOMESAFE_HOME/repository``, ``repokey-blake2``,
a generated passphrase in ``$HOMESAFE_HOME/secrets/default.passphrase``) needs no
record; every other repository is registered in the state database by ``homesafe repo
add``. The database holds *where* a passphrase comes from, never the passphrase:

* a file (mode 0600; by default ``$HOMESAFE_HOME/secrets/<name>.passphrase``),
* an environment variable, read when the passphrase is needed,
* a command (an argv, run without a shell) whose standard output is the passphrase.

Engines receive the passphrase through a pipe, never argv or the environment.

Locations::

    /srv/backups/repository                local path (borg, restic)
    ssh://user@host[:port]/path            borg, talking to ``borg serve`` over ssh
    sftp://user@host[:port]/path           restic over sftp (also ``sftp:user@host:/path``)
    s3:http(s)://host[:port]/bucket/prefix restic on S3 object storage

Remote locations reached over ssh use homesafe's own client key
(``$HOMESAFE_HOME/ssh/id_ed25519``, generated on demand) and homesafe's own
``known_hosts``: host keys are trusted on first use only after the person confirmed the
fingerprint (or gave it), and a changed host key stops everything. An unreachable host, a
refused client key and a changed or unknown host key each have an error of their own.
On a CPU with AES instructions, AES-GCM comes first among the ciphers ssh offers (not in
restic's sftp command: see :func:`ssh_command`).
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
import os
import re
import shlex
import stat
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from homesafe import execute, locations, state
from homesafe.errors import (
    AuthenticationRefusedError,
    CommandError,
    ConfigurationError,
    HostKeyChangedError,
    HostKeyUnknownError,
    HostUnreachableError,
    PassphraseError,
    RemoteAccessError,
    UsageError,
)

__all__ = [
    "DEFAULT_NAME",
    "AuthenticationRefusedError",
    "HostKey",
    "HostKeyChangedError",
    "HostKeyUnknownError",
    "HostUnreachableError",
    "Location",
    "RemoteAccessError",
    "Repository",
    "default_repository",
    "get",
    "parse_location",
    "register",
    "registered",
    "unregister",
]

DEFAULT_NAME = "default"
DEFAULT_ENCRYPTION = "repokey-blake2"
DEFAULT_LOCK_WAIT = 60.0
ENGINES = ("borg", "restic")
# What ``--encryption`` may say per engine. restic always encrypts, with its keys kept in
# the repository (encrypted by the passphrase): that is borg's "repokey" idea.
ENCRYPTIONS = {
    "borg": (
        "repokey-blake2",
        "repokey",
        "keyfile-blake2",
        "keyfile",
        "authenticated-blake2",
        "authenticated",
        "none",
    ),
    "restic": ("repokey",),
}
DEFAULT_ENCRYPTIONS = {"borg": DEFAULT_ENCRYPTION, "restic": "repokey"}
DEFAULT_COMPRESSIONS = {"borg": "zstd,3", "restic": "auto"}
LOCATION_KINDS = {"borg": ("local", "ssh"), "restic": ("local", "sftp", "s3")}
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
S3_CREDENTIAL_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
PASSCOMMAND_TIMEOUT = 120


# -- locations -----------------------------------------------------------------------

LocationKind = Literal["local", "ssh", "sftp", "s3"]


@dataclass(frozen=True)
class Location:
    """A parsed repository location. ``path`` is the path on the host, or for S3 the
    ``bucket/prefix``; ``endpoint`` is S3's ``scheme://host[:port]``."""

    kind: LocationKind
    path: str
    user: str = ""
    host: str = ""
    port: int | None = None
    endpoint: str = ""

    @property
    def is_remote(self) -> bool:
        return self.kind != "local"

    @property
    def uses_ssh(self) -> bool:
        return self.kind in ("ssh", "sftp")

    @property
    def known_hosts_name(self) -> str:
        """The host as ssh writes it in known_hosts: ``[host]:port`` unless port 22."""
        if self.port in (None, 22):
            return self.host
        return f"[{self.host}]:{self.port}"

    @property
    def address(self) -> str:
        """``user@host:port`` or the S3 endpoint, for messages."""
        if self.kind == "s3":
            return self.endpoint
        return f"{self.user}@{self.host}:{self.port or 22}"


def parse_location(text: str) -> Location:
    """Parse a location (see the module docstring); a relative local path is made
    absolute. Raises UsageError for anything else."""
    text = text.strip()
    if text.startswith(("ssh://", "sftp://")):
        parts = urllib.parse.urlsplit(text)
        kind: LocationKind = "ssh" if parts.scheme == "ssh" else "sftp"
        if not parts.hostname or not parts.username or not parts.path or parts.path == "/":
            raise UsageError(
                f"{text!r} is not a usable {kind} location",
                hint=f"Write it as {kind}://user@host[:port]/path.",
            )
        try:
            port = parts.port
        except ValueError:
            raise UsageError(f"{text!r} has an invalid port") from None
        return Location(kind, parts.path, parts.username, parts.hostname, port)
    if text.startswith("sftp:"):
        # restic's own form: sftp:user@host:/path
        match = re.fullmatch(r"sftp:([^@/:]+)@([^:/]+):(.+)", text)
        if not match:
            raise UsageError(
                f"{text!r} is not a usable sftp location",
                hint="Write it as sftp://user@host[:port]/path or sftp:user@host:/path.",
            )
        return Location("sftp", match[3], match[1], match[2], None)
    if text.startswith("s3:"):
        match = re.fullmatch(r"s3:(https?://[^/]+)/([^/]+(?:/.*)?)", text)
        if not match:
            raise UsageError(
                f"{text!r} is not a usable S3 location",
                hint="Write it as s3:http(s)://host[:port]/bucket[/prefix].",
            )
        return Location("s3", match[2].rstrip("/"), endpoint=match[1])
    if re.match(r"^[a-z0-9+.-]+:", text) and not text.startswith("/"):
        raise UsageError(
            f"{text!r}: unknown kind of location",
            hint="Use a local path, ssh://, sftp:// or s3:http(s)://.",
        )
    if not text:
        raise UsageError("the repository location is empty")
    return Location("local", os.path.abspath(text))


def check_location(engine: str, location: Location) -> None:
    """A UsageError unless ``engine`` can use ``location``."""
    if location.kind not in LOCATION_KINDS[engine]:
        kinds = ", ".join(LOCATION_KINDS[engine])
        hint = {
            "borg": "borg reaches remote repositories with ssh://user@host[:port]/path.",
            "restic": "restic reaches remote repositories with sftp:// or s3:.",
        }[engine]
        raise UsageError(
            f"{engine} cannot use a {location.kind} location (it uses: {kinds})", hint=hint
        )


# -- repositories --------------------------------------------------------------------


@dataclass(frozen=True)
class Repository:
    """Where archives go: a name, a location, an engine, and a passphrase source.

    At most one of ``passphrase_file``, ``passphrase_environment`` and
    ``passphrase_command`` is set; an unencrypted repository (``encryption`` "none")
    needs none. ``lock_wait`` is how long a command waits for a repository locked by
    another live process before it fails.
    """

    name: str
    location: str
    engine: str = "borg"
    encryption: str = DEFAULT_ENCRYPTION
    passphrase_file: Path | None = None
    compression: str = "zstd,3"
    passphrase_environment: str | None = None
    passphrase_command: tuple[str, ...] | None = None
    lock_wait: float = DEFAULT_LOCK_WAIT
    added: str = field(default="", compare=False)

    @property
    def parsed_location(self) -> Location:
        return parse_location(self.location)

    @property
    def is_remote(self) -> bool:
        return self.parsed_location.is_remote

    def passphrase_source(self) -> str:
        """Where the passphrase comes from, for people (never the passphrase)."""
        if self.encryption == "none":
            return "none (unencrypted)"
        if self.passphrase_environment:
            return f"environment variable {self.passphrase_environment}"
        if self.passphrase_command:
            return f"command {shlex.join(self.passphrase_command)}"
        return f"file {self.passphrase_file}"

    def passphrase(self) -> str | None:
        """The passphrase, read from its source now; None for an unencrypted repository."""
        if self.encryption == "none":
            return None
        if self.passphrase_environment:
            value = os.environ.get(self.passphrase_environment)
            if not value:
                raise PassphraseError(
                    f"the passphrase of repository {self.name!r} comes from the environment "
                    f"variable {self.passphrase_environment}, which is not set"
                )
            return value
        if self.passphrase_command:
            return _run_passcommand(self.name, self.passphrase_command)
        if self.passphrase_file is None:
            raise PassphraseError(f"no passphrase is configured for repository {self.name!r}")
        try:
            return self.passphrase_file.read_text().rstrip("\n")
        except FileNotFoundError:
            raise PassphraseError(
                f"the passphrase file of repository {self.name!r} is missing: "
                f"{self.passphrase_file}",
                hint="Restore it from your key export (`homesafe key export` printed it).",
            ) from None
        except OSError as error:
            raise PassphraseError(
                f"cannot read the passphrase file {self.passphrase_file}: {error.strerror}"
            ) from None

    def s3_credentials(self) -> dict[str, str]:
        """The S3 access key pair: from ``secrets/<name>.s3-credentials`` when it exists,
        else from homesafe's own environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)."""
        path = s3_credentials_file(self.name)
        values: dict[str, str] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip() in S3_CREDENTIAL_NAMES:
                    values[key.strip()] = value.strip()
        else:
            values = {name: os.environ[name] for name in S3_CREDENTIAL_NAMES if name in os.environ}
        missing = [name for name in S3_CREDENTIAL_NAMES if not values.get(name)]
        if missing:
            raise ConfigurationError(
                f"no S3 credentials for repository {self.name!r}: {', '.join(missing)} missing",
                hint=f"Put AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines in {path} "
                "(mode 0600), or set both variables in the environment.",
            )
        return values


def _run_passcommand(name: str, argv: Sequence[str]) -> str:
    try:
        completed = execute.run(list(argv), timeout=PASSCOMMAND_TIMEOUT)
    except CommandError as error:
        raise PassphraseError(
            f"the passphrase command of repository {name!r} failed: {error.message}"
        ) from None
    value = completed.stdout.rstrip("\n")
    if not value:
        raise PassphraseError(f"the passphrase command of repository {name!r} printed nothing")
    return value


def default_passphrase_file() -> Path:
    return passphrase_file_for(DEFAULT_NAME)


def passphrase_file_for(name: str) -> Path:
    """Where a repository's passphrase file lives unless told otherwise."""
    return locations.secrets_directory() / f"{name}.passphrase"


def s3_credentials_file(name: str) -> Path:
    return locations.secrets_directory() / f"{name}.s3-credentials"


def default_repository() -> Repository:
    """The embedded default repository (nothing is created by this call)."""
    return Repository(
        name=DEFAULT_NAME,
        location=str(locations.default_repository()),
        passphrase_file=default_passphrase_file(),
    )


def generate_passphrase(repository: Repository) -> None:
    """Give a repository about to be created a new random passphrase (0600 file).

    An existing passphrase file is kept: it may belong to a repository moved away.
    Passphrases from the environment or a command are the person's to make.
    """
    if (
        repository.encryption == "none"
        or repository.passphrase_environment
        or repository.passphrase_command
        or repository.passphrase_file is None
        or repository.passphrase_file.exists()
    ):
        return
    locations.write_secret_file(repository.passphrase_file, new_passphrase() + "\n")


def new_passphrase() -> str:
    # secrets and hashlib are imported where they are used: they load OpenSSL, which
    # an ordinary backup, importing this module, does not otherwise need.
    import secrets

    return secrets.token_urlsafe(32)


def check_secret_file(path: Path) -> None:
    """A ConfigurationError unless ``path`` is a regular file only its owner can read."""
    try:
        status = path.stat()
    except FileNotFoundError:
        raise ConfigurationError(f"{path} does not exist") from None
    if not stat.S_ISREG(status.st_mode):
        raise ConfigurationError(f"{path} is not a regular file")
    if status.st_mode & 0o077:
        raise ConfigurationError(
            f"{path} can be read by others (mode {stat.S_IMODE(status.st_mode):04o})",
            hint=f"chmod 600 {path}",
        )
    if status.st_uid != os.geteuid():
        raise ConfigurationError(f"{path} belongs to another user (uid {status.st_uid})")


# -- the registry --------------------------------------------------------------------


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(
            f"{name!r} cannot be a repository name",
            hint="Use lower-case letters, digits, - and _ (at most 64, starting with a "
            "letter or digit).",
        )
    return name


def _record(repository: Repository) -> dict[str, object]:
    source: dict[str, object] = {}
    if repository.passphrase_environment:
        source = {"environment": repository.passphrase_environment}
    elif repository.passphrase_command:
        source = {"command": list(repository.passphrase_command)}
    elif repository.passphrase_file is not None:
        source = {"file": str(repository.passphrase_file)}
    return {
        "name": repository.name,
        "location": repository.location,
        "engine": repository.engine,
        "encryption": repository.encryption,
        "compression": repository.compression,
        "passphrase_source": json.dumps(source),
        "lock_wait": repository.lock_wait,
        "added": repository.added or datetime.datetime.now(datetime.UTC).isoformat(),
    }


def _from_row(row: Sequence[object]) -> Repository:
    name, location, engine, encryption, compression, source_text, lock_wait, added = row
    source = json.loads(str(source_text))
    command = source.get("command")
    return Repository(
        name=str(name),
        location=str(location),
        engine=str(engine),
        encryption=str(encryption),
        compression=str(compression),
        passphrase_file=Path(source["file"]) if "file" in source else None,
        passphrase_environment=source.get("environment"),
        passphrase_command=tuple(command) if command else None,
        lock_wait=float(str(lock_wait)),
        added=str(added),
    )


COLUMNS = "name, location, engine, encryption, compression, passphrase_source, lock_wait, added"


def register(repository: Repository) -> None:
    """Record ``repository`` in the state database (no passphrase goes there)."""
    check_name(repository.name)
    if repository.name == DEFAULT_NAME:
        raise UsageError(f"{DEFAULT_NAME!r} is the embedded default repository's name")
    record = _record(repository)
    with state.connect() as connection:
        existing = connection.execute(
            "SELECT 1 FROM repositories WHERE name = ?", (repository.name,)
        ).fetchone()
        if existing:
            raise UsageError(
                f"a repository named {repository.name!r} is registered already",
                hint="`homesafe repo list` shows them; `homesafe repo remove` forgets one.",
            )
        connection.execute(
            f"INSERT INTO repositories ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
            tuple(record.values()),
        )


def registered() -> list[Repository]:
    """Every registered repository, by name (the embedded default is not among them)."""
    with state.connect() as connection:
        rows = connection.execute(
            f"SELECT {COLUMNS} FROM repositories ORDER BY name"  # noqa: S608
        ).fetchall()
    return [_from_row(row) for row in rows]


def get(name: str | None) -> Repository:
    """The repository called ``name``; None or "default" is the embedded default."""
    if name is None or name == DEFAULT_NAME:
        return default_repository()
    with state.connect() as connection:
        row = connection.execute(
            f"SELECT {COLUMNS} FROM repositories WHERE name = ?",  # noqa: S608
            (name,),
        ).fetchone()
    if row is None:
        known = ", ".join([DEFAULT_NAME, *(repository.name for repository in registered())])
        raise UsageError(
            f"no repository named {name!r}",
            hint=f"Known repositories: {known}. `homesafe repo add` registers one.",
        )
    return _from_row(row)


def unregister(name: str) -> None:
    """Forget the record of ``name``; its data and secrets are left alone."""
    with state.connect() as connection:
        deleted = connection.execute("DELETE FROM repositories WHERE name = ?", (name,)).rowcount
    if not deleted:
        raise UsageError(f"no repository named {name!r} is registered")


# -- ssh: homesafe's client key and known_hosts ---------------------------------------


def ssh_directory() -> Path:
    directory = locations.ensure_home() / "ssh"
    directory.mkdir(exist_ok=True, mode=0o700)
    return directory


def client_key() -> Path:
    return ssh_directory() / "id_ed25519"


def known_hosts_file() -> Path:
    return ssh_directory() / "known_hosts"


def ensure_client_key() -> str:
    """homesafe's public ssh key (``ssh-ed25519 AAAA... comment``), generated if missing."""
    key = client_key()
    if not key.exists():
        comment = f"homesafe@{locations.hostname()}"
        execute.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
            timeout=60,
        )
    return key.with_name(key.name + ".pub").read_text().strip()


# OpenSSH's own ciphers, AES-GCM first: ssh puts chacha20-poly1305 first because it is
# fast and constant-time without hardware help; with AES instructions, AES-GCM is both,
# and faster still (a 200 MB borg restore over ssh: ~0.1 s of CPU less on each side). Every
# cipher of the default list stays in it, so any server ssh could reach, it still reaches.
AES_FIRST_CIPHERS = (
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)
CPU_INFORMATION = Path("/proc/cpuinfo")


@functools.cache
def has_aes_instructions(cpu_information: Path = CPU_INFORMATION) -> bool:
    """Whether this machine's CPU has AES instructions: ``aes`` among the flags (x86) or
    features (ARM) that /proc/cpuinfo lists (its first CPU's); False where it cannot be
    read. Read once a process: the kernel makes the file up anew at every read."""
    try:
        text = cpu_information.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            return "aes" in value.split()
    return False


def ssh_options() -> list[str]:
    """ssh options every remote call uses: homesafe's key and known_hosts only, never a
    question (BatchMode), a changed or unknown host key refused; AES-GCM preferred where
    the CPU has AES instructions (:data:`AES_FIRST_CIPHERS`). The key is made on first
    use, so that a server that lacks it refuses it in the words of that case."""
    return [*ssh_access_options(), *ssh_tuning_options()]


def ssh_tuning_options() -> list[str]:
    """The ssh options homesafe adds for speed alone (see :func:`ssh_options`)."""
    if not has_aes_instructions():
        return []
    return ["-o", "Ciphers=" + ",".join(AES_FIRST_CIPHERS)]


def ssh_access_options() -> list[str]:
    """The ssh options that reach a server as homesafe does (see :func:`ssh_options`):
    its key and known_hosts, and no question ever asked."""
    ensure_client_key()
    return [
        "-i",
        str(client_key()),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts_file()}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "UpdateHostKeys=no",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=20",
        "-o",
        "ServerAliveInterval=30",
    ]


def ssh_command(location: Location, *, tuned: bool = True) -> list[str]:
    """``ssh`` with homesafe's options (without :func:`ssh_tuning_options` unless
    ``tuned``), the port and ``user@host`` of ``location``."""
    argv = ["ssh", *(ssh_options() if tuned else ssh_access_options())]
    if location.port:
        argv += ["-p", str(location.port)]
    return [*argv, f"{location.user}@{location.host}"]


@dataclass(frozen=True)
class HostKey:
    """One public host key of a server, as known_hosts lines hold it."""

    host: str
    key_type: str
    key: str

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
        import hashlib

        digest = hashlib.sha256(base64.b64decode(self.key)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def line(self) -> str:
        return f"{self.host} {self.key_type} {self.key}"


KEY_PREFERENCE = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "rsa-sha2-512")


def _parse_host_keys(text: str, host: str | None = None) -> list[HostKey]:
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or line.startswith("#"):
            continue
        if host is not None and host not in fields[0].split(","):
            continue
        try:
            base64.b64decode(fields[2], validate=True)
        except ValueError:
            continue
        found.append(HostKey(fields[0], fields[1], fields[2]))
    return found


def scan_host_keys(location: Location) -> list[HostKey]:
    """The host keys the server shows now (``ssh-keyscan``); HostUnreachableError when
    it shows none."""
    argv = ["ssh-keyscan", "-T", "10"]
    if location.port:
        argv += ["-p", str(location.port)]
    argv.append(location.host)
    completed = execute.run(argv, timeout=60, accept_returncodes=(0, 1))
    keys = [
        HostKey(location.known_hosts_name, key.key_type, key.key)
        for key in _parse_host_keys(completed.stdout)
    ]
    if not keys:
        detail = completed.stderr.strip().splitlines()
        raise HostUnreachableError(
            f"cannot reach {location.host} port {location.port or 22}"
            + (f": {detail[-1]}" if detail else ""),
            hint="Check the host name, the port and that sshd runs there.",
        )
    return sorted(
        keys,
        key=lambda key: (
            KEY_PREFERENCE.index(key.key_type) if key.key_type in KEY_PREFERENCE else 99
        ),
    )


def known_host_keys(location: Location) -> list[HostKey]:
    """The keys homesafe trusts for the host of ``location``."""
    path = known_hosts_file()
    if not path.exists():
        return []
    return _parse_host_keys(path.read_text(), location.known_hosts_name)


def normalize_fingerprint(fingerprint: str) -> str:
    value = fingerprint.strip()
    if not value.startswith("SHA256:"):
        value = "SHA256:" + value
    return value.rstrip("=")


def trust_host(
    location: Location,
    *,
    fingerprint: str | None = None,
    confirm: Callable[[HostKey], bool] | None = None,
    replace: bool = False,
) -> HostKey:
    """Make sure homesafe trusts the server of ``location`` and return its key.

    A key trusted before must still be the one the server shows (else
    HostKeyChangedError, unless ``replace``). A new key is trusted when it has the given
    ``fingerprint``, or when ``confirm(key)`` (which shows the fingerprint to a person)
    says yes; otherwise HostKeyUnknownError. Trusted keys go to homesafe's known_hosts.
    """
    scanned = scan_host_keys(location)
    known = [] if replace else known_host_keys(location)
    for key in known:
        if any(seen.key_type == key.key_type and seen.key == key.key for seen in scanned):
            return key
    if known:
        raise HostKeyChangedError(
            f"the host key of {location.known_hosts_name} has changed: homesafe trusts "
            f"{known[0].fingerprint}, the server now shows "
            f"{', '.join(key.fingerprint for key in scanned)}",
            hint="Someone may be intercepting the connection, or the server was "
            "reinstalled. Only if you know why: `homesafe repo trust NAME "
            "--host-key-fingerprint SHA256:...` trusts the new key.",
        )
    if fingerprint is not None:
        wanted = normalize_fingerprint(fingerprint)
        chosen = next((key for key in scanned if key.fingerprint == wanted), None)
        if chosen is None:
            raise HostKeyChangedError(
                f"{location.known_hosts_name} shows "
                f"{', '.join(key.fingerprint for key in scanned)}, not the expected {wanted}",
                hint="Check the fingerprint on the server: ssh-keygen -lf "
                "/etc/ssh/ssh_host_ed25519_key.pub",
            )
    else:
        chosen = scanned[0]
        if confirm is None or not confirm(chosen):
            raise HostKeyUnknownError(
                f"the host key of {location.known_hosts_name} ({chosen.key_type} "
                f"{chosen.fingerprint}) is not trusted",
                hint="Compare it with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on "
                "the server, then confirm it or give it with --host-key-fingerprint.",
            )
    forget_host(location)
    path = known_hosts_file()
    with path.open("a") as known_hosts:
        known_hosts.write(chosen.line() + "\n")
    os.chmod(path, 0o600)
    return chosen


def forget_host(location: Location) -> None:
    """Drop every key homesafe trusts for the host of ``location``."""
    path = known_hosts_file()
    if not path.exists():
        return
    name = location.known_hosts_name
    kept = [
        line
        for line in path.read_text().splitlines()
        if not line.split() or name not in line.split()[0].split(",")
    ]
    path.write_text("".join(line + "\n" for line in kept))


# ssh's own words -> what they mean. Order matters: a changed key also says
# "Host key verification failed".
SSH_FAILURES: list[tuple[re.Pattern[str], type[RemoteAccessError]]] = [
    (re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED"), HostKeyChangedError),
    (re.compile(r"Host key for .* has changed"), HostKeyChangedError),
    (re.compile(r"No \S+ host key is known for|Host key verification failed"), HostKeyUnknownError),
    (
        re.compile(r"Permission denied \(|Too many authentication failures"),
        AuthenticationRefusedError,
    ),
    (
        re.compile(
            r"Connection refused|No route to host|Connection timed out|"
            r"Could not resolve hostname|Network is unreachable|"
            r"Connection (closed|reset) by \S+ port|kex_exchange_identification|"
            r"Name or service not known"
        ),
        HostUnreachableError,
    ),
]


def classify_ssh_failure(text: str, repository: Repository) -> RemoteAccessError | None:
    """The error ssh's messages in ``text`` stand for, or None when they show none."""
    location = repository.parsed_location
    for pattern, error_class in SSH_FAILURES:
        match = pattern.search(text)
        if not match:
            continue
        if error_class is HostKeyChangedError:
            shown = re.search(r"(SHA256:[A-Za-z0-9+/]+)", text)
            trusted = known_host_keys(location)
            return HostKeyChangedError(
                f"the host key of {location.known_hosts_name} has changed"
                + (f": the server now shows {shown[1]}" if shown else "")
                + (f", homesafe trusts {trusted[0].fingerprint}" if trusted else "")
                + "; nothing was sent to it",
                hint="Someone may be intercepting the connection, or the server was "
                f"reinstalled. Only if you know why: `homesafe repo trust {repository.name} "
                "--host-key-fingerprint SHA256:...` trusts the new key.",
            )
        if error_class is HostKeyUnknownError:
            return HostKeyUnknownError(
                f"homesafe does not trust the host key of {location.known_hosts_name} yet",
                hint=f"`homesafe repo trust {repository.name}` shows its fingerprint and asks.",
            )
        if error_class is AuthenticationRefusedError:
            public = client_key().with_name(client_key().name + ".pub")
            shown_key = public.read_text().strip() if public.exists() else "(none yet)"
            return AuthenticationRefusedError(
                f"{location.address} refused homesafe's ssh key (user {location.user})",
                hint="Add this line to ~/.ssh/authorized_keys of "
                f"{location.user} on {location.host}:\n{shown_key}",
            )
        return HostUnreachableError(
            f"cannot reach {location.address}: {match[0]}",
            hint="Check the host name and port, that the host is up and sshd runs there.",
        )
    return None


def diagnose_ssh(repository: Repository) -> RemoteAccessError | None:
    """Connect the way engines do and say what is wrong, or None when ssh itself works.

    Engines do not always pass ssh's own words on (borg may only say the connection
    closed), so after a failure of a remote call this probe tells the cases apart.
    """
    location = repository.parsed_location
    if not location.uses_ssh:
        return None
    try:
        execute.run([*ssh_command(location), "true"], timeout=60)
    except CommandError as error:
        return classify_ssh_failure(error.stderr_tail or error.message, repository)
    return None
