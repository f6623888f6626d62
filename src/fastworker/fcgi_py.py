"""Sans-IO FastCGI codec in pure Python: the reference twin of the compiled `_fcgi_codec`.

Same API, same results (`fcgi_base.Response`), the same exception classes and messages (both
raise those of `fastworker.fcgi_base`), byte-identical output (tests/test_codec.py and
tests/test_fcgi_fuzz.py check both against every vector and against each other). It is the
fallback when the extension is not built or FASTWORKER_NO_EXTENSIONS is set; keep its loops in
step with src/fastworker/_fcgi_codec.pyx.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote_from_bytes

from fastworker.fcgi_base import (
    BEGIN_REQUEST,
    END_REQUEST,
    FORM_SAFE,
    GET_VALUES_RESULT,
    KEEP_CONN,
    MAX_CONTENT,
    PARAMS,
    RESPONDER,
    STDERR,
    STDIN,
    STDIN_CHUNK,
    STDOUT,
    TYPE_NAMES,
    UNKNOWN_TYPE,
    VERSION,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    Response,
    byte_view,
    check_max_head,
    check_request_id,
    check_request_ids,
    not_str_or_bytes,
    pair_too_big,
    params_too_big,
    shared_too_big,
)

__all__ = [
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "Response",
    "ResponseParser",
    "encode_form_value",
    "encode_params",
    "encode_request",
]

_ST_HEADER = 0
_ST_CONTENT = 1
_ST_PADDING = 2

_HEADER = struct.Struct("!BBHHBx")
_BEGIN_BODY = struct.Struct("!HB5x")
_END_BODY = struct.Struct("!IB3x")
_LEN4 = struct.Struct("!I")


# --------------------------------------------------------------------------------------------
# encoding


def _pad(n: int) -> int:
    """Padding that brings a record's content up to a multiple of 8 bytes."""
    return -n & 7


def _utf8(o: object, what: str) -> bytes:
    if isinstance(o, str):
        return o.encode("utf-8")
    if isinstance(o, bytes):
        return o
    raise not_str_or_bytes(what, o)


def _pairs(d: dict[Any, Any]) -> tuple[list[tuple[bytes, bytes, int]], int]:
    """Every pair checked and encoded to (name, value, encoded size), in order; and the total."""
    pairs = []
    total = 0
    for name, value in d.items():
        nb = _utf8(name, "name")
        vb = _utf8(value, "value")
        nlen = len(nb)
        vlen = len(vb)
        ps = (1 if nlen < 128 else 4) + (1 if vlen < 128 else 4) + nlen + vlen
        if ps > MAX_CONTENT:
            raise pair_too_big(name, ps)
        pairs.append((nb, vb, ps))
        total += ps
    return pairs, total


def _put_pair(buf: bytearray, pos: int, nb: bytes, vb: bytes) -> int:
    """Writes one name-value pair at `pos`; returns the position after it."""
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
    return pos + len(vb)


def encode_params(params: Mapping[str | bytes, str | bytes]) -> bytes:
    """The name-value pairs of `params`, encoded as the content of one PARAMS record.

    What `encode_request` takes as `shared`: params many requests share, encoded once.
    Raises LocalProtocolError (a ValueError) when they take more than the 65535 bytes of one
    record (after checking every pair, in order, as `encode_request` does), TypeError for
    names/values that are neither str nor bytes.
    """
    d = params if type(params) is dict else dict(params)
    pairs, total = _pairs(d)
    if total > MAX_CONTENT:
        raise params_too_big(total)
    buf = bytearray(total)
    pos = 0
    for nb, vb, _ in pairs:
        pos = _put_pair(buf, pos, nb, vb)
    return bytes(buf)


def encode_request(
    request_id: int,
    params: Mapping[str | bytes, str | bytes],
    stdin: bytes = b"",
    keep_conn: bool = True,
    shared: bytes = b"",
) -> bytes:
    """Encodes one RESPONDER request: BEGIN_REQUEST, PARAMS, empty PARAMS, STDIN, empty STDIN.

    Name-value pairs never cross a PARAMS record (PHP-FPM parses each record on its own); STDIN
    goes in 0xFFF8-byte records. `shared` is name-value pairs encoded beforehand by
    `encode_params` (at most 65535 bytes): they start the first PARAMS record, ahead of
    `params`, so params many requests share are encoded once and still cost FPM no extra record.

    Arguments are checked in this order, by both twins: request_id (TypeError, then
    LocalProtocolError outside 1..65535), params (turned into a dict), stdin (TypeError if not
    bytes-like), shared (TypeError if not bytes-like, LocalProtocolError over 65535 bytes), then
    each pair in order (TypeError for a name/value neither str nor bytes, LocalProtocolError for
    a pair over 65535 bytes). LocalProtocolError is a ValueError.
    """
    request_id = check_request_id(request_id)
    flags = KEEP_CONN if keep_conn else 0
    d = params if type(params) is dict else dict(params)
    body = stdin if type(stdin) is bytes else byte_view(stdin, "stdin")
    if type(shared) is not bytes:
        shared = bytes(byte_view(shared, "shared"))
    if len(shared) > MAX_CONTENT:
        raise shared_too_big(len(shared))

    # pass 1: validate, encode, and group the pairs into records (the first starts with shared)
    records: list[list[tuple[bytes, bytes, int]]] = []
    sizes: list[int] = []
    current: list[tuple[bytes, bytes, int]] = []
    cur = len(shared)
    for pair in _pairs(d)[0]:
        ps = pair[2]
        if cur + ps > MAX_CONTENT:
            records.append(current)
            sizes.append(cur)
            current = []
            cur = 0
        current.append(pair)
        cur += ps
    if cur:
        records.append(current)
        sizes.append(cur)
    slen = len(body)
    nfull, rem = divmod(slen, STDIN_CHUNK)
    total = 16 + sum(8 + s + _pad(s) for s in sizes) + 8 + nfull * (8 + STDIN_CHUNK) + 8
    if rem:
        total += 8 + rem + _pad(rem)

    # pass 2: write into one preallocated buffer (zero-filled, so padding needs no writes)
    buf = bytearray(total)
    _HEADER.pack_into(buf, 0, VERSION, BEGIN_REQUEST, request_id, 8, 0)
    _BEGIN_BODY.pack_into(buf, 8, RESPONDER, flags)
    pos = 16
    for index, (pairs, size) in enumerate(zip(records, sizes, strict=True)):
        pad = _pad(size)
        _HEADER.pack_into(buf, pos, VERSION, PARAMS, request_id, size, pad)
        pos += 8
        if index == 0 and shared:
            buf[pos : pos + len(shared)] = shared
            pos += len(shared)
        for nb, vb, _ in pairs:
            pos = _put_pair(buf, pos, nb, vb)
        pos += pad
    _HEADER.pack_into(buf, pos, VERSION, PARAMS, request_id, 0, 0)
    pos += 8
    for off in range(0, slen, STDIN_CHUNK):
        chunk = body[off : off + STDIN_CHUNK]
        clen = len(chunk)
        pad = _pad(clen)
        _HEADER.pack_into(buf, pos, VERSION, STDIN, request_id, clen, pad)
        pos += 8
        buf[pos : pos + clen] = chunk
        pos += clen + pad
    _HEADER.pack_into(buf, pos, VERSION, STDIN, request_id, 0, 0)
    return bytes(buf)


def encode_form_value(data: object) -> bytes:
    """`data` percent-encoded as one application/x-www-form-urlencoded value (a job's data sent
    as the request body): every byte outside fcgi_base.FORM_SAFE becomes %XX, upper-case hex,
    as urllib.parse.quote_from_bytes does. Base64 text (the bundle's data) grows only by its
    `+` signs."""
    return quote_from_bytes(byte_view(data, "data").tobytes(), safe=FORM_SAFE).encode("ascii")


# --------------------------------------------------------------------------------------------
# parsing


class _Request:
    """One open request: the heads of its STDOUT and STDERR, and how much of each arrived."""

    __slots__ = ("out", "out_size", "err", "err_size")

    def __init__(self) -> None:
        self.out = bytearray()
        self.out_size = 0
        self.err = bytearray()
        self.err_size = 0


class ResponseParser:
    """Incremental FastCGI response parser: feed it bytes as they arrive, get finished requests.

    `feed` returns one `Response` per completed END_REQUEST: (request_id, stdout, stderr,
    app_status, protocol_status, stdout_size, stderr_size). stdout and stderr are the first
    `max_head` bytes of the request's streams; the sizes count every byte of each stream. The
    rest of the output is counted and dropped, so a request holds at most 2 * `max_head` bytes
    however much it prints, and buffers grow only with the data that arrived.

    Only records for `request_ids` (the ids the client sends) are accepted: any other id is a
    RemoteProtocolError, which also bounds the open requests to len(request_ids). Besides that
    it buffers one record header and one END_REQUEST body. `feed` raises RemoteProtocolError,
    and nothing else, for whatever bytes it is given; after one it stays broken (every later
    feed raises it again): the connection is no longer in a known state.
    """

    def __init__(self, max_head: int = 65536, request_ids: Iterable[int] = (1,)) -> None:
        self._max_head = check_max_head(max_head)
        self._ids = check_request_ids(request_ids)
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
        self._error: str | None = None

    @property
    def max_head(self) -> int:
        """Bytes kept from the start of each request's STDOUT, and of its STDERR."""
        return self._max_head

    @property
    def request_ids(self) -> frozenset[int]:
        """The request ids whose records are accepted."""
        return self._ids

    @property
    def bytes_received(self) -> int:
        """Bytes fed since construction or since the last completed END_REQUEST."""
        return self._received

    @property
    def buffered(self) -> int:
        """Head bytes held for requests whose END_REQUEST has not arrived."""
        return sum(len(req.out) + len(req.err) for req in self._requests.values())

    def _on_header(self, version: int, rtype: int, rid: int, clen: int, plen: int) -> None:
        req = None
        if version != VERSION:
            raise RemoteProtocolError(
                f"unsupported FastCGI version {version} in record header (expected 1)"
            )
        if rtype in (STDOUT, STDERR, END_REQUEST):
            if rid == 0:
                raise RemoteProtocolError(
                    f"{TYPE_NAMES[rtype]} record with request id 0 (reserved for management)"
                )
            if rid not in self._ids:
                raise RemoteProtocolError(
                    f"{TYPE_NAMES[rtype]} record for request id {rid}, which this client did "
                    f"not send"
                )
            req = self._requests.get(rid)
            if req is None:
                req = self._requests[rid] = _Request()
            if rtype == END_REQUEST:
                if clen != 8:
                    raise RemoteProtocolError(
                        f"END_REQUEST record with content length {clen} (expected 8)"
                    )
                self._end.clear()
        elif rtype in (GET_VALUES_RESULT, UNKNOWN_TYPE):
            if rid != 0:
                raise RemoteProtocolError(
                    f"management record {TYPE_NAMES[rtype]} with request id {rid} (expected 0)"
                )
        elif 1 <= rtype <= 9:
            raise RemoteProtocolError(
                f"request-side record type {rtype} ({TYPE_NAMES[rtype]}) received from the server"
            )
        else:
            raise RemoteProtocolError(f"unknown FastCGI record type {rtype}")
        self._type = rtype
        self._rid = rid
        self._req = req
        self._content_left = clen
        self._pad_left = plen
        self._state = _ST_CONTENT if clen else _ST_PADDING

    def _finish(self) -> Response:
        """Turns the completed END_REQUEST into a Response; forgets the request."""
        req = self._requests.pop(self._rid)
        self._req = None
        app_status, protocol_status = _END_BODY.unpack(self._end)
        return Response(
            self._rid,
            bytes(req.out),
            bytes(req.err),
            app_status,
            protocol_status,
            req.out_size,
            req.err_size,
        )

    def feed(self, data: bytes | bytearray | memoryview) -> list[Response]:
        """Consumes bytes (any split); returns requests whose END_REQUEST completed in them."""
        if self._error is not None:
            raise RemoteProtocolError(f"parser is unusable after an earlier error: {self._error}")
        mv = memoryview(data).cast("B")
        n = len(mv)
        pos = 0
        mark = 0
        recv = self._received
        max_head = self._max_head
        results: list[Response] = []
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
                    if rtype == STDOUT:
                        req.out_size += take
                        room = max_head - len(req.out)
                        if room > 0:
                            req.out += mv[pos : pos + min(take, room)]
                    elif rtype == STDERR:
                        req.err_size += take
                        room = max_head - len(req.err)
                        if room > 0:
                            req.err += mv[pos : pos + min(take, room)]
                    elif rtype == END_REQUEST:
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
                    if self._type == END_REQUEST:
                        results.append(self._finish())
                        recv = 0
                        mark = pos
        except BaseException as exc:
            self._error = str(exc) or type(exc).__name__
            self._received = recv + n - mark
            raise
        self._received = recv + n - mark
        return results
