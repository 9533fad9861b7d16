"""Stopping and starting an app's services, one handler per service type.

Every handler answers three questions with real commands: is the service running (or,
for apache, enabled), stop it, start it. :class:`ServiceController` stops a list of
services in reverse order, remembers exactly which ones it stopped, and starts those
again, in forward order, when asked: a service that was not running is left alone.
Given a journal (:class:`ChangeLog`), it writes each stop down before making it and
closes the entry once the service runs again, so that a homesafe killed meanwhile can be
recovered from (see :mod:`homesafe.journal`).

What each handler restores is exactly the state it found: it acts only on a service
that was running (for apache: enabled), and undoes only what it did. A service or site
that was stopped or disabled stays so; apache is reloaded only when it runs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from homesafe import execute, processes
from homesafe.errors import CommandError, ServiceError
from homesafe.manifest import (
    ApacheService,
    CommandService,
    OpenrcService,
    RunitService,
    Service,
    SystemdService,
)

SERVICE_COMMAND_TIMEOUT = 120.0
# How long a runit service may take to stop or start, and how often its state is read.
RUNIT_WAIT_SECONDS = 30.0
RUNIT_POLL_SECONDS = 0.005
APACHE_PID_FILE = "/var/run/apache2/apache2.pid"


class ServiceHandler(Protocol):
    """What homesafe needs of a service, whatever supervises it."""

    @property
    def label(self) -> str: ...

    def is_running(self) -> bool: ...

    def stop(self) -> None: ...

    def start(self) -> None: ...


class ChangeLog(Protocol):
    """Where a change is written down before it is made (a :class:`homesafe.journal.Journal`)."""

    def record(self, kind: str, data: dict[str, Any]) -> int: ...

    def undone(self, number: int) -> None: ...

    def keep(self, number: int, reason: str) -> None: ...


def _run(argv: Sequence[str], environment: dict[str, str] | None = None) -> None:
    execute.run(argv, environment=environment, timeout=SERVICE_COMMAND_TIMEOUT)


@dataclass
class SystemdHandler:
    service: SystemdService

    @property
    def label(self) -> str:
        return f"systemd unit {self.service.name}"

    def status_argv(self) -> list[str]:
        return ["systemctl", "is-active", "--quiet", self.service.name]

    def stop_argv(self) -> list[str]:
        return ["systemctl", "stop", self.service.name]

    def start_argv(self) -> list[str]:
        return ["systemctl", "start", self.service.name]

    def is_running(self) -> bool:
        return execute.succeeds(self.status_argv(), timeout=SERVICE_COMMAND_TIMEOUT)

    def stop(self) -> None:
        _run(self.stop_argv())

    def start(self) -> None:
        _run(self.start_argv())


@dataclass
class RunitHandler:
    service: RunitService

    @property
    def label(self) -> str:
        return f"runit service {self.service.name}"

    def environment(self) -> dict[str, str] | None:
        if self.service.service_directory:
            return {"SVDIR": self.service.service_directory}
        return None

    def status_argv(self) -> list[str]:
        return ["sv", "status", self.service.name]

    # ``up``/``down`` only ask runsv; ``start``/``stop`` also wait, polling every 0.42 s.
    def stop_argv(self) -> list[str]:
        return ["sv", "down", self.service.name]

    def start_argv(self) -> list[str]:
        return ["sv", "up", self.service.name]

    def waiting_argv(self, command: str) -> list[str]:
        """``sv`` waiting itself for ``command`` to take effect: used when runsv's state
        file cannot be read, or a ``check`` script must say when the service is up."""
        return ["sv", "-w", str(round(RUNIT_WAIT_SECONDS)), command, self.service.name]

    def supervise_directory(self) -> Path:
        base = self.service.service_directory or os.environ.get("SVDIR") or "/etc/service"
        return Path(base) / self.service.name / "supervise"

    def _tell_runsv(self, letter: str) -> bool:
        """Write ``letter`` to runsv's control pipe, which is all ``sv down``/``sv up``
        do, without the ~10 ms of starting ``sv`` while the service is down. False when
        the pipe cannot be opened (runsv is not running): ``sv`` then says why."""
        try:
            descriptor = os.open(
                self.supervise_directory() / "control", os.O_WRONLY | os.O_NONBLOCK
            )
        except OSError:
            return False
        try:
            return os.write(descriptor, letter.encode()) == 1
        except OSError:
            return False
        finally:
            os.close(descriptor)

    def state(self) -> str | None:
        """What runsv says the service is doing ("run", "down", "finish"), read from
        its ``supervise/stat`` file; None when that cannot be read."""
        try:
            text = (self.supervise_directory() / "stat").read_text()
        except OSError:
            return None
        return text.split(",")[0].strip() or None

    def is_running(self) -> bool:
        completed = execute.run(
            self.status_argv(),
            environment=self.environment(),
            timeout=SERVICE_COMMAND_TIMEOUT,
            accept_returncodes=range(256),
        )
        if completed.returncode != 0:
            raise ServiceError(
                f"cannot read the state of {self.label}: {completed.stdout.strip()}"
                f" {completed.stderr.strip()}".rstrip()
            )
        return completed.stdout.startswith("run:")

    def stop(self) -> None:
        self._command("stop", "down")

    def start(self) -> None:
        # A check script decides when the service is up: only sv runs it.
        has_check = (self.supervise_directory().parent / "check").exists()
        self._command("start", None if has_check else "run")

    def _command(self, command: str, reached: str | None) -> None:
        """Send ``command`` and wait until runsv's state is ``reached``.

        ``sv -w`` looks at the state every 0.42 s, so a stop and a start cost almost a
        second of downtime however fast the service is; runsv's state file, read every
        few milliseconds here, says it at once. Without it, sv waits itself.
        """
        if reached is None or self.state() is None:
            _run(self.waiting_argv(command), self.environment())
            return
        if not self._tell_runsv("d" if command == "stop" else "u"):
            _run(self.stop_argv() if command == "stop" else self.start_argv(), self.environment())
        deadline = time.monotonic() + RUNIT_WAIT_SECONDS
        while (state := self.state()) != reached:
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self.label} did not {command} within {RUNIT_WAIT_SECONDS:.0f} s "
                    f"(runsv says {state!r})"
                )
            time.sleep(RUNIT_POLL_SECONDS)


@dataclass
class OpenrcHandler:
    service: OpenrcService

    @property
    def label(self) -> str:
        return f"OpenRC service {self.service.name}"

    def status_argv(self) -> list[str]:
        return ["rc-service", self.service.name, "status"]

    def stop_argv(self) -> list[str]:
        return ["rc-service", self.service.name, "stop"]

    def start_argv(self) -> list[str]:
        return ["rc-service", self.service.name, "start"]

    def is_running(self) -> bool:
        return execute.succeeds(self.status_argv(), timeout=SERVICE_COMMAND_TIMEOUT)

    def stop(self) -> None:
        _run(self.stop_argv())

    def start(self) -> None:
        _run(self.start_argv())


APACHE_TOOLS = {
    "site": ("-s", "a2ensite", "a2dissite"),
    "config": ("-c", "a2enconf", "a2disconf"),
    "module": ("-m", "a2enmod", "a2dismod"),
}


@dataclass
class ApacheHandler:
    """An apache site, config or module: "running" means enabled.

    Disabling and enabling are followed by a graceful reload when apache is running, so
    the change takes effect without dropping other sites' connections.
    """

    service: ApacheService
    pid_file: str = APACHE_PID_FILE

    @property
    def label(self) -> str:
        return f"apache {self.service.kind} {self.service.name}"

    def status_argv(self) -> list[str]:
        flag, _, _ = APACHE_TOOLS[self.service.kind]
        return ["a2query", flag, self.service.name]

    def stop_argv(self) -> list[str]:
        return [APACHE_TOOLS[self.service.kind][2], "-q", self.service.name]

    def start_argv(self) -> list[str]:
        return [APACHE_TOOLS[self.service.kind][1], "-q", self.service.name]

    def reload_argv(self) -> list[str]:
        return ["apache2ctl", "graceful"]

    def apache_is_running(self) -> bool:
        """True when the pid file names a live process (a zombie is not: PID 1 may not
        reap an apache that has just stopped)."""
        try:
            pid = int(Path(self.pid_file).read_text().strip())
        except (OSError, ValueError):
            return False
        return processes.alive(pid)

    def is_running(self) -> bool:
        return execute.succeeds(self.status_argv(), timeout=SERVICE_COMMAND_TIMEOUT)

    def stop(self) -> None:
        _run(self.stop_argv())
        self._reload()

    def start(self) -> None:
        _run(self.start_argv())
        self._reload()

    def _reload(self) -> None:
        if self.apache_is_running():
            _run(self.reload_argv())


@dataclass
class CommandHandler:
    service: CommandService

    @property
    def label(self) -> str:
        return f"service {self.service.name}"

    def is_running(self) -> bool:
        return execute.succeeds(self.service.status, timeout=SERVICE_COMMAND_TIMEOUT)

    def stop(self) -> None:
        _run(self.service.stop)

    def start(self) -> None:
        _run(self.service.start)


def _still_running(handler: ServiceHandler) -> bool:
    try:
        return handler.is_running()
    except (CommandError, ServiceError):
        return True


def handler_for(service: Service) -> ServiceHandler:
    """The handler that drives ``service``."""
    if isinstance(service, SystemdService):
        return SystemdHandler(service)
    if isinstance(service, RunitService):
        return RunitHandler(service)
    if isinstance(service, OpenrcService):
        return OpenrcHandler(service)
    if isinstance(service, ApacheService):
        return ApacheHandler(service)
    return CommandHandler(service)


@dataclass
class ServiceController:
    """Stops services in reverse order and restarts exactly those, in forward order.

    With a ``journal``, each stop is recorded (kind ``service_stopped``, with the
    service as the manifest declares it and ``owner``, the app) before it is made, and
    the entry is closed when the service has been started again, or when starting it
    failed (that failure is the caller's to report; recovery does not retry it).
    """

    services: Sequence[Service]
    stopped: list[ServiceHandler] = field(default_factory=list)
    stopped_at: float | None = None
    resumed_at: float | None = None
    journal: ChangeLog | None = None
    owner: str = ""
    _entries: dict[int, int] = field(default_factory=dict)  # id(handler) -> journal entry

    def stop_all(self) -> None:
        """Stop every running service, last declared first.

        On failure the services stopped so far stay recorded (so :meth:`start_all`
        brings them back) and a ServiceError names the one that would not stop.
        """
        for service in reversed(self.services):
            handler = handler_for(service)
            try:
                if not handler.is_running():
                    continue
                self._record(handler, service)
                if self.stopped_at is None:
                    # After the journal is on disk: the service runs until stop().
                    self.stopped_at = time.monotonic()
                handler.stop()
            except (CommandError, ServiceError) as error:
                # A failed stop may still have stopped it: then it must be started again.
                if self.stopped_at is not None and not _still_running(handler):
                    self.stopped.append(handler)
                else:
                    self._close(handler)  # it runs: nothing to undo
                raise ServiceError(f"could not stop {handler.label}: {error}") from error
            self.stopped.append(handler)

    def start_all(self) -> list[ServiceError]:
        """Start every service this controller stopped, first declared first.

        Every service is tried even when one fails; the failures are returned.
        """
        failures: list[ServiceError] = []
        started: list[ServiceHandler] = []
        for handler in reversed(self.stopped):
            try:
                handler.start()
            except (CommandError, ServiceError) as error:
                failures.append(ServiceError(f"could not start {handler.label}: {error}"))
                self._close(handler, f"could not start it again: {error}")
                continue
            started.append(handler)
        if self.stopped_at is not None:
            # The services run again from here; closing their journal entries is not
            # part of their downtime.
            self.resumed_at = time.monotonic()
        for handler in started:
            self._close(handler)
        self.stopped.clear()
        return failures

    def _record(self, handler: ServiceHandler, service: Service) -> None:
        if self.journal is not None:
            self._entries[id(handler)] = self.journal.record(
                "service_stopped",
                {"app": self.owner, "service": dataclasses.asdict(service), "label": handler.label},
            )

    def _close(self, handler: ServiceHandler, failure: str | None = None) -> None:
        entry = self._entries.pop(id(handler), None)
        if self.journal is None or entry is None:
            return
        if failure is None:
            self.journal.undone(entry)
        else:
            self.journal.keep(entry, failure)

    @property
    def downtime(self) -> float:
        """Seconds between the first stop and the end of the restart (0 if none)."""
        if self.stopped_at is None:
            return 0.0
        end = self.resumed_at if self.resumed_at is not None else time.monotonic()
        return end - self.stopped_at
