"""Secrets in the configuration: redaction, and who else can read the files that hold them.

Secrets (a Redis password in ``[redis] url``, ``[redis] sentinel_password``, a ``[consul]
token``, and the files named by ``password_file``, ``sentinel_password_file``, ``token_file``,
``tls_key_file``) are never logged or printed; :func:`redact` is applied to every Redis URL and
error text before it is shown. :func:`exposure_warnings` says when one of those files can be
read by someone other than the agent (the agent logs it at start, ``cronsul check`` prints it).
"""

from __future__ import annotations

import grp
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Anything between "://" and the last "@" before the host is credentials; so is ?password=.
_USERINFO = re.compile(r"(?<=://)[^/\s]*@")
_QUERY_SECRET = re.compile(r"(?i)(password=)[^&\s]*")
# The group systemd/cronsul.sysusers.conf creates: docs/operations.md installs the config as
# 0640 root:cronsul so that the agent (user cronsul) can read it. Readable by that group is the
# intended layout, not an exposure.
SERVICE_GROUP = "cronsul"
# Keys whose value is a secret, and keys whose value names a file holding one.
INLINE_SECRETS = (("consul", "token"), ("redis", "sentinel_password"))
SECRET_FILES = (("consul", "token_file"), ("redis", "password_file"),
                ("redis", "sentinel_password_file"), ("redis", "tls_key_file"))


def redact(text: str) -> str:
    """``redis://:secret@host`` -> ``redis://***@host`` (and ``password=...`` -> ``***``)."""
    return _QUERY_SECRET.sub(r"\1***", _USERINFO.sub("***@", text))


def url_has_secret(url: str) -> bool:
    return redact(url) != url


def secret_sources(file: Path, data: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """(path, what) for every file of this config that holds a secret: the config file itself
    when a secret is written in it, and each secret file it names (relative to the config)."""
    out: list[tuple[str, str]] = []
    tables = {name: data.get(name) for name in ("consul", "redis")}
    inline = [f"[{t}] {k}" for t, k in INLINE_SECRETS
              if isinstance(tables[t], dict) and tables[t].get(k)]  # type: ignore[union-attr]
    redis_table = tables["redis"]
    if isinstance(redis_table, dict) and isinstance(redis_table.get("url"), str) \
            and url_has_secret(redis_table["url"]):
        inline.append("[redis] url (a password)")
    if inline:
        out.append((str(file), ", ".join(inline)))
    for t, k in SECRET_FILES:
        table = tables[t]
        value = table.get(k) if isinstance(table, dict) else None
        if isinstance(value, str) and value.strip():
            path = Path(value) if Path(value).is_absolute() else file.parent / value
            out.append((str(path), f"[{t}] {k}"))
    return tuple(out)


def exposure_warnings(sources: tuple[tuple[str, str], ...], egid: int | None = None) -> list[str]:
    """One message per secret-holding file that others can read: any file readable by
    "other", or by a group that is neither the reader's own nor the cronsul service group."""
    own = os.getegid() if egid is None else egid
    out: list[str] = []
    for path, what in sources:
        try:
            st = os.stat(path)
        except OSError:
            continue  # a missing file is reported by the config check itself
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_IROTH:
            out.append(f"{path} holds a secret ({what}) and is readable by every user "
                       f"(mode {mode:04o}); chmod o-rwx {path}")
        elif mode & stat.S_IRGRP and st.st_gid != own and _group(st.st_gid) != SERVICE_GROUP:
            out.append(f"{path} holds a secret ({what}) and is readable by group "
                       f"{_group(st.st_gid)} (mode {mode:04o}); chmod g-rwx {path} or chgrp "
                       f"{SERVICE_GROUP} {path}")
    return out


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
