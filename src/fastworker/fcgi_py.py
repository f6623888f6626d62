"""Sans-IO FastCGI codec in pure Python: the reference twin of the compiled `fcgi_codec`.

Same API, same error messages, byte-identical output (tests/test_codec.py checks both against
every vector and against each other). It is the fallback when the extension is not built or
FASTWORKER_NO_EXTENSIONS is set; keep it in step with src/fcgi_codec.pyx.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

__all__ = ["ProtocolError", "ResponseParser", "encode_request"]

_VERSION = 1
_BEGIN_REQUEST = 1
_END_REQUEST = 3
_PARAMS = 4
_STDIN = 5
_STDOUT = 6
_STDERR = 7
_GET_VALUES_RESULT = 10
_UNKNOWN_TYPE = 11
_RESPONDER = 1
_KEEP_CONN = 1
_MAX_CONTENT = 65535
_STDIN_CHUNK = 0xFFF8
_RETAIN = 4 * 1024 * 1024  # output buffer kept between requests for reuse

_ST_HEADER = 0
_ST_CONTENT = 1
_ST_PADDING = 2

_MAX_SIZE_LIMIT = 2**62  # the compiled twin keeps it in a C Py_ssize_t

_TYPE_NAMES = {
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

_HEADER = struct.Struct("!BBHHBx")
_BEGIN_BODY = struct.Struct("!HB5x")
_END_BODY = struct.Struct("!IB3x")
_LEN4 = struct.Struct("!I")
_ZEROS = bytes(8)


class ProtocolError(ValueError):
    """The FastCGI peer sent a stream this client cannot trust; the connection must be dropped."""


def _pad(n: int) -> int:
    """Padding that brings a record's content up to a multiple of 8 bytes."""
    return -n & 7


def _utf8(o: object, what: str) -> bytes:
    if isinstance(o, str):
        return o.encode("utf-8")
    if isinstance(o, bytes):
        return o
    raise TypeError(f"FastCGI param {what}s must be str or bytes, not {type(o).__name__}")


def _pair_too_big(name: object, size: int) -> str:
    return (
        f"FastCGI param {repr(name)[:80]} encodes to {size} bytes, more than the 65535 one "
        f"PARAMS record can carry (PHP-FPM drops a pair split across records); send large "
        f"data in the request body (stdin) instead"
    )


def encode_request(
    request_id: int,
    params: Mapping[str | bytes, str | bytes],
    stdin: bytes = b"",
    keep_conn: bool = True,
    shared: bytes = b"",
) -> bytes:
    """Encodes one RESPONDER request: BEGIN_REQUEST, PARAMS, empty PARAMS, STDIN, empty STDIN.

    Name-value pairs never cross a PARAMS record (PHP-FPM parses each record on its own); STDIN
    goes in 0xFFF8-byte records. `shared` is name-value pairs encoded beforehand (the content
    of a PARAMS record, at most 65535 bytes): they start the first PARAMS record, ahead of
    `params`, so params many requests share are encoded once and still cost FPM no extra record.
    Raises ValueError for a pair or `shared` over 65535 bytes or a request id outside 1..65535,
    TypeError for names/values that are neither str nor bytes.
    """
    if not isinstance(request_id, int):
        raise TypeError(f"request_id must be an int, not {type(request_id).__name__}")
    if not 0 < request_id < 65536:
        raise ValueError(f"request_id must be in 1..65535, got {request_id}")
    flags = _KEEP_CONN if keep_conn else 0
    d = params if type(params) is dict else dict(params)
    body = stdin if type(stdin) is bytes else memoryview(stdin).cast("B")
    shared = bytes(shared)
    if len(shared) > _MAX_CONTENT:
        raise ValueError(f"shared params of {len(shared)} bytes do not fit in one PARAMS record")

    # pass 1: validate, encode, and group the pairs into records (the first starts with shared)
    records: list[list[tuple[bytes, bytes]]] = []
    sizes: list[int] = []
    current: list[tuple[bytes, bytes]] = []
    cur = len(shared)
    for name, value in d.items():
        nb = _utf8(name, "name")
        vb = _utf8(value, "value")
        nlen = len(nb)
        vlen = len(vb)
        ps = (1 if nlen < 128 else 4) + (1 if vlen < 128 else 4) + nlen + vlen
        if ps > _MAX_CONTENT:
            raise ValueError(_pair_too_big(name, ps))
        if cur + ps > _MAX_CONTENT:
            records.append(current)
            sizes.append(cur)
            current = []
            cur = 0
        current.append((nb, vb))
        cur += ps
    if cur:
        records.append(current)
        sizes.append(cur)
    slen = len(body)
    nfull, rem = divmod(slen, _STDIN_CHUNK)
    total = 16 + sum(8 + s + _pad(s) for s in sizes) + 8 + nfull * (8 + _STDIN_CHUNK) + 8
    if rem:
        total += 8 + rem + _pad(rem)

    # pass 2: write into one preallocated buffer (zero-filled, so padding needs no writes)
    buf = bytearray(total)
    _HEADER.pack_into(buf, 0, _VERSION, _BEGIN_REQUEST, request_id, 8, 0)
    _BEGIN_BODY.pack_into(buf, 8, _RESPONDER, flags)
    pos = 16
    for index, (pairs, size) in enumerate(zip(records, sizes, strict=True)):
        pad = _pad(size)
        _HEADER.pack_into(buf, pos, _VERSION, _PARAMS, request_id, size, pad)
        pos += 8
        if index == 0 and shared:
            buf[pos : pos + len(shared)] = shared
            pos += len(shared)
        for nb, vb in pairs:
            for n in (len(nb), len(vb)):
                if n < 128:
                    buf[pos] = n
                    pos += 1
                else:
                    _LEN4.pack_into(buf, pos, n | 0x80000000)
                    pos += 4
            buf[pos : pos + len(nb)] = nb
            pos += len(nb)
            buf[pos : pos + len(vb)] = vb
            pos += len(vb)
        pos += pad
    _HEADER.pack_into(buf, pos, _VERSION, _PARAMS, request_id, 0, 0)
    pos += 8
    for off in range(0, slen, _STDIN_CHUNK):
        chunk = body[off : off + _STDIN_CHUNK]
        clen = len(chunk)
        pad = _pad(clen)
        _HEADER.pack_into(buf, pos, _VERSION, _STDIN, request_id, clen, pad)
        pos += 8
        buf[pos : pos + clen] = chunk
        pos += clen + pad
    _HEADER.pack_into(buf, pos, _VERSION, _STDIN, request_id, 0, 0)
    return bytes(buf)


class _Request:
    """Output accumulated for one request id until its END_REQUEST.

    Buffers that only grow (`*_len` says how much is used), recycled by the parser for the next
    request: a response of a few MB then costs two copies, where fresh allocations per request
    page-fault new memory every time.
    """

    __slots__ = ("out", "out_len", "err", "err_len", "size")

    def __init__(self) -> None:
        self.out = bytearray()
        self.out_len = 0
        self.err = bytearray()
        self.err_len = 0
        self.size = 0


def _reserve(buf: bytearray, need: int, limit: int) -> None:
    """Grows an output buffer to hold `need` bytes: doubling, but never past `limit`."""
    cap = len(buf)
    if need > cap:
        buf += bytes(max(need, min(max(cap * 2, 4096), limit)) - cap)


def _used(buf: bytearray, n: int) -> bytes:
    with memoryview(buf) as view:
        return bytes(view[:n])


class ResponseParser:
    """Incremental FastCGI response parser: feed it bytes as they arrive, get finished requests.

    It buffers at most one record header and one END_REQUEST body; record content goes straight
    into the request's output, which is bounded by `max_size` (stdout + stderr per request).
    Between requests it keeps up to 4 MiB of output buffer for reuse. After a ProtocolError it
    stays broken: the connection is no longer in a known state.
    """

    def __init__(self, max_size: int = 64 * 1024 * 1024) -> None:
        if not isinstance(max_size, int):
            raise TypeError(f"max_size must be an int, not {type(max_size).__name__}")
        if not 0 <= max_size <= _MAX_SIZE_LIMIT:
            raise ValueError(f"max_size must be in 0..{_MAX_SIZE_LIMIT}, got {max_size}")
        self._max_size = max_size
        self._received = 0
        self._hdr = bytearray()
        self._end = bytearray()
        self._state = _ST_HEADER
        self._type = 0
        self._rid = 0
        self._content_left = 0
        self._pad_left = 0
        self._requests: dict[int, _Request] = {}
        self._req: _Request | None = None
        self._spare: _Request | None = None
        self._error: str | None = None

    @property
    def max_size(self) -> int:
        """Most stdout + stderr bytes one request may accumulate."""
        return self._max_size

    @property
    def bytes_received(self) -> int:
        """Bytes fed since construction or since the last completed END_REQUEST."""
        return self._received

    def _on_header(self, version: int, rtype: int, rid: int, clen: int, plen: int) -> None:
        req = None
        if version != _VERSION:
            raise ProtocolError(
                f"unsupported FastCGI version {version} in record header (expected 1)"
            )
        if rtype in (_STDOUT, _STDERR, _END_REQUEST):
            if rid == 0:
                raise ProtocolError(
                    f"{_TYPE_NAMES[rtype]} record with request id 0 (reserved for management)"
                )
            req = self._requests.get(rid)
            if req is None:
                req = self._spare or _Request()
                self._spare = None
                self._requests[rid] = req
            if rtype == _END_REQUEST:
                if clen != 8:
                    raise ProtocolError(
                        f"END_REQUEST record with content length {clen} (expected 8)"
                    )
                self._end.clear()
            elif clen:
                if req.size + clen > self._max_size:
                    raise ProtocolError(
                        f"response exceeds max_size ({self._max_size} bytes) for request {rid}"
                    )
                req.size += clen
                left = self._max_size - req.size  # what this request may still add after this
                if rtype == _STDOUT:
                    _reserve(req.out, req.out_len + clen, req.out_len + clen + left)
                else:
                    _reserve(req.err, req.err_len + clen, req.err_len + clen + left)
        elif rtype in (_GET_VALUES_RESULT, _UNKNOWN_TYPE):
            if rid != 0:
                raise ProtocolError(
                    f"management record {_TYPE_NAMES[rtype]} with request id {rid} (expected 0)"
                )
        elif 1 <= rtype <= 9:
            raise ProtocolError(
                f"request-side record type {rtype} ({_TYPE_NAMES[rtype]}) received from the server"
            )
        else:
            raise ProtocolError(f"unknown FastCGI record type {rtype}")
        self._type = rtype
        self._rid = rid
        self._req = req
        self._content_left = clen
        self._pad_left = plen
        self._state = _ST_CONTENT if clen else _ST_PADDING

    def _finish(self) -> tuple[int, bytes, bytes, int, int]:
        """Turns the completed END_REQUEST into a result tuple; recycles the request's buffers."""
        req = self._req
        assert req is not None
        app_status, protocol_status = _END_BODY.unpack(self._end)
        result = (
            self._rid,
            _used(req.out, req.out_len),
            _used(req.err, req.err_len),
            app_status,
            protocol_status,
        )
        del self._requests[self._rid]
        self._req = None
        if self._spare is None:
            if len(req.out) > _RETAIN:
                req.out = bytearray()
            if len(req.err) > _RETAIN:
                req.err = bytearray()
            req.out_len = req.err_len = req.size = 0
            self._spare = req
        return result

    def feed(self, data: bytes) -> list[tuple[int, bytes, bytes, int, int]]:
        """Consumes bytes (any split); returns requests whose END_REQUEST completed in them."""
        if self._error is not None:
            raise ProtocolError(f"parser is unusable after an earlier error: {self._error}")
        mv = memoryview(data).cast("B")
        n = len(mv)
        pos = 0
        mark = 0
        recv = self._received
        results: list[tuple[int, bytes, bytes, int, int]] = []
        try:
            while pos < n:
                state = self._state
                if state == _ST_HEADER:
                    if not self._hdr and n - pos >= 8:
                        fields = _HEADER.unpack_from(mv, pos)
                        pos += 8
                    else:
                        take = min(8 - len(self._hdr), n - pos)
                        self._hdr += mv[pos : pos + take]
                        pos += take
                        if len(self._hdr) < 8:
                            break
                        fields = _HEADER.unpack(self._hdr)
                        self._hdr.clear()
                    self._on_header(*fields)
                elif state == _ST_CONTENT:
                    take = min(self._content_left, n - pos)
                    rtype = self._type
                    req: Any = self._req  # set by _on_header for STDOUT/STDERR/END_REQUEST
                    if rtype == _STDOUT:
                        used = req.out_len
                        req.out[used : used + take] = mv[pos : pos + take]
                        req.out_len = used + take
                    elif rtype == _STDERR:
                        used = req.err_len
                        req.err[used : used + take] = mv[pos : pos + take]
                        req.err_len = used + take
                    elif rtype == _END_REQUEST:
                        self._end += mv[pos : pos + take]
                    pos += take
                    self._content_left -= take
                    if not self._content_left:
                        self._state = _ST_PADDING
                else:
                    take = min(self._pad_left, n - pos)
                    pos += take
                    self._pad_left -= take
                if self._state == _ST_PADDING and not self._pad_left:
                    self._state = _ST_HEADER
                    if self._type == _END_REQUEST:
                        results.append(self._finish())
                        recv = 0
                        mark = pos
        except BaseException as exc:
            self._error = str(exc) or type(exc).__name__
            self._received = recv + n - mark
            raise
        self._received = recv + n - mark
        return results
