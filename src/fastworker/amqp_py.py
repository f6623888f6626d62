"""Sans-IO AMQP 0-9-1 frame codec in pure Python: the reference twin of the compiled `_amqp_codec`.

Why a codec of our own: aiormq decodes every frame into pamqp objects and runs a task per
delivery, which costs several times the whole per-message CPU budget. The hot path only needs
Basic.Deliver + content header + body frames turned into one `Delivery`, and acks written as
bytes; every other frame is handed back raw (a `Frame`) for pamqp to decode.

Same API, same results, the same exception classes and messages, byte-identical acks: what the
twins share (the numbers, the exceptions, `Delivery` and `Frame`, the argument checks and error
messages, `decode_properties`) lives in `fastworker.amqp_base`, and tests/test_amqp_codec.py and
tests/test_amqp_fuzz.py run every vector through both. This twin is the reference and the
fallback when the extension is not built or FASTWORKER_NO_EXTENSIONS is set; keep its loops in
step with src/fastworker/_amqp_codec.pyx.

`FrameReader(frame_max, max_body_size).feed(data)` accepts any split of the byte stream (bytes,
bytearray, memoryview) and returns, in stream order:
- for each complete delivery, a `Delivery(channel, delivery_tag, redelivered, exchange,
  routing_key, consumer_tag, properties_raw, body, body_size)`: `properties_raw` is the content
  header from the property-flags word on, undecoded (`decode_properties` turns it into dicts);
  `body` is bytes, or None when `body_size > max_body_size`: such a body is counted and
  discarded frame by frame, the stream stays usable and the delivery is emitted once all
  announced bytes have passed;
- for any other frame, a `Frame(frame_type, channel, payload)`. Content frames that follow a
  method other than Basic.Deliver (Basic.GetOk, Basic.Return) come back raw as well.
Memory: at most one partial frame (< frame_max) plus the body bytes received so far of
deliveries within max_body_size; nothing is reserved ahead of the data.

Errors: `feed` raises only `RemoteProtocolError` (not a ValueError) for any input bytes: the
stream cannot be trusted, drop the connection. The reader is then unusable: every later `feed`
raises `RemoteProtocolError("reader is unusable after an earlier error: <first error>")`.
`decode_properties` raises only `PropertyError`: one message is bad, the stream is fine. The
encoders raise TypeError for a channel or tag that is no int, LocalProtocolError (a ValueError)
for one out of range.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from fastworker.amqp_base import (
    BASIC_ACK,
    BASIC_NACK,
    CLASS_BASIC,
    DEFAULT_FRAME_MAX,
    DEFAULT_MAX_BODY_SIZE,
    FRAME_BODY,
    FRAME_END,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    HEARTBEAT,
    MAX_TABLE_DEPTH,
    MAX_TAG,
    MIN_FRAME_MAX,
    PROTOCOL_HEADER,
    Delivery,
    Frame,
    LocalProtocolError,
    PropertyError,
    ProtocolError,
    RemoteProtocolError,
    bad_frame_end,
    body_before_header,
    body_overrun,
    check_channel,
    check_frame_max,
    check_max_body_size,
    check_tag,
    content_header_class,
    content_header_truncated,
    decode_properties,
    deliver_truncated,
    frame_too_large,
    header_during_body,
    heartbeat_with_payload,
    method_during_content,
    method_too_short,
    protocol_header_received,
    short_str,
    unknown_frame_type,
    unusable,
)

__all__ = [
    "DEFAULT_FRAME_MAX",
    "DEFAULT_MAX_BODY_SIZE",
    "Delivery",
    "FRAME_BODY",
    "FRAME_HEADER",
    "FRAME_HEARTBEAT",
    "FRAME_METHOD",
    "Frame",
    "FrameReader",
    "HEARTBEAT",
    "LocalProtocolError",
    "MAX_TABLE_DEPTH",
    "MAX_TAG",
    "MIN_FRAME_MAX",
    "PROTOCOL_HEADER",
    "PropertyError",
    "ProtocolError",
    "RemoteProtocolError",
    "decode_properties",
    "encode_ack",
    "encode_acks",
    "encode_nack",
]

_FRAME_HEADER = struct.Struct(">BHI")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_ACK = struct.Struct(">BHIHHQBB")  # frame header, class, method, tag, bits, frame end
_DELIVER = b"\x00\x3c\x00\x3c"  # class Basic, method Deliver
_IDLE, _WANT_HEADER, _WANT_BODY = 0, 1, 2
_new = tuple.__new__  # Delivery(...) without its Python-level __new__: half the cost


def _check_header(ftype: int, channel: int, size: int, head: bytes, frame_max: int) -> None:
    if ftype not in (FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT):
        if head[:4] == b"AMQP":
            raise protocol_header_received()
        raise unknown_frame_type(ftype, channel)
    if size + 8 > frame_max:
        raise frame_too_large(size, channel, frame_max)
    if ftype == FRAME_HEARTBEAT and size:
        raise heartbeat_with_payload(size)


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
        self._frame_max = check_frame_max(value)

    @property
    def max_body_size(self) -> int:
        """Largest body buffered; a larger one is skipped and its delivery has body None."""
        return self._max_body

    @max_body_size.setter
    def max_body_size(self, value: int) -> None:
        self._max_body = check_max_body_size(value)

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held until more data arrives."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Delivery | Frame]:
        """Parses what `data` completes; returns deliveries and raw frames in stream order."""
        if self._error is not None:
            raise unusable(self._error)
        buf = self._buf
        buf += data
        out: list[Delivery | Frame] = []
        pos, n = 0, len(buf)
        try:
            while n - pos >= 7:
                ftype, channel, size = _FRAME_HEADER.unpack_from(buf, pos)
                _check_header(ftype, channel, size, bytes(buf[pos : pos + 4]), self._frame_max)
                end = pos + 7 + size
                if end >= n:
                    break
                if buf[end] != FRAME_END:
                    raise bad_frame_end(buf[end], ftype, channel, size)
                self._frame(ftype, channel, bytes(buf[pos + 7 : end]), out)
                pos = end + 1
        except RemoteProtocolError as exc:
            self._error = str(exc)
            raise
        except BaseException as exc:  # e.g. MemoryError: the state is no longer trustworthy
            self._error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            del buf[:pos]
        return out

    def _frame(self, ftype: int, channel: int, payload: bytes, out: list[Any]) -> None:
        a = self._channels.get(channel)
        if ftype == FRAME_METHOD:
            if len(payload) < 4:
                raise method_too_short(len(payload), channel)
            if a is not None and a.state != _IDLE:
                raise method_during_content(channel)
            if payload[0:4] == _DELIVER:
                if a is None:
                    a = self._channels[channel] = _Assembly()
                self._deliver(a, channel, payload)
            else:
                out.append(Frame(FRAME_METHOD, channel, payload))
        elif ftype == FRAME_HEADER:
            if a is None or a.state == _IDLE:
                out.append(Frame(FRAME_HEADER, channel, payload))
            elif a.state == _WANT_BODY:
                raise header_during_body(channel)
            else:
                self._content_header(a, channel, payload, out)
        elif ftype == FRAME_BODY:
            if a is None or a.state == _IDLE:
                out.append(Frame(FRAME_BODY, channel, payload))
            elif a.state == _WANT_HEADER:
                raise body_before_header(channel)
            else:
                received = a.received + len(payload)
                if received > a.body_size:
                    raise body_overrun(channel, a.body_size)
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
            out.append(Frame(FRAME_HEARTBEAT, channel, b""))

    def _deliver(self, a: _Assembly, channel: int, payload: bytes) -> None:
        end = len(payload)
        consumer_tag, off = short_str(payload, 4, end)
        if off < 0 or off + 9 > end:
            raise deliver_truncated(channel)
        a.delivery_tag = _U64.unpack_from(payload, off)[0]
        a.redelivered = bool(payload[off + 8] & 1)
        exchange, off = short_str(payload, off + 9, end)
        if off < 0:
            raise deliver_truncated(channel)
        routing_key, off = short_str(payload, off, end)
        if off < 0:
            raise deliver_truncated(channel)
        a.consumer_tag, a.exchange, a.routing_key = consumer_tag, exchange, routing_key
        a.state = _WANT_HEADER

    def _content_header(self, a: _Assembly, channel: int, payload: bytes, out: list[Any]) -> None:
        # class-id, weight, body-size, then the properties: handed out undecoded.
        if len(payload) < 12:
            raise content_header_truncated(channel)
        class_id = _U16.unpack_from(payload, 0)[0]
        if class_id != CLASS_BASIC:
            raise content_header_class(class_id, channel)
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
    def _emit(a: _Assembly, channel: int, body: bytes | None, out: list[Any]) -> None:
        out.append(
            _new(
                Delivery,
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
                ),
            )
        )
        a.state = _IDLE
        a.parts = None
        a.properties = None


# --------------------------------------------------------------------------------------------
# encoding


def encode_ack(channel: int, delivery_tag: int, multiple: bool = False) -> bytes:
    """One Basic.Ack frame (21 bytes). channel and tag: int (not bool), else TypeError; out of
    range, LocalProtocolError."""
    check_channel(channel)
    check_tag(delivery_tag)
    return _ACK.pack(
        FRAME_METHOD,
        channel,
        13,
        CLASS_BASIC,
        BASIC_ACK,
        delivery_tag,
        1 if multiple else 0,
        FRAME_END,
    )


def encode_nack(
    channel: int, delivery_tag: int, multiple: bool = False, requeue: bool = True
) -> bytes:
    """One Basic.Nack frame (21 bytes); `requeue=True` gives the message back to the queue."""
    check_channel(channel)
    check_tag(delivery_tag)
    bits = (1 if multiple else 0) | (2 if requeue else 0)
    return _ACK.pack(
        FRAME_METHOD, channel, 13, CLASS_BASIC, BASIC_NACK, delivery_tag, bits, FRAME_END
    )


def encode_acks(channel: int, acks: Iterable[tuple[int, bool]]) -> bytes:
    """Several Basic.Ack frames in one buffer, for one write: `acks` as (tag, multiple)."""
    check_channel(channel)
    parts = []
    for tag, multiple in acks:
        check_tag(tag)
        parts.append(
            _ACK.pack(
                FRAME_METHOD,
                channel,
                13,
                CLASS_BASIC,
                BASIC_ACK,
                tag,
                1 if multiple else 0,
                FRAME_END,
            )
        )
    return b"".join(parts)
