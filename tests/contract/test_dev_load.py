"""Dev-server-only: many parked blocking queries cost no CPU; load does not spin the server."""

from __future__ import annotations

import os
import threading
import time

import pytest
import requests

from devconsul.testing import DevConsul

WAITERS = 50
WRITE_RATE = 300  # requests per second
LOAD_SECONDS = 2.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_parked_blocking_queries_and_load(own_dev: DevConsul) -> None:
    assert own_dev.proc is not None
    pid = own_dev.proc.pid
    base = own_dev.http_addr + "/v1/kv/"
    setup = requests.Session()
    for i in range(WAITERS):
        setup.put(f"{base}load/w{i}", data=b"0", timeout=5)
    indexes = [int(setup.get(f"{base}load/w{i}", timeout=5).headers["X-Consul-Index"])
               for i in range(WAITERS)]

    results: dict[int, tuple[float, bytes]] = {}

    def waiter(i: int) -> None:
        with requests.Session() as s:
            r = s.get(f"{base}load/w{i}", params={"index": indexes[i], "wait": "30s"},
                      timeout=40)
            results[i] = (time.monotonic(), r.content)

    threads = [threading.Thread(target=waiter, args=(i,), daemon=True) for i in range(WAITERS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while own_dev.state()["blocking_queries"] < WAITERS:
        assert time.monotonic() < deadline, "the blocking queries never parked"
        time.sleep(0.05)

    # 1. Idle with 50 parked queries: next to no CPU (no polling, no busy loop).
    cpu0, wall0 = cpu_seconds(pid), time.monotonic()
    time.sleep(1.0)
    idle = (cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0)
    assert idle < 0.05, f"idle server used {idle:.0%} CPU"

    # 2. A few hundred writes/s for a couple of seconds, to keys nobody waits on.
    errors: list[str] = []
    sent = [0]

    def writer(n: int, writers: int) -> None:
        with requests.Session() as s:
            start = time.monotonic()
            k = 0
            while (elapsed := time.monotonic() - start) < LOAD_SECONDS:
                due = start + k * writers / WRITE_RATE
                if due > time.monotonic():
                    time.sleep(due - time.monotonic())
                r = s.put(f"{base}load/other/{n}/{k % 50}", data=str(k).encode(), timeout=5)
                if r.status_code != 200:
                    errors.append(r.text)
                k += 1
                sent[0] += 1
            del elapsed

    writers = 4
    cpu1, wall1 = cpu_seconds(pid), time.monotonic()
    wthreads = [threading.Thread(target=writer, args=(n, writers)) for n in range(writers)]
    for t in wthreads:
        t.start()
    for t in wthreads:
        t.join()
    busy = (cpu_seconds(pid) - cpu1) / (time.monotonic() - wall1)
    rate = sent[0] / (time.monotonic() - wall1)
    assert not errors
    assert rate > WRITE_RATE * 0.8, f"only {rate:.0f} requests/s"
    assert not results, "unrelated writes woke a blocking query on another key"
    assert busy < 0.5, f"server used {busy:.0%} CPU for {rate:.0f} writes/s"

    # 3. Each parked query answers promptly once its own key changes.
    written_at = time.monotonic()
    for i in range(WAITERS):
        setup.put(f"{base}load/w{i}", data=b"1", timeout=5)
    for t in threads:
        t.join(10)
    assert len(results) == WAITERS
    assert max(at for at, _ in results.values()) - written_at < 3.0
    assert all(b'"MQ=="' in body for _, body in results.values())
