"""``cronsul logs RUN_ID --follow``: a run's output as it is produced, until the run ends.

While an attempt runs, its output comes from the live stream its node publishes
(``<p>:live:<run_id>:<attempt>``, worker/live.py: once a second, for runs running 1 s or more),
read with a blocking XREAD; after each read the record says whether the attempt ended. When it
has, the rest of its output comes from the record's tail (or the kept attempt's, for a retried
one): the stream's entries carry their offsets in the attempt's output, so nothing is printed
twice, and what neither kept is named on stderr. A queued run is waited for; a retried run is
followed through its attempts. The closing line is the one ``cronsul logs`` prints; the exit
status is 0 if the run succeeded, 1 if not.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import redis

from scheduler.errors import ConfigError
from scheduler.runs import from_epoch_ms, iso_utc
from worker.config import Config
from worker.inspect_cmds import (
    _run_view,
    attempt_record,
    kept_attempts,
    no_run,
    print_output,
    show_run,
    status_line,
    write_raw,
)
from worker.keys import Keys
from worker.live import LIVE_WANT_MS
from worker.redisconn import connect
from worker.runstate import ATTEMPT_FIELD, TERMINAL

# One blocking XREAD waits this long for new output: it also bounds how late the end of a run
# (read from its record after each XREAD) is noticed.
FOLLOW_BLOCK_MS = 1000
# A run not running yet (queued, waiting for a retry) has its record read this often.
WAIT_POLL_S = 0.5
# Live entries read per XREAD (a stream keeps at most worker.live.LIVE_ENTRIES anyway).
READ_COUNT = 100
# The exit status after Ctrl-C: 128 + SIGINT, what a shell reports for a command it ended.
EXIT_INTERRUPTED = 130
# The record fields read after each XREAD (plus the followed attempt's kept field).
PEEK = ("state", "attempt", "error", "retry_at_ms", "waiting_for", "handed_back")


def follow(cfg: Config, run_id: str, *, block_ms: int = FOLLOW_BLOCK_MS,
           wait_s: float = WAIT_POLL_S, sleep: Callable[[float], None] = time.sleep) -> int:
    """Follow ``run_id`` to its end: 0 if it succeeded, 1 if not, 130 on Ctrl-C;
    ConfigError (exit 2) when there is no such run."""
    keys = Keys(cfg.redis.key_prefix)
    try:
        with connect(cfg.redis, cfg.path) as r:
            return Follower(r, keys, run_id, block_ms, wait_s, sleep).run(lambda: no_run(cfg,
                                                                                     run_id))
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(f"\n[cronsul: stopped following {run_id}; the run goes on]", file=sys.stderr)
        return EXIT_INTERRUPTED


class Follower:
    """The state of one ``--follow``: the attempt being printed and how far."""

    def __init__(self, r: redis.Redis, keys: Keys, run_id: str, block_ms: int, wait_s: float,
                 sleep: Callable[[float], None]) -> None:
        self._r = r
        self._keys = keys
        self._run_id = run_id
        self._block_ms = block_ms
        self._wait_s = wait_s
        self._sleep = sleep
        self._attempt = 0  # the attempt being printed (0: none now)
        self._done = 0  # the last attempt printed to its end
        self._offset = 0  # bytes of its output printed
        self._last_id = "0-0"  # the last live entry read
        self._said: set[str] = set()  # waiting notes already printed (each once)

    def run(self, missing: Callable[[], str]) -> int:
        first = True
        while True:
            peek = self._peek()
            if peek is None:
                raise ConfigError(missing())
            state, latest = peek["state"], _number(peek["attempt"])
            if first and state in TERMINAL:
                return self._close_run()  # ended before we followed it: as `logs` shows it
            first = False
            if self._attempt == 0 and latest > self._done:
                self._start(latest)
            if self._attempt and self._ended(peek, state, latest):
                code = self._close_attempt(state, latest)
                if code is not None:
                    return code
                continue
            if state in TERMINAL:  # ended with no new attempt (skipped, superseded)
                return self._close_run(output=self._done == 0)
            if self._attempt and state == "running":
                self._read_live(self._block_ms)
                continue
            self._note_waiting(peek, state, latest)
            self._sleep(self._wait_s)

    # -- reading --------------------------------------------------------------------------------

    def _peek(self) -> dict[str, str] | None:
        fields = [*PEEK, f"{ATTEMPT_FIELD}{self._attempt}"]
        values: Any = self._r.hmget(self._keys.run(self._run_id), fields)
        if values[0] is None:
            return None
        return {name: (v.decode(errors="replace") if v is not None else "")
                for name, v in zip(fields, values, strict=True)} | {
            "kept": "1" if values[-1] is not None else ""}

    def _start(self, attempt: int) -> None:
        self._attempt, self._offset, self._last_id = attempt, 0, "0-0"

    def _ended(self, peek: dict[str, str], state: str, latest: int) -> bool:
        """Whether the attempt being printed has ended: it is kept (it was retried), a later
        one began, or the record no longer says it runs."""
        return bool(peek["kept"]) or latest > self._attempt or state != "running"

    def _read_live(self, block_ms: int | None) -> None:
        """Print the live entries after the last one read (waiting up to ``block_ms``)."""
        key = self._keys.live(self._run_id, self._attempt)
        # Its node publishes the run's output only while somebody follows it (worker/live.py).
        self._r.set(self._keys.live_want(self._run_id), "1", px=LIVE_WANT_MS)
        got: Any = self._r.xread({key: self._last_id}, count=READ_COUNT, block=block_ms)
        for _, entries in got or []:
            for entry_id, fields in entries:
                self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                self._print_at(_number(_s(fields.get(b"o", b"0"))), fields.get(b"d", b""))

    def _print_at(self, offset: int, data: bytes) -> None:
        """Print ``data`` (at ``offset`` in the attempt's output) from where we are."""
        if offset > self._offset:
            self._note(f"{offset - self._offset} bytes of attempt {self._attempt}'s output "
                       "not shown (no longer kept live)")
            self._offset = offset
        skip = self._offset - offset
        if skip < len(data):
            write_raw(data[skip:])
            self._offset = offset + len(data)

    # -- ends -------------------------------------------------------------------------------------

    def _close_attempt(self, state: str, latest: int) -> int | None:
        """The attempt being printed ended: print the rest of its output and its line. The
        exit status if the run has ended too, else None (another attempt follows)."""
        self._read_until_drained()
        raw: Any = self._r.hgetall(self._keys.run(self._run_id))
        if not raw:
            return None  # expired meanwhile: the next peek says so
        n = self._attempt
        kept = kept_attempts(raw)
        last = n == latest and state in TERMINAL
        if n in kept or (n == latest and not _lost(raw)):
            record = attempt_record(raw, self._run_id, n, latest, kept)
            self._print_rest(record.get(b"output", b""),
                             _number(_s(record.get(b"output_bytes", b"0"))))
            line = status_line(self._run_id, _run_view(record, self._run_id, None),
                               earlier=not last)
        else:
            line = (f"{self._run_id}: attempt {n} ended without a result (its node stopped "
                    "renewing its lease)")
            if last:  # on_lost = fail: the record's line says so
                line = status_line(self._run_id, _run_view(raw, self._run_id, None))
        if last:
            print(line, file=sys.stderr, flush=True)
            return 0 if state == "succeeded" else 1
        self._note(line)
        self._attempt, self._done = 0, n
        return None

    def _close_run(self, output: bool = True) -> int:
        """A run that ended before it was followed, or with no new attempt (skipped while
        queued, a retry superseded): as ``logs`` shows it (without the output already
        printed when not ``output``)."""
        raw: Any = self._r.hgetall(self._keys.run(self._run_id))
        if output:
            view = show_run(self._run_id, raw)
        else:
            view = _run_view(raw, self._run_id, None)
            print(status_line(self._run_id, view), file=sys.stderr, flush=True)
        return 0 if view["state"] == "succeeded" else 1

    def _read_until_drained(self) -> None:
        before = None
        while before != self._last_id:
            before = self._last_id
            self._read_live(None)

    def _print_rest(self, tail: bytes, total: int) -> None:
        """The attempt's recorded tail (its last len(tail) of ``total`` bytes) from where the
        live output left off."""
        start = total - len(tail)
        if self._offset == 0:
            print_output(tail, total)
        elif self._offset < start:
            self._note(f"{start - self._offset} bytes of attempt {self._attempt}'s output not "
                       "shown (neither live nor in the kept tail: output_limit)")
            write_raw(tail)
        else:
            write_raw(tail[self._offset - start:])
        self._offset = total

    # -- notes -------------------------------------------------------------------------------------

    def _note_waiting(self, peek: dict[str, str], state: str, latest: int) -> None:
        """Say once why nothing is printed: queued (once), waiting for a retry, and what it
        waits for (an overlap lock, a node that can run it) each time that changes."""
        if state == "running":  # a new attempt's first peek: the next turn reads it
            return
        if latest:
            due = _number(peek["retry_at_ms"])
            self._note_once(f"{self._run_id} is waiting for attempt {latest + 1}"
                            + (f" (retry due {_iso_ms(due)})" if due else ""))
        else:
            self._note_once(f"{self._run_id} is queued; waiting for it to start")
        if peek["waiting_for"]:
            self._note_once(f"{self._run_id} waits for the overlap lock held by "
                            f"{peek['waiting_for']}")
        elif peek["handed_back"]:
            self._note_once(f"{self._run_id} waits: {peek['handed_back']}")

    def _note_once(self, text: str) -> None:
        if text not in self._said:
            self._said.add(text)
            self._note(text)

    @staticmethod
    def _note(text: str) -> None:
        sys.stdout.flush()
        print(f"[cronsul: {text}]", file=sys.stderr, flush=True)


def _lost(raw: dict[bytes, bytes]) -> bool:
    """The record's last attempt was failed as lost (on_lost = fail): it left no output."""
    return raw.get(b"error", b"").startswith(b"lost:")


def _number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def _s(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _iso_ms(ms: int) -> str:
    return iso_utc(from_epoch_ms(ms))
