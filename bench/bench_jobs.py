"""Python callables the benchmark runs as cronsul jobs (`callable = "bench.bench_jobs:noop"`)."""

from __future__ import annotations

import functools
import os
import time


def noop() -> None:
    """The no-op job every peer runs too."""


@functools.cache
def _stamps_fd(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def stamp() -> None:
    """The latency job: appends "<run id> <time entered>" with one write(2), as each peer's task
    does (bench/peers/marks.py), to the file named by $BENCH_STAMPS."""
    line = f"{os.environ['CRONSUL_RUN_ID']} {time.time():.6f}\n"
    os.write(_stamps_fd(os.environ["BENCH_STAMPS"]), line.encode())
