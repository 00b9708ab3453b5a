"""The cronsul side of `make bench`: real agent processes against one redis-server and DevConsul.

Each measure takes a ``Ctx`` (the shared redis-server, a work dir, sizes) and returns a dict
that goes into the results JSON as it is.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis

from bench.common import percentile, summary_ms
from cronsul_testing import Cluster, RedisServer, wait_until
from devconsul.testing import DevConsul
from scheduler.ports import Fence, TickBatch
from scheduler.runs import Run, epoch_ms, iso_utc
from worker.keys import GROUP, Keys
from worker.sink import RedisSink, run_payload

KEYS = Keys("cronsul")
# A schedule that never fires during a bench run: the bench enqueues the runs itself, on the
# job's own queue ("default"), as the scheduler would. (Until 2026-11-23 the jobs named a queue
# no bench worker served, so the agents could not know the callable would come and started
# their warm pool only when the first runs arrived: its boot, 0.15-0.25 s, was in the span.)
IDLE = {"schedule": "0 3 1 1 *"}
FAILOVER_CONSUL = {"check_ttl": "2s", "lock_delay": "2s", "session_ttl": "10s"}


@dataclass
class Ctx:
    redis: RedisServer
    workdir: Path

    def client(self) -> redis.Redis:
        return self.redis.client()

    def fresh(self, name: str) -> Path:
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        self.client().flushall()
        return d


class _Consul:
    def __init__(self, d: Path) -> None:
        self.server = DevConsul(data_dir=d / "consul-data")

    def __enter__(self) -> DevConsul:
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.close()


def _records(r: redis.Redis, run_ids: list[str], fields: list[str]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for start in range(0, len(run_ids), 2000):
        pipe = r.pipeline(transaction=False)
        for rid in run_ids[start:start + 2000]:
            pipe.hmget(KEYS.run(rid), fields)
        out.extend(pipe.execute())
    return out


def _group(r: redis.Redis, queue: str) -> dict[str, Any]:
    for g in r.xinfo_groups(KEYS.stream(queue)):
        if g["name"] in (GROUP, GROUP.encode()):
            return dict(g)
    return {}


# -- 1. no-op Python jobs ---------------------------------------------------------------------

def noop_drain(ctx: Ctx, n: int, concurrency: int = 8, agents: int = 2,
               python_workers: int = 0, python_prefetch: int = 0) -> dict[str, Any]:
    """``n`` runs of a ``callable = "bench.bench_jobs:noop"`` job drained by 2 agents, each
    with its warm Python worker pool (``python_workers``, 0: one per run slot; and
    ``python_prefetch``, 0: the default)."""
    job = {**IDLE, "callable": "bench.bench_jobs:noop", "timeout": "30s"}
    return _drain(ctx, "noop", job, n, concurrency, agents, python_workers, python_prefetch)


# -- 2. /bin/true shell jobs -------------------------------------------------------------------

def _enqueue_runs(r: redis.Redis, job: str, n: int, queue: str = "default") -> list[str]:
    base = datetime(2020, 1, 1, tzinfo=UTC)  # in the past: a future tick is refused
    runs = [(Run.for_tick(job, base + timedelta(milliseconds=i)), queue) for i in range(n)]
    sink = RedisSink(r, KEYS)
    for start in range(0, n, 5000):
        sink.apply(TickBatch(runs[start:start + 5000], {}), Fence(0, 1))
    return [run.run_id for run, _ in runs]


def shell_drain(ctx: Ctx, n: int, concurrency: int, agents: int = 2) -> dict[str, Any]:
    return _drain(ctx, "true", {**IDLE, "command": ["/bin/true"], "timeout": "30s"}, n,
                  concurrency, agents)


def _drain(ctx: Ctx, name: str, job: dict[str, Any], n: int, concurrency: int,
           agents: int, python_workers: int = 0, python_prefetch: int = 0) -> dict[str, Any]:
    d = ctx.fresh(f"cronsul-{name}")
    r = ctx.client()
    run_ids = _enqueue_runs(r, name, n)
    jobs = {name: job}
    with _Consul(d) as consul:
        cluster = Cluster(d, consul, ctx.redis.url, [f"s{i + 1}" for i in range(agents)], jobs,
                          worker_extra={"concurrency": concurrency, "visibility_timeout": "60s",
                                        "python_workers": python_workers,
                                        **({"python_prefetch": python_prefetch}
                                           if python_prefetch else {})})
        cluster.start()
        try:
            def drained() -> bool:
                try:
                    g = _group(r, "default")
                except redis.ResponseError:
                    return False
                return bool(g) and g.get("lag") == 0 and g.get("pending") == 0
            wait_until(drained, 120 + n / 50, interval=0.05, what=f"all {name} runs acked")
        finally:
            cluster.stop()
    recs = _records(r, run_ids, ["state", "started_ms", "finished_ms"])
    ok = [rec for rec in recs if rec[0] == b"succeeded"]
    starts = [int(rec[1]) for rec in ok]
    ends = [int(rec[2]) for rec in ok]
    span_s = (max(ends) - min(starts)) / 1000
    return {"n": n, "succeeded": len(ok), "agents": agents, "concurrency": concurrency,
            "python_workers": python_workers or concurrency,
            **({"python_prefetch": python_prefetch} if python_prefetch else {}),
            "span_s": span_s, "per_s": round(len(ok) / span_s, 1)}


# -- 3. enqueue-to-start latency -----------------------------------------------------------------

def latency(ctx: Ctx, n: int, interval_s: float = 0.010, warmup: int = 20,
            kind: str = "command") -> dict[str, Any]:
    """``kind`` "command": the job is ``bash -c`` writing $EPOCHREALTIME (a process per run);
    "callable": the job is ``bench.bench_jobs:stamp`` in the warm Python pool writing
    time.time() when entered, exactly what each peer's task records."""
    d = ctx.fresh(f"cronsul-latency-{kind}")
    r = ctx.client()
    stamps = d / "stamps.txt"
    stamps.write_text("")
    if kind == "callable":
        job = {**IDLE, "timeout": "30s", "callable": "bench.bench_jobs:stamp",
               "env": {"BENCH_STAMPS": str(stamps)}}
    else:
        # bash's printf and $EPOCHREALTIME are builtins: the job records its start with no fork.
        job = {**IDLE, "timeout": "30s", "command": [
            "/bin/bash", "-c", f'printf "%s %s\\n" "$CRONSUL_RUN_ID" "$EPOCHREALTIME" >> {stamps}']}
    jobs = {"stamp": job}
    stream = KEYS.stream("default")
    # Run ids only (the measure is send time to start): a past date, since a consumer refuses
    # a run scheduled more than an hour ahead of its clock (worker.messages).
    base = datetime(2026, 1, 1, tzinfo=UTC)
    sent: dict[str, float] = {}

    def send(i: int) -> None:
        when = base + timedelta(milliseconds=i)
        run_id = Run.for_tick("stamp", when).run_id
        payload = run_payload(run_id, "stamp", when, {})
        sent[run_id] = time.time()
        r.xadd(stream, {"p": payload})

    with _Consul(d) as consul:
        cluster = Cluster(d, consul, ctx.redis.url, ["l1", "l2"], jobs,
                          worker_extra={"concurrency": 4, "visibility_timeout": "60s"})
        cluster.start()
        try:
            send(0)  # the first run starts once an agent is up and reading
            wait_until(lambda: stamps.read_text().count("\n") >= 1, 60, what="first run")
            for i in range(1, warmup):
                send(i)
                time.sleep(interval_s)
            wait_until(lambda: stamps.read_text().count("\n") >= warmup, 30, what="warm-up")
            time.sleep(0.5)
            measured = set()
            t_next = time.perf_counter()
            for i in range(warmup, warmup + n):
                send(i)
                measured.add(Run.for_tick("stamp", base + timedelta(milliseconds=i)).run_id)
                t_next += interval_s
                pause = t_next - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            wait_until(lambda: stamps.read_text().count("\n") >= warmup + n, 60,
                       what="all latency runs")
        finally:
            cluster.stop()
    process: list[float] = []
    for line in stamps.read_text().splitlines():
        run_id, when = line.split()
        if run_id in measured:
            process.append((float(when.replace(",", ".")) - sent[run_id]) * 1000)
    ids = sorted(measured)
    claimed = [int(rec[0]) - sent[rid] * 1000
               for rid, rec in zip(ids, _records(r, ids, ["started_ms"]), strict=True)
               if rec[0] is not None]
    return {"n": n, "interval_ms": interval_s * 1000, "agents": 2, "kind": kind,
            "process_start": summary_ms(process),
            "claimed": {**summary_ms(claimed), "note": "run record started_ms (ms resolution)"}}


# -- 4. scheduler tick lag ---------------------------------------------------------------------

def tick_lag(ctx: Ctx, jobs_n: int, seconds: float) -> dict[str, Any]:
    d = ctx.fresh("cronsul-ticks")
    r = ctx.client()
    stream = KEYS.stream("bench")
    jobs = {f"t{i:04d}": {"schedule": "* * * * * *", "queue": "bench",
                          "command": ["/bin/true"], "timeout": "10s"} for i in range(jobs_n)}
    seen: dict[str, float] = {}  # entry id -> local time it became readable
    stop = threading.Event()

    def tail() -> None:
        reader = ctx.client()
        last = "0-0"
        while not stop.is_set():
            reply = reader.xread({stream: last}, count=5000, block=200)
            now = time.time()
            for _key, entries in reply or []:
                for entry_id, _fields in entries:
                    seen[entry_id.decode()] = now
                    last = entry_id.decode()

    with _Consul(d) as consul:
        cluster = Cluster(d, consul, ctx.redis.url, ["k1"], jobs,
                          worker_extra={"queues": ["default"]})
        tailer = threading.Thread(target=tail, daemon=True)
        tailer.start()
        cluster.start()
        try:
            cluster.wait_leader(60)
            wait_until(lambda: r.exists(stream), 60, what="first ticks")
            time.sleep(seconds)
        finally:
            cluster.stop()
            time.sleep(0.3)
            stop.set()
            tailer.join(2)
    visible, script_start, record = [], [], []
    entries = r.xrange(stream, "-", "+")
    run_ids, ids = [], []
    for entry_id, fields in entries:
        body = json.loads(fields[b"p"])
        run_ids.append(body["run_id"])
        ids.append(entry_id.decode())
    for entry_id, _rid, rec in zip(ids, run_ids, _records(r, run_ids,
                                                          ["scheduled_ms", "enqueued_ms"]),
                                  strict=True):
        scheduled = int(rec[0])
        script_start.append(int(entry_id.split("-")[0]) - scheduled)
        record.append(int(rec[1]) - scheduled)
        if entry_id in seen:
            visible.append(seen[entry_id] * 1000 - scheduled)
    ticks = len({rid.split("@")[1] for rid in run_ids})
    return {"jobs": jobs_n, "seconds": seconds, "runs": len(run_ids), "ticks": ticks,
            "visible": summary_ms(visible), "xadd": summary_ms(script_start),
            "record_enqueued_ms": summary_ms(record)}


# -- 5. fan-out enqueue --------------------------------------------------------------------------

def fanout(ctx: Ctx, n: int, trials: int) -> dict[str, Any]:
    ctx.fresh("cronsul-fanout")
    r = ctx.client()
    sink = RedisSink(r, KEYS)
    params = [{"app": f"a{i}"} for i in range(n)]
    apply_s, build_s = [], []
    for t in range(trials):
        tick = datetime(2021, 1, 1, tzinfo=UTC) + timedelta(minutes=t)  # past, as a tick is
        t0 = time.perf_counter()
        runs = [(Run.for_tick("fan", tick, p), "fan") for p in params]
        t1 = time.perf_counter()
        result = sink.apply(TickBatch(runs, {"fan": tick}), Fence(0, 1))
        t2 = time.perf_counter()
        assert result.enqueued == n, result
        build_s.append(t1 - t0)
        apply_s.append(t2 - t1)
    return {"n": n, "trials": trials, "apply_s": [round(x, 4) for x in apply_s],
            "apply_median_s": round(statistics.median(apply_s), 4),
            "build_runs_median_s": round(statistics.median(build_s), 4),
            "stream_len": r.xlen(KEYS.stream("fan"))}


# -- 6. failover + 7. footprint --------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            out.extend(int(x) for x in text)
    except OSError:
        pass
    return out


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def failover_and_footprint(ctx: Ctx, trials: int, footprint_s: float) -> dict[str, Any]:
    d = ctx.fresh("cronsul-failover")
    jobs = {f"idle{i}": {"schedule": f"{i} 3 * * *", "command": ["/bin/true"], "timeout": "1m"}
            for i in range(3)}
    out: dict[str, Any] = {"trials": trials, **FAILOVER_CONSUL}
    with _Consul(d) as consul:
        cluster = Cluster(d, consul, ctx.redis.url, ["f1", "f2", "f3"], jobs,
                          consul_extra=FAILOVER_CONSUL)
        cluster.start()
        try:
            for name, sig, timeout in (("sigterm", signal.SIGTERM, 15.0),
                                       ("sigkill", signal.SIGKILL, 30.0)):
                times = []
                for _ in range(trials):
                    leader = cluster.wait_leader(60)
                    time.sleep(1.0)  # every agent registered and contending
                    agent = cluster.agents[leader]
                    t0 = time.monotonic()
                    agent.signal(sig)
                    cluster.wait_leader(timeout, exclude=leader)
                    times.append(time.monotonic() - t0)
                    agent.wait(30)
                    agent.start()  # as systemd would
                    time.sleep(1.5)
                out[name] = {"n": len(times), "p50_s": round(statistics.median(times), 3),
                             "max_s": round(max(times), 3), "all_s": [round(t, 3) for t in times]}
            out["footprint"] = _footprint(cluster, footprint_s)
        finally:
            cluster.stop()
    return out


def _footprint(cluster: Cluster, seconds: float) -> dict[str, Any]:
    time.sleep(3.0)  # settle after the last restart
    leader = cluster.leader()
    hz = os.sysconf("SC_CLK_TCK")
    agents = {a.node: a for a in cluster.agents.values()}

    def snapshot() -> dict[str, tuple[int, int, int]]:
        snap = {}
        for node, a in agents.items():
            pids = [a.pid, *_children(a.pid)]
            snap[node] = (sum(_cpu_ticks(p) for p in pids), sum(_rss_kib(p) for p in pids),
                          _rss_kib(a.pid))
        return snap

    t0, s0 = time.monotonic(), snapshot()
    peak = {node: v[1] for node, v in s0.items()}
    end = t0 + seconds
    while time.monotonic() < end:
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        for node, v in snapshot().items():
            peak[node] = max(peak[node], v[1])
    t1, s1 = time.monotonic(), snapshot()
    rows = []
    for node in agents:
        cpu = (s1[node][0] - s0[node][0]) / hz / (t1 - t0) * 100
        rows.append({"node": node, "role": "leader" if node == leader else "follower",
                     "rss_mib": round(s1[node][1] / 1024, 1),
                     "agent_rss_mib": round(s1[node][2] / 1024, 1),
                     "peak_rss_mib": round(peak[node] / 1024, 1), "cpu_pct": round(cpu, 2)})
    return {"seconds": round(t1 - t0, 1), "agents": rows}


__all__ = [
    "Ctx",
    "epoch_ms",
    "failover_and_footprint",
    "fanout",
    "iso_utc",
    "latency",
    "noop_drain",
    "percentile",
    "shell_drain",
    "tick_lag",
]
