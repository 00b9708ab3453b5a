"""``make chaos``: five real agents, redis-server with AOF, the Consul dev server, a seeded fault
injector, and the invariants checked at the end. Prints one summary line; exits 1 on any
violation. See docs/reliability.md.

Environment: CHAOS_MINUTES (float, default 10), CHAOS_SEED (default random, printed), CHAOS_BACKEND
(``redis``, the default, or ``sqs``: the run queue is a standard SQS queue on a moto server,
Redis stays the state store),
CHAOS_DIR (keep everything there; default a temp dir, removed after a clean run unless
CHAOS_KEEP=1), CHAOS_FAULTS / CHAOS_SKIP (comma-separated fault kinds to run only / to leave
out; see chaos.faults.KINDS), CONSUL_HTTP_ADDR (use that real Consul agent; the
dev-server-only faults are skipped).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import requests
from cronsul_testing import (
    AWS_TEST_ENV,
    REPO,
    AgentProcess,
    Cluster,
    MotoServer,
    RedisServer,
    wait_until,
)

from chaos import checks
from chaos.faults import DEV_ONLY, ESTIMATE, Fault, Injector, plan, select_kinds
from chaos.procwatch import ProcWatch
from chaos.workload import PYJOB, PYJOB_MODULE, jobs_config, workload

NODES = ["n1", "n2", "n3", "n4", "n5"]
# The agents' timing (as in the integration tests): failover ~ check_ttl + lock_delay.
CONSUL_CFG = {"session_ttl": "10s", "check_ttl": "2s", "lock_delay": "2s"}
SESSION_TTL_S, VISIBILITY_S, SHUTDOWN_GRACE_S = 10.0, 4.0, 5.0
WORKER_CFG = {"concurrency": 4, "python_workers": 2, "visibility_timeout": f"{VISIBILITY_S:g}s",
              "shutdown_grace": f"{SHUTDOWN_GRACE_S:g}s", "kill_grace": "1s"}
KEY_PREFIX = "cronsul"
# Quiet time after the last fault, before the window of checked ticks closes.
SETTLE_S = 20.0
# Ticks count from this long after the first leader appeared (its scheduler starts its term a
# moment after it acquires the key; ticks before that are not owed).
WINDOW_START_SLACK_S = 2.0
# After the window closes: how long runs get to reach a terminal state.
DRAIN_TIMEOUT_S = 90.0
WARMUP_S = 5.0


def log(text: str) -> None:
    print(f"chaos: {text}", flush=True)


class ChaosRedis(RedisServer):
    """redis-server with the AOF on, fsync every second (docs: the recommended setting)."""

    def start(self) -> ChaosRedis:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.dir),
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )
        client = self.client()
        wait_until(lambda: _ping(client), 30, what=f"redis-server on {self.port}")
        client.close()
        return self


def _ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # any redis error means "not yet"
        return False


def snapshot_code(workdir: Path) -> Path:
    """Copy the agent's code once, so every agent (and every restart) in this run runs the same
    version even while the working tree is being edited."""
    dest = workdir / "code"
    for pkg in ("scheduler", "worker"):
        shutil.copytree(REPO / pkg, dest / pkg, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (dest / f"{PYJOB_MODULE}.py").write_text(PYJOB)  # the callable jobs' code
    return dest


class SnapshotAgent(AgentProcess):
    """``cronsul agent`` run from the code snapshot (cwd and PYTHONPATH)."""

    def __init__(self, node: str, config: Path, log: Path, code: Path) -> None:
        super().__init__(node, config, log)
        self.code = code

    def start(self) -> SnapshotAgent:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.code)
        env.pop("CONSUL_HTTP_TOKEN", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "agent", "-c", str(self.config)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            env=env, cwd=str(self.code),
        )
        return self


class RealConsul:
    """A real Consul agent (CONSUL_HTTP_ADDR): every cronsul node talks to the same agent."""

    def __init__(self, address: str) -> None:
        self.address = address.split("://", 1)[-1]

    def add_agent(self, node: str) -> str:
        return self.address


class LeaderMonitor:
    """Polls the leader key every 0.1 s; counts changes of the holding session."""

    def __init__(self, http: str, key: str) -> None:
        self._url = f"{http}/v1/kv/{key}"
        self.current: tuple[str, str] | None = None
        self.sampled_at = 0.0  # monotonic time of the last successful read
        self.first_leader_wall: float | None = None
        self.failovers = 0
        self._last_session: str | None = None
        self.changes: list[tuple[float, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="leader-monitor", daemon=True)
        self._session = requests.Session()

    def start(self) -> LeaderMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            sent = time.monotonic()
            try:
                r = self._session.get(self._url, timeout=1)
            except requests.RequestException:
                continue
            held: tuple[str, str] | None = None
            if r.status_code == 200:
                entry = r.json()[0]
                if entry.get("Session") and entry.get("Value"):
                    try:
                        value = json.loads(base64.b64decode(entry["Value"]))
                        held = (str(value["node"]), str(entry["Session"]))
                    except (ValueError, KeyError):
                        held = None
            elif r.status_code != 404:
                continue
            if held is not None and held[1] != self._last_session:
                if self._last_session is not None:
                    self.failovers += 1
                self._last_session = held[1]
                if self.first_leader_wall is None:
                    self.first_leader_wall = time.time()
            if held != self.current:
                self.changes.append((time.time(), held[0] if held else None))
            self.current = held
            self.sampled_at = sent


class Env:
    """What the fault injector acts on, and the run's bookkeeping."""

    shutdown_grace_s = SHUTDOWN_GRACE_S
    visibility_s = VISIBILITY_S

    def __init__(self, workdir: Path, dev: bool, consul: Any, redis_server: ChaosRedis,
                 cluster: Cluster, monitor: LeaderMonitor, watch: ProcWatch) -> None:
        self.dir = workdir
        self.dev = dev
        self.consul = consul if dev else None
        self.consul_addr = consul.address
        self.redis = redis_server
        self.cluster = cluster
        self.agents: dict[str, AgentProcess] = cluster.agents
        self.monitor = monitor
        self.procwatch = watch
        self.violations: list[tuple[str, str]] = []
        self.marks: dict[str, list[tuple[float, str]]] = {}
        self.orphans = 0

    def violation(self, kind: str, text: str) -> None:
        self.violations.append((kind, text))
        log(f"VIOLATION {kind}: {text}")

    def mark(self, node: str, kind: str) -> None:
        self.marks.setdefault(node, []).append((time.time(), kind))

    def leader(self) -> tuple[str, str] | None:
        return self.monitor.current

    def wait_leader(self, timeout: float, exclude_session: str | None = None
                    ) -> tuple[str, str] | None:
        asked = time.monotonic()
        deadline = asked + timeout
        while time.monotonic() < deadline:
            held = self.monitor.current
            if (self.monitor.sampled_at > asked and held is not None
                    and held[1] != exclude_session):
                return held
            time.sleep(0.05)
        return None

    def check_dead(self, pids: set[int], text: str) -> None:
        """Processes that must be gone (a killed agent's warm Python processes)."""
        if pids:
            self.orphans += len(pids)
            self.violation("orphans", f"{text}: pids {sorted(pids)}")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def check_no_jobs(self, node: str, text: str) -> None:
        alive = self.procwatch.alive(node)
        if alive:
            self.orphans += len(alive)
            self.violation("orphans", f"{text}: {[(e.run_id, e.pgid) for e in alive]}")

    def set_maintenance(self, node: str, enable: bool) -> None:
        flag = "true" if enable else "false"
        if self.consul is not None:
            url = (f"http://{self.consul.agent_address(node)}/v1/agent/maintenance"
                   f"?enable={flag}&reason=chaos")
        else:  # a real agent is shared by all nodes: service maintenance (= `cronsul drain`)
            url = (f"http://{self.consul_addr}/v1/agent/service/maintenance/cronsul-{node}"
                   f"?enable={flag}&reason=chaos")
        for _ in range(10):
            try:
                if requests.put(url, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        log(f"warning: could not set maintenance={flag} on {node}")

    def ensure_all_running(self) -> None:
        for node, agent in self.agents.items():
            if not agent.alive():
                code = agent.proc.returncode if agent.proc is not None else None
                self.violation("agent_exit", f"agent {node} exited on its own (code {code}); "
                               "restarting it")
                agent.start()


def _dump_logs(env: Env, lines: int = 40) -> None:
    for node, agent in env.agents.items():
        if agent.log.exists():
            tail = agent.log.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {node} log tail ({agent.log}) ---", flush=True)
            print("\n".join(tail), flush=True)


def main() -> int:
    minutes = float(os.environ.get("CHAOS_MINUTES", "10"))
    seed_text = os.environ.get("CHAOS_SEED", "")
    seed = int(seed_text) if seed_text else random.SystemRandom().randint(1, 999_999)
    real = os.environ.get("CONSUL_HTTP_ADDR", "")
    dev = not real
    keep = bool(os.environ.get("CHAOS_KEEP")) or bool(os.environ.get("CHAOS_DIR"))
    workdir = Path(os.environ.get("CHAOS_DIR") or tempfile.mkdtemp(prefix="cronsul-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    marker = f"cronsul-chaos-{seed}-{uuid.uuid4().hex[:8]}"
    prefix = "cronsul" if dev else f"cronsul-chaos-{seed}-{uuid.uuid4().hex[:6]}"
    total_s = minutes * 60
    phase_s = max(20.0, total_s - SETTLE_S - WARMUP_S)
    only, skip = os.environ.get("CHAOS_FAULTS", ""), os.environ.get("CHAOS_SKIP", "")
    backend = os.environ.get("CHAOS_BACKEND", "redis")
    if backend not in ("redis", "sqs"):
        log(f"CHAOS_BACKEND must be redis or sqs, not {backend!r}")
        return 2
    kinds = select_kinds(dev, only, skip)
    faults = plan(seed, phase_s, kinds, SESSION_TTL_S)

    log(f"seed={seed} minutes={minutes:g} backend={backend} dir={workdir} marker={marker} "
        f"code={_describe()}")
    knobs = "".join(f" {k}={v}" for k, v in (("CHAOS_FAULTS", only), ("CHAOS_SKIP", skip),
                                               ("CHAOS_BACKEND", backend != "redis" and backend))
                    if v)
    log(f"replay: CHAOS_SEED={seed} CHAOS_MINUTES={minutes:g}{knobs} make chaos")
    log(f"fault kinds: {', '.join(kinds) or 'none'}")
    if not dev:
        log(f"real Consul at {real}: skipping dev-server-only faults {sorted(DEV_ONLY)}; "
            f"leader key {prefix}/leader; maintenance = service maintenance")
    log("fault plan (run in this order until the fault phase of "
        f"{phase_s:.0f} s is used up):")
    for f in faults:
        log(f"  plan {f.describe()}")

    jobs = workload()
    outdir = workdir / "out"
    outdir.mkdir(exist_ok=True)
    redis_server = ChaosRedis(workdir / "redis", appendonly=True).start()
    consul: Any
    if dev:
        from devconsul.testing import DevConsul
        consul = DevConsul(data_dir=workdir / "consul")
    else:
        consul = RealConsul(real)
    moto: MotoServer | None = None
    queue_cfg: dict[str, dict[str, Any]] = {}
    if backend == "sqs":
        os.environ.update(AWS_TEST_ENV)  # boto3's standard chain, in the agents too
        moto = MotoServer(workdir / "moto.log").start()
        try:
            queue_url = _sqs_queue(moto.url, f"chaos-{seed}-default")
        except Exception:
            moto.stop()
            redis_server.stop()
            raise
        queue_cfg = {"queue": {"backend": "sqs", "sqs": {
            "region": AWS_TEST_ENV["AWS_DEFAULT_REGION"], "endpoint_url": moto.url,
            "queues": {"default": queue_url}}}}
    watch = ProcWatch(marker, frozenset(j.name for j in jobs if j.overlap == "skip")).start()
    cluster = Cluster(workdir, consul, redis_server.url, NODES,
                      jobs_config(jobs, outdir, marker),
                      consul_extra={**CONSUL_CFG, "prefix": prefix}, worker_extra=WORKER_CFG,
                      extra_sections=queue_cfg)
    code = snapshot_code(workdir)
    for node, agent in list(cluster.agents.items()):
        cluster.agents[node] = SnapshotAgent(node, agent.config, agent.log, code)
    monitor = LeaderMonitor(f"http://{consul.address}", f"{prefix}/leader").start()
    env = Env(workdir, dev, consul, redis_server, cluster, monitor, watch)
    done: list[Fault] = []
    failover_times: list[float] = []
    ok = False
    try:
        cluster.start()
        if env.wait_leader(60) is None:
            env.violation("no_leader", "no leader 60 s after start")
            raise SystemExit(_finish(env, seed, done, None, 0.0, keep=True, workdir=workdir))
        assert monitor.first_leader_wall is not None
        window_from = monitor.first_leader_wall + WINDOW_START_SLACK_S
        log(f"first leader {env.leader()} at {time.strftime('%H:%M:%S')}")
        time.sleep(WARMUP_S)

        injector = Injector(env)
        started = time.monotonic()
        for f in faults:
            spent = time.monotonic() - started
            if spent + f.gap_s + ESTIMATE[f.kind] + f.hold_s > phase_s:
                break
            time.sleep(f.gap_s)
            t = time.monotonic()
            injector.run(f)
            f.result["took_s"] = round(time.monotonic() - t, 1)
            if f.result.get("failover_s") is not None:
                failover_times.append(float(f.result["failover_s"]))
            done.append(f)
            log(f"t=+{time.monotonic() - started:5.1f}s fault {f.describe()} -> "
                f"{json.dumps(f.result, sort_keys=True)}")
            env.ensure_all_running()
        (workdir / "marks.json").write_text(json.dumps(env.marks))  # signal times per node
        with open(workdir / "faults.jsonl", "w") as fh:
            for f in done:
                fh.write(json.dumps({"n": f.n, "kind": f.kind, "plan": f.describe(),
                                     **f.result}) + "\n")

        # -- settle: everything healed, no faults, the window closes ------------------------
        env.ensure_all_running()
        if env.wait_leader(90) is None:
            env.violation("no_leader", "no leader 90 s after the last fault")
        time.sleep(SETTLE_S)
        window_to = time.time() - 1.0
        log(f"window {time.strftime('%H:%M:%S', time.gmtime(window_from))}.."
            f"{time.strftime('%H:%M:%S', time.gmtime(window_to))} UTC "
            f"({window_to - window_from:.0f} s); draining")
        records, leases = _drain(env, jobs, window_from, window_to)

        # -- stop every agent; nothing of theirs may survive -------------------------------
        for agent in env.agents.values():
            if agent.alive():
                agent.signal(signal.SIGCONT)
                agent.signal(signal.SIGTERM)
        for node, agent in env.agents.items():
            try:
                code = agent.wait(SHUTDOWN_GRACE_S + 25)
            except subprocess.TimeoutExpired:
                env.violation("agent_exit", f"agent {node} did not exit after SIGTERM "
                              f"(its threads' stacks are at the end of {node}.log)")
                agent.signal(signal.SIGUSR1)  # faulthandler: every thread's stack to its log
                time.sleep(1.0)
                agent.signal(signal.SIGKILL)
                agent.wait(10)
                continue
            if code != 0:
                env.violation("agent_exit", f"agent {node} exited {code} after SIGTERM")
        time.sleep(2.0)  # the watchdogs kill what is left when their agent's pipe closes
        left = watch.alive()
        if left:
            env.orphans += len(left)
            env.violation("orphans", f"job processes alive after every agent stopped: "
                          f"{[(e.run_id, e.node, e.pgid) for e in left]}")
            watch.kill_all()
        report = checks.check(jobs, outdir, [a.log for a in env.agents.values()], records,
                              leases, (window_from, window_to), env.marks, watch)
        lag = checks.max_tick_lag([a.log for a in env.agents.values()], window_from, window_to)
        log(f"leader key changed hands within {max(failover_times, default=0.0):.1f} s of a "
            f"fault at worst; longest wait of a tick for its enqueue: {lag:.1f} s")
        max_failover = max(lag, *failover_times) if failover_times else lag
        code = _finish(env, seed, done, report, max_failover, keep=keep, workdir=workdir)
        ok = code == 0
        return code
    finally:
        monitor.stop()
        watch.stop()
        for agent in env.agents.values():
            if agent.alive():
                agent.signal(signal.SIGCONT)
                agent.signal(signal.SIGKILL)
                agent.wait(10)
        watch.kill_all()
        if dev:
            consul.close()
        redis_server.stop()
        if moto is not None:
            moto.stop()
        if ok and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not ok:
            log(f"kept {workdir} (agent logs n*.log, job output out/, faults.jsonl)")


def _sqs_queue(endpoint: str, name: str) -> str:
    """A standard queue (at-least-once, no deduplication: the harder case) on moto; its URL."""
    import boto3

    sqs = boto3.client("sqs", region_name=AWS_TEST_ENV["AWS_DEFAULT_REGION"],
                       endpoint_url=endpoint)
    return str(sqs.create_queue(QueueName=name)["QueueUrl"])


def _describe() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, text=True,
                             capture_output=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _drain(env: Env, jobs: list[Any], window_from: float, window_to: float
           ) -> tuple[dict[str, dict[str, str]], set[str]]:
    """Wait (bounded) until every run scheduled in the window has settled; return the records
    and the live leases, read while the agents still run."""
    client = env.redis.client()
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    expected = {r for j in jobs for t in j.ticks(window_from, window_to) for r in j.run_ids(t)}
    while True:
        try:
            records = checks.load_records(client, KEY_PREFIX)
            running = [r for r, rec in records.items() if rec.get("state") == "running"]
            leases = checks.live_leases(client, KEY_PREFIX, running)
        except Exception as exc:  # a redis hiccup: try again until the deadline
            log(f"drain: redis error {exc}")
            time.sleep(1)
            continue
        pending = checks.unsettled(records, leases, window_to)
        unrecorded = len(expected - records.keys())
        if (not pending and not unrecorded) or time.monotonic() > deadline:
            if pending or unrecorded:
                log(f"drain: gave up after {DRAIN_TIMEOUT_S:.0f} s with {len(pending)} "
                    f"unsettled and {unrecorded} never enqueued (missed ticks are logged)")
            client.close()
            return records, leases
        time.sleep(2)


def _finish(env: Env, seed: int, done: list[Fault], report: checks.Report | None,
            max_failover: float, keep: bool, workdir: Path) -> int:
    other = [v for v in env.violations if v[0] != "orphans"]
    if report is not None:
        for kind in ("duplicates", "overlaps", "lost", "param_mismatch", "bad_line",
                     "missed_log", "reexecuted_after_crash"):
            items = report.details.get(kind, [])
            for text in items[:15]:
                log(f"{kind}: {text}")
            if len(items) > 15:
                log(f"{kind}: ... {len(items) - 15} more")
        log(f"detail: runs_expected={report.ticks} missed_logged={report.missed} "
            f"skipped_by_policy={report.skipped} "
            f"executions={report.executions} records={report.records} "
            f"redelivered={report.redelivered} "
            f"reexecuted_after_crash={report.reexecuted_after_crash} "
            f"timeouts={report.timeouts} leader_changes_seen={env.monitor.failovers}")
    for kind, text in other:
        log(f"violation {kind}: {text}")
    r = report or checks.Report()
    failed = bool(other or env.orphans or r.duplicates or r.lost or r.overlaps
                  or r.details.get("param_mismatch") or r.details.get("bad_line"))
    if failed:
        _dump_logs(env)
        log(f"FAILED: replay with CHAOS_SEED={seed}; faults run: "
            + "; ".join(f"{f.describe()} {json.dumps(f.result, sort_keys=True)}" for f in done))
    print(f"chaos: seed={seed} faults={len(done)} failovers={env.monitor.failovers} "
          f"ticks={r.ticks} duplicates={r.duplicates} lost={r.lost} overlaps={r.overlaps} "
          f"orphans={env.orphans} max_failover_s={max_failover:.1f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
