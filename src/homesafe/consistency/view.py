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
not start one: it *becomes* it. It imports nothing from homesafe, to start fast, and so
that the borg started early (:mod:`homesafe.prestart`) can load it by path and do the
same in its own process (:func:`enter_mount_namespace`, then :func:`show`).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence

# typing.TYPE_CHECKING without importing typing, nor homesafe (see above).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes

__all__ = [
    "PRIVATE_NAMESPACE_ARGV",
    "bind_read_only",
    "enter_mount_namespace",
    "main",
    "parse_arguments",
    "show",
    "wrapper_argv",
]

# linux/mount.h
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_PRIVATE = 1 << 18
MS_REC = 16384
# linux/sched.h
CLONE_NEWNS = 0x00020000
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


def _libc() -> ctypes.CDLL:
    """The C library, keeping errno for :func:`_failure`."""
    import ctypes  # here: homesafe imports this module for wrapper_argv, not for this
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _failure(*filename: str) -> OSError:
    """The OSError of the C library call that just failed."""
    import ctypes

    number = ctypes.get_errno()
    return OSError(number, os.strerror(number), *filename)


def _mount(source: str | None, target: str, flags: int) -> None:
    import ctypes

    if _libc().mount(
        None if source is None else os.fsencode(source),
        os.fsencode(target),
        None,
        ctypes.c_ulong(flags),
        None,
    ):
        raise _failure(target)


def bind_read_only(copy: str, original: str) -> None:
    """Mount ``copy`` over ``original`` (directories or files), read-only: the engine
    reads, and a copy that is a writable clone must stay as it was taken."""
    _mount(copy, original, MS_BIND)
    _mount(None, original, MS_BIND | MS_REMOUNT | MS_RDONLY)


def parse_arguments(arguments: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """``--bind COPY ORIGINAL ... -- COMMAND...``: the binds and the command; ValueError
    for anything else."""
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


def enter_mount_namespace() -> None:
    """Move this process into a mount namespace of its own, as ``unshare --mount``
    does (for a process not started through PRIVATE_NAMESPACE_ARGV: the borg that
    :mod:`homesafe.prestart` started early). Raises OSError, with nothing mounted, when
    the process is still in the namespace it was in."""
    before = os.readlink("/proc/self/ns/mnt")
    if _libc().unshare(CLONE_NEWNS) != 0:
        raise _failure()
    if os.readlink("/proc/self/ns/mnt") == before:
        raise OSError(errno.EINVAL, "the mount namespace did not change")


def show(binds: Sequence[tuple[str, str]]) -> int | None:
    """Mount each copy of ``binds`` read-only over its original path, in this process's
    own mount namespace; every mount is made private first. None when done; else
    EXIT_VIEW_FAILED, with the reason printed on stderr."""
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
    return None


def main(arguments: list[str] | None = None) -> int:
    try:
        binds, command = parse_arguments(sys.argv[1:] if arguments is None else arguments)
    except ValueError as error:
        print(f"homesafe view: {error}", file=sys.stderr)
        return EXIT_VIEW_FAILED
    failed = show(binds)
    if failed is not None:
        return failed
    sys.stdout.flush()
    try:
        os.execvp(command[0], command)  # noqa: S606 - an argv, never a shell
    except OSError as error:
        print(f"homesafe view: cannot run {command[0]}: {error.strerror}", file=sys.stderr)
        return 127 if isinstance(error, FileNotFoundError) else 126
    return EXIT_VIEW_FAILED  # not reached: execvp returns only by raising


if __name__ == "__main__":
    sys.exit(main())
