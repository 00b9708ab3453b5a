"""The machine's fork+exec limit: `/bin/true` spawned back to back from N processes at once.

    python -m bench.forkexec METHOD SECONDS START_AT   (one spawning process; prints "count")

METHOD: ``subprocess`` (subprocess.run, what most Python job runners do), ``posix_spawn``
(os.posix_spawn + waitpid: vfork-based, the cheapest way to start a process from Python).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

TRUE = "/bin/true"


def spin(method: str, seconds: float) -> int:
    count = 0
    end = time.monotonic() + seconds
    if method == "subprocess":
        while time.monotonic() < end:
            subprocess.run([TRUE], check=True)
            count += 1
    elif method == "posix_spawn":
        env = {"PATH": "/usr/bin:/bin"}
        while time.monotonic() < end:
            pid = os.posix_spawn(TRUE, [TRUE], env)
            os.waitpid(pid, 0)
            count += 1
    else:
        raise SystemExit(f"unknown method {method!r}")
    return count


def measure(method: str, seconds: float, procs: int = 2) -> dict[str, object]:
    """Run ``procs`` spawning processes at once; spawns per second summed over them."""
    start_at = time.time() + 0.5
    children = [
        subprocess.Popen([sys.executable, "-m", "bench.forkexec", method, str(seconds),
                          str(start_at)], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        for _ in range(procs)
    ]
    counts = [int(c.communicate()[0].strip()) for c in children]
    return {"method": method, "processes": procs, "seconds": seconds, "spawns": sum(counts),
            "per_s": round(sum(counts) / seconds, 1)}


if __name__ == "__main__":
    method, seconds, start_at = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    time.sleep(max(0.0, start_at - time.time()))
    print(spin(method, seconds))
