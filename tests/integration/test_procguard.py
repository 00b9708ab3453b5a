"""The agent is not dumpable: a job running as the agent's own user cannot read its
environment (CONSUL_HTTP_TOKEN, AWS keys) from /proc (a security review printed them from a
job); programs it starts are dumpable again, so jobs and the watchdog are unaffected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NOBODY = 65534
# Started as root (the venv's python is under /root), it becomes nobody itself: a change of
# user makes a process non-dumpable, so the unguarded one turns dumpable again, as an agent
# started as its own user is.
HOLDER = """
import os, sys, time
from worker.procguard import PR_SET_DUMPABLE, _prctl, forbid_inspection
os.setgroups([]); os.setgid(65534); os.setuid(65534)
if sys.argv[1] == "guarded":
    assert forbid_inspection()
else:
    assert _prctl(PR_SET_DUMPABLE, 1) == 0
print("ready", flush=True)
time.sleep(30)
"""


def _holder(guarded: bool) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, "guarded" if guarded else "open"],
                            stdout=subprocess.PIPE, text=True,
                            env={"SECRET_TOKEN": "s3cret", "PYTHONPATH": str(Path.cwd())})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _read_as_nobody(pid: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/cat", f"/proc/{pid}/environ"], capture_output=True, text=True,
                          user=NOBODY, group=NOBODY, timeout=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run both sides as another user")
def test_a_process_of_the_same_user_cannot_read_the_agents_environment() -> None:
    open_, guarded = _holder(False), _holder(True)
    try:
        assert "s3cret" in _read_as_nobody(open_.pid).stdout  # what a job could do before
        denied = _read_as_nobody(guarded.pid)
        assert denied.returncode != 0 and "s3cret" not in denied.stdout
        assert "Permission denied" in denied.stderr
    finally:
        for p in (open_, guarded):
            p.kill()
            p.wait()


def test_programs_it_starts_are_dumpable_again() -> None:
    out = subprocess.run(
        [sys.executable, "-c",
         "import subprocess, sys\n"
         "from worker.procguard import forbid_inspection, is_dumpable\n"
         "assert forbid_inspection() and not is_dumpable()\n"
         "print(subprocess.run([sys.executable, '-c', 'from worker.procguard import "
         "is_dumpable; print(is_dumpable())'], capture_output=True, text=True).stdout.strip())"],
        capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "True"
