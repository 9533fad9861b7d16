"""homesafe: app-aware backup and restore for self-hosted servers.

The public Python API lives in :mod:`homesafe.api`; its names are also available here
(``from homesafe import backup_apps``), imported on first use so that ``homesafe
--help`` stays fast.
"""

from __future__ import annotations

# typing.TYPE_CHECKING, without importing typing (~8 ms): for the modules the
# ``homesafe`` program imports before it starts borg (see homesafe.prestart).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_API_NAMES = {
    "AppResult",
    "BackupError",
    "OperationResult",
    "Packet",
    "backup_apps",
    "restore_apps",
    "list_archives",
    "get_setting",
    "set_setting",
}

__all__ = ["__version__", *sorted(_API_NAMES)]


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        from homesafe import api

        return getattr(api, name)
    raise AttributeError(f"module 'homesafe' has no attribute {name!r}")
