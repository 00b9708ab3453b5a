"""The seeded fault plan and the injector that carries it out against a live cluster.

``plan(seed, seconds, dev)`` is a pure function of its arguments: the same seed and length give
the same list of faults (kinds, order, pauses, hold times, node picks), which is printed before
the run so a failure can be replayed with CHAOS_SEED / CHAOS_MINUTES. Which node "the leader"
is gets resolved at run time (printed as each fault happens), so a replay repeats the schedule,
not every timing.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chaos.procwatch import living, pool_workers

if TYPE_CHECKING:
    from chaos.runner import Env

KINDS = (
    "leader_kill9",          # kill -9 the leader, restart it (systemd Restart=on-failure)
    "leader_term",           # SIGTERM the leader (clean step-down), restart it
    "leader_stop",           # SIGSTOP the leader past its session TTL, then SIGCONT (zombie)
    "follower_kill9",        # kill -9 a follower while it runs jobs, restart it
    "consul_cut",            # one node's Consul agent hangs or refuses; Redis still reachable
    "consul_restart_keep",   # restart the Consul dev server, state kept
    "consul_restart_lose",   # restart the Consul dev server, state lost
    "redis_restart",         # restart redis-server (AOF on, appendfsync everysec)
    "maintenance",           # Consul maintenance on a node, then off
)
DEV_ONLY = frozenset({"consul_cut", "consul_restart_keep", "consul_restart_lose"})

# Rough duration of each fault (seconds), only to size the plan.
ESTIMATE = {"leader_kill9": 8, "leader_term": 6, "leader_stop": 14, "follower_kill9": 5,
            "consul_cut": 10, "consul_restart_keep": 6, "consul_restart_lose": 16,
            "redis_restart": 4, "maintenance": 10}


@dataclass
class Fault:
    n: int
    kind: str
    gap_s: float  # quiet time before it
    hold_s: float = 0.0  # how long the fault lasts (cut, maintenance, stop past TTL, downtime)
    pick: float = 0.0  # which candidate node, as a fraction of the sorted candidate list
    leader: bool = False  # consul_cut / maintenance: aim at the leader rather than a follower
    mode: str = ""  # consul_cut: hang | refuse
    restart_after_s: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [f"#{self.n} {self.kind}", f"gap={self.gap_s:.1f}s"]
        if self.hold_s:
            parts.append(f"hold={self.hold_s:.1f}s")
        if self.kind in ("consul_cut", "maintenance"):
            parts.append("target=leader" if self.leader else f"target=follower[{self.pick:.2f}]")
        if self.kind == "follower_kill9":
            parts.append(f"target=follower[{self.pick:.2f}]")
        if self.mode:
            parts.append(f"mode={self.mode}")
        if self.restart_after_s:
            parts.append(f"restart_after={self.restart_after_s:.1f}s")
        return " ".join(parts)


def select_kinds(dev: bool, only: str = "", skip: str = "") -> list[str]:
    """The fault kinds in play: all (minus the dev-server-only ones against a real Consul),
    or the comma-separated ``only`` list, minus the ``skip`` list (CHAOS_FAULTS, CHAOS_SKIP)."""
    wanted = [k.strip() for k in only.split(",") if k.strip()] or list(KINDS)
    dropped = {k.strip() for k in skip.split(",") if k.strip()}
    unknown = sorted((set(wanted) | dropped) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown fault kind(s) {unknown}; known: {', '.join(KINDS)}")
    return [k for k in KINDS if k in wanted and k not in dropped and (dev or k not in DEV_ONLY)]


def plan(seed: int, seconds: float, kinds: list[str], session_ttl_s: float) -> list[Fault]:
    """Faults in random order (shuffled rounds, so every kind comes up early), enough to fill
    ``seconds`` with some to spare; the injector stops when the time is up."""
    rng = random.Random(seed)
    if not kinds:
        return []
    faults: list[Fault] = []
    total = 0.0
    while total < seconds * 1.5 + 60:
        round_ = list(kinds)
        rng.shuffle(round_)
        for kind in round_:
            f = Fault(len(faults) + 1, kind, gap_s=round(rng.uniform(1.0, 5.0), 1),
                      pick=round(rng.random(), 3))
            if kind == "leader_stop":
                f.hold_s = round(session_ttl_s + rng.uniform(1.0, 4.0), 1)
            elif kind == "consul_cut":
                f.hold_s = round(rng.uniform(4.0, 14.0), 1)
                f.mode = rng.choice(("hang", "refuse"))
                f.leader = rng.random() < 0.5
            elif kind == "maintenance":
                f.hold_s = round(rng.uniform(4.0, 12.0), 1)
                f.leader = rng.random() < 0.5
            elif kind == "redis_restart":
                f.hold_s = round(rng.uniform(0.0, 1.5), 1)
            elif kind in ("leader_kill9", "follower_kill9"):
                f.restart_after_s = round(rng.uniform(1.5, 4.0), 1)
            elif kind == "leader_term":
                f.restart_after_s = round(rng.uniform(0.5, 3.0), 1)
            faults.append(f)
            total += f.gap_s + ESTIMATE[kind] + f.hold_s
    return faults


class Injector:
    """Carries out one Fault at a time against the Env; records what happened in fault.result."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self._pools: dict[str, set[int]] = {}  # a killed agent's warm python processes

    def run(self, f: Fault) -> None:
        getattr(self, f.kind)(f)

    # -- helpers ----------------------------------------------------------------------------

    def _leader(self, f: Fault) -> tuple[str, str] | None:
        held = self.env.wait_leader(60)
        if held is None:
            self.env.violation("no_leader", f"no leader for 60 s before fault #{f.n}")
            f.result["skipped"] = "no leader"
        return held

    def _follower(self, f: Fault, leader: str | None, busy: bool = False) -> str | None:
        env = self.env
        nodes = sorted(n for n, a in env.agents.items() if a.alive() and n != leader)
        if not nodes:
            f.result["skipped"] = "no follower"
            return None
        if busy:  # "in the middle of runs": prefer a follower with jobs running right now
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                working = [n for n in nodes if env.procwatch.alive(n)]
                if working:
                    nodes = working
                    break
                time.sleep(0.1)
        return nodes[min(int(f.pick * len(nodes)), len(nodes) - 1)]

    def _failover(self, f: Fault, old_session: str, since: float, timeout: float) -> None:
        held = self.env.wait_leader(timeout, exclude_session=old_session)
        if held is None:
            f.result["failover_s"] = None
            self.env.violation("no_failover", f"fault #{f.n} {f.kind}: no new leader in "
                               f"{timeout:.0f} s")
            return
        f.result["new_leader"] = held[0]
        f.result["failover_s"] = round(time.monotonic() - since, 2)

    def _kill9_and_restart(self, f: Fault, node: str) -> float:
        env = self.env
        agent = env.agents[node]
        # Its warm Python processes, where callable runs execute (the marker cannot see them).
        self._pools[node] = pool_workers(agent.pid)
        f.result["warm_processes"] = len(self._pools[node])
        t = time.monotonic()
        env.mark(node, "kill9")
        agent.signal(signal.SIGKILL)
        agent.wait(10)
        return t

    def _restart(self, f: Fault, node: str, killed_at: float) -> None:
        env = self.env
        time.sleep(max(0.0, killed_at + f.restart_after_s - time.monotonic()))
        # The agent is gone: its watchdog must have killed its jobs (no orphan survives it),
        # and its warm Python processes with the callable runs inside them.
        text = (f"fault #{f.n} {f.kind}: jobs of dead agent {node} still alive "
                f"{time.monotonic() - killed_at:.1f} s after it died")
        env.check_no_jobs(node, text)
        env.check_dead(living(self._pools.pop(node, set())), f"{text} (warm python processes)")
        env.agents[node].start()

    # -- the faults -------------------------------------------------------------------------

    def leader_kill9(self, f: Fault) -> None:
        held = self._leader(f)
        if held is None:
            return
        node, session = held
        f.result["node"] = node
        t = self._kill9_and_restart(f, node)
        self._failover(f, session, t, 60)
        self._restart(f, node, t)

    def follower_kill9(self, f: Fault) -> None:
        held = self.env.leader()
        node = self._follower(f, held[0] if held else None, busy=True)
        if node is None:
            return
        f.result["node"] = node
        f.result["running_jobs"] = len(self.env.procwatch.alive(node))
        t = self._kill9_and_restart(f, node)
        self._restart(f, node, t)

    def leader_term(self, f: Fault) -> None:
        held = self._leader(f)
        if held is None:
            return
        node, session = held
        f.result["node"] = node
        agent = self.env.agents[node]
        t = time.monotonic()
        self.env.mark(node, "term")
        agent.signal(signal.SIGTERM)
        self._failover(f, session, t, 30)
        try:
            code = agent.wait(self.env.shutdown_grace_s + 20)
        except subprocess.TimeoutExpired:
            code = None
            agent.signal(signal.SIGKILL)
            agent.wait(10)
        f.result["exit_code"] = code
        if code != 0:
            self.env.violation("agent_exit", f"fault #{f.n}: {node} exited {code} after SIGTERM")
        time.sleep(f.restart_after_s)
        self.env.check_no_jobs(node, f"fault #{f.n} leader_term: jobs of stopped agent {node} "
                               "still alive")
        agent.start()

    def leader_stop(self, f: Fault) -> None:
        held = self._leader(f)
        if held is None:
            return
        node, session = held
        f.result["node"] = node
        agent = self.env.agents[node]
        t = time.monotonic()
        self.env.mark(node, "stop")
        agent.signal(signal.SIGSTOP)
        try:
            self._failover(f, session, t, 60)
            # The frozen agent's watchdog must have killed its jobs before their leases lapse
            # (visibility_timeout after the last renewal), so nobody runs them twice at once.
            time.sleep(max(0.0, t + self.env.visibility_s + 0.3 - time.monotonic()))
            self.env.check_no_jobs(node, f"fault #{f.n} leader_stop: jobs of frozen agent "
                                   f"{node} alive past the visibility timeout")
            time.sleep(max(0.0, t + f.hold_s - time.monotonic()))
        finally:
            agent.signal(signal.SIGCONT)
            self.env.mark(node, "cont")
        f.result["stopped_s"] = round(time.monotonic() - t, 1)

    def consul_cut(self, f: Fault) -> None:
        env = self.env
        assert env.consul is not None
        held = self._leader(f) if f.leader else env.leader()
        if f.leader and held is None:
            return
        node = held[0] if f.leader and held else self._follower(f, held[0] if held else None)
        if node is None:
            return
        f.result["node"] = node
        t = time.monotonic()
        env.consul.fault(node, f.mode)
        try:
            if f.leader and held is not None:
                self._failover(f, held[1], t, f.hold_s + 30)
            time.sleep(max(0.0, t + f.hold_s - time.monotonic()))
        finally:
            env.consul.fault(node, "ok")

    def _consul_restart(self, f: Fault, keep: bool) -> None:
        env = self.env
        assert env.consul is not None
        held = env.leader()
        t = time.monotonic()
        env.consul.restart(keep_state=keep)
        f.result["down_s"] = round(time.monotonic() - t, 2)
        after = env.wait_leader(90)
        if after is None:
            env.violation("no_leader", f"fault #{f.n} {f.kind}: no leader 90 s after restart")
            return
        f.result["new_leader"] = after[0]
        f.result["leader_back_s"] = round(time.monotonic() - t, 2)
        if held is None or after[1] != held[1]:
            f.result["failover_s"] = f.result["leader_back_s"]

    def consul_restart_keep(self, f: Fault) -> None:
        self._consul_restart(f, True)

    def consul_restart_lose(self, f: Fault) -> None:
        self._consul_restart(f, False)

    def redis_restart(self, f: Fault) -> None:
        env = self.env
        t = time.monotonic()
        env.redis.stop()  # SIGTERM: redis-server flushes and fsyncs the AOF on shutdown
        time.sleep(f.hold_s)
        env.redis.start()
        f.result["down_s"] = round(time.monotonic() - t, 2)

    def maintenance(self, f: Fault) -> None:
        env = self.env
        held = self._leader(f) if f.leader else env.leader()
        if f.leader and held is None:
            return
        node = held[0] if f.leader and held else self._follower(f, held[0] if held else None)
        if node is None:
            return
        f.result["node"] = node
        t = time.monotonic()
        env.set_maintenance(node, True)
        try:
            if f.leader and held is not None:
                # The agent may not react to maintenance yet: a change of leader is measured,
                # not required.
                after = env.wait_leader(f.hold_s, exclude_session=held[1])
                if after is not None:
                    f.result["new_leader"] = after[0]
                    f.result["failover_s"] = round(time.monotonic() - t, 2)
            time.sleep(max(0.0, t + f.hold_s - time.monotonic()))
        finally:
            env.set_maintenance(node, False)
