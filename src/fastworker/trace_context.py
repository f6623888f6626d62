"""W3C Trace Context values checked before they reach PHP as HTTP_TRACEPARENT / HTTP_TRACESTATE.

Whoever published a message chose these values. A tracing library in PHP reads them as if a
web server had passed on an HTTP request's headers, so only the shapes the W3C recommendation
defines are passed on; anything else is dropped, never repaired or cut. `traceparent` is
version 00 only (`00-<trace-id>-<parent-id>-<flags>`, lowercase hex, ids not all zero);
`tracestate` is a list of `key=value` members (W3C Trace Context level 2 keys), at most 32 of
them and 512 characters, keys unique, and it counts only beside a valid traceparent.
"""

from __future__ import annotations

import re

TRACEPARENT_PARAM = "HTTP_TRACEPARENT"
TRACESTATE_PARAM = "HTTP_TRACESTATE"
TRACEPARENT_SIZE = 55  # "00-" + 32 + "-" + 16 + "-" + 2
TRACESTATE_MAX = 512  # characters of the whole list, commas and spaces included
TRACESTATE_MEMBERS = 32

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_NO_TRACE = "0" * 32
_NO_PARENT = "0" * 16
# key = (lcalpha / DIGIT) 0*255(keychar); value = 0*255(chr) nblk-chr, printable ASCII without
# "," and "=", not ending in a space.
_MEMBER = re.compile(
    r"([a-z0-9][a-z0-9_\-*/@]{0,255})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_OWS = " \t"


def _ascii(value: object) -> str | None:
    """A header value as text: AMQP gives str or bytes; anything else is no trace context."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    return None


def traceparent(value: object) -> str | None:
    """`value` unchanged if it is a version-00 traceparent, else None."""
    text = _ascii(value)
    if text is None or len(text) != TRACEPARENT_SIZE:
        return None
    match = _TRACEPARENT.fullmatch(text)
    if match is None or match[1] == _NO_TRACE or match[2] == _NO_PARENT:
        return None
    return text


def tracestate(value: object) -> str | None:
    """`value` unchanged if it is a W3C tracestate list with at least one member, else None.

    Empty and whitespace-only members are allowed between commas, as the recommendation says;
    a list with nothing else in it is no state worth passing on.
    """
    text = _ascii(value)
    if not text or len(text) > TRACESTATE_MAX:
        return None
    keys: set[str] = set()
    for member in text.split(","):
        member = member.strip(_OWS)
        if not member:
            continue
        match = _MEMBER.fullmatch(member)
        if match is None or match[1] in keys:
            return None
        keys.add(match[1])
    if not keys or len(keys) > TRACESTATE_MEMBERS:
        return None
    return text


def trace_params(parent: object, state: object) -> dict[str, str] | None:
    """The params a valid traceparent (and its tracestate, if valid) become; None without a
    valid traceparent, whatever the tracestate (W3C: no tracestate without its parent)."""
    checked = traceparent(parent)
    if checked is None:
        return None
    params = {TRACEPARENT_PARAM: checked}
    if state is not None:
        checked_state = tracestate(state)
        if checked_state is not None:
            params[TRACESTATE_PARAM] = checked_state
    return params


def trace_id(params: dict[str, str | bytes]) -> str | None:
    """The trace id (32 hex) of a job's params, for log lines; None when it has no trace."""
    parent = params.get(TRACEPARENT_PARAM)
    return parent[3:35] if isinstance(parent, str) else None
