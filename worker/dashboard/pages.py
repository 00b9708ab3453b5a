"""The dashboard's pages. Each returns a ``Page``: the live part (re-rendered for every poll of
``/api/<path>``), the static part (forms with text inputs, which a refresh must not wipe), and
the data as JSON for the API."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from worker.dashboard.auth import Session
from worker.dashboard.charts import Point, line_chart
from worker.dashboard.markup import Safe, html, join, url
from worker.dashboard.reader import JOB_PAGE_RUNS, STRIP_RUNS, Reader, View, age
from worker.runstate import TERMINAL

EMPTY = Safe("")
HOUR_S = 3600.0
# Runs in flight are found on the queue streams, a few round trips per job; with more jobs than
# this the Jobs list shows finished runs only (a job's own page always shows both).
LIVE_LOOKUP_JOBS = 100


@dataclass(frozen=True)
class Viewer:
    node: str  # the node serving this dashboard
    actions: bool  # [http] admin_token_file is set
    session: Session | None
    csrf: str
    path: str

    @property
    def can_act(self) -> bool:
        return self.actions and self.session is not None


@dataclass
class Page:
    title: str
    live: Safe
    data: dict[str, Any]
    static: Safe = EMPTY
    final: bool = False  # nothing on it will change any more: stop polling
    crumbs: list[tuple[str, str]] = field(default_factory=list)


# -- building blocks ------------------------------------------------------------------------------

def form(v: Viewer, action: str, label: str, fields: Safe = EMPTY, cls: str = "",
         confirm: str = "") -> Safe:
    """A POST form for an action (rendered only for a logged-in admin)."""
    if not v.can_act:
        return EMPTY
    return html('<form method="post" action="{a}" class="act {cls}" data-confirm="{c}">'
                '<input type="hidden" name="csrf" value="{csrf}">'
                '<input type="hidden" name="next" value="{next}">{fields}'
                '<button type="submit">{label}</button></form>',
                a=action, cls=cls, c=confirm, csrf=v.csrf, next=v.path, fields=fields,
                label=label)


def state_badge(state: str | None) -> Safe:
    return html('<span class="badge st-{s}">{s}</span>', s=state or "unknown")


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f}s" if value >= 1000 else f"{value:.0f}ms"


def exit_text(v: View) -> str:
    text = "-" if v.get("exit_code") is None else str(v["exit_code"])
    if v.get("signal") is not None:
        text = f"signal {v['signal']}"
    return f"{text} (timeout)" if v.get("timed_out") else text


def run_link(run_id: str, text: str | None = None) -> Safe:
    return html('<a class="run" href="{h}">{t}</a>', h=url("runs", run_id), t=text or run_id)


def strip(runs: list[View]) -> Safe:
    """Oldest to newest, left to right: one coloured cell per run."""
    cells = [html('<a class="cell st-{s}" href="{h}" title="{t}"></a>', s=r["state"],
                  h=url("runs", r["run_id"]),
                  t=f"{r['run_id']}: {r['state']}, {ms(r.get('duration_ms'))}")
             for r in runs]
    return html('<div class="strip">{c}</div>', c=join(cells)) if cells else \
        Safe('<span class="muted">no runs yet</span>')


def duration_chart(finished: list[View]) -> Safe:
    points = []
    for r in finished:
        when = _epoch(r.get("finished_at"))
        if when is None or r.get("duration_ms") is None:
            continue
        points.append(Point(when, float(r["duration_ms"]), f"st-{r['state']}",
                            f"{r['run_id']}: {ms(r['duration_ms'])} ({r['state']})",
                            url("runs", r["run_id"])))
    points.sort(key=lambda p: p.x)
    span = (points[0].x, points[-1].x) if points else (0.0, 1.0)
    return line_chart(points, span, "duration per run", "ms", "run durations")


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def banner(reader: Reader) -> Safe:
    if reader.consul_error is None:
        return EMPTY
    return html('<p class="error">Consul did not answer ({e}); what it holds is missing '
                'below.</p>', e=reader.consul_error)


def table(headers: list[str], rows: list[Safe], cls: str = "") -> Safe:
    head = join(html("<th>{h}</th>", h=h) for h in headers)
    body = join(rows) if rows else html('<tr><td colspan="{n}" class="muted">none</td></tr>',
                                         n=len(headers))
    return html('<table class="{c}"><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>',
                c=cls, h=head, b=body)


# -- Cluster --------------------------------------------------------------------------------------

def cluster(reader: Reader, v: Viewer) -> Page:
    leader = reader.leader()
    schedule = reader.schedule()
    reference = schedule.get("config_hash") if isinstance(schedule.get("config_hash"), str) \
        else None
    nodes = reader.nodes(reference)
    elections = reader.elections()
    if leader:
        head = html('<p class="leader" id="leader">Leader: <strong>{n}</strong> since {s} '
                    '(<span class="ago">{a}</span>), fence {f}</p>',
                    n=leader.get("node"), s=leader.get("since") or "?",
                    a=age(leader.get("since")), f=leader.get("fence", "?"))
    else:
        head = Safe('<p class="leader none" id="leader">No leader right now (an election '
                    'takes check_ttl + lock_delay after a crash).</p>')
    sched = html('<p class="muted">Published schedule: {n} jobs, config hash {h}, published '
                 '{a}.</p>', n=len(schedule.get("jobs") or {}), h=reference or "-",
                 a=age(schedule.get("published_at"))) if schedule else EMPTY
    rows = []
    for n in nodes:
        name = html('<a href="{u}">{n}</a>', u=n["url"], n=n["node"]) if n.get("url") else \
            html("{n}", n=n["node"])
        if n["node"] == v.node:
            name = html("{n} <span class='muted'>(this node)</span>", n=name)
        draining = n.get("maintenance") or n.get("draining")
        # The leader key is the truth; a node's own report may be a second old.
        if leader and n["node"] == leader.get("node"):
            n["role"] = "leader"
        elif n.get("role") == "leader":
            n["role"] = "follower"
        act = EMPTY
        if n["node"] == v.node:
            act = form(v, url("nodes", n["node"], "undrain" if draining else "drain"),
                       "Undrain" if draining else "Drain",
                       confirm="" if draining else f"Drain {n['node']}?")
        rows.append(html(
            '<tr data-node="{id}"><td>{name}</td><td>{addr}</td>'
            '<td><span class="badge h-{h}">{h}</span></td><td>{role}</td><td>{elig}</td>'
            '<td>{drain}</td><td class="{dc}">{cfg}</td><td>{run}</td><td>{act}</td></tr>',
            id=n["node"], name=name, addr=n.get("address") or "-", h=n["health"],
            role=n.get("role") or "?", elig=_yes(n.get("eligible")), drain=draining or "no",
            dc="drift" if n["drift"] else "",
            cfg=(n.get("config_hash") or "-") + (" (differs from the leader's)"
                                                 if n["drift"] else ""),
            run="-" if n.get("running") is None else n["running"], act=act))
    node_table = table(["node", "address", "health", "role", "eligible", "draining / maintenance",
                        "config", "running", ""], rows, "nodes")
    erows = [html("<tr><td>{s}</td><td>{a}</td><td>{n}</td><td>{f}</td></tr>",
                  s=e.get("since"), a=age(e.get("since")), n=e.get("node"), f=e.get("fence"))
             for e in elections]
    live = join([banner(reader), head, sched, Safe("<h2>Nodes</h2>"), node_table,
                 Safe("<h2>Recent elections</h2>"),
                 table(["since", "", "node", "fence"], erows, "elections")])
    return Page("Cluster", live, {"leader": leader, "nodes": nodes, "elections": elections,
                                  "schedule": schedule, "consul_error": reader.consul_error})


def _yes(value: object) -> str:
    return "?" if value is None else ("yes" if value else "no")


# -- Jobs -----------------------------------------------------------------------------------------

def jobs(reader: Reader, v: Viewer) -> Page:
    paused = reader.paused()
    rows = []
    data = []
    names = reader.job_names()
    for name in names:
        view = reader.job(name, STRIP_RUNS, live=len(names) <= LIVE_LOOKUP_JOBS)
        spec = view["spec"]
        runs = list(reversed(view["finished"])) + list(reversed(view["live"]))
        if spec and spec["params"] and v.can_act:  # parameters are typed on the job's page
            act = html('<a class="button" href="{h}">Run now…</a>', h=url("jobs", name))
        else:
            act = form(v, url("jobs", name, "run"), "Run now", cls="inline")
        state = html('<span class="badge paused" title="{r}">paused</span>', r=paused[name]) \
            if name in paused else Safe('<span class="badge active">active</span>')
        rows.append(html(
            '<tr data-job="{n}"><td><a href="{h}">{n}</a></td><td><code>{s}</code></td>'
            '<td>{tz}</td><td class="next">{nx}</td><td>{st}</td><td>{strip}</td>'
            '<td>{chart}</td><td>{act}</td></tr>',
            n=name, h=url("jobs", name), s=spec["schedule"] if spec else "-",
            tz=spec["timezone"] if spec else "-",
            nx=join((html("<div>{t}</div>", t=t) for t in (spec["next_local"] if spec else [])),
                    ""),
            st=state, strip=strip(runs), chart=duration_chart(view["finished"]), act=act))
        data.append({**view, "paused": paused.get(name)})
    live = join([banner(reader), table(["job", "schedule", "zone", "next fire times", "state",
                                        "last runs", "duration", ""], rows, "jobs")])
    return Page("Jobs", live, {"jobs": data, "consul_error": reader.consul_error})


def job(reader: Reader, v: Viewer, name: str) -> Page | None:
    if not reader.job_exists(name):
        return None
    view = reader.job(name, JOB_PAGE_RUNS)
    spec = view["spec"]
    paused = reader.paused().get(name)
    runs = view["live"] + view["finished"]
    if spec:
        what = html("<code>{c}</code>", c=" ".join(spec["command"])) if spec["command"] else \
            html("callable <code>{c}</code>", c=spec["callable"])
        facts = html(
            '<dl class="facts"><dt>schedule</dt><dd><code>{s}</code> ({tz})</dd>'
            '<dt>next</dt><dd>{nx}</dd><dt>runs</dt><dd>{what}</dd><dt>queue</dt><dd>{q}</dd>'
            '<dt>overlap</dt><dd>{o}</dd><dt>retries</dt><dd>{r}</dd><dt>timeout</dt>'
            '<dd>{t}s</dd><dt>params</dt><dd>{p}</dd><dt>state</dt><dd id="paused">{st}</dd>'
            '</dl>',
            s=spec["schedule"], tz=spec["timezone"], nx=", ".join(spec["next_local"]) or "-",
            what=what, q=spec["queue"], o=spec["overlap"], r=spec["retries"],
            t=f"{spec['timeout_s']:g}",
            p=(", ".join(spec["params"]) + f" ({spec['param_sets']} configured sets)")
            if spec["params"] else "none",
            st=f"paused: {paused}" if paused is not None else "active")
    else:
        facts = Safe('<p class="error">Not in this node\'s config: only its history is '
                     'left.</p>')
    rows = [html('<tr data-run="{id}"><td>{link}</td><td>{st}</td><td>{sch}</td><td>{node}</td>'
                 '<td>{att}</td><td>{ex}</td><td>{dur}</td><td>{lag}</td></tr>',
                 id=r["run_id"], link=run_link(r["run_id"]), st=state_badge(r["state"]),
                 sch=r["scheduled_at"] or "-", node=r["node"] or "-", att=r["attempt"],
                 ex=exit_text(r), dur=ms(r["duration_ms"]), lag=ms(r["start_lag_ms"]))
            for r in runs]
    live = join([banner(reader), facts, Safe("<h2>Last runs</h2>"),
                 strip(list(reversed(runs))), duration_chart(view["finished"]),
                 table(["run", "state", "scheduled (UTC)", "node", "attempt", "exit",
                        "duration", "lag"], rows, "runs")])
    static = _job_actions(v, name, spec) if spec else EMPTY
    return Page(name, live, {**view, "paused": paused, "consul_error": reader.consul_error},
                static=static, crumbs=[("Jobs", "/jobs")])


def _job_actions(v: Viewer, name: str, spec: View) -> Safe:
    if not v.can_act:
        return EMPTY
    inputs = join(html('<label>{p} <input name="param.{p}" autocomplete="off"></label>', p=p)
                  for p in spec["params"])
    reason = Safe('<label>reason <input name="reason" maxlength="200" autocomplete="off">'
                  '</label>')
    return html('<section class="actions"><h2>Actions</h2>{run}{pause}{resume}</section>',
                run=form(v, url("jobs", name, "run"), "Run now", inputs, "run-now"),
                pause=form(v, url("jobs", name, "pause"), "Pause", reason),
                resume=form(v, url("jobs", name, "resume"), "Resume"))


# -- Runs -----------------------------------------------------------------------------------------

def run(reader: Reader, v: Viewer, run_id: str) -> Page | None:
    found = reader.run(run_id)
    if found is None:
        return None
    view, params, output = found
    text = output.decode("utf-8", errors="replace")
    fields = [("state", state_badge(view["state"])), ("job", html('<a href="{h}">{j}</a>',
              h=url("jobs", view["job"]), j=view["job"])),
              ("node", view["node"] or "-"), ("attempt", view["attempt"]),
              ("queue", view["queue"] or "-"), ("manual", "yes" if view["manual"] else "no"),
              ("scheduled", view["scheduled_at"] or "-"), ("enqueued", view["enqueued_at"] or "-"),
              ("started", view["started_at"] or "-"), ("finished", view["finished_at"] or "-"),
              ("start lag", ms(view["start_lag_ms"])), ("duration", ms(view["duration_ms"])),
              ("exit", exit_text(view)), ("error", view["error"] or "-")]
    if view.get("retry_at"):
        fields.append(("retry at", view["retry_at"]))
    if view.get("waiting_for"):
        fields.append(("waiting for", view["waiting_for"]))
    facts = join(html("<dt>{k}</dt><dd>{v}</dd>", k=k, v=val) for k, val in fields)
    ptable = table(["parameter", "value"],
                   [html("<tr><td>{k}</td><td><code>{v}</code></td></tr>", k=k, v=val)
                    for k, val in sorted(params.items())], "params")
    size = view["output_bytes"] if view["output_bytes"] is not None else len(output)
    live = join([
        html('<dl class="facts" id="run-facts" data-state="{s}">{f}</dl>', s=view["state"],
             f=facts),
        Safe("<h2>Parameters</h2>"), ptable,
        html('<h2>Output <span class="muted">(tail as recorded, {n} bytes)</span> '
             '<a class="download" href="{h}">download</a></h2>'
             '<pre class="output" id="output">{o}</pre>',
             n=size, h=url("runs", run_id, "output.txt"), o=text or "(no output)"),
    ])
    return Page(run_id, live, {"run": view, "params": params, "output": text},
                final=view["state"] in (*TERMINAL, "expired"),
                crumbs=[("Jobs", "/jobs"), (view["job"], url("jobs", view["job"]))])


# -- Queues ---------------------------------------------------------------------------------------

def queues(reader: Reader, v: Viewer) -> Page:
    now = datetime.now(UTC).timestamp()
    window = (now - HOUR_S, now)
    qs = reader.queues()
    rows = []
    for q in qs:
        depth = [Point(t / 1000, d, title=f"{d} runs") for t, d, _ in q["samples"]
                 if t / 1000 >= window[0]]
        ages = [Point(t / 1000, a / 1000, title=f"{a / 1000:.0f}s") for t, _, a in q["samples"]
                if t / 1000 >= window[0]]
        rows.append(html(
            '<tr data-queue="{n}"><td>{n}</td><td class="num">{d}</td><td class="num">{p}</td>'
            '<td class="num">{a}</td><td>{dc}</td><td>{ac}</td></tr>',
            n=q["queue"], d=_num(q["depth"]), p=_num(q["pending"]),
            a="-" if q["oldest_age_s"] is None else f"{q['oldest_age_s']:.1f}s",
            dc=line_chart(depth, window, "depth, last hour", "", f"{q['queue']} depth"),
            ac=line_chart(ages, window, "oldest age, last hour", "s", f"{q['queue']} age")))
    total, dead = reader.dead_letters()
    drows = [html(
        '<tr data-entry="{e}"><td><code>{e}</code></td><td>{at}</td><td>{q}</td><td>{job}</td>'
        '<td>{run}</td><td>{reason}</td><td class="err">{err}</td><td>{acts}</td></tr>',
        e=d["entry_id"], at=d["dead_at"], q=d["queue"] or "-", job=d["job"] or "-",
        run=run_link(d["run_id"]) if d["run_id"] else "-", reason=d["reason"], err=d["error"],
        acts=join([form(v, url("dlq", d["entry_id"], "retry"), "Retry", cls="inline"),
                   form(v, url("dlq", d["entry_id"], "purge"), "Purge", cls="inline danger",
                        confirm=f"Delete dead letter {d['entry_id']}?")]))
        for d in dead]
    live = join([
        table(["queue", "depth", "pending", "oldest", "depth (1 h)", "oldest age (1 h)"], rows,
              "queues"),
        html('<p class="muted">Retries and overlap waits parked in the delayed set: {n}. '
             'Charts: sampled by the leader every 10 s into Redis (one hour kept).</p>',
             n=reader.delayed()),
        html('<h2>Dead letters <span class="muted">({n} in total, newest {m} shown)</span></h2>',
             n=total, m=len(dead)),
        table(["entry", "dead at (UTC)", "queue", "job", "run", "reason", "error", ""], drows,
              "dlq"),
    ])
    return Page("Queues", live, {"queues": qs, "dead_letters": {"total": total, "entries": dead},
                                 "delayed": reader.delayed()})


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


# -- login ----------------------------------------------------------------------------------------

def login(v: Viewer, next_path: str, error: str = "") -> Page:
    if not v.actions:
        body = Safe('<p>Actions are off on this node: set <code>[http] admin_token_file</code> '
                    'to enable them (docs/dashboard.md).</p>')
    else:
        body = html('<form method="post" action="/login" class="login">'
                    '<input type="hidden" name="next" value="{n}">'
                    '<label>admin token <input type="password" name="token" required '
                    'autocomplete="current-password"></label>'
                    '<label>your name (for the action log) <input name="name" maxlength="40" '
                    'autocomplete="username"></label><button type="submit">Log in</button>'
                    '</form>{e}', n=next_path,
                    e=html('<p class="error">{e}</p>', e=error) if error else EMPTY)
    return Page("Log in", EMPTY, {}, static=body, final=True)
