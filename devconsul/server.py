"""HTTP plumbing: one ThreadingHTTPServer per agent endpoint, HTTP/1.1 keep-alive."""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from devconsul.faults import reset
from devconsul.web import Request, Response

if TYPE_CHECKING:
    from devconsul.app import App

log = logging.getLogger("devconsul")
MAX_BODY = 8 * 1024 * 1024  # refuse absurd bodies before reading them


class AgentHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], app: App, node: str) -> None:
        self.app = app
        self.node = node
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: AgentHTTPServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle plus the
        # client's delayed ACK would add ~40 ms to every keep-alive request.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.app.faults.track(self.server.node, self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.app.faults.untrack(self.server.node, self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.app.verbose:
            sys.stderr.write(f"{self.server.node} {format % args}\n")

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length > 0 else b""

    def _gate(self) -> bool:
        if self.server.app.faults.pass_gate(self.server.node):
            return True
        self.close_connection = True
        reset(self.connection)
        return False

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        control = path.startswith("/_dev/") or path == "/_dev"
        try:
            body = self._read_body()
        except ValueError:
            self._send(Response.of_text("Request body too large", 413))
            return
        if not control and not self._gate():
            return
        req = Request(
            node=self.server.node, method=self.command, path=path,
            query=parse_qs(parts.query, keep_blank_values=True), body=body,
            headers={k.lower(): v for k, v in self.headers.items()},
        )
        faults = self.server.app.faults
        if control:  # a control call (say, "refuse this node") must not cut itself off
            faults.untrack(self.server.node, self.connection)
        try:
            resp = self.server.app.dispatch(req)
        finally:
            if control:
                faults.track(self.server.node, self.connection)
        if not control and not self._gate():
            return
        self._send(resp)

    def _send(self, resp: Response) -> None:
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(len(resp.body)))
            self.send_header("Vary", "Accept-Encoding")
            for name, value in resp.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(resp.body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
