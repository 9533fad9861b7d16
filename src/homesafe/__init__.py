"""homesafe: app-aware backup and restore for self-hosted servers.

The public Python API lives in :mod:`homesafe.api`; the most used names are re-exported
here so that ``from homesafe import backup_apps`` works.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
