"""Small helpers shared by the measures: percentiles, sizes from the environment, machine facts."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # cronsul_testing: RedisServer, Cluster, render_config
sys.path.insert(0, str(REPO))


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary_ms(values: Sequence[float]) -> dict[str, Any]:
    return {"n": len(values), "p50_ms": _r(percentile(values, 50)),
            "p99_ms": _r(percentile(values, 99)), "max_ms": _r(max(values, default=None))}


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def env_int(name: str, default: int, smoke: int) -> int:
    value = os.environ.get(name)
    if value:
        return int(value)
    return smoke if smoke_mode() else default


def env_float(name: str, default: float, smoke: float) -> float:
    value = os.environ.get(name)
    if value:
        return float(value)
    return smoke if smoke_mode() else default


def smoke_mode() -> bool:
    return os.environ.get("BENCH_SMOKE", "") not in ("", "0")


def machine_facts() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    redis_v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                             check=False).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis_server": redis_v.split(" sha=")[0],
        "cronsul_commit": os.environ.get("BENCH_COMMIT") or _git("rev-parse", "--short", "HEAD") + (
            "+uncommitted" if _git("status", "--porcelain", "--", "worker", "scheduler") else ""),
        "loadavg_at_start": loadavg(),
    }


def loadavg() -> str:
    """1/5/15-minute load: anything else running on the machine shows up here."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return out.stdout.strip()
