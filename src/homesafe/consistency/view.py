"""Run a command in a private mount namespace where captured copies sit at the paths
they were taken from.

An app captured by a snapshot, a reflink clone or a staged copy is read from that copy,
but its archive must hold the original paths (``/srv/notes``, not
``/srv/.homesafe-snapshots/.../notes``), and the engines' caches of unchanged files key
on those paths too. So the engine runs as::

    unshare --mount --propagation private -- python -m homesafe.consistency.view \\
        --bind COPY ORIGINAL [--bind COPY ORIGINAL ...] -- borg create ...

:func:`wrapper_argv` builds that prefix. ``unshare`` gives the command a mount namespace
of its own whose mounts never propagate back; this module then bind-mounts each copy
read-only over its original path, in order (a nested subvolume's copy after its
parent's), and replaces itself with the command (``os.execvp``: same process, same
pipes and inherited descriptors, so a passphrase pipe still reaches the engine). The
other processes of the host keep seeing the live paths, and when the command exits the
namespace and every bind mount in it are gone: there is nothing to clean up after a
crash.

This is the one place besides :mod:`homesafe.execute` that runs a program, and it does
not start one: it *becomes* it. It imports nothing from homesafe, to start fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

__all__ = ["PRIVATE_NAMESPACE_ARGV", "bind_read_only", "main", "wrapper_argv"]

# linux/mount.h
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_PRIVATE = 1 << 18
MS_REC = 16384
# Exit status when the view cannot be set up (the command never ran).
EXIT_VIEW_FAILED = 125
# Runs the command after it in a mount namespace of its own, whose mounts stay in it.
PRIVATE_NAMESPACE_ARGV = ("unshare", "--mount", "--propagation", "private", "--")


def wrapper_argv(binds: Sequence[tuple[str, str]]) -> list[str]:
    """The argv prefix that runs a command with each ``(copy, original)`` of ``binds``
    mounted over ``original``; the command's own argv follows it."""
    argv = [*PRIVATE_NAMESPACE_ARGV, sys.executable, "-m", "homesafe.consistency.view"]
    for copy, original in binds:
        argv += ["--bind", copy, original]
    return [*argv, "--"]


def _mount(source: str | None, target: str, flags: int) -> None:
    import ctypes  # here: homesafe imports this module for wrapper_argv, not for this
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(
        None if source is None else os.fsencode(source),
        os.fsencode(target),
        None,
        ctypes.c_ulong(flags),
        None,
    ):
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), target)


def bind_read_only(copy: str, original: str) -> None:
    """Mount ``copy`` over ``original`` (directories or files), read-only: the engine
    reads, and a copy that is a writable clone must stay as it was taken."""
    _mount(copy, original, MS_BIND)
    _mount(None, original, MS_BIND | MS_REMOUNT | MS_RDONLY)


def _parse(arguments: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    binds = []
    position = 0
    while position < len(arguments) and arguments[position] == "--bind":
        if position + 2 >= len(arguments):
            raise ValueError("--bind needs a copy and an original path")
        binds.append((arguments[position + 1], arguments[position + 2]))
        position += 3
    if position >= len(arguments) or arguments[position] != "--":
        raise ValueError("expected --bind COPY ORIGINAL ... -- COMMAND")
    command = arguments[position + 1 :]
    if not command:
        raise ValueError("no command after --")
    return binds, command


def main(arguments: list[str] | None = None) -> int:
    try:
        binds, command = _parse(sys.argv[1:] if arguments is None else arguments)
    except ValueError as error:
        print(f"homesafe view: {error}", file=sys.stderr)
        return EXIT_VIEW_FAILED
    try:
        # unshare already made every mount private; said again so that this module
        # never changes the host's mounts, whoever starts it.
        _mount(None, "/", MS_REC | MS_PRIVATE)
        # Every copy is opened before anything is mounted: a copy may lie below an
        # original path (a nested subvolume's snapshot is inside its parent), which
        # the first bind mount hides. A mount from /proc/self/fd/N reaches it anyway.
        opened = [(os.open(copy, os.O_PATH | os.O_CLOEXEC), original) for copy, original in binds]
        for descriptor, original in opened:
            bind_read_only(f"/proc/self/fd/{descriptor}", original)
    except OSError as error:
        print(f"homesafe view: cannot show {error.filename} from its copy: "
              f"{error.strerror}", file=sys.stderr)  # fmt: skip
        return EXIT_VIEW_FAILED
    sys.stdout.flush()
    try:
        os.execvp(command[0], command)  # noqa: S606 - an argv, never a shell
    except OSError as error:
        print(f"homesafe view: cannot run {command[0]}: {error.strerror}", file=sys.stderr)
        return 127 if isinstance(error, FileNotFoundError) else 126
    return EXIT_VIEW_FAILED  # not reached: execvp returns only by raising


if __name__ == "__main__":
    sys.exit(main())
