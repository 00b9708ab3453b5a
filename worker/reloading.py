"""What a reload (SIGHUP) applies: the jobs and the settings read per run or per pass; the
settings the running agent was built with (its node name, Consul session, Redis connection,
HTTP server, queues, leases, warm pool) stay as they are until it restarts, and the agent says
which ones changed. Applying those half-way is worse than not at all: a review renamed a node by
reload and got /healthz answering with the new name while the session and the service kept the
old one, and an HTTP server still on the old port."""

from __future__ import annotations

import dataclasses

from worker.config import Config

# Settings the agent reads once, at start, besides the whole [consul], [redis], [http] and
# [queue] sections.
RESTART_ONLY_WORKER = ("visibility_timeout", "queues", "history_retention", "python_workers",
                       "python_prefetch", "python_max_memory_mb")
RESTART_ONLY_AGENT = ("node", "address")


def settle_reload(running: Config, loaded: Config) -> tuple[Config, list[str]]:
    """The config to run with after a reload, and the changed settings that need a restart
    (they keep their running values meanwhile)."""
    changed: list[str] = []
    for key in RESTART_ONLY_AGENT:
        if getattr(running.agent, key) != getattr(loaded.agent, key):
            changed.append(f"[agent] {key}")
    for name in ("consul", "redis", "queue"):
        if getattr(running, name) != getattr(loaded, name):
            changed.append(f"[{name}]")
    if running.http.listen != loaded.http.listen:
        changed.append("[http] listen")
    for key in RESTART_ONLY_WORKER:
        if getattr(running.worker, key) != getattr(loaded.worker, key):
            changed.append(f"[worker] {key}")
    if (_pool_size(running) != _pool_size(loaded)
            and running.worker.python_workers == loaded.worker.python_workers):
        # The pool keeps the size it started with (python_workers itself is named above).
        changed.append("[worker] concurrency (for the warm pool's size; the run slots apply)")
    worker = dataclasses.replace(
        loaded.worker, **{k: getattr(running.worker, k) for k in RESTART_ONLY_WORKER})
    agent = dataclasses.replace(
        loaded.agent, **{k: getattr(running.agent, k) for k in RESTART_ONLY_AGENT})
    # The server keeps its address; a new admin token (rotated after a leak) applies at once.
    http = dataclasses.replace(running.http, admin_token_file=loaded.http.admin_token_file,
                               admin_token=loaded.http.admin_token)
    settled = dataclasses.replace(loaded, agent=agent, worker=worker, consul=running.consul,
                                  redis=running.redis, http=http, queue=running.queue)
    return settled, changed


def _pool_size(cfg: Config) -> int:
    w = cfg.worker
    return min(w.python_workers or w.concurrency, w.concurrency)
