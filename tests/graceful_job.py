"""A job that cleans up on SIGTERM: ``python graceful_job.py MARKER``. It prints "ready", and
on SIGTERM prints "TERM received, cleaning up", takes 0.5 s, writes "cleaned up" to MARKER and
exits 0. Used to check that a job gets its kill grace (tests/integration)."""

import signal
import sys
import time


def cleanup(*_: object) -> None:
    print("TERM received, cleaning up", flush=True)
    time.sleep(0.5)
    with open(sys.argv[1], "w") as f:
        f.write("cleaned up")
    sys.exit(0)


signal.signal(signal.SIGTERM, cleanup)
print("ready", flush=True)
time.sleep(3600)
