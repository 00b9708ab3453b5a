"""[notify] command: run once per run that ended failed or dead, on the node that recorded it,
with the run in its environment and the output tail on stdin; its own failures are logged and
change nothing."""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from cronsul_testing import Cluster, RedisServer, wait_until
from structlog.testing import capture_logs

from devconsul.testing import DevConsul
from worker.cli import main
from worker.keys import Keys
from worker.notify import Notice, Notifier, NotifySection

KEYS = Keys("cronsul")
NEVER = "0 0 1 1 *"


def recorder(tmp_path: Path) -> tuple[Path, Path]:
    """A notify command that appends one JSON line per notice: its CRONSUL_NOTIFY_* and
    CRONSUL_PARAM_* variables and its stdin."""
    out = tmp_path / "notices.jsonl"
    script = tmp_path / "notify.py"
    script.write_text(
        "import json, os, sys\n"
        "env = {k: v for k, v in os.environ.items() if k.startswith(('CRONSUL_NOTIFY_',"
        " 'CRONSUL_PARAM_'))}\n"
        f"with open({str(out)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'env': env, 'stdin': sys.stdin.read()}) + '\\n')\n")
    return out, script


def notices(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_failed_and_dead_runs_notify_once_and_others_do_not(
        tmp_path: Path, devconsul: DevConsul, redis_proc: RedisServer) -> None:
    r: redis.Redis = redis_proc.client()
    r.flushdb()
    out, script = recorder(tmp_path)
    jobs = {
        "boom": {"schedule": NEVER, "timeout": "10s", "params": [{"tenant": "acme"}],
                 "command": ["/bin/sh", "-c", 'echo "disk full on $CRONSUL_PARAM_TENANT"; exit 3']},
        "flaky": {"schedule": NEVER, "timeout": "10s", "retries": 1, "retry_backoff": "1s",
                  "command": ["/bin/sh", "-c", 'echo "attempt $CRONSUL_ATTEMPT"; exit 1']},
        "fine": {"schedule": NEVER, "timeout": "10s", "command": ["/bin/true"]},
        "quiet": {"schedule": NEVER, "timeout": "10s", "notify": False,
                  "command": ["/bin/false"]},
    }
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1", "n2"], jobs,
                      extra_sections={"notify": {"command": [sys.executable, str(script)]}})
    cluster.start()
    try:
        cluster.wait_leader(30)
        config = str(cluster.agents["n1"].config)
        for job, extra in (("boom", ["--param", "tenant=acme"]), ("flaky", []), ("fine", []),
                           ("quiet", [])):
            assert main(["run", job, "-c", config, *extra]) == 0
        wait_until(lambda: {n["env"]["CRONSUL_NOTIFY_JOB"]
                            for n in notices(out)} >= {"boom", "flaky"}, 30,
                   what="the two notices")
        time.sleep(2)  # anything else would have come by now
        got = {n["env"]["CRONSUL_NOTIFY_JOB"]: n for n in notices(out)}
        assert len(notices(out)) == 2 and set(got) == {"boom", "flaky"}  # once each
        boom = got["boom"]["env"]
        assert boom["CRONSUL_NOTIFY_STATE"] == "failed"
        assert boom["CRONSUL_NOTIFY_EXIT_CODE"] == "3"
        assert boom["CRONSUL_NOTIFY_ERROR"] == "exit code 3"
        assert boom["CRONSUL_PARAM_TENANT"] == "acme"
        assert got["boom"]["stdin"] == "disk full on acme\n"
        run_id = boom["CRONSUL_NOTIFY_RUN_ID"]
        assert r.hget(KEYS.run(run_id), "node") == boom["CRONSUL_NOTIFY_NODE"].encode()
        flaky = got["flaky"]["env"]
        # Retried once, then dead: one notice, for the end, not one per attempt.
        assert (flaky["CRONSUL_NOTIFY_STATE"], flaky["CRONSUL_NOTIFY_ATTEMPT"]) == \
            ("dead", "2")
        assert got["flaky"]["stdin"] == "attempt 2\n"
    finally:
        cluster.stop()


def test_a_failing_or_hung_notify_command_is_logged_and_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    notice = Notice("j@1", "j", "failed", "n1", 1, "2026-11-23T00:00:00Z", "exit code 1")
    failing = Notifier(NotifySection(("/bin/sh", "-c", "echo webhook said 500; exit 4")),
                       {"PATH": "/usr/bin:/bin"}, "n1")
    hung = Notifier(NotifySection(("/bin/sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"),
                                  timeout=timedelta(seconds=1)), {"PATH": "/usr/bin:/bin"}, "n1")
    with capture_logs() as logs:
        failing.offer(notice)
        failing.close()
        began = time.monotonic()
        hung.offer(notice)
        hung.close()
        took = time.monotonic() - began
    failed = [e for e in logs if e["event"] == "notify_failed"]
    assert failed[0]["error"] == "exit code 4" and "webhook said 500" in failed[0]["output"]
    assert failed[1]["error"] == "timed out after 1s" and 1 <= took < 4
    child = int(pidfile.read_text())
    wait_until(lambda: not Path(f"/proc/{child}").exists()
               or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2], 5,
               what="the notify command's child killed with its group")


def test_no_command_or_another_state_sends_nothing(tmp_path: Path) -> None:
    notice = Notice("j@1", "j", "retrying", "n1", 1, "2026-11-23T00:00:00Z", "exit code 1")
    assert not Notifier(NotifySection(), {}, "n1").wants("failed")
    only_dead = Notifier(NotifySection(("/bin/true",), on=("dead",)), {}, "n1")
    assert not only_dead.wants("retrying") and only_dead.wants("dead")
    with capture_logs() as logs:
        only_dead.offer(notice)
        only_dead.close()
    assert not [e for e in logs if e["event"].startswith("notify")]


def test_a_child_escaping_the_group_does_not_hold_the_notifier_up(tmp_path: Path) -> None:
    """A review's command left a setsid child holding its output pipe: the notifier hung past
    the timeout and the notices behind it were dropped."""
    done = tmp_path / "second"
    first = Notice("j@1", "j", "failed", "n1", 1, "2026-11-23T00:00:00Z", "exit code 1")
    second = Notice("j@2", "j", "failed", "n1", 1, "2026-11-23T00:00:01Z", "exit code 1")
    notifier = Notifier(NotifySection(
        ("/bin/sh", "-c", f'[ "$CRONSUL_NOTIFY_RUN_ID" = j@2 ] && exec touch {done}; '
                          "setsid sleep 30 & sleep 100"), timeout=timedelta(seconds=1)),
        {"PATH": "/usr/bin:/bin"}, "n1")
    began = time.monotonic()
    with capture_logs() as logs:
        notifier.offer(first)
        notifier.offer(second)
        wait_until(done.exists, 6, what="the second notice sent after the first timed out")
        notifier.close()
    assert time.monotonic() - began < 6
    assert [e["event"] for e in logs if e["event"].startswith("notify")] == [
        "notify_failed", "notify_sent"]


def test_the_command_gets_a_jobs_environment_not_the_agents_secrets(tmp_path: Path) -> None:
    out = tmp_path / "env"
    notifier = Notifier(NotifySection(("/bin/sh", "-c", f"env > {out}"),
                                      env=(("WEBHOOK_URL", "https://hooks.example/x"),)),
                        {"PATH": "/usr/bin:/bin", "CONSUL_HTTP_TOKEN": "secret",
                         "AWS_SECRET_ACCESS_KEY": "secret", "LANG": "C.UTF-8"}, "n1")
    notifier.offer(Notice("j@1", "j", "failed", "n1", 1, "2026-11-23T00:00:00Z", "exit 1"))
    notifier.close()
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert "secret" not in env.values()
    assert env["WEBHOOK_URL"] == "https://hooks.example/x" and env["LANG"] == "C.UTF-8"
    assert env["CRONSUL_NOTIFY_RUN_ID"] == "j@1"


def test_a_notice_that_cannot_be_sent_does_not_end_the_notifier(tmp_path: Path) -> None:
    """A value no environment can hold (a NUL) fails that notice alone; the next one goes."""
    out = tmp_path / "sent"
    notifier = Notifier(NotifySection(("/bin/sh", "-c", f'echo "$CRONSUL_NOTIFY_RUN_ID" >> {out}')),
                        {"PATH": "/usr/bin:/bin"}, "n1")
    bad = Notice("j@1", "j", "failed", "n1", 1, "2026-11-23T00:00:00Z", "nul\0here")
    good = Notice("j@2", "j", "failed", "n1", 1, "2026-11-23T00:00:01Z", "exit code 1")
    with capture_logs() as logs:
        notifier.offer(bad)
        notifier.offer(good)
        notifier.close()
    assert out.read_text() == "j@2\n"
    assert [e["run_id"] for e in logs if e["event"] == "notify_failed"] == ["j@1"]
