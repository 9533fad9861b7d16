"""The only place where homesafe starts programs.

(:mod:`homesafe.prestart` starts borg's interpreter before anything else is imported,
but it runs no program until :func:`run` hands it one: a call it can stand for.)

Contract:

* commands are argv lists, never shell strings;
* strings given as ``secrets`` never reach the log: they are masked in every message;
* stdout and stderr are both drained while the program runs (borg aborts its archive
  when a reader of its pipes goes away), stderr line by line so that borg's
  ``--log-json`` records turn into progress callbacks and log records as they come;
* a non-zero exit becomes a :class:`~homesafe.errors.CommandError` carrying the argv
  (masked), the exit code and the tail of stderr, unless the caller accepts that code;
* a program never outlives an interruption (SIGINT, SIGTERM) of the thread waiting for
  it; programs that other threads wait for are ended by the interrupted thread through
  :func:`tracking`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from homesafe import prestart
from homesafe.errors import CommandError, CommandNotFoundError, CommandTimeoutError

logger = logging.getLogger(__name__)

MASK = "********"
STDERR_TAIL_LINES = 20
PIPE_DRAIN_SECONDS = 5.0

# A program's JSON log records are logged again at INFO (shown with -v): its warnings
# and errors reach the user through homesafe's own results and errors, with context.
LOG_LEVELS = {"DEBUG": logging.DEBUG}

JsonRecordCallback = Callable[[dict[str, Any]], None]


@dataclass
class Completed:
    """What a finished command left: exit code, output, parsed JSON log records."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    records: list[dict[str, Any]] = field(default_factory=list)
    duration: float = 0.0

    def messages(self, level: str | None = None) -> list[str]:
        """The ``message`` of every JSON log record, optionally of one level only."""
        return [
            str(record.get("message", ""))
            for record in self.records
            if record.get("type") == "log_message"
            and (level is None or record.get("levelname") == level)
        ]

    def message_ids(self) -> set[str]:
        """Every ``msgid`` the program logged (borg names its errors this way)."""
        return {str(record["msgid"]) for record in self.records if record.get("msgid")}


class RunningPrograms:
    """The programs :func:`run` has running for one piece of work, in whatever thread.

    Only the main thread is interrupted by a signal, and :func:`run` ends the program it
    waits for there; the programs of worker threads go on until they exit. The thread
    waiting for those workers ends them through :meth:`end_all` when it is interrupted.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._processes: set[subprocess.Popen[bytes]] = set()
        self._ended = False

    def add(self, process: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._processes.add(process)
            ended = self._ended
        if ended:  # started after end_all, by a thread that did not know yet
            _signal_group(process, signal.SIGTERM)

    def discard(self, process: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._processes.discard(process)

    def end_all(self) -> None:
        """Terminate every program still running (its process group), killing what
        does not go within 5 s; the threads waiting for them then see them fail."""
        with self._lock:
            self._ended = True
            processes = list(self._processes)
        # All told at once, then each waited for (and killed if it must be) in turn.
        for process in processes:
            _signal_group(process, signal.SIGTERM)
        for process in processes:
            _kill_group(process)


_running: contextvars.ContextVar[RunningPrograms | None] = contextvars.ContextVar(
    "homesafe_running_programs", default=None
)


@contextmanager
def tracking() -> Iterator[RunningPrograms]:
    """Track the programs :func:`run` starts in this context, and in contexts copied
    from it (``contextvars.copy_context()``, for worker threads), until the block ends."""
    programs = RunningPrograms()
    token = _running.set(programs)
    try:
        yield programs
    finally:
        _running.reset(token)


def mask(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every non-empty secret replaced by asterisks."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def describe(argv: Sequence[str], secrets: Iterable[str] = ()) -> str:
    """A readable, masked rendering of an argv for logs and error messages."""
    import shlex

    return mask(shlex.join(argv), secrets)


def run(
    argv: Sequence[str],
    *,
    environment: Mapping[str, str] | None = None,
    remove_environment: Iterable[str] = (),
    working_directory: str | os.PathLike[str] | None = None,
    input_data: bytes | None = None,
    timeout: float | None = None,
    secrets: Sequence[str] = (),
    pass_fds: Sequence[int] = (),
    accept_returncodes: Iterable[int] = (0,),
    on_record: JsonRecordCallback | None = None,
    on_stderr_line: Callable[[str], None] | None = None,
    stdout_path: str | os.PathLike[str] | None = None,
    on_stdout_record: JsonRecordCallback | None = None,
) -> Completed:
    """Run ``argv`` to its end and return what it left.

    ``environment`` is added to homesafe's own environment; names in
    ``remove_environment`` are taken out (borg's rule: a program that does not need a
    passphrase does not get one). Lines of stderr that are JSON objects are parsed and
    passed to ``on_record``; other lines go to ``on_stderr_line``. With ``stdout_path``
    the program's stdout is written to that file instead of being captured; else lines
    of stdout that are JSON objects are passed, as they come, to ``on_stdout_record``
    (restic reports progress there).

    Raises :class:`CommandNotFoundError` when the program does not exist,
    :class:`CommandTimeoutError` after killing a program that ran past ``timeout``, and
    :class:`CommandError` when it exits with a code not in ``accept_returncodes``.
    """
    argv = [os.fspath(part) for part in argv]
    if not argv:
        raise ValueError("empty argv")
    shown = describe(argv, secrets)
    child_environment = dict(os.environ)
    child_environment.update(environment or {})
    for name in remove_environment:
        child_environment.pop(name, None)
    logger.debug("running %s", shown)

    masked_argv = [mask(part, secrets) for part in argv]
    if working_directory is not None and not os.path.isdir(working_directory):
        raise CommandError(
            f"Cannot run {argv[0]}: its working directory {working_directory} does not exist.",
            argv=masked_argv,
        )
    stdout_file = open(stdout_path, "wb") if stdout_path is not None else None  # noqa: SIM115
    started = time.monotonic()
    running = _running.get()
    tracked: subprocess.Popen[bytes] | None = None
    try:
        # A borg started early for this call (homesafe.prestart), when it can stand for it.
        adopted = prestart.adopt(
            argv,
            child_environment,
            None if working_directory is None else os.fspath(working_directory),
            pass_fds,
            plain_stdio=input_data is None and stdout_file is None,
        )
        if adopted is not None:
            logger.debug("run by the borg started early (pid %d)", adopted.pid)
        process = adopted or _start(
            argv, masked_argv, input_data is not None, stdout_file, working_directory,
            child_environment, pass_fds,
        )  # fmt: skip
        if running is not None:
            running.add(process)
            tracked = process
        records: list[dict[str, Any]] = []
        stderr_lines: list[str] = []
        tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

        def read_stderr() -> None:
            assert process.stderr is not None
            with process.stderr:
                _read_stderr_lines(process.stderr)

        def _read_stderr_lines(stream: Any) -> None:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                stderr_lines.append(line)
                record = _parse_json_line(line)
                if record is not None:
                    records.append(record)
                    if record.get("type") == "log_message":
                        message = str(record.get("message", ""))
                        tail.append(message)
                        level = LOG_LEVELS.get(str(record.get("levelname")), logging.INFO)
                        logger.log(level, "%s: %s", argv[0], mask(message, secrets))
                    if on_record is not None:
                        on_record(record)
                else:
                    if line.strip():
                        tail.append(line)
                    if on_stderr_line is not None:
                        on_stderr_line(line)

        stderr_thread = threading.Thread(target=read_stderr, daemon=True)
        stderr_thread.start()
        stdout_chunks: list[bytes] = []

        def read_stdout() -> None:
            assert process.stdout is not None
            partial = b""
            with process.stdout:
                # Chunk by chunk: if a daemon keeps the pipe open, what came before stays.
                while chunk := os.read(process.stdout.fileno(), 65536):
                    stdout_chunks.append(chunk)
                    if on_stdout_record is not None:
                        *lines, partial = (partial + chunk).split(b"\n")
                        for line in lines:
                            record = _parse_json_line(line.decode("utf-8", "replace"))
                            if record is not None:
                                on_stdout_record(record)

        stdout_thread = None
        if stdout_file is None:
            stdout_thread = threading.Thread(target=read_stdout, daemon=True)
            stdout_thread.start()
        if input_data is not None:
            assert process.stdin is not None
            try:
                process.stdin.write(input_data)
            except BrokenPipeError:
                pass
            finally:
                process.stdin.close()
        try:
            returncode = process.wait(timeout=timeout)
        except BaseException as interruption:
            # Interrupted (SIGINT/SIGTERM): the program must not outlive us.
            if not isinstance(interruption, subprocess.TimeoutExpired):
                _kill_group(process)
                raise
            _kill_group(process)
            stderr_thread.join(timeout=5)
            raise CommandTimeoutError(
                f"{shown} did not finish within {timeout:g} s and was killed.",
                argv=masked_argv,
                stderr_tail=mask("\n".join(tail), secrets),
            ) from None
        # A daemon started by the program may keep our pipes open for ever: once the
        # program itself has exited, wait a little for the rest of its output only.
        drained_by = time.monotonic() + PIPE_DRAIN_SECONDS
        stderr_thread.join(timeout=PIPE_DRAIN_SECONDS)
        if stdout_thread is not None:
            stdout_thread.join(timeout=max(0.0, drained_by - time.monotonic()))
    finally:
        if running is not None and tracked is not None:
            running.discard(tracked)
        if stdout_file is not None:
            stdout_file.close()

    completed = Completed(
        argv=argv,
        returncode=returncode,
        stdout=b"".join(stdout_chunks).decode("utf-8", "replace"),
        stderr="\n".join(stderr_lines),
        records=records,
        duration=time.monotonic() - started,
    )
    if returncode not in set(accept_returncodes):
        if returncode < 0:
            what = f"was killed by signal {-returncode}"
        else:
            what = f"failed with exit code {returncode}"
        raise CommandError(
            f"{shown} {what}.",
            argv=masked_argv,
            returncode=returncode,
            stderr_tail=mask("\n".join(tail), secrets),
            message_ids=completed.message_ids(),
        )
    return completed


def _start(
    argv: list[str],
    masked_argv: list[str],
    takes_input: bool,
    stdout_file: Any,
    working_directory: str | os.PathLike[str] | None,
    environment: dict[str, str],
    pass_fds: Sequence[int],
) -> subprocess.Popen[bytes]:
    """Start ``argv``; a program missing or not executable raises homesafe's error."""
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if takes_input else subprocess.DEVNULL,
            stdout=stdout_file if stdout_file is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=working_directory,
            env=environment,
            pass_fds=tuple(pass_fds),
            # A group of its own, so that a timeout kills the program's children too.
            start_new_session=True,
        )
    except FileNotFoundError as error:
        raise CommandNotFoundError(
            f"Cannot run {argv[0]}: it is not installed or not on PATH.",
            argv=masked_argv,
            hint=f"Install the program that provides {argv[0]!r}.",
        ) from error
    except PermissionError as error:
        raise CommandError(f"Cannot run {argv[0]}: permission denied.", argv=masked_argv) from error


def succeeds(argv: Sequence[str], *, timeout: float | None = 60, **options: Any) -> bool:
    """True when ``argv`` exits 0; a missing program counts as failure."""
    try:
        run(argv, timeout=timeout, **options)
    except CommandNotFoundError:
        return False
    except CommandError as error:
        if isinstance(error, CommandTimeoutError):
            raise
        return False
    return True


def _parse_json_line(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> bool:
    """Send ``sig`` to the process group; False when it is gone already."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return False
    return True


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Terminate the process group, then kill it if it does not go within 5 s."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if not _signal_group(process, sig):
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
