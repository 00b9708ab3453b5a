"""Callables for the Python job pool tests (imported inside pool worker processes)."""

from __future__ import annotations

import ctypes
import os
import sys
import time


def noop() -> None:
    return None


def add(a: str, b: str) -> int:
    print(f"adding {a} and {b}")
    return int(a) + int(b)


def fail(reason: str = "boom") -> None:
    _inner(reason)


def _inner(reason: str) -> None:
    raise ValueError(f"bad thing: {reason}")


def sleep(seconds: str) -> str:
    time.sleep(float(seconds))
    return "slept"


def hard_exit(code: str = "7") -> None:
    os._exit(int(code))


def segfault() -> None:
    ctypes.string_at(0)


def hog_memory(mb: str, delay: str = "0") -> int:
    time.sleep(float(delay))
    chunks = [bytearray(1024 * 1024) for _ in range(int(mb))]
    return len(chunks)


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def pid() -> int:
    return os.getpid()


def exit_with(code: str) -> None:
    sys.exit(True if code == "True" else int(code))


def threads(n: str) -> int:
    """``n`` threads alive at once, each allocating a little (its own malloc arena)."""
    import threading

    count = int(n)
    together = threading.Barrier(count + 1)
    sizes: list[int] = []

    def work() -> None:
        sizes.append(len([bytearray(4096) for _ in range(64)]))
        together.wait(30)

    pool = [threading.Thread(target=work) for _ in range(count)]
    for t in pool:
        t.start()
    together.wait(30)
    for t in pool:
        t.join()
    return sum(sizes)


def chatty(n: str) -> None:
    sys.stdout.write("x" * int(n) + "END")
    os.write(2, b"from fd 2\n")


NOT_CALLABLE = 42


def spawn_and_hang(pidfile: str) -> None:
    import subprocess

    child = subprocess.Popen(["sleep", "300"])
    with open(pidfile, "w") as f:
        f.write(str(child.pid))
    time.sleep(300)


def set_environ() -> None:
    os.environ["CRONSUL_JOB"] = "changed-by-job"
    os.environ["CRONSUL_EXTRA"] = "left-behind"


def odd_name() -> None:
    """Prints a file name decoded with surrogateescape: a lone surrogate, not valid UTF-8."""
    print("wrote", b"report-\xff.csv".decode("utf-8", "surrogateescape"))


def say(text: str) -> None:
    """Writes ``text`` through Python and straight to fd 1 (as a C extension would)."""
    print(f"py:{text}")
    os.write(1, f"fd:{text}\n".encode())


def maybe_exit(code: str, delay: str = "0") -> str:
    time.sleep(float(delay))
    if code != "0":
        os._exit(int(code))
    return "lived"


def big(n: str, ch: str = "x") -> None:
    sys.stdout.write(ch * int(n))


def mark_then(path: str, code: str = "0", delay: str = "0") -> str:
    """Appends a line to ``path`` when it starts (so a test can count starts), then waits and
    exits with ``code`` (0: returns)."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(float(delay))
    if code != "0":
        os._exit(int(code))
    return "ok"


def hold_memory(mb: str, mark: str, seconds: str = "60") -> None:
    """Touch ``mb`` MiB, say so in file ``mark``, then hold it (a big worker to kill)."""
    block = b"x" * (int(mb) * 1024 * 1024)
    with open(mark, "w") as f:
        f.write(str(len(block)))
    time.sleep(float(seconds))


def print_then_wait(path: str, seconds: str = "60") -> str:
    """Prints two lines and a partial one (flushed), then waits up to ``seconds`` for file
    ``path`` to exist: a test sees the lines arrive while the run is still going, or kills it."""
    print("step 1: fetched")
    print("step 2: parsed")
    print("step 3: uploading...", end="", flush=True)
    deadline = time.monotonic() + float(seconds)
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    print(" done")
    return "waited"


def fork_child_prints() -> None:
    """A forked child (multiprocessing's default on Linux) prints too."""
    pid = os.fork()
    if pid == 0:
        print("from the child")
        os._exit(0)
    os.waitpid(pid, 0)
    print("from the parent")


def fork_then_die(pidfile: str) -> None:
    """Leaves a forked child holding the worker's socket, then the worker dies."""
    print("forking")
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    with open(pidfile, "w") as f:
        f.write(str(pid))
    os._exit(5)


def many_lines(n: str) -> None:
    for i in range(int(n)):
        print(f"line {i}")


def ticker(n: str, every: str = "0.5") -> str:
    """Prints ``tick <i>`` n times, ``every`` seconds apart (a callable's live output)."""
    for i in range(int(n)):
        print(f"tick {i}", flush=True)
        time.sleep(float(every))
    return "ticked"


def malloc_in_use() -> int | None:
    """Bytes this process holds from malloc (glibc's mallinfo2), or None without glibc 2.33+."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)
    if mallinfo2 is None:
        return None
    mallinfo2.restype = MallInfo2
    return int(mallinfo2().uordblks)
