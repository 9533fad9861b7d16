"""Stopping and starting an app's services, one handler per service type.

Every handler answers three questions with real commands: is the service running (or,
for apache, enabled), stop it, start it. :class:`ServiceController` stops a list of
services in reverse order, remembers exactly which ones it stopped, and starts those
again, in forward order, when asked: a service that was not running is left alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from homesafe import execute
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
APACHE_PID_FILE = "/var/run/apache2/apache2.pid"


class ServiceHandler(Protocol):
    """What homesafe needs of a service, whatever supervises it."""

    @property
    def label(self) -> str: ...

    def is_running(self) -> bool: ...

    def stop(self) -> None: ...

    def start(self) -> None: ...


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

    def stop_argv(self) -> list[str]:
        return ["sv", "-w", "30", "stop", self.service.name]

    def start_argv(self) -> list[str]:
        return ["sv", "-w", "30", "start", self.service.name]

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
        _run(self.stop_argv(), self.environment())

    def start(self) -> None:
        _run(self.start_argv(), self.environment())


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
        try:
            with open(self.pid_file) as file:
                pid = int(file.read().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return True

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
    """Stops services in reverse order and restarts exactly those, in forward order."""

    services: Sequence[Service]
    stopped: list[ServiceHandler] = field(default_factory=list)
    stopped_at: float | None = None
    resumed_at: float | None = None

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
                if self.stopped_at is None:
                    self.stopped_at = time.monotonic()
                handler.stop()
            except (CommandError, ServiceError) as error:
                # A failed stop may still have stopped it: then it must be started again.
                if self.stopped_at is not None and not _still_running(handler):
                    self.stopped.append(handler)
                raise ServiceError(f"could not stop {handler.label}: {error}") from error
            self.stopped.append(handler)

    def start_all(self) -> list[ServiceError]:
        """Start every service this controller stopped, first declared first.

        Every service is tried even when one fails; the failures are returned.
        """
        failures: list[ServiceError] = []
        for handler in reversed(self.stopped):
            try:
                handler.start()
            except (CommandError, ServiceError) as error:
                failures.append(ServiceError(f"could not start {handler.label}: {error}"))
        self.stopped.clear()
        if self.stopped_at is not None:
            self.resumed_at = time.monotonic()
        return failures

    @property
    def downtime(self) -> float:
        """Seconds between the first stop and the end of the restart (0 if none)."""
        if self.stopped_at is None:
            return 0.0
        end = self.resumed_at if self.resumed_at is not None else time.monotonic()
        return end - self.stopped_at
