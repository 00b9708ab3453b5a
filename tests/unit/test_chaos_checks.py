"""The chaos checker's duplicate rule (tests/chaos/checks.py), on hand-made executions."""

from __future__ import annotations

from chaos.checks import Exec, Report, _duplicates
from chaos.workload import WorkloadJob

RETRYING = WorkloadJob("retrying", period_s=5, sleep_s=0.1, timeout_s=10, exit_code=1,
                       retries=2)
RUN = "retrying@1795397500000"
S = 1_795_397_500_000_000_000  # ns


def attempts(*nodes_and_ends: tuple[str, float]) -> list[Exec]:
    out = []
    for i, (node, end_s) in enumerate(nodes_and_ends, 1):
        out.append(Exec(RUN, "2026-11-23T01:31:40Z", node, 1000 + i, str(i),
                        start_ns=S + int((end_s - 0.1) * 1e9), end_ns=S + int(end_s * 1e9)))
    return out


def test_a_retried_run_whose_node_died_before_recording_an_attempt_is_excused() -> None:
    # Attempt 3 ended 4 ms after its node was killed (seed 51): it was never recorded, so the
    # run came back as attempt 4. Four completions of a job allowed three, excused once.
    execs = attempts(("n1", 1.37), ("n5", 2.55), ("n4", 4.629), ("n2", 9.11))
    report = Report()
    _duplicates(RUN, RETRYING, execs, {"n4": [(1795397504.625, "kill9")]}, report)
    assert report.duplicates == 0 and report.reexecuted_after_crash == 1


def test_a_retried_run_that_ran_once_too_often_without_a_crash_is_a_duplicate() -> None:
    execs = attempts(("n1", 1.37), ("n5", 2.55), ("n4", 4.629), ("n2", 9.11))
    report = Report()
    _duplicates(RUN, RETRYING, execs, {}, report)
    assert report.duplicates == 1


def test_one_crash_does_not_excuse_two_extra_completions() -> None:
    execs = attempts(("n1", 1.37), ("n5", 2.55), ("n4", 4.629), ("n2", 9.11), ("n3", 12.0))
    report = Report()
    _duplicates(RUN, RETRYING, execs, {"n4": [(1795397504.625, "kill9")]}, report)
    assert report.duplicates == 1


def test_pool_workers_finds_an_agents_warm_processes_and_living_drops_the_dead() -> None:
    """The chaos run's check that a kill -9'd agent's warm Python processes die with it (the
    marker cannot see them: their environment is the agent's base one)."""
    import os
    import signal
    import time

    from chaos.procwatch import living, pool_workers
    from worker.pyjobs import PythonPool

    pool = PythonPool(2, watchdog=None)
    pool.start()
    try:
        found = pool_workers(os.getpid())
        assert found == set(pool.pids()) and len(found) == 2
        victim = min(found)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while victim in living(found) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert living(found) == found - {victim}
    finally:
        pool.stop()
