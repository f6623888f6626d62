"""W3C Trace Context values checked before they reach PHP as HTTP_TRACEPARENT / HTTP_TRACESTATE.

Whoever published a message chose these values. A tracing library in PHP reads them as if a
web server had passed on an HTTP request's headers, so only the shapes the W3C recommendation
defines are passed on; anything else is dropped, never repaired or cut. `traceparent` is
version 00 only (`00-<trace-id>-<parent-id>-<flags>`, lowercase hex, ids not all zero);
`tracestate` is a list of `key=value` members (W3C Trace Context level 2 keys), at most 32 of
them and 512 characters, and it counts only beside a valid traceparent.
"""

from __future__ import annotations

import re

TRACEPARENT_PARAM = "HTTP_TRACEPARENT"
TRACESTATE_PARAM = "HTTP_TRACESTATE"
TRACEPARENT_SIZE = 55  # "00-" + 32 + "-" + 16 + "-" + 2
TRACESTATE_MAX = 512  # characters of the whole list, commas and spaces included
TRACESTATE_MEMBERS = 32

# Version 00, lowercase hex, trace-id and parent-id not all zero: one match, no groups to read.
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
# list = list-member 0*31( OWS "," OWS list-member ); list-member = key "=" value / OWS, where
# key = (lcalpha / DIGIT) 0*255(keychar) and value = 0*255(chr) nblk-chr: printable ASCII
# without "," and "=", not ending in a space. One match checks the whole list.
_KEY = r"[a-z0-9][a-z0-9_\-*/@]{0,255}"
_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
# Whitespace is matched once between two commas (never by two adjacent runs), so that the
# match takes linear time whatever the text.
_MEMBER = rf"(?:{_KEY}={_VALUE}[ \t]*)?"
_TRACESTATE = re.compile(rf"[ \t]*{_MEMBER}(?:,[ \t]*{_MEMBER}){{0,{TRACESTATE_MEMBERS - 1}}}")


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
    if text is None or len(text) != TRACEPARENT_SIZE or _TRACEPARENT.fullmatch(text) is None:
        return None
    return text


def tracestate(value: object) -> str | None:
    """`value` unchanged if it is a W3C tracestate list with at least one member, else None.

    Empty and whitespace-only members are allowed between commas, as the recommendation says
    (and count among the 32); a list with nothing else in it is no state worth passing on.
    Keys are not checked for uniqueness: that is the sender's duty, and PHP gets the list as
    it was sent.
    """
    text = _ascii(value)
    if not text or len(text) > TRACESTATE_MAX or "=" not in text:
        return None
    return text if _TRACESTATE.fullmatch(text) is not None else None


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
