"""A tiny template helper: every value is HTML-escaped unless it is already ``Safe`` markup.

    html("<td>{name}</td>", name=job)      # job names, params, output, reasons: escaped
    join(rows)                             # Safe pieces joined, still Safe
"""

from __future__ import annotations

import html as _html
from collections.abc import Iterable
from urllib.parse import quote


class Safe(str):
    """Markup built by this module (or a literal): never escaped again."""

    __slots__ = ()


def esc(value: object) -> Safe:
    if isinstance(value, Safe):
        return value
    return Safe(_html.escape("" if value is None else str(value), quote=True))


def html(template: str, **values: object) -> Safe:
    """``template`` is trusted markup with ``{name}`` holes; the values are escaped."""
    return Safe(template.format(**{k: esc(v) for k, v in values.items()}))


def join(parts: Iterable[Safe], sep: str = "") -> Safe:
    return Safe(sep.join(esc(p) for p in parts))


def url(*segments: str) -> str:
    """A path from segments, each percent-encoded (run ids carry ``@`` and ``#``)."""
    return "/" + "/".join(quote(s, safe="") for s in segments)
