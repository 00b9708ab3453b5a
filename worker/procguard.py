"""Keep the agent's memory and environment from other processes of its user.

Jobs without ``user`` run as the agent's own user. Without this, any of them could read the
agent's ``/proc/<pid>/environ`` (CONSUL_HTTP_TOKEN, AWS keys) and memory (the Redis password,
the dashboard's admin token): a security review printed all four from a job. A process that is
not "dumpable" has its ``/proc/<pid>`` files owned by root and cannot be ptrace-attached by
its user; jobs are unaffected (``execve`` makes each new program dumpable again). Files the
agent reads (token and password files) stay readable by its user: docs/operations.md says how
to keep them from jobs.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# linux/prctl.h
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return int(libc.prctl(option, arg, 0, 0, 0))


def forbid_inspection() -> bool:
    """Make this process non-dumpable. False where the kernel or libc refuses (not Linux)."""
    try:
        return _prctl(PR_SET_DUMPABLE, 0) == 0
    except (OSError, AttributeError):
        return False


def is_dumpable() -> bool:
    try:
        return _prctl(PR_GET_DUMPABLE) == 1
    except (OSError, AttributeError):
        return True
