"""A borg started while homesafe itself starts, for homesafe's first borg call to take.

``homesafe backup`` and ``homesafe restore`` spend ~0.1 s starting (the interpreter,
imports, manifests) before their first borg call, and borg then spends ~0.15 s starting
its own interpreter and importing its modules before it does anything. :func:`begin`,
called first thing by the ``homesafe`` program (:mod:`homesafe.command`), starts borg's
interpreter at once and has it import borg's modules, its start-up, beside homesafe's.
Then it waits, holding nothing (no repository, lock, passphrase or data), for one order.

:func:`adopt`, called by :func:`homesafe.execute.run` for every program it starts, gives
the first borg call that it can stand for exactly to the waiting interpreter: the
call's argv, environment, working directory and passphrase pipe go to it over a pipe,
and it runs the borg script itself (``runpy``), as an exec of that script would have.
A call it cannot stand for exactly starts borg as always:

* argv[0] must resolve, on the call's PATH, to the script the interpreter was started
  for; the call must take no input and capture stdout (not write it to a file); each fd
  it passes must be a pipe whose writers are all closed (borg's passphrase pipe), so
  that its contents can be handed over whole;
* the environment must not differ from the one the interpreter started with in a name
  read before borg runs: the interpreter's own (``PYTHON*``, locale, loader, HOME) and
  ``BORG_*`` but for :data:`RUN_TIME_NAMES` (borg reads ``BORG_WORKAROUNDS``,
  ``BORG_HOST_ID`` and, in 1.4, ``BORG_EXIT_CODES`` when its modules are imported);
* borg must be a Python script whose first line names its interpreter by absolute path
  (as pip and Debian install it); a wrapper script or a binary is never started early.

A call run through a capture's view (``unshare --mount --propagation private --
python -m homesafe.consistency.view --bind COPY ORIGINAL ... -- borg ...``) is stood for
too, when ``unshare`` is on the call's PATH: the launcher does what the view does
before it runs borg, with homesafe's own view module (loaded by path, so that borg's
``sys.path`` stays as it was): it enters a mount namespace of its own, refusing to go
on if it is still in the host's, makes every mount private and binds the copies.

Only a command that writes to or reads from a borg repository (the embedded default,
or one the registry gives as borg's) starts it: beside restic it would only take a core.
It is taken once. At homesafe's exit it is killed, and if homesafe dies first, its
order pipe closes and it exits without doing anything. ``HOMESAFE_PRESTART=0`` turns
it off.
"""

from __future__ import annotations

# Only modules built into the interpreter or imported by its own start-up: every
# millisecond spent importing before the waiting borg is started is one more that borg
# starts after homesafe. (typing, dataclasses and the rest come later, with the rest of
# homesafe; starting borg takes subprocess, and reading the registry sqlite3.)
import _thread
import atexit
import contextvars
import os
import stat
import sys

from homesafe import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Mapping, Sequence
    from typing import Any

# The commands whose first engine call comes within moments, and is mostly borg's.
COMMANDS = frozenset({"backup", "restore"})
PROGRAM = "borg"
# Names of the passphrase that borg takes from the environment: never given to the
# waiting interpreter (homesafe gives borg its passphrase through a pipe).
PASSPHRASE_NAMES = ("BORG_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_NEW_PASSPHRASE")
# BORG_* names that borg 1.2 and 1.4 read only once they run, not on import: they may
# differ between the environment the interpreter started with and the call's.
RUN_TIME_NAMES = frozenset(
    {
        "BORG_PASSPHRASE_FD",
        "BORG_RSH",
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK",
        "BORG_SELFTEST",
    }
    | set(PASSPHRASE_NAMES)
)
START_UP_NAMES = frozenset({"HOME", "LANG", "LANGUAGE", "LD_LIBRARY_PATH", "LD_PRELOAD", "TMPDIR"})
START_UP_PREFIXES = ("PYTHON", "LC_", "BORG_")
# How long a call waits for the interpreter to have imported borg (it takes ~0.15 s):
# beyond it, the call starts borg itself.
READY_TIMEOUT_SECONDS = 10.0
# What a pipe holds before anyone reads it (Linux's default): the launcher writes a
# handed-over pipe's contents whole into a new pipe before borg reads it.
PIPE_CAPACITY = 65536

# Run by borg's interpreter: import borg, say so, wait for the order, then become the
# borg call it describes. Plain Python 3, whatever version borg's interpreter is.
LAUNCHER = r"""
import os, sys
script, order_fd, ready_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
del sys.argv[1:]
if sys.path and sys.path[0] == "":
    # Where running the script puts its own directory (symbolic links resolved); an
    # interpreter told not to (-I, -P) put nothing there.
    sys.path[0] = os.path.dirname(os.path.realpath(script))
try:
    import borg.archiver
except BaseException:
    sys.exit(1)  # no word of readiness: homesafe starts borg itself, and sees why
os.write(ready_fd, b"1")
os.close(ready_fd)
with open(order_fd, "rb") as channel:
    order = channel.read()
if not order:
    sys.exit(0)  # homesafe went on without it
import json, runpy
order = json.loads(order.decode())
for number, content in order["pipes"]:
    read_end, write_end = os.pipe()
    os.write(write_end, bytes.fromhex(content))
    os.close(write_end)
    if read_end != number:
        os.dup2(read_end, number, inheritable=False)
        os.close(read_end)
if order["cwd"] is not None:
    os.chdir(order["cwd"])
if order["view"] is not None:
    # What `unshare --mount --propagation private -- python -m homesafe.consistency.view`
    # does before it runs borg, done by homesafe's own module, loaded by path.
    import importlib.util
    spec = importlib.util.spec_from_file_location("homesafe_view", order["view"]["module"])
    view = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(view)
    try:
        view.enter_mount_namespace()
    except OSError as error:
        print("unshare: unshare failed: " + str(error.strerror), file=sys.stderr)
        sys.exit(1)
    failed = view.show([tuple(pair) for pair in order["view"]["binds"]])
    if failed is not None:
        sys.exit(failed)
os.environ.clear()
os.environ.update(order["env"])
sys.argv = [script] + order["argv"][1:]
runpy.run_path(script, run_name="__main__")
"""


def borg_environment(home: str) -> dict[str, str]:
    """What homesafe adds to the environment of every borg call, whatever the
    repository (see :func:`homesafe.engines.borg.passphrase_pipe`)."""
    return {
        "BORG_BASE_DIR": os.path.join(home, "borg"),
        # Never let borg wait for an answer on a terminal nobody watches.
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "no",
        "BORG_DISPLAY_PASSPHRASE": "no",
        "BORG_EXIT_CODES": "legacy",
    }


class Waiting:
    """An interpreter importing borg, or waiting for its order."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        script: str,
        environment: dict[str, str],
        order_fd: int,
        ready_fd: int,
    ) -> None:
        self.process = process
        self.script = script  # the borg script it runs, resolved
        self.environment = environment
        self.order_fd = order_fd  # write end
        self.ready_fd = ready_fd  # read end


_waiting: Waiting | None = None
_lock = _thread.allocate_lock()


def begin(arguments: Sequence[str]) -> None:
    """Start borg's interpreter if the command line (without the program) runs a
    command of :data:`COMMANDS`, not for help or a dry run."""
    global _waiting
    if os.environ.get("HOMESAFE_PRESTART", "1") == "0" or _waiting is not None:
        return
    command = next((argument for argument in arguments if not argument.startswith("-")), None)
    if command not in COMMANDS or {"-h", "--help", "--dry-run"} & set(arguments):
        return
    if not _writes_to_borg(_repository_names(arguments)):
        return  # borg's start-up would only take a core from the engine
    _waiting = _start()


def _repository_names(arguments: Sequence[str]) -> list[str]:
    """The values of the command line's ``--repo`` options."""
    names = []
    for position, argument in enumerate(arguments):
        if argument == "--repo" and position + 1 < len(arguments):
            names.append(arguments[position + 1])
        elif argument.startswith("--repo="):
            names.append(argument.removeprefix("--repo="))
    return names


def _writes_to_borg(names: Sequence[str]) -> bool:
    """Whether one of the repositories ``names`` (none: the embedded default, a borg
    one) is a borg repository, as the registry says; False if it cannot be read."""
    registered = [name for name in names if name != "default"]
    if len(registered) < len(names) or not names:
        return True
    from homesafe import state

    return PROGRAM in (state.registered_engines(registered) or [])


def _start() -> Waiting | None:
    import shutil
    import subprocess

    from homesafe import locations

    script = shutil.which(PROGRAM)
    interpreter = _interpreter(script) if script else None
    if script is None or interpreter is None:
        return None
    environment = {**os.environ, **borg_environment(str(locations.home()))}
    for name in PASSPHRASE_NAMES:
        environment.pop(name, None)
    order_read, order_write = os.pipe()
    ready_read, ready_write = os.pipe()
    try:
        process = subprocess.Popen(
            [*interpreter, "-c", LAUNCHER, script, str(order_read), str(ready_write)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
            pass_fds=(order_read, ready_write),
            # As homesafe.execute.run starts every program: a group of its own.
            start_new_session=True,
        )
    except OSError:
        os.close(order_write)
        os.close(ready_read)
        return None
    finally:
        os.close(order_read)
        os.close(ready_write)
    atexit.register(discard)
    return Waiting(process, os.path.realpath(script), environment, order_write, ready_read)


def _interpreter(script: str) -> list[str] | None:
    """The interpreter (and the one argument) the script's first line names, if it is
    a Python named by absolute path; None otherwise."""
    try:
        with open(script, "rb") as file:
            first_line = file.readline(512)
    except OSError:
        return None
    if not first_line.startswith(b"#!") or not first_line.endswith(b"\n"):
        return None
    # The kernel passes what follows the interpreter as one argument, as is.
    interpreter, _, argument = os.fsdecode(first_line[2:].strip()).partition(" ")
    if not os.path.isabs(interpreter) or not os.path.basename(interpreter).startswith("python"):
        return None
    return [interpreter, argument.strip()] if argument.strip() else [interpreter]


def _read_before_borg_runs(name: str) -> bool:
    if name in RUN_TIME_NAMES:
        return False
    return name in START_UP_NAMES or name.startswith(START_UP_PREFIXES)


# Calls made in a leave_it() context do not take the waiting borg.
_leaving_it: contextvars.ContextVar[bool] = contextvars.ContextVar("leaving_it", default=False)


class leave_it:  # named as a function: it is used as contextlib's context managers are
    """Calls made in this context (this thread, or what copies its context) leave the
    waiting borg to another: for a short call made beside the long one, whose start-up
    is the one worth hiding (a restore's listing beside its extraction)."""

    def __enter__(self) -> None:
        self._token = _leaving_it.set(True)

    def __exit__(self, *exception: object) -> None:
        _leaving_it.reset(self._token)


def adopt(
    argv: Sequence[str],
    environment: Mapping[str, str],
    working_directory: str | None,
    pass_fds: Sequence[int],
    *,
    plain_stdio: bool,
) -> subprocess.Popen[bytes] | None:
    """The waiting borg, now running ``argv`` as a call made with these would, if it
    can stand for that call exactly (see the module docstring); else None, and the
    caller starts the program. ``plain_stdio``: the call's stdin is /dev/null and its
    stdout and stderr are pipes, as the waiting interpreter's are."""
    global _waiting
    with _lock:
        waiting = _waiting
        if waiting is None or not plain_stdio or _leaving_it.get():
            return None
        view, command = _view_and_command(argv, environment)
        if command is None or not _same_program(waiting, command, environment):
            return None
        if any(
            environment.get(name) != waiting.environment.get(name)
            for name in set(environment) | set(waiting.environment)
            if _read_before_borg_runs(name)
        ):
            return None
        if not all(_closed_pipe(fd) for fd in pass_fds):
            return None
        contents = [(fd, _take_contents(fd)) for fd in pass_fds]
        _waiting = None
        if not _ready(waiting):
            _end(waiting)
            return None
        order = {
            "argv": command,
            "env": dict(environment),
            "cwd": working_directory,
            "pipes": [(fd, content.hex()) for fd, content in contents],
            "view": view,
        }
        import json

        message = memoryview(json.dumps(order).encode())
        try:
            while message:
                message = message[os.write(waiting.order_fd, message) :]
        except OSError:
            _end(waiting)
            return None
        os.close(waiting.order_fd)
        return waiting.process


def _view_and_command(
    argv: Sequence[str], environment: Mapping[str, str]
) -> tuple[dict[str, Any] | None, list[str] | None]:
    """For ``argv`` run through a capture's view (:mod:`homesafe.consistency.view`),
    what the launcher needs to do as the view does (the module's file and the binds)
    and the command it runs; for any other argv, (None, argv); (None, None) for one the
    waiting borg cannot stand for (another wrapper, or no ``unshare`` on the call's
    PATH, which the call would then fail for)."""
    import shutil

    if not argv or argv[0] != "unshare":
        return None, list(argv)
    from homesafe.consistency import view

    prefix = [*view.PRIVATE_NAMESPACE_ARGV, sys.executable, "-m", view.__name__]
    if list(argv[: len(prefix)]) != prefix or view.__file__ is None:
        return None, None
    if shutil.which("unshare", path=environment.get("PATH", os.defpath)) is None:
        return None, None
    try:
        binds, command = view.parse_arguments(list(argv[len(prefix) :]))
    except ValueError:
        return None, None
    return {"module": view.__file__, "binds": binds}, command


def _same_program(waiting: Waiting, argv: Sequence[str], environment: Mapping[str, str]) -> bool:
    import shutil

    if not argv or os.path.basename(argv[0]) != PROGRAM:
        return False
    found = shutil.which(argv[0], path=environment.get("PATH", os.defpath))
    return found is not None and os.path.realpath(found) == waiting.script


def _closed_pipe(fd: int) -> bool:
    """Whether ``fd`` is a pipe that no one can write to any more (so that reading it
    to its end cannot block) holding at most PIPE_CAPACITY bytes (so that writing them
    into a new pipe, with no reader yet, cannot block either)."""
    import fcntl
    import select
    import struct
    import termios

    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        held = fcntl.ioctl(fd, termios.FIONREAD, bytes(4))
    except OSError:
        return False
    if struct.unpack("i", held)[0] > PIPE_CAPACITY:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def _take_contents(fd: int) -> bytes:
    """Read a closed pipe to its end, then put an identical one at the same fd: the
    caller's fd is left as it was (and closed by the caller as before)."""
    chunks = []
    while chunk := os.read(fd, PIPE_CAPACITY):
        chunks.append(chunk)
    contents = b"".join(chunks)
    read_end, write_end = os.pipe()
    os.write(write_end, contents)
    os.close(write_end)
    os.dup2(read_end, fd, inheritable=False)
    os.close(read_end)
    return contents


def _ready(waiting: Waiting) -> bool:
    """Wait for the interpreter to have imported borg; False if it failed to, or took
    longer than READY_TIMEOUT_SECONDS."""
    import select

    readable, _, _ = select.select([waiting.ready_fd], [], [], READY_TIMEOUT_SECONDS)
    word = os.read(waiting.ready_fd, 1) if readable else b""
    os.close(waiting.ready_fd)
    waiting.ready_fd = -1
    return word == b"1"


def discard() -> None:
    """End the waiting interpreter, if it was not taken (at exit, or when borg will
    not be needed)."""
    global _waiting
    with _lock:
        waiting, _waiting = _waiting, None
    if waiting is not None:
        _end(waiting)


def _end(waiting: Waiting) -> None:
    """Kill it (it holds nothing yet) and reap it."""
    import contextlib
    import signal

    for fd in (waiting.order_fd, waiting.ready_fd):
        if fd >= 0:
            os.close(fd)
    waiting.order_fd = waiting.ready_fd = -1
    with contextlib.suppress(OSError):  # ended already
        os.killpg(waiting.process.pid, signal.SIGKILL)
    waiting.process.communicate()


def waiting_pid() -> int | None:
    """The waiting interpreter's pid, if one waits (for tests and the debug log)."""
    return _waiting.process.pid if _waiting is not None else None
