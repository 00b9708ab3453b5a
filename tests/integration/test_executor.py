"""Job processes: argv without a shell, process groups killed on timeout and with the agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from cronsul_testing import REPO, wait_until
from worker.executor import Execution, job_environment
from worker.watchdog import Watchdog


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose; it only waits for its parent to reap it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped between open and read
        return False


def test_argv_is_not_interpreted_by_a_shell(tmp_path: Path) -> None:
    hostile = "$(touch pwned); `touch pwned2`; rm -rf /nonexistent"
    out = Execution(None, 1).run(["/bin/echo", hostile], {"PATH": "/usr/bin:/bin"},
                                 str(tmp_path), 10)
    assert out.ok and out.output == hostile + "\n"
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()


def test_environment_has_base_job_and_cronsul_variables_only() -> None:
    env = job_environment({"PATH": "/bin", "CONSUL_HTTP_TOKEN": "secret", "HOME": "/root"},
                          [("APP_MODE", "batch")], {"CRONSUL_JOB": "j"})
    assert env == {"PATH": "/bin", "HOME": "/root", "APP_MODE": "batch", "CRONSUL_JOB": "j"}


def test_a_job_run_as_another_user_gets_crons_path_not_the_agents() -> None:
    agent = {"PATH": "/root/.cargo/bin:/usr/bin:/bin", "HOME": "/root"}
    account = {"HOME": "/home/batch", "USER": "batch", "LOGNAME": "batch", "SHELL": "/bin/sh"}
    env = job_environment(agent, [], {}, account)
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin" and env["HOME"] == "/home/batch"
    assert job_environment(agent, [("PATH", "/opt/x/bin")], {}, account)["PATH"] == "/opt/x/bin"


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    started = time.monotonic()
    out = Execution(None, 0.5).run(["/bin/sh", "-c", script], {"PATH": "/usr/bin:/bin"}, None, 1.0)
    assert out.timed_out and not out.ok
    assert time.monotonic() - started < 5
    child = int(pidfile.read_text())
    wait_until(lambda: not pid_alive(child), 5, what="grandchild to die")


def test_term_ignoring_job_is_killed_after_grace(tmp_path: Path) -> None:
    script = "trap '' TERM; sleep 300"
    out = Execution(None, 0.3).run(["/bin/sh", "-c", script], {"PATH": "/usr/bin:/bin"}, None, 0.5)
    assert out.timed_out and out.signal == signal.SIGKILL


GRACEFUL = REPO / "tests" / "graceful_job.py"  # cleans up on SIGTERM, then writes its marker


def test_a_program_under_a_shell_keeps_the_kill_grace_after_the_shell_dies(
        tmp_path: Path) -> None:
    """`sh -c` (shell = true, wrapper scripts) dies at once on TERM; the program it started
    still gets the rest of the grace to clean up, and the run ends when its group is done,
    not at the end of the grace."""
    marker = tmp_path / "cleaned"
    script = GRACEFUL
    started = time.monotonic()
    out = Execution(None, 5.0).run(
        ["/bin/sh", "-c", f'echo start; {sys.executable} {script} {marker}; echo after'],
        {"PATH": "/usr/bin:/bin"}, None, 1.0)
    took = time.monotonic() - started
    assert out.timed_out and marker.read_text() == "cleaned up", out.output
    assert "TERM received" in out.output
    assert took < 4.0, took  # reaped once the group closed its output, not after 1 s + 5 s


def test_the_grace_holds_when_the_program_under_the_shell_writes_to_a_file(
        tmp_path: Path) -> None:
    """The usual cron line `sh -c 'job >> /var/log/job.log 2>&1'`: only the shell holds the
    output pipe, so the pipe closing says nothing about the group; the job still gets its
    grace (the group is watched in /proc)."""
    marker = tmp_path / "cleaned"
    log = tmp_path / "job.log"
    started = time.monotonic()
    out = Execution(None, 5.0).run(
        ["/bin/sh", "-c", f"{sys.executable} {GRACEFUL} {marker} >> {log} 2>&1"],
        {"PATH": "/usr/bin:/bin"}, None, 1.0)
    took = time.monotonic() - started
    assert out.timed_out and marker.read_text() == "cleaned up", log.read_text()
    assert "TERM received" in log.read_text()
    assert took < 4.0, took  # ended once the group was empty, not at the grace end


def test_a_stopped_run_is_not_recorded_as_timed_out_when_its_timeout_passes_in_the_grace(
        tmp_path: Path) -> None:
    from worker.reactor import Reactor

    marker = tmp_path / "cleaned"
    reactor = Reactor("t").start()
    try:
        ex = Execution(None, 3.0, reactor=reactor)
        threading.Timer(0.6, ex.stop).start()  # a lost lease, a replace: before the timeout
        out = ex.run(["/bin/sh", "-c", f"{sys.executable} {GRACEFUL} {marker}"],
                     {"PATH": "/usr/bin:/bin"}, None, 1.0)
    finally:
        reactor.stop()
    assert not out.timed_out and marker.read_text() == "cleaned up", out


def test_a_straggler_that_ignores_term_under_a_shell_is_killed_at_the_grace_end(
        tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = f"(trap '' TERM; sleep 300) & echo $! > {pidfile}; wait"
    started = time.monotonic()
    out = Execution(None, 1.0).run(["/bin/sh", "-c", script], {"PATH": "/usr/bin:/bin"}, None,
                                   0.5)
    took = time.monotonic() - started
    assert out.timed_out and 1.4 < took < 5, took
    wait_until(lambda: not pid_alive(int(pidfile.read_text())), 5, what="straggler to die")


def test_output_tail_is_capped() -> None:
    out = Execution(None, 1).run(
        [sys.executable, "-c", "import sys; sys.stdout.write('x' * 300000 + 'END')"],
        {"PATH": "/usr/bin:/bin"}, None, 10)
    assert out.output_bytes == 300003
    assert out.output.endswith("END") and len(out.output) == 64 * 1024


def test_missing_command_is_reported_not_raised() -> None:
    out = Execution(None, 1).run(["/nonexistent/binary"], {}, None, 5)
    assert not out.ok and out.error is not None and "/nonexistent/binary" in out.error


def test_watchdog_kills_tracked_groups_when_its_owner_dies(tmp_path: Path) -> None:
    # A throwaway "agent" process owns a watchdog and a job, then is SIGKILLed.
    pidfile = tmp_path / "job.pid"
    owner_code = f"""
import subprocess, sys, time
from worker.watchdog import Watchdog
w = Watchdog(); w.start()
p = subprocess.Popen(["sleep", "300"], start_new_session=True)
w.track(p.pid)
open({str(pidfile)!r}, "w").write(str(p.pid))
time.sleep(300)
"""
    owner = subprocess.Popen([sys.executable, "-c", owner_code],
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    wait_until(lambda: pidfile.exists() and pidfile.read_text(), 10, what="job start")
    job = int(pidfile.read_text())
    assert pid_alive(job)
    owner.kill()
    owner.wait()
    wait_until(lambda: not pid_alive(job), 5, what="orphaned job to be killed")


def test_watchdog_kills_when_the_deadline_passes_unrenewed(
        capfd: pytest.CaptureFixture[str]) -> None:
    w = Watchdog("n1")
    w.start()
    try:
        p = subprocess.Popen(["sleep", "300"], start_new_session=True)
        w.track(p.pid)
        w.deadline(time.monotonic() + 0.5)  # as if the agent froze right after this renewal
        assert p.wait(5) == -signal.SIGKILL
        # It says so, on the agent's stderr (the journal): nothing else would.
        line = wait_until(lambda: next((json.loads(x) for x in capfd.readouterr().err
                                        .splitlines() if "watchdog_killed" in x), None), 5,
                          what="the watchdog's log line")
        assert line["node"] == "n1" and line["process_groups"] == [p.pid], line
        assert "did not renew" in line["reason"]
    finally:
        w.stop()


def test_watchdog_kills_jobs_it_was_never_told_about_by_their_token() -> None:
    # The agent can die between spawning a job and writing its track line (chaos seed 7 saw
    # two such jobs run to the end and then run again elsewhere): the token finds them.
    from worker.watchdog import TOKEN_ENV

    w = Watchdog()
    w.start()
    env = {**os.environ, TOKEN_ENV: w.token}
    marked = subprocess.Popen(["sh", "-c", "sleep 300 & wait"], env=env,
                              start_new_session=True)
    unmarked = subprocess.Popen(["sleep", "300"], start_new_session=True)
    other = subprocess.Popen(["sleep", "300"], env={**os.environ, TOKEN_ENV: "someone-else"},
                             start_new_session=True)
    try:
        time.sleep(0.2)
        w.stop()  # stdin closes, as when the agent dies
        assert marked.wait(5) == -signal.SIGKILL  # its whole group, the backgrounded sleep too
        time.sleep(0.3)
        assert unmarked.poll() is None and other.poll() is None
    finally:
        for p in (marked, unmarked, other):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_jobs_do_not_inherit_the_agents_stray_descriptors() -> None:
    from worker.executor import seal_inherited_fds

    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, True)  # as if inherited from whoever started the agent
    try:
        assert seal_inherited_fds() >= 1
        assert not os.get_inheritable(write_fd)
        out = Execution(None, 1).run(["/bin/ls", "/proc/self/fd"], {"PATH": "/usr/bin:/bin"},
                                     None, 5)
        assert out.ok
        assert str(write_fd) not in out.output.split(), out.output
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_a_stop_that_comes_before_the_start_starts_nothing(tmp_path: Path) -> None:
    from worker.reactor import Reactor

    marker = tmp_path / "ran"
    reactor = Reactor().start()
    try:
        ex = Execution(None, 1, reactor=reactor)
        ex.stop()  # the lease was lost (or a replace came) before the reactor launched it
        out = ex.run(["/bin/sh", "-c", f"touch {marker}"], {"PATH": "/usr/bin:/bin"}, None, 5)
    finally:
        reactor.stop()
    assert not out.ok and out.error == "stopped before it started"
    assert not marker.exists()


def test_an_argument_no_process_can_take_fails_the_run_and_leaks_nothing() -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        out = Execution(None, 1).run(["/bin/echo", "a\0b"], {"PATH": "/usr/bin:/bin"}, None, 5)
        assert not out.ok and out.error is not None and "cannot start" in out.error
    assert len(os.listdir("/proc/self/fd")) <= before
