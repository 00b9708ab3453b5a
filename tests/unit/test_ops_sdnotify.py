"""sd_notify over a real AF_UNIX datagram socket: path and abstract addresses, no-op without one."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.sdnotify import Notifier


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(2)
        yield s, str(path)


def test_ready_goes_to_the_socket_as_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled and n.ready("follower")
    assert sock.recv(4096).decode().split("\n") == [
        "READY=1", "STATUS=follower", f"MAINPID={os.getpid()}"]


def test_status_is_sent_only_when_it_changes(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.status("leader")
    assert not n.status("leader")
    assert n.status("draining")
    assert [sock.recv(4096), sock.recv(4096)] == [b"STATUS=leader", b"STATUS=draining"]


def test_abstract_namespace_address() -> None:
    name = f"cronsul-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(2)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert s.recv(4096) == b"WATCHDOG=1"


def test_without_notify_socket_everything_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready("leader") and not n.watchdog() and not n.stopping()
    assert n.watchdog_interval_s is None


def test_a_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).watchdog()


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 10.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 10.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_a_third_of_watchdog_usec(
    env: dict[str, str], interval: float | None
) -> None:
    assert Notifier(env).watchdog_interval_s == interval
