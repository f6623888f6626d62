"""Fuzzes the FastCGI response parser: the compiled `_fcgi_codec` against its Python twin and
against a small whole-stream model written here.

Streams are arbitrary bytes, records with arbitrary (often lying) header fields, and valid
responses with bytes flipped, fed at arbitrary split points as bytes, bytearray or memoryview.
For every feed both twins must return the same results (`Response`s) or raise
RemoteProtocolError with the same message; nothing else may escape; no feed may take long; the
head bytes a parser holds never exceed 2 * max_head per accepted request id; and what they
return must match the model.
"""

from __future__ import annotations

import struct
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from fastworker import fcgi_py  # noqa: E402
from fastworker.fcgi_base import RemoteProtocolError, Response  # noqa: E402

try:
    from fastworker import _fcgi_codec  # type: ignore[attr-defined]  # noqa: E402
except ImportError as exc:  # pragma: no cover - reported by the test below
    _fcgi_codec = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

HEADER = struct.Struct("!BBHHBx")
END_BODY = struct.Struct("!IB3x")
STDOUT, STDERR, END = 6, 7, 3
NAMES = {
    1: "BEGIN_REQUEST",
    2: "ABORT_REQUEST",
    3: "END_REQUEST",
    4: "PARAMS",
    5: "STDIN",
    6: "STDOUT",
    7: "STDERR",
    8: "DATA",
    9: "GET_VALUES",
    10: "GET_VALUES_RESULT",
    11: "UNKNOWN_TYPE",
}
FEED_TIME_LIMIT = 2.0  # seconds; a feed is linear in its input, so this only catches a hang

FUZZ = settings(
    deadline=None,
    max_examples=400,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def twins() -> tuple[types.ModuleType, types.ModuleType]:
    if _fcgi_codec is None:
        pytest.fail(
            f"the compiled codec `fastworker._fcgi_codec` cannot be imported: {_IMPORT_ERROR}"
        )
    return _fcgi_codec, fcgi_py


# --------------------------------------------------------------------------------------------
# the model: the whole stream at once, the rules spelled out


def model(
    stream: bytes, max_head: int, ids: frozenset[int]
) -> tuple[list[tuple[Any, ...]], str | None]:
    """(results of every END_REQUEST completed in `stream`, the RemoteProtocolError message or
    None)."""
    results: list[tuple[Any, ...]] = []
    open_: dict[int, list[Any]] = {}  # rid -> [stdout, stderr, stdout_size, stderr_size]
    pos = 0
    while pos + 8 <= len(stream):
        version, rtype, rid, clen, plen = HEADER.unpack_from(stream, pos)
        if version != 1:
            return results, f"unsupported FastCGI version {version} in record header (expected 1)"
        if rtype in (STDOUT, STDERR, END):
            name = NAMES[rtype]
            if rid == 0:
                return results, f"{name} record with request id 0 (reserved for management)"
            if rid not in ids:
                return results, (
                    f"{name} record for request id {rid}, which this client did not send"
                )
            if rtype == END and clen != 8:
                return results, f"END_REQUEST record with content length {clen} (expected 8)"
        elif rtype in (10, 11):
            if rid != 0:
                return results, (
                    f"management record {NAMES[rtype]} with request id {rid} (expected 0)"
                )
        elif 1 <= rtype <= 9:
            return results, (
                f"request-side record type {rtype} ({NAMES[rtype]}) received from the server"
            )
        else:
            return results, f"unknown FastCGI record type {rtype}"
        content = stream[pos + 8 : pos + 8 + clen]
        req = open_.setdefault(rid, [b"", b"", 0, 0]) if rtype in (STDOUT, STDERR, END) else None
        if req is not None and rtype != END:
            i = 0 if rtype == STDOUT else 1
            req[i] = (req[i] + content)[:max_head]
            req[i + 2] += len(content)
        if pos + 8 + clen + plen > len(stream):
            break  # the record is not complete yet
        pos += 8 + clen + plen
        if rtype == END:
            del open_[rid]
            app, proto = END_BODY.unpack(content)
            results.append((rid, req[0], req[1], app, proto, req[2], req[3]))  # type: ignore[index]
    return results, None


# --------------------------------------------------------------------------------------------
# streams


ID_SETS = [(1,), (1, 2), (3, 65535), tuple(range(1, 9))]


@st.composite
def records(draw: st.DrawFn, ids: tuple[int, ...]) -> bytes:
    """One record with fields anywhere from right to absurd."""
    version = draw(st.sampled_from([1] * 12 + [0, 2, 255]))
    rtype = draw(
        st.one_of(
            st.sampled_from([STDOUT] * 4 + [STDERR] * 3 + [END] * 3 + [10, 11]),
            st.integers(0, 255),
        )
    )
    rid = draw(
        st.one_of(
            st.sampled_from(ids),
            st.sampled_from(ids),
            st.sampled_from([0, 1, 2, 65535]),
            st.integers(0, 65535),
        )
    )
    if rtype == END and draw(st.integers(0, 4)):
        content = END_BODY.pack(
            draw(st.sampled_from([0, 1, 255, 2**32 - 1])), draw(st.integers(0, 255))
        )
    elif draw(st.integers(0, 14)) == 0:
        content = bytes([draw(st.integers(0, 255))]) * draw(st.integers(300, 65535))
    else:
        content = draw(st.binary(max_size=120))
    clen = len(content)
    if draw(st.integers(0, 9)) == 0:  # a header that lies about its length
        clen = draw(st.integers(0, 65535))
    pad = draw(st.one_of(st.just(-len(content) & 7), st.integers(0, 255)))
    return HEADER.pack(version, rtype, rid, clen, pad) + content + b"\xa5" * pad


@st.composite
def responses(draw: st.DrawFn, ids: tuple[int, ...]) -> bytes:
    """Well-formed answers for some of `ids`, interleaved record by record."""
    queues = []
    for rid in draw(st.lists(st.sampled_from(ids), min_size=1, max_size=3, unique=True)):
        recs = []
        for _ in range(draw(st.integers(0, 4))):
            content = draw(st.one_of(st.binary(max_size=200), st.just(b"o" * 5000)))
            pad = -len(content) & 7
            rtype = draw(st.sampled_from([STDOUT, STDERR]))
            recs.append(HEADER.pack(1, rtype, rid, len(content), pad) + content + bytes(pad))
        recs.append(HEADER.pack(1, END, rid, 8, 0) + END_BODY.pack(0, draw(st.integers(0, 3))))
        queues.append(recs)
    out = b""
    while any(queues):
        queue = draw(st.sampled_from([q for q in queues if q]))
        out += queue.pop(0)
    return out


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, tuple[int, ...]]:
    ids = draw(st.sampled_from(ID_SETS))
    kind = draw(st.sampled_from(["bytes", "records", "responses"]))
    if kind == "bytes":
        raw = draw(st.binary(max_size=600))
    elif kind == "records":
        raw = b"".join(draw(st.lists(records(ids), max_size=10)))
    else:
        raw = b"".join(draw(st.lists(responses(ids), min_size=1, max_size=3)))
    buf = bytearray(raw)
    for _ in range(draw(st.integers(0, 3)) if buf else 0):  # flip a few bytes
        buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    if buf and draw(st.integers(0, 4)) == 0:  # cut it short
        del buf[draw(st.integers(0, len(buf) - 1)) :]
    return bytes(buf), ids


BUFFER_KINDS = ["bytes", "bytearray", "memoryview", "offset memoryview"]


def as_buffer(chunk: bytes, kind: str) -> Any:
    if kind == "bytearray":
        return bytearray(chunk)
    if kind == "memoryview":
        return memoryview(chunk)
    if kind == "offset memoryview":
        return memoryview(b"\x00" + chunk + b"\x00")[1:-1]
    return chunk


def split(data: st.DataObject, length: int) -> list[int]:
    if length < 400 and data.draw(st.integers(0, 9)) == 0:
        return list(range(1, length))  # byte by byte
    return sorted(set(data.draw(st.lists(st.integers(0, length), max_size=12))))


# --------------------------------------------------------------------------------------------
# the properties


def feed_both(parsers: list[Any], chunk: bytes, kind: str) -> list[tuple[Any, ...]]:
    """Feeds `chunk` to each parser; the outcome of each, checked for time and memory."""
    outcomes = []
    for parser in parsers:
        started = time.perf_counter()
        try:
            outcome: tuple[Any, ...] = ("ok", parser.feed(as_buffer(chunk, kind)))
        except Exception as exc:  # noqa: BLE001 - anything but RemoteProtocolError fails below
            assert type(exc) is RemoteProtocolError, repr(exc)
            outcome = ("error", str(exc))
        else:
            assert all(type(r) is Response for r in outcome[1]), outcome
        assert time.perf_counter() - started < FEED_TIME_LIMIT
        limit = 2 * parser.max_head * len(parser.request_ids)
        assert parser.buffered <= limit
        outcomes.append((*outcome, parser.bytes_received, parser.buffered))
    return outcomes


@FUZZ
@given(
    stream=streams(),
    max_head=st.sampled_from([0, 1, 7, 64, 65536]),
    kinds=st.lists(st.sampled_from(BUFFER_KINDS), min_size=1, max_size=4),
    data=st.data(),
)
def test_twins_agree_with_each_other_and_the_model(
    stream: tuple[bytes, tuple[int, ...]], max_head: int, kinds: list[str], data: st.DataObject
) -> None:
    raw, ids = stream
    parsers = [impl.ResponseParser(max_head, ids) for impl in twins()]
    expected, error = model(raw, max_head, frozenset(ids))
    got: list[tuple[Any, ...]] = []
    failed: str | None = None
    prev = 0
    cuts = split(data, len(raw))
    for index, cut in enumerate([*cuts, len(raw), len(raw)]):  # the last feed is empty
        compiled, twin = feed_both(parsers, raw[prev:cut], kinds[index % len(kinds)])
        assert compiled == twin
        if compiled[0] == "ok":
            assert failed is None
            got += compiled[1]
        elif failed is None:
            failed = compiled[1]
        else:  # a broken parser stays broken, and says why
            assert compiled[1] == f"parser is unusable after an earlier error: {failed}"
        prev = cut
    assert failed == error
    if error is None:
        assert got == expected
    else:
        assert got == expected[: len(got)]  # results of the failing feed are not returned
    for rid, out, err, app, proto, out_size, err_size in got:
        assert rid in ids and 0 <= app < 2**32 and 0 <= proto < 256
        assert len(out) == min(out_size, max_head) and len(err) == min(err_size, max_head)


@settings(FUZZ, max_examples=60)
@given(
    ids=st.sampled_from(ID_SETS),
    max_head=st.sampled_from([0, 100, 4096]),
    sizes=st.lists(st.integers(0, 300_000), min_size=1, max_size=3),
    chunk=st.sampled_from([1000, 65536, 100_000]),
)
def test_large_outputs_are_counted_not_kept(
    ids: tuple[int, ...], max_head: int, sizes: list[int], chunk: int
) -> None:
    """Output far beyond the head, every request open at once: memory stays at the heads."""
    raw = b""
    for i, size in enumerate(sizes):  # interleave the requests record by record
        for rid in ids:
            part = bytes([65 + i % 26]) * min(size, 65535)
            for off in range(0, size, 65535):
                n = min(65535, size - off)
                raw += HEADER.pack(1, STDOUT if i % 2 else STDERR, rid, n, 0) + part[:n]
    raw += b"".join(HEADER.pack(1, END, rid, 8, 0) + END_BODY.pack(0, 0) for rid in ids)
    parsers = [impl.ResponseParser(max_head, ids) for impl in twins()]
    results = []
    for off in range(0, len(raw), chunk):
        compiled, twin = feed_both(parsers, raw[off : off + chunk], "bytes")
        assert compiled == twin and compiled[0] == "ok"
        results += compiled[1]
    assert results == model(raw, max_head, frozenset(ids))[0]
    assert [r[0] for r in results] == list(ids)
    out_total = sum(s for i, s in enumerate(sizes) if i % 2)
    err_total = sum(s for i, s in enumerate(sizes) if not i % 2)
    assert all(r[5:] == (out_total, err_total) for r in results)


def test_model_matches_a_known_stream() -> None:
    """The model itself, on a hand-written stream (so the fuzz compares against something)."""
    raw = (
        HEADER.pack(1, STDOUT, 1, 5, 3) + b"hello" + bytes(3)
        + HEADER.pack(1, 11, 0, 8, 0) + bytes(8)
        + HEADER.pack(1, STDERR, 1, 3, 0) + b"err"
        + HEADER.pack(1, END, 1, 8, 0) + END_BODY.pack(7, 0)
        + HEADER.pack(1, STDOUT, 2, 1, 0) + b"x"
    )  # fmt: skip
    assert model(raw, 3, frozenset({1})) == (
        [(1, b"hel", b"err", 7, 0, 5, 3)],
        "STDOUT record for request id 2, which this client did not send",
    )
    for impl in twins():
        parser = impl.ResponseParser(3, [1])
        with pytest.raises(RemoteProtocolError, match="request id 2, which this client"):
            parser.feed(raw)
