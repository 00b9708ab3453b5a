"""devconsul: a Consul dev server for tests (like ``consul agent -dev``), never for production.

It reproduces, in one Python process, the subset of Consul's HTTP API that cronsul uses, with
Consul's own semantics (sessions, locks, lock-delay, blocking queries, TTL checks), so the real
python-consul2 client runs against it unchanged. See docs/consul-dev-server.md.
"""

__all__ = ["__version__"]

# The Consul version whose HTTP behaviour is reproduced (reported by /v1/agent/self).
__version__ = "1.10.0"
