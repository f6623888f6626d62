"""What the two FastCGI codecs share: the protocol's numbers, the limits, the errors, the result.

The compiled `fastworker._fcgi_codec` and its pure-Python twin `fastworker.fcgi_py` import their
exceptions, their result type, their argument checks and their error messages from here (the
way aiohttp's `_http_parser.pyx` imports its exceptions and result types from a pure module), so
they raise the very same classes with the very same messages and return the very same type; only
their encoding and parsing loops differ. The compiled module repeats the numbers below as C
enums for its loops and refuses to import if they ever disagree with these. Sans-IO.

Errors, the h11 way:

- `RemoteProtocolError`: the peer sent a stream that cannot be trusted. `ResponseParser.feed`
  raises no other error for what it is fed, and refuses all input after it. Not a ValueError:
  it is never the caller's mistake.
- `LocalProtocolError`: the caller asked for something FastCGI cannot carry (a request id
  outside 1..65535, a name-value pair or shared params over one 65535-byte record). A
  ValueError, so callers' `except ValueError` around an encode still holds.
- Both derive from `ProtocolError`. Arguments of the wrong type raise TypeError; out-of-range
  settings that are no FastCGI limit (max_head, an empty request_ids) raise plain ValueError.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "ABORT_REQUEST",
    "AUTHORIZER",
    "BEGIN_REQUEST",
    "CANT_MPX_CONN",
    "DATA",
    "END_REQUEST",
    "FILTER",
    "FORM_SAFE",
    "GET_VALUES",
    "GET_VALUES_RESULT",
    "HEADER_LEN",
    "KEEP_CONN",
    "LocalProtocolError",
    "MAX_CONTENT",
    "MAX_HEAD_LIMIT",
    "OVERLOADED",
    "PARAMS",
    "ProtocolError",
    "REQUEST_COMPLETE",
    "RESPONDER",
    "RemoteProtocolError",
    "Response",
    "STDERR",
    "STDIN",
    "STDIN_CHUNK",
    "STDOUT",
    "TYPE_NAMES",
    "UNKNOWN_ROLE",
    "UNKNOWN_TYPE",
    "VERSION",
]

VERSION = 1  # the only FastCGI version there is
HEADER_LEN = 8  # every record: version, type, request id, content length, padding, reserved

# Record types.
BEGIN_REQUEST = 1
ABORT_REQUEST = 2
END_REQUEST = 3
PARAMS = 4
STDIN = 5
STDOUT = 6
STDERR = 7
DATA = 8
GET_VALUES = 9
GET_VALUES_RESULT = 10
UNKNOWN_TYPE = 11

TYPE_NAMES = {
    BEGIN_REQUEST: "BEGIN_REQUEST",
    ABORT_REQUEST: "ABORT_REQUEST",
    END_REQUEST: "END_REQUEST",
    PARAMS: "PARAMS",
    STDIN: "STDIN",
    STDOUT: "STDOUT",
    STDERR: "STDERR",
    DATA: "DATA",
    GET_VALUES: "GET_VALUES",
    GET_VALUES_RESULT: "GET_VALUES_RESULT",
    UNKNOWN_TYPE: "UNKNOWN_TYPE",
}

# Roles (BEGIN_REQUEST); the codec sends RESPONDER only.
RESPONDER = 1
AUTHORIZER = 2
FILTER = 3

# BEGIN_REQUEST flags.
KEEP_CONN = 1

# protocolStatus values (END_REQUEST).
REQUEST_COMPLETE = 0
CANT_MPX_CONN = 1
OVERLOADED = 2
UNKNOWN_ROLE = 3

# Limits.
MAX_CONTENT = 65535  # content bytes in one record; a name-value pair never spans two
STDIN_CHUNK = 0xFFF8  # STDIN content per record: the largest multiple of 8, so no padding
MAX_HEAD_LIMIT = 2**62  # largest max_head: fits a C Py_ssize_t with room to add a record length

# Bytes `encode_form_value` leaves as they are in a form value: RFC 3986's unreserved ones, and
# `/` and `=` (a form parser splits pairs at `&` and a pair at its first `=` only). `+` (a
# space there), `%`, `&` and everything else become %XX.
FORM_SAFE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~/="


class ProtocolError(Exception):
    """A FastCGI exchange that cannot happen: see LocalProtocolError and RemoteProtocolError."""


class LocalProtocolError(ProtocolError, ValueError):
    """The caller asked for something FastCGI cannot carry; nothing was sent or changed."""


class RemoteProtocolError(ProtocolError):
    """The FastCGI peer sent a stream this client cannot trust; the connection must be dropped."""


class Response(NamedTuple):
    """A completed request, as `ResponseParser.feed` returns it (one per END_REQUEST).

    `stdout` and `stderr` are the first `max_head` bytes of each stream; `stdout_size` and
    `stderr_size` count every byte that arrived.
    """

    request_id: int
    stdout: bytes
    stderr: bytes
    app_status: int
    protocol_status: int
    stdout_size: int
    stderr_size: int


# --------------------------------------------------------------------------------------------
# argument checks and error messages, for both codecs (their hot paths test inline and call
# these only to raise)


def check_request_id(request_id: object) -> int:
    """`request_id` if FastCGI can carry it; else TypeError or LocalProtocolError."""
    if not isinstance(request_id, int):
        raise TypeError(f"request_id must be an int, not {type(request_id).__name__}")
    if not 0 < request_id < 65536:
        raise LocalProtocolError(f"request_id must be in 1..65535, got {request_id}")
    return request_id


def check_max_head(max_head: object) -> int:
    if not isinstance(max_head, int):
        raise TypeError(f"max_head must be an int, not {type(max_head).__name__}")
    if not 0 <= max_head <= MAX_HEAD_LIMIT:
        raise ValueError(f"max_head must be in 0..{MAX_HEAD_LIMIT}, got {max_head}")
    return max_head


def check_request_ids(request_ids: object) -> frozenset[int]:
    try:
        ids = tuple(request_ids)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            f"request_ids must be an iterable of ints, not {type(request_ids).__name__}"
        ) from None
    if not ids:
        raise ValueError("request_ids must name at least one request id")
    for rid in ids:
        if not isinstance(rid, int):
            raise TypeError(f"request ids must be ints, not {type(rid).__name__}")
        if not 0 < rid < 65536:
            raise LocalProtocolError(f"request ids must be in 1..65535, got {rid}")
    return frozenset(ids)


def byte_view(o: object, what: str) -> memoryview:
    """A flat byte view of a bytes-like argument, or a TypeError naming it."""
    try:
        view = memoryview(o)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be a bytes-like object, not {type(o).__name__}") from None
    return view.cast("B")


def not_str_or_bytes(what: str, o: object) -> TypeError:
    return TypeError(f"FastCGI param {what}s must be str or bytes, not {type(o).__name__}")


def pair_too_big(name: object, size: int) -> LocalProtocolError:
    return LocalProtocolError(
        f"FastCGI param {repr(name)[:80]} encodes to {size} bytes, more than the 65535 one "
        f"PARAMS record can carry (PHP-FPM drops a pair split across records); send large "
        f"data in the request body (stdin) instead"
    )


def params_too_big(size: int) -> LocalProtocolError:
    return LocalProtocolError(
        f"FastCGI params encode to {size} bytes, more than the 65535 one PARAMS record can carry"
    )


def shared_too_big(size: int) -> LocalProtocolError:
    return LocalProtocolError(f"shared params of {size} bytes do not fit in one PARAMS record")
