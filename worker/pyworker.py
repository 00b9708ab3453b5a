"""The child side of the Python job pool: one warm process that runs callables on request.

Started by :class:`worker.pyjobs.PythonPool` in its own session, it talks to the agent over one
end of a socketpair (the fd number is its last argv element) with length-prefixed JSON frames:

* agent -> worker, first: ``{"path": [sys.path of the agent], "max_rss_mb": int | null}`` and
  ``"stream": true`` from an agent that takes streamed output (below);
* worker -> agent, once ready: ``{"ready": pid}``;
* agent -> worker, per run: ``{"target": "pkg.mod:fn", "kwargs": {...}, "env": {...}}`` and
  optionally ``"output_limit": int`` (the job's tail size);
* worker -> agent, during a run (``stream``): ``{"out": str}``, what the callable wrote to
  ``sys.stdout``/``sys.stderr``, as it writes it (see :class:`StreamWriter`);
* worker -> agent, per run: ``{"code": int | null, "output": str, "bytes": int,
  "error": str | null, "recycle": bool, "ended": float, "took": float}`` (``ended`` is
  ``time.monotonic()`` when the run ended: CLOCK_MONOTONIC, the same clock in every process, so
  the agent knows when the next request queued here started; ``took`` is the run's duration).
  With ``stream``, ``output`` and ``bytes`` are only what reached fds 1/2 (the rest was
  streamed); without (an agent older than streaming, during an upgrade), they are everything.

The agent may send the next requests before a run ends (see ``python_prefetch``); they are
served in order, one at a time, and each gets its reply the moment it ends. Requests are
numbered by arrival, from 0, on both sides; ``{"cancel": n}`` (agent -> worker) asks to skip
request ``n`` if it has not started (its lease was lost while it waited here): its reply is then
``{"cancelled": true, "ended": float}``. Before starting a request the worker reads, without
waiting, whatever has arrived, so a cancel sent while the run before was running is honoured.

JSON, not pickle, in both directions: the agent must never unpickle what a job process wrote,
or any job could run code inside the agent (which holds secrets jobs are not given).

During a run ``os.environ`` is the worker's start environment with the run's ``env`` laid over
it. Only keys whose value differs from the previous run's are written (putenv costs a
microsecond or two per key, and most of a run's env is the same every time); a callable that
changes ``os.environ`` itself is detected (one dict comparison) and the environment is rebuilt
before the next run, so nothing leaks from one run to the next.

The worker exits when the socket reaches EOF (the agent closed it or died). Anything written to
file descriptors 1 and 2 (C extensions, child processes) lands in a file this process reads (and
empties) after each run, into that run's reply; what a crash or a kill leaves there (the
faulthandler traceback, what a child wrote) the agent reads when it finds the worker dead.
What the callable prints reaches the agent while it runs, so a run killed by its timeout keeps
what it printed before, and the agent's log shows it live.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import importlib
import io
import json
import os
import resource
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

import orjson

HEADER = struct.Struct(">I")
# Largest frame either side accepts: a reply holds at most OUTPUT_LIMIT characters of output
# (up to 4 bytes each in UTF-8) plus an error text; anything bigger is a broken or hostile peer.
MAX_FRAME = 1024 * 1024
# Output kept per run unless the agent says otherwise in the first frame (it sends
# worker.executor.OUTPUT_LIMIT; not imported here, so a worker loads nothing else of the agent).
OUTPUT_LIMIT = 64 * 1024
# A return value is recorded as its repr, cut to this length: enough to read, never a dump.
REPR_LIMIT = 2048
# Of an exception's traceback, the last this many frames (the callable's own, usually).
TRACEBACK_FRAMES = 12
# Streamed output (``"out"`` frames): every write that completes a line is sent at once until
# STREAM_LINES lines were sent (the agent logs the first 200 lines of a run, as for commands, so
# those must come live); after that, output is sent in pieces of STREAM_BATCH characters, and
# the rest when the run ends. A frame holds at most STREAM_FRAME characters (JSON may escape a
# control character in 6 bytes: under 100 KiB, less than a socket buffer, so a frame is
# normally sent whole by one send()).
STREAM_LINES = 200
STREAM_BATCH = 16 * 1024
STREAM_FRAME = 16 * 1024
# Every signal, computed once: signal.valid_signals() costs about 100 µs here (it builds a set
# of Signals enum members), and signal.pthread_sigmask() as much again to turn its answer into
# enums. Both ran at the end of every run of a callable and took the no-op drain from 7,800 to
# 2,600 runs/s (bench, 2026-11-23); the C function underneath answers with ints in 2 µs.
ALL_SIGNALS = frozenset(signal.valid_signals())
_sigmask: Callable[[int, Iterable[int]], Any] = getattr(
    importlib.import_module("_signal"), "pthread_sigmask", signal.pthread_sigmask)
# One receive reads at most this much, into a buffer allocated once: a fresh large buffer per
# recv() costs an mmap/munmap pair and page faults, which measured as most of a run's overhead.
RECV_CHUNK = 64 * 1024


class FrameError(Exception):
    """The peer sent something that is not a frame of this protocol."""


def encode(message: Mapping[str, Any]) -> bytes:
    try:  # orjson: several times faster than json on a run's request and reply
        body = orjson.dumps(message)
    except TypeError:  # what orjson refuses, e.g. a lone surrogate in a job's output
        body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:  # e.g. an escaped lone surrogate, which json accepts
        return json.loads(body)


def take_frame(buffer: bytearray) -> dict[str, Any] | None:
    """Remove and return the first complete frame in ``buffer``, or None if it has none yet."""
    if len(buffer) < HEADER.size:
        return None
    (size,) = HEADER.unpack_from(buffer)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    end = HEADER.size + size
    if len(buffer) < end:
        return None
    body = bytes(buffer[HEADER.size:end])
    del buffer[:end]
    try:
        message = _loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FrameError(f"undecodable frame: {exc}") from exc
    if not isinstance(message, dict):
        raise FrameError("frame is not a JSON object")
    return message


class Inbox:
    """Bytes received on a socket, cut into frames."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._view = memoryview(bytearray(RECV_CHUNK))
        self._buffer = bytearray()

    def frame(self) -> dict[str, Any] | None:
        """The first complete frame received, or None. Raises FrameError."""
        return take_frame(self._buffer)

    def fill(self, flags: int = 0) -> bool:
        """Receive what is there (blocking until something is, unless ``flags`` has
        MSG_DONTWAIT: then BlockingIOError if nothing is). False at EOF."""
        n = self._sock.recv_into(self._view, 0, flags)
        self._buffer += self._view[:n]
        return n > 0


class TailWriter(io.TextIOBase):
    """A text stream that keeps only the last ``limit`` characters written (sys.stdout/err),
    for an agent that does not take streamed output (one older than this worker)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit
        self._parts: list[str] = []
        self._size = 0
        self.total = 0  # bytes (UTF-8) written, kept or not

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self.total += len(s.encode("utf-8", "replace"))
        if self._limit <= 0:  # output_limit = 0: count it, keep none
            return len(s)
        self._parts.append(s)
        self._size += len(s)
        if self._size > 2 * self._limit:
            text = "".join(self._parts)[-self._limit:]
            self._parts, self._size = [text], len(text)
        return len(s)

    def writable(self) -> bool:
        return True

    def text(self) -> str:
        return "".join(self._parts)[-self._limit:] if self._limit > 0 else ""


class StreamWriter(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` during a run, for an agent that takes streamed output: the
    text goes to the agent in ``"out"`` frames as it is written (see STREAM_LINES), so the agent
    logs it live and keeps it if this process is killed. ``flush()`` (``print(...,
    flush=True)``, a logging handler) sends what is pending at once. Thread-safe (a callable's
    threads may print); a child the callable forked writes to fd 1 instead (the channel is not
    its to write: the agent would read garbage); after :meth:`finish` it writes nothing."""

    def __init__(self, send: Callable[[Mapping[str, Any]], None]) -> None:
        super().__init__()
        self._send = send
        self._pending: list[str] = []
        self._pending_size = 0
        self._lines = 0  # newlines sent
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._finished = False
        self.total = 0  # bytes (UTF-8) written

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if not s:
            return 0
        if os.getpid() != self._pid:  # a forked child: the output file, as a process would
            if sys.__stdout__ is not None:
                with contextlib.suppress(OSError, ValueError):
                    sys.__stdout__.write(s)
                    sys.__stdout__.flush()
            return len(s)
        with self._lock:
            if self._finished:
                return len(s)
            self.total += len(s.encode("utf-8", "replace"))
            self._pending.append(s)
            self._pending_size += len(s)
            if ((self._lines < STREAM_LINES and "\n" in s)
                    or self._pending_size >= STREAM_BATCH):
                self._flush_pending()
        return len(s)

    def flush(self) -> None:
        if os.getpid() != self._pid:  # a forked child: its lock may be held for ever (fork)
            if sys.__stdout__ is not None:
                with contextlib.suppress(OSError, ValueError):
                    sys.__stdout__.flush()
            return
        with self._lock:
            if self._pending and not self._finished:
                self._flush_pending()

    def finish(self) -> None:
        """The run ended: send what is pending; write nothing more."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            if not self._finished:
                self._flush_pending()
            self._finished = True

    def _flush_pending(self) -> None:
        if not self._pending:  # nothing to send (most runs print nothing): no syscalls
            return
        text = "".join(self._pending)
        self._pending, self._pending_size = [], 0
        self._lines += text.count("\n")
        # A signal handler of the job that raises (an alarm-based timeout) must not interrupt
        # a frame half sent: the agent would read garbage and kill this worker.
        blocked = _sigmask(signal.SIG_BLOCK, ALL_SIGNALS)
        try:
            for at in range(0, len(text), STREAM_FRAME):
                self._send({"out": text[at:at + STREAM_FRAME]})
        except OSError:  # the agent is gone: this process ends at EOF; the job goes on
            self._finished = True
        except BaseException:  # a handler raised mid-frame (a signal to another thread):
            self._finished = True  # no more frames after a broken one; the job sees it
            raise
        finally:
            _sigmask(signal.SIG_SETMASK, blocked)

    def writable(self) -> bool:
        return True


def resolve(target: str) -> Callable[..., Any]:
    """Import ``package.module:attr.path`` and return the callable. Raises LookupError."""
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise LookupError(f"callable {target!r}: expected 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise LookupError(f"callable {target!r}: cannot import module {module_name!r}: "
                          f"{type(exc).__name__}: {exc}\n{_traceback_tail(exc)}") from exc
    for name in attr_path.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError as exc:
            raise LookupError(f"callable {target!r}: {module_name!r} has no attribute "
                              f"{attr_path!r}") from exc
    if not callable(obj):
        raise LookupError(f"callable {target!r} is not callable "
                          f"(it is a {type(obj).__name__})")
    return obj  # type: ignore[no-any-return]  # callable() proved it


def _traceback_tail(exc: BaseException, skip: int = 0) -> str:
    tb = exc.__traceback__
    for _ in range(skip):  # our own frames above the job's
        tb = tb.tb_next if tb is not None else None
    frames = traceback.extract_tb(tb)[-TRACEBACK_FRAMES:]
    return "Traceback (most recent call last, innermost frames):\n" + "".join(
        traceback.format_list(frames))


def _libc_putenv() -> Callable[[bytes], int] | None:
    """libc's putenv(), or None where it cannot be called (then os.environ's setenv is used)."""
    try:
        putenv = ctypes.CDLL(None, use_errno=True).putenv
    except (OSError, AttributeError):
        return None
    putenv.argtypes, putenv.restype = [ctypes.c_char_p], ctypes.c_int
    return putenv


# glibc's setenv(), which os.environ uses, never frees a string it replaces: it keeps every
# "KEY=value" it ever made (in case someone still holds a getenv() pointer into it). A warm
# worker gets a new CRONSUL_RUN_ID every run, so it grew by about 80 bytes a run for ever
# (measured: 17 MB/h of RSS per worker at 55 runs/s). putenv() instead keeps pointing into a
# string we own, which we release when the key is set again, as CPython did before 3.9.
_PUTENV = _libc_putenv()


class Runner:
    """The state of one worker process: resolved callables and the environment it has set."""

    def __init__(self, output_limit: int, out_fd: int | None = None,
                 stream: Callable[[Mapping[str, Any]], None] | None = None) -> None:
        self._output_limit = output_limit
        self._stream = stream  # sends a frame to an agent that takes streamed output
        self._limit = output_limit  # the current run's (the job's output_limit)
        self._out_fd = out_fd  # a private copy of fd 1 (the output file), or None
        self._callables: dict[str, Callable[..., Any]] = {}
        self._base = dict(os.environ)
        self._applied: dict[str, str] = {}  # keys a run set, with the value they now hold
        # CPython's os.environ keeps its (encoded) contents in this dict; comparing it with a
        # copy taken after the last change tells whether a callable touched the environment.
        self._data: dict[Any, Any] | None = getattr(os.environ, "_data", None)
        self._snapshot = dict(self._data) if self._data is not None else None
        # The "KEY=value" strings handed to putenv(): the environment points into them.
        self._owned: dict[str, bytes] = {}

    def _apply_env(self, env: Mapping[str, str]) -> None:
        environ, base, applied = os.environ, self._base, self._applied
        if self._data is not None and self._data != self._snapshot:
            environ.clear()  # the last callable changed it: start again from the base
            environ.update(base)
            applied.clear()
            self._owned.clear()  # the environment no longer points into any of them
        for key in [k for k in applied if k not in env]:
            del applied[key]
            if key in base:
                environ[key] = base[key]  # always the same value: setenv() reuses its copy
            else:
                environ.pop(key, None)
            self._owned.pop(key, None)
        for key, value in env.items():
            if applied.get(key) != value:
                self._set_env(key, value)
                applied[key] = value
        if self._data is not None:
            self._snapshot = dict(self._data)

    def _set_env(self, key: str, value: str) -> None:
        """``os.environ[key] = value`` through putenv() with a string we own (see _PUTENV)."""
        data = self._data
        k, v = os.fsencode(key), os.fsencode(value)  # as os.environ encodes them
        if _PUTENV is None or data is None or not k or b"=" in k or b"\0" in k + v:
            os.environ[key] = value  # also raises for a name or value it refuses, as before
            return
        entry = k + b"=" + v
        if _PUTENV(entry) != 0:
            raise OSError(ctypes.get_errno(), "putenv() failed")
        self._owned[key] = entry  # the string it replaced is out of the environment: freed
        data[k] = v

    def run(self, target: str, kwargs: dict[str, str], env: dict[str, str],
            output_limit: int | None = None) -> dict[str, Any]:
        """Call it; ``output_limit``: this run's output tail size (the job's), else the
        worker's default."""
        began = time.monotonic()
        self._limit = self._output_limit if output_limit is None else output_limit
        reply = self._run(target, kwargs, env)
        if sys.__stdout__ is not None:  # what the job printed to fd 1 through Python's own file
            with contextlib.suppress(OSError, ValueError):
                sys.__stdout__.flush()
        self._add_fd_output(reply)
        ended = time.monotonic()
        reply["ended"] = ended
        reply["took"] = ended - began
        return reply

    def _add_fd_output(self, reply: dict[str, Any]) -> None:
        """Append what reached fds 1/2 during the run (its tail) to the reply; empty the file."""
        fd = self._out_fd
        if fd is None:
            return
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return
            data = os.pread(fd, self._limit, max(0, size - self._limit)) if self._limit else b""
            os.ftruncate(fd, 0)
        except OSError:
            return
        text = reply["output"] + data.decode("utf-8", "replace")
        reply["output"] = text[-self._limit:] if self._limit else ""
        reply["bytes"] += size

    def _run(self, target: str, kwargs: dict[str, str], env: dict[str, str]) -> dict[str, Any]:
        self._apply_env(env)
        func = self._callables.get(target)
        if func is None:
            try:
                func = resolve(target)
            except LookupError as exc:
                return {"code": None, "output": "", "bytes": 0, "error": str(exc),
                        "recycle": False}
            self._callables[target] = func
        out: TailWriter | StreamWriter = (TailWriter(self._limit) if self._stream is None
                                          else StreamWriter(self._stream))
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = out
        code: int | None = 0
        error: str | None = None
        recycle = False
        try:
            value = func(**kwargs)
            if value is not None:
                out.write(f"return value: {_short_repr(value)}\n")
        except SystemExit as exc:  # sys.exit(n) in a job is its exit code, not the worker's
            # sys.exit(True) is exit status 1, as for a process (bool is an int subclass).
            code = int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                out.write(f"{exc.code}\n")
        except BaseException as exc:  # whatever the job raised (even KeyboardInterrupt)
            code = 1
            error = f"{type(exc).__name__}: {exc}\n{_traceback_tail(exc, skip=1)}"
            # After a MemoryError the process may hold half-built state: start afresh.
            recycle = isinstance(exc, MemoryError)
        finally:
            sys.stdout, sys.stderr = saved
        if isinstance(out, StreamWriter):
            out.finish()
            return {"code": code, "output": "", "bytes": 0, "error": error, "recycle": recycle}
        return {"code": code, "output": out.text(), "bytes": out.total, "error": error,
                "recycle": recycle}


def _short_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not fail a run that succeeded
        text = f"<unrepresentable {type(value).__name__}: {exc}>"
    return text if len(text) <= REPR_LIMIT else text[:REPR_LIMIT] + "..."


class _Channel:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._inbox = Inbox(sock)
        self._requests: deque[tuple[int, dict[str, Any]]] = deque()  # received, not yet run
        self._received = 0  # requests received so far (the agent numbers them alike)
        self._cancelled: set[int] = set()

    def receive(self) -> dict[str, Any] | None:
        """The next frame, or None at EOF."""
        while True:
            message = self._inbox.frame()
            if message is not None:
                return message
            if not self._inbox.fill():
                return None

    def next_request(self) -> tuple[dict[str, Any], bool] | None:
        """The next request and whether the agent cancelled it, or None at EOF. What has
        arrived meanwhile is read first (without waiting), so a cancel sent while the run
        before was running is seen before this one starts."""
        if self._requests:
            with contextlib.suppress(BlockingIOError):
                if not self._inbox.fill(socket.MSG_DONTWAIT):
                    return None
        while True:
            self._sort()
            if self._requests:
                number, request = self._requests.popleft()
                if number in self._cancelled:
                    self._cancelled.discard(number)
                    return request, True
                return request, False
            if not self._inbox.fill():
                return None

    def _sort(self) -> None:
        """Move the frames received into requests (numbered) and cancellations."""
        while True:
            message = self._inbox.frame()
            if message is None:
                return
            if "cancel" in message:
                number = message["cancel"]
                if isinstance(number, int) and number >= self._received - len(self._requests):
                    self._cancelled.add(number)
                continue
            self._requests.append((self._received, message))
            self._received += 1

    def send(self, message: Mapping[str, Any]) -> None:
        self._sock.sendall(encode(message))


def _init(message: Mapping[str, Any], channel: _Channel) -> Runner:
    path = message.get("path")
    if isinstance(path, list) and all(isinstance(p, str) for p in path):
        sys.path[:] = path
    max_rss_mb = message.get("max_rss_mb")
    if isinstance(max_rss_mb, int) and max_rss_mb > 0:
        # RLIMIT_DATA (heap, anonymous mappings, thread stacks), not RLIMIT_AS: address space
        # that is only reserved (each thread's malloc arena reserves 64 MiB) would otherwise
        # count, and 16-32 threads could not even start under 1 GiB.
        limit = max_rss_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:  # if memory runs out after all, the kernel's OOM killer should pick us, not the agent
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    output_limit = message.get("output_limit")
    try:  # our own copy of the output file: a job that closes or redirects fd 1 cannot hide it
        out_fd: int | None = os.dup(1)  # dup() makes it non-inheritable
    except OSError:
        out_fd = None
    return Runner(output_limit if isinstance(output_limit, int) and output_limit > 0
                  else OUTPUT_LIMIT, out_fd,
                  channel.send if message.get("stream") is True else None)


def serve(fd: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is for the agent, which then stops us
    faulthandler.enable(file=2, all_threads=True)  # fd 2: the file the agent reads
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)  # processes a job starts must not hold the agent's channel
    channel = _Channel(sock)
    first = channel.receive()
    if first is None:
        return 0
    runner = _init(first, channel)
    channel.send({"ready": os.getpid()})
    while True:
        taken = channel.next_request()
        if taken is None:
            return 0
        request, cancelled = taken
        if cancelled:  # stopped while it waited here: never started
            channel.send({"cancelled": True, "ended": time.monotonic()})
            continue
        target, kwargs, env = request.get("target"), request.get("kwargs"), request.get("env")
        if not (isinstance(target, str) and isinstance(kwargs, dict) and isinstance(env, dict)):
            print(f"cronsul pyworker: malformed request {request!r:.200}", file=sys.__stderr__)
            return 2
        limit = request.get("output_limit")
        reply = runner.run(target, kwargs, env,
                           limit if isinstance(limit, int) and limit >= 0 else None)
        channel.send(reply)
        if reply["recycle"]:
            return 0


def main(argv: list[str]) -> NoReturn:
    code = serve(int(argv[-1]))
    # Threads a job left behind must not keep a retired worker alive.
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv)
