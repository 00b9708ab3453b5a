"""What every peer's task does: append one fixed-width line to the marks file (one write(2)).

``mark_now``    "<start time>\\n"                (18 bytes): drain and shell measures
``mark_latency`` "<enqueue time> <start time>\\n" (36 bytes): latency measure

O_APPEND writes of a few bytes are atomic on Linux, so 2 worker processes can share the file.
The harness counts lines by file size; a write costs about a microsecond, the same for every peer.
"""

from __future__ import annotations

import os
import subprocess
import time

NOW_WIDTH = 18
LATENCY_WIDTH = 36
_fd: int | None = None


def _file() -> int:
    global _fd
    if _fd is None:
        _fd = os.open(os.environ["BENCH_MARKS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    return _fd


def mark_now() -> None:
    os.write(_file(), b"%17.6f\n" % time.time())


def mark_latency(enqueued: float) -> None:
    os.write(_file(), b"%17.6f %17.6f\n" % (float(enqueued), time.time()))


def run_true() -> None:
    subprocess.run(["/bin/true"], check=True)
    mark_now()
