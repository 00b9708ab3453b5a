"""The leader's enqueue (worker/sink.py) against a real redis-server: the flat-ARGV script,
payloads built from pre-formatted strings, passes split into several calls, prepared batches."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from cronsul_testing import RedisServer, render_config

from scheduler.errors import FencedOff
from scheduler.ports import Fence, TickBatch
from scheduler.runs import Run, iso_utc
from worker.cli import main
from worker.config import load_config
from worker.keys import Keys
from worker.messages import parse_message
from worker.outbox import OutboxSink
from worker.runstate import RunState
from worker.sink import RUNS_PER_CALL, Encoded, RedisSink, run_payload

T0 = datetime(2026, 11, 22, 18, 0, 5, tzinfo=UTC)
KEYS = Keys("cronsul")

# Values a parameter may hold: JSON must escape some of them, the format must keep all intact.
VALUES = ['say "hi"', "back\\slash", "new\nline\ttab\r", "é✓\u202e中文", "emoji 🎉", "",
          "\x01\x1f control", "</script>", "{\"json\": [1]}", "' single '", "a" * 3000]


def reference_payload(run: Run) -> str:
    """The format as docs/architecture.md defines it, built the plain way."""
    return json.dumps({"v": 1, "run_id": run.run_id, "job": run.job,
                       "scheduled_at": iso_utc(run.scheduled_at), "params": dict(run.params)},
                      separators=(",", ":"), ensure_ascii=False)


def stream_payloads(r: redis.Redis, queue: str = "default") -> list[bytes]:
    return [fields[b"p"] for _id, fields in r.xrange(KEYS.stream(queue), "-", "+")]


def test_payloads_round_trip_byte_for_byte_through_redis(redis_client: redis.Redis,
                                                         tmp_path: Path) -> None:
    runs = [Run.for_tick("p", T0, {"v": v}) for v in VALUES]
    runs += [Run.for_tick("p", T0 + timedelta(milliseconds=250), {"v": "x", "w": "ü\"y"}),
             Run.for_tick("plain", T0), Run("plain@manual-0123456789abcdef", "plain", T0, {})]
    result = RedisSink(redis_client, KEYS).apply(
        TickBatch([(r, "default") for r in runs], {"p": T0, "plain": T0}), Fence(0, 1))
    assert result.enqueued == len(runs)
    cfg = load_config(_config(tmp_path))
    got = stream_payloads(redis_client)
    assert got == [reference_payload(r).encode() for r in runs]
    for run, raw in zip(runs, got, strict=True):
        msg = parse_message(raw, cfg.jobs) if run.job == "plain" or len(run.params) == 1 else None
        if msg is not None:
            assert (msg.run_id, msg.job, dict(msg.params)) == (run.run_id, run.job,
                                                              dict(run.params))
        record = redis_client.hgetall(KEYS.run(run.run_id))
        assert record[b"payload"] == raw  # the dashboard reads the params from here
        assert record[b"state"] == b"queued" and record[b"queue"] == b"default"
        assert record[b"job"] == run.job.encode() and record[b"run_id"] == run.run_id.encode()
        assert int(record[b"scheduled_ms"]) == round(run.scheduled_at.timestamp() * 1000)
        assert 1_600_000_000_000 < int(record[b"enqueued_ms"]) < 4_000_000_000_000  # ms
        assert 0 < redis_client.ttl(KEYS.run(run.run_id)) <= 7 * 86400


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "cronsul.toml"
    path.write_text(render_config({"agent": {"node": "n1"}}, {
        "plain": {"schedule": "@daily", "command": ["/bin/true"]},
        "p": {"schedule": "@daily", "command": ["/bin/echo", "{param.v}"],
              "params": [{"v": "x"}]},
    }))
    return path


@pytest.mark.parametrize("params", [{}, {"v": "x"}, *({"v": v} for v in VALUES),
                                    {"b": "1", "a": "\"2\""}])
def test_run_payload_equals_json_dumps(params: dict[str, str]) -> None:
    for job in ("p", "j.x-1_2", 'we"ird\\job'):  # the last one only through the slow path
        run = Run.for_tick(job, T0 + timedelta(milliseconds=7), params)
        assert run_payload(run.run_id, job, run.scheduled_at, params) == reference_payload(run)


def test_a_big_pass_is_split_into_calls_and_all_of_it_lands(redis_client: redis.Redis) -> None:
    n = RUNS_PER_CALL * 2 + 17
    runs = [(Run.for_tick(f"j{i}", T0), "q1" if i % 3 else "q2") for i in range(n)]
    cursors = {f"j{i}": T0 for i in range(1200)}  # more cursors than one MGET slice
    batch = RedisSink(redis_client, KEYS).prepare(TickBatch(runs, cursors))
    assert isinstance(batch.encoded, Encoded)
    assert len(batch.encoded.calls) == 4  # three chunks of runs, then the cursors
    result = RedisSink(redis_client, KEYS).apply(batch, Fence(0, 1))
    assert (result.enqueued, result.deduplicated) == (n, 0)
    assert redis_client.xlen(KEYS.stream("q1")) + redis_client.xlen(KEYS.stream("q2")) == n
    assert redis_client.xlen(KEYS.stream("q2")) == len(range(0, n, 3))
    loaded = RedisSink(redis_client, KEYS).load_cursors(sorted(cursors))
    assert set(loaded.values()) == {T0}
    # Applied again (a successor redoing a pass cut short): every run is a duplicate.
    again = RedisSink(redis_client, KEYS).apply(TickBatch(runs, cursors), Fence(0, 1))
    assert (again.enqueued, again.deduplicated) == (0, n)
    assert redis_client.xlen(KEYS.stream("q1")) + redis_client.xlen(KEYS.stream("q2")) == n


def test_cursors_only_move_forward_in_every_slice(redis_client: redis.Redis) -> None:
    sink = RedisSink(redis_client, KEYS)
    names = [f"j{i}" for i in range(1100)]
    sink.apply(TickBatch([], {n: T0 + timedelta(seconds=5) for n in names}), Fence(0, 1))
    mixed = {n: T0 + timedelta(seconds=(9 if i % 2 else 1)) for i, n in enumerate(names)}
    sink.apply(TickBatch([], mixed), Fence(0, 1))
    loaded = sink.load_cursors(names)
    for i, n in enumerate(names):
        assert loaded[n] == T0 + timedelta(seconds=(9 if i % 2 else 5)), n


def test_a_pass_cut_short_by_a_new_leader_is_finished_by_it(redis_client: redis.Redis) -> None:
    sink = RedisSink(redis_client, KEYS)
    runs = [(Run.for_tick(f"j{i}", T0), "default") for i in range(RUNS_PER_CALL * 2)]
    cursors = {f"j{i}": T0 for i in range(RUNS_PER_CALL * 2)}
    old = sink.prepare(TickBatch(runs, cursors))
    assert isinstance(old.encoded, Encoded)
    # The old leader's first call lands, then a new leader (higher fence) writes.
    first_call_only = TickBatch(runs, cursors,
                                encoded=Encoded(old.encoded.owner, old.encoded.calls[:1]))
    assert sink.apply(first_call_only, Fence(0, 1)).enqueued == RUNS_PER_CALL
    assert sink.load_cursors(["j0"])["j0"] is None  # cursors move only with the last call
    new = sink.apply(TickBatch(runs, cursors), Fence(0, 2))
    assert (new.enqueued, new.deduplicated) == (RUNS_PER_CALL, RUNS_PER_CALL)
    with pytest.raises(FencedOff):
        sink.apply(old, Fence(0, 1))  # the rest of the old pass is refused at its first call
    assert redis_client.xlen(KEYS.stream("default")) == RUNS_PER_CALL * 2
    assert sink.load_cursors(["j0"])["j0"] == T0


def test_an_encoding_made_for_other_keys_is_not_used(redis_client: redis.Redis) -> None:
    run = Run.for_tick("j", T0)
    other = RedisSink(redis_client, Keys("elsewhere")).prepare(TickBatch([(run, "q")], {}))
    RedisSink(redis_client, KEYS).apply(other, Fence(0, 1))
    assert redis_client.xlen(KEYS.stream("q")) == 1
    assert not redis_client.exists(Keys("elsewhere").stream("q"))


def test_outbox_variant_appends_the_same_payloads(redis_client: redis.Redis) -> None:
    runs = [(Run.for_tick("p", T0, {"v": v}), "jobs") for v in VALUES[:4]]
    sink = OutboxSink(redis_client, KEYS)
    assert sink.apply(sink.prepare(TickBatch(runs, {"p": T0})), Fence(0, 1)).enqueued == 4
    items = redis_client.lrange(KEYS.outbox, 0, -1)
    assert items == [b"jobs|" + reference_payload(r).encode() for r, _q in runs]
    assert not redis_client.exists(KEYS.stream("jobs"))
    assert sink.load_cursors(["p"])["p"] == T0
    enqueued_ms = int(redis_client.hget(KEYS.run(runs[0][0].run_id), "enqueued_ms") or 0)
    assert enqueued_ms > 1_600_000_000_000


@pytest.mark.parametrize("outbox", [False, True], ids=["streams", "sqs-outbox"])
def test_a_run_with_a_later_start_waits_in_the_delayed_set(
        redis_client: redis.Redis, redis_proc: RedisServer, outbox: bool, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A fan-out's jitter: a run whose not-before is after Redis's clock is claimed and
    recorded at the tick but put in the delayed set, which any node promotes when it is due;
    one already due goes straight to its queue."""
    tick = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    later = replace(Run.for_tick("fan", tick, {"t": "a"}), not_before=tick + timedelta(seconds=40))
    due = replace(Run.for_tick("fan", tick, {"t": "b"}), not_before=tick + timedelta(seconds=0.5))
    sink = (OutboxSink if outbox else RedisSink)(redis_client, KEYS)
    batch = TickBatch([(later, "default"), (due, "default")], {"fan": tick})
    assert sink.apply(batch, Fence(0, 1)).enqueued == 2

    def queued() -> list[bytes]:
        if outbox:
            return [item.split(b"|", 1)[1] for item in redis_client.lrange(KEYS.outbox, 0, -1)]
        return stream_payloads(redis_client)

    assert queued() == [reference_payload(due).encode()]
    start_ms = int(later.not_before.timestamp() * 1000)  # type: ignore[union-attr]
    assert redis_client.zrange(KEYS.delayed, 0, -1, withscores=True) == [
        (b"default|" + reference_payload(later).encode(), float(start_ms))]
    record = redis_client.hgetall(KEYS.run(later.run_id))
    assert record[b"state"] == b"queued" and record[b"not_before_ms"] == str(start_ms).encode()
    assert b"not_before_ms" not in redis_client.hgetall(KEYS.run(due.run_id))
    config = tmp_path / "c.toml"
    config.write_text(render_config({"agent": {"node": "n1"}, "redis": {"url": redis_proc.url}},
                                    {"fan": {"schedule": "@daily", "command": ["/bin/true"]}}))
    assert main(["logs", later.run_id, "--json", "-c", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["waiting"] == \
        f"not before {iso_utc(later.not_before).replace('.000Z', 'Z')} (its jitter)"  # type: ignore[arg-type]
    # Another leader doing the pass again: duplicates, nothing queued or delayed twice.
    assert sink.apply(batch, Fence(0, 1)).deduplicated == 2
    assert redis_client.zcard(KEYS.delayed) == 1 and len(queued()) == 1
    runs = RunState(redis_client, KEYS, "n1", 3600, outbox=outbox)
    assert runs.promote(start_ms - 1) == 0  # not yet
    assert runs.promote(start_ms) == 1
    assert sorted(queued()) == sorted([reference_payload(due).encode(),
                                       reference_payload(later).encode()])
