"""Plugging the dashboard into a running agent (called from worker/ops.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.dashboard.recorder import NodeProbe, Recorder, TermInfo

if TYPE_CHECKING:
    from worker.agent import Agent
    from worker.ops import Ops

# A wildcard listen address is no URL another node's browser can follow.
WILDCARDS = ("0.0.0.0", "::", "")


def dashboard_url(agent: Agent, port: int | None) -> str | None:
    http = agent.cfg.http
    if http.listen is None or port is None:
        return None
    host = agent.cfg.agent.address if http.host in WILDCARDS else http.host
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def recorder_for(agent: Agent, ops: Ops, port: int | None) -> Recorder:
    def term() -> TermInfo | None:
        t = agent.elector.term
        if t is None or not ops.is_leader():
            return None
        return TermInfo(t.session, t.since, t.index)

    def queues() -> list[str]:
        cfg = agent.cfg
        if cfg.queue.backend != "redis":
            return []  # SQS depth lives in SQS (its own metrics)
        return list(dict.fromkeys([*cfg.worker.queues, *(j.queue for j in cfg.jobs.values())]))

    probe = NodeProbe(
        node=agent.cfg.agent.node, url=dashboard_url(agent, port), term=term, role=ops.role,
        eligible=lambda: (agent.cfg.agent.leader_eligible and not agent.maintenance.active
                          and not agent.stop.is_set()),
        draining=lambda: agent.maintenance.reason, running=lambda: agent.consumer.running,
        queues=queues,
    )
    return Recorder(agent.redis, agent.cfg.redis.key_prefix, probe)
