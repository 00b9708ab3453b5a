"""The agent's small HTTP endpoint (``[http] listen``): ``/metrics``, ``/healthz`` and, for
every other path, the dashboard (worker/dashboard/, docs/dashboard.md).

Standard library ``http.server`` in one daemon thread per request; nothing here blocks the
agent. GET never changes state; the dashboard's actions are POSTs, off unless
``[http] admin_token_file`` is set.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

if TYPE_CHECKING:
    from worker.dashboard import Dashboard

# (ok, body) for /healthz.
HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]
# A connection that sends nothing for this long is closed: each holds a thread in the agent (a
# security review reached 452 threads with idle half-requests). A scrape takes milliseconds.
REQUEST_TIMEOUT_S = 10.0
# Connections served at once; more are closed at once: the agent's memory and descriptors are
# not the HTTP server's to spend.
MAX_CONNECTIONS = 64


class OpsHTTPServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 health: HealthCheck, dashboard: Dashboard | None = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        log = structlog.get_logger("cronsul.http")
        slots = threading.BoundedSemaphore(max_connections)

        class Handler(BaseHTTPRequestHandler):
            server_version = "cronsul"
            timeout = request_timeout_s

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                    elif path == "/healthz":
                        ok, body = health()
                        self._send(200 if ok else 503, "application/json",
                                   json.dumps(body, sort_keys=True).encode() + b"\n")
                    elif dashboard is not None:
                        dashboard.serve(self, "GET")
                    else:
                        self._send(404, "text/plain; charset=utf-8", b"not found\n")
                except Exception:
                    log.exception("http_handler_failed", path=path)
                    self._send(500, "text/plain; charset=utf-8", b"internal error\n")

            def do_POST(self) -> None:
                if dashboard is None:
                    self._send(405, "text/plain; charset=utf-8", b"method not allowed\n")
                else:
                    dashboard.serve(self, "POST")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every few seconds would drown the journal

        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

            def process_request(self, request: Any, client_address: Any) -> None:
                if not slots.acquire(blocking=False):
                    self.shutdown_request(request)  # full: refused, not queued
                    return
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    slots.release()
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    slots.release()

        self._server = Server((host, port), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="http",
                                        kwargs={"poll_interval": 0.5}, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
