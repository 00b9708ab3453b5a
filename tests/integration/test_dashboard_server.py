"""The dashboard's HTTP endpoints against a real redis-server and the Consul dev server: every
page and its JSON, escaping, the output download, 404s, and the actions with their guards
(token, CSRF, Origin) and effects. GET never changes anything."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import consul as consul_api
import pytest
import redis
import requests
import structlog
from cronsul_testing import RedisServer, render_config, wait_until
from prometheus_client import CollectorRegistry

from devconsul.testing import DevConsul
from scheduler.ports import Fence, TickBatch
from scheduler.runs import Run, epoch_ms
from worker.config import Config, load_config
from worker.dashboard import Dashboard
from worker.httpserver import OpsHTTPServer
from worker.keys import Keys
from worker.membership import Membership
from worker.queue import RedisQueue
from worker.runstate import RunRef, RunState
from worker.sink import RedisSink, run_payload

KEYS = Keys("cronsul")
TOKEN = "s3cret-token-for-the-dashboard-tests"
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
EVIL = "<script>alert(1)</script><b>bold</b>"
JOBS = {
    "tick": {"schedule": "0 3 * * *", "timezone": "Europe/Berlin", "command": ["/bin/true"]},
    "deploy": {"schedule": "@every 1h", "command": ["/bin/echo", "{param.app}"],
               "params": [{"app": "shop"}]},
}


@dataclass
class Dash:
    url: str
    cfg: Config
    r: redis.Redis
    consul: consul_api.Consul
    token_file: Path

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=10, allow_redirects=False, **kw)

    def post(self, path: str, data: dict[str, str] | None = None,
             **kw: Any) -> requests.Response:
        return requests.post(self.url + path, data=data or {}, timeout=10,
                             allow_redirects=False, **kw)

    def login(self) -> tuple[dict[str, str], str]:
        """Cookie and CSRF token of a fresh session."""
        resp = self.post("/login", {"token": TOKEN, "name": "alice", "next": "/jobs"},
                         headers={"Origin": self.url})
        assert resp.status_code == 303, resp.text
        cookies = {"cronsul_session": resp.cookies["cronsul_session"]}
        page = self.get("/jobs", cookies=cookies).text
        match = re.search(r'name="csrf" value="([^"]+)"', page)
        assert match, "no CSRF token on a logged-in page"
        return cookies, match.group(1)

    def act(self, path: str, data: dict[str, str] | None = None) -> requests.Response:
        cookies, csrf = self.login()
        return self.post(path, {"csrf": csrf, **(data or {})}, cookies=cookies,
                         headers={"Origin": self.url, "Accept": "application/json"})


def _serve(cfg: Config) -> Iterator[str]:
    dashboard = Dashboard(lambda: cfg)
    server = OpsHTTPServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, {}), dashboard)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.close()
        dashboard.close()


def _config(tmp_path: Path, redis_url: str, consul_addr: str, http: dict[str, Any]) -> Config:
    path = tmp_path / f"cronsul-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(render_config({"agent": {"node": "n1", "address": "127.0.0.1"},
                                   "consul": {"address": consul_addr},
                                   "redis": {"url": redis_url}, "http": http}, JOBS))
    return load_config(path, env={})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_proc: RedisServer) -> Iterator[Dash]:
    """One Consul dev server and one dashboard for the module (each test resets the state)."""
    tmp_path = tmp_path_factory.mktemp("dashboard")
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    with DevConsul(data_dir=tmp_path / "consul-data") as devconsul:
        address = devconsul.add_agent("n1")
        cfg = _config(tmp_path, redis_proc.url, address,
                      {"listen": "127.0.0.1:0", "admin_token_file": str(token_file)})
        host, port = address.split(":")
        c = consul_api.Consul(host=host, port=int(port))
        Membership(c, "n1", "127.0.0.1", 300,
                   {"config_hash": cfg.config_hash, "pid": "1"}).register()
        session = c.session.create(name="cronsul-n1", ttl=300, behavior="release",
                                   lock_delay=0)
        leader = {"node": "n1", "address": "127.0.0.1", "pid": 1, "session": session,
                  "since": "2026-11-22T18:00:05Z", "fence": 42}
        assert c.kv.put("cronsul/leader", json.dumps(leader), acquire=session)
        client = redis_proc.client()
        for url in _serve(cfg):
            yield Dash(url, cfg, client, c, token_file)
        client.close()


@pytest.fixture
def dash(served: Dash, redis_client: redis.Redis) -> Dash:
    served.consul.kv.delete("cronsul/paused/", recurse=True)
    served.consul.kv.put("cronsul/schedule", json.dumps(
        {"leader": "n1", "config_hash": served.cfg.config_hash,
         "published_at": "2026-11-22T18:00:06Z", "jobs": {}}))
    return served


# -- helpers writing records through the real code paths -------------------------------------------

def finished_run(r: redis.Redis, job: str = "tick", output: str = "hello\n",
                 state: str = "succeeded", params: dict[str, str] | None = None,
                 second: int = 0) -> str:
    run = Run.for_tick(job, T0 + timedelta(seconds=second), params or {})
    RedisSink(r, KEYS).apply(TickBatch([(run, "default")], {job: run.scheduled_at}),
                             Fence(0, 1))
    q = RedisQueue(r, KEYS, "n1")
    q.ensure_groups(["default"])
    (d,) = q.fetch(["default"], 1, 100)
    ref = RunRef(run.run_id, job, epoch_ms(run.scheduled_at), "default", d.payload or b"",
                 d.entry_id)
    states = RunState(r, KEYS, "n1", 3600)
    token = uuid.uuid4().hex
    start = epoch_ms(run.scheduled_at) + 120
    assert states.begin(ref, token, 30_000, start).verdict == "start"
    fields = {"exit_code": "0" if state == "succeeded" else "3", "signal": "",
              "timed_out": "0", "duration_ms": "1500.0", "output": output,
              "output_bytes": str(len(output.encode())), "error": ""}
    assert states.finish(ref, token, state, start + 1500, fields)
    return run.run_id


def dead_letter(r: redis.Redis, job: str = "tick", reason: str = "retries exhausted",
                error: str = "exit 3") -> str:
    run = Run.for_tick(job, T0 + timedelta(seconds=30))
    payload = run_payload(run.run_id, job, run.scheduled_at, {})
    r.hset(KEYS.run(run.run_id), mapping={"state": "dead", "job": job})
    return str(r.xadd(KEYS.dead, {"reason": reason, "error": error, "queue": "default",
                                  "entry_id": "1-0", "node": "n1", "payload": payload}).decode())


def snapshot(d: Dash) -> tuple[dict[bytes, Any], list[tuple[str, int]]]:
    keys: Any = d.r.keys("*")
    data = {k: d.r.dump(k) for k in keys}
    _, entries = d.consul.kv.get("", recurse=True)
    return data, sorted((e["Key"], e["ModifyIndex"]) for e in entries or [])


SECURITY = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}


# -- pages ----------------------------------------------------------------------------------------

def test_every_page_renders_with_security_headers(dash: Dash) -> None:
    run_id = finished_run(dash.r)
    dead_letter(dash.r)
    for path in ["/", "/jobs", "/jobs/tick", "/jobs/deploy", "/runs/" + _q(run_id), "/queues",
                 "/login"]:
        resp = dash.get(path)
        assert resp.status_code == 200, (path, resp.text[:300])
        assert resp.headers["Content-Type"].startswith("text/html")
        for name, value in SECURITY.items():
            assert resp.headers[name] == value
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "<script>" not in resp.text  # only <script src=...> files: no inline script
        assert 'src="/static/dashboard.js"' in resp.text
        api = dash.get("/api" + path if path != "/login" else "/api/")
        assert api.status_code == 200 and api.headers["Content-Type"].startswith(
            "application/json")
        assert set(api.json()) == {"title", "html", "final", "data"}
    for name, ctype in [("dashboard.css", "text/css"), ("dashboard.js", "text/javascript")]:
        resp = dash.get("/static/" + name)
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith(ctype)
        assert b"http://" not in resp.content and b"https://" not in resp.content  # no CDN


def test_cluster_page_shows_leader_nodes_and_drift(dash: Dash) -> None:
    data = dash.get("/api/").json()["data"]
    assert data["leader"]["node"] == "n1" and data["leader"]["fence"] == 42
    (node,) = data["nodes"]
    assert node["node"] == "n1" and node["health"] == "passing" and node["drift"] is False
    html = dash.get("/").text
    assert "Leader: <strong>n1</strong>" in html
    dash.consul.kv.put("cronsul/schedule", json.dumps({"config_hash": "other"}))
    assert dash.get("/api/").json()["data"]["nodes"][0]["drift"] is True
    assert "differs from the leader" in dash.get("/").text


def test_cluster_page_lists_recorded_elections(dash: Dash) -> None:
    dash.r.lpush("cronsul:dash:elections", json.dumps(
        {"node": "n2", "since": "2026-11-22T18:00:05Z", "fence": 7, "at": "x"}))
    data = dash.get("/api/").json()["data"]
    assert data["elections"][0]["node"] == "n2"


def test_jobs_page_shows_schedule_next_fires_strip_and_chart(dash: Dash) -> None:
    finished_run(dash.r, second=0)
    finished_run(dash.r, state="failed", second=1)
    resp = dash.get("/jobs")
    html = resp.text
    row = html[html.index('data-job="tick"'):]
    row = row[:row.index("</tr>")]
    assert "0 3 * * *" in row and "Europe/Berlin" in row
    assert row.count('class="cell st-succeeded"') == 1 and row.count('class="cell st-failed"') == 1
    assert "<svg" in row and row.count('class="dot st-') == 2
    (tick,) = [j for j in dash.get("/api/jobs").json()["data"]["jobs"] if j["name"] == "tick"]
    assert len(tick["spec"]["next"]) == 3 and tick["spec"]["timezone"] == "Europe/Berlin"
    assert [r["state"] for r in tick["finished"]] == ["failed", "succeeded"]


def test_job_page_lists_queued_and_finished_runs(dash: Dash) -> None:
    done = finished_run(dash.r)
    queued = Run.for_tick("tick", T0 + timedelta(seconds=50))
    RedisSink(dash.r, KEYS).apply(TickBatch([(queued, "default")], {}), Fence(0, 1))
    data = dash.get("/api/jobs/tick").json()["data"]
    assert [r["run_id"] for r in data["live"]] == [queued.run_id]
    assert [r["run_id"] for r in data["finished"]] == [done]
    assert 'data-run="' + queued.run_id in dash.get("/jobs/tick").text


def test_run_page_escapes_output_and_params(dash: Dash) -> None:
    run_id = finished_run(dash.r, "deploy", output=EVIL + "\n", params={"app": '"><img src=x>'})
    resp = dash.get("/runs/" + _q(run_id))
    assert resp.status_code == 200
    assert EVIL not in resp.text and "<script>alert" not in resp.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;" in resp.text
    assert "<img src=x>" not in resp.text and "&lt;img src=x&gt;" in resp.text
    assert "<script>alert" not in dash.get("/api/runs/" + _q(run_id)).json()["html"]
    data = dash.get("/api/runs/" + _q(run_id)).json()
    assert data["final"] is True and data["data"]["params"] == {"app": '"><img src=x>'}
    assert data["data"]["run"]["node"] == "n1" and data["data"]["run"]["exit_code"] == 0


def test_output_download_is_a_text_plain_attachment(dash: Dash) -> None:
    run_id = finished_run(dash.r, output=EVIL + "\nline 2\n")
    resp = dash.get("/runs/" + _q(run_id) + "/output.txt")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert resp.headers["Content-Disposition"].startswith("attachment; filename=")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.content == (EVIL + "\nline 2\n").encode()


def test_unknown_job_run_and_paths_are_404(dash: Dash) -> None:
    for path in ["/jobs/nope", "/runs/nope@123", "/runs/nope@123/output.txt", "/nowhere",
                 "/api/jobs/nope", "/api/runs/x", "/static/../app.py", "/static/x.js",
                 "/jobs/tick/run"]:
        assert dash.get(path).status_code == 404, path


def test_queues_page_shows_depth_samples_and_dead_letters(dash: Dash) -> None:
    run = Run.for_tick("tick", T0)
    RedisSink(dash.r, KEYS).apply(TickBatch([(run, "default")], {}), Fence(0, 1))
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    dash.r.rpush("cronsul:dash:queue:default", f"{now_ms - 20_000} 3 5000",
                 f"{now_ms - 10_000} 1 2000")
    entry = dead_letter(dash.r, reason="malformed", error="<b>bad</b> payload")
    data = dash.get("/api/queues").json()["data"]
    (q,) = data["queues"]
    assert q["queue"] == "default" and q["depth"] == 1 and q["oldest_age_s"] > 0
    assert len(q["samples"]) == 2
    assert data["dead_letters"]["total"] == 1
    assert data["dead_letters"]["entries"][0]["reason"] == "malformed"
    html = dash.get("/queues").text
    assert entry in html and "&lt;b&gt;bad&lt;/b&gt; payload" in html and "<b>bad</b>" not in html
    assert html.count("<polyline") >= 2


def test_get_never_changes_state(dash: Dash) -> None:
    run_id = finished_run(dash.r)
    entry = dead_letter(dash.r)
    cookies, _ = dash.login()
    before = snapshot(dash)
    paths = ["/", "/jobs", "/jobs/tick", "/jobs/deploy", "/runs/" + _q(run_id),
             "/runs/" + _q(run_id) + "/output.txt", "/queues", "/login", "/jobs/tick/run",
             "/jobs/tick/pause", "/jobs/tick/resume", f"/dlq/{entry}/retry",
             f"/dlq/{entry}/purge", "/nodes/n1/drain", "/logout"]
    for path in paths:
        for prefix in ("", "/api"):
            dash.get(prefix + path, cookies=cookies)
            dash.get(prefix + path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert snapshot(dash) == before


# -- actions: the guards --------------------------------------------------------------------------

def test_actions_are_refused_without_the_token(dash: Dash) -> None:
    before = dash.r.xlen(KEYS.stream("default"))
    assert dash.post("/jobs/tick/run", headers={"Origin": dash.url}).status_code == 401
    bad = dash.post("/jobs/tick/run", headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401
    forged = dash.post("/jobs/tick/run", cookies={"cronsul_session": "v1.9999999999.a.YQ.x"},
                       headers={"Origin": dash.url})
    assert forged.status_code == 401
    wrong_login = dash.post("/login", {"token": "wrong"}, headers={"Origin": dash.url})
    assert wrong_login.status_code == 401 and "Set-Cookie" not in wrong_login.headers
    assert dash.r.xlen(KEYS.stream("default")) == before
    assert 'action="/jobs/tick/run"' not in dash.get("/jobs").text  # no forms when logged out


def test_actions_are_refused_without_csrf_or_with_a_foreign_origin(dash: Dash) -> None:
    cookies, csrf = dash.login()
    cases = [
        ({}, {"Origin": dash.url}),                                    # no CSRF token
        ({"csrf": "x" + csrf}, {"Origin": dash.url}),                  # wrong CSRF token
        ({"csrf": csrf}, {"Origin": "http://evil.example"}),           # cross-site
        ({"csrf": csrf}, {"Referer": "http://evil.example/page"}),     # cross-site, Referer
        ({"csrf": csrf}, {}),                                          # neither header
    ]
    for data, headers in cases:
        resp = dash.post("/jobs/tick/run", data, cookies=cookies,
                         headers={**headers, "Accept": "application/json"})
        assert resp.status_code == 403, (data, headers)
    assert dash.r.xlen(KEYS.stream("default")) == 0
    other_csrf = dash.login()[1]
    resp = dash.post("/jobs/tick/run", {"csrf": other_csrf}, cookies=cookies,
                     headers={"Origin": dash.url})
    assert resp.status_code == 403  # another session's token


def test_actions_are_off_without_an_admin_token_file(dash: Dash, tmp_path: Path) -> None:
    cfg = _config(tmp_path, dash.cfg.redis.url, f"{dash.cfg.consul.host}:{dash.cfg.consul.port}",
                  {"listen": "127.0.0.1:0"})
    for url in _serve(cfg):
        resp = requests.post(url + "/jobs/tick/run", headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=10)
        assert resp.status_code == 403 and "off" in resp.text
        assert requests.post(url + "/login", {"token": TOKEN}, timeout=10).status_code == 403
        page = requests.get(url + "/jobs", timeout=10).text
        assert "read-only" in page and "<form" not in page


def test_login_cookie_is_httponly_samesite_strict(dash: Dash) -> None:
    resp = dash.post("/login", {"token": TOKEN, "next": "//evil.example/"},
                     headers={"Origin": dash.url})
    assert resp.status_code == 303 and resp.headers["Location"] == "/"  # no open redirect
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    cross = dash.post("/login", {"token": TOKEN}, headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403 and "Set-Cookie" not in cross.headers


@pytest.mark.parametrize("nxt", ["/\t/evil.example/", "/%09/evil.example/",
                                 "/jobs\r\nSet-Cookie: injected=1", "/ /evil.example",
                                 "https://evil.example/", "/\\evil.example"])
def test_login_next_is_a_local_path_only(dash: Dash, nxt: str) -> None:
    """A security review sent an admin from a real login to evil.example (a tab a browser
    drops), with a header of its own (CR LF)."""
    resp = dash.post("/login", {"token": TOKEN, "next": nxt}, headers={"Origin": dash.url})
    assert resp.status_code == 303
    location = resp.headers["Location"]
    # "/" or, for the percent-encoded tab, the same path on this host (kept encoded: a browser
    # does not decode it into the host part).
    expected = nxt if nxt == "/%09/evil.example/" else "/"
    assert location == expected, location
    assert "injected" not in resp.headers.get("Set-Cookie", "")


def test_a_notice_in_a_link_is_shown_only_if_this_dashboard_made_it(dash: Dash) -> None:
    forged = "Session expired. Re-enter the admin token at https://evil.example/login"
    page = dash.get("/jobs", params={"err": forged}).text
    assert "evil.example" not in page
    page = dash.get("/jobs", params={"err": forged, "sig": "0" * 64}).text
    assert "evil.example" not in page


# -- actions: the effects -------------------------------------------------------------------------

def test_run_now_with_parameters_enqueues_and_logs_who(dash: Dash) -> None:
    with structlog.testing.capture_logs() as logs:
        resp = dash.act("/jobs/deploy/run", {"param.app": "<api>", "next": "/jobs/deploy"})
    assert resp.status_code == 200, resp.text
    run_id = resp.json()["run_id"]
    assert run_id.startswith("deploy@manual-")
    record = {k.decode(): v.decode() for k, v in dash.r.hgetall(KEYS.run(run_id)).items()}
    assert record["state"] == "queued" and record["manual"] == "1"
    assert json.loads(record["payload"])["params"] == {"app": "<api>"}
    assert dash.r.xlen(KEYS.stream("default")) == 1
    (line,) = [e for e in logs if e["event"] == "dashboard_action"]
    assert (line["action"], line["target"], line["who"], line["remote"], line["outcome"]) == (
        "jobs.run", "deploy", "alice", "127.0.0.1", "ok")
    unknown = dash.act("/jobs/deploy/run", {"param.nope": "x"})
    assert unknown.status_code == 400 and "no such parameter" in unknown.json()["error"]
    assert dash.act("/jobs/ghost/run").status_code == 404


def test_bearer_token_acts_without_cookie_or_csrf(dash: Dash) -> None:
    resp = dash.post("/jobs/tick/run", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200 and resp.json()["ok"] is True
    cross = dash.post("/jobs/tick/run", headers={"Authorization": f"Bearer {TOKEN}",
                                                 "Origin": "http://evil.example"})
    assert cross.status_code == 403
    assert dash.r.xlen(KEYS.stream("default")) == 1


def test_browser_form_post_redirects_back_with_a_message(dash: Dash) -> None:
    cookies, csrf = dash.login()
    resp = dash.post("/jobs/tick/run", {"csrf": csrf, "next": "/jobs/tick"}, cookies=cookies,
                     headers={"Origin": dash.url})
    assert resp.status_code == 303 and resp.headers["Location"].startswith("/jobs/tick?msg=")
    page = dash.get(resp.headers["Location"], cookies=cookies).text
    assert "enqueued tick@manual-" in page


def test_pause_and_resume(dash: Dash) -> None:
    resp = dash.act("/jobs/tick/pause", {"reason": "<db> migration"})
    assert resp.status_code == 200, resp.text
    _, entry = dash.consul.kv.get("cronsul/paused/tick")
    value = json.loads(entry["Value"])
    assert value["reason"] == "<db> migration" and value["by"] == "alice (dashboard)"
    (tick,) = [j for j in dash.get("/api/jobs").json()["data"]["jobs"] if j["name"] == "tick"]
    assert "<db> migration" in tick["paused"]
    assert "&lt;db&gt; migration" in dash.get("/jobs/tick").text
    assert dash.act("/jobs/tick/resume").status_code == 200
    assert dash.consul.kv.get("cronsul/paused/tick")[1] is None


def test_dead_letter_retry_and_purge(dash: Dash) -> None:
    first = dead_letter(dash.r)
    resp = dash.act(f"/dlq/{first}/retry")
    assert resp.status_code == 200, resp.text
    assert dash.r.xlen(KEYS.dead) == 0 and dash.r.xlen(KEYS.stream("default")) == 1
    second = dead_letter(dash.r)
    assert dash.act(f"/dlq/{second}/purge").status_code == 200
    assert dash.r.xlen(KEYS.dead) == 0
    assert dash.act(f"/dlq/{second}/purge").status_code == 404
    assert dash.act("/dlq/not-an-id/retry").status_code == 404
    poison = str(dash.r.xadd(KEYS.dead, {"reason": "malformed", "payload": "{}",
                                         "queue": "default"}).decode())
    assert dash.act(f"/dlq/{poison}/retry").status_code == 409


def test_drain_and_undrain_this_node(dash: Dash) -> None:
    resp = dash.act("/nodes/n1/drain")
    assert resp.status_code == 200, resp.text

    def maintenance() -> Any:
        return dash.get("/api/").json()["data"]["nodes"][0]["maintenance"]

    assert "alice" in wait_until(maintenance, 5, what="maintenance shown")
    assert dash.act("/nodes/n1/undrain").status_code == 200
    wait_until(lambda: maintenance() is None, 5, what="maintenance gone")
    other = dash.act("/nodes/n2/drain")
    assert other.status_code == 409 and "own dashboard" in other.json()["error"]


def _q(run_id: str) -> str:
    from urllib.parse import quote

    return quote(run_id, safe="")
