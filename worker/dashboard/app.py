"""The dashboard: routes, the page layout, the JSON API, static files and the action endpoints.

Served by worker/httpserver.py for every path other than /metrics and /healthz. GET and HEAD
only read; every change is a POST to an action endpoint (see auth.py for who may).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
import structlog

from scheduler.durations import format_duration
from worker.config import Config
from worker.dashboard import actions, pages
from worker.dashboard.actions import ActionError
from worker.dashboard.auth import Auth, Session, same_origin, session_cookie
from worker.dashboard.markup import Safe, html, join
from worker.dashboard.pages import Page, Viewer
from worker.dashboard.reader import Reader
from worker.redisconn import redis_client
from worker.secretfiles import redact

# A form post is a few hundred bytes; refuse anything that is clearly not one.
MAX_BODY = 64 * 1024
# Pages poll their JSON this often (dashboard.js reads it from the page).
POLL_MS = 2000
# Redis answers in milliseconds; a page should fail fast rather than hang on a dead server.
REDIS_TIMEOUT_S = 3.0
STATIC = {"dashboard.css": "text/css; charset=utf-8",
          "dashboard.js": "text/javascript; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; "
     "img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
     "base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)
NAV = (("Cluster", "/"), ("Jobs", "/jobs"), ("Queues", "/queues"))
SEGMENT = re.compile(r"^/(jobs|runs|dlq|nodes)/([^/]+)(?:/([a-z.]+))?$")


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


class Dashboard:
    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config
        self._redis: redis.Redis | None = None
        # Signs the notices this dashboard puts in a redirect (?msg=, ?err=): a link with a
        # made-up notice ("session expired, re-enter the token at https://evil...") shows none.
        self._flash_key = secrets.token_bytes(32)
        self._log = structlog.get_logger("cronsul.dashboard").bind(node=config().agent.node)

    def _client(self, cfg: Config) -> redis.Redis:
        if self._redis is None:
            self._redis = redis_client(cfg.redis, socket_timeout=REDIS_TIMEOUT_S,
                                       connect_timeout=REDIS_TIMEOUT_S, retries=0)
        return self._redis

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()

    # -- the HTTP bridge ----------------------------------------------------------------------

    def serve(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        """Answer one request on ``handler`` (called by worker/httpserver.py)."""
        headers = {k: v for k, v in handler.headers.items()}
        remote = handler.client_address[0]
        try:
            if method == "POST":
                length = int(headers.get("Content-Length") or 0)
                if length > MAX_BODY or length < 0:
                    resp = _text(413, "request body too large\n")
                else:
                    body = handler.rfile.read(length) if length else b""
                    resp = self.post(handler.path, headers, body, remote)
            else:
                resp = self.get(handler.path, headers)
        except redis.RedisError as exc:
            error = redact(str(exc))[:200]
            self._log.warning("dashboard_redis_failed", path=handler.path, error=error)
            resp = _text(503, f"Redis did not answer: {error}\n")
        except Exception:
            self._log.exception("dashboard_failed", path=handler.path)
            resp = _text(500, "internal error\n")
        handler.send_response(resp.status)
        handler.send_header("Content-Type", resp.content_type)
        handler.send_header("Content-Length", str(len(resp.body)))
        for name, value in (*SECURITY_HEADERS, *resp.headers):
            handler.send_header(name, value)
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(resp.body)

    # -- GET ----------------------------------------------------------------------------------

    def get(self, target: str, headers: Mapping[str, str]) -> Response:
        split = urlsplit(target)
        path, query = split.path, parse_qs(split.query)
        cfg = self._config()
        if path.startswith("/static/"):
            return _static(path[len("/static/"):])
        if path == "/favicon.ico":
            return _static("favicon.svg")
        auth = Auth(cfg.http.admin_token)
        session = auth.session(headers)
        if path == "/login":
            nxt = _next(query.get("next", ["/"])[0])
            return self._html(pages.login(self._viewer(cfg, auth, session, path), nxt), cfg,
                              self._viewer(cfg, auth, session, path), query)
        api = path.startswith("/api/") or path == "/api"
        page_path = (path[len("/api"):] or "/") if api else path
        viewer = self._viewer(cfg, auth, session, page_path)
        if not api:
            m = SEGMENT.match(page_path)
            if m and m.group(1) == "runs" and m.group(3) == "output.txt":
                return self._download(cfg, unquote(m.group(2)))
        page = self._page(cfg, page_path, viewer)
        if page is None:
            if api:
                return _json(404, {"error": "not found"})
            kept = format_duration(cfg.record_ttl)
            return self._html(Page("Not found", Safe("<p>Nothing here: no such page, job or run "
                                                     f"(run records are kept {kept}).</p>"),
                                   {}, final=True), cfg, viewer, query, status=404)
        if api:
            return _json(200, {"title": page.title, "html": str(page.live), "final": page.final,
                               "data": page.data})
        return self._html(page, cfg, viewer, query)

    def _page(self, cfg: Config, path: str, viewer: Viewer) -> Page | None:
        reader = Reader(cfg, self._client(cfg))
        if path == "/":
            return pages.cluster(reader, viewer)
        if path == "/jobs":
            return pages.jobs(reader, viewer)
        if path == "/queues":
            return pages.queues(reader, viewer)
        m = SEGMENT.match(path)
        if m is None or m.group(3) is not None:
            return None
        name = unquote(m.group(2))
        if m.group(1) == "jobs":
            return pages.job(reader, viewer, name)
        if m.group(1) == "runs":
            return pages.run(reader, viewer, name)
        return None

    def _download(self, cfg: Config, run_id: str) -> Response:
        found = Reader(cfg, self._client(cfg)).run(run_id)
        if found is None:
            return _text(404, f"no run {run_id!r}\n")
        filename = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)[:150] + ".txt"
        return Response(200, found[2], "text/plain; charset=utf-8",
                        [("Content-Disposition", f'attachment; filename="{filename}"')])

    def _viewer(self, cfg: Config, auth: Auth, session: Session | None, path: str) -> Viewer:
        return Viewer(cfg.agent.node, auth.enabled, session, auth.csrf(session), path)

    def _html(self, page: Page, cfg: Config, v: Viewer, query: Mapping[str, list[str]],
              status: int = 200) -> Response:
        nav = join(html('<a href="{h}" class="{c}">{t}</a>', h=h, t=t,
                        c="here" if h == v.path or (h != "/" and v.path.startswith(h)) else "")
                   for t, h in NAV)
        if not v.actions:
            who = Safe('<span class="muted" title="set [http] admin_token_file to enable '
                       'actions">read-only</span>')
        elif v.session is None:
            who = html('<a href="/login?next={n}">log in</a>', n=quote(v.path))
        else:
            who = html('<span>admin: {w}</span><form method="post" action="/logout" '
                       'class="act inline"><input type="hidden" name="csrf" value="{c}">'
                       '<button type="submit">log out</button></form>',
                       w=v.session.who, c=v.csrf)
        crumbs = join(html('<a href="{h}">{t}</a> / ', h=h, t=t) for t, h in page.crumbs)
        flash = EMPTY_FLASH
        sig = (query.get("sig") or [""])[0]
        for kind, css in (("msg", "ok"), ("err", "error")):
            text = (query.get(kind) or [""])[0]
            if text and hmac.compare_digest(sig, _flash_sig(self._flash_key, kind, text)):
                flash = html('<p class="flash {c}">{m}</p>', c=css, m=text[:500])
                break
        body = html(
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<title>{title} · cronsul · {node}</title>'
            '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">'
            '<link rel="stylesheet" href="/static/dashboard.css">'
            '<script src="/static/dashboard.js" defer></script></head>'
            '<body data-api="{api}" data-poll="{poll}" data-final="{final}">'
            '<header><a class="brand" href="/">cronsul</a><nav>{nav}</nav>'
            '<span class="served">served by <strong>{node}</strong></span>'
            '<span class="who">{who}</span></header>'
            '<main><h1><span class="crumbs">{crumbs}</span>{title}</h1>'
            '<div id="flash" role="status">{flash}</div>'
            '<div id="live">{live}</div>{static}</main>'
            '<footer>updated <span id="updated">now</span>{live_note} · '
            '<a href="/metrics">metrics</a> · <a href="/healthz">healthz</a>'
            '</footer></body></html>',
            title=page.title, node=v.node, api="/api" + v.path, poll=POLL_MS,
            final="1" if page.final else "", nav=nav, who=who, crumbs=crumbs, flash=flash,
            live=page.live, static=page.static,
            # A final page (a finished run, a 404) is not polled: it does not say it is.
            live_note=html(' · live: polls <code>{api}</code> every {secs} s',
                           api="/api" + v.path, secs=POLL_MS // 1000) if not page.final else "")
        return Response(status, body.encode())

    # -- POST ---------------------------------------------------------------------------------

    def post(self, target: str, headers: Mapping[str, str], body: bytes,
             remote: str) -> Response:
        path = urlsplit(target).path
        cfg = self._config()
        auth = Auth(cfg.http.admin_token)
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype not in ("application/x-www-form-urlencoded", ""):
            return _text(415, "send application/x-www-form-urlencoded\n")
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", errors="replace"),
                                             keep_blank_values=True).items()}
        wants_json = "application/json" in (headers.get("Accept") or "")
        if not auth.enabled:
            return self._refuse(403, "actions are off on this node ([http] admin_token_file is "
                                "not set)", wants_json)
        if path == "/login":
            return self._login(cfg, auth, headers, form, remote)
        if path == "/logout":
            if not same_origin(headers, required=True):
                return self._refuse(403, "cross-origin request refused", wants_json)
            return Response(303, b"", "text/plain; charset=utf-8",
                            [("Location", "/"), ("Set-Cookie", session_cookie("", 0))])
        session = auth.session(headers)
        if session is None:
            self._log.warning("dashboard_action_refused", path=path, remote=remote,
                              reason="not logged in")
            return self._refuse(401, "log in first (or send Authorization: Bearer <token>)",
                                wants_json, [("WWW-Authenticate", 'Bearer realm="cronsul"')])
        wants_json = wants_json or session.via == "bearer"
        if not same_origin(headers, required=session.via == "session"):
            self._log.warning("dashboard_action_refused", path=path, remote=remote,
                              who=session.who, reason="cross-origin")
            return self._refuse(403, "cross-origin request refused (Origin/Referer is not "
                                "this dashboard)", wants_json)
        if not auth.csrf_ok(session, form.get("csrf", "")):
            self._log.warning("dashboard_action_refused", path=path, remote=remote,
                              who=session.who, reason="csrf")
            return self._refuse(403, "missing or wrong CSRF token: reload the page",
                                wants_json)
        m = SEGMENT.match(path)
        if m is None or m.group(3) is None:
            return self._refuse(404, "no such action", wants_json)
        kind, target_name, verb = m.group(1), unquote(m.group(2)), m.group(3)
        action = f"{kind}.{verb}"
        extra: dict[str, Any] = {}
        try:
            message, location = self._act(cfg, kind, target_name, verb, form, session, extra)
        except ActionError as exc:
            self._log.warning("dashboard_action", action=action, target=target_name,
                              who=session.who, via=session.via, remote=remote,
                              outcome="refused", error=exc.message)
            return self._refuse(exc.status, exc.message, wants_json,
                                back=_next(form.get("next", "/")))
        self._log.info("dashboard_action", action=action, target=target_name, who=session.who,
                       via=session.via, remote=remote, outcome="ok", **extra)
        if wants_json:
            return _json(200, {"ok": True, "message": message, "location": location, **extra})
        back = location or _next(form.get("next", "/"))
        return _redirect(back, self._flash_key, "msg", message)

    def _act(self, cfg: Config, kind: str, name: str, verb: str, form: Mapping[str, str],
             session: Session, extra: dict[str, Any]) -> tuple[str, str | None]:
        r = self._client(cfg)
        who = f"{session.who} (dashboard)"
        if kind == "jobs" and verb == "run":
            params = {k[len("param."):]: v for k, v in form.items()
                      if k.startswith("param.") and v != ""}
            run_id = actions.run_now(cfg, r, name, params)
            extra["run_id"] = run_id
            extra["params"] = params
            return f"enqueued {run_id}", None
        if kind == "jobs" and verb == "pause":
            actions.pause(cfg, name, form.get("reason", ""), who)
            return f"paused {name}", None
        if kind == "jobs" and verb == "resume":
            actions.resume(cfg, name)
            return f"resumed {name}", None
        if kind == "dlq" and verb == "retry":
            return actions.dlq_retry(cfg, r, name), None
        if kind == "dlq" and verb == "purge":
            return actions.dlq_purge(cfg, r, name), None
        if kind == "nodes" and verb in ("drain", "undrain"):
            elsewhere = Reader(cfg, r)._node_status([name]).get(name, {}).get("url")
            return actions.drain(cfg, name, verb == "drain", who, elsewhere), None
        raise ActionError(404, "no such action")

    def _login(self, cfg: Config, auth: Auth, headers: Mapping[str, str],
               form: Mapping[str, str], remote: str) -> Response:
        nxt = _next(form.get("next", "/"))
        viewer = self._viewer(cfg, auth, None, "/login")
        if not same_origin(headers, required=True):
            return self._html(pages.login(viewer, nxt, "cross-origin login refused"), cfg,
                              viewer, {}, status=403)
        if not auth.check_token(form.get("token", "")):
            self._log.warning("dashboard_login_failed", remote=remote)
            return self._html(pages.login(viewer, nxt, "wrong token"), cfg, viewer, {},
                              status=401)
        cookie = auth.new_session(form.get("name", "").strip() or "admin")
        who = auth.session({"Cookie": f"cronsul_session={cookie}"})
        self._log.info("dashboard_login", who=who.who if who else "?", remote=remote)
        return Response(303, b"", "text/plain; charset=utf-8",
                        [("Location", nxt), ("Set-Cookie", session_cookie(cookie))])

    def _refuse(self, status: int, message: str, wants_json: bool,
                headers: list[tuple[str, str]] | None = None, back: str | None = None) -> Response:
        if wants_json or back is None:
            resp = _json(status, {"ok": False, "error": message}) if wants_json else \
                _text(status, message + "\n")
            resp.headers.extend(headers or [])
            return resp
        return _redirect(back, self._flash_key, "err", message)


EMPTY_FLASH = Safe("")


# A path on this dashboard, as the pages link them: no scheme, no //host, no backslash, no
# whitespace or control characters (a browser drops a tab in "/<TAB>/evil.example", making it
# //evil.example, and CR LF would start a header of its own).
_LOCAL_PATH = re.compile(r"/(?!/)[!#$%&'()*+,\-./0-9:;=?@A-Z_a-z~]*")


def _next(path: str) -> str:
    """Only a path on this dashboard: no open redirect, no header injection."""
    return path if _LOCAL_PATH.fullmatch(path) else "/"


def _flash_sig(key: bytes, kind: str, text: str) -> str:
    return hmac.new(key, f"{kind}\0{text}".encode(), hashlib.sha256).hexdigest()


def _redirect(location: str, key: bytes, kind: str, text: str) -> Response:
    """303 to ``location`` with a notice (``kind`` msg or err) signed with ``key``."""
    sep = "&" if "?" in location else "?"
    query = f"{kind}={quote(text)}&sig={_flash_sig(key, kind, text)}"
    return Response(303, b"", "text/plain; charset=utf-8", [("Location", location + sep + query)])


def _text(status: int, text: str) -> Response:
    return Response(status, text.encode(), "text/plain; charset=utf-8")


def _json(status: int, body: Any) -> Response:
    return Response(status, json.dumps(body, default=str).encode(),
                    "application/json; charset=utf-8")


def _static(name: str) -> Response:
    if name not in STATIC:
        return _text(404, "not found\n")
    data = resources.files("worker.dashboard").joinpath("static", name).read_bytes()
    resp = Response(200, data, STATIC[name])
    return resp
