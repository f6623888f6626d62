"""AMQP frame codec tests: every vector runs through the compiled `_amqp_codec` and the Python twin.

Streams are built with pamqp (`pamqp.frame.marshal` of `pamqp.commands` objects), the library
aiormq and the broker-facing code already trust, so the expected deliveries come from pamqp's own
decoding, not from the code under test. Streams are fed whole, split at every byte boundary and
split at random points; hypothesis also compares the two implementations on garbage: same
results, or the same error with the same message. A delivery is an `amqp_base.Delivery`
`(channel, delivery_tag, redelivered, exchange, routing_key, consumer_tag, properties_raw, body,
body_size)`, any other frame an `amqp_base.Frame`; `decode_properties(properties_raw)` must give
what pamqp decodes. The regression
tests at the end reproduce the findings of the differential fuzz (issue 8); tests/test_amqp_fuzz.py
fuzzes further.
"""

from __future__ import annotations

import datetime
import decimal
import os
import random
import string
import struct
import sys
import tracemalloc
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import body as pbody
from pamqp import commands, frame, header
from pamqp import decode as pamqp_decode
from pamqp.heartbeat import Heartbeat

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # a source checkout need not be installed to be tested
    sys.path.insert(0, str(ROOT / "src"))

from fastworker import amqp_base, amqp_py  # noqa: E402
from fastworker.amqp_base import (  # noqa: E402
    Delivery,
    Frame,
    LocalProtocolError,
    PropertyError,
    ProtocolError,
    RemoteProtocolError,
)

try:
    from fastworker import _amqp_codec  # type: ignore[attr-defined]  # noqa: E402

    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # reported by the tests below, not hidden by a skip
    _amqp_codec = None
    _IMPORT_ERROR = exc

SETTINGS = settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROPERTY_NAMES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "message_type",
    "user_id",
    "app_id",
)
FRAME_MAX = 131072


def _compiled() -> types.ModuleType:
    if _amqp_codec is None:
        pytest.fail(
            f"the compiled codec `fastworker._amqp_codec` cannot be imported: {_IMPORT_ERROR}"
        )
    return _amqp_codec


@pytest.fixture(params=["compiled", "python"])
def codec(request: pytest.FixtureRequest) -> types.ModuleType:
    """Each test using this runs once against the extension and once against the twin."""
    return _compiled() if request.param == "compiled" else amqp_py


def both() -> tuple[types.ModuleType, types.ModuleType]:
    return _compiled(), amqp_py


# --------------------------------------------------------------------------------------------
# building streams with pamqp, and what pamqp says they mean


def deliver_frames(
    tag: int,
    body: bytes,
    properties: commands.Basic.Properties | None = None,
    *,
    channel: int = 1,
    consumer_tag: str = "ctag",
    exchange: str = "",
    routing_key: str = "q",
    redelivered: bool = False,
    frame_max: int = FRAME_MAX,
) -> list[bytes]:
    """Basic.Deliver + content header + body frames (split at frame_max), as separate frames."""
    frames = [
        frame.marshal(
            commands.Basic.Deliver(
                consumer_tag=consumer_tag,
                delivery_tag=tag,
                redelivered=redelivered,
                exchange=exchange,
                routing_key=routing_key,
            ),
            channel,
        ),
        frame.marshal(
            header.ContentHeader(0, len(body), properties or commands.Basic.Properties()), channel
        ),
    ]
    step = frame_max - 8
    frames += [
        frame.marshal(pbody.ContentBody(body[i : i + step]), channel)
        for i in range(0, len(body), step)
    ]
    return frames


def expected(frames: bytes) -> list[tuple[Any, ...]]:
    """What the reader must return for `frames`, computed with pamqp's own unmarshal."""
    out: list[tuple[Any, ...]] = []
    pos = 0
    partial: dict[int, dict[str, Any]] = {}
    while pos < len(frames):
        used, channel, value = frame.unmarshal(frames[pos:])
        raw = frames[pos + 7 : pos + used - 1]
        ftype = frames[pos]
        pos += used
        p = partial.get(channel)
        if isinstance(value, commands.Basic.Deliver):
            partial[channel] = {"deliver": value, "parts": []}
        elif p is not None and isinstance(value, header.ContentHeader):
            p["header"] = value
            p["properties_raw"] = raw[12:]
            if value.body_size == 0:
                out.append(_delivery(channel, p, b""))
                del partial[channel]
        elif p is not None and isinstance(value, pbody.ContentBody):
            p["parts"].append(value.value)
            body = b"".join(p["parts"])
            if len(body) == p["header"].body_size:
                out.append(_delivery(channel, p, body))
                del partial[channel]
        elif isinstance(value, Heartbeat):
            out.append(Frame(8, channel, b""))
        else:
            out.append(Frame(ftype, channel, raw))
    return out


def _delivery(channel: int, p: dict[str, Any], body: bytes) -> Delivery:
    d = p["deliver"]
    return Delivery(
        channel,
        d.delivery_tag,
        bool(d.redelivered),
        d.exchange,
        d.routing_key,
        d.consumer_tag,
        p["properties_raw"],
        body,
        len(body),
    )


def pamqp_properties(props: commands.Basic.Properties) -> tuple[dict[str, Any], dict[str, Any]]:
    """What decode_properties must return for these properties, as pamqp decodes them."""
    return (
        {n: v for n in PROPERTY_NAMES if (v := getattr(props, n, None)) is not None},
        dict(props.headers or {}),
    )


def header_properties(frames: bytes) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """pamqp's decoding of the properties of every content header in `frames`, in order."""
    out = []
    pos = 0
    while pos < len(frames):
        used, _, value = frame.unmarshal(frames[pos:])
        pos += used
        if isinstance(value, header.ContentHeader):
            out.append(pamqp_properties(value.properties))
    return out


def feed_all(reader: Any, data: bytes, cuts: list[int]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    last = 0
    for cut in [*sorted(cuts), len(data)]:
        out += reader.feed(data[last:cut])
        last = cut
    return out


def feed_bytewise(reader: Any, data: bytes) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for i in range(len(data)):
        out += reader.feed(data[i : i + 1])
    return out


FULL_PROPERTIES = commands.Basic.Properties(
    content_type="application/json",
    content_encoding="utf-8",
    headers={
        "x-fastworker-attempts": 3,
        "text": "héllo",
        "nested": {"a": [1, 2, "three"], "b": True},
        "float": 1.5,
        "big": 2**40,
    },
    delivery_mode=2,
    priority=7,
    correlation_id="corr-1",
    reply_to="amq.rabbitmq.reply-to",
    expiration="60000",
    message_id="m-1",
    timestamp=datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
    message_type="OrderPlaced",
    user_id="guest",
    app_id="symfony",
    cluster_id="",
)


def mixed_stream() -> bytes:
    """Deliveries of every shape, interleaved channels, and the rare frames the consumer meets."""
    parts: list[bytes] = []
    parts += deliver_frames(1, b"hello")
    parts += deliver_frames(2, b"", FULL_PROPERTIES, redelivered=True)
    parts += deliver_frames(3, bytes(range(256)) * 40, commands.Basic.Properties(delivery_mode=1))
    parts += deliver_frames(4, b"x" * 10_000, frame_max=4096, routing_key="other", exchange="ex")
    parts.append(frame.marshal(commands.Basic.ConsumeOk(consumer_tag="ctag"), 1))
    parts.append(frame.marshal(Heartbeat(), 0))
    # Channels 1 and 2 interleaved, a heartbeat between body frames of channel 1.
    a = deliver_frames(5, b"A" * 5000, frame_max=4096, consumer_tag="c1")
    b = deliver_frames(6, b"B" * 100, channel=2, consumer_tag="c2")
    parts += [a[0], b[0], a[1], b[1], a[2], frame.marshal(Heartbeat(), 0), b[2], a[3]]
    # A GetOk's content is not a delivery: it comes back raw, frame by frame.
    parts.append(
        frame.marshal(
            commands.Basic.GetOk(delivery_tag=9, exchange="", routing_key="q", message_count=0), 3
        )
    )
    parts.append(frame.marshal(header.ContentHeader(0, 3, commands.Basic.Properties()), 3))
    parts.append(frame.marshal(pbody.ContentBody(b"get"), 3))
    parts.append(frame.marshal(commands.Basic.Cancel(consumer_tag="ctag"), 1))
    parts.append(frame.marshal(commands.Channel.Close(404, "NOT_FOUND - no queue 'x'", 60, 20), 1))
    parts.append(frame.marshal(commands.Connection.Close(320, "CONNECTION_FORCED - bye", 0, 0), 0))
    parts += deliver_frames(2**63 - 1, b"last", consumer_tag="é-tag")  # pamqp's largest
    return b"".join(parts)


# --------------------------------------------------------------------------------------------
# the two implementations


def test_compiled_extension_is_built_and_selected() -> None:
    """`python setup.py build_ext --inplace` must have built it; fastworker.codec must pick it,
    and the fast consumer's connections must use what it picked."""
    compiled = _compiled()
    assert Path(compiled.__file__).suffix in (".so", ".pyd"), compiled.__file__
    assert compiled.__name__ == "fastworker._amqp_codec"
    from fastworker import codec as selector
    from fastworker import fast_consumer

    if os.environ.get("FASTWORKER_NO_EXTENSIONS"):  # the twin is forced; both are still tested
        assert (selector.AMQP_COMPILED, selector.amqp) == (False, amqp_py)
    else:
        assert selector.AMQP_COMPILED is True, "_amqp_codec did not load in fastworker.codec"
        assert selector.amqp is compiled
    assert selector.AMQP_IMPORT_ERROR == ""
    assert fast_consumer.codec is selector.amqp


def test_no_extensions_env_selects_the_twins() -> None:
    import subprocess

    code = (
        "from fastworker import codec as c, fast_consumer as f; "
        "print(c.AMQP_COMPILED, c.FCGI_COMPILED, c.COMPILED, f.codec.__name__, c.fcgi.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(ROOT / "src"), "FASTWORKER_NO_EXTENSIONS": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == [
        "False",
        "False",
        "False",
        "fastworker.amqp_py",
        "fastworker.fcgi_py",
    ]


def test_twins_share_the_exceptions_and_the_result_types(codec: types.ModuleType) -> None:
    """Both twins raise and return amqp_base's classes, not look-alikes of their own."""
    names = ("ProtocolError", "LocalProtocolError", "RemoteProtocolError", "PropertyError")
    for name in (*names, "Delivery", "Frame", "decode_properties"):
        assert getattr(codec, name) is getattr(amqp_base, name)
        assert name in codec.__all__
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(LocalProtocolError, ValueError)  # callers' `except ValueError` holds
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert not issubclass(RemoteProtocolError, ValueError)  # never the caller's mistake
    assert not issubclass(ProtocolError, ValueError)
    assert Delivery._fields == (
        "channel",
        "delivery_tag",
        "redelivered",
        "exchange",
        "routing_key",
        "consumer_tag",
        "properties_raw",
        "body",
        "body_size",
    )
    assert Frame._fields == ("frame_type", "channel", "payload")


def test_property_error_is_not_a_protocol_error(codec: types.ModuleType) -> None:
    """A bad property is one message's fault: it must never look like a corrupt stream."""
    assert not issubclass(PropertyError, ValueError)
    assert not issubclass(PropertyError, ProtocolError)
    with pytest.raises(PropertyError):
        codec.decode_properties(b"\x80\x00\x05ab")


def test_results_are_deliveries_and_frames(codec: types.ModuleType) -> None:
    data = b"".join(deliver_frames(7, b"body", redelivered=True)) + codec.HEARTBEAT
    delivery, heartbeat = codec.FrameReader().feed(data)
    assert type(delivery) is Delivery and type(heartbeat) is Frame
    assert delivery == (1, 7, True, "", "q", "ctag", b"\x00\x00", b"body", 4)
    assert (delivery.delivery_tag, delivery.redelivered, delivery.body) == (7, True, b"body")
    assert delivery._replace(body=None).body is None  # a NamedTuple like any other
    assert (heartbeat.frame_type, heartbeat.channel, heartbeat.payload) == (8, 0, b"")
    assert repr(heartbeat) == "Frame(frame_type=8, channel=0, payload=b'')"


def test_default_max_body_size(codec: types.ModuleType) -> None:
    assert codec.DEFAULT_MAX_BODY_SIZE == 8 * 1024 * 1024
    assert codec.FrameReader().max_body_size == codec.DEFAULT_MAX_BODY_SIZE


def test_constants(codec: types.ModuleType) -> None:
    assert codec.PROTOCOL_HEADER == frame.marshal(header.ProtocolHeader(), 0)
    assert codec.HEARTBEAT == frame.marshal(Heartbeat(), 0)
    assert (codec.FRAME_METHOD, codec.FRAME_HEADER, codec.FRAME_BODY) == (1, 2, 3)
    assert codec.FRAME_HEARTBEAT == 8


# --------------------------------------------------------------------------------------------
# reading


def test_mixed_stream_whole(codec: types.ModuleType) -> None:
    data = mixed_stream()
    reader = codec.FrameReader()
    got = reader.feed(data)
    assert got == expected(data)
    assert reader.buffered == 0
    assert [type(item) for item in got] == [type(item) for item in expected(data)]
    deliveries = [item for item in got if type(item) is Delivery]
    want = header_properties(data)
    del want[-2]  # the GetOk's content header: returned raw, not a delivery
    assert [codec.decode_properties(item[6]) for item in deliveries] == want


def test_mixed_stream_split_at_every_byte(codec: types.ModuleType) -> None:
    data = mixed_stream()
    want = expected(data)
    reader = codec.FrameReader()
    got = feed_bytewise(reader, data)
    assert got == want
    assert [type(item) for item in got] == [type(item) for item in want]
    assert reader.buffered == 0


def test_every_single_split_point(codec: types.ModuleType) -> None:
    """Two chunks, cut at each position: the carried-over frame is completed correctly."""
    data = b"".join(
        deliver_frames(1, b"abc", FULL_PROPERTIES)
        + deliver_frames(2, b"y" * 5000, frame_max=4096)
        + [codec.HEARTBEAT]
    )
    want = expected(data)
    for cut in range(len(data) + 1):
        reader = codec.FrameReader(frame_max=4096)
        assert feed_all(reader, data, [cut]) == want, cut


def test_delivery_fields(codec: types.ModuleType) -> None:
    frames = deliver_frames(
        42,
        b"body",
        FULL_PROPERTIES,
        channel=7,
        consumer_tag="amq.ctag-1",
        exchange="ex",
        routing_key="rk",
        redelivered=True,
    )
    [item] = codec.FrameReader().feed(b"".join(frames))
    channel, tag, redelivered, exchange, routing_key, ctag, raw, body, body_size = item
    assert (channel, tag, redelivered, exchange, routing_key, ctag, body, body_size) == (
        7, 42, True, "ex", "rk", "amq.ctag-1", b"body", 4,
    )  # fmt: skip
    assert type(raw) is bytes and raw == frames[1][7 + 12 : -1]  # from the flags word on
    props, headers = codec.decode_properties(raw)
    assert props == {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "priority": 7,
        "correlation_id": "corr-1",
        "reply_to": "amq.rabbitmq.reply-to",
        "expiration": "60000",
        "message_id": "m-1",
        "timestamp": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
        "message_type": "OrderPlaced",
        "user_id": "guest",
        "app_id": "symfony",
    }
    assert headers["x-fastworker-attempts"] == 3
    assert headers["nested"] == {"a": [1, 2, "three"], "b": True}
    assert headers["text"] == "héllo"


def test_each_decode_gives_fresh_dicts(codec: types.ModuleType) -> None:
    """Message objects own (and the failure handler mutates copies of) these dicts."""
    data = b"".join(deliver_frames(1, b"a", FULL_PROPERTIES) + deliver_frames(2, b"b"))
    first, second = codec.FrameReader().feed(data)
    a, b = codec.decode_properties(first[6]), codec.decode_properties(first[6])
    assert a == b and a[0] is not b[0] and a[1] is not b[1]
    assert codec.decode_properties(second[6]) == ({}, {})


def test_accepts_bytearray_and_memoryview(codec: types.ModuleType) -> None:
    data = mixed_stream()
    want = expected(data)
    assert codec.FrameReader().feed(bytearray(data)) == want
    assert codec.FrameReader().feed(memoryview(data)) == want


def test_body_exactly_one_frame_and_one_byte_more(codec: types.ModuleType) -> None:
    for size in (4096 - 8, 4096 - 7, 2 * (4096 - 8), 2 * (4096 - 8) + 1):
        data = b"".join(deliver_frames(1, b"z" * size, frame_max=4096))
        [item] = codec.FrameReader(frame_max=4096).feed(data)
        assert item[7:] == (b"z" * size, size)


def test_empty_body_frames_are_tolerated(codec: types.ModuleType) -> None:
    frames = deliver_frames(1, b"ab")
    empty = frame.marshal(pbody.ContentBody(b""), 1)
    [item] = codec.FrameReader().feed(b"".join([frames[0], frames[1], empty, frames[2]]))
    assert item[7:] == (b"ab", 2)


def test_invalid_utf8_in_names_is_replaced(codec: types.ModuleType) -> None:
    payload = struct.pack(">HH", 60, 60) + b"\x02\xff\xfe" + struct.pack(">QB", 1, 0)
    payload += b"\x00" + b"\x01q"
    method = struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce"
    rest = deliver_frames(1, b"b")[1:]
    [item] = codec.FrameReader().feed(method + b"".join(rest))
    assert item[5] == "\ufffd\ufffd"


def test_continuation_flag_words_are_skipped(codec: types.ModuleType) -> None:
    """A property-flags word with bit 0 set is followed by another word (none used by Basic)."""
    props = struct.pack(">HH", (1 << 15) | 1, 0) + b"\x04text"
    payload = struct.pack(">HHQ", 60, 0, 1) + props
    hdr = struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"
    frames = deliver_frames(1, b"b")
    [item] = codec.FrameReader().feed(frames[0] + hdr + frames[2])
    assert item[6] == props
    assert codec.decode_properties(item[6]) == ({"content_type": "text"}, {})


def test_frame_max_is_settable_within_limits(codec: types.ModuleType) -> None:
    reader = codec.FrameReader()
    assert reader.frame_max == codec.DEFAULT_FRAME_MAX == 131072
    reader.frame_max = 4096
    assert reader.frame_max == 4096
    for bad in (0, 4095, 2**32):
        with pytest.raises(LocalProtocolError, match="frame_max"):
            reader.frame_max = bad
    with pytest.raises(LocalProtocolError, match="frame_max"):
        codec.FrameReader(frame_max=100)
    with pytest.raises(ValueError, match="max_body_size"):
        codec.FrameReader(max_body_size=-1)


def test_partial_frame_is_bounded_by_frame_max(codec: types.ModuleType) -> None:
    """A frame header announcing more than frame_max fails at once, before buffering its body."""
    reader = codec.FrameReader(frame_max=4096)
    with pytest.raises(codec.RemoteProtocolError, match="exceeds frame_max 4096"):
        reader.feed(struct.pack(">BHI", 3, 1, 4089))
    reader = codec.FrameReader(frame_max=4096)
    assert reader.feed(struct.pack(">BHI", 3, 1, 4088) + b"x" * 100) == []
    assert reader.buffered == 107


# --------------------------------------------------------------------------------------------
# malformed streams: same error, same message, whatever the split


def _hdr(body_size: int, props: bytes = b"\x00\x00", class_id: int = 60) -> bytes:
    payload = struct.pack(">HHQ", class_id, 0, body_size) + props
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


def _raw(ftype: int, channel: int, payload: bytes, end: bytes = b"\xce") -> bytes:
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + end


DELIVER = deliver_frames(1, b"abc")[0]
BODY3 = deliver_frames(1, b"abc")[2]

BAD_STREAMS = [
    (_raw(1, 0, b"\x00\x0a\x00\x0b", end=b"\x00"), r"frame end octet is 0x00, not 0xce"),
    (struct.pack(">BHI", 3, 1, FRAME_MAX), r"frame of 131080 bytes on channel 1 exceeds frame_max"),
    (_raw(4, 2, b""), r"unknown frame type 4 on channel 2"),
    (b"AMQP\x00\x00\x09\x01", r"protocol header instead of a frame"),
    (_raw(8, 0, b"xx"), r"heartbeat frame with a payload of 2 bytes"),
    (_raw(1, 1, b"\x00\x3c"), r"method frame of 2 bytes on channel 1 is too short"),
    (_raw(1, 1, b"\x00\x3c\x00\x3c\x05ab"), r"Basic.Deliver on channel 1 is truncated"),
    (_raw(1, 1, b"\x00\x3c\x00\x3c\x00" + b"\x00" * 9), r"Basic.Deliver on channel 1 is trunc"),
    (_raw(1, 1, b"\x00\x3c\x00\x3c\x00" + b"\x00" * 9 + b"\x00"), r"Deliver on channel 1 is trunc"),
    (DELIVER + DELIVER, r"method frame on channel 1 while a delivery's content is incomplete"),
    (DELIVER + _hdr(3, class_id=50), r"content header of class 50 on channel 1 after Basic.Del"),
    (DELIVER + BODY3, r"body frame on channel 1 before the content header"),
    (DELIVER + _hdr(5) + BODY3 + _hdr(5), r"content header on channel 1 while the body is incomp"),
    (DELIVER + _hdr(2) + BODY3, r"body frames on channel 1 carry more than the 2 bytes announced"),
    (DELIVER + _raw(2, 1, b"\x00\x3c\x00\x00"), r"content header on channel 1 is truncated"),
    (DELIVER + _raw(2, 1, b"\x00\x3c" + b"\x00" * 9), r"content header on channel 1 is truncated"),
    (DELIVER + _hdr(2**40) + DELIVER, r"method frame on channel 1 while a delivery's content is"),
    (
        DELIVER + _hdr(2**40) + BODY3 + _hdr(1),
        r"content header on channel 1 while the body is incomplete",
    ),
]

# Property blocks (properties_raw) that decode_properties must refuse with a PropertyError.
BAD_PROPERTIES = [
    (b"\x80", r"content header properties are truncated \(property flags\)"),
    (b"\x00\x01", r"content header properties are truncated \(property flags\)"),
    (b"\x80\x01\x00", r"truncated \(property flags\)"),
    (b"\x80\x00\x05ab", r"content header properties are truncated \(content_type\)"),
    (b"\x80\x00", r"content header properties are truncated \(content_type\)"),
    (b"\x20\x00\x00\x00\x00\x09ab", r"content header properties are truncated \(headers\)"),
    (b"\x20\x00\x00\x00", r"content header properties are truncated \(headers\)"),
    (b"\x10\x00", r"content header properties are truncated \(delivery_mode\)"),
    (b"\x08\x00", r"content header properties are truncated \(priority\)"),
    (b"\x00\x40\x00\x00", r"content header properties are truncated \(timestamp\)"),
    (b"\x00\x04\x03ab", r"content header properties are truncated \(cluster_id\)"),
    (b"\x00\x40" + struct.pack(">Q", 2**63 - 1), r"timestamp 9223372036854775807 is out of range"),
    (b"\x00\x40" + struct.pack(">Q", 2**64 - 1), r"timestamp 18446744073709551615 is out of rang"),
    (b"\x20\x00\x00\x00\x00\x03\x01aZ", r"headers value of unknown type b'Z'"),
    (b"\x20\x00\x00\x00\x00\x02\x01a", r"headers value of 'a' is missing"),
    (b"\x20\x00\x00\x00\x00\x02\x05a", r"headers table key runs past its table"),
    (b"\x20\x00\x00\x00\x00\x03\x01\xffV", r"headers table key is not valid UTF-8"),
    (b"\x20\x00\x00\x00\x00\x04\x01aI\x00", r"headers value of type 'I' is truncated"),
    (b"\x20\x00\x00\x00\x00\x05\x01aD\x00\x00", r"headers value of type 'D' is truncated"),
    (b"\x20\x00\x00\x00\x00\x05\x01aT\x00\x00", r"headers value of type 'T' is truncated"),
    (b"\x20\x00" + struct.pack(">I", 7) + b"\x01aS\x00\x00\x00\x09", r"type 'S' is truncated"),
    (b"\x20\x00" + struct.pack(">I", 6) + b"\x01aF\x00\x00\x00", r"type 'F' is truncated"),
    (b"\x20\x00" + struct.pack(">I", 7) + b"\x01aA\x00\x00\x00\x01", r"type 'A' is truncated"),
    (b"\x20\x00" + struct.pack(">I", 7) + b"\x01ax\x00\x00\x00\x01", r"type 'x' is truncated"),
    (
        b"\x20\x00" + struct.pack(">I", 11) + b"\x01aT" + struct.pack(">Q", 2**63 - 1),
        r"headers timestamp 9223372036854775807 is out of range",
    ),
]


@pytest.mark.parametrize(("data", "message"), BAD_STREAMS)
def test_malformed_streams(codec: types.ModuleType, data: bytes, message: str) -> None:
    with pytest.raises(codec.RemoteProtocolError, match=message):
        codec.FrameReader().feed(data)
    with pytest.raises(codec.RemoteProtocolError, match=message):
        feed_bytewise(codec.FrameReader(), data)


@pytest.mark.parametrize(("data", "message"), BAD_STREAMS)
def test_malformed_streams_give_identical_messages(data: bytes, message: str) -> None:
    errors = []
    for impl in both():
        with pytest.raises(impl.RemoteProtocolError) as info:
            impl.FrameReader().feed(data)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize(("raw", "message"), BAD_PROPERTIES)
def test_bad_properties_raise_property_error(raw: bytes, message: str) -> None:
    for impl in both():
        with pytest.raises(impl.PropertyError, match=message):
            impl.decode_properties(raw)
        # the delivery itself comes out: the stream is fine, only this message is bad
        data = DELIVER + _raw(2, 1, struct.pack(">HHQ", 60, 0, 3) + raw) + BODY3
        [item] = impl.FrameReader().feed(data)
        assert item[6] == raw and item[7] == b"abc"


def test_decode_properties_of_nothing(codec: types.ModuleType) -> None:
    assert codec.decode_properties(b"") == ({}, {})
    assert codec.decode_properties(b"\x00\x00") == ({}, {})
    assert codec.decode_properties(b"\x00\x00trailing") == ({}, {})
    assert codec.decode_properties(b"\x00\x04\x03abc") == ({}, {})  # cluster_id: dropped
    assert codec.decode_properties(bytearray(b"\x10\x00\x02")) == ({"delivery_mode": 2}, {})
    assert codec.decode_properties(memoryview(b"\x10\x00\x02")) == ({"delivery_mode": 2}, {})
    # a content header without even a flags word: the delivery comes out, no properties
    [item] = codec.FrameReader().feed(DELIVER + _raw(2, 1, struct.pack(">HHQ", 60, 0, 0)))
    assert item[6:] == (b"", b"", 0)
    assert codec.decode_properties(item[6]) == ({}, {})


def test_max_body_size(codec: types.ModuleType) -> None:
    data = b"".join(deliver_frames(1, b"x" * 1000))
    assert codec.FrameReader(max_body_size=1000).feed(data)[0][7:] == (b"x" * 1000, 1000)
    [item] = codec.FrameReader(max_body_size=999).feed(data)
    assert item[:6] == (1, 1, False, "", "q", "ctag")
    assert item[7:] == (None, 1000)
    reader = codec.FrameReader()
    reader.max_body_size = 10
    assert reader.max_body_size == 10
    assert reader.feed(data)[0][7:] == (None, 1000)
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="max_body_size"):
            codec.FrameReader(max_body_size=bad)
    for bad_type in (1.5, "10", True, None):
        with pytest.raises(TypeError, match="max_body_size must be an int"):
            codec.FrameReader(max_body_size=bad_type)
        with pytest.raises(TypeError, match="frame_max must be an int"):
            codec.FrameReader(frame_max=bad_type)


# --------------------------------------------------------------------------------------------
# encoding


def test_delivery_tag_is_unsigned_64_bit(codec: types.ModuleType) -> None:
    """The spec's delivery tag is an unsigned long-long (pamqp decodes it signed)."""
    payload = (
        struct.pack(">HH", 60, 60) + b"\x01c" + struct.pack(">QB", 2**64 - 1, 1) + b"\x00\x01q"
    )
    [item] = codec.FrameReader().feed(_raw(1, 1, payload) + _hdr(0))
    assert item == (1, 2**64 - 1, True, "", "q", "c", b"\x00\x00", b"", 0)
    data = codec.encode_ack(1, 2**64 - 1, True)
    assert data[11:20] == b"\xff" * 8 + b"\x01"


def test_encode_ack(codec: types.ModuleType) -> None:
    for tag in (0, 1, 255, 2**32 + 5, 2**63 - 1):
        for multiple in (False, True):
            data = codec.encode_ack(3, tag, multiple)
            used, channel, method = frame.unmarshal(data)
            assert (used, channel) == (len(data), 3) == (21, 3)
            assert isinstance(method, commands.Basic.Ack)
            assert (method.delivery_tag, method.multiple) == (tag, multiple)


def test_encode_nack(codec: types.ModuleType) -> None:
    for multiple in (False, True):
        for requeue in (False, True):
            data = codec.encode_nack(1, 77, multiple, requeue)
            used, channel, method = frame.unmarshal(data)
            assert isinstance(method, commands.Basic.Nack)
            assert (used, channel, method.delivery_tag) == (21, 1, 77)
            assert (method.multiple, method.requeue) == (multiple, requeue)
    assert codec.encode_nack(1, 5) == frame.marshal(commands.Basic.Nack(5, False, True), 1)


def test_encode_acks_is_one_buffer_of_acks(codec: types.ModuleType) -> None:
    acks = [(5, True), (7, False), (2**63 - 1, False)]
    data = codec.encode_acks(65535, acks)
    assert data == b"".join(codec.encode_ack(65535, t, m) for t, m in acks)
    assert data == b"".join(frame.marshal(commands.Basic.Ack(t, m), 65535) for t, m in acks)
    assert codec.encode_acks(1, []) == b""
    assert codec.encode_acks(1, iter([(1, True)])) == codec.encode_ack(1, 1, True)


@pytest.mark.parametrize("channel", [-1, 65536])
def test_encode_rejects_bad_channel(codec: types.ModuleType, channel: int) -> None:
    for call in (
        lambda: codec.encode_ack(channel, 1),
        lambda: codec.encode_nack(channel, 1),
        lambda: codec.encode_acks(channel, [(1, False)]),
    ):
        with pytest.raises(LocalProtocolError, match="channel .* out of range"):
            call()


@pytest.mark.parametrize("bad", [2.9, 1.0, decimal.Decimal(2), "2", True, None])
def test_encode_rejects_non_int(codec: types.ModuleType, bad: object) -> None:
    """Fuzz finding: the compiled encode_ack(1, 2.9) acked tag 2; now a TypeError in both."""
    for call in (
        lambda: codec.encode_ack(1, bad),
        lambda: codec.encode_nack(1, bad),
        lambda: codec.encode_acks(1, [(1, False), (bad, False)]),
    ):
        with pytest.raises(TypeError, match="delivery tag must be an int"):
            call()
    for call in (
        lambda: codec.encode_ack(bad, 1),
        lambda: codec.encode_nack(bad, 1),
        lambda: codec.encode_acks(bad, [(1, False)]),
    ):
        with pytest.raises(TypeError, match="channel must be an int"):
            call()


def test_encode_accepts_int_subclasses(codec: types.ModuleType) -> None:
    import enum

    class Tag(enum.IntEnum):
        FIVE = 5

    assert codec.encode_ack(Tag.FIVE, Tag.FIVE) == codec.encode_ack(5, 5)


@pytest.mark.parametrize("tag", [-1, 2**64])
def test_encode_rejects_bad_tag(codec: types.ModuleType, tag: int) -> None:
    for call in (
        lambda: codec.encode_ack(1, tag),
        lambda: codec.encode_nack(1, tag),
        lambda: codec.encode_acks(1, [(1, False), (tag, False)]),
    ):
        with pytest.raises(LocalProtocolError, match="delivery tag .* out of range"):
            call()


# --------------------------------------------------------------------------------------------
# hypothesis: round trips through pamqp, random splits, and the twins compared on garbage

_SHORT = st.text(max_size=40).filter(lambda s: len(s.encode()) < 256)
_EXCHANGE = st.text(string.ascii_letters + string.digits + "-_.:@#,/+ ", max_size=40)  # pamqp's
_HEADER_VALUES = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.text(max_size=30),
    st.booleans(),
    st.none(),
)
_PROPS = st.builds(
    commands.Basic.Properties,
    content_type=st.none() | _SHORT,
    content_encoding=st.none() | _SHORT,
    headers=st.none() | st.dictionaries(st.text(min_size=1, max_size=20), _HEADER_VALUES),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(0, 9),
    correlation_id=st.none() | _SHORT,
    reply_to=st.none() | _SHORT,
    expiration=st.none() | _SHORT,
    message_id=st.none() | _SHORT,
    timestamp=st.none()
    | st.datetimes(
        min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(2100, 1, 1)
    ).map(lambda d: d.replace(microsecond=0, tzinfo=datetime.UTC)),
    message_type=st.none() | _SHORT,
    user_id=st.none() | _SHORT,
    app_id=st.none() | _SHORT,
)
_DELIVERY = st.tuples(
    st.integers(0, 2**63 - 1),  # pamqp, the oracle, handles signed long-longs only
    st.binary(max_size=9000),
    _PROPS,
    st.integers(0, 3),  # channel
    _SHORT,
    _EXCHANGE,
    _SHORT,
    st.booleans(),
)


@SETTINGS
@given(
    deliveries=st.lists(_DELIVERY, min_size=1, max_size=6),
    frame_max=st.sampled_from([4096, 5000, 131072]),
    heartbeats=st.lists(st.integers(0, 200), max_size=4),
    seed=st.integers(0, 2**32),
)
def test_round_trip_random_splits(
    deliveries: list[tuple[Any, ...]], frame_max: int, heartbeats: list[int], seed: int
) -> None:
    frames: list[bytes] = []
    for tag, body, props, channel, ctag, exchange, rk, redelivered in deliveries:
        frames += deliver_frames(
            tag,
            body,
            props,
            channel=channel,
            consumer_tag=ctag,
            exchange=exchange,
            routing_key=rk,
            redelivered=redelivered,
            frame_max=frame_max,
        )
    for position in heartbeats:
        frames.insert(min(position, len(frames)), frame.marshal(Heartbeat(), 0))
    data = b"".join(frames)
    want = expected(data)
    assert sum(type(item) is Delivery for item in want) == len(deliveries)
    rng = random.Random(seed)
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(0, 12)))
    props = header_properties(data)
    for impl in both():
        got = feed_all(impl.FrameReader(frame_max=frame_max), data, cuts)
        assert got == want
        assert [type(item) for item in got] == [type(item) for item in want]
        assert impl.FrameReader(frame_max=frame_max).feed(data) == want
        assert [impl.decode_properties(i.properties_raw) for i in got if type(i) is Delivery] == (
            props
        )


_GARBAGE_FRAME = st.tuples(
    st.sampled_from([1, 1, 1, 2, 2, 3, 3, 8, 0, 9]),
    st.integers(0, 2),
    st.one_of(
        st.binary(max_size=60),
        st.just(DELIVER[7:-1]),
        st.builds(lambda b: _hdr(len(b))[7:-1], st.binary(max_size=10)),
        st.builds(lambda p: _hdr(3, p)[7:-1], st.binary(max_size=30)),
    ),
    st.sampled_from([b"\xce"] * 9 + [b"\x00"]),
)


@SETTINGS
@given(frames=st.lists(_GARBAGE_FRAME, max_size=12), seed=st.integers(0, 2**32))
def test_twins_agree_on_garbage(frames: list[tuple[int, int, bytes, bytes]], seed: int) -> None:
    data = b"".join(_raw(t, c, p, e) for t, c, p, e in frames)
    rng = random.Random(seed)
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(0, 6)))
    results = []
    for impl in both():
        reader = impl.FrameReader(frame_max=4096)
        try:
            items = feed_all(reader, data, cuts)
            results.append(("ok", items, [type(i) for i in items], reader.buffered))
        except impl.RemoteProtocolError as exc:
            results.append(("error", type(exc), str(exc)))
    assert results[0] == results[1]


# --------------------------------------------------------------------------------------------
# regressions: the findings of the differential fuzz (issue 8), each failed before the fix


def _nested_headers(depth: int, kind: bytes = b"F") -> bytes:
    """A property block whose headers table (level 1) nests tables or arrays `depth` levels."""
    content = b""
    for _ in range(depth - 2):
        content = (
            (b"\x01k" if kind == b"F" else b"") + kind + struct.pack(">I", len(content)) + content
        )
    if depth >= 2:
        content = b"\x01k" + kind + struct.pack(">I", len(content)) + content
    return b"\x20\x00" + struct.pack(">I", len(content)) + content


def _delivery_with(raw_properties: bytes, body: bytes = b"abc", channel: int = 1) -> bytes:
    hdr = struct.pack(">HHQ", 60, 0, len(body)) + raw_properties
    return (
        _raw(1, channel, DELIVER[7:-1])
        + _raw(2, channel, hdr)
        + (_raw(3, channel, body) if body else b"")
    )


def test_timestamp_out_of_range_is_a_bad_message_not_a_bad_stream(codec: types.ModuleType) -> None:
    """Was: a bare ValueError out of feed(), taken for a corrupt stream: reconnect, forever."""
    raw = b"\x00\x40" + struct.pack(">Q", 2**63 - 1)
    data = _delivery_with(raw) + b"".join(deliver_frames(2, b"next"))
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        reader = codec.FrameReader()
        first, second = [item for chunk in chunks for item in reader.feed(chunk)]
        assert first[6] == raw and first[7:] == (b"abc", 3)
        assert second[1] == 2 and second[7] == b"next"
    with pytest.raises(
        codec.PropertyError, match="^timestamp 9223372036854775807 is out of range$"
    ):
        codec.decode_properties(raw)
    # pamqp's millisecond heuristic still applies within range
    ms = int(datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC).timestamp()) * 1000
    got = codec.decode_properties(b"\x00\x40" + struct.pack(">Q", ms))[0]["timestamp"]
    assert got == datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC)


@pytest.mark.parametrize("kind", [b"F", b"A"])
def test_deeply_nested_headers_are_a_bad_message(codec: types.ModuleType, kind: bytes) -> None:
    """Was: RecursionError out of feed() at ~500 levels (at a different depth in each twin)."""
    for depth in (495, 497, 499, 600):
        raw = _nested_headers(depth, kind)
        [item] = codec.FrameReader(frame_max=8192).feed(_delivery_with(raw))
        assert item[6] == raw and item[7] == b"abc"
        with pytest.raises(
            codec.PropertyError, match="^headers table nested deeper than 32 levels$"
        ):
            codec.decode_properties(raw)
    limit = codec.MAX_TABLE_DEPTH
    assert limit == 32
    ok = codec.decode_properties(_nested_headers(limit, kind))[1]  # as deep as allowed
    assert ok == pamqp_decode.field_table(_nested_headers(limit, kind)[2:])[1]
    with pytest.raises(codec.PropertyError, match="nested deeper than 32 levels"):
        codec.decode_properties(_nested_headers(limit + 1, kind))


def test_decode_properties_is_linear_in_the_table_size(codec: types.ModuleType) -> None:
    """pamqp slices the rest of the table per value (quadratic): 64K voids would take seconds."""
    import time

    items = b"V" * 120_000
    raw = (
        b"\x20\x00" + struct.pack(">I", 7 + len(items)) + b"\x01aA" + struct.pack(">I", len(items))
    )
    raw += items
    started = time.perf_counter()
    headers = codec.decode_properties(raw)[1]
    assert headers == {"a": [None] * 120_000}
    assert time.perf_counter() - started < 2.0


POST_ERROR_CASES = [
    # (chunks fed one by one: the last one raises), then what must raise again
    ([b"\x01\x00", b"\x00\xff\xff\xff\xff"], "frame of 4294967303 bytes on channel 0 exceeds"),
    ([b"\x01\x00\x00\x00\x00\x00\x04\x00\x0a\x00\x0b\x00"], "frame end octet is 0x00, not 0xce"),
    ([b"\x41\x00", b"\x01\x00\x00\x00\x00"], "unknown frame type 65 on channel 1"),
    ([DELIVER + DELIVER], "method frame on channel 1 while a delivery's content is incomplete"),
]


@pytest.mark.parametrize(("chunks", "message"), POST_ERROR_CASES)
def test_reader_is_unusable_after_an_error(
    codec: types.ModuleType, chunks: list[bytes], message: str
) -> None:
    """Was: the compiled reader went on after an error (reserving 4 GiB, passing bad frames)."""
    reader = codec.FrameReader()
    for chunk in chunks[:-1]:
        assert reader.feed(chunk) == []
    with pytest.raises(codec.RemoteProtocolError, match=message) as first:
        reader.feed(chunks[-1])
    for later in (b"x", codec.HEARTBEAT, b"\xce", b"", bytearray(codec.HEARTBEAT), DELIVER):
        with pytest.raises(codec.RemoteProtocolError) as again:
            reader.feed(later)
        assert str(again.value) == f"reader is unusable after an earlier error: {first.value}"
    assert reader.buffered < 4096


@pytest.mark.parametrize(("data", "message"), BAD_STREAMS)
def test_every_malformed_stream_breaks_the_reader_in_both_twins(data: bytes, message: str) -> None:
    errors = []
    for impl in both():
        reader = impl.FrameReader()
        with pytest.raises(impl.RemoteProtocolError, match=message):
            feed_bytewise(reader, data)
        with pytest.raises(impl.RemoteProtocolError) as info:
            reader.feed(impl.HEARTBEAT)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert errors[0].startswith("reader is unusable after an earlier error: ")


def _traced_peak(call: Any) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_no_allocation_ahead_of_the_body(codec: types.ModuleType) -> None:
    """Was: the compiled reader reserved the announced body on its first partial frame:
    236 input bytes over 4 channels asked for 2 GiB."""
    data = b"".join(
        _raw(1, ch, DELIVER[7:-1])
        + _raw(2, ch, struct.pack(">HHQ", 60, 0, 512 * 1024 * 1024) + b"\x00\x00")
        + _raw(3, ch, b"x")
        for ch in range(1, 5)
    )
    assert len(data) < 300
    reader = codec.FrameReader(max_body_size=1024**3)  # buffered, not skipped
    peak = _traced_peak(lambda: reader.feed(data))
    assert peak < 256 * 1024, peak
    # many frames of a multi-frame body: memory follows what arrived
    reader = codec.FrameReader(frame_max=4096, max_body_size=1024**3)
    reader.feed(data[: len(data) // 4 - len(_raw(3, 1, b"x"))])
    chunk = _raw(3, 1, b"y" * 4088)
    peak = _traced_peak(lambda: [reader.feed(chunk) for _ in range(64)])
    assert peak < 64 * 4096 * 2 + 256 * 1024, peak


def test_no_allocation_ahead_of_a_partial_frame(codec: types.ModuleType) -> None:
    """A frame header announcing ~4 GiB (allowed by frame_max) reserves only what arrived."""
    reader = codec.FrameReader(frame_max=0xFFFFFFFF)
    head = struct.pack(">BHI", 3, 1, 0xFFFFFFFF - 8) + b"z" * 100
    peak = _traced_peak(lambda: (reader.feed(head[:3]), reader.feed(head[3:])))
    assert reader.buffered == len(head)
    assert peak < 64 * 1024, peak
    peak = _traced_peak(lambda: reader.feed(b"z" * 100_000))
    assert reader.buffered == len(head) + 100_000
    assert peak < 1024 * 1024, peak


def test_oversize_body_is_skipped_and_the_stream_stays_usable(codec: types.ModuleType) -> None:
    """Was: body_size over the limit was a stream error: the connection dropped, and the
    message came back on the next connection, forever. Now: emitted with body None."""
    big = deliver_frames(1, b"B" * 10_000, FULL_PROPERTIES, frame_max=4096)
    small = deliver_frames(2, b"small", frame_max=4096)
    data = b"".join(big + [codec.HEARTBEAT] + small)
    for cuts in ([], list(range(1, len(data))), [5, 4100, 4200, 9000]):
        reader = codec.FrameReader(frame_max=4096, max_body_size=9_999)
        got = feed_all(reader, data, cuts)
        assert len(got) == 3
        assert got[0][:7] == (1, 1, False, "", "q", "ctag", big[1][7 + 12 : -1])
        assert got[0][7:] == (None, 10_000)
        assert got[1] == (8, 0, b"")
        assert got[2][1] == 2 and got[2][7:] == (b"small", 5)
        assert reader.buffered == 0
    # the limit is inclusive, and the skipped body is never buffered
    assert codec.FrameReader(frame_max=4096, max_body_size=10_000).feed(data)[0][7] == b"B" * 10_000
    reader = codec.FrameReader(frame_max=131072, max_body_size=1000)
    frames = deliver_frames(3, b"", frame_max=131072)[:1] + [
        frame.marshal(header.ContentHeader(0, 64 * (131072 - 8), commands.Basic.Properties()), 1)
    ]
    assert reader.feed(b"".join(frames)) == []
    chunk = frame.marshal(pbody.ContentBody(b"c" * (131072 - 8)), 1)
    out: list[Any] = []
    peak = _traced_peak(lambda: [out.extend(reader.feed(chunk)) for _ in range(64)])
    assert peak < 1024 * 1024, peak  # 64 frames: 8 MiB if they were kept
    assert [item[7:] for item in out] == [(None, 64 * (131072 - 8))]


def test_oversize_body_may_not_overrun_its_announced_size(codec: types.ModuleType) -> None:
    errors = []
    for impl in both():
        with pytest.raises(impl.RemoteProtocolError) as info:
            impl.FrameReader(max_body_size=0).feed(DELIVER + _hdr(2) + BODY3)
        errors.append(str(info.value))
    assert (
        errors[0] == errors[1] == "body frames on channel 1 carry more than the 2 bytes announced"
    )


def test_body_size_beyond_63_bits(codec: types.ModuleType) -> None:
    """An absurd announced size is just skipped: it never completes, but nothing is reserved."""
    reader = codec.FrameReader()
    assert reader.feed(DELIVER + _hdr(2**64 - 1) + BODY3) == []
    with pytest.raises(codec.RemoteProtocolError, match="while a delivery's content is incomplete"):
        reader.feed(DELIVER)
