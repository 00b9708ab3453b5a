"""The dev server application: one shared store, one HTTP endpoint per simulated agent."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable

from devconsul import catalog, control
from devconsul import routes_agent as ra
from devconsul import routes_kv as rk
from devconsul.acl import AllowAll, Authorizer
from devconsul.errors import ConsulError
from devconsul.faults import FaultBoard
from devconsul.server import AgentHTTPServer
from devconsul.store import Store
from devconsul.web import Request, Response

log = logging.getLogger("devconsul")

# serve_forever's selector timeout: only a fallback, shutdown() wakes servers with a connection.
POLL_INTERVAL = 5.0
Handler = Callable[["App", Request, str], Response]
READ = ("GET", "HEAD")
WRITE = ("PUT", "POST")
ANY = ("GET", "HEAD", "PUT", "POST", "DELETE")

# (methods, path, prefix?) -> handler; a prefix route passes the rest of the path as argument.
ROUTES: list[tuple[tuple[str, ...], str, bool, Handler]] = [
    (ANY, "/v1/kv/", True, rk.kv_endpoint),
    (WRITE, "/v1/txn", False, rk.txn_endpoint),
    (WRITE, "/v1/session/create", False, rk.session_create),
    (WRITE, "/v1/session/destroy/", True, rk.session_destroy),
    (WRITE, "/v1/session/renew/", True, rk.session_renew),
    (READ, "/v1/session/info/", True, rk.session_info),
    (READ, "/v1/session/list", False, rk.session_list),
    (READ, "/v1/session/node/", True, rk.session_node),
    (READ, "/v1/status/leader", False, rk.status_leader),
    (READ, "/v1/status/peers", False, rk.status_peers),
    (READ, "/v1/agent/self", False, ra.agent_self),
    (READ, "/v1/agent/members", False, ra.agent_members),
    (READ, "/v1/agent/services", False, ra.agent_services),
    (READ, "/v1/agent/checks", False, ra.agent_checks),
    (WRITE, "/v1/agent/maintenance", False, ra.node_maintenance),
    (WRITE, "/v1/agent/service/register", False, ra.service_register),
    (WRITE, "/v1/agent/service/deregister/", True, ra.service_deregister),
    (WRITE, "/v1/agent/service/maintenance/", True, ra.service_maintenance),
    (WRITE, "/v1/agent/check/register", False, ra.check_register),
    (WRITE, "/v1/agent/check/deregister/", True, ra.check_deregister),
    (WRITE, "/v1/agent/check/pass/", True, ra.check_pass),
    (WRITE, "/v1/agent/check/warn/", True, ra.check_warn),
    (WRITE, "/v1/agent/check/fail/", True, ra.check_fail),
    (WRITE, "/v1/agent/check/update/", True, ra.check_update),
    (READ, "/v1/health/service/", True, ra.health_service),
    (READ, "/v1/health/node/", True, ra.health_node),
    (READ, "/v1/health/checks/", True, ra.health_checks),
    (READ, "/v1/health/state/", True, ra.health_state),
    (READ, "/v1/catalog/nodes", False, ra.catalog_nodes),
    (READ, "/v1/catalog/services", False, ra.catalog_services),
    (READ, "/v1/catalog/service/", True, ra.catalog_service),
    (READ, "/v1/catalog/node/", True, ra.catalog_node),
    (READ, "/v1/catalog/datacenters", False, ra.catalog_datacenters),
    (WRITE, "/_dev/agents/", True, control.agents_put),
    (READ, "/_dev/agents", False, control.agents_get),
    (WRITE, "/_dev/fault/", True, control.fault),
    (WRITE, "/_dev/serf/", True, control.serf),
    (WRITE, "/_dev/clock", False, control.clock),
    (READ, "/_dev/state", False, control.state),
]


class App:
    def __init__(self, store: Store, main_node: str, host: str = "127.0.0.1",
                 announce: Callable[[str], None] = print, verbose: bool = False,
                 acl: Authorizer | None = None) -> None:
        self.store = store
        self.acl: Authorizer = acl or AllowAll()
        self.main_node = main_node
        self.host = host
        self.faults = FaultBoard()
        self.verbose = verbose
        self._announce = announce
        self._servers: dict[str, AgentHTTPServer] = {}
        self._lock = threading.Lock()

    def endpoints(self) -> dict[str, int]:
        with self._lock:
            return {n: s.server_address[1] for n, s in self._servers.items()}

    def add_agent(self, node: str, port: int = 0) -> int:
        """Start (or find) the HTTP endpoint of the agent ``node``; returns its port."""
        with self._lock:
            if node in self._servers:
                return self._servers[node].server_address[1]
            self.store.write(lambda st, idx, now: catalog.ensure_node(st, idx, node))
            server = AgentHTTPServer((self.host, port), self, node)
            self._servers[node] = server
            bound = int(server.server_address[1])
            threading.Thread(target=server.serve_forever, args=(POLL_INTERVAL,),
                             name=f"devconsul-http-{node}", daemon=True).start()
        if node != self.main_node:
            self.store.write(lambda st, idx, now: st.agents.__setitem__(node, bound))
            self.store.save()
            self._announce(f"devconsul agent {node} listening on {self.host}:{bound}")
        else:
            self._announce(f"devconsul listening on {self.host}:{bound}")
        return bound

    def dispatch(self, req: Request) -> Response:
        allowed: tuple[str, ...] = ()
        for methods, path, prefix, handler in ROUTES:
            if req.path == path or (prefix and req.path.startswith(path)) \
                    or (prefix and req.path == path.rstrip("/")):
                if req.method not in methods:
                    allowed = methods
                    continue
                arg = req.path[len(path):] if prefix else ""
                return self._call(handler, req, arg)
        if allowed:
            return Response.of_text(f"method {req.method} not allowed", 405)
        return Response.of_text("404 page not found", 404)

    def _call(self, handler: Handler, req: Request, arg: str) -> Response:
        try:
            self.acl.authorize(req)
            return handler(self, req, arg)
        except ConsulError as exc:
            return Response.of_text(exc.message, exc.status)
        except ValueError as exc:
            return Response.of_text(f"Request decode failed: {exc}", 400)
        except Exception as exc:  # answer like Consul does (500 + text) and keep serving
            log.exception("handler failed for %s %s", req.method, req.path)
            return Response.of_text(f"devconsul internal error: {exc}", 500)

    def shutdown(self) -> None:
        self.faults.stop()
        self.store.stop()
        with self._lock:
            servers = list(self._servers.values())
        # shutdown() blocks until serve_forever notices; stop them all at once and wake each
        # selector with a connection instead of waiting for its poll interval.
        stoppers = [threading.Thread(target=s.shutdown, daemon=True) for s in servers]
        for t in stoppers:
            t.start()
        for server in servers:
            with contextlib.suppress(OSError), \
                    socket.create_connection((self.host, server.server_address[1]), timeout=1):
                pass
        for t, server in zip(stoppers, servers, strict=True):
            t.join(POLL_INTERVAL + 1)
            server.server_close()
        self.store.close()
