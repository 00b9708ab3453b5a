"""Config validation: every refusal names the file, the section and the key."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from scheduler.errors import ConfigError
from worker.config import load_config

GOOD = """
[agent]
node = "n1"

[consul]
address = "127.0.0.1:8500"

[redis]
url = "redis://127.0.0.1:6379/0"

[jobs.report]
schedule = "*/5 * * * *"
timezone = "Europe/Berlin"
command = ["/usr/bin/env", "true"]
timeout = "10m"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cronsul.toml"
    path.write_text(text)
    return path


def test_good_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), env={})
    job = cfg.jobs["report"]
    assert job.command == ("/usr/bin/env", "true")
    assert job.timeout == timedelta(minutes=10)
    assert job.catchup_window == timedelta(minutes=5)
    assert cfg.consul.prefix == "cronsul"
    assert cfg.consul.leader_key == "cronsul/leader"
    assert (cfg.consul.host, cfg.consul.port, cfg.consul.scheme) == ("127.0.0.1", 8500, "http")
    assert cfg.worker.concurrency == 4
    assert cfg.worker.python_workers == 0  # one warm Python process per run slot
    assert cfg.worker.python_prefetch == 4  # runs a busy warm process may hold (short ones)


def test_consul_url_address_and_env_token(tmp_path: Path) -> None:
    text = GOOD.replace('address = "127.0.0.1:8500"', 'address = "https://consul.internal:8501"')
    cfg = load_config(write(tmp_path, text), env={"CONSUL_HTTP_TOKEN": "s3cret"})
    assert (cfg.consul.scheme, cfg.consul.host, cfg.consul.port) == ("https", "consul.internal", 8501)
    assert cfg.consul.token == "s3cret"


@pytest.mark.parametrize(
    ("old", "new", "fragments"),
    [
        ('timeout = "10m"', 'timeout = "10m"\ncolour = "red"', ["[jobs.report]", "colour", "unknown key"]),
        ('node = "n1"', 'node = "n1"\nnmae = "x"', ["[agent]", "nmae", "unknown key"]),
        ('schedule = "*/5 * * * *"', 'schedule = "*/5 * * *"', ["[jobs.report]", "schedule"]),
        ('schedule = "*/5 * * * *"', 'schedule = "61 * * * *"', ["[jobs.report]", "schedule"]),
        ('timezone = "Europe/Berlin"', 'timezone = "Mars/Olympus"', ["[jobs.report]", "timezone", "Mars/Olympus"]),
        ('timeout = "10m"', 'timeout = "10"', ["[jobs.report]", "timeout"]),
        ('timeout = "10m"', "timeout = 10", ["[jobs.report]", "timeout", "duration"]),
        ('command = ["/usr/bin/env", "true"]', 'command = "true"', ["[jobs.report]", "command", "list"]),
        ('command = ["/usr/bin/env", "true"]', "command = []", ["[jobs.report]", "command", "required"]),
        ('command = ["/usr/bin/env", "true"]', 'command = ["a", 1]', ["[jobs.report]", "command", "item 1"]),
        ("[jobs.report]", "[jobs.\"bad name/..\"]", ["bad name/..", "invalid"]),
        ('address = "127.0.0.1:8500"', 'address = "127.0.0.1:8500"\nsession_ttl = "5s"', ["[consul]", "session_ttl", "minimum"]),
        ('address = "127.0.0.1:8500"', 'address = "127.0.0.1:8500"\nlock_delay = "0s"', ["[consul]", "lock_delay"]),
        ('url = "redis://127.0.0.1:6379/0"', 'url = "http://x"', ["[redis]", "url"]),
        ('node = "n1"', 'node = "n1"\nleader_eligible = "yes"', ["[agent]", "leader_eligible", "true or false"]),
        ('timeout = "10m"', 'timeout = "10m"\ncatchup = "some"', ["[jobs.report]", "catchup", "'some'"]),
        ("[jobs.report]", '[worker]\npython_workers = -1\n[jobs.report]', ["[worker]", "python_workers"]),
        ('timeout = "10m"', 'timeout = "10m"\nenv = { X = "a\\u0000b" }', ["[jobs.report]", "env", "NUL"]),
        ("[jobs.report]", '[worker]\npython_workers = "2"\n[jobs.report]', ["[worker]", "python_workers"]),
        ("[jobs.report]", '[worker]\npython_prefetch = 0\n[jobs.report]', ["[worker]", "python_prefetch"]),
        ("[jobs.report]", '[worker]\npython_prefetch = 65\n[jobs.report]', ["[worker]", "python_prefetch"]),
        ("[jobs.report]", '[notify]\ncommand = []\n[jobs.report]', ["[notify]", "command", "non-empty argv"]),
        ("[jobs.report]", '[notify]\ncommand = "mail ops"\n[jobs.report]', ["[notify]", "command", "list"]),
        ("[jobs.report]", '[notify]\ncommand = ["x"]\non = ["failure"]\n[jobs.report]', ["[notify]", "on", "'failure'", "failed, dead, retrying"]),
        ("[jobs.report]", '[notify]\ncommand = ["x"]\ntimeout = "0s"\n[jobs.report]', ["[notify]", "timeout"]),
        ("[jobs.report]", '[notify]\ncomand = ["x"]\n[jobs.report]', ["[notify]", "comand", "unknown key"]),
        ('timeout = "10m"', 'timeout = "10m"\nnotify = "no"', ["[jobs.report]", "notify", "true or false"]),
    ],
)
def test_bad_config_is_refused_naming_file_section_and_key(
    tmp_path: Path, old: str, new: str, fragments: list[str]
) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_malformed_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "\n[jobs.x\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(path) in str(err.value) and "invalid TOML" in str(err.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml", env={})


def test_configured_consul_address_and_token_win_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # python-consul2 would silently prefer CONSUL_HTTP_ADDR / CONSUL_HTTP_TOKEN to its arguments.
    from worker.consulapi import make_clients

    monkeypatch.setenv("CONSUL_HTTP_ADDR", "10.0.0.1:1")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    text = GOOD.replace('address = "127.0.0.1:8500"',
                       'address = "127.0.0.1:8599"\ntoken = "from-config"')
    cfg = load_config(write(tmp_path, text), env={})
    clients = make_clients(cfg.consul, 1.0)
    for c in (clients.call, clients.blocking):
        assert c.http.base_uri == "http://127.0.0.1:8599" and c.token == "from-config"


JOB_CHANGES = [
    ('overlap = "skip"', "overlap"), ("retries = 2", "retries"), ('jitter = "10s"', "jitter"),
    ('env = { A = "1" }', "env"), ('catchup = "latest"', "catchup"), ('user = "nobody"', "user"),
    ('on_lost = "fail"', "on_lost"), ('working_dir = "/tmp"', "working_dir"),
    ('queue = "batch"', "queue"), ('timeout = "11m"', "timeout"),
]


@pytest.mark.parametrize(("line", "key"), JOB_CHANGES, ids=[k for _, k in JOB_CHANGES])
def test_config_hash_changes_with_any_key_of_a_job(tmp_path: Path, line: str, key: str) -> None:
    """`cronsul status` flags drift by this hash: a node that runs a job differently (another
    overlap policy, retries, environment, user, ...) must not share the leader's hash."""
    base = load_config(write(tmp_path, GOOD), env={}).config_hash
    text = (GOOD.replace('timeout = "10m"', line) if key == "timeout"
            else GOOD.rstrip("\n") + "\n" + line + "\n")
    assert load_config(write(tmp_path, text), env={}).config_hash != base


def test_config_hash_changes_with_the_callable_and_the_inherited_time_zone(
        tmp_path: Path) -> None:
    py = GOOD.replace('command = ["/usr/bin/env", "true"]', 'callable = "mod:one"')
    one = load_config(write(tmp_path, py), env={}).config_hash
    two = load_config(write(tmp_path, py.replace("mod:one", "mod:two")), env={}).config_hash
    assert one != two
    # A job with no timezone of its own takes [agent] timezone: a different one is drift.
    bare = GOOD.replace('timezone = "Europe/Berlin"\n', "")
    utc = load_config(write(tmp_path, bare), env={}).config_hash
    paris = bare.replace('node = "n1"', 'node = "n1"\ntimezone = "Europe/Paris"')
    assert load_config(write(tmp_path, paris), env={}).config_hash != utc


def test_config_hash_ignores_what_is_not_a_job(tmp_path: Path) -> None:
    """Node-local settings (its name, its Consul agent, its concurrency) are not drift."""
    base = load_config(write(tmp_path, GOOD), env={}).config_hash
    other = GOOD.replace('node = "n1"', 'node = "n2"').replace("127.0.0.1:8500", "10.0.0.2:8500")
    other += "\n[worker]\nconcurrency = 3\n"
    assert load_config(write(tmp_path, other), env={}).config_hash == base


def test_working_dir_is_refused_for_a_callable_job(tmp_path: Path) -> None:
    """A callable runs in a warm process shared by runs: working_dir was silently ignored."""
    text = GOOD.replace('command = ["/usr/bin/env", "true"]',
                        'callable = "mod:fn"\nworking_dir = "/srv"')
    with pytest.raises(ConfigError, match=r"\[jobs.report\].*working_dir.*command jobs only"):
        load_config(write(tmp_path, text), env={})


def test_python_memory_cap_is_configurable(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, GOOD), env={}).worker.python_max_memory_mb == 1024
    cfg = load_config(write(tmp_path, GOOD + "\n[worker]\npython_max_memory_mb = 0\n"), env={})
    assert cfg.worker.python_max_memory_mb == 0  # no limit
    with pytest.raises(ConfigError, match="python_max_memory_mb"):
        load_config(write(tmp_path, GOOD + "\n[worker]\npython_max_memory_mb = -1\n"), env={})


def test_record_ttl_is_the_retention_but_outlives_every_catch_up_window(tmp_path: Path) -> None:
    short = GOOD + '\n[worker]\nhistory_retention = "2h"\n'
    assert load_config(write(tmp_path, short), env={}).record_ttl == timedelta(hours=2)
    long_window = short.replace('timeout = "10m"', 'timeout = "10m"\ncatchup_window = "3h"')
    assert load_config(write(tmp_path, long_window), env={}).record_ttl == timedelta(hours=6)
