"""Where homesafe keeps its state and reads its configuration.

``HOMESAFE_HOME`` (default ``/var/lib/homesafe`` as root, else the user data dir) holds
``state.db``, the default repository, ``secrets/`` (0700, files 0600), ``journal/`` and
the lockdown flags. ``HOMESAFE_CONFIG`` (default ``/etc/homesafe`` as root, else the
user config dir) holds ``apps.d/*.toml``. Both are read from the environment on every
call so that tests and callers can point them elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path


def hostname() -> str:
    """This host's name, as ``socket.gethostname()`` gives it (the kernel's node name),
    without importing socket (its enums cost ~1.5 ms of every start-up)."""
    return os.uname().nodename


def running_as_root() -> bool:
    return os.geteuid() == 0


def home() -> Path:
    """The state directory (``HOMESAFE_HOME``)."""
    configured = os.environ.get("HOMESAFE_HOME")
    if configured:
        return Path(configured)
    if running_as_root():
        return Path("/var/lib/homesafe")
    import platformdirs

    return Path(platformdirs.user_data_dir("homesafe"))


def config() -> Path:
    """The configuration directory (``HOMESAFE_CONFIG``)."""
    configured = os.environ.get("HOMESAFE_CONFIG")
    if configured:
        return Path(configured)
    if running_as_root():
        return Path("/etc/homesafe")
    import platformdirs

    return Path(platformdirs.user_config_dir("homesafe"))


def apps_directory() -> Path:
    return config() / "apps.d"


def default_repository() -> Path:
    return home() / "repository"


def secrets_directory() -> Path:
    """The secrets directory, created with mode 0700 if it is missing."""
    directory = home() / "secrets"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    return directory


def lockdown_directory() -> Path:
    return home() / "lockdown"


def staging_directory() -> Path:
    """Where a backup stages copies of apps it cannot snapshot or clone, for the time
    of the backup (``HOMESAFE_STAGING``, default ``$HOMESAFE_HOME/staging``): it needs
    room for a copy of such apps."""
    configured = os.environ.get("HOMESAFE_STAGING")
    return Path(configured) if configured else home() / "staging"


def state_database() -> Path:
    return home() / "state.db"


def ensure_home() -> Path:
    """The state directory, created (0700) if it is missing."""
    directory = home()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def write_secret_file(path: Path, content: str) -> None:
    """Write ``content`` to ``path`` with mode 0600 from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(descriptor, content.encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
