"""Runs one measure for one peer; executed by bench/.venv-peers/bin/python from this folder.

    driver.py PEER MEASURE N --redis URL --workdir DIR

MEASURE: noop (drain N pre-enqueued no-op jobs), shell (drain N `/bin/true` jobs), latency
(N jobs, one every 10 ms, idle workers). Prints one JSON object on its last stdout line.
Only the standard library, redis-py and the peer itself are used here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKERS = 2
LATENCY_INTERVAL_S = 0.010
LATENCY_WARMUP = 20


def bindir() -> Path:
    return Path(sys.executable).parent


class Peer:
    name = ""
    package = ""
    config = ""

    def setup(self) -> None: ...

    def enqueue(self, kind: str, enqueued: float | None = None) -> None:
        raise NotImplementedError

    def enqueue_many(self, kind: str, n: int) -> None:
        for _ in range(n):
            self.enqueue(kind)

    def worker_commands(self) -> list[list[str]]:
        raise NotImplementedError

    def close(self) -> None: ...


class Huey(Peer):
    name, package = "huey", "huey"
    config = "RedisHuey(results=False, blocking BRPOP); huey_consumer -k process -w 2"

    def setup(self) -> None:
        import app_huey
        self.app = app_huey

    def enqueue(self, kind, enqueued=None):
        if kind == "stamp":
            self.app.stamp(enqueued)
        else:
            getattr(self.app, kind)()

    def worker_commands(self):
        return [[str(bindir() / "huey_consumer"), "app_huey.huey", "-k", "process", "-w", "2",
                 "-n", "-q"]]


class RQ(Peer):
    name, package = "rq", "rq"
    config = "2 x `rq worker -w rq.worker.SimpleWorker` (no fork per job), result_ttl=0"

    def setup(self) -> None:
        from redis import Redis
        from rq import Queue
        self.Queue = Queue
        self.q = Queue("bench", connection=Redis.from_url(os.environ["BENCH_REDIS_URL"]))

    def enqueue(self, kind, enqueued=None):
        args = (enqueued,) if kind == "stamp" else ()
        self.q.enqueue(f"app_rq.{kind}", *args, result_ttl=0)

    def enqueue_many(self, kind, n):
        for start in range(0, n, 1000):
            batch = [self.Queue.prepare_data(f"app_rq.{kind}", result_ttl=0)
                     for _ in range(min(1000, n - start))]
            self.q.enqueue_many(batch)

    def worker_commands(self):
        cmd = [str(bindir() / "rq"), "worker", "-w", "rq.worker.SimpleWorker", "-u",
               os.environ["BENCH_REDIS_URL"], "--quiet", "bench"]
        return [cmd, list(cmd)]


class Celery(Peer):
    name, package = "celery", "celery"
    config = ("prefork -c 2, Redis broker, task_ignore_result, "
              "--without-gossip --without-mingle --without-heartbeat")

    def setup(self) -> None:
        import app_celery
        self.app = app_celery

    def enqueue(self, kind, enqueued=None):
        task = getattr(self.app, kind)
        task.delay(enqueued) if kind == "stamp" else task.delay()

    def worker_commands(self):
        return [[str(bindir() / "celery"), "-A", "app_celery", "worker", "-P", "prefork",
                 "-c", "2", "--without-gossip", "--without-mingle", "--without-heartbeat",
                 "-l", "warning"]]


class Dramatiq(Peer):
    name, package = "dramatiq", "dramatiq"
    config = "RedisBroker, `dramatiq --processes 2 --threads 8` (default threads)"
    threads = "8"

    def setup(self) -> None:
        import app_dramatiq
        self.app = app_dramatiq

    def enqueue(self, kind, enqueued=None):
        actor = getattr(self.app, kind)
        actor.send(enqueued) if kind == "stamp" else actor.send()

    def worker_commands(self):
        return [[str(bindir() / "dramatiq"), "app_dramatiq", "--processes", "2",
                 "--threads", self.threads]]


class _Async(Peer):
    def setup(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def enqueue_many(self, kind, n):
        async def go():
            for start in range(0, n, 500):
                await asyncio.gather(*(self.aenqueue(kind) for _ in range(min(500, n - start))))
        self.run(go())

    def enqueue(self, kind, enqueued=None):
        self.run(self.aenqueue(kind, enqueued))

    async def aenqueue(self, kind, enqueued=None):
        raise NotImplementedError


class Arq(_Async):
    name, package = "arq", "arq"
    config = "2 x `arq app_arq.WorkerSettings`, max_jobs=10, poll_delay=0.01 s, keep_result=0"

    def setup(self) -> None:
        super().setup()
        from arq import create_pool
        from arq.connections import RedisSettings
        self.pool = self.run(create_pool(RedisSettings.from_dsn(os.environ["BENCH_REDIS_URL"])))

    async def aenqueue(self, kind, enqueued=None):
        if kind == "stamp":
            await self.pool.enqueue_job("stamp", enqueued)
        else:
            await self.pool.enqueue_job(kind)

    def worker_commands(self):
        cmd = [str(bindir() / "arq"), "app_arq.WorkerSettings"]
        return [cmd, list(cmd)]

    def close(self):
        self.run(self.pool.aclose())


class Saq(_Async):
    name, package = "saq", "saq"
    config = "`saq app_saq.settings --workers 2`, concurrency=10 per worker"

    def setup(self) -> None:
        super().setup()
        import app_saq
        self.queue = app_saq.queue
        self.run(self.queue.connect())

    async def aenqueue(self, kind, enqueued=None):
        if kind == "stamp":
            await self.queue.enqueue("stamp", enqueued=enqueued)
        else:
            await self.queue.enqueue(kind)

    def worker_commands(self):
        return [[str(bindir() / "saq"), "app_saq.settings", "--workers", "2", "--quiet"]]

    def close(self):
        self.run(self.queue.disconnect())


PEERS = {p.name: p for p in (Huey, RQ, Celery, Dramatiq, Arq, Saq)}


def count_lines(path: Path, width: int) -> int:
    try:
        return path.stat().st_size // width
    except FileNotFoundError:
        return 0


def wait_count(path: Path, width: int, n: int, timeout: float, procs) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if count_lines(path, width) >= n:
            return True
        if all(p.poll() is not None for p in procs):
            return False
        time.sleep(0.02)
    return False


def start_workers(peer: Peer, log: Path) -> list[subprocess.Popen]:
    env = dict(os.environ, PYTHONPATH=str(HERE), PYTHONUNBUFFERED="1")
    with open(log, "ab") as out:  # the workers keep their own copies of the descriptor
        return [subprocess.Popen(cmd, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True) for cmd in peer.worker_commands()]


def stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # the whole group: prefork/process children too
        p.wait()


def drain(peer: Peer, kind: str, n: int, workdir: Path, timeout: float) -> dict:
    from marks import NOW_WIDTH
    marks = workdir / f"{peer.name}-{kind}.marks"
    marks.unlink(missing_ok=True)
    os.environ["BENCH_MARKS"] = str(marks)
    t0 = time.perf_counter()
    peer.enqueue_many(kind, n)
    enqueue_s = time.perf_counter() - t0
    started = time.time()
    procs = start_workers(peer, workdir / f"{peer.name}-{kind}.log")
    try:
        done = wait_count(marks, NOW_WIDTH, n, timeout, procs)
        finished = time.time()
    finally:
        stop_workers(procs)
    stamps = sorted(float(x) for x in marks.read_text().split()) if marks.exists() else []
    out = {"n": n, "completed": len(stamps), "enqueue_s": round(enqueue_s, 3),
           "enqueue_per_s": round(n / enqueue_s, 1), "ok": done}
    if len(stamps) >= 2:
        span = stamps[-1] - stamps[0]
        out["span_s"] = round(span, 4)
        out["per_s"] = round((len(stamps) - 1) / span, 1) if span > 0 else None
        out["from_worker_start_s"] = round(finished - started, 3)
    return out


def latency(peer: Peer, n: int, workdir: Path, timeout: float) -> dict:
    from marks import LATENCY_WIDTH
    marks = workdir / f"{peer.name}-latency.marks"
    marks.unlink(missing_ok=True)
    os.environ["BENCH_MARKS"] = str(marks)
    procs = start_workers(peer, workdir / f"{peer.name}-latency.log")
    try:
        # Warm up: the workers are up and idle once a first job has run.
        first = time.time()
        peer.enqueue("stamp", time.time())
        if not wait_count(marks, LATENCY_WIDTH, 1, 60, procs):
            return {"ok": False, "error": "workers never ran a job", "n": n}
        for _ in range(LATENCY_WARMUP - 1):
            peer.enqueue("stamp", time.time())
            time.sleep(LATENCY_INTERVAL_S)
        wait_count(marks, LATENCY_WIDTH, LATENCY_WARMUP, 30, procs)
        time.sleep(0.5)
        begin = time.time()
        t_next = time.perf_counter()
        for _ in range(n):
            peer.enqueue("stamp", time.time())
            t_next += LATENCY_INTERVAL_S
            pause = t_next - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        done = wait_count(marks, LATENCY_WIDTH, LATENCY_WARMUP + n, timeout, procs)
    finally:
        stop_workers(procs)
    lat = []
    for line in marks.read_text().splitlines():
        enq, start = (float(x) for x in line.split())
        if enq >= begin:
            lat.append((start - enq) * 1000)
    del first
    return {"n": n, "completed": len(lat), "ok": done, "latencies_ms": lat}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("peer", choices=sorted(PEERS))
    ap.add_argument("measure", choices=["noop", "shell", "latency"])
    ap.add_argument("n", type=int)
    ap.add_argument("--redis", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--timeout", type=float, default=300)
    a = ap.parse_args()
    os.environ["BENCH_REDIS_URL"] = a.redis
    sys.path.insert(0, str(HERE))
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["BENCH_MARKS"] = str(workdir / "unused.marks")
    peer = PEERS[a.peer]()
    peer.setup()
    try:
        if a.measure == "latency":
            result = latency(peer, a.n, workdir, a.timeout)
        else:
            result = drain(peer, a.measure, a.n, workdir, a.timeout)
    finally:
        peer.close()
    result.update(peer=peer.name, version=metadata.version(peer.package), config=peer.config,
                  measure=a.measure)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
