"""`cronsul logs --follow` and `--attempt` with a real agent on a real redis-server: live output
of a command and of a callable shown before the run ends, a finished run, a queued run, Ctrl-C,
a retried run's kept attempts, and the refusals of a bad --attempt or an unknown run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis

from cronsul_testing import REPO, Cluster, RedisServer, wait_until
from devconsul.testing import DevConsul
from worker.cli import main
from worker.config import Config, load_config
from worker.keys import Keys
from worker.opcmds import enqueue_manual

KEYS = Keys("cronsul")
NEVER = "@yearly"  # these jobs only run when a test enqueues them
Capture = pytest.CaptureFixture[str]


def sh(script: str, **extra: object) -> dict[str, object]:
    return {"schedule": NEVER, "command": ["/bin/sh", "-c", script], "timeout": "60s", **extra}


JOBS = {
    # 8 lines 0.5 s apart (about 4 s), then exit 3: the run fails.
    "printer": sh('i=1; while [ $i -le 8 ]; do echo "line $i"; sleep 0.5; i=$((i+1)); done; '
                  "exit 3"),
    "py-ticker": {"schedule": NEVER, "timeout": "60s", "callable": "pyjobs_fixture:ticker",
                  "params": [{"n": "8", "every": "0.5"}]},
    "quick": sh('echo "hello from quick"'),
    "exclusive": sh('echo "run $CRONSUL_RUN_ID"; sleep 2; echo done', overlap="queue"),
    "flaky": sh('echo "attempt $CRONSUL_ATTEMPT output"; [ "$CRONSUL_ATTEMPT" -ge 2 ] || exit 4',
                retries=1, retry_backoff="1s"),
    "long": sh('echo started; sleep 30; echo never'),
}


@dataclass
class Node:
    cfg: Config
    config: str
    r: redis.Redis


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, redis_proc: RedisServer) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("follow")
    consul = DevConsul(data_dir=tmp / "consul-data")
    r = redis_proc.client()
    r.flushdb()
    cluster = Cluster(tmp, consul, redis_proc.url, ["n1"], JOBS,
                      worker_extra={"visibility_timeout": "10s"})
    cluster.start()
    try:
        wait_until(lambda: "agent_started" in cluster.agents["n1"].log.read_text(), 30,
                   what="the agent")
        config = str(cluster.agents["n1"].config)
        yield Node(load_config(config), config, r)
    finally:
        cluster.stop()
        consul.close()
        r.close()


@dataclass
class Follower:
    """`cronsul logs RUN_ID --follow` in a process of its own; stdout lines as they come."""

    proc: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode().rstrip("\n"))

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        assert self.reader is not None
        self.reader.join(5)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read().decode()


def follow(node: Node, run_id: str, *extra: str) -> Follower:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "logs", run_id, "-f",
                             "-c", node.config, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    f = Follower(proc)
    f.reader = threading.Thread(target=f.read, daemon=True)
    f.reader.start()
    return f


def run(node: Node, job: str, params: dict[str, str] | None = None) -> str:
    return enqueue_manual(node.cfg, node.r, job, params or {})


def state(node: Node, run_id: str) -> str:
    value = node.r.hget(KEYS.run(run_id), "state")
    return value.decode() if isinstance(value, bytes) else ""


def cli(capsys: Capture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_follow_shows_a_commands_lines_before_it_ends_and_exits_with_its_status(
        node: Node) -> None:
    run_id = run(node, "printer")
    f = follow(node, run_id)
    wait_until(lambda: "line 1" in f.lines, 15, what="the first line, live")
    # Shown while the run was still going (it takes about 4 s), from its live stream.
    assert state(node, run_id) == "running"
    live = KEYS.live(run_id, 1)
    assert 0 < node.r.pttl(live) <= 30_000
    code, err = f.finish()
    assert code == 1  # exit 3: the run failed
    assert f.lines == [f"line {i}" for i in range(1, 9)]  # each once, in order
    assert err.strip().splitlines()[-1].startswith(f"{run_id}: failed on n1, attempt 1")
    assert "exit 3" in err and "Traceback" not in err
    # After the end the stream only lingers briefly (the record keeps the tail).
    wait_until(lambda: 0 < node.r.pttl(live) <= 10_000 or not node.r.exists(live), 5,
               what="the live stream to expire soon")


@pytest.mark.slow
def test_follow_of_a_callable_shows_its_prints_live(node: Node) -> None:
    run_id = run(node, "py-ticker", {"n": "8", "every": "0.5"})
    f = follow(node, run_id)
    wait_until(lambda: "tick 0" in f.lines, 15, what="the callable's first print, live")
    assert state(node, run_id) == "running"
    code, err = f.finish()
    assert code == 0, err
    assert f.lines == [*(f"tick {i}" for i in range(8)), "return value: 'ticked'"]
    assert f"{run_id}: succeeded on n1" in err


@pytest.mark.slow
def test_follow_of_a_finished_run_prints_what_logs_prints(node: Node, capsys: Capture) -> None:
    run_id = run(node, "quick")
    wait_until(lambda: state(node, run_id) == "succeeded", 15, what="the quick run")
    # A run that ends within a second never publishes live output.
    assert not node.r.exists(KEYS.live(run_id, 1))
    code, out, err = cli(capsys, "logs", run_id, "-f", "-c", node.config)
    assert code == 0
    assert (out, err) == cli(capsys, "logs", run_id, "-c", node.config)[1:]
    assert out == "hello from quick\n"


@pytest.mark.slow
def test_follow_of_a_queued_run_waits_for_it_to_start(node: Node) -> None:
    first = run(node, "exclusive")
    wait_until(lambda: state(node, first) == "running", 15, what="the first run")
    second = run(node, "exclusive")  # waits for the overlap lock the first holds
    f = follow(node, second)
    code, err = f.finish()
    assert code == 0, err
    assert f.lines == [f"run {second}", "done"]
    assert err.count(f"[cronsul: {second} is queued; waiting for it to start]") == 1, err
    assert f"{second}: succeeded on n1" in err


@pytest.mark.slow
def test_ctrl_c_stops_following_cleanly(node: Node) -> None:
    run_id = run(node, "long")
    f = follow(node, run_id)
    wait_until(lambda: "started" in f.lines, 15, what="the long run's first line")
    f.proc.send_signal(signal.SIGINT)
    code, err = f.finish()
    assert code == 130
    assert "Traceback" not in err and f"stopped following {run_id}" in err
    assert state(node, run_id) == "running"  # the run goes on
    assert main(["stop", run_id, "-c", node.config]) == 0


@pytest.mark.slow
def test_a_retried_runs_attempts_are_kept_and_followed(node: Node, capsys: Capture) -> None:
    run_id = run(node, "flaky")
    f = follow(node, run_id)  # through both attempts
    code, err = f.finish()
    assert code == 0, err
    assert f.lines == ["attempt 1 output", "attempt 2 output"]
    assert "failed (retried) on n1, attempt 1" in err and "exit 4" in err
    assert "waiting for attempt 2" in err

    code, out, err = cli(capsys, "logs", run_id, "-c", node.config)
    assert (code, out) == (0, "attempt 2 output\n")
    assert "[cronsul: attempt 1 kept too: --attempt N]" in err
    assert f"{run_id}: succeeded on n1, attempt 2" in err

    code, out, err = cli(capsys, "logs", run_id, "--attempt", "1", "-c", node.config)
    assert (code, out) == (0, "attempt 1 output\n")
    assert f"{run_id}: failed (retried) on n1, attempt 1" in err and "exit 4" in err
    assert "kept too" not in err

    code, out, _ = cli(capsys, "logs", run_id, "--attempt", "1", "--json", "-c", node.config)
    view = json.loads(out)
    assert (view["attempt"], view["state"], view["exit_code"], view["output"],
            view["attempts_kept"]) == (1, "retrying", 4, "attempt 1 output\n", [1])

    code, out, _ = cli(capsys, "logs", run_id, "--attempt", "2", "-c", node.config)
    assert (code, out) == (0, "attempt 2 output\n")

    # Bad --attempt values: exit 2, and the message names the option and the value.
    for bad, says in (("0", "'0': attempts are numbered from 1"),
                      ("-1", "'-1': attempts are numbered from 1"),
                      ("x", "'x' is not a whole number")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main(["logs", run_id, "--attempt", bad, "-c", node.config])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and "argument --attempt" in err and says in err, err
    code, out, err = cli(capsys, "logs", run_id, "--attempt", "3", "-c", node.config)
    assert (code, out) == (2, "")
    assert f"--attempt 3: run {run_id} has had 2 attempts (--attempt 1 to 2)" in err, err


@pytest.mark.slow
def test_an_unknown_run_is_still_an_error(node: Node, capsys: Capture) -> None:
    for extra in ([], ["-f"], ["--attempt", "1"]):
        code, out, err = cli(capsys, "logs", "quick@nope", *extra, "-c", node.config)
        assert (code, out) == (2, ""), extra
        assert "no run 'quick@nope'" in err, (extra, err)
