"""What the two AMQP frame codecs share: protocol numbers, limits, errors, results, properties.

The compiled `fastworker._amqp_codec` and its pure-Python twin `fastworker.amqp_py` import their
exceptions, their result types, their argument checks, their error messages and
`decode_properties` from here, so they raise the very same classes with the very same messages
and return the very same types; only their reading and encoding loops differ. The compiled
module repeats the numbers below as C enums for its loops and refuses to import if they ever
disagree with these. Sans-IO.

Results: `FrameReader.feed` returns, in stream order, a `Delivery` per completed delivery
(Basic.Deliver, its content header and body frames) and a `Frame` per other frame. Both are
NamedTuples, so they compare equal to plain tuples and unpack like them; tell them apart by type
(`type(item) is Delivery`).

Errors, the h11 way:

- `RemoteProtocolError`: the broker sent a byte stream that cannot be trusted; drop the
  connection. `FrameReader.feed` raises no other error for what it is fed, and refuses all input
  after it. Not a ValueError: it is never the caller's mistake.
- `LocalProtocolError`: the caller asked for something AMQP cannot carry (a channel outside
  0..65535, a delivery tag outside 0..2**64-1, a frame_max outside 4096..2**32-1). A ValueError,
  so callers' `except ValueError` still holds.
- Both derive from `ProtocolError`. Arguments of the wrong type raise TypeError; a max_body_size
  outside 0..2**64-1 (a setting, no AMQP limit) raises plain ValueError.
- `PropertyError`: one delivery's properties cannot be decoded (`decode_properties` raises no
  other error). A fault of that one message, the stream is in sync: neither a ProtocolError nor
  a ValueError, so it is never mistaken for a broken connection.
"""

from __future__ import annotations

import datetime
import decimal
import struct
from typing import Any, NamedTuple

__all__ = [
    "ACK_SIZE",
    "BASIC_ACK",
    "BASIC_DELIVER",
    "BASIC_NACK",
    "CLASS_BASIC",
    "DEFAULT_FRAME_MAX",
    "DEFAULT_MAX_BODY_SIZE",
    "Delivery",
    "FRAME_BODY",
    "FRAME_END",
    "FRAME_HEADER",
    "FRAME_HEARTBEAT",
    "FRAME_METHOD",
    "Frame",
    "HEARTBEAT",
    "LocalProtocolError",
    "MAX_CHANNEL",
    "MAX_FRAME_MAX",
    "MAX_TABLE_DEPTH",
    "MAX_TAG",
    "MIN_FRAME_MAX",
    "PROTOCOL_HEADER",
    "PropertyError",
    "ProtocolError",
    "RemoteProtocolError",
    "UNUSABLE",
    "decode_properties",
]

# Frame types, and the octet that ends every frame.
FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8
FRAME_END = 0xCE

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"

# The methods the codecs read or write (class Basic).
CLASS_BASIC = 60
BASIC_DELIVER = 60
BASIC_ACK = 80
BASIC_NACK = 120
ACK_SIZE = 21  # one Basic.Ack or Basic.Nack frame: header 7, class+method 4, tag 8, bits 1, end 1

# Limits.
DEFAULT_FRAME_MAX = 131072  # RabbitMQ's default; the real value comes from Connection.Tune
MIN_FRAME_MAX = 4096  # AMQP 0-9-1: frame_max may not be set below this
MAX_FRAME_MAX = 0xFFFFFFFF  # a long-uint on the wire
DEFAULT_MAX_BODY_SIZE = 8 * 1024 * 1024  # larger bodies are skipped (emitted with body None)
MAX_CHANNEL = 0xFFFF
MAX_TAG = 0xFFFFFFFFFFFFFFFF  # delivery tags (and body sizes) are long-long-uints
MAX_TABLE_DEPTH = 32  # headers table = level 1; each nested table or array one more

UNUSABLE = "reader is unusable after an earlier error: "


class ProtocolError(Exception):
    """An AMQP exchange that cannot happen: see LocalProtocolError and RemoteProtocolError."""


class LocalProtocolError(ProtocolError, ValueError):
    """The caller asked for something AMQP cannot carry; nothing was encoded or changed."""


class RemoteProtocolError(ProtocolError):
    """The broker sent a byte stream this client cannot trust; the connection must be dropped."""


class PropertyError(Exception):
    """One delivery's content header properties cannot be decoded.

    A fault of that message only (the stream is in sync): reject or dead-letter the message,
    keep the connection. Deliberately neither a ProtocolError nor a ValueError, so it is never
    mistaken for a RemoteProtocolError.
    """


class Delivery(NamedTuple):
    """A complete delivery, as `FrameReader.feed` returns it.

    `properties_raw` is the content header from the property-flags word on, undecoded
    (`decode_properties` turns it into dicts). `body` is None when `body_size` exceeds the
    reader's max_body_size: that body was counted and discarded, never buffered.
    """

    channel: int
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    consumer_tag: str
    properties_raw: bytes
    body: bytes | None
    body_size: int


class Frame(NamedTuple):
    """Any frame that is not part of a delivery, raw: a heartbeat's payload is b""."""

    frame_type: int
    channel: int
    payload: bytes


# --------------------------------------------------------------------------------------------
# argument checks, for both codecs (the compiled one tests the common case inline and calls
# these for the rest)


def check_int(name: str, value: object) -> int:
    """`value` if it is an int (a subclass too, but not bool); else TypeError."""
    if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value  # type: ignore[return-value]


def check_channel(channel: object) -> int:
    """`channel` if AMQP can carry it; else TypeError or LocalProtocolError."""
    check_int("channel", channel)
    if not 0 <= channel <= MAX_CHANNEL:  # type: ignore[operator]
        raise LocalProtocolError(f"channel {channel} out of range 0..{MAX_CHANNEL}")
    return channel  # type: ignore[return-value]


def check_tag(tag: object) -> int:
    """`tag` if AMQP can carry it as a delivery tag; else TypeError or LocalProtocolError."""
    check_int("delivery tag", tag)
    if not 0 <= tag <= MAX_TAG:  # type: ignore[operator]
        raise LocalProtocolError(f"delivery tag {tag} out of range 0..{MAX_TAG}")
    return tag  # type: ignore[return-value]


def check_frame_max(value: object) -> int:
    check_int("frame_max", value)
    if not MIN_FRAME_MAX <= value <= MAX_FRAME_MAX:  # type: ignore[operator]
        raise LocalProtocolError(
            f"frame_max must be in {MIN_FRAME_MAX}..{MAX_FRAME_MAX}, got {value}"
        )
    return value  # type: ignore[return-value]


def check_max_body_size(value: object) -> int:
    check_int("max_body_size", value)
    if not 0 <= value <= MAX_TAG:  # type: ignore[operator]
        raise ValueError(f"max_body_size must be in 0..{MAX_TAG}, got {value}")
    return value  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# the reader's errors (RemoteProtocolError), one builder per fault, for both codecs


def unusable(first: str) -> RemoteProtocolError:
    return RemoteProtocolError(UNUSABLE + first)


def protocol_header_received() -> RemoteProtocolError:
    return RemoteProtocolError(
        "the broker sent a protocol header instead of a frame: it does not accept AMQP 0-9-1"
    )


def unknown_frame_type(ftype: int, channel: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"unknown frame type {ftype} on channel {channel}")


def frame_too_large(size: int, channel: int, frame_max: int) -> RemoteProtocolError:
    """`size` is the payload's; the frame adds 8 bytes (header and end octet)."""
    return RemoteProtocolError(
        f"frame of {size + 8} bytes on channel {channel} exceeds frame_max {frame_max}"
    )


def heartbeat_with_payload(size: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"heartbeat frame with a payload of {size} bytes")


def bad_frame_end(end: int, ftype: int, channel: int, size: int) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"frame end octet is 0x{end:02x}, not 0xce "
        f"(frame type {ftype}, channel {channel}, size {size})"
    )


def method_too_short(size: int, channel: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"method frame of {size} bytes on channel {channel} is too short")


def method_during_content(channel: int) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"method frame on channel {channel} while a delivery's content is incomplete"
    )


def header_during_body(channel: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"content header on channel {channel} while the body is incomplete")


def body_before_header(channel: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"body frame on channel {channel} before the content header")


def deliver_truncated(channel: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"Basic.Deliver on channel {channel} is truncated")


def content_header_truncated(channel: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"content header on channel {channel} is truncated")


def content_header_class(class_id: int, channel: int) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"content header of class {class_id} on channel {channel} after Basic.Deliver"
    )


def body_overrun(channel: int, body_size: int) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"body frames on channel {channel} carry more than the {body_size} bytes announced"
    )


# --------------------------------------------------------------------------------------------
# properties: off the hot path, one implementation for both codecs


def short_str(payload: bytes, off: int, end: int) -> tuple[str, int]:
    """Decodes a shortstr at `off` (UTF-8 with replacement); returns ('', -1) when it runs past
    `end`."""
    if off >= end:
        return "", -1
    stop = off + 1 + payload[off]
    if stop > end:
        return "", -1
    return payload[off + 1 : stop].decode("utf-8", "replace"), stop


# Basic.Properties in wire order: (flag bit, name, kind); cluster_id is read and dropped.
_PROPERTIES = (
    (1 << 15, "content_type", "s"),
    (1 << 14, "content_encoding", "s"),
    (1 << 13, "headers", "F"),
    (1 << 12, "delivery_mode", "o"),
    (1 << 11, "priority", "o"),
    (1 << 10, "correlation_id", "s"),
    (1 << 9, "reply_to", "s"),
    (1 << 8, "expiration", "s"),
    (1 << 7, "message_id", "s"),
    (1 << 6, "timestamp", "T"),
    (1 << 5, "message_type", "s"),
    (1 << 4, "user_id", "s"),
    (1 << 3, "app_id", "s"),
    (1 << 2, "cluster_id", "s"),
)

_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
# Fixed-size field values, decoded as pamqp.decode does: type octet -> (size, struct or None).
_FIXED: dict[int, tuple[int, struct.Struct | None]] = {
    ord("t"): (1, None),  # boolean
    ord("b"): (1, struct.Struct(">b")),
    ord("B"): (1, struct.Struct(">B")),
    ord("s"): (2, struct.Struct(">h")),
    ord("u"): (2, struct.Struct(">H")),
    ord("I"): (4, struct.Struct(">l")),
    ord("i"): (4, struct.Struct(">L")),
    ord("l"): (8, struct.Struct(">q")),
    ord("L"): (8, struct.Struct(">q")),  # pamqp reads it signed too
    ord("f"): (4, struct.Struct(">f")),
    ord("d"): (8, struct.Struct(">d")),
}
_TEN = decimal.Decimal(10)


def _timestamp(raw: bytes, off: int, name: str) -> datetime.datetime:
    """pamqp.decode.timestamp's semantics, with a PropertyError when out of datetime's range."""
    value = _U64.unpack_from(raw, off)[0]
    seconds: float = value / 1000.0 if value > 0xFFFFFFFF else value  # milliseconds, likely
    try:
        return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    except (ValueError, OverflowError, OSError):
        raise PropertyError(f"{name} {value} is out of range") from None


def _field_table(raw: bytes, off: int, end: int) -> dict[str, Any]:
    """The headers table in raw[off:end] (its length prefix excluded), decoded without recursion.

    Values are those of pamqp.decode.field_table; unlike pamqp every length is checked against
    its enclosing table or array, nesting is limited to MAX_TABLE_DEPTH, time is linear.
    """
    root: dict[str, Any] = {}
    stack: list[tuple[Any, int]] = [(root, end)]
    while stack:
        container, stop = stack[-1]
        if off == stop:
            stack.pop()
            continue
        if type(container) is dict:
            n = raw[off]
            off += 1
            if off + n > stop:
                raise PropertyError("headers table key runs past its table")
            try:
                key = raw[off : off + n].decode("utf-8")
            except UnicodeDecodeError:
                raise PropertyError("headers table key is not valid UTF-8") from None
            off += n
            if off == stop:
                raise PropertyError(f"headers value of {key!r} is missing")
        kind = raw[off]
        off += 1
        fixed = _FIXED.get(kind)
        value: Any
        if fixed is not None:
            size, unpacker = fixed
            if off + size > stop:
                raise PropertyError(f"headers value of type {chr(kind)!r} is truncated")
            value = bool(raw[off]) if unpacker is None else unpacker.unpack_from(raw, off)[0]
            off += size
        elif kind == 0x56 or kind == 0:  # V, and the undocumented 0 seen in the wild: void
            value = None
        elif kind == 0x44:  # D: decimal
            if off + 5 > stop:
                raise PropertyError("headers value of type 'D' is truncated")
            try:
                value = decimal.Decimal(_I32.unpack_from(raw, off + 1)[0]) * (_TEN ** -raw[off])
            except decimal.DecimalException as exc:
                raise PropertyError(f"headers decimal cannot be represented ({exc!r})") from None
            off += 5
        elif kind == 0x54:  # T: timestamp
            if off + 8 > stop:
                raise PropertyError("headers value of type 'T' is truncated")
            value = _timestamp(raw, off, "headers timestamp")
            off += 8
        elif kind in (0x53, 0x78, 0x46, 0x41):  # S long string, x byte array, F table, A array
            if off + 4 > stop:
                raise PropertyError(f"headers value of type {chr(kind)!r} is truncated")
            inner = off + 4
            inner_stop = inner + _U32.unpack_from(raw, off)[0]
            if inner_stop > stop:
                raise PropertyError(f"headers value of type {chr(kind)!r} is truncated")
            if kind == 0x53:
                data = raw[inner:inner_stop]
                try:
                    value = data.decode("utf-8")
                except UnicodeDecodeError:
                    value = data  # pamqp hands out invalid UTF-8 as bytes
                off = inner_stop
            elif kind == 0x78:
                value = bytearray(raw[inner:inner_stop])
                off = inner_stop
            else:
                if len(stack) >= MAX_TABLE_DEPTH:
                    raise PropertyError(
                        f"headers table nested deeper than {MAX_TABLE_DEPTH} levels"
                    )
                value = {} if kind == 0x46 else []
                stack.append((value, inner_stop))
                off = inner
        else:
            raise PropertyError(f"headers value of unknown type {bytes([kind])!r}")
        if type(container) is dict:
            container[key] = value
        else:
            container.append(value)
    return root


def decode_properties(raw: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """`properties_raw` of a delivery -> (properties, headers); only ever raises PropertyError.

    `properties` is keyed like pamqp's Basic.Properties attributes (`message_type` for `type`;
    `cluster_id` is dropped; shortstrs decoded as UTF-8 with replacement), `headers` is the
    headers table as pamqp.decode.field_table gives it. Both dicts are fresh on every call.
    """
    if type(raw) is not bytes:
        raw = memoryview(raw).tobytes()  # bytearray, memoryview; TypeError for anything else
    end = len(raw)
    properties: dict[str, Any] = {}
    headers: dict[str, Any] = {}
    if end == 0:
        return properties, headers
    if end < 2:
        raise PropertyError("content header properties are truncated (property flags)")
    flags = word = _U16.unpack_from(raw, 0)[0]
    off = 2
    while word & 1:  # continuation flag words: no Basic property lives there
        if off + 2 > end:
            raise PropertyError("content header properties are truncated (property flags)")
        word = _U16.unpack_from(raw, off)[0]
        off += 2
    if not flags & 0xFFFC:
        return properties, headers
    for bit, name, kind in _PROPERTIES:
        if not flags & bit:
            continue
        if kind == "s":
            value, off = short_str(raw, off, end)
            if off < 0:
                raise PropertyError(f"content header properties are truncated ({name})")
            if name != "cluster_id":
                properties[name] = value
        elif kind == "o":
            if off >= end:
                raise PropertyError(f"content header properties are truncated ({name})")
            properties[name] = raw[off]
            off += 1
        elif kind == "T":
            if off + 8 > end:
                raise PropertyError(f"content header properties are truncated ({name})")
            properties[name] = _timestamp(raw, off, name)
            off += 8
        else:
            if off + 4 > end:
                raise PropertyError(f"content header properties are truncated ({name})")
            stop = off + 4 + _U32.unpack_from(raw, off)[0]
            if stop > end:
                raise PropertyError(f"content header properties are truncated ({name})")
            headers = _field_table(raw, off + 4, stop)
            off = stop
    return properties, headers
