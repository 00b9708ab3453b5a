"""Bad input never takes the cluster down and never reaches a shell, a path or a Redis key raw.

Malformed TOML, wrong types and huge values are refused with a ConfigError naming the file (and
the section and key); hostile job names are refused outright; hostile parameter values travel
as whole argv elements or environment variables, byte for byte, and never through a shell;
hostile run messages become dead letters with a reason.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from cronsul_testing import render_config

from scheduler.errors import ConfigError, MessageError
from scheduler.runs import JOB_NAME, Run, check_job_name
from worker.cli import main
from worker.config import MAX_CONFIG_BYTES, MAX_JOBS, Config, load_config
from worker.keys import Keys
from worker.messages import MAX_PAYLOAD_BYTES, RUN_ID_TAIL, parse_message
from worker.params import MAX_SETS, MAX_VALUE_BYTES, render_argv
from worker.sink import run_payload

HOSTILE_VALUES = [
    "../../../etc/passwd", "/etc/shadow", "a/b\\c", "$(touch {marker})", "`touch {marker}`",
    "; touch {marker}", "| touch {marker}", "&& touch {marker} &", "x\ntouch {marker}\n",
    "'\"; touch {marker}; echo \"'", "${IFS}touch${IFS}{marker}", "*", "-rf", "--help",
    "\r\n\t", "é✓\u202e", " leading and trailing ",
]
HOSTILE_NAMES = ["", "../x", "a/b", "/abs", "a\\b", "a;b", "a b", "a\nb", "a\0b", "-x", ".x",
                 "_x", "$(x)", "a`b`", "a|b", "a*b", "x" * 101, "é", "a:b", "a@b", "a#b",
                 "a{b}", "a\tb"]


def write(tmp_path: Path, jobs: dict[str, Any], text: str | None = None) -> Path:
    path = tmp_path / "cronsul.toml"
    path.write_text(text if text is not None else render_config({"agent": {"node": "n1"}}, jobs))
    return path


def config(tmp_path: Path, jobs: dict[str, Any]) -> Config:
    return load_config(write(tmp_path, jobs))


# -- malformed TOML and wrong types -------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "[agent\nnode = 1", "a = ", "[jobs.x]\nschedule = '@daily'\nschedule = '@hourly'",
    "\x00", "[jobs.x]\ncommand = [\"a\",", b"\xff\xfe[agent]".decode("latin-1"),
    "a = " + "[" * 100_000 + "]" * 100_000,  # tomllib recursion: nested too deeply
])
def test_malformed_toml_is_a_config_error_naming_the_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, {}, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: invalid TOML")


def test_malformed_toml_exits_2_without_a_traceback(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, {}, "a = " + "[" * 50_000)
    assert main(["check", "-c", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(("sections", "job", "where"), [
    ({"worker": {"concurrency": "4"}}, {}, "[worker] concurrency: expected an integer"),
    ({"worker": {"concurrency": True}}, {}, "[worker] concurrency: expected an integer, got a "
     "boolean"),
    ({"worker": {"queues": "default"}}, {}, "[worker] queues: expected a list of strings"),
    ({"redis": {"url": 6379}}, {}, "[redis] url: expected a string"),
    ({"consul": {"token": 12}}, {}, "[consul] token: expected a string"),
    ({"agent": {"node": ["n1"]}}, {}, "[agent] node: expected a string"),
    ({}, {"command": "/bin/true"}, "[jobs.j] command: expected a list of strings"),
    ({}, {"command": ["/bin/true", 1]}, "[jobs.j] command: item 1 must be a string"),
    ({}, {"timeout": 5}, "[jobs.j] timeout: expected a duration string"),
    ({}, {"timeout": "5 parsecs"}, "[jobs.j] timeout: "),
    ({}, {"retries": True}, "[jobs.j] retries: expected an integer, got a boolean"),
    ({}, {"retries": 10**30}, "[jobs.j] retries: "),
    ({}, {"params": "x"}, "[jobs.j] params: expected a list of tables"),
    ({}, {"params": [{"x": [1]}]}, "item 0: x must be a string, number or boolean"),
    ({}, {"env": {"A": 1}}, "[jobs.j] env: value of 'A' must be a string"),
    ({}, {"env": {"A=B": "x"}}, "[jobs.j] env: 'A=B' is not a valid environment variable"),
    ({}, {"allow_root": "yes"}, "[jobs.j] allow_root: expected true or false"),
    ({}, {"user": 0}, "[jobs.j] user: expected a string"),
    ({}, {"shell": 1}, "[jobs.j] shell: expected true or false"),
])
def test_wrong_types_name_file_section_and_key(tmp_path: Path, sections: dict[str, Any],
                                               job: dict[str, Any], where: str) -> None:
    body = {"schedule": "@daily", "command": ["/bin/true"], **job}
    path = write(tmp_path, {}, render_config({"agent": {"node": "n1"}, **{
        k: v for k, v in sections.items() if k != "agent"}} if "agent" not in sections
        else sections, {"j": body}))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: "), exc.value
    assert where in str(exc.value)


def test_jobs_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[top level\] jobs: expected a table"):
        load_config(write(tmp_path, {}, "jobs = 5\n"))
    with pytest.raises(ConfigError, match=r"\[jobs.x\]: expected a table"):
        load_config(write(tmp_path, {}, "[jobs]\nx = 5\n"))


# -- huge values --------------------------------------------------------------------------------

def test_a_10_mb_string_in_the_config_is_refused_before_parsing(tmp_path: Path) -> None:
    huge = "x" * (10 * 2**20)
    path = write(tmp_path, {}, f'[agent]\nnode = "{huge}"\n')
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_BYTES // 2**20} MiB"):
        load_config(path)
    assert time.monotonic() - t0 < 1.0


def test_a_10_mb_included_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "big.toml").write_text(f'[jobs.x]\nschedule = "{"x" * (10 * 2**20)}"\n')
    path = write(tmp_path, {}, 'include = ["big.toml"]\n')
    with pytest.raises(ConfigError, match=r"big.toml: included file is larger than"):
        load_config(path)


def test_100k_jobs_are_refused_quickly(tmp_path: Path) -> None:
    n = 100_000  # ~5.8 MB of TOML: under the size cap, over the job cap
    text = '[agent]\nnode = "n1"\n' + "".join(
        f'[jobs.j{i}]\nschedule = "@daily"\ncommand = ["/bin/true"]\n' for i in range(n))
    path = write(tmp_path, {}, text)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=rf"\[jobs\]: {n} jobs exceed the limit of {MAX_JOBS}"):
        load_config(path)
    assert time.monotonic() - t0 < 15  # the TOML parse itself; validation never starts


def test_long_job_names_and_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="job name"):
        config(tmp_path, {"x" * 10_000: {"schedule": "@daily", "command": ["/bin/true"]}})
    big = "v" * (MAX_VALUE_BYTES + 1)
    with pytest.raises(ConfigError, match=f"longer than {MAX_VALUE_BYTES} bytes"):
        config(tmp_path, {"j": {"schedule": "@daily", "command": ["/bin/echo", "{param.x}"],
                                "params": [{"x": big}]}})


def test_too_many_parameter_sets_are_refused(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps([{"x": str(i)} for i in range(MAX_SETS + 1)]))
    with pytest.raises(ConfigError, match=f"exceed the limit of {MAX_SETS}"):
        config(tmp_path, {"j": {"schedule": "@daily", "command": ["/bin/echo", "{param.x}"],
                                "params_file": "p.json"}})


def test_a_deeply_nested_params_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        config(tmp_path, {"j": {"schedule": "@daily", "command": ["/bin/true"],
                                "params_file": "p.json"}})


# -- hostile job names --------------------------------------------------------------------------

@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_job_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="is invalid"):
        check_job_name(name)
    text = f'[agent]\nnode = "n1"\n[jobs.{json.dumps(name)}]\nschedule = "@daily"\n' \
           'command = ["/bin/true"]\n'
    if "\0" in name:
        text = text.replace("\0", "\\u0000")  # TOML has no raw NUL; its escape is refused too
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, {}, text))


@pytest.mark.parametrize("name", ["../x", "a/b", "a b", "a\nb", "é", "a:b"])
def test_hostile_node_and_queue_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=r"\[agent\] node"):
        load_config(write(tmp_path, {}, render_config({"agent": {"node": name}}, {})))
    with pytest.raises(ConfigError, match=r"\[worker\] queues"):
        load_config(write(tmp_path, {}, render_config(
            {"agent": {"node": "n1"}, "worker": {"queues": [name]}}, {})))
    with pytest.raises(ConfigError, match=r"\[jobs.j\] queue"):
        config(tmp_path, {"j": {"schedule": "@daily", "command": ["/bin/true"], "queue": name}})


def test_valid_names_keep_every_key_and_path_free_of_separators() -> None:
    """Every accepted job name is safe as a Redis key part, a Consul key segment and a file
    name: the alphabet has no '/', ':', whitespace, '@' or '#'."""
    keys = Keys("cronsul")
    for name in ["a", "A-1", "x.y_z", "9" * 100]:
        assert JOB_NAME.match(name)
        run = Run.for_tick(name, __import__("datetime").datetime(2026, 1, 1, tzinfo=
                           __import__("datetime").UTC), {"p": "../../$(x)\n"})
        assert keys.run(run.run_id) == f"cronsul:run:{run.run_id}"
        assert RUN_ID_TAIL.fullmatch(run.run_id.split("@", 1)[1])
        assert "/" not in run.run_id and "\n" not in run.run_id  # params go in as a hash


# -- hostile parameter values -------------------------------------------------------------------

def test_placeholders_must_be_whole_argv_elements_and_never_in_shell_strings(
        tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be a whole argv element"):
        config(tmp_path, {"j": {"schedule": "@daily", "command": ["/bin/echo", "x{param.a}"],
                                "params": [{"a": "1"}]}})
    with pytest.raises(ConfigError, match="never spliced into the string"):
        config(tmp_path, {"j": {"schedule": "@daily", "shell": True,
                                "command": "echo {param.a}", "params": [{"a": "1"}]}})


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_hostile_values_are_one_argv_element_and_one_env_value_byte_for_byte(
        tmp_path: Path, value: str, capfd: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    value = value.replace("{marker}", str(marker))
    assert render_argv(["/bin/echo", "{param.v}"], {"v": value}) == ["/bin/echo", value]
    # Through the real CLI and a real process: argv[1] and $CRONSUL_PARAM_V come back intact.
    script = 'import os, sys; sys.stdout.write(repr((sys.argv[1], os.environ["CRONSUL_PARAM_V"])))'
    cfg_path = write(tmp_path, {"j": {
        "schedule": "@daily", "command": [__import__("sys").executable, "-c", script,
                                          "{param.v}"],
        "params": [{"v": "placeholder"}]}})
    assert main(["run", "j", "--local", "-c", str(cfg_path), "--param", f"v={value}"]) == 0
    out = capfd.readouterr().out
    assert out.startswith(repr((value, value))), out
    assert not marker.exists()


def test_shell_jobs_see_hostile_values_only_as_variables(tmp_path: Path,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    cfg_path = write(tmp_path, {"j": {"schedule": "@daily", "shell": True,
                                      "command": 'printf "%s" "$CRONSUL_PARAM_V"',
                                      "params": [{"v": "x"}]}})
    value = f"$(touch {marker}); `touch {marker}`\n; touch {marker}"
    assert main(["run", "j", "--local", "-c", str(cfg_path), "--param", f"v={value}"]) == 0
    assert capfd.readouterr().out.startswith(value)
    assert not marker.exists()


@pytest.mark.parametrize("pair", ["v=a\0b", f"v={'x' * (MAX_VALUE_BYTES + 1)}", "w=1",
                                  "=1", "v", "../v=1"])
def test_bad_cli_params_exit_2(tmp_path: Path, pair: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = write(tmp_path, {"j": {"schedule": "@daily", "command": ["/bin/echo", "{param.v}"],
                                      "params": [{"v": "x"}]}})
    assert main(["run", "j", "--local", "-c", str(cfg_path), "--param", pair]) == 2
    assert "Traceback" not in capsys.readouterr().err


# -- hostile run messages -----------------------------------------------------------------------

def jobs_for_messages(tmp_path: Path) -> Config:
    return config(tmp_path, {
        "plain": {"schedule": "@daily", "command": ["/bin/true"]},
        "p": {"schedule": "@daily", "command": ["/bin/echo", "{param.v}"],
              "params": [{"v": "x"}]},
    })


def message(**over: Any) -> bytes:
    body: dict[str, Any] = {"v": 1, "run_id": "plain@1767225600000", "job": "plain",
                            "scheduled_at": "2026-01-01T00:00:00Z", "params": {}}
    body.update(over)
    return json.dumps(body).encode()


@pytest.mark.parametrize(("payload", "reason"), [
    (None, "malformed"),
    (b"x" * (MAX_PAYLOAD_BYTES + 1), "oversized"),
    (b"[" * 60_000, "undecodable"),  # json recursion
    (b"\xff\xfe", "undecodable"),
    (b'{"v": 1, "job": "plain", "run_id": "plain@1", "scheduled_at": "2026-01-01T00:00:00Z"'
     b', "params": {}, "command": ["/bin/rm", "-rf", "/"]}', None),  # extra keys are ignored
    (message(v=2), "malformed"),
    (message(v=True), "malformed"),  # JSON true == 1 in Python; not the documented format
    (message(v=1.0), "malformed"),
    (message(v="1"), "malformed"),
    (message(job="../plain"), "unknown job"),
    (message(job="nope", run_id="nope@1"), "unknown job"),
    (message(job=["plain"]), "unknown job"),
    (message(run_id="other@1"), "malformed"),
    (message(run_id="plain@1\nINJECTED"), "malformed"),
    (message(run_id="plain@../../x"), "malformed"),
    (message(run_id="plain@1 2"), "malformed"),
    (message(run_id="plain@" + "1" * 500), "malformed"),
    (message(run_id="plain@1\0"), "malformed"),
    (message(run_id=5), "malformed"),
    (message(scheduled_at="yesterday"), "malformed"),
    (message(scheduled_at="2026-01-01T00:00:00"), "malformed"),
    (message(params={"v": "x"}), "bad params"),  # undeclared
    (message(params={"V=1": "x"}), "malformed"),
    (message(params={"../v": "x"}), "malformed"),
    (message(params={"v": 1}), "malformed"),
    (message(params={"v": {"nested": "x"}}), "malformed"),
    (message(params=["v"]), "malformed"),
    (message(job="p", run_id="p@1", params={}), "bad params"),  # missing
    (message(job="p", run_id="p@1", params={"v": "a\0b"}), "bad params"),
    (message(job="p", run_id="p@1", params={"v": "x" * (MAX_VALUE_BYTES + 1)}), "bad params"),
    # JSON's lone surrogate escapes decode to str that is not text (a review stopped a node
    # with one: its UnicodeEncodeError escaped parse_message and kept a run slot each time).
    (b'{"v": 1, "job": "p", "run_id": "p@1", "scheduled_at": "2026-01-01T00:00:00Z", '
     b'"params": {"v": "\\ud800"}}', "bad params"),
    (b'{"v": 1, "job": "plain", "run_id": "plain@\\udfff", '
     b'"scheduled_at": "2026-01-01T00:00:00Z"}', "malformed"),
    (b'{"v": 1, "job": "p", "run_id": "p@1", "scheduled_at": "2026-01-01T00:00:00Z", '
     b'"params": {"\\ud800": "x"}}', "malformed"),
    (b'{"v": 1, "job": "\\ud800", "run_id": "x@1", "scheduled_at": "2026-01-01T00:00:00Z"}',
     "unknown job"),
])
def test_hostile_messages_are_refused_with_a_reason(tmp_path: Path, payload: bytes | None,
                                                    reason: str | None) -> None:
    jobs = jobs_for_messages(tmp_path).jobs
    if reason is None:
        msg = parse_message(payload, jobs)
        assert msg.job == "plain" and not hasattr(msg, "command")
        return
    with pytest.raises(MessageError) as exc:
        parse_message(payload, jobs)
    assert str(exc.value).startswith(reason), exc.value


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_hostile_values_in_messages_pass_intact_and_only_as_values(tmp_path: Path,
                                                                   value: str) -> None:
    from datetime import UTC, datetime

    jobs = jobs_for_messages(tmp_path).jobs
    run = Run.for_tick("p", datetime(2026, 1, 1, tzinfo=UTC), {"v": value})
    payload = run_payload(run.run_id, "p", run.scheduled_at, {"v": value}).encode()
    if value.startswith("-"):  # an option to the program, not a value: see below
        with pytest.raises(MessageError, match="starts with '-'"):
            parse_message(payload, jobs)
        return
    msg = parse_message(payload, jobs)
    assert dict(msg.params) == {"v": value}
    assert render_argv(jobs["p"].command, msg.params) == ["/bin/echo", value]
    assert RUN_ID_TAIL.fullmatch(msg.run_id.split("@", 1)[1])  # the Redis key part is clean


def test_option_values_are_refused_unless_declared_or_allowed(tmp_path: Path) -> None:
    """A security review's {"file": "-o/tmp/pwned"} made `sort {param.file}` write a file."""
    from datetime import UTC, datetime

    cfg = config(tmp_path, {
        "sort": {"schedule": "@daily", "command": ["/usr/bin/sort", "{param.file}"],
                 "params": [{"file": "-"}]},  # declared by the operator: "-" is stdin
        "calc": {"schedule": "@daily", "command": ["/bin/echo", "{param.n}"],
                 "params": [{"n": "1"}], "allow_option_values": True},
        "env-only": {"schedule": "@daily", "command": ["/bin/sh", "-c", "echo $CRONSUL_PARAM_N"],
                     "params": [{"n": "1"}]},
    })

    def parse(job: str, **params: str) -> object:
        run = Run.for_tick(job, datetime(2026, 1, 1, tzinfo=UTC), params)
        return parse_message(run_payload(run.run_id, job, run.scheduled_at, params).encode(),
                             cfg.jobs)

    with pytest.raises(MessageError) as exc:
        parse("sort", file="-o/tmp/pwned")
    assert str(exc.value).startswith("bad params: file='-o/tmp/pwned' starts with '-'")
    assert "allow_option_values = true" in str(exc.value)
    assert parse("sort", file="-")  # one of the declared values
    assert parse("calc", n="-5")  # the job allows it
    assert parse("env-only", n="-5")  # not an argv element: only ever a variable


def test_every_kind_of_run_id_cronsul_writes_is_accepted(tmp_path: Path) -> None:
    jobs = jobs_for_messages(tmp_path).jobs
    for run_id in ["plain@1767225600000", "plain@manual-0123456789abcdef0123456789abcdef",
                   "plain@event-775dcf22-7824-421e-99e4-6cc85626504b",
                   "plain@1767225600000#0123456789abcdef"]:
        assert parse_message(message(run_id=run_id), jobs).run_id == run_id


def test_a_run_id_refusal_says_which_rule_it_broke(tmp_path: Path) -> None:
    jobs = jobs_for_messages(tmp_path).jobs
    with pytest.raises(MessageError, match=r"does not start with 'plain@'"):
        parse_message(message(run_id="other@1"), jobs)
    with pytest.raises(MessageError, match=r"1 to 190 of A-Z a-z 0-9"):
        parse_message(message(run_id="plain@" + "a" * 250), jobs)
    assert parse_message(message(run_id="plain@" + "a" * 190), jobs).run_id.endswith("a" * 190)


def test_a_run_scheduled_far_ahead_is_refused_not_handed_back_for_ever(tmp_path: Path) -> None:
    """A sender's scheduled_at of 9999-12-31 had a run an unknown job's node handed back
    every 5 s until 10 minutes after it: for ever."""
    from datetime import UTC, datetime, timedelta

    jobs = jobs_for_messages(tmp_path).jobs
    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    far = message(scheduled_at="9999-12-31T00:00:00Z")
    with pytest.raises(MessageError, match="malformed: scheduled_at 9999-12-31T00:00:00Z is "
                                           "more than 1:00:00 ahead"):
        parse_message(far, jobs, now)
    unknown = message(job="nope", run_id="nope@1", scheduled_at="9999-12-31T00:00:00Z")
    with pytest.raises(MessageError) as exc:
        parse_message(unknown, jobs, now)
    assert str(exc.value).startswith("unknown job")  # not handed back: see test_poison_messages
    soon = (now + timedelta(minutes=59)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert parse_message(message(scheduled_at=soon), jobs, now).job == "plain"
