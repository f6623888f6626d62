"""Autoescaping HTML for the dashboard: every value is text unless it is `Html` already.

Why not string concatenation: a dead letter's error text is what PHP printed, and PHP printed
what a job (an attacker, perhaps) made it print. So values are escaped by default, and markup is
only what this package's own templates build. A template is a constant format string; `render`
escapes each value put into it (quotes included, so values are safe in quoted attributes), and
passes `Html` values through unchanged.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, urlencode


class Html(str):
    """Markup this package built: inserted as is. Never construct one from outside text."""

    __slots__ = ()


def esc(value: Any) -> Html:
    """`value` as text in HTML: `Html` unchanged, None empty, anything else escaped."""
    if isinstance(value, Html):
        return value
    if value is None:
        return Html("")
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    return Html(html.escape(str(value), quote=True))


def render(template: str, **values: Any) -> Html:
    """`template.format(...)` with every value escaped (`Html` values kept)."""
    return Html(template.format(**{name: esc(value) for name, value in values.items()}))


def join(parts: Iterable[Any], separator: str = "") -> Html:
    """Fragments side by side, each escaped unless `Html`."""
    return Html(separator.join(esc(part) for part in parts))


def url(*segments: str, query: Mapping[str, Any] | None = None) -> str:
    """A path of URL-quoted segments (a queue name may hold `/`, `?` or `#`) and a query
    without empty values; escape it again (`render` does) when putting it in an attribute."""
    path = "/" + "/".join(quote(segment, safe="") for segment in segments)
    kept = {k: v for k, v in (query or {}).items() if v is not None and v != ""}
    return path + ("?" + urlencode(kept) if kept else "")
