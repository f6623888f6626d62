"""Pure-Python twin of the compiled AMQP 0-9-1 frame codec `amqp_codec` (same API, same errors).

Why a codec of our own: aiormq decodes every frame into pamqp objects and runs a task per
delivery, which costs several times the whole per-message CPU budget (see DESIGN.md). The hot
path only needs Basic.Deliver + content header + body frames turned into one tuple, and acks
written as bytes; every other frame is handed back raw for pamqp to decode.

This twin is the reference and the fallback (`FASTWORKER_NO_EXTENSIONS=1`);
tests/test_amqp_codec.py runs every vector through both. Keep them in step.

`FrameReader().feed(data)` accepts any split of the byte stream and returns, in stream order:
- for each complete delivery, a 9-tuple
  `(channel, delivery_tag, redelivered, exchange, routing_key, consumer_tag, properties,
  headers, body)`; `properties` is a dict keyed like pamqp's Basic.Properties attributes
  (`message_type` for `type`; `cluster_id` is dropped), `headers` the decoded headers table;
- for any other frame, a 3-tuple `(frame_type, channel, payload)`. Content frames that follow a
  method other than Basic.Deliver (Basic.GetOk, Basic.Return) come back raw as well.
After an `AMQPFrameError` the stream cannot be trusted: drop the connection.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from pamqp import decode as _pamqp_decode

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
    "PROTOCOL_HEADER",
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
DEFAULT_MAX_BODY_SIZE = 512 * 1024 * 1024  # RabbitMQ 3.x caps messages at 512 MiB at most
MAX_TAG = 0xFFFFFFFFFFFFFFFF

_FRAME_HEADER = struct.Struct(">BHI")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_ACK = struct.Struct(">BHIHHQBB")  # frame header, class, method, tag, bits, frame end
_CLASS_BASIC = 60
_DELIVER = 60
_ACK_METHOD = 80
_NACK_METHOD = 120
_IDLE, _WANT_HEADER, _WANT_BODY = 0, 1, 2

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


class AMQPFrameError(ValueError):
    """The broker sent a byte stream this client cannot trust; the connection must be dropped."""


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
        "headers",
        "body_size",
        "parts",
        "received",
    )

    def __init__(self) -> None:
        self.state = _IDLE
        self.parts: list[bytes] = []


class FrameReader:
    """Sans-IO reader: bytes in, deliveries and raw frames out, at most one partial frame kept."""

    def __init__(
        self, frame_max: int = DEFAULT_FRAME_MAX, max_body_size: int = DEFAULT_MAX_BODY_SIZE
    ) -> None:
        self.frame_max = frame_max
        if max_body_size < 0:
            raise ValueError(f"max_body_size must be >= 0, got {max_body_size}")
        self.max_body_size = max_body_size
        self._buf = bytearray()
        self._channels: dict[int, _Assembly] = {}

    @property
    def frame_max(self) -> int:
        """Largest frame accepted, header and end octet included (from Connection.Tune)."""
        return self._frame_max

    @frame_max.setter
    def frame_max(self, value: int) -> None:
        if not MIN_FRAME_MAX <= value <= 0xFFFFFFFF:
            raise ValueError(f"frame_max must be in {MIN_FRAME_MAX}..4294967295, got {value}")
        self._frame_max = value

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held until more data arrives."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[Any, ...]]:
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
                size = len(payload)
                if a.received + size > a.body_size:
                    raise AMQPFrameError(
                        f"body frames on channel {channel} carry more than the "
                        f"{a.body_size} bytes announced"
                    )
                a.parts.append(payload)
                a.received += size
                if a.received == a.body_size:
                    parts = a.parts
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
        end = len(payload)
        truncated = f"content header on channel {channel} is truncated"
        if end < 14:
            raise AMQPFrameError(truncated)
        class_id = _U16.unpack_from(payload, 0)[0]
        if class_id != _CLASS_BASIC:
            raise AMQPFrameError(
                f"content header of class {class_id} on channel {channel} after Basic.Deliver"
            )
        body_size = _U64.unpack_from(payload, 4)[0]
        flags = word = _U16.unpack_from(payload, 12)[0]
        off = 14
        while word & 1:  # continuation flag words: no Basic property lives there
            if off + 2 > end:
                raise AMQPFrameError(truncated)
            word = _U16.unpack_from(payload, off)[0]
            off += 2
        properties: dict[str, Any] = {}
        headers: dict[str, Any] = {}
        if flags & 0xFFFC:
            for bit, name, kind in _PROPERTIES:
                if not flags & bit:
                    continue
                if kind == "s":
                    value, off = _short_str(payload, off, end)
                    if off < 0:
                        raise AMQPFrameError(truncated)
                    if name != "cluster_id":
                        properties[name] = value
                elif kind == "o":
                    if off >= end:
                        raise AMQPFrameError(truncated)
                    properties[name] = payload[off]
                    off += 1
                elif kind == "T":
                    if off + 8 > end:
                        raise AMQPFrameError(truncated)
                    properties[name] = _pamqp_decode.timestamp(payload[off : off + 8])[1]
                    off += 8
                else:
                    if off + 4 > end:
                        raise AMQPFrameError(truncated)
                    stop = off + 4 + int.from_bytes(payload[off : off + 4], "big")
                    if stop > end:
                        raise AMQPFrameError(truncated)
                    headers = _headers_table(payload[off:stop], channel)
                    off = stop
        if body_size > self.max_body_size:
            raise AMQPFrameError(
                f"delivery of {body_size} bytes on channel {channel} exceeds max_body_size "
                f"{self.max_body_size}"
            )
        a.properties, a.headers = properties, headers
        if body_size == 0:
            self._emit(a, channel, b"", out)
            return
        a.body_size = body_size
        a.received = 0
        a.parts = []
        a.state = _WANT_BODY

    @staticmethod
    def _emit(a: _Assembly, channel: int, body: bytes, out: list[tuple[Any, ...]]) -> None:
        out.append(
            (
                channel,
                a.delivery_tag,
                a.redelivered,
                a.exchange,
                a.routing_key,
                a.consumer_tag,
                a.properties,
                a.headers,
                body,
            )
        )
        a.state = _IDLE
        a.parts = []
        a.properties = a.headers = None


def _headers_table(table: bytes, channel: int) -> dict[str, Any]:
    """Decodes the rare headers table with pamqp (shared by both implementations)."""
    try:
        return dict(_pamqp_decode.field_table(table)[1])
    except (ValueError, struct.error, TypeError, IndexError) as exc:
        raise AMQPFrameError(
            f"content header on channel {channel} has a bad headers table ({exc})"
        ) from None


def _check_channel(channel: int) -> None:
    if not 0 <= channel <= 0xFFFF:
        raise ValueError(f"channel {channel} out of range 0..65535")


def _check_tag(tag: int) -> None:
    if not 0 <= tag <= MAX_TAG:
        raise ValueError(f"delivery tag {tag} out of range 0..{MAX_TAG}")


def encode_ack(channel: int, delivery_tag: int, multiple: bool = False) -> bytes:
    """One Basic.Ack frame (21 bytes)."""
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
