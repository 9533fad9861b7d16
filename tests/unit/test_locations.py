"""homesafe.locations: what it reads from the system."""

from __future__ import annotations

import socket

from homesafe import locations


def test_the_host_name_is_the_one_socket_gives() -> None:
    # Archive names, journal entries and lock holders carry it; socket is not imported
    # for it (start-up), so it must agree with what socket would have said.
    assert locations.hostname() == socket.gethostname()
    assert locations.hostname()
