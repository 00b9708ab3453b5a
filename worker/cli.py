"""``cronsul``: the agent and the operator's commands.

Exit codes: 0 ok, 1 runtime failure (a run failed, an operation was refused), 2 usage or config
error or nothing by that name, 3 cannot reach Consul or Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from scheduler.durations import format_duration
from scheduler.errors import ConfigError, ConnectionFailure, CronsulError
from scheduler.runs import iso_utc
from worker.cliargs import MAX_FIRE_TIMES, count
from worker.config import Config, load_config

if TYPE_CHECKING:
    from worker.executor import Outcome

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_CONFIG = "/etc/cronsul/cronsul.toml"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"cronsul: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cronsul", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config", default=os.environ.get("CRONSUL_CONFIG", DEFAULT_CONFIG),
                        help=f"config file (default: $CRONSUL_CONFIG or {DEFAULT_CONFIG})")
        return sp

    a = with_config(sub.add_parser("agent", help="run the agent (what the systemd unit runs)"))
    a.add_argument("--log-level", default="info")
    ck = with_config(sub.add_parser("check", help="validate the config, show next fire times"))
    ck.add_argument("-n", type=count(MAX_FIRE_TIMES), default=5,
                    help=f"fire times per job (default 5, at most {MAX_FIRE_TIMES})")
    ck.add_argument("--json", action="store_true")
    ck.add_argument("-q", "--quiet", action="store_true",
                    help="print one line, no fire times (what `systemctl reload` runs first)")
    nx = with_config(sub.add_parser("next", help="next fire times of one job"))
    nx.add_argument("job")
    nx.add_argument("-n", type=count(MAX_FIRE_TIMES), default=20,
                    help=f"fire times (default 20, at most {MAX_FIRE_TIMES})")
    nx.add_argument("--json", action="store_true")
    nx.add_argument("--from", dest="start", type=start_time, default=None, metavar="TIME",
                    help="list from this time instead of now: ISO 8601, e.g. 2027-03-28T00:00 "
                         "(in the job's time zone unless it names one), to see a DST day")
    st = with_config(sub.add_parser("status", help="leader and nodes, from Consul"))
    st.add_argument("--json", action="store_true")
    rn = with_config(sub.add_parser("run", help="enqueue a run now (or --local: run it here)"))
    rn.add_argument("job")
    rn.add_argument("--local", action="store_true", help="run in the foreground, no Consul/Redis")
    rn.add_argument("--param", action="append", default=[], metavar="K=V")
    rn.add_argument("--wait", action="store_true", help="follow the run; exit with its status")
    pa = with_config(sub.add_parser("pause", help="pause a job (writes <prefix>/paused/<job>)"))
    pa.add_argument("job")
    pa.add_argument("--reason", default="")
    rs = with_config(sub.add_parser("resume", help="resume a paused job"))
    rs.add_argument("job")
    sp = with_config(sub.add_parser("stop", help="stop a running run (recorded failed, not "
                                                 "retried)"))
    sp.add_argument("run_id")
    sp.add_argument("--reason", default="")
    ic = sub.add_parser("import-crontab", help="turn a crontab into [jobs.*] TOML")
    ic.add_argument("file", nargs="?", default="-", help="crontab file, or - for stdin")
    ic.add_argument("--system", action="store_true",
                    help="system crontab format (/etc/crontab, /etc/cron.d): a user column")
    ic.add_argument("--prefix", default="cron", help="job name prefix (default: cron)")
    from worker import inspect_cmds

    inspect_cmds.add_parsers(sub, with_config)
    dr = with_config(sub.add_parser(
        "drain", help="put this node in maintenance: step down, finish runs, take no new ones"))
    dr.add_argument("--reason", default="", help="shown in Consul (default: cronsul drain by "
                    "user@host)")
    with_config(sub.add_parser("undrain", help="end this node's maintenance"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"cronsul: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConnectionFailure as exc:
        print(f"cronsul: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except CronsulError as exc:
        print(f"cronsul: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        if args.command == "agent":  # not a reader going away: a real failure, shown
            raise
        # The reader went away (`cronsul status --json | head`): stop quietly, as cat does.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "import-crontab":
        from worker.crontab import import_crontab

        return import_crontab(args.file, system=args.system, prefix=args.prefix)
    cfg = load_config(args.config)
    if args.command == "agent":
        from worker.agent import Agent
        from worker.logs import configure

        configure(args.log_level, node=cfg.agent.node)
        return Agent(cfg).run()
    if args.command == "check":
        return _check(cfg, args.n, args.json, args.quiet)
    if args.command == "next":
        return _next(cfg, args.job, args.n, args.json, args.start)
    if args.command == "status":
        return _status(cfg, args.json)
    if args.command == "run":
        if args.local:
            return _run(cfg, args.job, args.local, args.param)
        from worker import opcmds

        return opcmds.enqueue(cfg, args.job, args.param, args.wait)
    if args.command == "stop":
        from worker import opcmds

        return opcmds.stop(cfg, args.run_id, args.reason)
    if args.command in ("pause", "resume"):
        from worker import opcmds

        if args.command == "pause":
            return opcmds.pause(cfg, args.job, args.reason)
        return opcmds.resume(cfg, args.job)
    if args.command in ("history", "logs", "dlq"):
        from worker import inspect_cmds

        return inspect_cmds.dispatch(cfg, args)
    if args.command in ("drain", "undrain"):
        from worker.maintenance import set_drain

        draining = args.command == "drain"
        svc = set_drain(cfg, draining, args.reason if draining else None)
        print(f"{svc}: " + ("draining (service maintenance on): no new runs, running ones "
                            "finish; if it leads, another node takes over" if draining else
                            "maintenance off: eligible and taking runs again"))
        return EXIT_OK
    raise ConfigError(f"unknown command {args.command!r}")  # argparse prevents this


def _upcoming(cfg: Config, job: str, n: int, start: datetime | None = None) -> list[datetime]:
    spec = cfg.jobs[job]
    out: list[datetime] = []
    after = datetime.now(UTC) if start is None else start
    while len(out) < n:
        nxt = spec.schedule.next_fire(after)
        if nxt is None:
            break
        out.append(nxt)
        after = nxt
    return out


def _local(when: datetime, tz: str) -> str:
    from zoneinfo import ZoneInfo

    return when.astimezone(ZoneInfo(tz)).isoformat()


def _check(cfg: Config, n: int, as_json: bool, quiet: bool = False) -> int:
    if quiet:  # the config loaded: that is the check
        print(f"{cfg.path}: OK, {len(cfg.jobs)} job(s), config hash {cfg.config_hash}")
        _warn_secrets(cfg)
        return EXIT_OK
    report: dict[str, Any] = {"config": str(cfg.path), "config_hash": cfg.config_hash, "jobs": {}}
    for name, spec in sorted(cfg.jobs.items()):
        report["jobs"][name] = {
            "schedule": spec.schedule.expression, "timezone": spec.timezone,
            "command": list(spec.command),
            **({"callable": spec.callable} if spec.callable is not None else {}),
            "next": [_local(t, spec.timezone) for t in _upcoming(cfg, name, n)],
        }
        # A one-shot (@at) that already fired has nothing left to do: say so, do not look idle.
        report["jobs"][name]["done"] = not report["jobs"][name]["next"]
    if as_json:
        print(json.dumps(report, indent=2))
        _warn_secrets(cfg)
        return EXIT_OK
    print(f"{cfg.path}: OK, {len(cfg.jobs)} job(s), config hash {cfg.config_hash}")
    _warn_secrets(cfg)
    for name, job in report["jobs"].items():
        print(f"\n{name}: {job['schedule']!r} ({job['timezone']})"
              + (f" callable {job['callable']}" if "callable" in job else ""))
        for t in job["next"]:
            print(f"  {t}")
        if job["done"]:
            print("  done: fires no more (a one-shot whose time has passed)")
    return EXIT_OK


def _warn_secrets(cfg: Config) -> None:
    from worker.secretfiles import exposure_warnings

    for problem in exposure_warnings(cfg.secret_files):
        print(f"cronsul: warning: {problem}", file=sys.stderr)
    for name, spec in sorted(cfg.jobs.items()):
        for key, value in spec.env:
            if "$" in value:  # a crontab habit: PATH=$PATH:/opt/bin
                print(f"cronsul: warning: job {name!r}: env {key} = {value!r} is used as "
                      "written: cronsul does not expand $VARIABLES in env values",
                      file=sys.stderr)


def _next(cfg: Config, job: str, n: int, as_json: bool, start: datetime | None = None) -> int:
    from zoneinfo import ZoneInfo

    if job not in cfg.jobs:
        raise ConfigError(f"{cfg.path}: no job named {job!r} (jobs: {', '.join(sorted(cfg.jobs))})")
    spec = cfg.jobs[job]
    after = None
    if start is not None:  # a wall time is the job's own zone's, unless it names one
        if start.tzinfo is None:
            start = start.replace(tzinfo=ZoneInfo(spec.timezone))
        after = start.astimezone(UTC) - timedelta(microseconds=1)  # "from" includes it
    times = _upcoming(cfg, job, n, after)
    # Jitter is a function of the job and the tick: the fire times are known ahead too.
    scheduled = spec.scheduled()
    fires = [scheduled.fire_at(t) for t in times]
    # A fan-out's jitter spreads its parameter sets over [tick, tick + jitter) instead.
    spread = scheduled.jitter if scheduled.jitter and scheduled.params else None
    if as_json:
        print(json.dumps({"job": job, "timezone": spec.timezone,
                          "next": [iso_utc(t) for t in times],
                          **({"fires": [iso_utc(f) for f in fires]}
                             if scheduled.jitter and not spread else {}),
                          **({"spread_s": spread.total_seconds()} if spread else {})}))
    else:
        for t, f in zip(times, fires, strict=True):
            print(f"{_local(t, spec.timezone)}  ({iso_utc(t)})"
                  + (f"  fires {iso_utc(f)} (jitter +{(f - t).total_seconds():g}s)"
                     if f != t else ""))
        if spread:
            print(f"(jitter: each of its {len(scheduled.params)} parameter sets starts at its "
                  f"own offset in [0, {format_duration(spread)}) after each tick)")
    return EXIT_OK


def start_time(text: str) -> datetime:
    """`next --from`: an ISO 8601 date or time, with an offset (or Z) or without (then read in
    the job's zone). ArgumentTypeError (exit 2) naming what is wrong otherwise."""
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time (e.g. 2027-03-28, 2027-03-28T01:30 or "
            "2027-03-28T01:30+01:00)") from None


def _status(cfg: Config, as_json: bool) -> int:
    from worker.redisconn import redis_client
    from worker.status import gather, render

    report = gather(cfg, redis_client(cfg.redis))
    print(json.dumps(report, indent=2) if as_json else render(report))
    return EXIT_UNREACHABLE if "redis_error" in report else EXIT_OK


def _run(cfg: Config, job: str, local: bool, params: list[str]) -> int:
    """`cronsul run JOB --local`: the job in the foreground, same environment and timeout."""
    from worker.executor import (
        Execution,
        account_of,
        job_environment,
        root_refusal,
        seal_inherited_fds,
    )
    from worker.opcmds import parse_params
    from worker.params import render_argv

    if job not in cfg.jobs:
        raise ConfigError(f"{cfg.path}: no job named {job!r}")
    values = parse_params(cfg, job, params)
    spec = cfg.jobs[job]
    refusal = root_refusal(spec.user, spec.allow_root, spec.callable is not None, os.geteuid())
    if refusal is not None:
        print(f"cronsul: {job}: {refusal}", file=sys.stderr)
        return EXIT_FAILURE
    run_id = f"{job}@local-{uuid.uuid4().hex}"  # never a cluster run's id
    env = {"CRONSUL_JOB": job, "CRONSUL_RUN_ID": run_id,
           "CRONSUL_SCHEDULED_AT": iso_utc(datetime.now(UTC)), "CRONSUL_ATTEMPT": "1",
           "CRONSUL_NODE": cfg.agent.node}
    env.update({f"CRONSUL_PARAM_{k.upper()}": v for k, v in values.items()})
    seal_inherited_fds()  # as the agent does: the job gets no descriptor of the shell's
    try:
        account = account_of(spec.user) if spec.callable is None else {}
    except KeyError:
        account = {}  # the run itself reports the unknown user
    job_env = job_environment(os.environ, spec.env, env, account)
    if spec.callable is not None:
        outcome = _run_callable(spec.callable, values, job_env, spec.timeout.total_seconds())
    else:
        outcome = Execution(None, cfg.worker.kill_grace.total_seconds()).run(
            render_argv(spec.command, values), job_env, spec.working_dir,
            spec.timeout.total_seconds(), user=spec.user)
    sys.stdout.write(outcome.output)
    if outcome.error:
        print(f"cronsul: {outcome.error}", file=sys.stderr)
    from worker.consumer import why_failed

    how = "succeeded" if outcome.ok else f"failed: {why_failed(outcome) or 'see the error'}"
    print(f"cronsul: {run_id} (run here, not recorded): {how}, exit_code="
          f"{outcome.exit_code if outcome.exit_code is not None else '-'} signal="
          f"{outcome.signal or '-'} timed_out={'yes' if outcome.timed_out else 'no'} "
          f"duration={outcome.duration_s:.3f}s", file=sys.stderr)
    return EXIT_OK if outcome.ok else EXIT_FAILURE


def _run_callable(target: str, kwargs: dict[str, str], env: dict[str, str],
                  timeout: float) -> Outcome:
    """A callable job run here as the agent runs it: in a warm worker process of its own (a
    pool of one), with the job's timeout; the worker imports from this command's sys.path."""
    from worker.pyjobs import PythonPool

    pool = PythonPool(1, watchdog=None)
    pool.start()  # CronsulError (exit 1) if the worker cannot start
    try:
        return pool.run(target, kwargs, env, timeout)
    finally:
        pool.stop()


if __name__ == "__main__":
    sys.exit(main())
