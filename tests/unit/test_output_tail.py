"""A command's output: the tail kept in its record and the lines streamed to the agent's log."""

from __future__ import annotations

from typing import Any

from worker.executor import LOGGED_LINES_MAX, OutputTail


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def lines(self) -> list[str]:
        return [f["line"] for e, f in self.events if e == "run_output"]


def test_a_last_line_without_a_newline_reaches_the_log() -> None:
    log = Log()
    tail = OutputTail(1000, log)
    tail.feed(b"first line\nERROR: last line without newline")
    tail.end()
    tail.end()  # twice (the run's end is reached by two paths): logged once
    assert log.lines() == ["first line", "ERROR: last line without newline"]


def test_a_line_written_in_two_pieces_is_logged_from_its_start() -> None:
    log = Log()
    tail = OutputTail(100_000, log)
    tail.feed(b"ERROR: disk full on /data, " + b"x" * 5000)
    tail.feed(b"y" * 10 + b"\n")
    assert log.lines()[0].startswith("ERROR: disk full on /data, xxx")


def test_lines_past_the_logged_ones_are_counted_not_dropped_silently() -> None:
    log = Log()
    tail = OutputTail(1000, log)
    tail.feed(b"".join(b"line %d\n" % i for i in range(LOGGED_LINES_MAX + 50)))
    tail.feed(b"more\nand more\n")
    tail.end()
    assert len(log.lines()) == LOGGED_LINES_MAX
    [(_, fields)] = [ev for ev in log.events if ev[0] == "run_output_truncated"]
    assert fields["lines_not_logged"] == 52


def test_the_kept_tail_never_starts_inside_a_character() -> None:
    tail = OutputTail(101, None)
    tail.feed(("é" * 200).encode())  # 2 bytes each: 101 bytes end mid-character
    text = tail.text()
    assert not text.startswith("\ufffd") and set(text) == {"é"} and len(text) == 50
