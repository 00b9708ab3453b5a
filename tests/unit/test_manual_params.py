"""`cronsul run JOB --param ...` (and the dashboard's Run now) on a job with parameter sets: the
run gets a whole declared set, or values for every parameter; never none or half of them (a
review saw `run tenant-sync` run once with an empty tenant, which a sync script may read as
"every tenant")."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.errors import ConfigError
from worker.config import Config, load_config
from worker.opcmds import parse_params

JOBS = '''
[jobs.sync]
schedule = "@daily"
shell = true
command = "sync.sh"
params = [{tenant = "acme", region = "eu"}, {tenant = "globex", region = "us"},
          {tenant = "initech", region = "us"}]
[jobs.plain]
schedule = "@daily"
command = ["true"]
'''


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    path = tmp_path / "c.toml"
    path.write_text(JOBS)
    return load_config(path)


def test_one_value_picks_its_declared_set_whole(cfg: Config) -> None:
    assert parse_params(cfg, "sync", ["tenant=acme"]) == {"tenant": "acme", "region": "eu"}
    assert parse_params(cfg, "sync", ["region=us", "tenant=initech"]) == {
        "tenant": "initech", "region": "us"}


def test_every_parameter_given_is_a_set_of_its_own(cfg: Config) -> None:
    assert parse_params(cfg, "sync", ["tenant=hooli", "region=ap"]) == {
        "tenant": "hooli", "region": "ap"}


@pytest.mark.parametrize(("pairs", "message"), [
    ([], "runs once per parameter set: name one with --param (declared: tenant=acme region=eu"),
    (["region=us"], "matches 2 declared sets"),
    (["tenant=hooli"], "missing --param region=..."),
    (["tenant=acme", "tenant=globex"], "--param tenant is given twice ('acme' and 'globex')"),
])
def test_none_or_half_of_the_parameters_is_refused(cfg: Config, pairs: list[str],
                                                   message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_params(cfg, "sync", pairs)
    assert message in str(caught.value), str(caught.value)


def test_a_job_without_sets_needs_none(cfg: Config) -> None:
    assert parse_params(cfg, "plain", []) == {}


def test_parameter_names_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[jobs.j]\nschedule = "@daily"\ncommand = ["true"]\n'
                    'params = [{Tenant = "a", tenant = "b"}]\n')
    with pytest.raises(ConfigError, match="differ only in case; both would be "
                                          "CRONSUL_PARAM_TENANT"):
        load_config(path)
