"""FastCGI codec tests: every vector runs through the compiled `_fcgi_codec` and the Python twin.

Requests are checked by an independent decoder written here (record framing, padding, no pair
across PARAMS records, canonical lengths, greedy packing); responses by an independent encoder
whose stream is fed to the parser at random split points. Hypothesis also compares the two
implementations directly: same bytes, same results, same errors with the same messages.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import time
import tracemalloc
import types
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # a source checkout need not be installed to be tested
    sys.path.insert(0, str(ROOT / "src"))

from fastworker import fcgi_base, fcgi_py  # noqa: E402
from fastworker.fcgi_base import (  # noqa: E402
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    Response,
)

try:
    from fastworker import _fcgi_codec  # type: ignore[attr-defined]  # noqa: E402

    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # reported by the tests below, not hidden by a skip
    _fcgi_codec = None
    _IMPORT_ERROR = exc

BEGIN, ABORT, END, PARAMS, STDIN, STDOUT, STDERR, DATA, GET_VALUES = range(1, 10)
GET_VALUES_RESULT, UNKNOWN_TYPE = 10, 11
STDIN_CHUNK = 0xFFF8
HEADER = struct.Struct("!BBHHBx")

SETTINGS = settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _compiled() -> types.ModuleType:
    if _fcgi_codec is None:
        pytest.fail(
            f"the compiled codec `fastworker._fcgi_codec` cannot be imported: {_IMPORT_ERROR}"
        )
    return _fcgi_codec


@pytest.fixture(params=["compiled", "python"])
def codec(request: pytest.FixtureRequest) -> types.ModuleType:
    """Each test using this runs once against the extension and once against the twin."""
    return _compiled() if request.param == "compiled" else fcgi_py


def both() -> tuple[types.ModuleType, types.ModuleType]:
    return _compiled(), fcgi_py


# --------------------------------------------------------------------------------------------
# test-side request decoder


def _as_bytes(x: str | bytes) -> bytes:
    return x.encode("utf-8") if isinstance(x, str) else x


def _pair_size(name: bytes, value: bytes) -> int:
    return sum(1 if len(x) < 128 else 4 for x in (name, value)) + len(name) + len(value)


def split_records(data: bytes) -> list[tuple[int, int, bytes]]:
    """Splits a stream into (type, request_id, content), checking framing and padding."""
    out = []
    pos = 0
    while pos < len(data):
        assert pos + 8 <= len(data), "truncated record header"
        version, rtype, rid, clen, plen = HEADER.unpack_from(data, pos)
        assert version == 1
        assert data[pos + 7] == 0, "reserved header byte must be 0"
        content = data[pos + 8 : pos + 8 + clen]
        padding = data[pos + 8 + clen : pos + 8 + clen + plen]
        assert len(content) == clen and len(padding) == plen, "truncated record"
        assert padding == bytes(plen), "padding must be zero bytes"
        assert (8 + clen + plen) % 8 == 0, "record length must be a multiple of 8"
        assert plen < 8, "padding beyond alignment is waste"
        out.append((rtype, rid, content))
        pos += 8 + clen + plen
    return out


def parse_pairs(content: bytes) -> list[tuple[bytes, bytes]]:
    """Parses ONE PARAMS record on its own, as PHP-FPM does: a split pair fails here."""
    pairs = []
    pos = 0

    def length() -> int:
        nonlocal pos
        assert pos < len(content), "pair split across records"
        if content[pos] & 0x80:
            assert pos + 4 <= len(content), "pair split across records"
            n = int.from_bytes(content[pos : pos + 4], "big") & 0x7FFFFFFF
            assert n >= 128, "4-byte length used for a length below 128"
            pos += 4
        else:
            n = content[pos]
            pos += 1
        return n

    while pos < len(content):
        nlen = length()
        vlen = length()
        assert pos + nlen + vlen <= len(content), "pair split across records"
        pairs.append((content[pos : pos + nlen], content[pos + nlen : pos + nlen + vlen]))
        pos += nlen + vlen
    return pairs


def decode_request(data: bytes) -> dict[str, Any]:
    """Decodes an encoded request and asserts every structural rule of the contract."""
    records = split_records(data)
    rtype, rid, content = records[0]
    assert rtype == BEGIN and len(content) == 8
    role, flags = struct.unpack_from("!HB", content)
    assert content[3:] == bytes(5)
    assert all(r[1] == rid for r in records), "all records carry the same request id"
    i = 1
    params: list[tuple[bytes, bytes]] = []
    param_records: list[list[tuple[bytes, bytes]]] = []
    while records[i][0] == PARAMS and records[i][2]:
        assert len(records[i][2]) <= 65535
        param_records.append(parse_pairs(records[i][2]))
        params += param_records[-1]
        i += 1
    assert records[i] == (PARAMS, rid, b""), "PARAMS must end with one empty record"
    i += 1
    # greedy packing: a record was closed only because the next pair did not fit
    for prev, nxt in zip(param_records, param_records[1:], strict=False):
        used = sum(_pair_size(n, v) for n, v in prev)
        assert used + _pair_size(*nxt[0]) > 65535
    chunks = []
    while records[i][0] == STDIN and records[i][2]:
        chunks.append(records[i][2])
        i += 1
    assert all(len(c) == STDIN_CHUNK for c in chunks[:-1])
    assert not chunks or 0 < len(chunks[-1]) <= STDIN_CHUNK
    assert records[i] == (STDIN, rid, b""), "STDIN must end with one empty record"
    assert i == len(records) - 1, "nothing may follow the empty STDIN record"
    return {"rid": rid, "role": role, "flags": flags, "params": params, "stdin": b"".join(chunks)}


# --------------------------------------------------------------------------------------------
# test-side response encoder


def rec(
    rtype: int,
    rid: int,
    content: bytes = b"",
    pad: int | None = None,
    version: int = 1,
    pad_byte: bytes = b"\0",
) -> bytes:
    """One record as a FastCGI server would write it (padding may be any length/content)."""
    if pad is None:
        pad = -len(content) & 7
    return HEADER.pack(version, rtype, rid, len(content), pad) + content + pad_byte * pad


def end(rid: int, app_status: int = 0, protocol_status: int = 0, pad: int | None = None) -> bytes:
    return rec(END, rid, struct.pack("!IB3x", app_status, protocol_status), pad)


def php_response(rid: int, stdout: bytes, stderr: bytes = b"", app_status: int = 0) -> bytes:
    """What PHP-FPM sends: STDOUT in <= 65535-byte records, STDERR, empty STDOUT, END."""
    out = b""
    for off in range(0, len(stdout), 65535):
        out += rec(STDOUT, rid, stdout[off : off + 65535])
    for off in range(0, len(stderr), 65535):
        out += rec(STDERR, rid, stderr[off : off + 65535])
    return out + rec(STDOUT, rid) + end(rid, app_status)


def feed_all(parser: Any, data: bytes, cuts: list[int]) -> list[tuple[Any, ...]]:
    out = []
    prev = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out += parser.feed(data[prev:cut])
        prev = cut
    return out


# --------------------------------------------------------------------------------------------
# the extension must be there


def test_compiled_extension_is_built_and_selected() -> None:
    """Fails when the extension was not built, or when fastworker.codec fell back silently."""
    compiled = _compiled()
    assert Path(compiled.__file__).suffix in (".so", ".pyd"), compiled.__file__
    from fastworker import codec as selector

    if os.environ.get("FASTWORKER_NO_EXTENSIONS"):
        assert selector.COMPILED is False
        impl: types.ModuleType = fcgi_py
    else:
        assert selector.COMPILED is True, "_fcgi_codec did not load in fastworker.codec"
        impl = compiled
    assert selector.fcgi is impl
    assert selector.encode_request is impl.encode_request
    assert selector.encode_params is impl.encode_params
    assert selector.ResponseParser is impl.ResponseParser
    assert compiled.__name__ == "fastworker._fcgi_codec"


def test_twins_share_the_exceptions_and_the_result_type(codec: types.ModuleType) -> None:
    """Both twins raise and return fcgi_base's classes, not look-alikes of their own."""
    from fastworker import codec as selector

    for name in ("ProtocolError", "LocalProtocolError", "RemoteProtocolError", "Response"):
        assert getattr(codec, name) is getattr(fcgi_base, name) is getattr(selector, name)
        assert name in codec.__all__
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(LocalProtocolError, ValueError)  # callers' `except ValueError` holds
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert not issubclass(RemoteProtocolError, ValueError)  # never the caller's mistake
    assert not issubclass(ProtocolError, ValueError)
    assert Response._fields == (
        "request_id",
        "stdout",
        "stderr",
        "app_status",
        "protocol_status",
        "stdout_size",
        "stderr_size",
    )


def test_fpm_status_values_come_from_fcgi_base() -> None:
    from fastworker import executor

    assert (fcgi_base.REQUEST_COMPLETE, fcgi_base.CANT_MPX_CONN) == (0, 1)
    assert (fcgi_base.OVERLOADED, fcgi_base.UNKNOWN_ROLE) == (2, 3)
    assert executor.OVERLOADED is fcgi_base.OVERLOADED
    assert executor.REQUEST_COMPLETE is fcgi_base.REQUEST_COMPLETE


# --------------------------------------------------------------------------------------------
# encoding: known answers and edges


def test_encode_known_bytes(codec: types.ModuleType) -> None:
    expected = bytes.fromhex(
        "01 01 0001 0008 00 00"
        "0001 01 0000000000"  # BEGIN_REQUEST, RESPONDER, KEEP_CONN
        "01 04 0001 0004 04 00"
        "01 01 41 62"
        "00000000"  # PARAMS A=b, padded to 8
        "01 04 0001 0000 00 00"  # empty PARAMS
        "01 05 0001 0003 05 00"
        "78 79 7a"
        "0000000000"  # STDIN "xyz", padded
        "01 05 0001 0000 00 00"  # empty STDIN
    )
    assert codec.encode_request(1, {"A": "b"}, b"xyz") == expected


def test_encode_empty_request(codec: types.ModuleType) -> None:
    data = codec.encode_request(65535, {}, keep_conn=False)
    assert data == bytes.fromhex(
        "01 01 ffff 0008 00 00 0001 00 000000000001 04 ffff 0000 00 0001 05 ffff 0000 00 00"
    )
    assert decode_request(data)["flags"] == 0


@pytest.mark.parametrize("request_id", [0, -1, 65536, 2**70])
def test_encode_rejects_out_of_range_request_id(codec: types.ModuleType, request_id: int) -> None:
    with pytest.raises(LocalProtocolError, match="1..65535"):
        codec.encode_request(request_id, {"A": "b"})


@pytest.mark.parametrize("request_id", [1.0, "1", None])
def test_encode_rejects_non_int_request_id(codec: types.ModuleType, request_id: object) -> None:
    with pytest.raises(TypeError, match="request_id"):
        codec.encode_request(request_id, {})


@pytest.mark.parametrize("bad", [1, None, 2.5, bytearray(b"x"), ["x"]])
def test_encode_rejects_non_str_bytes_values(codec: types.ModuleType, bad: object) -> None:
    with pytest.raises(TypeError, match="param values must be str or bytes, not"):
        codec.encode_request(1, {"A": "ok", "B": bad})


@pytest.mark.parametrize("bad", [1, None, 2.5, ("x",), frozenset()])
def test_encode_rejects_non_str_bytes_names(codec: types.ModuleType, bad: object) -> None:
    with pytest.raises(TypeError, match="param names must be str or bytes, not"):
        codec.encode_request(1, {"A": "ok", bad: "x"})


@pytest.mark.parametrize("n", [0, 1, 127, 128, 129, 255, 256, 65535 - 9])
def test_encode_length_prefixes(codec: types.ModuleType, n: int) -> None:
    """1-byte length below 128, 4-byte with the high bit from 128 on, for names and values."""
    value = "v" * n
    data = codec.encode_request(1, {"NAME": value})
    content = split_records(data)[1][2]
    if n < 128:
        assert content[:2] == bytes([4, n])
        assert content[2:6] == b"NAME" and content[6:] == value.encode()
    else:
        assert content[:5] == bytes([4]) + (0x80000000 | n).to_bytes(4, "big")
    assert decode_request(data)["params"] == [(b"NAME", value.encode())]
    name = "n" * n
    if n and n < 65000:
        content = split_records(codec.encode_request(1, {name: "v"}))[1][2]
        prefix = bytes([n]) if n < 128 else (0x80000000 | n).to_bytes(4, "big")
        assert content.startswith(prefix + b"\x01" + name.encode() + b"v")


def test_encode_exactly_127_and_128(codec: types.ModuleType) -> None:
    data = codec.encode_request(1, {"a" * 127: "b" * 128, "c" * 128: "d" * 127})
    content = split_records(data)[1][2]
    assert content[0] == 127
    assert content[1:5] == b"\x80\x00\x00\x80"
    second = content[5 + 127 + 128 :]
    assert second[:4] == b"\x80\x00\x00\x80" and second[4] == 127
    assert decode_request(data)["params"] == [(b"a" * 127, b"b" * 128), (b"c" * 128, b"d" * 127)]


def test_encode_utf8_and_bytes(codec: types.ModuleType) -> None:
    params = {"é": "naïve ✓", b"RAW\xff": b"\x00\x01", "MIX": b"b"}
    decoded = decode_request(codec.encode_request(7, params))
    assert decoded["params"] == [
        ("é".encode(), "naïve ✓".encode()),
        (b"RAW\xff", b"\x00\x01"),
        (b"MIX", b"b"),
    ]
    assert decoded["rid"] == 7 and decoded["role"] == 1 and decoded["flags"] == 1


def test_encode_surrogates_fail_the_same(codec: types.ModuleType) -> None:
    with pytest.raises(UnicodeEncodeError):
        codec.encode_request(1, {"A": "\udc80"})


def test_encode_largest_pair_fits_one_record(codec: types.ModuleType) -> None:
    value = b"v" * (65535 - 1 - 4 - 1)  # 1-byte name length, 4-byte value length, name "N"
    data = codec.encode_request(1, {"N": value, "M": "m"})
    records = split_records(data)
    assert len(records[1][2]) == 65535
    assert records[2][2] == b"\x01\x01Mm"  # the next pair starts a new record
    assert decode_request(data)["params"] == [(b"N", value), (b"M", b"m")]


@pytest.mark.parametrize("size", [65536, 70000, 3_000_000])
def test_encode_rejects_a_pair_over_one_record(codec: types.ModuleType, size: int) -> None:
    with pytest.raises(LocalProtocolError, match=r"DEFERRED_DATA.*65535.*stdin") as info:
        codec.encode_request(1, {"A": "b", "DEFERRED_DATA": "x" * (size - 4 - 1 - 13)})
    assert f"encodes to {size} bytes" in str(info.value)
    assert len(str(info.value)) < 400  # the message does not echo the huge name


def test_encode_huge_name_message_is_short(codec: types.ModuleType) -> None:
    with pytest.raises(LocalProtocolError) as info:
        codec.encode_request(1, {"N" * 100_000: ""})
    assert len(str(info.value)) < 400


def test_encode_packs_params_into_several_records(codec: types.ModuleType) -> None:
    params = {f"P{i:03}": chr(65 + i % 26) * (1000 + 37 * i) for i in range(120)}
    data = codec.encode_request(3, params)
    decoded = decode_request(data)  # checks no split pair and greedy packing
    assert decoded["params"] == [(k.encode(), v.encode()) for k, v in params.items()]
    assert sum(1 for r in split_records(data) if r[0] == PARAMS) >= 4


def _pairs_of(codec: types.ModuleType, params: dict[str, str]) -> bytes:
    """The content of the single PARAMS record `params` encode to (what `shared` takes)."""
    records = [r for r in split_records(codec.encode_request(1, params)) if r[0] == PARAMS]
    assert len(records) == 2  # the pairs, then the empty record
    return records[0][2]


def test_encode_shared_pairs_start_the_first_record(codec: types.ModuleType) -> None:
    shared = {"GATEWAY_INTERFACE": "CGI/1.1", "SCRIPT_FILENAME": "/srv/a.php", "Q": "x" * 300}
    own = {"DEFERRED_DATA": "d" * 400, "CONTENT_LENGTH": "0"}
    data = codec.encode_request(5, own, b"", True, _pairs_of(codec, shared))
    # Byte for byte what encoding all of them in one go gives: one record, shared ones first.
    assert data == codec.encode_request(5, {**shared, **own})
    assert sum(1 for r in split_records(data) if r[0] == PARAMS and r[2]) == 1
    assert codec.encode_request(5, {}, b"", True, _pairs_of(codec, shared)) == (
        codec.encode_request(5, shared)
    )


def test_encode_shared_pairs_leave_room_by_starting_a_new_record(codec: types.ModuleType) -> None:
    shared = {"BIG": "s" * 40_000}
    own = {"ALSO_BIG": "o" * 30_000, "SMALL": "x"}
    data = codec.encode_request(1, own, b"", True, _pairs_of(codec, shared))
    assert data == codec.encode_request(1, {**shared, **own})
    decoded = decode_request(data)  # checks that no pair crosses a record
    assert decoded["params"] == [(k.encode(), v.encode()) for k, v in {**shared, **own}.items()]


def test_encode_rejects_shared_pairs_over_one_record(codec: types.ModuleType) -> None:
    with pytest.raises(LocalProtocolError, match="shared"):
        codec.encode_request(1, {}, b"", True, b"x" * 65536)


@pytest.mark.parametrize(
    "size", [0, 1, 7, 8, 9, STDIN_CHUNK - 1, STDIN_CHUNK, STDIN_CHUNK + 1, 65535, 200_000]
)
def test_encode_stdin_chunks(codec: types.ModuleType, size: int) -> None:
    body = random.Random(size).randbytes(size)
    data = codec.encode_request(1, {"REQUEST_METHOD": "POST"}, body)
    decoded = decode_request(data)
    assert decoded["stdin"] == body
    stdin_records = [r for r in split_records(data) if r[0] == STDIN]
    assert len(stdin_records) == -(-size // STDIN_CHUNK) + 1


def test_encode_stdin_accepts_buffers(codec: types.ModuleType) -> None:
    body = bytes(range(256)) * 300
    expected = codec.encode_request(1, {"A": "b"}, body)
    assert codec.encode_request(1, {"A": "b"}, bytearray(body)) == expected
    assert codec.encode_request(1, {"A": "b"}, memoryview(body)) == expected
    with pytest.raises(TypeError):
        codec.encode_request(1, {"A": "b"}, "text")


def test_encode_accepts_any_mapping(codec: types.ModuleType) -> None:
    class Params(Mapping[str, str]):
        def __init__(self, d: dict[str, str]) -> None:
            self._d = d

        def __getitem__(self, key: str) -> str:
            return self._d[key]

        def __iter__(self) -> Iterator[str]:
            return iter(self._d)

        def __len__(self) -> int:
            return len(self._d)

    d = {"SCRIPT_FILENAME": "/srv/a.php", "REQUEST_METHOD": "POST"}
    expected = codec.encode_request(9, d)
    assert codec.encode_request(9, Params(d)) == expected
    assert codec.encode_request(9, types.MappingProxyType(d)) == expected


def test_encode_keep_conn_flag(codec: types.ModuleType) -> None:
    assert decode_request(codec.encode_request(1, {}, keep_conn=True))["flags"] == 1
    assert decode_request(codec.encode_request(1, {}, keep_conn=False))["flags"] == 0
    assert decode_request(codec.encode_request(1, {}, keep_conn=0))["flags"] == 0


def _sliced_shared_params(codec: types.ModuleType, params: dict[Any, Any]) -> bytes:
    """How fpm.encode_shared_params got the pairs before encode_params: by slicing a request."""
    encoded = codec.encode_request(1, params, b"")
    if len(encoded) == 32:  # BEGIN_REQUEST, empty PARAMS, empty STDIN
        return b""
    start = 24  # past BEGIN_REQUEST and the first PARAMS record's header
    size = int.from_bytes(encoded[start - 4 : start - 2], "big")
    padding = encoded[start - 2]
    assert len(encoded) == start + size + padding + 16, "more than one PARAMS record"
    return encoded[start : start + size]


SHARED_PARAM_SETS = [
    {},
    {"A": "b"},
    {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": "fastworker/0.1.0",
        "REQUEST_METHOD": "POST",
        "PHP_VALUE": "display_errors=0",
        "SCRIPT_FILENAME": "/srv/app/vendor/fervo/deferred-event-bundle/Resources/bin/dispatch.php",
        "DOCUMENT_ROOT": "/srv/app/vendor/fervo/deferred-event-bundle/Resources/bin",
    },
    {"é": "naïve ✓", b"RAW\xff": b"\x00\x01", "L" * 128: "v" * 300, "E": ""},
    {"N": "v" * (65535 - 6)},  # one pair filling the record exactly
]


@pytest.mark.parametrize("params", SHARED_PARAM_SETS)
def test_encode_params_equals_the_old_slicing(
    codec: types.ModuleType, params: dict[Any, Any]
) -> None:
    shared = codec.encode_params(params)
    assert type(shared) is bytes
    assert shared == _sliced_shared_params(codec, params)
    assert codec.encode_params(types.MappingProxyType(params)) == shared
    own = {"X": "y"}
    if len(shared) + 3 <= 65535:
        assert codec.encode_request(3, own, b"", True, shared) == (
            codec.encode_request(3, {**params, **own})
        )


@pytest.mark.parametrize(
    "params, exc, message",
    [
        (
            {"A": "a" * 40_000, "B": "b" * 40_000},
            LocalProtocolError,
            "encode to 80012 bytes, more than",
        ),
        ({"N": "v" * (65535 - 5)}, LocalProtocolError, "FastCGI param 'N' encodes to 65536 bytes"),
        ({"A": "a", "B": 1}, TypeError, "param values must be str or bytes, not int"),
        ({1: "a"}, TypeError, "param names must be str or bytes, not int"),
        # every pair is checked before the total
        ({"A": "a" * 40_000, "B": "b" * 40_000, "C": None}, TypeError, "not NoneType"),
    ],
)
def test_encode_params_refuses(
    codec: types.ModuleType, params: dict[Any, Any], exc: type, message: str
) -> None:
    with pytest.raises(exc, match=message) as info:
        codec.encode_params(params)
    assert type(info.value) is exc
    if exc is LocalProtocolError:
        assert "one PARAMS record" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        ({"request_id": "1", "stdin": "x", "shared": "y"}, TypeError, "request_id must be an int"),
        ({"request_id": 0, "stdin": "x", "shared": "y"}, LocalProtocolError, "got 0"),
        ({"params": 5, "stdin": "x", "shared": "y"}, TypeError, "not iterable"),
        ({"stdin": "x", "shared": b"\0" * 65536}, TypeError, "stdin must be a bytes-like object"),
        ({"stdin": "x", "shared": "y"}, TypeError, "stdin must be a bytes-like object, not str"),
        ({"stdin": 3, "shared": -1}, TypeError, "stdin must be a bytes-like object, not int"),
        ({"shared": "y"}, TypeError, "shared must be a bytes-like object, not str"),
        ({"shared": -1}, TypeError, "shared must be a bytes-like object, not int"),
        ({"shared": [1, 2]}, TypeError, "shared must be a bytes-like object, not list"),
        (
            {"stdin": bytearray(), "shared": b"\0" * 65536},
            LocalProtocolError,
            "shared params of 65536",
        ),
        ({"params": {"A": 1, "B": "x" * 70_000}}, TypeError, "param values must be str or bytes"),
        ({"params": {"B": "x" * 70_000, "A": 1}}, LocalProtocolError, "encodes to 70006 bytes"),
    ],
)
def test_encode_checks_arguments_in_the_same_order(
    kwargs: dict[str, Any], exc: type, message: str
) -> None:
    """Fuzz finding 6: with a bad stdin and a bad shared the twins raised different errors."""
    args = {"request_id": 1, "params": {"A": 1}, **kwargs}
    outcomes = []
    for impl in both():
        with pytest.raises(exc, match=message) as info:
            impl.encode_request(**args)
        outcomes.append((type(info.value), str(info.value)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] is exc


def test_encode_shared_accepts_buffers(codec: types.ModuleType) -> None:
    shared = codec.encode_params({"S": "s"})
    expected = codec.encode_request(1, {"A": "b"}, b"", True, shared)
    assert codec.encode_request(1, {"A": "b"}, b"", True, bytearray(shared)) == expected
    assert codec.encode_request(1, {"A": "b"}, b"", True, memoryview(shared)) == expected


# --------------------------------------------------------------------------------------------
# encoding: property-based round trip and differential


_LENGTHS = st.sampled_from([0, 1, 126, 127, 128, 129, 1000, 20_000, 40_000, 65_000, 70_000])
_SIZED = st.builds(
    lambda n, unit: unit * (n // len(unit.encode() if isinstance(unit, str) else unit)),
    _LENGTHS,
    st.sampled_from(["x", "é", b"y", "✓"]),
)
_NAME_OR_VALUE = st.one_of(
    st.text(max_size=20), st.binary(max_size=20), st.text(min_size=100, max_size=200), _SIZED
)
_BODIES = st.one_of(
    st.binary(max_size=100),
    st.builds(
        lambda n, seed: random.Random(seed).randbytes(n),
        st.sampled_from([STDIN_CHUNK - 1, STDIN_CHUNK, STDIN_CHUNK + 1, 2 * STDIN_CHUNK, 150_001]),
        st.integers(0, 1000),
    ),
)


@SETTINGS
@given(
    request_id=st.integers(1, 65535),
    params=st.dictionaries(_NAME_OR_VALUE, _NAME_OR_VALUE, max_size=8),
    stdin=_BODIES,
    keep_conn=st.booleans(),
)
def test_encode_round_trip(
    request_id: int, params: dict[Any, Any], stdin: bytes, keep_conn: bool
) -> None:
    expected = [(_as_bytes(k), _as_bytes(v)) for k, v in params.items()]
    too_big = any(_pair_size(*p) > 65535 for p in expected)
    outputs = []
    for impl in both():
        if too_big:
            with pytest.raises(LocalProtocolError, match="65535"):
                impl.encode_request(request_id, params, stdin, keep_conn)
            continue
        data = impl.encode_request(request_id, params, stdin, keep_conn)
        decoded = decode_request(data)
        assert decoded == {
            "rid": request_id,
            "role": 1,
            "flags": int(keep_conn),
            "params": expected,
            "stdin": stdin,
        }
        outputs.append(data)
    if outputs:
        assert outputs[0] == outputs[1], "compiled and twin differ"


def _outcome(fn: Any, *args: Any) -> tuple[Any, ...]:
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - the point is to compare any failure
        return ("error", type(exc), str(exc))


_ANY_KEY = st.one_of(_NAME_OR_VALUE, st.integers(), st.none(), st.floats(allow_nan=False))
_ANY_VALUE = st.one_of(_NAME_OR_VALUE, st.integers(), st.none(), st.lists(st.integers()))


_SHARED = st.one_of(
    st.just(b""),
    st.binary(max_size=20),
    st.just(bytearray(b"\x01\x01Ab")),
    st.just(b"\0" * 65536),
    st.text(max_size=2),
    st.integers(-1, 2),
)


@SETTINGS
@given(
    request_id=st.one_of(st.integers(-5, 70_000), st.floats(), st.text(max_size=3)),
    params=st.dictionaries(_ANY_KEY, _ANY_VALUE, max_size=6),
    stdin=st.one_of(_BODIES, st.just(bytearray(b"abc")), st.integers(0, 3), st.text(max_size=3)),
    shared=_SHARED,
)
def test_encode_differential(
    request_id: Any, params: dict[Any, Any], stdin: Any, shared: Any
) -> None:
    """Same bytes, or the same exception type and message, whatever the arguments."""
    compiled, twin = both()
    a = _outcome(compiled.encode_request, request_id, params, stdin, True, shared)
    b = _outcome(twin.encode_request, request_id, params, stdin, True, shared)
    assert a == b


@SETTINGS
@given(params=st.dictionaries(_ANY_KEY, _ANY_VALUE, max_size=6))
def test_encode_params_differential(params: dict[Any, Any]) -> None:
    compiled, twin = both()
    a = _outcome(compiled.encode_params, params)
    assert a == _outcome(twin.encode_params, params)
    if a[0] == "ok":  # the pairs as one PARAMS record's content, in order
        assert compiled.encode_request(1, {}, b"", True, a[1]) == compiled.encode_request(1, params)


# --------------------------------------------------------------------------------------------
# encode_form_value: a job's data as the request body's one form value

_FORM_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~/=")


def _form_value(data: bytes) -> bytes:
    """The test's own percent-encoder (RFC 3986 unreserved bytes, `/` and `=` pass, the rest is
    %XX)."""
    return b"".join(bytes((c,)) if c in _FORM_SAFE else b"%%%02X" % c for c in data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"a",
        b"+",
        b"a+",
        b"+a",
        bytes(range(256)),
        bytes(range(255, -1, -1)),
        b"T3JkZXI6IDQyLCB0b3RhbDogMTkuOTk=" * 3000,  # base64, as the bundle sends it
        b"\x00" * 70_000,
    ],
    ids=lambda d: f"{len(d)}B",
)
def test_encode_form_value_known_vectors(codec: types.ModuleType, data: bytes) -> None:
    encoded = codec.encode_form_value(data)
    assert type(encoded) is bytes
    assert encoded == _form_value(data)
    assert urllib.parse.unquote_to_bytes(encoded) == data


def test_encode_form_value_accepts_buffers(codec: types.ModuleType) -> None:
    for data in (bytearray(b"a b/c"), memoryview(b"xa b/cx")[1:-1], memoryview(b"a\x00b\xff")):
        assert codec.encode_form_value(data) == _form_value(bytes(data))


@pytest.mark.parametrize("bad", ["text", 1, None, [1]])
def test_encode_form_value_refuses_non_bytes(codec: types.ModuleType, bad: object) -> None:
    with pytest.raises(TypeError, match="data must be a bytes-like object"):
        codec.encode_form_value(bad)


@SETTINGS
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.text(alphabet="ab+/= %~\xff", max_size=300).map(lambda t: t.encode("latin-1")),
        st.text(max_size=3),
        st.integers(0, 3),
    )
)
def test_encode_form_value_differential(data: Any) -> None:
    compiled, twin = both()
    assert _outcome(compiled.encode_form_value, data) == _outcome(twin.encode_form_value, data)


# --------------------------------------------------------------------------------------------
# parsing: known answers and edges


OK_BODY = b"Content-type: text/html\r\n\r\nok"
HEAD = 65536  # the parser's default max_head


def done(
    rid: int,
    out: bytes = b"",
    err: bytes = b"",
    app: int = 0,
    proto: int = 0,
    max_head: int = HEAD,
) -> Response:
    """What `feed` returns for a request whose whole STDOUT/STDERR were `out`/`err`."""
    return Response(rid, out[:max_head], err[:max_head], app, proto, len(out), len(err))


def test_parse_simple_response(codec: types.ModuleType) -> None:
    data = rec(STDOUT, 1, OK_BODY) + rec(STDERR, 1) + end(1)
    parser = codec.ResponseParser()
    assert parser.bytes_received == 0
    [response] = parser.feed(data)
    assert response == (1, OK_BODY, b"", 0, 0, len(OK_BODY), 0)
    assert type(response) is Response
    assert (response.request_id, response.stdout, response.stderr) == (1, OK_BODY, b"")
    assert (response.app_status, response.protocol_status) == (0, 0)
    assert (response.stdout_size, response.stderr_size) == (len(OK_BODY), 0)
    assert parser.bytes_received == 0
    assert parser.max_head == 65536 and parser.request_ids == frozenset({1})


def test_parse_byte_by_byte(codec: types.ModuleType) -> None:
    data = php_response(5, OK_BODY + b"x" * 100, b"PHP message: warning", app_status=3)
    parser = codec.ResponseParser(request_ids=[5])
    out = []
    for i in range(len(data)):
        got = parser.feed(data[i : i + 1])
        if i < len(data) - 1:
            assert got == []
            assert parser.bytes_received == i + 1
        out += got
    assert out == [done(5, OK_BODY + b"x" * 100, b"PHP message: warning", 3)]
    assert parser.bytes_received == 0


def test_parse_accepts_buffers(codec: types.ModuleType) -> None:
    data = php_response(2, b"body", b"err")
    expected = [done(2, b"body", b"err")]
    assert codec.ResponseParser(request_ids=(2,)).feed(bytearray(data)) == expected
    assert codec.ResponseParser(request_ids=(2,)).feed(memoryview(data)) == expected
    assert codec.ResponseParser().feed(b"") == []


def test_parse_status_fields(codec: types.ModuleType) -> None:
    data = end(9, app_status=0xFFFFFFFF, protocol_status=3)
    assert codec.ResponseParser(request_ids=(9,)).feed(data) == [done(9, app=0xFFFFFFFF, proto=3)]


def test_parse_padding_of_any_length_and_content_is_skipped(codec: types.ModuleType) -> None:
    data = (
        rec(STDOUT, 1, b"abc", pad=255, pad_byte=b"\xff")
        + rec(STDERR, 1, b"e", pad=0)
        + rec(STDOUT, 1, b"", pad=3, pad_byte=b"\x01")
        + end(1, pad=12)
    )
    assert codec.ResponseParser().feed(data) == [done(1, b"abc", b"e")]
    parser = codec.ResponseParser()
    assert feed_all(parser, data, list(range(0, len(data), 3))) == [done(1, b"abc", b"e")]


def test_parse_large_output_keeps_the_heads_and_counts_the_rest(codec: types.ModuleType) -> None:
    body = random.Random(1).randbytes(1024 * 1024)
    errors = b"warn" * 30000
    data = php_response(1, body, errors)
    parser = codec.ResponseParser()
    out = feed_all(parser, data, list(range(65536, len(data), 65536)))
    assert out == [(1, body[:65536], errors[:65536], 0, 0, len(body), len(errors))]
    whole = codec.ResponseParser(max_head=len(body))
    assert feed_all(whole, data, list(range(1000, len(data), 7777))) == [
        (1, body, errors, 0, 0, len(body), len(errors))
    ]


@pytest.mark.parametrize("max_head", [0, 1, 7, 8, 100, 255, 256, 257, 1000])
def test_parse_max_head(codec: types.ModuleType, max_head: int) -> None:
    out = bytes(range(256)) * 4
    err = b"E" * 300
    data = (
        rec(STDOUT, 1, out[:3])
        + rec(STDERR, 1, err[:250])
        + rec(STDOUT, 1, out[3:])
        + rec(STDERR, 1, err[250:])
        + end(1)
    )
    for cuts in ([], list(range(1, len(data))), list(range(5, len(data), 13))):
        parser = codec.ResponseParser(max_head=max_head)
        assert feed_all(parser, data, cuts) == [done(1, out, err, max_head=max_head)]
        assert parser.buffered == 0
        # the parser is reusable: the next response starts from an empty head again
        assert parser.feed(php_response(1, b"next", b"e")) == [
            done(1, b"next", b"e", max_head=max_head)
        ]


def test_parse_buffered_counts_open_heads(codec: types.ModuleType) -> None:
    parser = codec.ResponseParser(max_head=10, request_ids=(1, 2))
    assert parser.buffered == 0
    parser.feed(rec(STDOUT, 1, b"x" * 4) + rec(STDERR, 1, b"y" * 40) + rec(STDOUT, 2, b"z"))
    assert parser.buffered == 4 + 10 + 1
    assert parser.feed(end(1)) == [(1, b"xxxx", b"y" * 10, 0, 0, 4, 40)]
    assert parser.buffered == 1
    parser.feed(end(2))
    assert parser.buffered == 0


def test_parse_two_requests_in_one_feed_and_leftover(codec: types.ModuleType) -> None:
    first = php_response(1, b"one")
    second = php_response(2, b"two", b"e2")
    third = rec(STDOUT, 3, b"partial")
    parser = codec.ResponseParser(request_ids=(1, 2, 3))
    assert parser.feed(first + second + third[:5]) == [done(1, b"one"), done(2, b"two", b"e2")]
    assert parser.bytes_received == 5  # bytes since the last END_REQUEST
    assert parser.feed(third[5:] + end(3)) == [done(3, b"partial")]
    assert parser.bytes_received == 0


def test_parse_interleaved_request_ids(codec: types.ModuleType) -> None:
    data = (
        rec(STDOUT, 1, b"a1")
        + rec(STDOUT, 2, b"b1")
        + rec(STDERR, 2, b"be")
        + rec(STDOUT, 1, b"a2")
        + end(2, 2)
        + rec(STDOUT, 1, b"a3")
        + end(1, 1)
    )
    parser = codec.ResponseParser(request_ids=[2, 1])
    assert parser.feed(data) == [done(2, b"b1", b"be", 2), done(1, b"a1a2a3", b"", 1)]


def test_parse_same_id_reused_after_end(codec: types.ModuleType) -> None:
    parser = codec.ResponseParser()
    assert parser.feed(php_response(1, b"first")) == [done(1, b"first")]
    assert parser.feed(php_response(1, b"second")) == [done(1, b"second")]


def test_parse_ignores_management_records(codec: types.ModuleType) -> None:
    mgmt = rec(GET_VALUES_RESULT, 0, b"\x0e\x01FCGI_MAX_CONNS1") + rec(UNKNOWN_TYPE, 0, bytes(8))
    parser = codec.ResponseParser()
    assert parser.feed(mgmt) == []
    assert parser.bytes_received == len(mgmt)
    data = rec(STDOUT, 1, b"x") + mgmt + end(1)
    assert parser.feed(data) == [done(1, b"x")]
    assert parser.bytes_received == 0


def test_bytes_received_tracks_the_unfinished_response(codec: types.ModuleType) -> None:
    data = php_response(1, b"hello")
    parser = codec.ResponseParser()
    assert parser.feed(data[:3]) == [] and parser.bytes_received == 3
    assert parser.feed(data[3:-1]) == [] and parser.bytes_received == len(data) - 1
    assert parser.feed(data[-1:] + b"\x01\x06") == [done(1, b"hello")]
    assert parser.bytes_received == 2


@pytest.mark.parametrize(
    "data, message",
    [
        (rec(STDOUT, 1, b"x", version=0), "version 0"),
        (rec(STDOUT, 1, b"x", version=2), "version 2"),
        (b"HTTP/1.1 200 OK\r\n", "version 72"),
        (rec(0, 1, b"x"), "unknown FastCGI record type 0"),
        (rec(12, 1, b"x"), "unknown FastCGI record type 12"),
        (rec(255, 0, b""), "unknown FastCGI record type 255"),
        (rec(BEGIN, 1, bytes(8)), r"request-side record type 1 \(BEGIN_REQUEST\)"),
        (rec(ABORT, 1), r"request-side record type 2 \(ABORT_REQUEST\)"),
        (rec(PARAMS, 1), r"request-side record type 4 \(PARAMS\)"),
        (rec(STDIN, 1), r"request-side record type 5 \(STDIN\)"),
        (rec(DATA, 1), r"request-side record type 8 \(DATA\)"),
        (rec(GET_VALUES, 0), r"request-side record type 9 \(GET_VALUES\)"),
        (rec(END, 1, bytes(7)), "END_REQUEST record with content length 7"),
        (rec(END, 1, bytes(16)), "END_REQUEST record with content length 16"),
        (rec(END, 1, b""), "END_REQUEST record with content length 0"),
        (rec(STDOUT, 0, b"x"), "STDOUT record with request id 0"),
        (end(0), "END_REQUEST record with request id 0"),
        (rec(UNKNOWN_TYPE, 1, bytes(8)), "UNKNOWN_TYPE with request id 1"),
        (rec(STDOUT, 2, b"x"), "STDOUT record for request id 2, which this client did not send"),
        (rec(STDERR, 65535), "STDERR record for request id 65535, which this client did not"),
        (end(7), "END_REQUEST record for request id 7, which this client did not send"),
        (rec(END, 3, bytes(7)), "END_REQUEST record for request id 3"),  # the id is checked first
    ],
)
def test_parse_rejects_malformed(codec: types.ModuleType, data: bytes, message: str) -> None:
    parser = codec.ResponseParser()
    good = php_response(1, b"fine")
    with pytest.raises(RemoteProtocolError, match=message) as info:
        parser.feed(good + data)
    assert type(info.value) is RemoteProtocolError
    with pytest.raises(RemoteProtocolError, match="earlier error.*" + message):
        parser.feed(good)
    with pytest.raises(RemoteProtocolError):
        parser.feed(b"")


def test_parse_rejects_ids_outside_the_set_of_several(codec: types.ModuleType) -> None:
    parser = codec.ResponseParser(request_ids=range(10, 20))
    assert parser.feed(php_response(10, b"a") + php_response(19, b"b")) == [
        done(10, b"a"),
        done(19, b"b"),
    ]
    with pytest.raises(RemoteProtocolError, match="STDOUT record for request id 20, which"):
        parser.feed(rec(STDOUT, 15, b"open") + rec(STDOUT, 20, b"x"))


def test_parse_rejects_malformed_header_split(codec: types.ModuleType) -> None:
    data = rec(STDOUT, 1, b"ok") + rec(PARAMS, 1, b"zz")[:8]  # raised as the header completes
    parser = codec.ResponseParser()
    for i in range(len(data) - 1):
        assert parser.feed(data[i : i + 1]) == []
    with pytest.raises(RemoteProtocolError, match="PARAMS"):
        parser.feed(data[-1:])


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        ({"max_head": -1}, ValueError, "max_head must be in 0..4611686018427387904, got -1"),
        ({"max_head": 2**62 + 1}, ValueError, "max_head must be in 0.."),
        ({"max_head": "1"}, TypeError, "max_head must be an int, not str"),
        ({"max_head": 1.5}, TypeError, "max_head must be an int, not float"),
        ({"request_ids": ()}, ValueError, "request_ids must name at least one request id"),
        ({"request_ids": 1}, TypeError, "request_ids must be an iterable of ints, not int"),
        ({"request_ids": [1, "2"]}, TypeError, "request ids must be ints, not str"),
        (
            {"request_ids": [1, 0]},
            LocalProtocolError,
            r"request ids must be in 1\.\.65535, got 0",
        ),
        (
            {"request_ids": [65536]},
            LocalProtocolError,
            r"request ids must be in 1\.\.65535, got 65536",
        ),
    ],
)
def test_parser_rejects_bad_arguments(
    codec: types.ModuleType, kwargs: dict[str, Any], exc: type, message: str
) -> None:
    with pytest.raises(exc, match=message) as info:
        codec.ResponseParser(**kwargs)
    assert type(info.value) is exc  # plain ValueError unless FastCGI cannot carry the value


def test_parser_settings_are_read_only(codec: types.ModuleType) -> None:
    parser = codec.ResponseParser(max_head=2**62, request_ids=iter([3, 1, 3]))
    assert parser.max_head == 2**62
    assert parser.request_ids == frozenset({1, 3})
    with pytest.raises(AttributeError):
        parser.max_head = 5
    with pytest.raises(AttributeError):
        parser.request_ids = frozenset({2})


@pytest.mark.parametrize("ids", [(1,), (1, 2, 3)])
def test_parse_reused_buffers_do_not_leak_between_requests(
    codec: types.ModuleType, ids: tuple[int, ...]
) -> None:
    """The parser recycles head buffers: a short response after a long one must stay short."""
    big_head = 10 << 20
    parser = codec.ResponseParser(max_head=big_head, request_ids=ids)
    rid2, rid3 = ids[-2:] if len(ids) > 1 else (1, 1)
    big = random.Random(3).randbytes(300_000)
    assert parser.feed(php_response(1, big, b"E" * 60_000)) == [
        done(1, big, b"E" * 60_000, max_head=big_head)
    ]
    assert parser.feed(php_response(rid2, b"s", b"e")) == [done(rid2, b"s", b"e")]
    assert parser.feed(php_response(1, b"")) == [done(1)]
    huge = b"h" * (5 << 20)  # over what is kept between requests
    assert parser.feed(php_response(rid3, huge)) == [done(rid3, huge, max_head=big_head)]
    assert parser.feed(php_response(rid3, b"t")) == [done(rid3, b"t")]


def test_parse_allocates_nothing_ahead_of_the_data(codec: types.ModuleType) -> None:
    """A record header announcing 65535 bytes reserves nothing: memory follows what arrived."""
    parser = codec.ResponseParser(max_head=1 << 20, request_ids=range(1, 101))
    tracemalloc.start()
    try:
        parser.feed(HEADER.pack(1, STDOUT, 1, 65535, 0) + b"x")  # announces 64 KiB, sends 1 byte
        first = tracemalloc.get_traced_memory()[1]
        parser.feed(b"y" * 65534)
        for rid in range(2, 101):  # 99 more open requests with a byte of each stream
            parser.feed(rec(STDOUT, rid, b"z") + rec(STDERR, rid, b"e"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first < 8 * 1024
    assert parser.buffered == 65535 + 99 * 2
    assert peak < 320 * 1024  # 64 KiB, its growth, and about 2 x 256 bytes per open request


def test_parse_memory_stays_bounded(codec: types.ModuleType) -> None:
    """Ignored content and output past the head are never buffered."""
    junk = rec(UNKNOWN_TYPE, 0, b"j" * 65535) * 128  # 8 MiB of management records
    flood = rec(STDOUT, 1, b"o" * 65535) * 128  # 8 MiB of output, max_head 1 MiB
    expected = [(1, b"o" * (1 << 20), b"", 0, 0, 128 * 65535, 0)]
    parser = codec.ResponseParser(max_head=1 << 20)
    tracemalloc.start()
    try:
        assert parser.feed(junk) == []
        assert tracemalloc.get_traced_memory()[1] < 256 * 1024
        assert parser.feed(flood) == []
        assert parser.buffered == 1 << 20
        assert tracemalloc.get_traced_memory()[1] < (1 << 20) + 256 * 1024
        assert parser.feed(end(1)) == expected
        assert tracemalloc.get_traced_memory()[1] < 2 * (1 << 20) + 256 * 1024
    finally:
        tracemalloc.stop()


def test_regression_many_request_ids_fail_fast_in_little_memory(codec: types.ModuleType) -> None:
    """Fuzz finding 5: one byte of STDOUT and STDERR for each id 1..65535 (1.2 MB, none sent)
    grew RSS by ~520 MiB. Ids the client never sent are now a RemoteProtocolError at once."""
    data = b"".join(
        HEADER.pack(1, STDOUT, rid, 1, 0) + b"x" + HEADER.pack(1, STDERR, rid, 1, 0) + b"y"
        for rid in range(1, 65536)
    )
    parser = codec.ResponseParser()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(RemoteProtocolError, match="request id 2, which this client did not"):
            parser.feed(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 64 * 1024
    assert parser.bytes_received == len(data)  # the whole feed was taken (and is now void)


def _periodic_chunks(record: bytes, count: int, size: int) -> Iterator[bytes]:
    """`record` repeated `count` times, cut into `size`-byte chunks, never built whole."""
    period = len(record)
    assert size <= period
    double = record * 2
    total = period * count
    for off in range(0, total, size):
        start = off % period
        yield double[start : start + min(size, total - off)]


def test_regression_100_mb_of_stdout_keeps_a_small_head(codec: types.ModuleType) -> None:
    """A job that prints 100 MB succeeds like any other: 64 KiB kept, the rest only counted."""
    content = random.Random(5).randbytes(65535)
    record = rec(STDOUT, 1, content)  # 65544 bytes: feed boundaries drift across records
    count = 1600  # 104,856,000 bytes of STDOUT
    parser = codec.ResponseParser()
    results = []
    tracemalloc.start()
    try:
        for chunk in _periodic_chunks(record, count, 65536):
            results += parser.feed(chunk)
        assert parser.buffered == 65536
        results += parser.feed(rec(STDERR, 1, b"PHP Notice: x") + rec(STDOUT, 1) + end(1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    head = (content * 2)[:65536]
    assert results == [(1, head, b"PHP Notice: x", 0, 0, count * 65535, 13)]
    assert count * 65535 > 100_000_000
    assert peak < 1 << 20  # the head, one chunk and the result; nothing grows with the output


# --------------------------------------------------------------------------------------------
# parsing: property-based round trip and differential


@st.composite
def response_streams(
    draw: st.DrawFn,
) -> tuple[bytes, list[tuple[Any, ...]], list[int], list[int]]:
    """A server stream: interleaved requests, any padding, management records in between.

    Returns (stream, (rid, stdout, stderr, app, proto) of each request in order of completion,
    offset just past each END_REQUEST record, the request ids).
    """
    rids = draw(st.lists(st.integers(1, 65535), min_size=1, max_size=4, unique=True))
    queues: dict[int, list[tuple[bytes, Any]]] = {}
    for rid in rids:
        out, err, recs = b"", b"", []
        for _ in range(draw(st.integers(0, 4))):
            rtype = draw(st.sampled_from([STDOUT, STDERR]))
            content = draw(st.binary(max_size=300))
            pad = draw(st.one_of(st.none(), st.integers(0, 255)))
            recs.append((rec(rtype, rid, content, pad, pad_byte=b"\xaa"), None))
            if rtype == STDOUT:
                out += content
            else:
                err += content
        app = draw(st.sampled_from([0, 1, 255, 0xFFFFFFFF]))
        proto = draw(st.integers(0, 3))
        recs.append(
            (end(rid, app, proto, draw(st.sampled_from([None, 0, 5]))), (rid, out, err, app, proto))
        )
        queues[rid] = recs
    stream = b""
    expected, ends = [], []
    while any(queues.values()):
        if draw(st.integers(0, 5)) == 0:
            stream += rec(
                draw(st.sampled_from([GET_VALUES_RESULT, UNKNOWN_TYPE])),
                0,
                draw(st.binary(max_size=20)),
            )
        rid = draw(st.sampled_from([r for r in rids if queues[r]]))
        data, result = queues[rid].pop(0)
        stream += data
        if result is not None:
            expected.append(result)
            ends.append(len(stream))
    return stream, expected, ends, rids


def _cuts(data: st.DataObject, length: int) -> list[int]:
    if length < 2000 and data.draw(st.integers(0, 9)) == 0:
        return list(range(1, length))  # byte by byte
    return sorted(set(data.draw(st.lists(st.integers(0, length), max_size=25))))


@SETTINGS
@given(
    stream=response_streams(),
    max_head=st.sampled_from([HEAD, 0, 1, 5, 300]),
    data=st.data(),
)
def test_parse_round_trip_any_split(
    stream: tuple[bytes, list[tuple[Any, ...]], list[int], list[int]],
    max_head: int,
    data: st.DataObject,
) -> None:
    raw, whole, ends, rids = stream
    expected = [done(*r, max_head=max_head) for r in whole]
    cuts = _cuts(data, len(raw))
    for impl in both():
        parser = impl.ResponseParser(max_head, rids)
        got = []
        prev = 0
        for cut in [*cuts, len(raw)]:
            results = parser.feed(raw[prev:cut])
            finished = [i for i, e in enumerate(ends) if prev < e <= cut]
            assert results == [expected[i] for i in finished]
            last_end = max([e for e in ends if e <= cut], default=0)
            assert parser.bytes_received == cut - last_end
            got += results
            prev = cut
        assert got == expected


@st.composite
def hostile_streams(draw: st.DrawFn) -> bytes:
    """Streams of records with arbitrary header fields, to reach every error path."""
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        version = draw(st.sampled_from([1, 1, 1, 1, 0, 2]))
        rtype = draw(
            st.one_of(st.sampled_from([STDOUT, STDERR, END, END, 10, 11]), st.integers(0, 255))
        )
        rid = draw(st.sampled_from([0, 1, 1, 2, 65535]))
        if rtype == END and draw(st.booleans()):
            content = draw(st.binary(min_size=8, max_size=8))
        else:
            content = draw(st.binary(max_size=40))
        pad = draw(st.integers(0, 9))
        out += HEADER.pack(version, rtype, rid, len(content), pad) + content + b"\x55" * pad
    if draw(st.booleans()):
        out = out[: draw(st.integers(0, len(out)))]
    return out


def _mutate(data: st.DataObject, raw: bytes) -> bytes:
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(0, 3))):
        if buf:
            buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    return bytes(buf)


@SETTINGS
@given(
    raw=st.one_of(
        response_streams().map(lambda s: s[0]), hostile_streams(), st.binary(max_size=64)
    ),
    max_head=st.sampled_from([HEAD, 0, 10, 300]),
    request_ids=st.sampled_from([(1,), (2,), (1, 2, 65535), (65535,)]),
    data=st.data(),
)
def test_parse_differential(
    raw: bytes, max_head: int, request_ids: tuple[int, ...], data: st.DataObject
) -> None:
    """Both parsers agree feed by feed: same results, same errors and messages, same counters."""
    raw = _mutate(data, raw)
    cuts = _cuts(data, len(raw))
    parsers = [impl.ResponseParser(max_head, request_ids) for impl in both()]
    prev = 0
    for cut in [*cuts, len(raw), len(raw)]:  # one extra feed: a broken parser must stay broken
        outcomes = []
        for parser in parsers:
            try:
                outcomes.append(("ok", parser.feed(raw[prev:cut])))
            except Exception as exc:  # noqa: BLE001 - anything else fails the assertion
                assert type(exc) is RemoteProtocolError, repr(exc)
                outcomes.append(("error", str(exc)))
            outcomes.append((parser.bytes_received, parser.buffered))
        assert outcomes[:2] == outcomes[2:]
        prev = cut


# --------------------------------------------------------------------------------------------
# the benchmark script runs (no timing assertions: the machine is shared and noisy)


def test_bench_quick_json() -> None:
    _compiled()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "codec.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert {row["case"] for row in rows} == {
        "encode_small",
        "encode_200k_stdin",
        "parse_small",
        "parse_1m_stdout",
        "round_trip_small",
        "form_value_48k",
    }
    for row in rows:
        assert row["ns_per_op_compiled"] > 0 and row["ns_per_op_twin"] > 0
        assert row["ratio"] == pytest.approx(row["ns_per_op_twin"] / row["ns_per_op_compiled"])
        assert row["bytes_per_op"] > 0
