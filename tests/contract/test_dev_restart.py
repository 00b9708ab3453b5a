"""Dev-server-only: restart with and without the data dir's state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

import consul
from devconsul.testing import REPO_ROOT, DevConsul, free_port


def client(address: str, timeout: float = 5.0) -> Any:
    host, port = address.rsplit(":", 1)
    return consul.Consul(host=host, port=int(port), timeout=timeout)


def test_restart_keeps_state_ports_and_indexes(own_dev: DevConsul) -> None:
    b_addr = own_dev.add_agent("node-b")
    c = client(own_dev.address)
    c.kv.put("k", "v")
    c.agent.service.register("svc", service_id="svc", check={"TTL": "60s", "Status": "passing"})
    sid = c.session.create(ttl=10, checks=["serfHealth", "service:svc"])
    c.kv.put("leader", "me", acquire=sid)
    index, _ = c.kv.get("leader")
    own_dev.restart(keep_state=True)
    assert own_dev.agent_address("node-b") == b_addr
    c = client(own_dev.address)
    e = c.kv.get("leader")[1]
    assert e["Session"] == sid and e["Value"] == b"me"
    assert c.kv.get("k")[1]["Value"] == b"v"
    assert c.agent.checks()["service:svc"]["Status"] == "passing"
    assert client(b_addr).agent.self()["Config"]["NodeName"] == "node-b"
    c.kv.put("after", "x")
    assert c.kv.get("after")[1]["ModifyIndex"] > int(index)


def test_restart_restarts_session_ttl_timers_at_full_length(own_dev: DevConsul) -> None:
    c = client(own_dev.address)
    sid = c.session.create(ttl=10)
    own_dev.step_clock(15)  # 5 s of the 20 s left
    own_dev.restart(keep_state=True)
    c = client(own_dev.address)
    own_dev.step_clock(15)  # would have expired without the reset
    time.sleep(0.1)
    assert c.session.info(sid)[1] is not None
    own_dev.step_clock(6)
    deadline = time.monotonic() + 2
    while c.session.info(sid)[1] is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert c.session.info(sid)[1] is None


def test_restart_without_state_loses_everything(own_dev: DevConsul) -> None:
    c = client(own_dev.address)
    for i in range(20):
        c.kv.put(f"k{i}", str(i))
    old_index, _ = c.kv.get("k19")
    own_dev.restart(keep_state=False)
    c = client(own_dev.address)
    assert c.kv.get("k19")[1] is None
    # A client still holding the old (higher) index waits the whole wait, then gets a
    # smaller index and must reset to 0.
    start = time.monotonic()
    r = requests.get(own_dev.http_addr + "/v1/kv/k19",
                     params={"index": old_index, "wait": "1s"}, timeout=5)
    assert time.monotonic() - start >= 1.0
    assert int(r.headers["X-Consul-Index"]) < int(old_index)


def test_sigkill_keeps_what_was_written(own_dev: DevConsul) -> None:
    c = client(own_dev.address)
    c.kv.put("durable", "yes")
    own_dev.kill()
    own_dev.start()
    assert client(own_dev.address).kv.get("durable")[1]["Value"] == b"yes"


def test_sigterm_exits_cleanly(own_dev: DevConsul) -> None:
    proc = own_dev.proc
    assert proc is not None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


@pytest.mark.skipif(bool(os.environ.get("CONSUL_HTTP_ADDR")), reason="dev-server-only test")
def test_acl_enforcement_mode(tmp_path: Path) -> None:
    """Optional coarse mode (--acl-token): unknown tokens get 403 Permission denied."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "devconsul", "--port", str(port),
                             "--acl-token", "s3cret"], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/v1/kv/k"
        r = requests.put(url, data=b"v", timeout=5)
        assert r.status_code == 403 and "Permission denied" in r.text
        with pytest.raises(consul.ACLPermissionDenied):
            consul.Consul(port=port, timeout=5).kv.put("k", "v")
        assert consul.Consul(port=port, token="s3cret", timeout=5).kv.put("k", "v") is True
        assert requests.get(url, params={"token": "s3cret"}, timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
