"""Pure-Python twin of the compiled AMQP 0-9-1 frame codec `amqp_codec` (same API, same errors).

Why a codec of our own: aiormq decodes every frame into pamqp objects and runs a task per
delivery, which costs several times the whole per-message CPU budget. The hot path only needs
Basic.Deliver + content header + body frames turned into one tuple, and acks written as bytes;
every other frame is handed back raw for pamqp to decode.

This twin is the reference and the fallback (`FASTWORKER_NO_EXTENSIONS=1`);
tests/test_amqp_codec.py and tests/test_amqp_fuzz.py run every vector through both and require
equal results and equal error messages. Keep them in step.

`FrameReader(frame_max, max_body_size).feed(data)` accepts any split of the byte stream (bytes,
bytearray, memoryview) and returns, in stream order:
- for each complete delivery, a 9-tuple
  `(channel, delivery_tag, redelivered, exchange, routing_key, consumer_tag, properties_raw,
  body, body_size)`: `properties_raw` is the content header from the property-flags word on,
  undecoded (`decode_properties` turns it into dicts); `body` is bytes, or None when
  `body_size > max_body_size`: such a body is counted and discarded frame by frame, the stream
  stays usable and the delivery is emitted once all announced bytes have passed;
- for any other frame, a 3-tuple `(frame_type, channel, payload)`. Content frames that follow a
  method other than Basic.Deliver (Basic.GetOk, Basic.Return) come back raw as well.
Memory: at most one partial frame (< frame_max) plus the body bytes received so far of
deliveries within max_body_size; nothing is reserved ahead of the data.

Errors: `feed` raises only `AMQPFrameError` (a ValueError) for any input bytes: the stream cannot
be trusted, drop the connection. The reader is then unusable: every later `feed` raises
`AMQPFrameError("reader is unusable after an earlier error: <first error>")`.
`decode_properties` raises only `PropertyError` (not a ValueError): one message is bad, the
stream is fine.
"""

from __future__ import annotations

import datetime
import decimal
import struct
from collections.abc import Iterable
from typing import Any

__all__ = [
    "AMQPFrameError",
    "DEFAULT_FRAME_MAX",
    "DEFAULT_MAX_BODY_SIZE",
    "FRAME_BODY",
    "FRAME_HEADER",
    "FRAME_HEARTBEAT",
    "FRAME_METHOD",
    "FrameReader",
    "HEARTBEAT",
    "MAX_TABLE_DEPTH",
    "PROTOCOL_HEADER",
    "PropertyError",
    "decode_properties",
    "encode_ack",
    "encode_acks",
    "encode_nack",
]

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8
FRAME_END = 0xCE
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"
DEFAULT_FRAME_MAX = 131072  # RabbitMQ's default; the real value comes from Connection.Tune
MIN_FRAME_MAX = 4096  # AMQP 0-9-1: frame_max may not be set below this
DEFAULT_MAX_BODY_SIZE = 8 * 1024 * 1024  # larger bodies are skipped (emitted with body None)
MAX_TAG = 0xFFFFFFFFFFFFFFFF
MAX_TABLE_DEPTH = 32  # headers table = level 1; each nested table or array one more
UNUSABLE = "reader is unusable after an earlier error: "

_FRAME_HEADER = struct.Struct(">BHI")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_ACK = struct.Struct(">BHIHHQBB")  # frame header, class, method, tag, bits, frame end
_CLASS_BASIC = 60
_DELIVER = 60
_ACK_METHOD = 80
_NACK_METHOD = 120
_IDLE, _WANT_HEADER, _WANT_BODY = 0, 1, 2


class AMQPFrameError(ValueError):
    """The broker sent a byte stream this client cannot trust; the connection must be dropped."""


class PropertyError(Exception):
    """One delivery's content header properties cannot be decoded.

    A fault of that message only (the stream is in sync): reject or dead-letter the message,
    keep the connection. Deliberately not a ValueError, so it is never mistaken for
    AMQPFrameError.
    """


def _check_header(ftype: int, channel: int, size: int, head: bytes, frame_max: int) -> None:
    if ftype not in (FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT):
        if head[:4] == b"AMQP":
            raise AMQPFrameError(
                "the broker sent a protocol header instead of a frame: "
                "it does not accept AMQP 0-9-1"
            )
        raise AMQPFrameError(f"unknown frame type {ftype} on channel {channel}")
    if size + 8 > frame_max:
        raise AMQPFrameError(
            f"frame of {size + 8} bytes on channel {channel} exceeds frame_max {frame_max}"
        )
    if ftype == FRAME_HEARTBEAT and size:
        raise AMQPFrameError(f"heartbeat frame with a payload of {size} bytes")


def _short_str(payload: bytes, off: int, end: int) -> tuple[str, int]:
    """Decodes a shortstr at `off`; returns ('', -1) when it runs past `end`."""
    if off >= end:
        return "", -1
    n = payload[off]
    stop = off + 1 + n
    if stop > end:
        return "", -1
    return payload[off + 1 : stop].decode("utf-8", "replace"), stop


def _check_int(name: str, value: Any) -> None:
    if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")


class _Assembly:
    """A delivery whose content frames are still arriving on one channel."""

    __slots__ = (
        "state",
        "delivery_tag",
        "redelivered",
        "exchange",
        "routing_key",
        "consumer_tag",
        "properties",
        "body_size",
        "parts",
        "received",
    )

    def __init__(self) -> None:
        self.state = _IDLE
        self.parts: list[bytes] | None = None


class FrameReader:
    """Sans-IO reader: bytes in, deliveries and raw frames out, at most one partial frame kept."""

    def __init__(
        self, frame_max: int = DEFAULT_FRAME_MAX, max_body_size: int = DEFAULT_MAX_BODY_SIZE
    ) -> None:
        self.frame_max = frame_max
        self.max_body_size = max_body_size
        self._buf = bytearray()
        self._channels: dict[int, _Assembly] = {}
        self._error: str | None = None

    @property
    def frame_max(self) -> int:
        """Largest frame accepted, header and end octet included (from Connection.Tune)."""
        return self._frame_max

    @frame_max.setter
    def frame_max(self, value: int) -> None:
        _check_int("frame_max", value)
        if not MIN_FRAME_MAX <= value <= 0xFFFFFFFF:
            raise ValueError(f"frame_max must be in {MIN_FRAME_MAX}..4294967295, got {value}")
        self._frame_max = value

    @property
    def max_body_size(self) -> int:
        """Largest body buffered; a larger one is skipped and its delivery has body None."""
        return self._max_body

    @max_body_size.setter
    def max_body_size(self, value: int) -> None:
        _check_int("max_body_size", value)
        if not 0 <= value <= MAX_TAG:
            raise ValueError(f"max_body_size must be in 0..{MAX_TAG}, got {value}")
        self._max_body = value

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held until more data arrives."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[Any, ...]]:
        """Parses what `data` completes; returns deliveries and raw frames in stream order."""
        if self._error is not None:
            raise AMQPFrameError(UNUSABLE + self._error)
        buf = self._buf
        buf += data
        out: list[tuple[Any, ...]] = []
        pos, n = 0, len(buf)
        try:
            while n - pos >= 7:
                ftype, channel, size = _FRAME_HEADER.unpack_from(buf, pos)
                _check_header(ftype, channel, size, bytes(buf[pos : pos + 4]), self._frame_max)
                end = pos + 7 + size
                if end >= n:
                    break
                if buf[end] != FRAME_END:
                    raise AMQPFrameError(
                        f"frame end octet is 0x{buf[end]:02x}, not 0xce "
                        f"(frame type {ftype}, channel {channel}, size {size})"
                    )
                self._frame(ftype, channel, bytes(buf[pos + 7 : end]), out)
                pos = end + 1
        except AMQPFrameError as exc:
            self._error = str(exc)
            raise
        except BaseException as exc:  # e.g. MemoryError: the state is no longer trustworthy
            self._error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            del buf[:pos]
        return out

    def _frame(self, ftype: int, channel: int, payload: bytes, out: list[tuple[Any, ...]]) -> None:
        a = self._channels.get(channel)
        if ftype == FRAME_METHOD:
            if len(payload) < 4:
                raise AMQPFrameError(
                    f"method frame of {len(payload)} bytes on channel {channel} is too short"
                )
            if a is not None and a.state != _IDLE:
                raise AMQPFrameError(
                    f"method frame on channel {channel} while a delivery's content is incomplete"
                )
            if payload[0:4] == b"\x00\x3c\x00\x3c":  # Basic.Deliver
                if a is None:
                    a = self._channels[channel] = _Assembly()
                self._deliver(a, channel, payload)
            else:
                out.append((FRAME_METHOD, channel, payload))
        elif ftype == FRAME_HEADER:
            if a is None or a.state == _IDLE:
                out.append((FRAME_HEADER, channel, payload))
            elif a.state == _WANT_BODY:
                raise AMQPFrameError(
                    f"content header on channel {channel} while the body is incomplete"
                )
            else:
                self._content_header(a, channel, payload, out)
        elif ftype == FRAME_BODY:
            if a is None or a.state == _IDLE:
                out.append((FRAME_BODY, channel, payload))
            elif a.state == _WANT_HEADER:
                raise AMQPFrameError(f"body frame on channel {channel} before the content header")
            else:
                received = a.received + len(payload)
                if received > a.body_size:
                    raise AMQPFrameError(
                        f"body frames on channel {channel} carry more than the "
                        f"{a.body_size} bytes announced"
                    )
                a.received = received
                parts = a.parts
                if parts is not None:  # None: over max_body_size, counted and discarded
                    parts.append(payload)
                if received == a.body_size:
                    if parts is None:
                        body = None
                    else:
                        body = parts[0] if len(parts) == 1 else b"".join(parts)
                    self._emit(a, channel, body, out)
        else:
            out.append((FRAME_HEARTBEAT, channel, b""))

    def _deliver(self, a: _Assembly, channel: int, payload: bytes) -> None:
        end = len(payload)
        consumer_tag, off = _short_str(payload, 4, end)
        if off < 0 or off + 9 > end:
            raise AMQPFrameError(f"Basic.Deliver on channel {channel} is truncated")
        a.delivery_tag = _U64.unpack_from(payload, off)[0]
        a.redelivered = bool(payload[off + 8] & 1)
        exchange, off = _short_str(payload, off + 9, end)
        if off < 0:
            raise AMQPFrameError(f"Basic.Deliver on channel {channel} is truncated")
        routing_key, off = _short_str(payload, off, end)
        if off < 0:
            raise AMQPFrameError(f"Basic.Deliver on channel {channel} is truncated")
        a.consumer_tag, a.exchange, a.routing_key = consumer_tag, exchange, routing_key
        a.state = _WANT_HEADER

    def _content_header(
        self, a: _Assembly, channel: int, payload: bytes, out: list[tuple[Any, ...]]
    ) -> None:
        # class-id, weight, body-size, then the properties: handed out undecoded.
        if len(payload) < 12:
            raise AMQPFrameError(f"content header on channel {channel} is truncated")
        class_id = _U16.unpack_from(payload, 0)[0]
        if class_id != _CLASS_BASIC:
            raise AMQPFrameError(
                f"content header of class {class_id} on channel {channel} after Basic.Deliver"
            )
        body_size = _U64.unpack_from(payload, 4)[0]
        a.properties = payload[12:]
        if body_size == 0:
            a.body_size = 0
            self._emit(a, channel, b"", out)
            return
        a.body_size = body_size
        a.received = 0
        a.parts = [] if body_size <= self._max_body else None
        a.state = _WANT_BODY

    @staticmethod
    def _emit(a: _Assembly, channel: int, body: bytes | None, out: list[tuple[Any, ...]]) -> None:
        out.append(
            (
                channel,
                a.delivery_tag,
                a.redelivered,
                a.exchange,
                a.routing_key,
                a.consumer_tag,
                a.properties,
                body,
                a.body_size,
            )
        )
        a.state = _IDLE
        a.parts = None
        a.properties = None


# --------------------------------------------------------------------------------------------
# properties: off the hot path, shared by both twins (amqp_codec re-exports these)

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

_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
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
            value, off = _short_str(raw, off, end)
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


# --------------------------------------------------------------------------------------------
# encoding


def _check_channel(channel: int) -> None:
    _check_int("channel", channel)
    if not 0 <= channel <= 0xFFFF:
        raise ValueError(f"channel {channel} out of range 0..65535")


def _check_tag(tag: int) -> None:
    _check_int("delivery tag", tag)
    if not 0 <= tag <= MAX_TAG:
        raise ValueError(f"delivery tag {tag} out of range 0..{MAX_TAG}")


def encode_ack(channel: int, delivery_tag: int, multiple: bool = False) -> bytes:
    """One Basic.Ack frame (21 bytes). channel and tag: int (not bool), else TypeError."""
    _check_channel(channel)
    _check_tag(delivery_tag)
    return _ACK.pack(
        FRAME_METHOD,
        channel,
        13,
        _CLASS_BASIC,
        _ACK_METHOD,
        delivery_tag,
        1 if multiple else 0,
        FRAME_END,
    )


def encode_nack(
    channel: int, delivery_tag: int, multiple: bool = False, requeue: bool = True
) -> bytes:
    """One Basic.Nack frame (21 bytes); `requeue=True` gives the message back to the queue."""
    _check_channel(channel)
    _check_tag(delivery_tag)
    bits = (1 if multiple else 0) | (2 if requeue else 0)
    return _ACK.pack(
        FRAME_METHOD, channel, 13, _CLASS_BASIC, _NACK_METHOD, delivery_tag, bits, FRAME_END
    )


def encode_acks(channel: int, acks: Iterable[tuple[int, bool]]) -> bytes:
    """Several Basic.Ack frames in one buffer, for one write: `acks` as (tag, multiple)."""
    _check_channel(channel)
    parts = []
    for tag, multiple in acks:
        _check_tag(tag)
        parts.append(
            _ACK.pack(
                FRAME_METHOD,
                channel,
                13,
                _CLASS_BASIC,
                _ACK_METHOD,
                tag,
                1 if multiple else 0,
                FRAME_END,
            )
        )
    return b"".join(parts)
