"""Keeps `make bench` alive: its smoke mode (cronsul measures only, tiny sizes) runs and yields
numbers. It asserts nothing about the figures themselves: that is what `make bench` is for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cronsul_testing import REPO, require_binary


@pytest.mark.slow
def test_bench_smoke_mode_runs_and_produces_numbers(tmp_path: Path) -> None:
    require_binary("redis-server")
    out = tmp_path / "smoke.json"
    env = dict(os.environ, BENCH_SMOKE="1", BENCH_PEERS="none", BENCH_OUT=str(out),
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "bench.run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["smoke"] is True
    assert r["forkexec"]["posix_spawn"]["per_s"] > 0
    assert r["fanout"]["apply_median_s"] > 0
    assert r["noop_cronsul"]["per_s"] > 0 and r["noop_cronsul"]["succeeded"] > 0
    assert all(v["per_s"] > 0 for v in r["shell_cronsul"].values())
    assert r["latency_cronsul"]["claimed"]["p50_ms"] is not None
    assert r["latency_cronsul_callable"]["process_start"]["n"] == r["sizes"]["latency_n"]
    assert r["tick_lag"]["visible"]["p99_ms"] is not None
    assert r["failover"]["sigterm"]["n"] == 1 and r["failover"]["sigkill"]["n"] == 1
    assert len(r["failover"]["footprint"]["agents"]) == 3
    assert "| measure |" in proc.stdout
