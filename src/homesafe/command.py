"""The ``homesafe`` program: :mod:`homesafe.cli`, with borg started beside it first.

Kept apart from :mod:`homesafe.cli`, whose imports (click and the rest) take much of
homesafe's start-up: a command that will soon call borg starts borg's interpreter
(:func:`homesafe.prestart.begin`) before them, so that both start at once.
"""

from __future__ import annotations

import sys


def main() -> None:
    from homesafe import prestart

    prestart.begin(sys.argv[1:])
    from homesafe.cli import main as command_line

    command_line()
