"""Python callable jobs: a warm worker pool isolated from the agent (worker/pyjobs.py)."""

from __future__ import annotations

import functools
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cronsul_testing import wait_until
from scheduler.errors import ConfigError, CronsulError
from worker.executor import OUTPUT_LIMIT, Outcome
from worker.pyjobs import PyExecution, PythonPool, validate_target
from worker.pyworker import OUTPUT_LIMIT as WORKER_DEFAULT_LIMIT
from worker.watchdog import Watchdog

FIX = "pyjobs_fixture"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie only waits for its parent to reap it
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped meanwhile (the pool reaps at once)
        return False


@pytest.fixture
def pool() -> Iterator[PythonPool]:
    p = PythonPool(2, watchdog=None, max_rss_mb=256)
    p.start()
    yield p
    pids = p.pids()
    p.stop()
    wait_until(lambda: not any(pid_alive(x) for x in pids), 5, what="pool workers to exit")


def run(pool: PythonPool, func: str, /, timeout: float = 10, env: dict[str, str] | None = None,
        **kwargs: str) -> Outcome:
    return pool.run(f"{FIX}:{func}", kwargs, env or {}, timeout)


def test_success_records_output_and_return_value(pool: PythonPool) -> None:
    out = run(pool, "add", a="2", b="40")
    assert out.ok and out.exit_code == 0 and out.error is None and not out.timed_out
    assert out.output == "adding 2 and 40\nreturn value: 42\n"


def test_exception_fails_the_run_with_type_message_and_traceback(pool: PythonPool) -> None:
    out = run(pool, "fail", reason="disk full")
    assert not out.ok and out.exit_code == 1 and out.error is not None
    assert out.error.startswith("ValueError: bad thing: disk full\nTraceback")
    assert "in _inner" in out.error and "pyjobs_fixture.py" in out.error
    assert "pyworker.py" not in out.error  # the job's frames, not ours
    assert run(pool, "noop").ok


def test_sys_exit_is_the_runs_exit_code_and_the_worker_lives_on(pool: PythonPool) -> None:
    before = pool.pids()
    out = run(pool, "exit_with", code="3")
    assert out.exit_code == 3 and out.error is None and not out.ok
    assert pool.pids() == before


def test_sys_exit_true_is_exit_status_1(pool: PythonPool) -> None:
    out = run(pool, "exit_with", code="True")
    assert out.exit_code == 1 and type(out.exit_code) is int, out


def test_the_memory_cap_leaves_room_for_threads() -> None:
    """The cap is on data (RLIMIT_DATA), not address space: each thread's malloc arena
    reserves 64 MiB, so under a 1 GiB RLIMIT_AS a pool of 32 threads could not even start."""
    p = PythonPool(1, watchdog=None, max_rss_mb=1024)
    p.start()
    try:
        out = run(p, "threads", n="32")
        assert out.ok, out
        blown = run(p, "hog_memory", mb="1500")
        assert blown.error is not None and blown.error.startswith("MemoryError"), blown
    finally:
        p.stop()


def test_a_jobs_output_limit_applies_to_its_callable(pool: PythonPool) -> None:
    for limit in (1000, 0):
        start = functools.partial(PyExecution(pool).start, output_limit=limit)
        out = pool.reactor.wait_for(start, f"{FIX}:chatty", {"n": "300000"}, {}, 10)
        assert out.output_bytes == 300003 + len("from fd 2\n")
        assert len(out.output) == limit, (limit, len(out.output))
        assert out.output.endswith("from fd 2\n") if limit else out.output == ""


def test_timeout_kills_the_worker_and_the_pool_recovers() -> None:
    p = PythonPool(1, watchdog=None)
    p.start()
    try:
        [old] = p.pids()
        started = time.monotonic()
        out = run(p, "sleep", timeout=0.5, seconds="60")
        assert out.timed_out and out.signal == signal.SIGKILL and not out.ok
        assert out.error is not None and "timed out after 0.5s" in out.error
        assert time.monotonic() - started < 5
        assert not pid_alive(old)
        after = run(p, "add", a="1", b="1")
        assert after.ok and "return value: 2" in after.output
        assert p.pids() != [old]
    finally:
        p.stop()


def test_timeout_kills_what_the_job_started(tmp_path: Path, pool: PythonPool) -> None:
    pidfile = tmp_path / "child.pid"
    out = run(pool, "spawn_and_hang", timeout=2, pidfile=str(pidfile))
    assert out.timed_out
    wait_until(lambda: not pid_alive(int(pidfile.read_text())), 5, what="grandchild to die")


def test_os_exit_fails_the_run_and_the_pool_recovers(pool: PythonPool) -> None:
    out = run(pool, "hard_exit", code="7")
    assert not out.ok and out.exit_code == 7 and out.signal is None
    assert out.error is not None and "died: exit code 7" in out.error
    assert f"{FIX}:hard_exit" in out.error
    assert run(pool, "noop").ok
    assert len(pool.pids()) == 2


def test_segfault_fails_the_run_with_a_traceback_and_the_pool_recovers(pool: PythonPool) -> None:
    out = run(pool, "segfault")
    assert not out.ok and out.signal == signal.SIGSEGV and out.exit_code is None
    assert out.error is not None and "SIGSEGV" in out.error
    assert "Segmentation fault" in out.output and "in segfault" in out.output
    assert [run(pool, "noop").ok for _ in range(4)] == [True] * 4


def test_memory_blow_up_fails_the_run_not_the_agent(pool: PythonPool) -> None:
    before = set(pool.pids())
    out = run(pool, "hog_memory", mb="1024")  # the pool's cap is 256 MB
    assert not out.ok and out.exit_code == 1
    assert out.error is not None and out.error.startswith("MemoryError")
    wait_until(lambda: len(pool.pids()) == 2 and set(pool.pids()) != before, 5,
               what="the worker to be replaced")
    assert run(pool, "hog_memory", mb="50").ok


def test_run_environment_is_visible_and_does_not_leak(pool: PythonPool) -> None:
    env = {"CRONSUL_RUN_ID": "job@2024-01-01T00:00:00.000Z", "CRONSUL_JOB": "job"}
    out = run(pool, "getenv", env=env, name="CRONSUL_RUN_ID")
    assert out.output == "return value: 'job@2024-01-01T00:00:00.000Z'\n"
    for _ in range(4):  # both workers, whichever served the first run
        assert run(pool, "getenv", name="CRONSUL_RUN_ID").output == ""


def test_a_new_run_id_every_run_does_not_grow_the_worker(one: PythonPool) -> None:
    """glibc's setenv() never frees a value it replaced: setting each run's CRONSUL_RUN_ID
    through it grew a warm worker by about 80 bytes a run, for as long as it lived."""
    def env(i: int) -> dict[str, str]:
        return {"CRONSUL_JOB": "job", "CRONSUL_RUN_ID": f"job@{1_700_000_000_000 + i}#p"}

    def in_use(i: int) -> int:
        out = run(one, "malloc_in_use", env=env(i))
        value = out.output.removeprefix("return value: ").strip()
        if value == "None":
            pytest.skip("no glibc mallinfo2() here (the leak is glibc's setenv())")
        return int(value)

    runs = 3000
    for i in range(200):  # warm up: imports, buffers, the allocator's own state
        assert run(one, "noop", env=env(i)).ok
    before = in_use(200)
    for i in range(201, 201 + runs):
        assert run(one, "noop", env=env(i)).ok
    grown = in_use(201 + runs) - before
    assert grown < runs * 10, f"malloc'd memory grew {grown} bytes over {runs} runs"
    last = env(201 + runs)["CRONSUL_RUN_ID"]
    assert run(one, "getenv", env=env(201 + runs), name="CRONSUL_RUN_ID").output == \
        f"return value: {last!r}\n"


def test_a_callables_own_environment_changes_are_undone() -> None:
    p = PythonPool(1, watchdog=None)
    p.start()
    try:
        env = {"CRONSUL_JOB": "job"}
        assert run(p, "set_environ", env=env).ok  # sets CRONSUL_JOB and CRONSUL_EXTRA
        assert run(p, "getenv", env=env, name="CRONSUL_JOB").output == "return value: 'job'\n"
        assert run(p, "getenv", env=env, name="CRONSUL_EXTRA").output == ""
    finally:
        p.stop()


def test_agent_secrets_are_not_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "secret")
    p = PythonPool(1, watchdog=None)
    p.start()
    try:
        assert run(p, "getenv", name="CONSUL_HTTP_TOKEN").output == ""
        assert run(p, "getenv", name="PATH").output.startswith("return value: '")
    finally:
        p.stop()


def test_bad_targets_fail_the_run_naming_the_target(pool: PythonPool) -> None:
    cases = {
        "nomodule": "expected 'package.module:function'",
        "no_such_module_here:f": "cannot import module 'no_such_module_here'",
        f"{FIX}:missing": "has no attribute 'missing'",
        f"{FIX}:NOT_CALLABLE": "is not callable (it is a int)",
    }
    for target, expected in cases.items():
        out = pool.run(target, {}, {}, 10)
        assert not out.ok and out.exit_code is None and out.error is not None
        assert repr(target) in out.error and expected in out.error, out.error
    assert run(pool, "noop").ok


def test_wrong_keyword_arguments_fail_the_run(pool: PythonPool) -> None:
    out = run(pool, "add", a="1", c="2")
    assert out.exit_code == 1 and out.error is not None and out.error.startswith("TypeError")


@pytest.mark.parametrize("target", ["nomodule", "pkg.mod:", ":func", "pkg..mod:f", "pkg.mod:f g",
                                    "pkg.class:f", "pkg.mod:f:g", "1pkg:f", ""])
def test_validate_target_refuses_bad_syntax(target: str) -> None:
    with pytest.raises(ConfigError, match=re.escape("expected 'package.module:function'")):
        validate_target(target)


@pytest.mark.parametrize("target", ["pkg.mod:func", "mod:Class.method", "a.b.c:_private"])
def test_validate_target_accepts_good_syntax_without_importing(target: str) -> None:
    validate_target(target)
    assert target.split(":")[0] not in sys.modules


def test_output_is_captured_from_python_and_fds_and_capped(pool: PythonPool) -> None:
    out = run(pool, "chatty", n="300000")
    assert out.output_bytes == 300003 + len("from fd 2\n")
    assert out.output.endswith("xEND" + "from fd 2\n") and len(out.output) == OUTPUT_LIMIT
    assert WORKER_DEFAULT_LIMIT == OUTPUT_LIMIT


def test_concurrent_runs_use_all_workers() -> None:
    p = PythonPool(4, watchdog=None)
    p.start()
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(8) as ex:
            outs = list(ex.map(lambda i: run(p, "sleep", seconds="0.5"), range(8)))
        elapsed = time.monotonic() - started
        assert all(o.ok and "slept" in o.output for o in outs)
        assert 1.0 <= elapsed < 1.8  # two waves of four
    finally:
        p.stop()


def test_stop_kills_a_running_job_from_another_thread(pool: PythonPool) -> None:
    execution = pool.execution()
    threading.Timer(0.3, execution.stop).start()
    started = time.monotonic()
    out = execution.run(f"{FIX}:sleep", {"seconds": "60"}, {}, 30)
    assert time.monotonic() - started < 5
    assert not out.ok and out.signal == signal.SIGKILL and not out.timed_out
    assert out.error is not None and "stopped" in out.error
    assert run(pool, "noop").ok


def test_throughput_of_no_op_jobs() -> None:
    p = PythonPool(2, watchdog=None)
    p.start()
    env = {"PATH": "/usr/bin:/bin", "CRONSUL_JOB": "noop", "CRONSUL_NODE": "n1",
           "CRONSUL_ATTEMPT": "1", "CRONSUL_SCHEDULED_AT": "2024-01-01T00:00:00Z"}
    total, threads = 20_000, 2
    failures: list[Outcome] = []

    def loop(n: int) -> None:
        for i in range(n):
            out = p.run(f"{FIX}:noop", {}, {**env, "CRONSUL_RUN_ID": f"noop@{i}"}, 10)
            if not out.ok:
                failures.append(out)

    try:
        workers = [threading.Thread(target=loop, args=(total // threads,))
                   for _ in range(threads)]
        started = time.perf_counter()
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        rate = total / (time.perf_counter() - started)
    finally:
        p.stop()
    print(f"\npython pool: {rate:,.0f} no-op jobs/s (size 2, 2 threads, {total:,} jobs)")
    assert not failures
    assert rate > 1000  # a floor far below the measured rate: catches a per-job process spawn


def test_workers_killed_by_the_watchdog_deadline_are_replaced() -> None:
    w = Watchdog()
    w.start()
    p = PythonPool(2, watchdog=w)
    p.start()
    try:
        before = p.pids()
        w.deadline(time.monotonic() + 0.2)  # as if the agent froze: every tracked group dies
        wait_until(lambda: not any(pid_alive(x) for x in before), 5, what="workers killed")
        assert [run(p, "noop").ok for _ in range(4)] == [True] * 4
        assert len(p.pids()) == 2 and not set(p.pids()) & set(before)
    finally:
        p.stop()
        w.stop()


def test_start_reports_a_worker_that_cannot_start() -> None:
    p = PythonPool(1, watchdog=None, env={"PYTHONHOME": "/nonexistent"})
    with pytest.raises(CronsulError, match=r"python worker .* exit status 1"):
        p.start()
    assert p.pids() == []


OWNER = """
import sys, threading, time
from worker.pyjobs import PythonPool
from worker.watchdog import Watchdog
w = Watchdog(); w.start()
pool = PythonPool(2, watchdog=w); pool.start()
threading.Thread(target=pool.run, args=("pyjobs_fixture:sleep", {"seconds": "300"}, {}, 600),
                 daemon=True).start()
time.sleep(0.5)
open(sys.argv[1], "w").write(" ".join(map(str, pool.pids())))
time.sleep(300)
"""


def test_sigkilled_owner_leaves_no_pool_worker_behind(tmp_path: Path) -> None:
    pidfile = tmp_path / "workers"
    root = Path(__file__).resolve().parent.parent.parent
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(pidfile)],
        env={**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"})
    try:
        wait_until(lambda: pidfile.exists() and pidfile.read_text(), 20, what="pool start")
        pids = [int(x) for x in pidfile.read_text().split()]
        assert len(pids) == 2 and all(pid_alive(x) for x in pids)
    finally:
        owner.kill()
        owner.wait()
    wait_until(lambda: not any(pid_alive(x) for x in pids), 5, what="pool workers to die")


def test_workers_that_die_young_are_replaced_after_a_growing_pause(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.pyjobs as pyjobs

    p = PythonPool(2, watchdog=None)
    p.start()
    spawns = [0]
    real_spawn = PythonPool._spawn

    def counting(self: PythonPool) -> object:
        spawns[0] += 1
        return real_spawn(self)

    try:
        monkeypatch.setattr(PythonPool, "_spawn", counting)
        monkeypatch.setattr(pyjobs, "BOOTSTRAP", "import sys; sys.exit(3)")  # a broken start
        os.killpg(p.pids()[0], signal.SIGKILL)  # the OOM killer takes an idle worker
        time.sleep(3)
        assert 1 <= spawns[0] <= 8, spawns[0]  # not a respawn loop spinning the reactor
        monkeypatch.undo()  # workers can start again: the pool heals, runs go through
        outs = [run(p, "noop") for _ in range(4)]
        assert all(o.ok for o in outs), outs
    finally:
        p.stop()


def test_a_run_waiting_for_a_worker_gets_one_after_a_failed_replacement(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import worker.pyjobs as pyjobs

    p = PythonPool(1, watchdog=None)
    p.start()
    real_popen = pyjobs.subprocess.Popen
    fails = [1]

    def flaky(*args: object, **kwargs: object) -> object:
        if fails[0]:
            fails[0] -= 1
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real_popen(*args, **kwargs)  # type: ignore[call-overload]

    held, waiting = threading.Event(), threading.Event()
    outcomes: list[Outcome] = []

    def go() -> None:
        p.execution().start(f"{FIX}:sleep", {"seconds": "5"}, {}, 0.5,
                            lambda o: held.set())  # times out: its worker is killed
        p.execution().start(f"{FIX}:noop", {}, {}, 5.0,
                            lambda o: (outcomes.append(o), waiting.set()))
        monkeypatch.setattr(pyjobs.subprocess, "Popen", flaky)  # the replacement fails once

    try:
        p.reactor.call_soon(go)
        assert held.wait(5)
        assert waiting.wait(10), "the waiting run never got a worker"
        assert outcomes[0].ok, outcomes
    finally:
        p.stop()


# -- prefetch: runs queued inside a busy worker ------------------------------------------------

def _submit(p: PythonPool, calls: list[tuple[str, dict[str, str], float]],
            ) -> tuple[list[PyExecution], list[queue.Queue[Outcome]]]:
    """Start every call in one turn of the reactor (so they queue) and return their handles
    and the boxes their outcomes land in."""
    runs = [p.execution() for _ in calls]
    boxes: list[queue.Queue[Outcome]] = [queue.Queue() for _ in calls]

    def go() -> None:
        for r, (func, kwargs, timeout), box in zip(runs, calls, boxes, strict=True):
            r.start(f"{FIX}:{func}", kwargs, {}, timeout, box.put)

    p.reactor.call(go, 5)
    return runs, boxes


def _depths(p: PythonPool) -> tuple[list[int], int]:
    """(runs sent to each busy worker and not answered yet, runs waiting for a worker)."""
    return p.reactor.call(lambda: (sorted(len(w.queue) for w in p._live if w.queue),
                                   len(p._waiting)), 5)


@pytest.fixture
def one() -> Iterator[PythonPool]:
    """One warm process that may hold four runs."""
    p = PythonPool(1, watchdog=None, prefetch=4)
    p.start()
    yield p
    p.stop()


def test_short_runs_queue_inside_a_busy_worker_each_with_its_own_output(
        one: PythonPool) -> None:
    assert run(one, "say", text="warm").ok  # both callables are now known to be short
    assert run(one, "sleep", seconds="0").ok
    _, boxes = _submit(one, [("sleep", {"seconds": "0.3"}, 10)]
                       + [("say", {"text": f"t{i}"}, 10) for i in range(5)])
    assert _depths(one) == ([4], 2)  # three sent behind the first, two waiting
    assert boxes[0].get(timeout=10).ok
    outs = [b.get(timeout=10) for b in boxes[1:]]
    for i, out in enumerate(outs):
        assert out.ok and out.output == f"py:t{i}\nfd:t{i}\n", out
        assert out.output_bytes == len(out.output)


def test_a_run_stays_out_of_a_busy_worker_whose_run_is_long(one: PythonPool) -> None:
    assert run(one, "sleep", seconds="0").ok
    _, boxes = _submit(one, [("sleep", {"seconds": "1"}, 10)])
    time.sleep(0.2)  # the running one is no longer young: a new run waits for a free worker
    _, later = _submit(one, [("sleep", {"seconds": "0"}, 10)])
    assert _depths(one) == ([1], 1)
    assert boxes[0].get(timeout=10).ok and later[0].get(timeout=10).ok


def test_a_callable_that_ran_long_is_not_queued_behind_another(one: PythonPool) -> None:
    assert run(one, "sleep", seconds="0.2").ok  # known to take 0.2 s: never queued inside
    _, boxes = _submit(one, [("sleep", {"seconds": "0.3"}, 10)]
                       + [("sleep", {"seconds": "0"}, 10)] * 2)
    assert _depths(one) == ([1], 2)
    assert all(b.get(timeout=10).ok for b in boxes)


def test_runs_queued_behind_a_timed_out_run_run_on_its_replacement(one: PythonPool) -> None:
    assert run(one, "sleep", seconds="0").ok
    before = one.pids()
    started = time.monotonic()
    _, boxes = _submit(one, [("sleep", {"seconds": "30"}, 0.5)]
                       + [("sleep", {"seconds": "0"}, 10)] * 3)
    assert _depths(one) == ([4], 0)
    head = boxes[0].get(timeout=10)
    assert head.timed_out and head.signal == signal.SIGKILL
    assert all(b.get(timeout=10).ok for b in boxes[1:])  # re-sent, not failed
    assert time.monotonic() - started < 5 and one.pids() != before


def test_runs_queued_behind_a_crash_run_on_its_replacement(one: PythonPool) -> None:
    assert run(one, "maybe_exit", code="0").ok
    _, boxes = _submit(one, [("maybe_exit", {"code": "7", "delay": "0.3"}, 10)]
                       + [("maybe_exit", {"code": "0"}, 10)] * 3)
    assert _depths(one) == ([4], 0)
    head = boxes[0].get(timeout=10)
    assert head.exit_code == 7 and not head.ok
    rest = [b.get(timeout=10) for b in boxes[1:]]
    assert all(o.ok and "lived" in o.output for o in rest), rest


def test_runs_queued_behind_a_memory_blow_up_run_on_its_replacement() -> None:
    p = PythonPool(1, watchdog=None, max_rss_mb=256, prefetch=4)
    p.start()
    try:
        assert run(p, "hog_memory", mb="1").ok
        _, boxes = _submit(p, [("hog_memory", {"mb": "100000", "delay": "0.3"}, 30)]
                           + [("hog_memory", {"mb": "1"}, 30)] * 3)
        assert _depths(p) == ([4], 0)
        head = boxes[0].get(timeout=30)
        assert not head.ok and head.error is not None and "MemoryError" in head.error
        assert all(b.get(timeout=30).ok for b in boxes[1:])
    finally:
        p.stop()


def test_a_queued_run_that_is_stopped_is_killed_when_its_turn_comes(one: PythonPool) -> None:
    assert run(one, "sleep", seconds="0").ok
    runs, boxes = _submit(one, [("sleep", {"seconds": "0.3"}, 10),
                                ("sleep", {"seconds": "20"}, 30),
                                ("sleep", {"seconds": "0"}, 10)])
    assert _depths(one) == ([3], 0)
    runs[1].stop()
    assert boxes[0].get(timeout=10).ok
    stopped = boxes[1].get(timeout=10)
    assert not stopped.ok and stopped.error is not None and "stopped" in stopped.error
    assert stopped.duration_s < 5
    assert boxes[2].get(timeout=10).ok


def _submit_busy(p: PythonPool, calls: list[tuple[str, dict[str, str], float]],
                 busy_s: float) -> list[queue.Queue[Outcome]]:
    """Like _submit, then keep the reactor busy for ``busy_s`` (replies pile up unread)."""
    boxes: list[queue.Queue[Outcome]] = [queue.Queue() for _ in calls]

    def go() -> None:
        for (func, kwargs, timeout), box in zip(calls, boxes, strict=True):
            p.execution().start(f"{FIX}:{func}", kwargs, {}, timeout, box.put)
        time.sleep(busy_s)

    p.reactor.call(go, 30)
    return boxes


def test_a_big_reply_read_late_is_not_taken_for_a_death(one: PythonPool, tmp_path: Path,
                                                        ) -> None:
    marks = tmp_path / "starts"
    assert run(one, "mark_then", path=str(tmp_path / "warm")).ok
    # 65,536 two-byte characters: the head's output spans several receives; the run queued
    # behind it dies at once, so by the time the reactor looks the worker is gone.
    boxes = _submit_busy(one, [("big", {"n": "65536", "ch": "é"}, 0.2),
                               ("mark_then", {"path": str(marks), "code": "3"}, 10)], 0.5)
    head, second = boxes[0].get(timeout=20), boxes[1].get(timeout=20)
    assert head.ok and not head.timed_out and head.output_bytes == 131072
    assert head.output == "é" * 32768  # the last 64 KiB, as for a command's output
    assert second.exit_code == 3
    time.sleep(0.3)
    assert len(marks.read_text().splitlines()) == 1  # started once, not again elsewhere


def test_a_run_stopped_before_it_starts_leaves_the_worker_usable(one: PythonPool) -> None:
    e, box = one.execution(), queue.Queue[Outcome]()
    e.stop()  # the lease was lost between the claim and the start
    one.reactor.call_soon(e.start, f"{FIX}:noop", {}, {}, 10, box.put)
    out = box.get(timeout=5)
    assert out.error is not None and "stopped before it started" in out.error
    assert run(one, "noop").ok  # the worker went back to the pool


def test_requests_bigger_than_the_socket_buffer_reach_the_worker(one: PythonPool) -> None:
    before = one.pids()
    out = run(one, "getenv", env={"BIG": "x" * 300_000}, name="BIG")
    assert out.ok and out.output == "return value: '" + "x" * 2047 + "...\n"
    assert one.pids() == before  # no worker was taken for dead


def test_many_queued_requests_never_overflow_the_socket() -> None:
    p = PythonPool(1, watchdog=None, prefetch=30)
    p.start()
    try:
        assert run(p, "noop").ok and run(p, "sleep", seconds="0").ok
        calls = [("sleep", {"seconds": "0.3"}, 10.0)] + [("noop", {}, 10.0)] * 24
        boxes: list[queue.Queue[Outcome]] = [queue.Queue() for _ in calls]

        def go() -> None:  # 24 requests of 15 KiB each: more than the socket buffer holds
            for (func, kwargs, timeout), box in zip(calls, boxes, strict=True):
                p.execution().start(f"{FIX}:{func}", kwargs, {"PAD": "x" * 15_000}, timeout,
                                    box.put)

        p.reactor.call(go, 10)
        assert _depths(p)[0][0] > 10
        outs = [b.get(timeout=20) for b in boxes]
        assert all(o.ok for o in outs), {o.error for o in outs if not o.ok}
    finally:
        p.stop()


def test_a_run_sent_after_the_one_before_ended_gets_its_whole_timeout(one: PythonPool) -> None:
    assert run(one, "sleep", seconds="0").ok and run(one, "noop").ok
    first, second = queue.Queue[Outcome](), queue.Queue[Outcome]()

    def go() -> None:
        one.execution().start(f"{FIX}:noop", {}, {}, 10, first.put)
        time.sleep(0.045)  # the first ends meanwhile; its reply is not read yet
        one.execution().start(f"{FIX}:sleep", {"seconds": "0.46"}, {}, 0.5, second.put)
        assert len(next(iter(one._live)).queue) == 2  # sent behind the unanswered first

    one.reactor.call(go, 5)
    assert first.get(timeout=5).ok
    out = second.get(timeout=5)
    assert out.ok and not out.timed_out


def test_a_stopped_queued_run_is_skipped_by_its_worker(one: PythonPool, tmp_path: Path) -> None:
    marks = tmp_path / "starts"
    assert run(one, "mark_then", path=str(tmp_path / "warm")).ok and run(one, "sleep",
                                                                         seconds="0").ok
    runs, boxes = _submit(one, [("sleep", {"seconds": "0.3"}, 10),
                                ("mark_then", {"path": str(marks), "delay": "5"}, 10),
                                ("sleep", {"seconds": "0"}, 10)])
    assert _depths(one) == ([3], 0)
    runs[1].stop()
    assert boxes[0].get(timeout=10).ok
    skipped = boxes[1].get(timeout=10)
    assert skipped.error is not None and "stopped before it started" in skipped.error
    assert boxes[2].get(timeout=10).ok
    assert not marks.exists()  # its code never ran
    assert len(one.pids()) == 1 and run(one, "noop").ok


def test_short_runs_are_not_queued_behind_a_known_long_run() -> None:
    p = PythonPool(2, watchdog=None, prefetch=4)
    p.start()
    try:
        assert run(p, "noop").ok and run(p, "sleep", seconds="0.3").ok  # sleep: known long
        started = time.monotonic()
        _, first = _submit(p, [("sleep", {"seconds": "0.3"}, 10)])
        time.sleep(0.1)
        _, boxes = _submit(p, [("sleep", {"seconds": "2"}, 10), ("noop", {}, 10)])
        assert _depths(p) == ([1, 1], 1)  # the noop waits: both current runs are long ones
        assert boxes[1].get(timeout=10).ok
        assert time.monotonic() - started < 1.5  # the first free worker took it, at 0.3 s
        assert first[0].get(timeout=5).ok and boxes[0].get(timeout=10).ok
    finally:
        p.stop()


def test_a_worker_dying_with_requests_unread_is_a_death_not_a_protocol_error(
        one: PythonPool) -> None:
    assert run(one, "maybe_exit", code="0").ok
    _, boxes = _submit(one, [("maybe_exit", {"code": "7", "delay": "0.3"}, 10),
                             ("maybe_exit", {"code": "0"}, 10)])
    head = boxes[0].get(timeout=10)
    assert head.exit_code == 7 and head.error is not None and "died" in head.error
    assert boxes[1].get(timeout=10).ok


def test_a_big_worker_slow_to_die_does_not_stall_the_reactor(tmp_path: Path) -> None:
    """Killing a worker that holds 1.5 GiB takes the kernel about 0.1 s here (0.5 s for 6 GiB);
    the reactor, which serves every run of the node, must not wait for it: it waits
    ``reap_wait_s`` (REAP_WAIT_S, 0.05 s; 0 here, to tell the two apart), then reaps the
    worker when its pidfd fires."""
    p = PythonPool(2, watchdog=None, max_rss_mb=None, reap_wait_s=0.0)
    p.start()
    mark = tmp_path / "allocated"
    gaps: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            began = time.monotonic()
            p.reactor.call(lambda: None, 10)
            gaps.append(time.monotonic() - began)
            time.sleep(0.002)

    try:
        with ThreadPoolExecutor(1) as ex:
            big = ex.submit(run, p, "hold_memory", timeout=6, mb="1536", mark=str(mark))
            wait_until(mark.exists, 6, what="the worker to hold its memory")
            [big_pid] = [x for x in p.pids() if _holds(x, 1 << 30)]
            prober = threading.Thread(target=probe)
            prober.start()
            out = big.result(timeout=20)
            time.sleep(0.5)
            done.set()
            prober.join()
        assert out.timed_out and out.error is not None and "timed out" in out.error
        assert out.signal == signal.SIGKILL  # reported as killed, though reaped later
        assert max(gaps) < 0.05, f"the reactor stalled {max(gaps):.3f}s"
        wait_until(lambda: not pid_alive(big_pid), 5, what="the big worker reaped")
        assert run(p, "add", a="2", b="3").ok
    finally:
        done.set()
        p.stop()


def _holds(pid: int, rss_bytes: int) -> bool:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >= rss_bytes
    except OSError:
        return False


def test_stopping_the_pool_reaps_a_killed_worker_still_dying(tmp_path: Path) -> None:
    p = PythonPool(1, watchdog=None, max_rss_mb=None, reap_wait_s=0.0)
    p.start()
    mark = tmp_path / "allocated"
    try:
        with ThreadPoolExecutor(1) as ex:
            big = ex.submit(run, p, "hold_memory", timeout=6, mb="1024", mark=str(mark))
            wait_until(mark.exists, 6, what="the worker to hold its memory")
            [big_pid] = p.pids()
            assert big.result(timeout=20).timed_out
    finally:
        p.stop()  # right after the kill: its reap may still be pending
    assert not Path(f"/proc/{big_pid}").exists(), "left a zombie"


class _LogRecorder:
    """Stands in for the agent's run logger (bound with the run id): records events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []
        self._lock = threading.Lock()

    def info(self, event: str, **fields: object) -> None:
        with self._lock:
            self.events.append((event, fields))

    def lines(self) -> list[object]:
        with self._lock:
            return [f["line"] for e, f in self.events if e == "run_output"]


def _start(p: PythonPool, func: str, kwargs: dict[str, str], timeout: float,
           log: _LogRecorder) -> queue.Queue[Outcome]:
    box: queue.Queue[Outcome] = queue.Queue()
    e = p.execution(log)
    p.reactor.call(lambda: e.start(f"{FIX}:{func}", kwargs, {}, timeout, box.put), 10)
    return box


def test_a_callables_output_reaches_the_log_while_it_runs(pool: PythonPool,
                                                          tmp_path: Path) -> None:
    log, go = _LogRecorder(), tmp_path / "go"
    box = _start(pool, "print_then_wait", {"path": str(go)}, 20, log)
    wait_until(lambda: log.lines() == ["step 1: fetched", "step 2: parsed"], 5,
               what="the first lines logged while the callable still runs")
    assert box.empty()
    go.touch()
    out = box.get(timeout=10)
    assert out.ok
    assert out.output == ("step 1: fetched\nstep 2: parsed\nstep 3: uploading... done\n"
                          "return value: 'waited'\n")
    assert log.lines() == ["step 1: fetched", "step 2: parsed", "step 3: uploading... done",
                           "return value: 'waited'"]


def test_a_callable_killed_by_its_timeout_keeps_what_it_printed(pool: PythonPool,
                                                                tmp_path: Path) -> None:
    log = _LogRecorder()
    out = _start(pool, "print_then_wait", {"path": str(tmp_path / "never")}, 1, log
                 ).get(timeout=15)
    assert out.timed_out and out.signal == signal.SIGKILL
    # The partial line was flushed (print(..., flush=True)), so it is kept too.
    assert out.output == "step 1: fetched\nstep 2: parsed\nstep 3: uploading..."
    assert out.output_bytes == len(out.output)
    assert log.lines() == ["step 1: fetched", "step 2: parsed", "step 3: uploading..."]


def test_a_callables_log_gets_its_first_200_lines_then_a_count(pool: PythonPool) -> None:
    log = _LogRecorder()
    out = _start(pool, "many_lines", {"n": "5000"}, 20, log).get(timeout=15)
    assert out.ok and out.output.endswith("line 4999\n")
    assert log.lines() == [f"line {i}" for i in range(200)]
    [(_, truncated)] = [(e, f) for e, f in log.events if e == "run_output_truncated"]
    assert truncated["lines_not_logged"] == 4800


def test_what_a_forked_child_of_a_callable_prints_is_kept(pool: PythonPool) -> None:
    out = run(pool, "fork_child_prints")
    assert out.ok and sorted(out.output.splitlines()) == ["from the child", "from the parent"]


def test_a_worker_dying_while_its_forked_child_lives_does_not_stall_the_pool(
        one: PythonPool, tmp_path: Path) -> None:
    """The child holds the worker's socket open: the pool must not wait for its EOF."""
    pidfile = tmp_path / "child"
    began = time.monotonic()
    out = run(one, "fork_then_die", pidfile=str(pidfile), timeout=20)
    assert time.monotonic() - began < 5  # before: the reactor spun until the child exited
    assert out.exit_code == 5 and out.output == "forking\n"
    assert out.error is not None and "died: exit code 5" in out.error
    child = int(pidfile.read_text())
    wait_until(lambda: not pid_alive(child), 5, what="the child killed with the worker's group")
    assert run(one, "add", a="1", b="1").ok


def test_a_worker_started_by_an_agent_that_does_not_stream_replies_with_all_its_output() -> None:
    """During an upgrade, an agent still running the old code starts workers from the new
    files: without ``"stream"`` in the first frame they must speak the old protocol (the
    output in the reply, no ``"out"`` frames the old agent would take for replies)."""
    from worker.pyjobs import BOOTSTRAP
    from worker.pyworker import Inbox, encode

    ours, theirs = socket.socketpair()
    out_file = tempfile.TemporaryFile()  # noqa: SIM115  # fds 1/2, as the pool gives them
    proc = subprocess.Popen([sys.executable, "-c", BOOTSTRAP, str(theirs.fileno())],
                            pass_fds=(theirs.fileno(),), stdout=out_file, stderr=out_file,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    theirs.close()
    try:
        ours.settimeout(20)
        inbox = Inbox(ours)

        def receive() -> dict[str, object]:
            while (frame := inbox.frame()) is None:
                assert inbox.fill(), "the worker closed its socket"
            return frame

        ours.sendall(encode({"path": sys.path, "max_rss_mb": None, "output_limit": 1000}))
        assert "ready" in receive()
        ours.sendall(encode({"target": f"{FIX}:say", "kwargs": {"text": "hi"}, "env": {}}))
        reply = receive()
        assert reply["code"] == 0 and reply["output"] == "py:hi\nfd:hi\n", reply
    finally:
        ours.close()
        proc.wait(10)
        out_file.close()


def test_renew_makes_the_next_runs_import_new_job_code(tmp_path: Path) -> None:
    """A deploy replaces a job's module, then `systemctl reload cronsul` renews the pool: idle
    workers are replaced at once, a busy one when its run ends (that run is not killed)."""
    module = tmp_path / "deployed_job.py"
    module.write_text("import time\n"
                      "def version():\n    return 'v1'\n"
                      "def slow(seconds):\n    time.sleep(float(seconds))\n    return 'slow v1'\n")
    sys.path.insert(0, str(tmp_path))  # the pool hands its workers this process's sys.path
    p = PythonPool(2, watchdog=None)
    try:
        p.start()
        assert p.run("deployed_job:version", {}, {}, 10).output == "return value: 'v1'\n"
        box: queue.Queue[Outcome] = queue.Queue()
        busy = p.execution()
        p.reactor.call(lambda: busy.start("deployed_job:slow", {"seconds": "1"}, {}, 10,
                                          box.put), 10)
        module.write_text("def version():\n    return 'v2 (deployed)'\n")
        old = set(p.pids())
        p.renew()
        # The idle worker was replaced; the busy one finishes its run with the old code.
        assert p.run("deployed_job:version", {}, {}, 10).output == \
            "return value: 'v2 (deployed)'\n"
        slow = box.get(timeout=10)
        assert slow.ok and slow.output == "return value: 'slow v1'\n"
        wait_until(lambda: not old & set(p.pids()) and len(p.pids()) == 2, 10,
                   what="every worker of the old generation replaced")
        outs = [p.run("deployed_job:version", {}, {}, 10) for _ in range(4)]
        assert {o.output for o in outs} == {"return value: 'v2 (deployed)'\n"}
    finally:
        p.stop()
        sys.path.remove(str(tmp_path))


def test_a_short_run_costs_the_worker_microseconds() -> None:
    """The streamed-output writer blocked and restored every signal at the end of every run,
    and for each frame it sent, through signal.valid_signals() and enum conversions: about
    250 µs a run, which took the no-op drain from 7,800 to 2,600 runs/s unnoticed for a
    session. A generous bound: a run that prints a line and returns a value (two frames) takes
    about 10 µs here; the bug made it 25 times that."""
    from worker.pyworker import Runner

    sent: list[object] = []
    runner = Runner(OUTPUT_LIMIT, None, sent.append)
    runner.run("pyjobs_fixture:add", {"a": "1", "b": "2"}, {"CRONSUL_RUN_ID": "warm"})
    started = time.perf_counter()
    for i in range(1000):
        runner.run("pyjobs_fixture:add", {"a": "1", "b": "2"}, {"CRONSUL_RUN_ID": f"r{i}"})
    per_run = (time.perf_counter() - started) / 1000
    assert per_run < 150e-6, f"{per_run * 1e6:.0f} µs a run"
    assert sent[-2:] == [{"out": "adding 1 and 2\n"}, {"out": "return value: 3\n"}]
