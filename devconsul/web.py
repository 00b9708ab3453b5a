"""Request/response values shared by the route modules, and query-parameter parsing."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from devconsul.durations import parse_duration
from devconsul.errors import BadRequest

DEFAULT_QUERY_TIME = 300.0  # structs.DefaultQueryTime: 5 minutes
MAX_QUERY_TIME = 600.0  # structs.MaxQueryTime: 10 minutes
JITTER_FRACTION = 16  # structs.JitterFraction: wait + up to wait/16


@dataclass
class Request:
    node: str
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    headers: dict[str, str]

    def has(self, name: str) -> bool:
        return name in self.query

    def param(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[0] if values else default

    @property
    def token(self) -> str:
        """X-Consul-Token, ``Authorization: Bearer``, or ``?token`` (agent/http.go parseToken)."""
        auth = self.headers.get("authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        return self.headers.get("x-consul-token") or bearer or self.param("token")

    def json(self) -> Any:
        if not self.body.strip():
            return None
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise BadRequest(f"Request decode failed: {exc}") from exc

    def json_object(self) -> dict[str, Any]:
        body = self.json()
        if body is None:
            return {}
        if not isinstance(body, dict):
            raise BadRequest("Request decode failed: expected a JSON object")
        return body

    def bool_param(self, name: str) -> bool:
        """strconv.ParseBool, as the maintenance endpoints use it."""
        raw = self.param(name)
        if raw in ("1", "t", "T", "TRUE", "true", "True"):
            return True
        if raw in ("0", "f", "F", "FALSE", "false", "False"):
            return False
        if not self.has(name):
            raise BadRequest(f"Missing value for {name}")
        raise BadRequest(f"Invalid value for {name}: {raw!r}")

    def blocking(self) -> tuple[int, float]:
        """(min index, wait seconds incl. jitter) as agent/http.go parseWait + rpc.go do."""
        index = 0
        if self.has("index"):
            try:
                index = int(self.param("index"))
            except ValueError as exc:
                raise BadRequest("Invalid index") from exc
            if index < 0:
                raise BadRequest("Invalid index")
        wait = 0.0
        if self.has("wait"):
            try:
                wait = parse_duration(self.param("wait"))
            except ValueError as exc:
                raise BadRequest("Invalid wait time") from exc
        if wait <= 0:
            wait = DEFAULT_QUERY_TIME
        wait = min(wait, MAX_QUERY_TIME)
        wait += random.uniform(0, wait / JITTER_FRACTION)
        return index, wait


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_json(cls, obj: Any, status: int = 200, index: int | None = None) -> Response:
        resp = cls(status, json.dumps(obj).encode())
        if index is not None:
            resp.set_meta(index)
        return resp

    @classmethod
    def of_text(cls, text: str, status: int) -> Response:
        return cls(status, text.encode(), "text/plain; charset=utf-8")

    def set_meta(self, index: int, consistency: str = "leader") -> Response:
        """setMeta (agent/http.go): the headers every read carries."""
        self.headers["X-Consul-Index"] = str(max(1, index))
        self.headers["X-Consul-KnownLeader"] = "true"
        self.headers["X-Consul-LastContact"] = "0"
        self.headers["X-Consul-Effective-Consistency"] = consistency
        return self


def consistency(req: Request) -> str:
    if req.has("consistent") and req.has("stale"):
        raise BadRequest("Cannot specify ?stale with ?consistent, conflicting semantics.")
    if req.has("consistent"):
        return "consistent"
    return "stale" if req.has("stale") else "leader"
