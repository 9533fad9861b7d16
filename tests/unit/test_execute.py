"""execute.run with real child processes (python -c, sleep): no mocks."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from homesafe import execute
from homesafe.errors import CommandError, CommandNotFoundError, CommandTimeoutError

PYTHON = sys.executable
BORG_ERROR = {
    "type": "log_message",
    "time": 1700000000.0,
    "levelname": "ERROR",
    "name": "borg.archiver",
    "message": "Repository /nowhere does not exist.",
    "msgid": "Repository.DoesNotExist",
}


def python(source: str, *arguments: str) -> list[str]:
    return [PYTHON, "-c", textwrap.dedent(source), *arguments]


def is_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in {"Z", "X"}


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if is_gone(pid):
            return True
        time.sleep(0.05)
    return is_gone(pid)


@pytest.fixture
def started_pids() -> Iterator[list[int]]:
    """Pids of processes a test's children started; any still running are ended."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not is_gone(pid):
            os.kill(pid, signal.SIGKILL)


def read_pids(path: Path) -> list[int]:
    deadline = time.monotonic() + 5
    while not path.exists() or not path.read_text().endswith("\n"):
        assert time.monotonic() < deadline, "the child never wrote its pids"
        time.sleep(0.02)
    return [int(part) for part in path.read_text().split()]


# -- results and failures ------------------------------------------------------------


def test_run_returns_stdout_stderr_and_returncode() -> None:
    completed = execute.run(
        python("import sys; print('out'); print('err', file=sys.stderr); sys.exit(0)")
    )
    assert completed.returncode == 0
    assert completed.stdout == "out\n"
    assert completed.stderr == "err"
    assert completed.records == []
    assert completed.argv[0] == PYTHON
    assert completed.duration > 0


def test_accepted_nonzero_exit_is_returned() -> None:
    completed = execute.run(python("import sys; sys.exit(1)"), accept_returncodes=(0, 1))
    assert completed.returncode == 1


def test_nonzero_exit_raises_command_error_with_argv_code_and_stderr_tail() -> None:
    argv = python("import sys; print('disk full', file=sys.stderr); sys.exit(3)")
    with pytest.raises(CommandError) as caught:
        execute.run(argv)
    error = caught.value
    assert type(error) is CommandError
    assert error.argv == argv
    assert error.returncode == 3
    assert error.stderr_tail == "disk full"
    assert "failed with exit code 3" in error.message
    assert error.message.endswith("disk full")
    assert error.message_ids == set()


def test_stderr_tail_keeps_the_last_lines_only() -> None:
    argv = python(
        "import sys\nfor n in range(30): print(f'line {n}', file=sys.stderr)\nsys.exit(1)"
    )
    with pytest.raises(CommandError) as caught:
        execute.run(argv)
    tail = caught.value.stderr_tail.splitlines()
    assert tail == [f"line {n}" for n in range(30 - execute.STDERR_TAIL_LINES, 30)]


def test_exit_by_signal_is_described() -> None:
    with pytest.raises(CommandError) as caught:
        execute.run(python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    assert caught.value.returncode == -signal.SIGKILL
    assert f"was killed by signal {int(signal.SIGKILL)}" in caught.value.message


def test_missing_program_raises_command_not_found() -> None:
    with pytest.raises(CommandNotFoundError) as caught:
        execute.run(["homesafe-no-such-program", "--help"])
    error = caught.value
    assert isinstance(error, CommandError)
    assert error.argv == ["homesafe-no-such-program", "--help"]
    assert "homesafe-no-such-program" in error.message
    assert error.hint is not None
    assert "homesafe-no-such-program" in error.hint


def test_empty_argv_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="empty argv"):
        execute.run([])


def test_missing_working_directory_is_not_a_missing_program(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(CommandError) as caught:
        execute.run(["true"], working_directory=missing)
    assert not isinstance(caught.value, CommandNotFoundError)
    assert str(missing) in caught.value.message


def test_working_directory_is_used(tmp_path: Path) -> None:
    completed = execute.run(python("import os; print(os.getcwd())"), working_directory=tmp_path)
    assert completed.stdout.strip() == str(tmp_path)


def test_input_data_reaches_stdin() -> None:
    completed = execute.run(
        python("import sys; sys.stdout.write(sys.stdin.read().upper())"), input_data=b"hello"
    )
    assert completed.stdout == "HELLO"


def test_stdin_is_empty_without_input_data() -> None:
    completed = execute.run(python("import sys; print(repr(sys.stdin.read()))"))
    assert completed.stdout.strip() == "''"


# -- timeout -------------------------------------------------------------------------


def test_timeout_kills_the_process_group(tmp_path: Path, started_pids: list[int]) -> None:
    pid_file = tmp_path / "pids"
    argv = python(
        """
        import os, subprocess, sys, time
        grandchild = subprocess.Popen(["sleep", "60"])
        with open(sys.argv[1], "w") as file:
            file.write(f"{os.getpid()} {grandchild.pid}\\n")
        time.sleep(60)
        """,
        str(pid_file),
    )
    started = time.monotonic()
    with pytest.raises(CommandTimeoutError) as caught:
        execute.run(argv, timeout=1.5)
    elapsed = time.monotonic() - started
    child, grandchild = read_pids(pid_file)
    started_pids.extend([child, grandchild])
    assert wait_gone(child), "the child survived the timeout"
    assert wait_gone(grandchild), "the grandchild survived the timeout"
    assert 1.5 <= elapsed < 10
    error = caught.value
    assert isinstance(error, CommandError)
    assert "did not finish within 1.5 s and was killed" in error.message
    assert error.argv == argv


def test_succeeds() -> None:
    assert execute.succeeds(["true"])
    assert not execute.succeeds(["false"])
    assert not execute.succeeds(["homesafe-no-such-program"])
    with pytest.raises(CommandTimeoutError):
        execute.succeeds(["sleep", "30"], timeout=0.3)


# -- secrets -------------------------------------------------------------------------

SECRET = "hunter2-very-secret"


def test_secrets_are_masked_in_errors_and_debug_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="homesafe.execute")
    argv = python(
        "import sys; print('the passphrase is ' + sys.argv[1], file=sys.stderr); sys.exit(2)",
        f"--passphrase={SECRET}",
    )
    with pytest.raises(CommandError) as caught:
        execute.run(argv, secrets=[SECRET, ""])
    error = caught.value
    assert SECRET not in str(error)
    assert SECRET not in " ".join(error.argv)
    assert SECRET not in error.stderr_tail
    assert f"--passphrase={execute.MASK}" in error.argv
    assert f"the passphrase is --passphrase={execute.MASK}" in error.stderr_tail
    debug = [record for record in caplog.records if record.levelno == logging.DEBUG]
    assert debug, "run() logged nothing at DEBUG"
    assert SECRET not in caplog.text
    assert execute.MASK in caplog.text


def test_secrets_are_masked_in_timeout_errors() -> None:
    argv = python("import time; time.sleep(30)", SECRET)
    with pytest.raises(CommandTimeoutError) as caught:
        execute.run(argv, timeout=0.5, secrets=[SECRET])
    assert SECRET not in str(caught.value)
    assert SECRET not in " ".join(caught.value.argv)


def test_completed_argv_is_the_real_argv() -> None:
    completed = execute.run(python("pass", SECRET), secrets=[SECRET])
    assert completed.argv[-1] == SECRET


def test_secrets_are_masked_when_the_program_is_missing() -> None:
    with pytest.raises(CommandNotFoundError) as caught:
        execute.run(["homesafe-no-such-program", SECRET], secrets=[SECRET])
    assert SECRET not in " ".join(caught.value.argv)


def test_mask_and_describe() -> None:
    assert execute.mask("a secret b secret", ["secret", ""]) == f"a {execute.MASK} b {execute.MASK}"
    assert execute.describe(["borg", "it's", SECRET], [SECRET]) == (
        f"borg 'it'\"'\"'s' {execute.MASK}"
    )


# -- JSON log records ----------------------------------------------------------------


def test_json_lines_become_records_and_message_ids() -> None:
    records: list[dict[str, Any]] = []
    plain: list[str] = []
    argv = python(
        f"""
        import sys
        print({json.dumps(json.dumps(BORG_ERROR))}, file=sys.stderr)
        print("a plain line", file=sys.stderr)
        print('{{"type": "progress_percent", "current": 1, "total": 2}}', file=sys.stderr)
        print("[1, 2]", file=sys.stderr)
        sys.exit(2)
        """
    )
    with pytest.raises(CommandError) as caught:
        execute.run(argv, on_record=records.append, on_stderr_line=plain.append)
    error = caught.value
    assert error.message_ids == {"Repository.DoesNotExist"}
    assert error.returncode == 2
    assert records[0] == BORG_ERROR
    assert records[1] == {"type": "progress_percent", "current": 1, "total": 2}
    assert len(records) == 2
    assert plain == ["a plain line", "[1, 2]"]
    # The tail shows the message of a log record, not its JSON.
    assert "Repository /nowhere does not exist." in error.stderr_tail
    assert '"msgid"' not in error.stderr_tail
    assert "a plain line" in error.stderr_tail


def test_json_lines_of_stdout_reach_their_callback_as_they_come() -> None:
    """restic reports progress on stdout: each JSON line is handed over while the
    program still runs (a line split across reads included), and stdout is still
    returned whole."""
    arrived: list[tuple[dict[str, Any], float]] = []
    argv = python(
        """
        import sys, time
        sys.stdout.write('{"message_type": "status", "bytes_done": 1}\\n{"message_')
        sys.stdout.flush()
        time.sleep(0.2)
        sys.stdout.write('type": "status", "bytes_done": 2}\\nnot json\\n')
        sys.stdout.flush()
        time.sleep(1)
        print('{"message_type": "summary"}')
        """
    )

    completed = execute.run(
        argv, on_stdout_record=lambda record: arrived.append((record, time.monotonic()))
    )
    ended = time.monotonic()

    assert [record for record, _ in arrived] == [
        {"message_type": "status", "bytes_done": 1},
        {"message_type": "status", "bytes_done": 2},
        {"message_type": "summary"},
    ]
    assert ended - arrived[1][1] >= 0.8  # handed over a second before the end
    assert completed.stdout.count("message_type") == 3 and "not json" in completed.stdout


def test_completed_records_messages_and_ids() -> None:
    warning = {**BORG_ERROR, "levelname": "WARNING", "message": "file changed", "msgid": None}
    argv = python(
        f"""
        import sys
        print({json.dumps(json.dumps(BORG_ERROR))}, file=sys.stderr)
        print({json.dumps(json.dumps(warning))}, file=sys.stderr)
        """
    )
    completed = execute.run(argv)
    assert completed.message_ids() == {"Repository.DoesNotExist"}
    assert completed.messages() == ["Repository /nowhere does not exist.", "file changed"]
    assert completed.messages("WARNING") == ["file changed"]
    assert completed.messages("ERROR") == ["Repository /nowhere does not exist."]


# -- file descriptors, environment, output file --------------------------------------


def test_pass_fds_lets_the_child_read_a_pipe() -> None:
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"through the pipe")
        os.close(write_end)
        write_end = -1
        completed = execute.run(
            python("import os, sys; print(os.read(int(sys.argv[1]), 100).decode())", str(read_end)),
            pass_fds=[read_end],
        )
    finally:
        if write_end >= 0:
            os.close(write_end)
        os.close(read_end)
    assert completed.stdout.strip() == "through the pipe"


def test_fds_not_passed_are_closed_in_the_child() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(CommandError):
            execute.run(python("import os, sys; os.fstat(int(sys.argv[1]))", str(read_end)))
    finally:
        os.close(read_end)
        os.close(write_end)


def test_environment_is_added_and_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOMESAFE_TEST_REMOVED", "present")
    monkeypatch.setenv("HOMESAFE_TEST_KEPT", "kept")
    argv = python(
        "import os, json; print(json.dumps({name: os.environ.get(name) for name in "
        "['HOMESAFE_TEST_REMOVED', 'HOMESAFE_TEST_KEPT', 'HOMESAFE_TEST_ADDED']}))"
    )
    completed = execute.run(
        argv,
        environment={"HOMESAFE_TEST_ADDED": "added"},
        remove_environment=["HOMESAFE_TEST_REMOVED", "HOMESAFE_TEST_NEVER_SET"],
    )
    assert json.loads(completed.stdout) == {
        "HOMESAFE_TEST_REMOVED": None,
        "HOMESAFE_TEST_KEPT": "kept",
        "HOMESAFE_TEST_ADDED": "added",
    }
    # Our own environment is untouched.
    assert os.environ["HOMESAFE_TEST_REMOVED"] == "present"


def test_stdout_path_writes_stdout_to_a_file(tmp_path: Path) -> None:
    output = tmp_path / "out.bin"
    completed = execute.run(
        python("import sys; sys.stdout.buffer.write(bytes(range(256)) * 4)"), stdout_path=output
    )
    assert output.read_bytes() == bytes(range(256)) * 4
    assert completed.stdout == ""


def test_stdout_path_is_closed_and_kept_when_the_command_fails(tmp_path: Path) -> None:
    output = tmp_path / "out.txt"
    with pytest.raises(CommandError):
        execute.run(python("print('partial'); raise SystemExit(4)"), stdout_path=output)
    assert output.read_text() == "partial\n"


# -- daemons that keep our pipes open ------------------------------------------------

DRAIN = 2.0
MARGIN = 1.5


def daemonizing_child(pid_file: Path, *, hold_stdout: bool) -> list[str]:
    """A program that prints, leaves a daemon behind holding its pipes, and exits."""
    stdout = "None" if hold_stdout else "subprocess.DEVNULL"
    return python(
        f"""
        import subprocess, sys
        print("hello", flush=True)
        print("started", file=sys.stderr, flush=True)
        daemon = subprocess.Popen(["sleep", "30"], stdout={stdout})
        with open(sys.argv[1], "w") as file:
            file.write(f"{{daemon.pid}}\\n")
        """,
        str(pid_file),
    )


def test_daemon_holding_stderr_does_not_hang_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_pids: list[int]
) -> None:
    monkeypatch.setattr(execute, "PIPE_DRAIN_SECONDS", DRAIN)
    pid_file = tmp_path / "daemon.pid"
    started = time.monotonic()
    completed = execute.run(daemonizing_child(pid_file, hold_stdout=False), timeout=60)
    elapsed = time.monotonic() - started
    started_pids.extend(read_pids(pid_file))
    assert elapsed < DRAIN + MARGIN
    assert not is_gone(started_pids[0]), "the daemon should still be running"
    assert completed.returncode == 0
    assert completed.stdout == "hello\n"
    assert completed.stderr == "started"


def test_daemon_holding_stdout_and_stderr_costs_one_drain_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_pids: list[int]
) -> None:
    monkeypatch.setattr(execute, "PIPE_DRAIN_SECONDS", DRAIN)
    pid_file = tmp_path / "daemon.pid"
    started = time.monotonic()
    completed = execute.run(daemonizing_child(pid_file, hold_stdout=True), timeout=60)
    elapsed = time.monotonic() - started
    started_pids.extend(read_pids(pid_file))
    assert completed.returncode == 0
    assert elapsed < DRAIN + MARGIN


def test_daemon_holding_stdout_keeps_what_was_printed_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_pids: list[int]
) -> None:
    monkeypatch.setattr(execute, "PIPE_DRAIN_SECONDS", 0.5)
    pid_file = tmp_path / "daemon.pid"
    completed = execute.run(daemonizing_child(pid_file, hold_stdout=True), timeout=60)
    started_pids.extend(read_pids(pid_file))
    assert completed.stdout == "hello\n"


def test_tracked_programs_of_other_threads_are_ended_together() -> None:
    """end_all ends what worker threads wait for, and what they start afterwards."""
    import contextvars
    import threading

    outcomes: list[BaseException | None] = [None, None]

    def wait_in_thread(index: int) -> None:
        try:
            execute.run(["sleep", "60"])
        except CommandError as error:
            outcomes[index] = error

    with execute.tracking() as programs:
        first = threading.Thread(target=contextvars.copy_context().run, args=(wait_in_thread, 0))
        first.start()
        deadline = time.monotonic() + 10
        while not programs._processes and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        programs.end_all()
        first.join()
        late = threading.Thread(target=contextvars.copy_context().run, args=(wait_in_thread, 1))
        late.start()
        late.join()

    assert time.monotonic() - started < 10
    assert all(isinstance(outcome, CommandError) for outcome in outcomes), outcomes
    assert "signal 15" in str(outcomes[0]) and "signal 15" in str(outcomes[1])
