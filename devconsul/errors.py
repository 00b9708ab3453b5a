"""Errors the dev server answers with; each carries the HTTP status Consul would use.

agent/http.go writes an RPC error's text as the body of a 500, except for the few error kinds
it maps to 400/403/404; these classes mirror that mapping.
"""

from __future__ import annotations


class ConsulError(Exception):
    """An error Consul reports as ``500`` with the message as the body."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ConsulError):
    status = 400


class PermissionDenied(ConsulError):
    """What a later ACL-enforcement mode would raise (agent/http.go maps it to 403)."""

    status = 403

    def __init__(self, message: str = "Permission denied") -> None:
        super().__init__(message)


class NotFound(ConsulError):
    status = 404


class TooLarge(ConsulError):
    status = 413
