"""`make demo`: a local three-node cronsul cluster, a live failover, and the proof of no lost tick.

Starts redis-server and Consul (a real `consul agent -dev` when `consul` is on PATH, otherwise
cronsul's Consul dev server), three agents on loopback running a job every second, prints the
leader and the runs as they happen, kills the leader with SIGKILL, shows the takeover, checks
that every scheduled second ran exactly once, and stops everything it started.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
RUN_BEFORE_KILL_S = 12
RUN_AFTER_KILL_S = 15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(text: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.consul_addrs: dict[str, str] = {}
        self.dashboards: dict[str, str] = {}  # node -> its dashboard URL ([http] listen)
        self.devconsul = None
        self.out = workdir / "ticks.log"
        self.out.touch()
        self._seen = 0

    def start_redis(self) -> str:
        port = free_port()
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (make demo installs it with apt-get)")
        self.procs.append(subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", str(self.dir)], stdout=subprocess.DEVNULL))
        import redis

        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.RedisError:
                time.sleep(0.05)
        say(f"redis-server on 127.0.0.1:{port}")
        return f"redis://127.0.0.1:{port}/0"

    def start_consul(self, nodes: list[str]) -> str:
        consul = shutil.which("consul")
        if consul:
            port = free_port()
            self.procs.append(subprocess.Popen(
                [consul, "agent", "-dev", f"-http-port={port}", "-log-level=warn"],
                stdout=subprocess.DEVNULL))
            address = f"127.0.0.1:{port}"
            for _ in range(200):
                try:
                    if requests.get(f"http://{address}/v1/status/leader", timeout=1).json():
                        break
                except (requests.RequestException, ValueError):
                    pass
                time.sleep(0.1)
            self.consul_addrs = {n: address for n in nodes}
            say(f"real Consul agent (-dev) on {address}")
            return address
        from devconsul.testing import DevConsul

        self.devconsul = DevConsul(data_dir=self.dir / "consul")
        self.consul_addrs = {n: self.devconsul.add_agent(n) for n in nodes}
        say(f"no consul binary: cronsul's Consul dev server on {self.devconsul.address} "
            f"(one simulated Consul agent per node: {self.consul_addrs})")
        return str(self.devconsul.address)

    def start_agent(self, node: str, redis_url: str) -> None:
        cfg = self.dir / f"{node}.toml"
        http_port = free_port()
        self.dashboards[node] = f"http://127.0.0.1:{http_port}/"
        cfg.write_text(f"""
[agent]
node = "{node}"
address = "127.0.0.1"

[consul]
address = "{self.consul_addrs[node]}"
session_ttl = "10s"
check_ttl = "2s"
lock_delay = "2s"

[redis]
url = "{redis_url}"

[worker]
concurrency = 4
visibility_timeout = "5s"

[http]
listen = "127.0.0.1:{http_port}"

[jobs.every-second]
schedule = "* * * * * *"
command = ["/bin/sh", "-c", "echo \\"$CRONSUL_SCHEDULED_AT $CRONSUL_NODE\\" >> {self.out}"]
timeout = "10s"
allow_root = true  # the demo may run as root; real jobs should set user = "..."
""")
        log = open(self.dir / f"{node}.log", "ab")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.agents[node] = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "agent", "-c", str(cfg)],
            stdout=log, stderr=subprocess.STDOUT, env=env)

    def leader(self, consul: str) -> str | None:
        try:
            r = requests.get(f"http://{consul}/v1/kv/cronsul/leader", timeout=2)
            entry = r.json()[0] if r.status_code == 200 else None
        except (requests.RequestException, ValueError):
            return None
        if not entry or not entry.get("Session") or not entry.get("Value"):
            return None
        node: str = json.loads(base64.b64decode(entry["Value"]))["node"]
        return node

    def show_runs(self) -> None:
        lines = self.out.read_text().splitlines()
        for line in lines[self._seen:]:
            stamp, node = line.split()
            say(f"  ran tick {stamp} on {node}")
        self._seen = len(lines)

    def watch(self, seconds: float, consul: str) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.show_runs()
            time.sleep(0.5)

    def stop(self) -> None:
        for p in self.agents.values():
            if p.poll() is None:
                p.terminate()
        for p in self.agents.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        for p in self.procs:
            p.terminate()
            p.wait(10)
        if self.devconsul is not None:
            self.devconsul.close()


def verify(out: Path) -> int:
    counts: Counter[datetime] = Counter()
    for line in out.read_text().splitlines():
        stamp, _ = line.split()
        counts[datetime.fromisoformat(stamp.replace("Z", "+00:00"))] += 1
    first, last = min(counts), max(counts)
    span = int((last - first).total_seconds()) + 1
    expected = {first + timedelta(seconds=i) for i in range(span)}
    doubled = sorted(t for t, n in counts.items() if n > 1)
    missing = sorted(expected - set(counts))
    say(f"verdict: {span} scheduled seconds from {first:%H:%M:%S} to {last:%H:%M:%S}: "
        f"{len(counts)} ran, {len(missing)} lost, {len(doubled)} doubled")
    return 0 if not missing and not doubled else 1


def main() -> int:
    nodes = ["n1", "n2", "n3"]
    with tempfile.TemporaryDirectory(prefix="cronsul-demo-") as d:
        demo = Demo(Path(d))
        try:
            redis_url = demo.start_redis()
            consul = demo.start_consul(nodes)
            for n in nodes:
                demo.start_agent(n, redis_url)
            say("three agents started; waiting for an election")
            for n, url in demo.dashboards.items():
                say(f"dashboard of {n}: {url}")
            leader = None
            while leader is None:
                time.sleep(0.1)
                leader = demo.leader(consul)
            say(f"LEADER: {leader}   (see it yourself: curl -s "
                f"http://{consul}/v1/kv/cronsul/leader?raw, or consul kv get cronsul/leader)")
            watch_on = next(n for n in nodes if n != leader)
            say(f"watch the failover live on a node that survives it: {demo.dashboards[watch_on]}"
                f" (the leader is killed in {RUN_BEFORE_KILL_S}s)")
            demo.watch(RUN_BEFORE_KILL_S, consul)
            say(f"kill -9 the leader {leader} (pid {demo.agents[leader].pid})")
            killed = time.monotonic()
            demo.agents[leader].kill()
            new = None
            while new is None or new == leader:
                demo.show_runs()
                time.sleep(0.05)
                new = demo.leader(consul)
            say(f"NEW LEADER: {new}, {time.monotonic() - killed:.1f}s after the kill "
                "(check TTL 2s + lock-delay 2s); it now enqueues the ticks the dead one missed")
            demo.watch(RUN_AFTER_KILL_S, consul)
            demo.show_runs()
            return verify(demo.out)
        finally:
            say("stopping everything the demo started")
            demo.stop()


if __name__ == "__main__":
    sys.exit(main())
