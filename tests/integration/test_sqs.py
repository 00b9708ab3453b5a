"""The SQS backend against moto in server mode (boto3 over HTTP) and a real redis-server.

The same queue contract as test_redis_queue.py where it applies, plus what only SQS has:
visibility timeout expiry and extension, redrive to an SQS dead-letter queue, FIFO
deduplication by run id, the Redis outbox between the leader's fenced claim and SQS, and event
messages from other systems (directly or through SNS with raw message delivery).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from cronsul_testing import AWS_TEST_ENV, Cluster, MotoServer, RedisServer, wait_until

from devconsul.testing import DevConsul
from scheduler.clock import SystemClock
from scheduler.errors import ConfigError, FencedOff
from scheduler.ports import Fence, TickBatch
from scheduler.runs import Run
from worker.config import Config, load_config
from worker.consumer import Consumer
from worker.keys import Keys
from worker.outbox import OutboxDrainer, OutboxSink
from worker.queue import Delivery
from worker.runstate import RunRef, RunState
from worker.sqs import QueueDirectory, SqsTransport, normalise_event, sqs_client
from worker.watchdog import Watchdog

KEYS = Keys("cronsul")
REGION = "us-east-1"
T0 = datetime(2026, 11, 22, 18, 0, 5, tzinfo=UTC)
NEVER = "@yearly"  # jobs that run only when a test sends them a message
AWS_ENV = AWS_TEST_ENV


# -- moto server and helpers ------------------------------------------------------------------

@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("moto[server] is not installed (pip install 'moto[server]')")
        pytest.skip("moto[server] is not installed (pip install 'moto[server]')")
    server = MotoServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def sqs(moto_url: str) -> Any:
    return sqs_client(REGION, moto_url)


def make_queue(sqs: Any, fifo: bool = False, **attrs: str) -> str:
    name = f"q{uuid.uuid4().hex[:12]}" + (".fifo" if fifo else "")
    if fifo:
        attrs["FifoQueue"] = "true"
    return str(sqs.create_queue(QueueName=name, Attributes=attrs)["QueueUrl"])


def send(sqs: Any, url: str, body: dict[str, Any] | str) -> str:
    text = body if isinstance(body, str) else json.dumps(body)
    return str(sqs.send_message(QueueUrl=url, MessageBody=text)["MessageId"])


def in_queue(sqs: Any, url: str) -> int:
    """Messages on the queue, visible or in flight."""
    a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return int(a["ApproximateNumberOfMessages"]) + int(a["ApproximateNumberOfMessagesNotVisible"])


def transport(sqs: Any, r: redis.Redis, queues: dict[str, str],
              vis: float = 30) -> SqsTransport:
    return SqsTransport(sqs, QueueDirectory(sqs, queues), r, KEYS, "n1", vis)


def drainer(sqs: Any, r: redis.Redis, queues: dict[str, str]) -> OutboxDrainer:
    return OutboxDrainer(sqs, QueueDirectory(sqs, queues), r, KEYS, "n1")


def run_msg(job: str = "j", seconds: int = 0) -> dict[str, Any]:
    run = Run.for_tick(job, T0 + timedelta(seconds=seconds))
    return {"v": 1, "run_id": run.run_id, "job": job, "scheduled_at": "2026-11-22T18:00:05Z",
            "params": {}}


def batch(*seconds: int, job: str = "j", queue: str = "default") -> TickBatch:
    runs = [(Run.for_tick(job, T0 + timedelta(seconds=s)), queue) for s in seconds]
    return TickBatch(runs, {job: T0 + timedelta(seconds=max(seconds))})


def ref_of(d: Delivery) -> RunRef:
    assert d.payload is not None
    body = json.loads(d.payload)
    return RunRef(body["run_id"], body["job"], 0, d.queue, d.payload, "")


def fetch_all(t: SqsTransport, queues: list[str], timeout: float = 5, want: int = 1,
              ) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += t.fetch(queues, 10, 1000)
    return got


# -- the queue contract -----------------------------------------------------------------------

def test_priority_fetch_reads_lower_queues_only_when_higher_are_empty(
        sqs: Any, redis_client: redis.Redis) -> None:
    crit, bat = make_queue(sqs), make_queue(sqs)
    t = transport(sqs, redis_client, {"critical": crit, "batch": bat})
    send(sqs, bat, "b")
    send(sqs, crit, "c")
    assert [d.queue for d in t.fetch(["critical", "batch"], 5, 0)] == ["critical"]
    assert [d.queue for d in t.fetch(["critical", "batch"], 5, 0)] == ["batch"]
    send(sqs, bat, "b2")
    assert t.fetch(["critical", "batch"], 5, 0, per_queue={"batch": 0}) == []


def test_fetch_receives_a_batch_and_counts_deliveries(
        sqs: Any, redis_client: redis.Redis) -> None:
    url = make_queue(sqs)
    t = transport(sqs, redis_client, {"default": url})
    for i in range(12):
        send(sqs, url, run_msg(seconds=i))
    first = t.fetch(["default"], 50, 0)
    assert len(first) == 10  # SQS's batch maximum, whatever the free slots
    assert all(d.deliveries == 1 and d.payload for d in first)
    assert len(t.fetch(["default"], 1, 0)) == 1  # never more than the free slots


def test_fetch_long_polls_only_when_every_queue_is_empty(
        sqs: Any, redis_client: redis.Redis) -> None:
    url = make_queue(sqs)
    t = transport(sqs, redis_client, {"default": url})
    started = time.monotonic()
    assert t.fetch(["default"], 1, 1000) == []
    assert time.monotonic() - started >= 0.9  # waited (WaitTimeSeconds = block_ms / 1000)
    threading.Timer(0.3, lambda: send(sqs, url, "late")).start()
    started = time.monotonic()
    got = t.fetch(["default"], 1, 2000)
    assert [d.payload for d in got] == [b"late"] and time.monotonic() - started < 1.9


def test_begin_finish_settle_records_and_deletes(sqs: Any, redis_client: redis.Redis) -> None:
    url = make_queue(sqs)
    t = transport(sqs, redis_client, {"default": url})
    send(sqs, url, run_msg())
    [d] = fetch_all(t, ["default"])
    runs = RunState(redis_client, KEYS, "n1", 3600, outbox=True)
    ref = ref_of(d)
    assert runs.begin(ref, "tok", 5000, 1).verdict == "start"
    assert runs.finish(ref, "tok", "succeeded", 2, {"exit_code": "0"})
    t.settle(d)
    assert runs.record(ref.run_id)["state"] == "succeeded"
    assert in_queue(sqs, url) == 0


def test_settle_many_deletes_in_batches_of_ten(sqs: Any, redis_client: redis.Redis) -> None:
    url = make_queue(sqs)
    t = transport(sqs, redis_client, {"default": url})
    for i in range(23):
        send(sqs, url, run_msg(seconds=i))
    got = fetch_all(t, ["default"], want=23)
    assert len(got) == 23
    calls: list[int] = []
    real = sqs.delete_message_batch

    def counted(**kw: Any) -> Any:
        calls.append(len(kw["Entries"]))
        return real(**kw)

    sqs.delete_message_batch = counted
    try:
        t.settle_many(got)
    finally:
        sqs.delete_message_batch = real
    assert calls == [10, 10, 3]
    assert in_queue(sqs, url) == 0


def test_finished_run_delivered_again_is_settled_without_running(
        sqs: Any, redis_client: redis.Redis) -> None:
    url = make_queue(sqs)
    t = transport(sqs, redis_client, {"default": url}, vis=1)
    send(sqs, url, run_msg())
    [d] = fetch_all(t, ["default"])
    runs = RunState(redis_client, KEYS, "n1", 3600)
    ref = ref_of(d)
    runs.begin(ref, "tok", 5000, 1)
    runs.finish(ref, "tok", "succeeded", 2, {})  # recorded; the delete never happened
    [again] = fetch_all(t, ["default"], timeout=5)  # visibility lapsed: SQS delivers it again
    assert again.entry_id == d.entry_id and again.deliveries == 2
    assert runs.begin(ref_of(again), "tok2", 5000, 3).verdict == "done"
    t.settle(again)
    assert in_queue(sqs, url) == 0
    assert runs.record(ref.run_id)["attempt"] == "1"


def test_dead_letter_keeps_reason_in_redis_and_deletes_the_message(
        sqs: Any, redis_client: redis.Redis) -> None:
    url = make_queue(sqs)
    t = transport(sqs, redis_client, {"default": url})
    message_id = send(sqs, url, "not json")
    [d] = fetch_all(t, ["default"])
    t.dead_letter(d, "undecodable", "Expecting value")
    [(_, f)] = redis_client.xrange(KEYS.dead)
    assert (f[b"reason"], f[b"payload"], f[b"queue"]) == (b"undecodable", b"not json", b"default")
    assert f[b"entry_id"].decode() == message_id and f[b"node"] == b"n1"
    assert in_queue(sqs, url) == 0


def test_visibility_lapse_redelivers_an_unextended_message_while_extend_keeps_a_live_one(
        sqs: Any, redis_client: redis.Redis) -> None:
    url = make_queue(sqs)
    t = transport(sqs, redis_client, {"default": url}, vis=2)
    live_id, idle_id = send(sqs, url, "live"), send(sqs, url, "idle")
    got = {d.entry_id: d for d in fetch_all(t, ["default"], want=2)}
    assert set(got) == {live_id, idle_id}
    redelivered: list[Delivery] = []
    deadline = time.monotonic() + 5  # 2.5 visibility timeouts
    while time.monotonic() < deadline:
        t.extend([got[live_id]], 2)  # the heartbeat, every visibility/3
        redelivered += t.fetch(["default"], 10, 0)
        time.sleep(0.6)
    # The idle one comes back every visibility timeout; the extended one never does.
    assert {d.entry_id for d in redelivered} == {idle_id}
    assert redelivered[0].deliveries == 2


def test_redrive_moves_a_message_to_the_sqs_dead_letter_queue_after_max_receives(
        sqs: Any, redis_client: redis.Redis) -> None:
    dlq = make_queue(sqs)
    arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"]
    url = make_queue(sqs, RedrivePolicy=json.dumps({"deadLetterTargetArn": arn,
                                                    "maxReceiveCount": "2"}))
    directory = QueueDirectory(sqs, {"default": url})
    t = SqsTransport(sqs, directory, redis_client, KEYS, "n1", 1)
    message_id = send(sqs, url, run_msg())
    assert directory.get("default").max_receive == 2
    counts = []
    for _ in range(2):  # received, never deleted (say the node crashed each time)
        counts += [d.deliveries for d in fetch_all(t, ["default"], timeout=4)]
    assert counts == [1, 2]
    time.sleep(1.2)
    assert t.fetch(["default"], 10, 1000) == []  # a third receive finds it moved
    moved = sqs.receive_message(QueueUrl=dlq, WaitTimeSeconds=1)["Messages"]
    assert [m["MessageId"] for m in moved] == [message_id]


# -- leader side: the outbox ------------------------------------------------------------------

def test_leader_enqueue_claims_in_redis_and_goes_to_sqs_through_the_outbox(
        sqs: Any, redis_client: redis.Redis) -> None:
    url = make_queue(sqs)
    sink = OutboxSink(redis_client, KEYS)
    first = sink.apply(batch(0, 1), Fence(0, 5))
    assert (first.enqueued, first.deduplicated) == (2, 0)
    assert redis_client.llen(KEYS.outbox) == 2
    assert not redis_client.exists(KEYS.stream("default"))  # nothing on Redis streams
    assert drainer(sqs, redis_client, {"default": url}).drain_once() == 2
    assert redis_client.llen(KEYS.outbox) == 0
    again = sink.apply(batch(1, 2), Fence(0, 6))
    assert (again.enqueued, again.deduplicated) == (1, 1)  # the claim is the run record
    with pytest.raises(FencedOff):
        sink.apply(batch(3), Fence(0, 4))  # a zombie leader adds nothing to the outbox
    assert redis_client.llen(KEYS.outbox) == 1
    drainer(sqs, redis_client, {"default": url}).drain_once()
    t = transport(sqs, redis_client, {"default": url})
    runs = sorted(json.loads(d.payload or b"")["run_id"]
                  for d in fetch_all(t, ["default"], want=3))
    assert runs == sorted(Run.for_tick("j", T0 + timedelta(seconds=s)).run_id for s in (0, 1, 2))
    assert sink.load_cursors(["j"])["j"] == T0 + timedelta(seconds=2)


def test_fifo_queue_deduplicates_by_run_id_but_not_a_retry(
        sqs: Any, redis_client: redis.Redis) -> None:
    url = make_queue(sqs, fifo=True)
    payload = json.dumps(run_msg())
    redis_client.rpush(KEYS.outbox, f"default|{payload}", f"default|{payload}",
                       f"default~1795000000000|{payload}")  # sent twice, then a retry
    assert drainer(sqs, redis_client, {"default": url}).drain_once() == 3
    assert in_queue(sqs, url) == 2
    m = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                            MessageSystemAttributeNames=["All"])["Messages"][0]
    assert m["Attributes"]["MessageGroupId"] == "j"
    assert m["Attributes"]["MessageDeduplicationId"] == run_msg()["run_id"]


def test_retry_is_promoted_from_the_delayed_set_into_the_outbox(
        sqs: Any, redis_client: redis.Redis) -> None:
    url = make_queue(sqs, fifo=True)
    t = transport(sqs, redis_client, {"default": url})
    OutboxSink(redis_client, KEYS).apply(batch(0), Fence(0, 1))
    d = drainer(sqs, redis_client, {"default": url})
    d.drain_once()
    [first] = fetch_all(t, ["default"])
    runs = RunState(redis_client, KEYS, "n1", 3600, outbox=True)
    ref = ref_of(first)
    runs.begin(ref, "t1", 5000, 1)
    assert runs.finish(ref, "t1", "retrying", 2, {"exit_code": "1"}, retry_at_ms=5)
    t.settle(first)
    assert runs.promote(now_ms=4) == 0 and runs.promote(now_ms=5) == 1
    assert redis_client.lrange(KEYS.outbox, 0, -1)[0].startswith(b"default~5|")
    assert not redis_client.exists(KEYS.stream("default"))
    d.drain_once()  # same run id, within FIFO's 5-minute window: must not be dropped
    [again] = fetch_all(t, ["default"])
    assert runs.begin(ref_of(again), "t2", 5000, 6).attempt == 2


def test_fifo_crash_between_send_and_remove_sends_nothing_twice(
        sqs: Any, redis_client: redis.Redis) -> None:
    url = make_queue(sqs, fifo=True)
    OutboxSink(redis_client, KEYS).apply(batch(0, 1), Fence(0, 1))
    crashing = drainer(sqs, redis_client, {"default": url})
    crashing.remove = _crash  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        crashing.drain_once()
    redis_client.delete(KEYS.outbox_lock)  # the crashed node's lock would expire
    assert redis_client.llen(KEYS.outbox) == 2  # sent, but still in the outbox
    assert drainer(sqs, redis_client, {"default": url}).drain_once() == 2
    assert in_queue(sqs, url) == 2  # the re-send was deduplicated


def test_an_outbox_item_sqs_cannot_take_is_dead_lettered_not_blocking(
        sqs: Any, redis_client: redis.Redis) -> None:
    url = make_queue(sqs)
    redis_client.rpush(KEYS.outbox, b"garbage", "default|" + "x" * (300 * 1024),
                       "default|" + json.dumps(run_msg()))
    assert drainer(sqs, redis_client, {"default": url}).drain_once() == 3
    reasons = [f[b"reason"] for _, f in redis_client.xrange(KEYS.dead)]
    assert reasons == [b"malformed", b"oversized"]
    assert redis_client.llen(KEYS.outbox) == 0 and in_queue(sqs, url) == 1


def _crash(values: object) -> None:
    raise SystemExit("crashed between send and remove")


# -- whole nodes: a real Consumer over SQS ----------------------------------------------------

class Node:
    """One in-process consumer (fetch loop, lease heartbeat, watchdog) over the SQS transport."""

    def __init__(self, cfg: Config, sqs: Any, r: redis.Redis) -> None:
        assert cfg.queue.sqs is not None
        self.transport = SqsTransport(sqs, QueueDirectory(sqs, dict(cfg.queue.sqs.queues)), r,
                                      KEYS, cfg.agent.node,
                                      cfg.worker.visibility_timeout.total_seconds())
        self.runs = RunState(r, KEYS, cfg.agent.node, 3600, outbox=True)
        self.watchdog = Watchdog()
        self.watchdog.start()
        self.consumer = Consumer(cfg, self.transport, self.runs, self.watchdog, SystemClock())
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, args=(self.stop,), daemon=True)
                        for f in (self.consumer.run, self.consumer.heartbeat)]
        for th in self.threads:
            th.start()

    def close(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(10)
        self.consumer.close()
        self.watchdog.stop()


def node_config(tmp_path: Path, redis_url: str, moto_url: str, queues: dict[str, str],
                out: Path, extra: str = "") -> Config:
    mapping = ", ".join(f'{k} = "{v}"' for k, v in queues.items())
    path = tmp_path / "node.toml"
    path.write_text(f"""
[agent]
node = "n1"
[redis]
url = "{redis_url}"
[worker]
visibility_timeout = "3s"
kill_grace = "1s"
queues = {json.dumps(list(queues))}
[queue]
backend = "sqs"
[queue.sqs]
region = "{REGION}"
endpoint_url = "{moto_url}"
queues = {{ {mapping} }}
[jobs.greet]
schedule = "{NEVER}"
timeout = "10s"
allow_root = true  # tests run as root (worker/executor.py root_refusal)
params = [{{ name = "nobody" }}]
command = ["/bin/sh", "-c",
           'echo "$CRONSUL_RUN_ID $CRONSUL_SCHEDULED_AT $CRONSUL_PARAM_NAME" >> {out}']
[jobs.j]
schedule = "{NEVER}"
timeout = "10s"
allow_root = true
command = ["/bin/sh", "-c", 'echo "$CRONSUL_RUN_ID" >> {out}']
{extra}
""")
    return load_config(path)


@pytest.fixture
def node_setup(tmp_path: Path, sqs: Any, moto_url: str, redis_client: redis.Redis,
               redis_proc: RedisServer) -> Iterator[tuple[Node, str, Path]]:
    url = make_queue(sqs)
    out = tmp_path / "runs.log"
    out.touch()
    node = Node(node_config(tmp_path, redis_proc.url, moto_url, {"default": url}, out), sqs,
                redis_client)
    try:
        yield node, url, out
    finally:
        node.close()


def test_sns_raw_event_without_run_id_starts_a_run(
        node_setup: tuple[Node, str, Path], sqs: Any, moto_url: str,
        redis_client: redis.Redis) -> None:
    node, url, out = node_setup
    topic_client = boto3.session.Session().client("sns", region_name=REGION,
                                                  endpoint_url=moto_url)
    topic = topic_client.create_topic(Name=f"t{uuid.uuid4().hex[:8]}")["TopicArn"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"]
    topic_client.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn,
                           Attributes={"RawMessageDelivery": "true"})
    before = datetime.now(UTC) - timedelta(seconds=2)
    topic_client.publish(TopicArn=topic, Message=json.dumps(
        {"v": 1, "job": "greet", "params": {"name": "deploy-42"}}))
    wait_until(lambda: out.read_text().strip(), 15, what="the event run")
    run_id, scheduled_at, name = out.read_text().split()
    assert run_id.startswith("greet@event-") and name == "deploy-42"
    assert datetime.fromisoformat(scheduled_at.replace("Z", "+00:00")) >= before
    wait_until(lambda: node.runs.record(run_id).get("state") == "succeeded", 10, what="record")
    wait_until(lambda: in_queue(sqs, url) == 0, 10, what="the message deleted")


def test_invalid_event_messages_are_dead_lettered_with_their_reason(
        node_setup: tuple[Node, str, Path], sqs: Any, redis_client: redis.Redis) -> None:
    _, url, out = node_setup
    ids = {
        send(sqs, url, {"v": 1, "job": "greet", "params": {"name": "a\u0000b"}}): "bad params",
        send(sqs, url, {"v": 2, "job": "greet"}): "malformed",
        send(sqs, url, "<xml/>"): "undecodable",
    }
    # What another node's config may run (a config change rolling out) is handed back for a
    # while instead (see the next test); dead-lettered once the hand-back window has passed.
    send(sqs, url, {"v": 1, "job": "rm-rf"})
    send(sqs, url, {"v": 1, "job": "greet", "params": {"cmd": "x"}})
    send(sqs, url, {"v": 1, "job": "j", "run_id": "j@after-poison"})
    wait_until(lambda: redis_client.xlen(KEYS.dead) == len(ids), 15, what="dead letters")
    wait_until(lambda: "j@after-poison" in out.read_text(), 15, what="service after poison")
    got = {f[b"entry_id"].decode(): f[b"reason"].decode()
           for _, f in redis_client.xrange(KEYS.dead)}
    assert got == ids
    wait_until(lambda: in_queue(sqs, url) == 0, 10, what="every message deleted")
    wait_until(lambda: redis_client.zcard(KEYS.delayed) + redis_client.llen(KEYS.outbox) == 2,
               10, what="the two handed back")


def test_a_run_of_a_job_this_node_does_not_know_is_handed_back_not_dead_lettered(
        node_setup: tuple[Node, str, Path], sqs: Any, redis_client: redis.Redis) -> None:
    """A config change rolling out: the run goes back (delayed set, then the outbox) for a
    node that knows its job, and its SQS message is deleted here."""
    _, url, _ = node_setup
    when = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    body = {"v": 1, "job": "newer", "run_id": "newer@1", "scheduled_at": when}
    send(sqs, url, body)
    wait_until(lambda: redis_client.zcard(KEYS.delayed) + redis_client.llen(KEYS.outbox) == 1,
               15, what="the run handed back")
    wait_until(lambda: in_queue(sqs, url) == 0, 10, what="its message deleted here")
    queued = [m for m, _ in redis_client.zrange(KEYS.delayed, 0, -1, withscores=True)] + \
        redis_client.lrange(KEYS.outbox, 0, -1)
    assert len(queued) == 1 and b"newer@1" in queued[0], queued
    assert redis_client.xlen(KEYS.dead) == 0


def test_standard_queue_crash_between_send_and_remove_runs_once(
        node_setup: tuple[Node, str, Path], sqs: Any, redis_client: redis.Redis) -> None:
    node, url, out = node_setup
    OutboxSink(redis_client, KEYS).apply(batch(0), Fence(0, 1))
    crashing = drainer(sqs, redis_client, {"default": url})
    crashing.remove = _crash  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        crashing.drain_once()
    redis_client.delete(KEYS.outbox_lock)
    assert drainer(sqs, redis_client, {"default": url}).drain_once() == 1  # sent again
    run_id = Run.for_tick("j", T0).run_id
    wait_until(lambda: node.runs.record(run_id).get("state") == "succeeded", 15, what="run")
    # The copy is answered "done" (or "busy", then "done" once visible again) and deleted.
    wait_until(lambda: in_queue(sqs, url) == 0, 15, what="both copies deleted")
    assert out.read_text().split() == [run_id]


# -- config and event format ------------------------------------------------------------------

def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text('[jobs.j]\nschedule = "@daily"\ncommand = ["true"]\nqueue = "batch"\n' + body)
    return path


@pytest.mark.parametrize(("body", "message"), [
    ('[queue]\nbackend = "sqs"\n', r"\[queue\] backend: \"sqs\" needs a \[queue.sqs\]"),
    ('[queue]\nbackend = "sqs"\n[queue.sqs]\nqueues = { default = "a", batch = "b" }\n',
     r"\[queue.sqs\] region: is required"),
    ('[queue]\nbackend = "sqs"\n[queue.sqs]\nregion = "eu-west-1"\nqueues = { default = "a" }\n',
     r"\[queue.sqs\] queues: no SQS queue for cronsul queue 'batch'"),
    ('[queue]\nbackend = "sqs"\n[queue.sqs]\nregion = "eu-west-1"\n'
     'queues = { default = "a b", batch = "b" }\n', r"\[queue.sqs\] queues: default = 'a b'"),
    ('[queue]\nbackend = "kafka"\n', r"\[queue\] backend: 'kafka' is not one of redis, sqs"),
    ('[queue]\nbackend = "sqs"\n[queue.sqs]\nregion = "eu-west-1"\nqueues = { default = "a", '
     'batch = "b" }\nretries = 3\n', r"\[queue.sqs\] retries: unknown key"),
])
def test_config_errors_name_file_section_and_key(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path, env={})
    assert str(err.value).startswith(str(path))


def test_config_accepts_names_and_urls(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[queue]\nbackend = "sqs"\n[queue.sqs]\nregion = "eu-west-1"'
                            '\nqueues = { default = "https://sqs.eu-west-1.amazonaws.com/1/d", '
                            'batch = "cron-batch.fifo" }\n'), env={})
    assert cfg.queue.backend == "sqs" and cfg.queue.sqs is not None
    assert dict(cfg.queue.sqs.queues)["batch"] == "cron-batch.fifo"
    assert load_config(write(tmp_path, ""), env={}).queue.backend == "redis"


def test_event_defaults_and_sns_envelope() -> None:
    raw = normalise_event(b'{"v":1,"job":"j"}', "m-1", "1795376131841")
    assert json.loads(raw) == {"v": 1, "job": "j", "run_id": "j@event-m-1",
                               "scheduled_at": "2026-11-22T19:35:31.841Z"}
    envelope = json.dumps({"Type": "Notification", "TopicArn": "arn:aws:sns:x",
                           "Message": '{"v":1,"job":"j","run_id":"j@mine"}'}).encode()
    assert json.loads(normalise_event(envelope, "m-2", None))["run_id"] == "j@mine"
    assert normalise_event(b'{"v":2,"job":"j"}', "m", "1") == b'{"v":2,"job":"j"}'
    assert normalise_event(b'{"v":true,"job":"j"}', "m", "1") == b'{"v":true,"job":"j"}'
    assert normalise_event(b"junk", "m", "1") == b"junk"


# -- end to end: two real agents --------------------------------------------------------------

@pytest.mark.slow
def test_two_agents_on_sqs_run_every_second_exactly_once(
        tmp_path: Path, devconsul: DevConsul, redis_proc: RedisServer, sqs: Any,
        moto_url: str) -> None:
    r = redis_proc.client()
    r.flushdb()
    standard, fifo = make_queue(sqs), make_queue(sqs, fifo=True)
    out = tmp_path / "ticks.log"
    out.touch()

    def tick(name: str, queue: str) -> dict[str, Any]:
        return {"schedule": "* * * * * *", "queue": queue, "timeout": "10s",
                "command": ["/bin/sh", "-c",
                            f'echo "{name} $CRONSUL_SCHEDULED_AT $CRONSUL_NODE" >> {out}']}

    cluster = Cluster(
        tmp_path, devconsul, redis_proc.url, ["n1", "n2"],
        {"std": tick("std", "default"), "fifo": tick("fifo", "critical")},
        worker_extra={"queues": ["critical", "default"]},
        extra_sections={"queue": {"backend": "sqs", "sqs": {
            "region": REGION, "endpoint_url": moto_url,
            "queues": {"default": standard, "critical": fifo}}}})
    cluster.start()
    try:
        cluster.wait_leader(30)
        wait_until(lambda: len(out.read_text().splitlines()) >= 2, 30, what="first runs")
        time.sleep(12)
    finally:
        cluster.stop()
    assert not r.exists(KEYS.stream("default")) and not r.exists(KEYS.stream("critical"))
    for job in ("std", "fifo"):
        stamps = [datetime.fromisoformat(line.split()[1].replace("Z", "+00:00"))
                  for line in out.read_text().splitlines() if line.startswith(job + " ")]
        doubled = sorted({s for s in stamps if stamps.count(s) > 1})
        assert not doubled, f"{job}: seconds run twice: {doubled}\n{cluster.logs()}"
        first, last = min(stamps), max(stamps)
        expected = {first + timedelta(seconds=i)
                    for i in range(int((last - first).total_seconds()) + 1)}
        missing = sorted(expected - set(stamps))
        assert not missing, f"{job}: seconds never run: {missing}\n{cluster.logs()}"
        assert len(stamps) >= 10, f"{job}: only {len(stamps)} runs\n{cluster.logs()}"
    nodes = {line.split()[2] for line in out.read_text().splitlines()}
    assert nodes == {"n1", "n2"}, "both nodes' consumers take runs from SQS"


def sqs_cli_config(tmp_path: Path, redis_proc: RedisServer, queue_url: str) -> Path:
    """An operator's config for an SQS cluster: one job ``j`` on queue default."""
    path = tmp_path / "c.toml"
    path.write_text(
        f'[redis]\nurl = "{redis_proc.url}"\n[queue]\nbackend = "sqs"\n[queue.sqs]\n'
        f'region = "{REGION}"\nqueues = {{ default = "{queue_url}" }}\n'
        '[jobs.j]\nschedule = "@daily"\ncommand = ["true"]\n')
    return path


def test_manual_run_and_dlq_retry_reach_sqs_through_the_outbox(
        sqs: Any, redis_proc: RedisServer, tmp_path: Path) -> None:
    """`cronsul run` and `cronsul dlq retry` on an SQS cluster: into the outbox, then SQS."""
    from worker.cli import main

    r = redis_proc.client()
    r.flushdb()
    url = make_queue(sqs)
    cfg_path = sqs_cli_config(tmp_path, redis_proc, url)
    assert main(["run", "j", "-c", str(cfg_path)]) == 0
    assert r.llen(KEYS.outbox) == 1 and not r.exists(KEYS.stream("default"))
    bad = run_msg("j", 9)
    r.xadd(KEYS.dead, {"reason": "retries exhausted", "error": "x", "queue": "default",
                       "entry_id": "1-0", "node": "n1", "payload": json.dumps(bad)})
    assert main(["dlq", "retry", "--all", "-c", str(cfg_path)]) == 0
    assert r.llen(KEYS.outbox) == 2 and r.xlen(KEYS.dead) == 0
    assert drainer(sqs, r, {"default": url}).drain_once() == 2
    t = transport(sqs, r, {"default": url})
    jobs = sorted(json.loads(d.payload or b"")["job"] for d in fetch_all(t, ["default"], want=2))
    assert jobs == ["j", "j"]


def test_dashboard_run_now_reaches_sqs_through_the_outbox(
        sqs: Any, redis_proc: RedisServer, tmp_path: Path) -> None:
    """The dashboard's Run now on an SQS cluster: as `cronsul run`, into the outbox (it used to
    go to a Redis stream that no SQS node reads, and stayed queued forever)."""
    from worker.dashboard.actions import run_now

    r = redis_proc.client()
    r.flushdb()
    url = make_queue(sqs)
    cfg_path = sqs_cli_config(tmp_path, redis_proc, url)
    run_id = run_now(load_config(cfg_path), r, "j", {})
    assert r.llen(KEYS.outbox) == 1 and not r.exists(KEYS.stream("default"))
    assert r.hget(KEYS.run(run_id), "state") == b"queued"
    assert drainer(sqs, r, {"default": url}).drain_once() == 1
    [d] = fetch_all(transport(sqs, r, {"default": url}), ["default"], want=1)
    assert json.loads(d.payload or b"")["run_id"] == run_id


def test_status_does_not_show_redis_stream_depths_for_sqs_queues(
        redis_proc: RedisServer, tmp_path: Path) -> None:
    """On SQS the streams are empty by design: showing 'depth 0' there would read as data."""
    from worker.status import _redis_view, render

    cfg_path = sqs_cli_config(tmp_path, redis_proc, "q")
    view = _redis_view(load_config(cfg_path), redis_proc.client())
    assert view["queues"] == {}
    text = render({"leader": None, "nodes": [], "paused": {}, **view})
    assert "queues: on SQS" in text and "depth 0" not in text


def test_the_drain_lock_is_short_and_a_pass_stops_once_it_is_lost(
        sqs: Any, redis_client: redis.Redis) -> None:
    """A drainer that dies or freezes holding the lock stalls every node's enqueues until the
    lock lapses (a chaos run on SQS saw a minute without new runs after each such kill -9 with
    the old 60 s lock). The lock is short and extended before each batch; a pass whose lock was
    taken over stops sending and leaves the rest in the outbox."""
    from worker.outbox import DRAIN_LOCK_MS

    assert DRAIN_LOCK_MS <= 10_000
    redis_client.flushdb()
    url = make_queue(sqs)
    d = drainer(sqs, redis_client, {"default": url})
    for i in range(15):  # two batches (SendMessageBatch takes 10)
        redis_client.rpush(KEYS.outbox, b"default|" + json.dumps(run_msg(seconds=i)).encode())
    real = sqs.send_message_batch
    ttls: list[int] = []

    def then_taken_over(**kw: Any) -> Any:
        ttls.append(int(redis_client.pttl(KEYS.outbox_lock)))
        out = real(**kw)
        redis_client.set(KEYS.outbox_lock, "another-node", px=DRAIN_LOCK_MS)  # it lapsed
        return out

    sqs.send_message_batch = then_taken_over
    try:
        assert d.drain_once() == 10  # the first batch only
    finally:
        sqs.send_message_batch = real
    assert len(ttls) == 1 and 0 < ttls[0] <= DRAIN_LOCK_MS
    assert redis_client.llen(KEYS.outbox) == 5 and in_queue(sqs, url) == 10
    assert redis_client.get(KEYS.outbox_lock) == b"another-node"  # not released by us
