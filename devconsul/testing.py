"""Test harness: run the Consul dev server as a real subprocess.

    with DevConsul() as consul:
        c = consul_client(consul.address)          # "127.0.0.1:PORT"
        n2 = consul.add_agent("node-2")           # another agent endpoint, same cluster
        consul.fault("node-2", "hang")            # or "refuse" / "ok"
        consul.serf("node-2", "critical")         # node seen dead: its sessions die
        consul.step_clock(30)                     # TTL timers fire as if 30 s had passed
        consul.restart(keep_state=True)           # same ports; TTL timers restart at full length

Dev/test only. Note that python-consul2's ``Consul()`` prefers the CONSUL_HTTP_ADDR environment
variable over its host/port arguments.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from devconsul.persist import JOURNAL_FILE, STATE_FILE

HOST = "127.0.0.1"
READY_PREFIX = "devconsul listening on "
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class DevConsulError(RuntimeError):
    pass


class DevConsul:
    """A running ``python -m devconsul`` on a free loopback port."""

    def __init__(self, data_dir: str | Path | None = None, *, node_name: str = "devconsul",
                 port: int | None = None, agents: dict[str, int] | None = None,
                 startup_timeout: float = 15.0, verbose: bool = False,
                 start: bool = True) -> None:
        self._tmp = None if data_dir is not None else tempfile.mkdtemp(prefix="devconsul-")
        self.data_dir = Path(data_dir) if data_dir is not None else Path(str(self._tmp))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.node_name = node_name
        self.port = port or free_port()
        self.agents: dict[str, int] = dict(agents or {})
        self.startup_timeout = startup_timeout
        self.verbose = verbose
        self.proc: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        if start:
            self.start()

    # -- addresses -------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def address(self) -> str:
        """``host:port`` of the main node, as CONSUL_HTTP_ADDR takes it."""
        return f"{HOST}:{self.port}"

    @property
    def http_addr(self) -> str:
        return f"http://{HOST}:{self.port}"

    def agent_address(self, node: str) -> str:
        if node == self.node_name:
            return self.address
        return f"{HOST}:{self.agents[node]}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "devconsul.log"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise DevConsulError("already running")
        cmd = [sys.executable, "-m", "devconsul", "--port", str(self.port),
               "--node-name", self.node_name, "--data-dir", str(self.data_dir)]
        for name, port in self.agents.items():
            cmd += ["--agent", f"{name}={port}"]
        if self.verbose:
            cmd.append("--verbose")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT),
                                                        env.get("PYTHONPATH", "")) if p)
        self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=env, cwd=str(REPO_ROOT))
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise DevConsulError(f"devconsul did not start in {self.startup_timeout}s; "
                                     f"see {self.log_path}") from None
            if line is None:
                raise DevConsulError(f"devconsul exited with {self.proc.wait()}: "
                                     f"{self.log_path.read_text()[-2000:]}")
            if line.startswith(READY_PREFIX):
                break
        for name, port in self._control("GET", "/_dev/agents").items():
            if name != self.node_name:
                self.agents[name] = int(port)

    @staticmethod
    def _pump(stream: IO[str] | None, lines: queue.Queue[str | None]) -> None:
        if stream is None:
            return
        for line in stream:
            lines.put(line.strip())
        lines.put(None)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL: no final save, like a crashed server."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.stop()

    def restart(self, keep_state: bool = True) -> None:
        """Stop and start on the same ports (agent endpoints included)."""
        self.stop()
        if not keep_state:
            for name in (STATE_FILE, JOURNAL_FILE):
                with contextlib.suppress(FileNotFoundError):
                    (self.data_dir / name).unlink()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> DevConsul:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- control API -----------------------------------------------------------------------

    def _control(self, method: str, path: str, **params: str) -> Any:
        url = self.http_addr + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        req = urllib.request.Request(url, method=method, data=b"" if method == "PUT" else None)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise DevConsulError(f"{method} {path}: {exc.code} {exc.read().decode()}") from exc

    def add_agent(self, node: str, port: int = 0) -> str:
        """Start another agent endpoint (its own Consul node); returns ``host:port``."""
        out = self._control("PUT", "/_dev/agents/" + urllib.parse.quote(node),
                            port=str(port))
        self.agents[node] = int(out["port"])
        return f"{HOST}:{out['port']}"

    def fault(self, node: str, mode: str) -> None:
        """``refuse``, ``hang`` or ``ok`` for that node's endpoint only."""
        self._control("PUT", "/_dev/fault/" + urllib.parse.quote(node), mode=mode)

    def serf(self, node: str, status: str) -> None:
        """``critical`` makes the node look dead (serfHealth critical), ``passing`` alive."""
        self._control("PUT", "/_dev/serf/" + urllib.parse.quote(node), status=status)

    def step_clock(self, seconds: float) -> None:
        self._control("PUT", "/_dev/clock", step=f"{seconds}s")

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = self._control("GET", "/_dev/state")
        return out
