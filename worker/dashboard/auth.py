"""Who may act on the dashboard, and proof that a POST came from the dashboard itself.

Actions are off unless ``[http] admin_token_file`` is set. Then a request is an admin's when it
carries either

* ``Authorization: Bearer <token>`` (scripts; no cookie is involved, so there is nothing to
  forge cross-site), or
* the session cookie set by the login form: ``v1.<expiry>.<nonce>.<name>.<mac>``, HMAC-SHA256
  keyed by the token, HttpOnly, SameSite=Strict. It is stateless, so it works on every agent
  that has the same token and dies with a token change or its expiry.

Every POST of a cookie session must also carry the session's CSRF token (an HMAC of the
session's nonce, in a hidden form field) and an Origin (or, lacking one, a Referer) whose host
is the Host the request was sent to.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlsplit

COOKIE = "cronsul_session"
# A login lasts a working day.
SESSION_S = 12 * 3600
# The name an admin gives at login is only a label for the action log.
NAME = re.compile(r"^[A-Za-z0-9._@-]{1,40}$")


@dataclass(frozen=True)
class Session:
    who: str
    nonce: str
    via: str  # "session" or "bearer"


class Auth:
    def __init__(self, token: str | None) -> None:
        self._token = token
        self._key = (hashlib.sha256(b"cronsul-dashboard-session\0" + token.encode()).digest()
                     if token else b"")

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check_token(self, given: str) -> bool:
        return self._token is not None and hmac.compare_digest(given.encode(),
                                                               self._token.encode())

    def new_session(self, name: str, now: float | None = None) -> str:
        """The cookie value for a fresh login (call only after check_token)."""
        who = name if NAME.match(name) else "admin"
        expiry = int((now if now is not None else time.time()) + SESSION_S)
        body = f"v1.{expiry}.{secrets.token_urlsafe(16)}.{_b64(who.encode())}"
        return f"{body}.{self._mac(body)}"

    def session(self, headers: Mapping[str, str], now: float | None = None) -> Session | None:
        """The admin behind this request, or None."""
        if self._token is None:
            return None
        authz = headers.get("Authorization") or ""
        if authz.startswith("Bearer "):
            if self.check_token(authz[len("Bearer "):].strip()):
                return Session("bearer-token", "", "bearer")
            return None
        value = _cookie(headers.get("Cookie"))
        if value is None:
            return None
        parts = value.split(".")
        if len(parts) != 5 or parts[0] != "v1" or not parts[1].isdigit():
            return None
        body = ".".join(parts[:4])
        if not hmac.compare_digest(self._mac(body), parts[4]):
            return None
        if int(parts[1]) < (now if now is not None else time.time()):
            return None
        try:
            who = base64.urlsafe_b64decode(parts[3] + "=" * (-len(parts[3]) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        return Session(who, parts[2], "session")

    def csrf(self, session: Session | None) -> str:
        if session is None or session.via != "session":
            return ""
        return self._mac(f"csrf.{session.nonce}")

    def csrf_ok(self, session: Session, given: str) -> bool:
        if session.via == "bearer":
            return True  # no ambient credential: a cross-site page cannot send the header
        return bool(given) and hmac.compare_digest(self.csrf(session), given)

    def _mac(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())


def same_origin(headers: Mapping[str, str], required: bool) -> bool:
    """The request's Origin (else Referer) names the host it was sent to. With neither header,
    ``required`` decides (browsers send Origin on every POST; curl with a bearer token need not)."""
    host = (headers.get("Host") or "").lower()
    origin = headers.get("Origin")
    source = origin if origin and origin != "null" else headers.get("Referer")
    if not source:
        return not required and not origin
    return bool(host) and urlsplit(source).netloc.lower() == host


def session_cookie(value: str, max_age: int = SESSION_S) -> str:
    return f"{COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict"


def _cookie(header: str | None) -> str | None:
    if not header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None else None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")
