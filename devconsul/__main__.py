"""``python -m devconsul --port 8500 [--agent NAME=PORT ...] [--data-dir DIR]``

Starts the Consul dev server. Prints one line per extra agent endpoint, then
``devconsul listening on HOST:PORT`` once everything answers. SIGTERM/SIGINT exit cleanly.
Dev/test only: never use it in production.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys
from pathlib import Path
from types import FrameType

from devconsul import catalog
from devconsul.acl import KnownTokens
from devconsul.app import App
from devconsul.clock import Clock
from devconsul.store import Store


def _agent_arg(text: str) -> tuple[str, int]:
    name, sep, port = text.partition("=")
    if not name or not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=PORT, got {text!r}")
    return name, int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m devconsul", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8500, help="HTTP port of the main node")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only!)")
    p.add_argument("--node-name", default="devconsul", help="name of the main node")
    p.add_argument("--agent", type=_agent_arg, action="append", default=[],
                   metavar="NAME=PORT", help="extra agent endpoint (PORT 0 = pick a free one)")
    p.add_argument("--data-dir", type=Path, help="persist state here and reload it on start")
    p.add_argument("--acl-token", action="append", default=[], metavar="TOKEN",
                   help="enforce ACLs coarsely: /v1/ calls need one of these tokens, else 403")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s devconsul %(levelname)s %(message)s")
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(Clock(), args.data_dir)
    store.start()
    lines: list[str] = []
    acl = KnownTokens(args.acl_token) if args.acl_token else None
    app = App(store, args.node_name, args.host, announce=lines.append, verbose=args.verbose,
              acl=acl)
    store.write(lambda st, idx, now: catalog.ensure_node(st, idx, args.node_name))
    app.add_agent(args.node_name, args.port)
    agents = dict(store.read(lambda st: dict(st.agents)))
    for name, port in args.agent:
        agents[name] = port or agents.get(name, 0)
    for name, port in agents.items():
        if name != args.node_name:
            app.add_agent(name, port)
    main_line = lines.pop(0)
    for line in [*lines, main_line]:
        print(line, flush=True)
    app._announce = lambda line: print(line, flush=True)

    # The handler takes no lock (an Event.set() there can deadlock the main thread inside
    # Event.wait): it notes the signal and wakes the select below through a pipe.
    received: list[int] = []
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        with contextlib.suppress(OSError):
            os.write(wake_w, b"!")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not received:
        select.select([wake_r], [], [], 1.0)
    app.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
