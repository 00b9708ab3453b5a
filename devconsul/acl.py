"""ACL hook. The dev server accepts ``X-Consul-Token`` / ``?token`` and, by default, enforces
nothing (like ``consul agent -dev`` without ACLs). ``--acl-token`` switches on a coarse
enforcement mode for tests of a client's 403 handling: every ``/v1/`` call except
``/v1/status/*`` must carry one of the listed tokens, else 403 ``Permission denied``
(agent/http.go maps acl.ErrPermissionDenied to 403). No policies, no rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from devconsul.errors import PermissionDenied
from devconsul.web import Request


class Authorizer(Protocol):
    def authorize(self, req: Request) -> None:
        """Raise PermissionDenied to refuse the request."""


class AllowAll:
    def authorize(self, req: Request) -> None:
        return None


class KnownTokens:
    def __init__(self, tokens: Iterable[str]) -> None:
        self.tokens = frozenset(tokens)

    def authorize(self, req: Request) -> None:
        if not req.path.startswith("/v1/") or req.path.startswith("/v1/status/"):
            return
        if req.token not in self.tokens:
            raise PermissionDenied()
