"""`make bench`: every measure, cronsul and its peers, in one run on one redis-server.

    python -m bench.run            # full run (~15 min on 2 cores): table, results JSON, docs
    BENCH_SMOKE=1 python -m bench.run   # seconds: small sizes, cronsul only, docs untouched

Sizes (env): BENCH_NOOP_N 10000, BENCH_SHELL_N 2000, BENCH_LATENCY_N 1000, BENCH_TICK_JOBS 1000,
BENCH_TICK_S 30, BENCH_FANOUT_N 10000, BENCH_FAILOVER_TRIALS 20, BENCH_FOOTPRINT_S 30,
BENCH_FORK_S 5, BENCH_NOOP_ROUNDS 3 (no-op drain rounds, cronsul and every peer back to back
in each; medians reported; 0 in smoke mode), BENCH_CONCURRENCY "8,16,32" (cronsul [worker]
concurrency values tried for shell jobs), BENCH_NOOP_CONFIGS "8:0,64:4,64:1:32,128:2:32"
(concurrency:python_workers[:python_prefetch] for the no-op drain).
BENCH_PEERS: comma list or "none" (default: all six; none in smoke mode).
BENCH_OUT: results file (default bench/results/<date>.json; a temp file in smoke mode).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import forkexec
from bench.common import REPO, env_float, env_int, loadavg, machine_facts, smoke_mode, summary_ms
from bench.cronsul_measures import (
    Ctx,
    failover_and_footprint,
    fanout,
    latency,
    noop_drain,
    shell_drain,
    tick_lag,
)
from bench.report import render_table, write_docs
from cronsul_testing import RedisServer

BENCH = REPO / "bench"
PEERS = ["huey", "rq", "celery", "dramatiq", "arq", "saq"]
PEER_VENV = {"arq": BENCH / ".venv-peers-arq"}
DEFAULT_VENV = BENCH / ".venv-peers"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_peer(peer: str, measure: str, n: int, ctx: Ctx) -> dict[str, Any]:
    python = PEER_VENV.get(peer, DEFAULT_VENV) / "bin" / "python"
    if not python.exists():
        return {"peer": peer, "ok": False, "error": f"{python} missing: run `make bench`"}
    ctx.client().flushall()
    workdir = ctx.workdir / "peers"
    proc = subprocess.run(
        [str(python), str(BENCH / "peers" / "driver.py"), peer, measure, str(n),
         "--redis", ctx.redis.url, "--workdir", str(workdir), "--timeout", "300"],
        capture_output=True, text=True, cwd=BENCH / "peers", timeout=900, check=False,
    )
    try:
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"peer": peer, "ok": False, "error": (proc.stderr or proc.stdout)[-1500:]}
    if "latencies_ms" in out:
        out["latency"] = summary_ms(out.pop("latencies_ms"))
    return out


def noop_rounds(ctx: Ctx, config: str, peers: list[str],
                sizes: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The no-op drain again, ``noop_rounds`` times, cronsul (its best configuration) and each
    peer back to back in every round: this machine's speed drifts by tens of percent over
    minutes, so systems measured minutes apart are not comparable. Each system's median round
    is its result."""
    c, w, f = noop_config(config)
    out: dict[str, list[dict[str, Any]]] = {"cronsul": [], **{p: [] for p in peers}}
    for i in range(sizes["noop_rounds"]):
        out["cronsul"].append(noop_drain(ctx, sizes["noop_n"], c, python_workers=w,
                                         python_prefetch=f))
        for peer in peers:
            out[peer].append(run_peer(peer, "noop", sizes["noop_n"], ctx))
        log(f"noop round {i + 1}: " + ", ".join(
            f"{k} {v[-1].get('per_s')}" for k, v in out.items()))
    return out


def noop_config(text: str) -> tuple[int, int, int]:
    """``"concurrency:python_workers[:python_prefetch]"`` (prefetch 0: cronsul's default)."""
    parts = [int(x) for x in text.split(":")]
    if len(parts) not in (2, 3):
        raise SystemExit(f"BENCH_NOOP_CONFIGS: {text!r} is not concurrency:workers[:prefetch]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else 0


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (a failed run counts as 0), with every round's rate."""
    ranked = sorted(runs, key=lambda v: v.get("per_s") or 0)
    median = dict(ranked[(len(ranked) - 1) // 2])
    median["rounds_per_s"] = [v.get("per_s") for v in runs]
    return median


def guarded(results: dict[str, Any], key: str, fn: Any, *args: Any) -> None:
    t0 = time.monotonic()
    try:
        results[key] = fn(*args)
    except Exception as exc:  # one broken measure must not lose the others
        traceback.print_exc()
        results[key] = {"error": f"{type(exc).__name__}: {exc}"}
    results.setdefault("durations_s", {})[key] = round(time.monotonic() - t0, 1)
    log(f"{key}: done in {results['durations_s'][key]} s")


def main() -> int:
    smoke = smoke_mode()
    sizes = {
        "noop_n": env_int("BENCH_NOOP_N", 10_000, 300),
        "shell_n": env_int("BENCH_SHELL_N", 2_000, 200),
        "latency_n": env_int("BENCH_LATENCY_N", 1_000, 50),
        "tick_jobs": env_int("BENCH_TICK_JOBS", 1_000, 50),
        "tick_s": env_float("BENCH_TICK_S", 30, 4),
        "fanout_n": env_int("BENCH_FANOUT_N", 10_000, 1_000),
        "fanout_trials": env_int("BENCH_FANOUT_TRIALS", 3, 1),
        "failover_trials": env_int("BENCH_FAILOVER_TRIALS", 20, 1),
        "footprint_s": env_float("BENCH_FOOTPRINT_S", 30, 3),
        "fork_s": env_float("BENCH_FORK_S", 5, 1),
        "noop_rounds": env_int("BENCH_NOOP_ROUNDS", 3, 0),
    }
    conc = [int(x) for x in os.environ.get("BENCH_CONCURRENCY", "8" if smoke else "8,16,32")
            .split(",") if x]
    # cronsul no-op configurations tried, "concurrency:python_workers[:python_prefetch]"
    # (workers 0: one per run slot; prefetch absent: the default).
    noop_configs = [pair for pair in os.environ.get(
        "BENCH_NOOP_CONFIGS", "8:0" if smoke else "8:0,64:4,64:1:32,128:2:32").split(",") if pair]
    for pair in noop_configs:
        noop_config(pair)  # a typo fails now, not after the first measures
    peers_env = os.environ.get("BENCH_PEERS", "none" if smoke else ",".join(PEERS))
    peers = [] if peers_env == "none" else [p for p in peers_env.split(",") if p]
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "smoke": smoke,
        "command": "BENCH_SMOKE=1 python -m bench.run" if smoke else "make bench",
        "machine": machine_facts(), "sizes": sizes, "cronsul_concurrency_tried": conc,
        "cronsul_noop_configs_tried": noop_configs,
        "peers": {},
    }
    with tempfile.TemporaryDirectory(prefix="cronsul-bench-") as tmp:
        work = Path(tmp)
        server = RedisServer(work / "redis").start()
        ctx = Ctx(server, work)
        log(f"redis-server on {server.url}; peers: {peers or 'none'}")
        try:
            guarded(results, "forkexec", lambda: {
                m: forkexec.measure(m, sizes["fork_s"]) for m in ("subprocess", "posix_spawn")})
            guarded(results, "fanout", fanout, ctx, sizes["fanout_n"], sizes["fanout_trials"])
            guarded(results, "noop_cronsul_configs", lambda: {
                pair: noop_drain(ctx, sizes["noop_n"], c, python_workers=w, python_prefetch=f)
                for pair, (c, w, f) in ((p, noop_config(p)) for p in noop_configs)})
            tried = [(k, v) for k, v in results["noop_cronsul_configs"].items()
                     if isinstance(v, dict) and "per_s" in v]
            best = max(tried, key=lambda kv: kv[1]["per_s"], default=None)
            results["noop_cronsul"] = {"status": "failed: see noop_cronsul_configs"}
            if best is not None:
                results["noop_cronsul"] = best[1]
            if best is not None and sizes["noop_rounds"] > 0:
                guarded(results, "noop_rounds", noop_rounds, ctx, best[0], peers, sizes)
            guarded(results, "shell_cronsul",
                    lambda: {str(c): shell_drain(ctx, sizes["shell_n"], c) for c in conc})
            guarded(results, "latency_cronsul_callable", lambda: latency(
                ctx, sizes["latency_n"], kind="callable"))
            guarded(results, "latency_cronsul", latency, ctx, sizes["latency_n"])
            guarded(results, "tick_lag", tick_lag, ctx, sizes["tick_jobs"], sizes["tick_s"])
            guarded(results, "failover", failover_and_footprint, ctx,
                    sizes["failover_trials"], sizes["footprint_s"])
            rounds = results.get("noop_rounds") or {}
            if isinstance(rounds.get("cronsul"), list) and rounds["cronsul"]:
                results["noop_cronsul"] = _median_run(rounds["cronsul"])
            for peer in peers:
                p: dict[str, Any] = {}
                if isinstance(rounds.get(peer), list) and rounds[peer]:
                    p["noop"] = _median_run(rounds[peer])
                else:
                    guarded(p, "noop", run_peer, peer, "noop", sizes["noop_n"], ctx)
                for measure, n in (("shell", sizes["shell_n"]), ("latency", sizes["latency_n"])):
                    guarded(p, measure, run_peer, peer, measure, n, ctx)
                results["peers"][peer] = p
        finally:
            server.stop()
    results["total_s"] = round(time.monotonic() - started, 1)
    results["machine"]["loadavg_at_end"] = loadavg()
    table = render_table(results)
    print(table)
    out = os.environ.get("BENCH_OUT")
    if out:
        path = Path(out)
    elif smoke:
        path = Path(tempfile.gettempdir()) / "cronsul-bench-smoke.json"
    else:
        path = BENCH / "results" / f"{results['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    log(f"results: {path} (total {results['total_s']} s)")
    if not smoke and not os.environ.get("BENCH_NO_DOCS"):
        write_docs(REPO / "docs" / "benchmarks.md", results, table)
        log("docs/benchmarks.md results table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
