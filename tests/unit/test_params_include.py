"""Fan-out parameters, `{param.name}` argv elements, includes, and run-message validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scheduler.errors import ConfigError, MessageError
from worker.config import load_config
from worker.consumer import parse_message
from worker.params import render_argv

BASE = """
[agent]
node = "n1"
"""


def write(tmp_path: Path, text: str, top: str = "") -> Path:
    path = tmp_path / "cronsul.toml"
    path.write_text(top + BASE + text)  # top-level keys must come before the first table
    return path


def test_inline_params_fan_out_and_become_strings(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[jobs.sync]
schedule = "*/5 * * * *"
command = ["/opt/sync", "--app", "{param.app}"]
params = [{app = "a", shard = 1}, {app = "b", shard = 2}]
"""), env={})
    spec = cfg.jobs["sync"]
    assert spec.params == ({"app": "a", "shard": "1"}, {"app": "b", "shard": "2"})
    assert spec.param_names == {"app", "shard"}
    assert spec.scheduled().params == spec.params
    assert render_argv(spec.command, spec.params[1]) == ["/opt/sync", "--app", "b"]


@pytest.mark.parametrize("suffix", ["json", "toml"])
def test_params_file_in_json_or_toml(tmp_path: Path, suffix: str) -> None:
    sets = [{"app": f"app{i}"} for i in range(3)]
    body = json.dumps(sets) if suffix == "json" else "params = " + json.dumps(sets).replace(
        '"app":', "app =").replace("{", "{ ").replace("}", " }")
    (tmp_path / f"apps.{suffix}").write_text(body)
    cfg = load_config(write(tmp_path, f"""
[jobs.sync]
schedule = "@every 30s"
command = ["/opt/sync", "{{param.app}}"]
params_file = "apps.{suffix}"
"""), env={})
    assert [p["app"] for p in cfg.jobs["sync"].params] == ["app0", "app1", "app2"]


@pytest.mark.parametrize(
    ("job", "fragment"),
    [
        ('command = ["sh", "-c", "sync {param.app}"]\nparams = [{app = "a"}]', "whole argv element"),
        ('command = ["/opt/sync", "{param.app}"]', "no params"),
        ('command = ["/opt/x", "{param.app}"]\nparams = [{other = "a"}]', "lacks 'app'"),
        ('command = ["/opt/x"]\nparams = [{"bad-name" = "a"}]', "parameter name"),
        ('command = ["/opt/x"]\nparams = [{app = ["nested"]}]', "string, number or boolean"),
        ('command = ["/opt/x"]\nparams = [{app = "a"}, {app = "a"}]', "repeats"),
        ('command = ["/opt/x"]\nparams = "a"', "list of tables"),
        ('command = ["/opt/x"]\nparams_file = "missing.json"', "cannot read params_file"),
    ],
)
def test_bad_params_are_refused_with_the_job_named(tmp_path: Path, job: str,
                                                   fragment: str) -> None:
    path = write(tmp_path, f'\n[jobs.sync]\nschedule = "* * * * *"\n{job}\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert "[jobs.sync]" in str(err.value) and fragment in str(err.value), str(err.value)


def test_include_adds_jobs_and_refuses_duplicates(tmp_path: Path) -> None:
    (tmp_path / "jobs.d").mkdir()
    (tmp_path / "jobs.d" / "team-a.toml").write_text(
        '[jobs.a]\nschedule = "@hourly"\ncommand = ["/bin/true"]\n')
    cfg = load_config(write(tmp_path, "", top='include = ["jobs.d/*.toml"]\n'), env={})
    assert set(cfg.jobs) == {"a"}
    (tmp_path / "jobs.d" / "team-b.toml").write_text(
        '[jobs.a]\nschedule = "@daily"\ncommand = ["/bin/true"]\n')
    with pytest.raises(ConfigError, match=r"team-b.toml: \[jobs.a\]: already defined in .*team-a"):
        load_config(tmp_path / "cronsul.toml", env={})


def test_an_include_path_that_does_not_exist_is_refused_a_glob_may_match_nothing(
        tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"include: .*team-a.toml does not exist"):
        load_config(write(tmp_path, "", top='include = ["jobs.d/team-a.toml"]\n'), env={})
    cfg = load_config(write(tmp_path, "", top='include = ["jobs.d/*.toml"]\n'), env={})
    assert cfg.jobs == {}  # an empty (or missing) jobs.d is a normal state


def test_included_file_may_not_set_agent_options(tmp_path: Path) -> None:
    (tmp_path / "x.toml").write_text('[agent]\nnode = "evil"\n')
    with pytest.raises(ConfigError, match=r"x.toml: \[agent\]: an included file may only"):
        load_config(write(tmp_path, "", top='include = ["x.toml"]\n'), env={})


def test_config_hash_changes_with_the_schedule_only(tmp_path: Path) -> None:
    job = '\n[jobs.a]\nschedule = "@hourly"\ncommand = ["/bin/true"]\n'
    one = load_config(write(tmp_path, job), env={}).config_hash
    two = load_config(write(tmp_path, "# comment\n" + job), env={}).config_hash
    three = load_config(write(tmp_path, job.replace("@hourly", "@daily")), env={}).config_hash
    assert one == two != three


def jobs(tmp_path: Path) -> dict[str, object]:
    cfg = load_config(write(tmp_path, """
[jobs.sync]
schedule = "* * * * *"
command = ["/opt/sync", "{param.app}"]
params = [{app = "a"}]
"""), env={})
    return dict(cfg.jobs)


def message(**fields: object) -> bytes:
    body = {"v": 1, "run_id": "sync@1", "job": "sync", "scheduled_at": "2026-11-22T18:00:05Z",
            "params": {"app": "a"}}
    body.update(fields)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe", "undecodable"),
        (b"[1, 2]", "malformed"),
        (b"x" * 70000, "oversized"),
        (message(job="rm-rf"), "unknown job"),
        (message(run_id="other@1"), "malformed"),
        (message(scheduled_at="yesterday"), "malformed"),
        (message(params={"app": "a", "cmd": "rm -rf /"}), "bad params"),
        (message(params={}), "bad params"),
        (message(params={"app": 5}), "malformed"),
        (message(v=2), "malformed"),
    ],
)
def test_bad_messages_are_refused_with_a_reason(tmp_path: Path, payload: bytes,
                                                reason: str) -> None:
    with pytest.raises(MessageError) as err:
        parse_message(payload, jobs(tmp_path))  # type: ignore[arg-type]
    assert str(err.value).startswith(reason), str(err.value)


def test_good_message_parses(tmp_path: Path) -> None:
    msg = parse_message(message(), jobs(tmp_path))  # type: ignore[arg-type]
    assert (msg.job, msg.run_id, dict(msg.params)) == ("sync", "sync@1", {"app": "a"})


def test_callable_job_takes_params_as_keyword_arguments(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[jobs.py]
schedule = "@hourly"
callable = "reports.nightly:build"
params = [{region = "eu"}]
"""), env={})
    spec = cfg.jobs["py"]
    assert spec.callable == "reports.nightly:build" and spec.command == ()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('callable = "reports.nightly:build"\ncommand = ["/bin/true"]', "not both"),
        ('callable = "not a target"', "[jobs.py] callable"),
        ('callable = "mod:"', "[jobs.py] callable"),
        ("", "command"),
    ],
)
def test_bad_callable_jobs_are_refused(tmp_path: Path, body: str, fragment: str) -> None:
    path = write(tmp_path, f'\n[jobs.py]\nschedule = "@hourly"\n{body}\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert fragment in str(err.value), str(err.value)


def test_shell_true_takes_one_string_and_refuses_spliced_params(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[jobs.sh]
schedule = "@hourly"
shell = true
command = "cd /srv && ./report.sh | gzip > out.gz"
"""), env={})
    assert cfg.jobs["sh"].command == ("/bin/sh", "-c", "cd /srv && ./report.sh | gzip > out.gz")
    with pytest.raises(ConfigError, match=r"\[jobs.sh\] command: with shell = true"):
        load_config(write(tmp_path, """
[jobs.sh]
schedule = "@hourly"
shell = true
command = "sync {param.app}"
params = [{app = "a"}]
"""), env={})


def test_check_reports_a_past_one_shot_as_done(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from worker.cli import main

    path = write(tmp_path, """
[jobs.once]
schedule = "@at 2020-01-01T00:00:00Z"
command = ["/bin/true"]
""")
    assert main(["check", "-c", str(path)]) == 0
    assert "done: fires no more" in capsys.readouterr().out


def test_check_names_a_callable_jobs_target(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from worker.cli import main

    path = write(tmp_path, '\n[jobs.py]\nschedule = "@hourly"\ncallable = "pkg.mod:run"\n')
    assert main(["check", "-c", str(path)]) == 0
    assert "py: '@hourly' (UTC) callable pkg.mod:run" in capsys.readouterr().out
    assert main(["check", "-c", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["jobs"]["py"]["callable"] == "pkg.mod:run"
