"""Maintenance detection and the drain state machine, with a scripted local-agent client."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import requests

from worker.maintenance import MaintenanceWatch, maintenance_reason

SVC = "cronsul-n1"


@pytest.mark.parametrize(("checks", "reason"), [
    ({}, None),
    ({"service:cronsul-n1": {"Status": "passing"}}, None),
    ({"_node_maintenance": {"Notes": "kernel update"}}, "node maintenance: kernel update"),
    ({"_service_maintenance:cronsul-n1": {"Notes": ""}}, "service maintenance"),
    ({"_service_maintenance:cronsul-n2": {"Notes": "other node"}}, None),
    ({"_service_maintenance:web-1": {"Notes": "other service"}}, None),
])
def test_maintenance_reason(checks: dict[str, Any], reason: str | None) -> None:
    assert maintenance_reason(checks, SVC) == reason


class FakeAgent:
    def __init__(self) -> None:
        self.answers: list[dict[str, Any] | Exception] = []

    def checks(self) -> dict[str, Any]:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class FakeClient:
    def __init__(self) -> None:
        self.agent = FakeAgent()


class Harness:
    def __init__(self) -> None:
        self.client = FakeClient()
        self.accepting = threading.Event()
        self.accepting.set()
        self.stopping = threading.Event()
        self.step_downs = 0
        self.watch = MaintenanceWatch(self.client, SVC, self.accepting, self._step_down,
                                      lambda: 0, self.stopping)

    def _step_down(self) -> None:
        assert self.watch.active, "must already be ineligible when stepping down"
        self.step_downs += 1

    def poll(self, answer: dict[str, Any] | Exception) -> None:
        self.client.agent.answers.append(answer)
        self.watch.poll_once()


MAINT = {"_node_maintenance": {"Notes": "patching"}}


def test_entering_maintenance_steps_down_once_and_stops_taking_runs() -> None:
    h = Harness()
    h.poll(MAINT)
    h.poll(MAINT)
    assert h.watch.active and h.watch.reason == "node maintenance: patching"
    assert not h.accepting.is_set()
    assert h.step_downs == 1


def test_leaving_maintenance_takes_runs_again() -> None:
    h = Harness()
    h.poll(MAINT)
    h.poll({})
    assert not h.watch.active and h.accepting.is_set()


def test_leaving_maintenance_during_shutdown_keeps_the_consumer_stopped() -> None:
    h = Harness()
    h.poll(MAINT)
    h.stopping.set()
    h.poll({})
    assert not h.watch.active and not h.accepting.is_set()


def test_an_unreachable_consul_keeps_the_last_known_state() -> None:
    h = Harness()
    h.poll(MAINT)
    h.poll(requests.ConnectionError("refused"))
    assert h.watch.active and not h.accepting.is_set()
    h.poll({})
    h.poll(requests.ConnectionError("refused"))
    assert not h.watch.active and h.accepting.is_set()
