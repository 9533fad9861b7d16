"""The systemd units and the cron file `homesafe schedule install` writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from homesafe import timers
from homesafe.errors import UsageError

COMMAND = ["/usr/local/bin/homesafe", "schedule", "run", "--quiet"]


def test_systemd_units_run_the_command_every_few_minutes() -> None:
    units = timers.systemd_units(COMMAND, 15, {"HOMESAFE_HOME": "/srv/homesafe state"})
    service, timer = units[timers.SERVICE_NAME], units[timers.TIMER_NAME]
    assert "Type=oneshot\n" in service
    assert "ExecStart=/usr/local/bin/homesafe schedule run --quiet\n" in service
    assert 'Environment="HOMESAFE_HOME=/srv/homesafe state"\n' in service
    assert "TimeoutStartSec=infinity\n" in service
    assert "OnCalendar=*-*-* *:00/15:00\n" in timer
    assert "Persistent=true\n" in timer
    assert f"Unit={timers.SERVICE_NAME}\n" in timer
    assert "WantedBy=timers.target\n" in timer
    hourly = timers.systemd_units(COMMAND, 60, {})[timers.TIMER_NAME]
    assert "OnCalendar=*-*-* *:00:00\n" in hourly
    assert "Environment" not in timers.systemd_units(COMMAND, 60, {})[timers.SERVICE_NAME]


def test_systemd_quoting_of_odd_paths() -> None:
    service = timers.systemd_units(
        ["/opt/home safe/bin/homesafe", "schedule", "run"], 10, {"HOMESAFE_HOME": "/a%b$c"}
    )[timers.SERVICE_NAME]
    assert 'ExecStart="/opt/home safe/bin/homesafe" schedule run\n' in service
    # % is a specifier everywhere; $ expands in ExecStart only.
    assert 'Environment="HOMESAFE_HOME=/a%%b$c"\n' in service


def test_cron_file() -> None:
    text = timers.cron_file(
        ["/opt/home safe/homesafe", "schedule", "run", "--quiet"], 10,
        {"HOMESAFE_CONFIG": "/etc/hs", "HOMESAFE_HOME": "/var/lib/hs"},
    )  # fmt: skip
    lines = text.splitlines()
    assert "HOMESAFE_CONFIG=/etc/hs" in lines
    assert "HOMESAFE_HOME=/var/lib/hs" in lines
    assert lines[-1] == "*/10 * * * * root '/opt/home safe/homesafe' schedule run --quiet"
    hourly = timers.cron_file(["/x/homesafe%"], 60, {}).splitlines()[-1]
    assert hourly == "0 * * * * root /x/homesafe\\%"  # cron reads % as a line break


@pytest.mark.parametrize("every", [0, 7, 45, 61])
def test_intervals_must_divide_an_hour(every: int) -> None:
    with pytest.raises(UsageError, match="divide an hour"):
        timers.systemd_units(COMMAND, every, {})
    with pytest.raises(UsageError, match="divide an hour"):
        timers.cron_file(COMMAND, every, {})


def test_install_and_uninstall_write_and_remove_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOMESAFE_HOME", "/var/lib/test-homesafe")
    monkeypatch.delenv("HOMESAFE_CONFIG", raising=False)
    units = tmp_path / "units"
    installed = timers.install(kind="systemd", directory=units, command=COMMAND)
    assert installed.kind == "systemd"
    assert not installed.activated  # not the system's unit directory
    assert sorted(path.name for path in installed.files) == [
        timers.SERVICE_NAME, timers.TIMER_NAME,
    ]  # fmt: skip
    service = (units / timers.SERVICE_NAME).read_text()
    assert "Environment=HOMESAFE_HOME=/var/lib/test-homesafe\n" in service
    assert (units / timers.TIMER_NAME).stat().st_mode & 0o777 == 0o644

    cron = tmp_path / "cron.d" / "homesafe"
    assert timers.install(kind="cron", cron_path=cron, command=COMMAND).files == (cron,)
    assert cron.read_text().endswith("*/15 * * * * root " + " ".join(COMMAND) + "\n")

    assert sorted(timers.uninstall(kind="systemd", directory=units)) == sorted(installed.files)
    assert timers.uninstall(kind="cron", cron_path=cron) == [cron]
    assert timers.uninstall(kind="cron", cron_path=cron) == []
    assert list(units.iterdir()) == []
