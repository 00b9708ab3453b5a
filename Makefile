# cronsul: `make demo` runs a local cluster with a live failover; `make test` runs every suite.
# Both install what they need on a fresh machine (Python 3.11, make, gcc, apt).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP  := $(VENV)/.installed

.PHONY: all deps system-deps venv lint test test-unit test-contract test-integration demo clean bench chaos

all: test

# redis-server comes from Debian; the tests start their own on free loopback ports.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }
	@# The package starts a system redis on 6379; cronsul's tests never use it.

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

deps: system-deps venv

lint: venv
	$(VENV)/bin/ruff check scheduler worker bench
	$(VENV)/bin/mypy scheduler worker

test-unit: deps
	$(PY) -m pytest tests/unit -q

test-contract: deps
	$(PY) -m pytest tests/contract -q

test-integration: deps
	$(PY) -m pytest tests/integration -q

test: deps lint
	$(PY) -m pytest tests -q -rs

demo: deps
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

# cronsul against RQ, Celery, Dramatiq, arq, huey and saq (each installed from PyPI into its own
# virtualenv under bench/, never as cronsul dependencies); writes bench/results/<date>.json and
# the table in docs/benchmarks.md. ~10 min on 2 cores; sizes via BENCH_* (see bench/README.md).
bench: deps
	@[ -x bench/.venv-peers/bin/python ] || $(PYTHON) -m venv bench/.venv-peers
	@[ -x bench/.venv-peers-arq/bin/python ] || $(PYTHON) -m venv bench/.venv-peers-arq
	bench/.venv-peers/bin/pip install -q -r bench/requirements-peers.txt
	bench/.venv-peers-arq/bin/pip install -q -r bench/requirements-peers-arq.txt
	$(PY) -m bench.run

# Five real agents, redis-server (AOF), the Consul dev server (or $CONSUL_HTTP_ADDR) and a seeded
# fault injector; checks every invariant and prints one summary line (docs/reliability.md).
# CHAOS_MINUTES (default 10), CHAOS_SEED (default random, printed), CHAOS_FAULTS / CHAOS_SKIP.
chaos: deps
	$(PY) scripts/chaos.py
