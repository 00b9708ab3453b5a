"""Turns a results dict into the figures table (printed, and written into docs/benchmarks.md)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"


def _f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def _err(d: dict[str, Any]) -> str | None:
    if "error" in d:
        return "error: " + str(d["error"]).strip().splitlines()[-1][:120]
    if d.get("ok") is False:
        return "did not finish"
    return None


def _rounds(v: dict[str, Any]) -> str:
    """", median of 3 rounds: a / b / c" when the result is a median of interleaved rounds."""
    rates = v.get("rounds_per_s")
    if not isinstance(rates, list) or len(rates) < 2:
        return ""
    return f", median of {len(rates)} rounds: " + " / ".join(_f(x) for x in rates)


def _pool(v: dict[str, Any]) -> str:
    """A no-op drain's configuration: concurrency, warm processes, prefetch if not default."""
    text = (f"concurrency {v['concurrency']}, python_workers "
            f"{v.get('python_workers', v['concurrency'])}")
    return text + (f", python_prefetch {v['python_prefetch']}" if "python_prefetch" in v else "")


def fork_limit(results: dict[str, Any]) -> tuple[float | None, float | None]:
    fe = results.get("forkexec", {})
    return (fe.get("posix_spawn", {}).get("per_s"), fe.get("subprocess", {}).get("per_s"))


def best_shell(results: dict[str, Any]) -> dict[str, Any] | None:
    runs = [v for v in results.get("shell_cronsul", {}).values()
            if isinstance(v, dict) and "per_s" in v]
    return max(runs, key=lambda v: v["per_s"], default=None)


def render_table(r: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = []
    peers = r.get("peers", {})
    s = r["sizes"]

    # 1. no-op drain
    noop = {p: v.get("noop", {}) for p, v in peers.items()}
    fastest = max((v.get("per_s") or 0 for v in noop.values()), default=0) or None
    m1 = f"no-op Python jobs drained/s ({s['noop_n']:,}, 2 worker processes)"
    c = r.get("noop_cronsul", {})
    rel = (f"{c['per_s'] / fastest:.2f}x fastest peer"
           if fastest and isinstance(c.get("per_s"), int | float) else "")
    label = f"cronsul (2 agents, {_pool(c)})" if "concurrency" in c else "cronsul"
    label += _rounds(c)
    rows.append((m1, label, c.get("status") or _f(c.get("per_s")), rel,
                 "≥ 1.5x fastest peer", "n/a" if "status" in c else
                 _met(bool(fastest) and c.get("per_s", 0) >= 1.5 * (fastest or 0))))
    for v in r.get("noop_cronsul_configs", {}).values():
        if isinstance(v, dict) and "per_s" in v and v is not c and v != c:
            rows.append((m1, f"cronsul configuration sweep ({_pool(v)})",
                         _f(v["per_s"]),
                         f"{v['per_s'] / fastest:.2f}x fastest peer" if fastest else "", "", ""))
    for p, v in sorted(noop.items(), key=lambda kv: -(kv[1].get("per_s") or 0)):
        ratio = f"{v['per_s'] / fastest:.2f}x fastest" if fastest and v.get("per_s") else ""
        rows.append((m1, p + _rounds(v), _err(v) or _f(v.get("per_s")), ratio, "", ""))

    # 2. /bin/true
    spawn, sub = fork_limit(r)
    m2 = f"`/bin/true` jobs/s ({s['shell_n']:,} jobs)"
    rows.append((m2, "machine limit: posix_spawn, 2 procs", _f(spawn), "100%", "", ""))
    rows.append((m2, "machine: subprocess.run, 2 procs", _f(sub),
                 f"{sub / spawn:.0%}" if sub and spawn else "", "", ""))
    b = best_shell(r)
    if b:
        pct = b["per_s"] / spawn if spawn else None
        rows.append((m2, f"cronsul (2 agents, concurrency {b['concurrency']})", _f(b["per_s"]),
                     f"{pct:.0%} of limit" if pct is not None else "", "≥ 80% of limit",
                     _met(None if pct is None else pct >= 0.8)))
        for k, v in r.get("shell_cronsul", {}).items():
            if isinstance(v, dict) and v is not b and "per_s" in v:
                rows.append((m2, f"cronsul (concurrency {k})", _f(v["per_s"]),
                             f"{v['per_s'] / spawn:.0%} of limit" if spawn else "", "", ""))
    else:
        rows.append((m2, "cronsul", _err(r.get("shell_cronsul", {})) or "n/a", "", "", ""))
    for p, v in sorted(peers.items()):
        sh = v.get("shell", {})
        pct = f"{sh['per_s'] / spawn:.0%} of limit" if spawn and sh.get("per_s") else ""
        rows.append((m2, p, _err(sh) or _f(sh.get("per_s")), pct, "", ""))

    # 3. latency
    m3 = f"enqueue-to-start latency p50 / p99 ms ({s['latency_n']:,} jobs, one per 10 ms)"
    peer_p99 = [v.get("latency", {}).get("latency", {}).get("p99_ms")
                for v in peers.values()]
    peer_p99 = [x for x in peer_p99 if x is not None]
    best = min(peer_p99, default=None)
    lc = r.get("latency_cronsul", {})
    lpy = r.get("latency_cronsul_callable", {})
    if "process_start" in lpy:
        ent = lpy["process_start"]
        rows.append((m3, "cronsul: callable entered in the warm pool (as the peers measure)",
                     f"{_f(ent['p50_ms'], 2)} / {_f(ent['p99_ms'], 2)}", "",
                     "p99 ≤ best peer's", _met(None if best is None else ent["p99_ms"] <= best)))
    else:
        rows.append((m3, "cronsul: callable", _err(lpy) or "n/a", "", "", ""))
    if "claimed" in lc:
        cl, ps = lc["claimed"], lc["process_start"]
        rows.append((m3, "cronsul: run claimed (record started_ms, ms resolution)",
                     f"{_f(cl['p50_ms'], 2)} / {_f(cl['p99_ms'], 2)}", "", "", ""))
        rows.append((m3, "cronsul: command process running (bash $EPOCHREALTIME)",
                     f"{_f(ps['p50_ms'], 2)} / {_f(ps['p99_ms'], 2)}", "", "", ""))
    else:
        rows.append((m3, "cronsul: command", _err(lc) or "n/a", "", "", ""))
    for p, v in sorted(peers.items()):
        lat = v.get("latency", {})
        L = lat.get("latency")
        rows.append((m3, p, _err(lat) or (f"{_f(L['p50_ms'], 2)} / {_f(L['p99_ms'], 2)}"
                                           if L else "n/a"),
                     "best p99" if L and L["p99_ms"] == best else "", "", ""))

    # 4. tick lag
    t = r.get("tick_lag", {})
    m4 = f"tick lag p50 / p99 ms ({s['tick_jobs']:,} jobs at 1 s, {s['tick_s']:g} s)"
    if "visible" in t:
        v, x = t["visible"], t["xadd"]
        rows.append((m4, "cronsul: tick -> readable by consumers",
                     f"{_f(v['p50_ms'])} / {_f(v['p99_ms'])}", f"{t['runs']:,} runs",
                     "p99 < 50 ms", _met(v["p99_ms"] is not None and v["p99_ms"] < 50)))
        rows.append((m4, "cronsul: tick -> XADD (stream id time)",
                     f"{_f(x['p50_ms'])} / {_f(x['p99_ms'])}", "", "", ""))
    else:
        rows.append((m4, "cronsul", _err(t) or "n/a", "", "p99 < 50 ms", "n/a"))

    # 5. fan-out
    fo = r.get("fanout", {})
    m5 = f"enqueue a {s['fanout_n']:,}-run fan-out from one tick, s"
    if "apply_median_s" in fo:
        rows.append((m5, "cronsul: RedisSink.apply (median)", _f(fo["apply_median_s"], 3),
                     f"+{_f(fo['build_runs_median_s'], 3)} s building the Runs", "< 1 s",
                     _met(fo["apply_median_s"] < 1)))
    else:
        rows.append((m5, "cronsul", _err(fo) or "n/a", "", "< 1 s", "n/a"))

    # 6. failover
    f = r.get("failover", {})
    bounds = (("sigterm", "≤ 2 s", 2.0),
              ("sigkill", "≤ check_ttl + lock_delay + 2 s = 6 s", 6.0))
    for name, target, bound in bounds:
        m6 = (f"time to a new leader after {name.upper()} of the leader, s "
              f"({s['failover_trials']} trials)")
        if name in f:
            rows.append((m6, "cronsul: p50 / max", f"{_f(f[name]['p50_s'], 2)} / "
                         f"{_f(f[name]['max_s'], 2)}", "check_ttl 2s, lock_delay 2s, TTL 10s",
                         target, _met(f[name]["max_s"] <= bound)))
        else:
            rows.append((m6, "cronsul", _err(f) or "n/a", "", target, "n/a"))

    # 7. footprint
    fp = f.get("footprint", {})
    m7 = f"idle agent: RSS MiB (agent + watchdog) / CPU % over {s['footprint_s']:g} s"
    for a in fp.get("agents", []):
        rows.append((m7, f"cronsul {a['role']} ({a['node']})",
                     f"{_f(a['rss_mib'])} / {_f(a['cpu_pct'], 2)}%",
                     f"agent alone {_f(a['agent_rss_mib'])} MiB", "", ""))

    head = ("measure", "system", "result", "relative", "target", "met")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_block(r: dict[str, Any], table: str) -> str:
    m = r["machine"]
    peer_lines = []
    for p, v in sorted(r.get("peers", {}).items()):
        meta = next((x for x in v.values() if isinstance(x, dict) and "version" in x), {})
        peer_lines.append(f"| {p} | {meta.get('version', 'n/a')} | {meta.get('config', 'n/a')} |")
    durations = ", ".join(f"{k} {v:g} s" for k, v in r.get("durations_s", {}).items())
    out = [
        START,
        f"Run: `{r['command']}` on {r['date']} (cronsul {m['cronsul_commit']}); "
        f"whole run {r['total_s']:g} s.",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['mem_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, {m['redis_server']} (one server for every measure, no "
        f"persistence, loopback). Load average at start / end: {m.get('loadavg_at_start')} / "
        f"{m.get('loadavg_at_end')} (2 cores: anything else running skews the figures).",
        "",
        table,
        "",
        "Peers (each in its own virtualenv under bench/, from PyPI):",
        "",
        "| peer | version | configuration |",
        "|---|---|---|",
        *peer_lines,
        "",
        f"Time per measure: {durations}.",
        "Raw figures (every trial, every percentile): "
        f"[bench/results/{r['date'][:10]}.json](../bench/results/{r['date'][:10]}.json).",
        END,
    ]
    return "\n".join(out)


def write_docs(path: Path, r: dict[str, Any], table: str) -> None:
    block = render_block(r, table)
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _m: block, text,
                      flags=re.S)
    else:
        text += "\n" + block + "\n"
    path.write_text(text)
