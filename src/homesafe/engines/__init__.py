"""Backup engines behind one Protocol (:mod:`homesafe.engines.base`)."""

from __future__ import annotations

from homesafe.engines.base import Engine
from homesafe.errors import ConfigurationError

ENGINE_NAMES = ("borg", "restic")


def engine_for(name: str) -> Engine:
    """The engine implementation called ``name``."""
    if name == "borg":
        from homesafe.engines.borg import BorgEngine

        return BorgEngine()
    if name == "restic":
        from homesafe.engines.restic import ResticEngine

        return ResticEngine()
    raise ConfigurationError(
        f"unknown backup engine {name!r}", hint=f"Known engines: {', '.join(ENGINE_NAMES)}."
    )
