"""A fan-out's jitter with real agents: each parameter set of a tick starts at its own offset
in [tick, tick + jitter), once, on whichever node is free when it is due."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
import redis
from cronsul_testing import Cluster, RedisServer, wait_until

from devconsul.testing import DevConsul
from scheduler.runs import Run
from worker.cli import main
from worker.keys import Keys

KEYS = Keys("cronsul")
TENANTS = [f"t{i}" for i in range(8)]
SPREAD_S = 6
# A delayed run is promoted by the next of any node's promote passes (every 0.5 s), then
# fetched and started: generous on a loaded 2-core machine.
PROMOTED_WITHIN_S = 2.5


def starts_by_tick(log: Path) -> dict[str, dict[str, float]]:
    """tick -> tenant -> when its process started (epoch s), from the job's own lines."""
    by_tick: dict[str, dict[str, float]] = {}
    for line in log.read_text().splitlines():
        tenant, tick, at = line.split()
        assert tenant not in by_tick.setdefault(tick, {}), f"{tenant} ran twice for {tick}"
        by_tick[tick][tenant] = float(at)
    return by_tick


def test_a_fan_out_with_jitter_starts_each_parameter_set_at_its_own_offset(
        tmp_path: Path, devconsul: DevConsul, redis_proc: RedisServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    r: redis.Redis = redis_proc.client()
    r.flushdb()
    log = tmp_path / "starts.log"
    log.touch()
    jobs = {"per-tenant": {
        "schedule": "*/15 * * * * *", "jitter": f"{SPREAD_S}s", "timeout": "10s",
        "params": [{"tenant": t} for t in TENANTS], "shell": True,
        "command": f'echo "$CRONSUL_PARAM_TENANT $CRONSUL_SCHEDULED_AT $(date +%s.%N)" >> {log}'}}
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1", "n2"], jobs)
    cluster.start()
    try:
        cluster.wait_leader(30)
        whole = wait_until(lambda: [(t, s) for t, s in starts_by_tick(log).items()
                                    if len(s) == len(TENANTS)], 60,
                           what="every tenant of one tick to start")
        tick_iso, starts = whole[0]
        tick = datetime.fromisoformat(tick_iso.replace("Z", "+00:00"))
        offsets: list[float] = []
        for tenant, started in starts.items():
            run_id = Run.for_tick("per-tenant", tick, {"tenant": tenant}).run_id
            record = {k.decode(): v.decode() for k, v in r.hgetall(KEYS.run(run_id)).items()}
            planned = int(record["not_before_ms"]) / 1000 - tick.timestamp()
            assert 0 <= planned < SPREAD_S
            # Not before its offset (clock reads differ by a few ms), promptly after it.
            assert planned - 0.05 <= started - tick.timestamp() <= planned + PROMOTED_WITHIN_S
            assert record["state"] == "succeeded" and record["attempt"] == "1"
            offsets.append(planned)
        assert max(offsets) - min(offsets) > 1  # spread over the window, not one instant
        capsys.readouterr()
        assert main(["next", "per-tenant", "-n", "1", "-c", str(cluster.agents["n1"].config)]) == 0
        assert "each of its 8 parameter sets starts at its own offset in [0, 6s)" \
            in capsys.readouterr().out
    finally:
        cluster.stop()
