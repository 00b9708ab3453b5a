"""`cronsul import-crontab`: a crontab or /etc/cron.d file turned into `[jobs.*]` TOML.

Each job line becomes a job whose command is ``["/bin/sh", "-c", <the line's command>]`` (crontab
commands are shell strings; cronsul runs argv lists, so the shell is made explicit). Environment
lines apply to the jobs below them; ``CRON_TZ`` becomes the job's ``timezone`` (any zone, UTC
too: a job without one takes the agent's), while ``TZ``, as in cronie, only goes into the job's
environment (cron schedules by ``CRON_TZ`` or its host's local time). In a system crontab
(``--system``) the user column becomes ``user = "..."`` (``allow_root = true`` for root, which
an agent running as root otherwise refuses). What cronsul cannot express is refused with the
reason, as a comment in the output and on stderr:

* ``@reboot``: cronsul has no boot trigger (it runs on a cluster, not one host): use a systemd
  unit on the hosts that need it.
* an unescaped ``%``: cron turns it into a newline and feeds what follows to the command's stdin;
  cronsul gives jobs no stdin. Rewrite as ``printf 'line1\\nline2' | command``. An escaped ``\\%``
  is a literal ``%`` and is converted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.errors import ScheduleError
from scheduler.runs import JOB_NAME
from scheduler.schedule import parse_schedule

ALIASES = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
ENV_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")
# Dots are left out: in a TOML table header they would nest tables.
SLUG = re.compile(r"[^A-Za-z0-9_-]+")
# A job name's length limit (scheduler.runs.JOB_NAME), and so the longest --prefix that leaves
# room for "-<word>-<6 hex>-<NNN>".
NAME_MAX = 100
PREFIX_MAX = NAME_MAX - 20
# Environment that cron itself interprets and cronsul handles differently (or not at all).
CRON_ONLY = {"MAILTO": "cronsul records output (cronsul logs / history); to mail failures, "
                       "set [notify] command (docs/operations.md)",
             "MAILFROM": "cronsul does not mail output",
             "RANDOM_DELAY": "use jitter = \"...\" on the job instead"}


@dataclass
class Converted:
    toml: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _split_percent(command: str) -> tuple[str, bool]:
    """(command with \\% unescaped, whether an unescaped % was present)."""
    out, i, stdin = [], 0, False
    while i < len(command):
        ch = command[i]
        if ch == "\\" and i + 1 < len(command) and command[i + 1] == "%":
            out.append("%")
            i += 2
            continue
        if ch == "%":
            stdin = True
            break
        out.append(ch)
        i += 1
    return "".join(out), stdin


def _job_name(prefix: str, user: str | None, command: str, taken: set[str]) -> str:
    """``<prefix>-<command word>-<6 hex>``: the hex is hashed from the user and the command,
    not the line's position, so re-importing an edited crontab keeps the names of the lines
    that did not change (a job's name keys its cursor, history and pause; with line numbers,
    one line added at the top renamed every job below it). The same command twice (under
    other schedules) gets ``-2``, ``-3``... in file order."""
    word = command.split()[0].rsplit("/", 1)[-1] if command.split() else "job"
    digest = hashlib.sha256(f"{user or ''}\x00{command}".encode()).hexdigest()[:6]
    # Job names are at most NAME_MAX characters: the word gives way to the prefix, the hash
    # and room for a "-NNN" suffix.
    room = max(1, NAME_MAX - len(prefix) - len(digest) - 2 - 4)
    base = f"{prefix}-{(SLUG.sub('-', word).strip('-') or 'job')[:room]}-{digest}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def convert(text: str, *, system: bool = False, prefix: str = "cron",
            source: str = "crontab") -> Converted:
    result = Converted()
    env: dict[str, str] = {}
    timezone = "UTC"
    zone_set = False  # a CRON_TZ / TZ line came before the first job
    shell = "/bin/sh"
    users_warned = False
    names: set[str] = set()
    result.toml.append(f"# converted from {source} by `cronsul import-crontab`")
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        m = ENV_LINE.match(line)
        if m and not line.startswith("@") and not line.split()[0][0].isdigit():
            name, value = m.group(1), _unquote(m.group(2))
            if name == "CRON_TZ":
                timezone = value
                zone_set = True
            elif name == "SHELL":
                shell = value
            elif name in CRON_ONLY:
                result.warnings.append(f"{where}: {name} ignored: {CRON_ONLY[name]}")
            else:
                env[name] = value
            continue
        if line.startswith("-"):  # cronie: "-" before the times only turns off syslog
            line = line[1:].lstrip()
        fields = line.split(None, 1) if line.startswith("@") else line.split(None, 5)
        if line.startswith("@"):
            alias = fields[0]
            if alias == "@reboot":
                reason = ("@reboot refused: cronsul has no boot trigger (it schedules for a "
                          "cluster); use a systemd unit on the hosts that need it")
                result.warnings.append(f"{where}: {reason}")
                result.toml.append(f"# {where}: {reason}\n#   {raw}")
                continue
            if alias not in ALIASES or len(fields) < 2:
                result.errors.append(f"{where}: unknown or incomplete entry {line!r}")
                continue
            schedule, rest = alias, fields[1]
        else:
            if len(fields) < 6:
                result.errors.append(f"{where}: expected 5 time fields and a command: {line!r}")
                continue
            schedule, rest = " ".join(fields[:5]), fields[5]
        user = None
        if system:
            parts = rest.split(None, 1)
            if len(parts) < 2:
                result.errors.append(f"{where}: system crontab line lacks user or command")
                continue
            user, rest = parts
        command, has_stdin = _split_percent(rest)
        if has_stdin:
            reason = ("unescaped % refused: cron feeds the text after it to stdin and cronsul "
                      "gives jobs no stdin; rewrite as printf '...' | command")
            result.warnings.append(f"{where}: {reason}")
            result.toml.append(f"# {where}: {reason}\n#   {raw}")
            continue
        try:
            parse_schedule(schedule, job=f"{prefix}-{number}", timezone=timezone)
        except ScheduleError as exc:
            result.errors.append(f"{where}: {exc}")
            continue
        name = _job_name(prefix, user, command, names)
        names.add(name)
        result.toml.append("")
        result.toml.append(f"# {where}: {raw.strip()}")
        if user is not None and not users_warned:
            users_warned = True
            result.warnings.append(
                f"{where}: jobs with a user column get user = \"...\": the agent must run as "
                "root to switch users (docs/operations.md); an unprivileged agent refuses them")
        if not zone_set and not names - {name}:  # the first job, and no zone given
            result.warnings.append(
                f"{where}: no CRON_TZ line before it: the jobs take [agent] timezone "
                f"(UTC unless set), while cron ran them in its host's local time "
                f"(this host's: {host_zone()}); add timezone = \"...\" if that was not UTC")
        result.toml.append(f"[jobs.{name}]")
        result.toml.append(f"schedule = {json.dumps(schedule)}")
        if zone_set:
            result.toml.append(f"timezone = {json.dumps(timezone)}")
        result.toml.append(f"command = {json.dumps([shell, '-c', command])}")
        if user is not None:
            result.toml.append(f"user = {json.dumps(user)}")
            if user == "root":
                result.toml.append("allow_root = true  # cron ran it as root")
        if env:
            pairs = ", ".join(f"{k} = {json.dumps(v)}" for k, v in env.items())
            result.toml.append(f"env = {{ {pairs} }}")
    return result


def host_zone(localtime: Path = Path("/etc/localtime")) -> str:
    """This host's local time zone name, as cron would use it: $TZ, else the zoneinfo file
    /etc/localtime links to, else "unknown"."""
    if os.environ.get("TZ"):
        return os.environ["TZ"].lstrip(":")
    try:
        target = str(localtime.resolve())
    except OSError:
        return "unknown"
    return target.split("zoneinfo/", 1)[1] if "zoneinfo/" in target else "unknown"


def is_system_crontab(path: str) -> bool:
    """/etc/crontab and the files of /etc/cron.d have a user column between times and
    command."""
    p = Path(path)
    return str(p) == "/etc/crontab" or p.parent == Path("/etc/cron.d")


def import_crontab(path: str, *, system: bool, prefix: str) -> int:
    if not JOB_NAME.match(prefix) or len(prefix) > PREFIX_MAX:
        print(f"cronsul: --prefix {prefix!r} is invalid: use 1-{PREFIX_MAX} characters from "
              "A-Z a-z 0-9 _ . -, starting with a letter or digit (it starts every job name)",
              file=sys.stderr)
        return 2
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        print(f"cronsul: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    if not system and is_system_crontab(path):
        system = True  # these files have a user column; without it "root" became the command
        print(f"cronsul: {path} is a system crontab: reading its user column (--system)",
              file=sys.stderr)
    result = convert(text, system=system, prefix=prefix,
                     source="stdin" if path == "-" else path)
    for w in result.warnings:
        print(f"cronsul: warning: {w}", file=sys.stderr)
    for e in result.errors:
        print(f"cronsul: error: {e}", file=sys.stderr)
    print("\n".join(result.toml))
    return 2 if result.errors else 0
