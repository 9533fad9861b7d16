"""Running an app's pre/post hooks.

A hook is a Python method of the app (``backup_pre(packet)`` and so on, as in the
reference design) and/or an argv command from the manifest's ``[hooks]`` table. Both
have the manifest's ``hooks.timeout`` (60 s unless set). A command runs with the
operation in its environment: ``HOMESAFE_OPERATION``, ``HOMESAFE_APP``, ``HOMESAFE_ROOT``
and ``HOMESAFE_ARCHIVE``; past its timeout it is killed, with everything it started (its
process group). The outcome, output included (a command's stdout and stderr, a Python
hook's return value or traceback), is always returned; whether a failure fails the app
is the caller's decision, following ``hooks.on_error``.

A Python hook runs in a thread of its own, because Python cannot kill a thread: past its
timeout it is *abandoned*, not stopped. The outcome says it timed out and the operation
goes on (the app is resumed), but the function may still be running in the background
until it returns or homesafe exits. A Python hook that may hang should put its own
timeouts on what it waits for.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
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
        outcome = run_python(app.id, hook_name, method, packet, app.manifest.hooks.timeout)
        outcomes.append(outcome)
        if not outcome.succeeded:
            return outcomes
    command = app.manifest.hook_command(hook_name)
    if command is not None:
        outcomes.append(
            run_command(app.id, hook_name, command, environment, app.manifest.hooks.timeout)
        )
    return outcomes


def run_python(
    app_id: str, hook_name: str, method: Callable[[Any], Any], packet: Any, timeout: float
) -> HookOutcome:
    """Call a Python hook in a thread and wait for it up to ``timeout`` seconds.

    Never raises for the hook's failure. A hook still running at its timeout is left
    running in its (daemon) thread — Python offers no way to stop it — and reported as
    failed: "did not finish within N s".
    """
    started = time.monotonic()
    finished: list[HookOutcome] = []

    def call() -> None:
        try:
            returned = method(packet)
        except BaseException as error:  # reported in the outcome, in the calling thread
            finished.append(
                HookOutcome(
                    app_id,
                    hook_name,
                    succeeded=False,
                    output="".join(traceback.format_exception(error)),
                    error=f"{type(error).__name__}: {error}",
                    duration=time.monotonic() - started,
                )
            )
            return
        finished.append(
            HookOutcome(
                app_id,
                hook_name,
                succeeded=True,
                output="" if returned is None else str(returned),
                duration=time.monotonic() - started,
            )
        )

    thread = threading.Thread(target=call, name=f"hook-{app_id}-{hook_name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if finished:
        return finished[0]
    return HookOutcome(
        app_id,
        hook_name,
        succeeded=False,
        error=(
            f"the Python hook {hook_name} did not finish within {timeout:g} s; it was "
            "abandoned (a Python function cannot be killed) and may still be running"
        ),
        duration=time.monotonic() - started,
    )


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
