"""AMQP frame codec tests: every vector runs through the compiled `amqp_codec` and the Python twin.

Streams are built with pamqp (`pamqp.frame.marshal` of `pamqp.commands` objects), the library
aiormq and the broker-facing code already trust, so the expected deliveries come from pamqp's own
decoding, not from the code under test. Streams are fed whole, split at every byte boundary and
split at random points; hypothesis also compares the two implementations on garbage: same
results, or the same error with the same message.
"""

from __future__ import annotations

import datetime
import random
import string
import struct
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import body as pbody
from pamqp import commands, frame, header
from pamqp.heartbeat import Heartbeat

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # a source checkout need not be installed to be tested
    sys.path.insert(0, str(ROOT / "src"))

from fastworker import amqp_py  # noqa: E402

try:
    import amqp_codec  # noqa: E402

    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # reported by the tests below, not hidden by a skip
    amqp_codec = None  # type: ignore[assignment]
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
    if amqp_codec is None:
        pytest.fail(f"the compiled codec `amqp_codec` cannot be imported: {_IMPORT_ERROR}")
    return amqp_codec


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
            out.append((8, channel, b""))
        else:
            out.append((ftype, channel, raw))
    return out


def _delivery(channel: int, p: dict[str, Any], body: bytes) -> tuple[Any, ...]:
    d, props = p["deliver"], p["header"].properties
    return (
        channel,
        d.delivery_tag,
        bool(d.redelivered),
        d.exchange,
        d.routing_key,
        d.consumer_tag,
        {n: v for n in PROPERTY_NAMES if (v := getattr(props, n, None)) is not None},
        dict(props.headers or {}),
        body,
    )


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
    """`python setup.py build_ext --inplace` must have built it; the consumer must pick it."""
    _compiled()
    from fastworker import fast_consumer

    assert fast_consumer.COMPILED
    assert fast_consumer.codec is amqp_codec


def test_no_extensions_env_selects_the_twin() -> None:
    import subprocess

    code = "from fastworker import fast_consumer as f; print(f.COMPILED, f.codec.__name__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(ROOT / "src"), "FASTWORKER_NO_EXTENSIONS": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["False", "fastworker.amqp_py"]


def test_frame_error_is_a_value_error(codec: types.ModuleType) -> None:
    assert issubclass(codec.AMQPFrameError, ValueError)


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
    assert reader.feed(data) == expected(data)
    assert reader.buffered == 0


def test_mixed_stream_split_at_every_byte(codec: types.ModuleType) -> None:
    data = mixed_stream()
    want = expected(data)
    reader = codec.FrameReader()
    assert feed_bytewise(reader, data) == want
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
    data = b"".join(
        deliver_frames(
            42,
            b"body",
            FULL_PROPERTIES,
            channel=7,
            consumer_tag="amq.ctag-1",
            exchange="ex",
            routing_key="rk",
            redelivered=True,
        )
    )
    [item] = codec.FrameReader().feed(data)
    channel, tag, redelivered, exchange, routing_key, ctag, props, headers, body = item
    assert (channel, tag, redelivered, exchange, routing_key, ctag, body) == (
        7, 42, True, "ex", "rk", "amq.ctag-1", b"body",
    )  # fmt: skip
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


def test_each_delivery_gets_fresh_dicts(codec: types.ModuleType) -> None:
    """Message objects own (and the failure handler mutates copies of) these dicts."""
    data = b"".join(deliver_frames(1, b"a") + deliver_frames(2, b"b"))
    first, second = codec.FrameReader().feed(data)
    assert first[6] is not second[6] and first[7] is not second[7]


def test_accepts_bytearray_and_memoryview(codec: types.ModuleType) -> None:
    data = mixed_stream()
    want = expected(data)
    assert codec.FrameReader().feed(bytearray(data)) == want
    assert codec.FrameReader().feed(memoryview(data)) == want


def test_body_exactly_one_frame_and_one_byte_more(codec: types.ModuleType) -> None:
    for size in (4096 - 8, 4096 - 7, 2 * (4096 - 8), 2 * (4096 - 8) + 1):
        data = b"".join(deliver_frames(1, b"z" * size, frame_max=4096))
        [item] = codec.FrameReader(frame_max=4096).feed(data)
        assert item[8] == b"z" * size


def test_empty_body_frames_are_tolerated(codec: types.ModuleType) -> None:
    frames = deliver_frames(1, b"ab")
    empty = frame.marshal(pbody.ContentBody(b""), 1)
    [item] = codec.FrameReader().feed(b"".join([frames[0], frames[1], empty, frames[2]]))
    assert item[8] == b"ab"


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
    assert item[6] == {"content_type": "text"}


def test_frame_max_is_settable_within_limits(codec: types.ModuleType) -> None:
    reader = codec.FrameReader()
    assert reader.frame_max == codec.DEFAULT_FRAME_MAX == 131072
    reader.frame_max = 4096
    assert reader.frame_max == 4096
    for bad in (0, 4095, 2**32):
        with pytest.raises(ValueError, match="frame_max"):
            reader.frame_max = bad
    with pytest.raises(ValueError, match="frame_max"):
        codec.FrameReader(frame_max=100)
    with pytest.raises(ValueError, match="max_body_size"):
        codec.FrameReader(max_body_size=-1)


def test_partial_frame_is_bounded_by_frame_max(codec: types.ModuleType) -> None:
    """A frame header announcing more than frame_max fails at once, before buffering its body."""
    reader = codec.FrameReader(frame_max=4096)
    with pytest.raises(codec.AMQPFrameError, match="exceeds frame_max 4096"):
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
    (DELIVER + _hdr(2**40), r"delivery of 1099511627776 bytes on channel 1 exceeds max_body_size"),
    (DELIVER + _raw(2, 1, b"\x00\x3c\x00\x00"), r"content header on channel 1 is truncated"),
    (DELIVER + _hdr(1, b"\x80\x00\x05ab"), r"content header on channel 1 is truncated"),
    (DELIVER + _hdr(1, b"\x20\x00\x00\x00\x00\x09ab"), r"content header on channel 1 is truncated"),
    (DELIVER + _hdr(1, b"\x10\x00"), r"content header on channel 1 is truncated"),
    (DELIVER + _hdr(1, b"\x00\x40\x00\x00"), r"content header on channel 1 is truncated"),
    (DELIVER + _hdr(1, b"\x00\x01"), r"content header on channel 1 is truncated"),
    (
        DELIVER + _hdr(1, b"\x20\x00\x00\x00\x00\x03\x01aZ"),
        r"content header on channel 1 has a bad headers table",
    ),
]


@pytest.mark.parametrize(("data", "message"), BAD_STREAMS)
def test_malformed_streams(codec: types.ModuleType, data: bytes, message: str) -> None:
    with pytest.raises(codec.AMQPFrameError, match=message):
        codec.FrameReader().feed(data)
    with pytest.raises(codec.AMQPFrameError, match=message):
        feed_bytewise(codec.FrameReader(), data)


@pytest.mark.parametrize(("data", "message"), BAD_STREAMS)
def test_malformed_streams_give_identical_messages(data: bytes, message: str) -> None:
    errors = []
    for impl in both():
        with pytest.raises(impl.AMQPFrameError) as info:
            impl.FrameReader().feed(data)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_max_body_size(codec: types.ModuleType) -> None:
    data = b"".join(deliver_frames(1, b"x" * 1000))
    assert codec.FrameReader(max_body_size=1000).feed(data)[0][8] == b"x" * 1000
    with pytest.raises(codec.AMQPFrameError, match="exceeds max_body_size 999"):
        codec.FrameReader(max_body_size=999).feed(data)


# --------------------------------------------------------------------------------------------
# encoding


def test_delivery_tag_is_unsigned_64_bit(codec: types.ModuleType) -> None:
    """The spec's delivery tag is an unsigned long-long (pamqp decodes it signed)."""
    payload = (
        struct.pack(">HH", 60, 60) + b"\x01c" + struct.pack(">QB", 2**64 - 1, 1) + b"\x00\x01q"
    )
    [item] = codec.FrameReader().feed(_raw(1, 1, payload) + _hdr(0))
    assert item[:6] == (1, 2**64 - 1, True, "", "q", "c")
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
        with pytest.raises(ValueError, match="channel .* out of range"):
            call()


@pytest.mark.parametrize("tag", [-1, 2**64])
def test_encode_rejects_bad_tag(codec: types.ModuleType, tag: int) -> None:
    for call in (
        lambda: codec.encode_ack(1, tag),
        lambda: codec.encode_nack(1, tag),
        lambda: codec.encode_acks(1, [(1, False), (tag, False)]),
    ):
        with pytest.raises(ValueError, match="delivery tag .* out of range"):
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
    assert sum(len(item) == 9 for item in want) == len(deliveries)
    rng = random.Random(seed)
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(0, 12)))
    for impl in both():
        assert feed_all(impl.FrameReader(frame_max=frame_max), data, cuts) == want
        assert impl.FrameReader(frame_max=frame_max).feed(data) == want


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
            results.append(("ok", feed_all(reader, data, cuts), reader.buffered))
        except impl.AMQPFrameError as exc:
            results.append(("error", str(exc)))
    assert results[0] == results[1]
