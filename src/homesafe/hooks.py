"""Running an app's pre/post hooks.

A hook is a Python method of the app (``backup_pre(packet)`` and so on, as in the
reference design) and/or an argv command from the manifest's ``[hooks]`` table. A
command runs with a timeout (killed when it passes it) and sees the operation in its
environment: ``HOMESAFE_OPERATION``, ``HOMESAFE_APP``, ``HOMESAFE_ROOT`` and
``HOMESAFE_ARCHIVE``. The outcome, output included, is always returned; whether a
failure fails the app is the caller's decision, following ``hooks.on_error``.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from homesafe import execute
from homesafe.errors import CommandError

if TYPE_CHECKING:
    from homesafe.apps import App


@dataclass
class HookOutcome:
    """What one hook did: whether it succeeded, what it printed, how long it took."""

    app: str
    hook: str
    succeeded: bool
    output: str = ""
    error: str | None = None
    duration: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "hook": self.hook,
            "succeeded": self.succeeded,
            "output": self.output,
            "error": self.error,
            "duration_seconds": round(self.duration, 3),
        }


def run_hook(
    app: App, hook_name: str, packet: Any, environment: dict[str, str]
) -> list[HookOutcome]:
    """Run the app's Python hook and then its command hook, if it has them.

    The command is skipped when the Python hook failed. An empty list means the app has
    no hook of that name.
    """
    outcomes: list[HookOutcome] = []
    method = app.python_hook(hook_name)
    if method is not None:
        started = time.monotonic()
        try:
            returned = method(packet)
        except Exception as error:
            outcomes.append(
                HookOutcome(
                    app.id,
                    hook_name,
                    succeeded=False,
                    output="".join(traceback.format_exception(error)),
                    error=f"{type(error).__name__}: {error}",
                    duration=time.monotonic() - started,
                )
            )
            return outcomes
        outcomes.append(
            HookOutcome(
                app.id,
                hook_name,
                succeeded=True,
                output="" if returned is None else str(returned),
                duration=time.monotonic() - started,
            )
        )
    command = app.manifest.hook_command(hook_name)
    if command is not None:
        outcomes.append(
            run_command(app.id, hook_name, command, environment, app.manifest.hooks.timeout)
        )
    return outcomes


def run_command(
    app_id: str, hook_name: str, command: list[str], environment: dict[str, str], timeout: float
) -> HookOutcome:
    """Run one argv hook (or health check) with a timeout; never raises for its failure."""
    started = time.monotonic()
    try:
        completed = execute.run(command, environment=environment, timeout=timeout)
    except CommandError as error:
        return HookOutcome(
            app_id,
            hook_name,
            succeeded=False,
            output=error.stderr_tail,
            error=error.message.splitlines()[0],
            duration=time.monotonic() - started,
        )
    output = "\n".join(part.strip("\n") for part in (completed.stdout, completed.stderr) if part)
    return HookOutcome(
        app_id, hook_name, succeeded=True, output=output, duration=time.monotonic() - started
    )
