"""Argument types shared by the CLI's commands: refusals name what was wrong (argparse shows
``invalid <__name__> value`` and the message; exit code 2)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

# The most fire times `check` / `next` list per job: enough to eyeball a schedule; a typo such
# as -n 100000000 would otherwise compute for minutes and take gigabytes.
MAX_FIRE_TIMES = 1000
# The most entries `history` / `dlq list` show (history keeps 1,000 runs per job; the dead-letter
# stream about 10,000 letters).
MAX_LISTED = 10_000


def count(maximum: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 1 to ``maximum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not 1 <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{text} is not between 1 and {maximum}")
        return value

    parse.__name__ = "count"
    return parse
