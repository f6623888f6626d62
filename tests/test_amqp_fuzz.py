"""Differential fuzz of the AMQP reader twins (compiled `_amqp_codec`, pure-Python `amqp_py`).

Every stream is fed, with the same split points and buffer types, to both twins in-process.
The contract checked for ANY input: both return the same items of the same types (`Delivery`,
`Frame`), or both raise the same RemoteProtocolError with the same message (nothing else escapes
`feed`); `buffered` stays below frame_max; after an error
every later feed raises again, in both. `decode_properties` gives pamqp's values for well-formed
property blocks and raises only PropertyError for anything else. See also the regression tests
at the end of tests/test_amqp_codec.py; bench/fuzz_amqp_atheris.py is a longer, opt-in run.
"""

from __future__ import annotations

import datetime
import struct
import sys
import tracemalloc
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands, frame, header
from pamqp import decode as pamqp_decode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # a source checkout need not be installed to be tested
    sys.path.insert(0, str(ROOT / "src"))

from fastworker import amqp_py  # noqa: E402
from fastworker.amqp_base import Delivery, RemoteProtocolError  # noqa: E402
from fastworker.message import PROPERTY_NAMES  # noqa: E402

try:
    from fastworker import _amqp_codec  # type: ignore[attr-defined]  # noqa: E402
except ImportError:  # tests/test_amqp_codec.py reports a missing build; nothing to compare here
    _amqp_codec = None

pytestmark = pytest.mark.skipif(_amqp_codec is None, reason="fastworker._amqp_codec is not built")

FUZZ = settings(
    deadline=None,
    max_examples=400,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
UNUSABLE = "reader is unusable after an earlier error: "


def twins() -> tuple[types.ModuleType, types.ModuleType]:
    assert _amqp_codec is not None
    return _amqp_codec, amqp_py


def raw_frame(ftype: int, channel: int, payload: bytes, end: bytes = b"\xce") -> bytes:
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + end


def deliver(channel: int, tag: int, ctag: bytes = b"ctag", rk: bytes = b"q") -> bytes:
    payload = b"\x00\x3c\x00\x3c" + bytes([len(ctag)]) + ctag + struct.pack(">QB", tag, tag & 1)
    return raw_frame(1, channel, payload + b"\x00" + bytes([len(rk)]) + rk)


def content_header(channel: int, body_size: int, props: bytes = b"\x00\x00") -> bytes:
    return raw_frame(2, channel, struct.pack(">HHQ", 60, 0, body_size) + props)


def as_type(chunk: bytes, kind: int) -> bytes | bytearray | memoryview:
    if kind == 1:
        return bytearray(chunk)
    if kind == 2:
        return memoryview(b"\x00" + chunk + b"\x00")[1:-1]  # a view into a larger buffer
    return chunk


def run(
    impl: types.ModuleType,
    data: bytes,
    cuts: list[int],
    kinds: list[int],
    frame_max: int,
    max_body: int,
    after: bytes,
) -> tuple[Any, ...]:
    """Feeds `data` split at `cuts`; returns ('ok', items, their types, buffered) or
    ('error', the error's type, its message)."""
    reader = impl.FrameReader(frame_max=frame_max, max_body_size=max_body)
    items: list[Any] = []
    bounds = [0, *sorted(cuts), len(data)]
    for i in range(len(bounds) - 1):
        chunk = as_type(data[bounds[i] : bounds[i + 1]], kinds[i % len(kinds)])
        try:
            items += reader.feed(chunk)
        except RemoteProtocolError as exc:
            first = str(exc)
            assert not first.startswith(UNUSABLE)
            again = []
            for later in (after, b"", impl.HEARTBEAT):
                with pytest.raises(RemoteProtocolError) as info:
                    reader.feed(later)
                assert type(info.value) is RemoteProtocolError
                again.append(str(info.value))
            assert again == [UNUSABLE + first] * 3
            return ("error", type(exc), first)
        # Anything else (RecursionError, MemoryError, struct.error, ...) fails the test here.
        assert 0 <= reader.buffered < frame_max
    return ("ok", items, [type(item) for item in items], reader.buffered)


def compare(data: bytes, cuts: list[int], kinds: list[int], frame_max: int, max_body: int) -> Any:
    results = [run(impl, data, cuts, kinds, frame_max, max_body, b"x") for impl in twins()]
    assert results[0] == results[1]
    if results[0][0] == "ok":
        for item in results[0][1]:
            if type(item) is Delivery:
                check_delivery(item, max_body)
    return results[0]


def check_delivery(item: Delivery, max_body: int) -> None:
    _, tag, redelivered, exchange, rk, ctag, raw, body, body_size = item
    assert type(raw) is bytes and type(body_size) is int
    assert (body is None) == (body_size > max_body)
    assert body is None or (type(body) is bytes and len(body) == body_size)
    try:
        props, headers = amqp_py.decode_properties(raw)
    except amqp_py.PropertyError:
        return
    assert type(props) is dict and type(headers) is dict


# --------------------------------------------------------------------------------------------
# streams: arbitrary bytes, plausible frames, and well-formed deliveries with mutations

_SPLIT = st.tuples(
    st.lists(st.integers(0, 100_000), max_size=8),
    st.lists(st.integers(0, 2), min_size=1, max_size=4),
)
_FRAME_MAX = st.sampled_from([4096, 4096, 5000, 131072])
_MAX_BODY = st.sampled_from([0, 3, 100, 5000, amqp_py.DEFAULT_MAX_BODY_SIZE])


def _cuts(data: bytes, split: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    raw_cuts, kinds = split
    return [c % (len(data) + 1) for c in raw_cuts], kinds


@FUZZ
@given(data=st.binary(max_size=400), split=_SPLIT, frame_max=_FRAME_MAX, max_body=_MAX_BODY)
def test_arbitrary_bytes(
    data: bytes, split: tuple[list[int], list[int]], frame_max: int, max_body: int
) -> None:
    compare(data, *_cuts(data, split), frame_max, max_body)


_PROPS_BLOCK = st.one_of(
    st.just(b"\x00\x00"),
    st.just(b""),
    st.binary(max_size=40),
    st.builds(lambda b: b"\x20\x00" + struct.pack(">I", len(b)) + b, st.binary(max_size=30)),
    st.builds(lambda b: b"\x00\x40" + b, st.binary(min_size=8, max_size=8)),
)
_FRAME = st.one_of(
    st.builds(deliver, st.integers(0, 2), st.integers(0, 2**64 - 1)),
    st.builds(
        content_header,
        st.integers(0, 2),
        st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1)),
        _PROPS_BLOCK,
    ),
    st.builds(lambda c, b: raw_frame(3, c, b), st.integers(0, 2), st.binary(max_size=300)),
    st.builds(
        raw_frame,
        st.sampled_from([1, 1, 2, 3, 8, 0, 9, 65]),
        st.integers(0, 2),
        st.binary(max_size=40),
        st.sampled_from([b"\xce"] * 15 + [b"\x00"]),
    ),
    st.just(amqp_py.HEARTBEAT),
)


@FUZZ
@given(
    frames=st.lists(_FRAME, max_size=14),
    split=_SPLIT,
    frame_max=_FRAME_MAX,
    max_body=_MAX_BODY,
)
def test_plausible_frames(
    frames: list[bytes], split: tuple[list[int], list[int]], frame_max: int, max_body: int
) -> None:
    data = b"".join(frames)
    compare(data, *_cuts(data, split), frame_max, max_body)


def _delivery(channel: int, tag: int, body: bytes, props: bytes, frame_max: int) -> bytes:
    step = frame_max - 8
    bodies = b"".join(raw_frame(3, channel, body[i : i + step]) for i in range(0, len(body), step))
    return deliver(channel, tag) + content_header(channel, len(body), props) + bodies


_DELIVERY = st.tuples(
    st.integers(0, 3),
    st.integers(0, 2**64 - 1),
    st.one_of(st.binary(max_size=40), st.binary(min_size=4000, max_size=9000)),
    _PROPS_BLOCK,
)
_MUTATION = st.tuples(st.integers(0, 2**32), st.integers(0, 255), st.sampled_from("fdi"))


@FUZZ
@given(
    deliveries=st.lists(_DELIVERY, min_size=1, max_size=5),
    mutations=st.lists(_MUTATION, max_size=3),
    split=_SPLIT,
    frame_max=st.sampled_from([4096, 5000]),
    max_body=_MAX_BODY,
)
def test_mutated_deliveries(
    deliveries: list[tuple[int, int, bytes, bytes]],
    mutations: list[tuple[int, int, str]],
    split: tuple[list[int], list[int]],
    frame_max: int,
    max_body: int,
) -> None:
    data = bytearray(b"".join(_delivery(c, t, b, p, frame_max) for c, t, b, p in deliveries))
    for where, byte, how in mutations:
        i = where % (len(data) + 1)
        if how == "f" and i < len(data):
            data[i] = byte  # flip
        elif how == "d":
            del data[i : i + 1 + byte % 8]
        else:
            data[i:i] = bytes([byte])
    blob = bytes(data)
    result = compare(blob, *_cuts(blob, split), frame_max, max_body)
    if not mutations:
        assert result[0] == "ok"
        got = [item for item in result[1] if type(item) is Delivery]
        assert [(item.delivery_tag, item.properties_raw) for item in got] == [
            (t, p) for _, t, _, p in deliveries
        ]
        bodies = [body if len(body) <= max_body else None for _, _, body, _ in deliveries]
        assert [item.body for item in got] == bodies


# --------------------------------------------------------------------------------------------
# memory: nothing is reserved ahead of the data


@settings(deadline=None, max_examples=60)
@given(
    sizes=st.lists(st.integers(1, 2**64 - 1), min_size=1, max_size=4),
    max_body=st.sampled_from([0, 2**40, 2**64 - 1]),
    tail=st.integers(0, 60),
)
def test_announced_sizes_reserve_nothing(sizes: list[int], max_body: int, tail: int) -> None:
    """Big announced bodies and frames: memory follows the few bytes that arrived."""
    data = b"".join(
        deliver(ch, 1) + content_header(ch, size) + raw_frame(3, ch, b"x")
        for ch, size in enumerate(sizes)
    )
    data += struct.pack(">BHI", 3, 9, 0xFFFFFFFF - 8) + b"y" * tail  # a ~4 GiB frame begins
    for impl in twins():
        reader = impl.FrameReader(frame_max=0xFFFFFFFF, max_body_size=max_body)
        tracemalloc.start()
        try:
            reader.feed(data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 256 * 1024, (impl.__name__, peak)
        assert reader.buffered == 7 + tail


# --------------------------------------------------------------------------------------------
# decode_properties: pamqp's values when well formed, only PropertyError otherwise

_KEY = st.text(max_size=12).map(str.encode).filter(lambda k: len(k) < 256)


def _u32(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


_TIMESTAMP = st.one_of(
    st.integers(0, 2**32 - 1),  # seconds
    st.integers(2**32, 253402300799000),  # milliseconds, up to year 9999
    st.integers(0, 2**64 - 1),  # anything: out of range raises
).map(lambda v: b"T" + struct.pack(">Q", v))
_SCALAR = st.one_of(
    st.builds(lambda b: b"t" + b, st.binary(min_size=1, max_size=1)),
    st.builds(lambda k, b: k + b, st.sampled_from([b"b", b"B"]), st.binary(min_size=1, max_size=1)),
    st.builds(lambda k, b: k + b, st.sampled_from([b"s", b"u"]), st.binary(min_size=2, max_size=2)),
    st.builds(
        lambda k, b: k + b, st.sampled_from([b"I", b"i", b"f"]), st.binary(min_size=4, max_size=4)
    ),
    st.builds(
        lambda k, b: k + b, st.sampled_from([b"l", b"L", b"d"]), st.binary(min_size=8, max_size=8)
    ),
    st.builds(lambda b: b"D" + b, st.binary(min_size=5, max_size=5)),
    st.builds(
        lambda b: b"S" + _u32(b), st.binary(max_size=20) | st.text(max_size=10).map(str.encode)
    ),
    st.builds(lambda b: b"x" + _u32(b), st.binary(max_size=20)),
    st.sampled_from([b"V", b"\x00"]),
    _TIMESTAMP,
)


def _table(entries: list[tuple[bytes, bytes]]) -> bytes:
    return _u32(b"".join(bytes([len(k)]) + k + v for k, v in entries))


_VALUE = st.recursive(
    _SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda vs: b"A" + _u32(b"".join(vs))),
        st.lists(st.tuples(_KEY, inner), max_size=4).map(lambda es: b"F" + _table(es)),
    ),
    max_leaves=12,
)
_HEADERS = st.lists(st.tuples(_KEY, _VALUE), max_size=6).map(_table)


def _pamqp_or_error(call: Any) -> tuple[str, str]:
    try:
        return ("ok", repr(call()))  # repr: NaN floats compare equal this way
    except Exception as exc:  # noqa: BLE001 - pamqp raises many types; any means "refuse"
        return ("error", type(exc).__name__)


def _ours_or_error(call: Any) -> tuple[str, str]:
    try:
        return ("ok", repr(call()))
    except amqp_py.PropertyError:
        return ("error", "PropertyError")


@FUZZ
@given(table=_HEADERS)
def test_well_formed_headers_decode_like_pamqp(table: bytes) -> None:
    want = _pamqp_or_error(lambda: dict(pamqp_decode.field_table(table)[1]))
    got = _ours_or_error(lambda: amqp_py.decode_properties(b"\x20\x00" + table)[1])
    if want[0] == "error":  # pamqp refuses only an out-of-range timestamp here
        assert got == ("error", "PropertyError")
    else:
        assert got == want


_SHORT = st.text(max_size=20).filter(lambda s: len(s.encode()) < 256)
_PROPERTIES = st.builds(
    commands.Basic.Properties,
    content_type=st.none() | _SHORT,
    content_encoding=st.none() | _SHORT,
    headers=st.none() | st.dictionaries(st.text(min_size=1, max_size=10), st.integers(-5, 5)),
    delivery_mode=st.none() | st.sampled_from([1, 2]),  # pamqp validates both
    priority=st.none() | st.integers(0, 255),
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
    cluster_id=st.just(""),  # pamqp refuses anything else (None included)
)


@FUZZ
@given(
    props=_PROPERTIES,
    mutations=st.lists(_MUTATION, max_size=4),
    split=_SPLIT,
)
def test_property_blocks_valid_and_mutated(
    props: commands.Basic.Properties,
    mutations: list[tuple[int, int, str]],
    split: tuple[list[int], list[int]],
) -> None:
    hdr = frame.marshal(header.ContentHeader(0, 3, props), 1)
    raw = bytearray(hdr[7 + 12 : -1])
    for where, byte, how in mutations:
        i = where % (len(raw) + 1)
        if how == "f" and i < len(raw):
            raw[i] = byte
        elif how == "d":
            del raw[i : i + 1 + byte % 8]
        else:
            raw[i:i] = bytes([byte])
    block = bytes(raw)
    got = _ours_or_error(lambda: amqp_py.decode_properties(block))  # only PropertyError escapes
    if not mutations:  # pamqp's own reading of what it wrote (it omits empty strings)
        decoded = frame.unmarshal(hdr)[2].properties
        want = (
            {n: v for n in PROPERTY_NAMES if (v := getattr(decoded, n, None)) is not None},
            dict(decoded.headers or {}),
        )
        assert got == ("ok", repr(want))
    # The reader hands the block through untouched, in both twins, whatever it contains.
    data = deliver(1, 7) + content_header(1, 3, block) + raw_frame(3, 1, b"abc")
    result = compare(data, *_cuts(data, split), 4096, 100)
    assert result[0] == "ok"
    [item] = result[1]
    assert item[6] == block and item[7:] == (b"abc", 3)
    for impl in twins():
        assert _ours_or_error(lambda impl=impl: impl.decode_properties(block)) == got


@FUZZ
@given(data=st.binary(max_size=300))
def test_decode_properties_of_arbitrary_bytes(data: bytes) -> None:
    for block in (data, b"\x20\x00" + data, b"\x20\x00" + _u32(data), b"\xff\xfc" + data):
        _ours_or_error(lambda block=block: amqp_py.decode_properties(block))
