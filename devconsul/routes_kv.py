"""KV, session, txn and status endpoints (agent/kvs_endpoint.go, agent/session_endpoint.go,
agent/txn_endpoint.go, agent/status_endpoint.go)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from devconsul import kv, sessions, txn
from devconsul.errors import BadRequest, ConsulError, TooLarge
from devconsul.model import KVEntry
from devconsul.state import State
from devconsul.store import Watch
from devconsul.web import Request, Response, consistency

if TYPE_CHECKING:
    from devconsul.app import App

KV_MAX_VALUE_SIZE = 512 * 1024


def kv_endpoint(app: App, req: Request, key: str) -> Response:
    if req.method == "GET":
        return _kv_keys(app, req, key) if req.has("keys") else _kv_get(app, req, key)
    if req.method == "PUT":
        return _kv_put(app, req, key)
    if req.method == "DELETE":
        return _kv_delete(app, req, key)
    return Response.of_text(f"method {req.method} not allowed", 405)


def _kv_get(app: App, req: Request, key: str) -> Response:
    recurse = req.has("recurse")
    if not recurse and not key:
        raise BadRequest("Missing key name")
    mode = consistency(req)
    min_index, wait = req.blocking()

    def query(st: State) -> tuple[int, list[KVEntry], Watch]:
        if recurse:
            index, entries = kv.list_prefix(st, key)
            local = kv.prefix_index_is_local(st, key)
            return index, entries, Watch(prefixes=(key,)) if local else Watch(tables=("kvs",))
        index, entry = kv.get(st, key)
        if entry is None:
            return index, [], Watch(tables=("kvs",))
        return index, [entry], Watch(keys=(key,))

    index, entries = app.store.blocking(query, min_index, wait)
    if not entries:
        return Response(404).set_meta(index, mode)
    if req.has("raw") and not recurse:
        resp = Response(200, entries[0].value, "text/plain")
        resp.headers["X-Content-Type-Options"] = "nosniff"
        return resp.set_meta(index, mode)
    return Response.of_json([e.to_json() for e in entries]).set_meta(index, mode)


def _kv_keys(app: App, req: Request, prefix: str) -> Response:
    sep = req.param("separator", req.param("seperator"))
    mode = consistency(req)
    min_index, wait = req.blocking()

    def query(st: State) -> tuple[int, list[str], Watch]:
        index, keys = kv.list_keys(st, prefix, sep)
        local = kv.prefix_index_is_local(st, prefix)
        return index, keys, Watch(prefixes=(prefix,)) if local else Watch(tables=("kvs",))

    index, keys = app.store.blocking(query, min_index, wait)
    if not keys and prefix:
        return Response(404).set_meta(index, mode)
    return Response.of_json(keys).set_meta(index, mode)


def _conflicting(req: Request, *flags: str) -> None:
    if sum(1 for f in flags if req.has(f)) > 1:
        raise BadRequest("Conflicting flags: " + "&".join(f for f in flags if req.has(f)))


def _uint(req: Request, name: str) -> int:
    try:
        value = int(req.param(name))
    except ValueError as exc:
        raise BadRequest(f'strconv.ParseUint: parsing "{req.param(name)}": invalid syntax') \
            from exc
    if value < 0:
        raise BadRequest(f'strconv.ParseUint: parsing "{value}": invalid syntax')
    return value


def _kv_put(app: App, req: Request, key: str) -> Response:
    if not key:
        raise BadRequest("Missing key name")
    _conflicting(req, "cas", "acquire", "release")
    flags = _uint(req, "flags") if req.has("flags") else 0
    if len(req.body) > KV_MAX_VALUE_SIZE:
        raise TooLarge(f"Request body({len(req.body)} bytes) too large, max size: "
                       f"{KV_MAX_VALUE_SIZE} bytes.")
    value = req.body
    if req.has("acquire"):
        session = req.param("acquire")

        def acquire(st: State, idx: int, now: float) -> bool:
            if kv.in_lock_delay(st, key, now):
                return False
            try:
                return kv.lock(st, idx, key, value, flags, session)
            except ConsulError as exc:
                # agent/consul/kvs_endpoint.go: FSM errors come back through raftApply.
                raise ConsulError(f"raft apply failed: {exc.message}") from exc

        return Response.of_json(app.store.write(acquire))
    if req.has("release"):
        session = req.param("release")
        return Response.of_json(app.store.write(
            lambda st, idx, now: kv.unlock(st, idx, key, value, flags, session)))
    if req.has("cas"):
        index = _uint(req, "cas")
        return Response.of_json(app.store.write(
            lambda st, idx, now: kv.cas(st, idx, key, value, flags, index)))
    app.store.write(lambda st, idx, now: kv.set_(st, idx, key, value, flags))
    return Response.of_json(True)


def _kv_delete(app: App, req: Request, key: str) -> Response:
    _conflicting(req, "recurse", "cas")
    if req.has("recurse"):
        app.store.write(lambda st, idx, now: kv.delete_tree(st, idx, key))
        return Response.of_json(True)
    if not key:
        raise BadRequest("Missing key name")
    if req.has("cas"):
        index = _uint(req, "cas")
        return Response.of_json(app.store.write(
            lambda st, idx, now: kv.delete_cas(st, idx, key, index)))
    app.store.write(lambda st, idx, now: kv.delete(st, idx, key))
    return Response.of_json(True)


def txn_endpoint(app: App, req: Request, _: str) -> Response:
    ops = txn.parse_ops(req.json())
    results, errors = app.store.write(lambda st, idx, now: txn.apply(st, idx, now, ops))
    if errors:
        return Response.of_json({"Results": None, "Errors": errors}, status=409)
    resp = Response.of_json({"Results": results, "Errors": None})
    if all(op.verb in txn.READ_VERBS for op in ops):
        resp.headers["X-Consul-KnownLeader"] = "true"
        resp.headers["X-Consul-LastContact"] = "0"
    return resp


# -- sessions ---------------------------------------------------------------------------------

def session_create(app: App, req: Request, _: str) -> Response:
    body = req.json_object()
    sess = app.store.write(lambda st, idx, now: sessions.create(st, idx, now, req.node, body))
    return Response.of_json({"ID": sess.id})


def session_destroy(app: App, req: Request, sid: str) -> Response:
    if not sid:
        raise BadRequest("Missing session")
    app.store.write(lambda st, idx, now: sessions.destroy(st, idx, now, sid))
    return Response.of_json(True)


def session_renew(app: App, req: Request, sid: str) -> Response:
    if not sid:
        raise BadRequest("Missing session")

    def renew(st: State, idx: int, now: float) -> tuple[int, list[dict[str, object]] | None]:
        sess = sessions.renew(st, now, sid)
        return st.max_index("sessions"), None if sess is None else [sess.to_json()]

    index, body = app.store.write(renew)
    if body is None:
        return Response.of_text(f"Session id '{sid}' not found", 404)
    return Response.of_json(body).set_meta(index)


def _session_read(app: App, req: Request, pick: str, arg: str) -> Response:
    mode = consistency(req)
    min_index, wait = req.blocking()

    def query(st: State) -> tuple[int, list[dict[str, object]], Watch]:
        if pick == "info":
            found = [st.sessions[arg]] if arg in st.sessions else []
        elif pick == "node":
            found = sessions.node_sessions(st, arg)
        else:
            found = sorted(st.sessions.values(), key=lambda s: s.create_index)
        return st.max_index("sessions"), [s.to_json() for s in found], Watch(tables=("sessions",))

    index, body = app.store.blocking(query, min_index, wait)
    return Response.of_json(body).set_meta(index, mode)


def session_info(app: App, req: Request, sid: str) -> Response:
    if not sid:
        raise BadRequest("Missing session")
    return _session_read(app, req, "info", sid)


def session_list(app: App, req: Request, _: str) -> Response:
    return _session_read(app, req, "list", "")


def session_node(app: App, req: Request, node: str) -> Response:
    if not node:
        raise BadRequest("Missing node name")
    return _session_read(app, req, "node", node)


# -- status -----------------------------------------------------------------------------------

SERVER_RPC_ADDR = "127.0.0.1:8300"  # what a single dev server reports as raft address


def status_leader(app: App, req: Request, _: str) -> Response:
    return Response.of_json(SERVER_RPC_ADDR)


def status_peers(app: App, req: Request, _: str) -> Response:
    return Response.of_json([SERVER_RPC_ADDR])
