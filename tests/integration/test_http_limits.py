"""The agent's HTTP endpoint spends bounded threads: idle connections are closed after the
request timeout and connections beyond the cap are refused, and it serves again afterwards (a
security review reached 452 agent threads with idle half-requests)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from prometheus_client import CollectorRegistry

from worker.httpserver import OpsHTTPServer


def test_idle_connections_are_capped_and_closed() -> None:
    server = OpsHTTPServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, {"ok": 1}),
                           request_timeout_s=1.0, max_connections=8)
    server.start()
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
    try:
        for s in idle:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # a request never finished
        time.sleep(0.3)
        assert threading.active_count() - before <= 8  # one thread per served connection
        time.sleep(1.5)  # past the request timeout: the server closed them all
        for s in idle:  # refused at once or timed out: closed by the server either way
            s.settimeout(2)
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
        assert threading.active_count() - before <= 1
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as r:
            assert r.status == 200  # serving again
    finally:
        for s in idle:
            s.close()
        server.close()
