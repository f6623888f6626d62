# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Sans-IO FastCGI codec, compiled: one request encoded into one buffer, responses parsed in C.

The pure-Python twin `fastworker.fcgi_py` has the same API, the same error messages and
byte-identical output; tests/test_codec.py runs every vector through both. Keep them in step.

Why compiled: the worker encodes one request and parses one response per job, and the whole
per-job CPU budget is ~60 us (see DESIGN.md). Encoding therefore sizes the output first and
writes straight into one bytes object; parsing walks records with C ints, copies content
straight from the input into per-request C buffers (reused from request to request), and
creates no Python objects per record.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_Check,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_Check
from libc.string cimport memcpy, memset

__all__ = ["ProtocolError", "ResponseParser", "encode_request"]

cdef enum:
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

cdef enum:
    _RETAIN = 4 * 1024 * 1024  # output buffer kept between requests for reuse

cdef enum:  # parser states
    _ST_HEADER = 0
    _ST_CONTENT = 1
    _ST_PADDING = 2

_MAX_SIZE_LIMIT = 2**62  # fits a C Py_ssize_t with room to add a record length

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


class ProtocolError(ValueError):
    """The FastCGI peer sent a stream this client cannot trust; the connection must be dropped."""


# --------------------------------------------------------------------------------------------
# encoding


cdef inline Py_ssize_t _pad(Py_ssize_t n) noexcept nogil:
    """Padding that brings a record's content up to a multiple of 8 bytes."""
    return (8 - (n & 7)) & 7


cdef inline Py_ssize_t _pair_size(Py_ssize_t nlen, Py_ssize_t vlen) noexcept nogil:
    return (1 if nlen < 128 else 4) + (1 if vlen < 128 else 4) + nlen + vlen


cdef inline void _header(
    unsigned char* b, int rtype, Py_ssize_t rid, Py_ssize_t clen, Py_ssize_t plen
) noexcept nogil:
    b[0] = _VERSION
    b[1] = <unsigned char>rtype
    b[2] = <unsigned char>((rid >> 8) & 0xFF)
    b[3] = <unsigned char>(rid & 0xFF)
    b[4] = <unsigned char>((clen >> 8) & 0xFF)
    b[5] = <unsigned char>(clen & 0xFF)
    b[6] = <unsigned char>plen
    b[7] = 0


cdef inline Py_ssize_t _put_len(unsigned char* b, Py_ssize_t n) noexcept nogil:
    """Writes a name-value length (1 byte below 128, else 4 bytes with the high bit set)."""
    if n < 128:
        b[0] = <unsigned char>n
        return 1
    b[0] = <unsigned char>(((n >> 24) & 0x7F) | 0x80)
    b[1] = <unsigned char>((n >> 16) & 0xFF)
    b[2] = <unsigned char>((n >> 8) & 0xFF)
    b[3] = <unsigned char>(n & 0xFF)
    return 4


cdef inline Py_ssize_t _close_record(
    unsigned char* b, Py_ssize_t start, int rtype, Py_ssize_t rid, Py_ssize_t clen
) noexcept nogil:
    """Fills the header reserved at `start`, zeroes the padding; returns the record's end."""
    cdef Py_ssize_t pad = _pad(clen)
    _header(b + start, rtype, rid, clen, pad)
    memset(b + start + 8 + clen, 0, <size_t>pad)
    return start + 8 + clen + pad


cdef inline const char* _utf8(object o, Py_ssize_t* n, str what) except NULL:
    """Borrows the UTF-8 bytes of a str (cached by CPython) or a bytes object, without copying."""
    if PyUnicode_Check(o):
        return PyUnicode_AsUTF8AndSize(o, n)
    if PyBytes_Check(o):
        n[0] = PyBytes_GET_SIZE(o)
        return PyBytes_AS_STRING(o)
    raise TypeError(f"FastCGI param {what}s must be str or bytes, not {type(o).__name__}")


def _pair_too_big(name: object, size: int) -> str:
    return (
        f"FastCGI param {repr(name)[:80]} encodes to {size} bytes, more than the 65535 one "
        f"PARAMS record can carry (PHP-FPM drops a pair split across records); send large "
        f"data in the request body (stdin) instead"
    )


def encode_request(request_id, params, stdin=b"", keep_conn=True, shared=b""):
    """Encodes one RESPONDER request: BEGIN_REQUEST, PARAMS, empty PARAMS, STDIN, empty STDIN.

    Name-value pairs never cross a PARAMS record (PHP-FPM parses each record on its own); STDIN
    goes in 0xFFF8-byte records. `shared` is name-value pairs encoded beforehand (the content
    of a PARAMS record, at most 65535 bytes): they start the first PARAMS record, ahead of
    `params`, so params many requests share are encoded once and still cost FPM no extra record.
    Raises ValueError for a pair or `shared` over 65535 bytes or a request id outside 1..65535,
    TypeError for names/values that are neither str nor bytes.
    """
    cdef Py_ssize_t rid, total, cur, ps, nlen, vlen, pos, start, slen, off, chunk, nfull, rem
    cdef Py_ssize_t shlen
    cdef const char* np
    cdef const char* vp
    cdef const unsigned char* sp
    cdef unsigned char* b
    cdef Py_buffer view
    cdef bint have_view = False
    cdef dict d
    cdef bytes out
    cdef unsigned char flags

    if not isinstance(request_id, int):
        raise TypeError(f"request_id must be an int, not {type(request_id).__name__}")
    if not (0 < request_id < 65536):
        raise ValueError(f"request_id must be in 1..65535, got {request_id}")
    rid = request_id
    flags = _KEEP_CONN if keep_conn else 0
    d = params if type(params) is dict else dict(params)
    if not PyBytes_CheckExact(shared):
        shared = bytes(shared)
    shlen = PyBytes_GET_SIZE(shared)
    if shlen > _MAX_CONTENT:
        raise ValueError(f"shared params of {shlen} bytes do not fit in one PARAMS record")

    # stdin first: nothing that can run Python code may happen between the two passes below
    if PyBytes_CheckExact(stdin):
        sp = <const unsigned char*>PyBytes_AS_STRING(stdin)
        slen = PyBytes_GET_SIZE(stdin)
    else:
        stdin = memoryview(stdin).cast("B")
        PyObject_GetBuffer(stdin, &view, PyBUF_SIMPLE)
        have_view = True
        sp = <const unsigned char*>view.buf
        slen = view.len
    try:
        # pass 1: validate and size everything (the first PARAMS record starts with shared)
        total = 16
        cur = shlen
        for name, value in d.items():
            np = _utf8(name, &nlen, "name")
            vp = _utf8(value, &vlen, "value")
            ps = _pair_size(nlen, vlen)
            if ps > _MAX_CONTENT:
                raise ValueError(_pair_too_big(name, ps))
            if cur + ps > _MAX_CONTENT:
                total += 8 + cur + _pad(cur)
                cur = ps
            else:
                cur += ps
        if cur:
            total += 8 + cur + _pad(cur)
        total += 8
        nfull = slen // _STDIN_CHUNK
        rem = slen - nfull * _STDIN_CHUNK
        total += nfull * (8 + _STDIN_CHUNK) + 8
        if rem:
            total += 8 + rem + _pad(rem)

        # pass 2: write into one preallocated bytes object
        out = PyBytes_FromStringAndSize(NULL, total)
        b = <unsigned char*>PyBytes_AS_STRING(out)
        _header(b, _BEGIN_REQUEST, rid, 8, 0)
        b[8] = 0
        b[9] = _RESPONDER
        b[10] = flags
        memset(b + 11, 0, 5)
        start = 16
        pos = 24
        cur = shlen
        if shlen:
            memcpy(b + pos, PyBytes_AS_STRING(shared), <size_t>shlen)
            pos += shlen
        for name, value in d.items():
            np = _utf8(name, &nlen, "name")
            vp = _utf8(value, &vlen, "value")
            ps = _pair_size(nlen, vlen)
            if cur + ps > _MAX_CONTENT:
                start = _close_record(b, start, _PARAMS, rid, cur)
                pos = start + 8
                cur = 0
            if pos + ps > total:  # only if the mapping changed under us; never overrun
                raise RuntimeError("params changed while being encoded")
            pos += _put_len(b + pos, nlen)
            pos += _put_len(b + pos, vlen)
            memcpy(b + pos, np, <size_t>nlen)
            pos += nlen
            memcpy(b + pos, vp, <size_t>vlen)
            pos += vlen
            cur += ps
        if cur:
            pos = _close_record(b, start, _PARAMS, rid, cur)
        else:
            pos = start
        _header(b + pos, _PARAMS, rid, 0, 0)
        pos += 8
        off = 0
        while off < slen:
            chunk = slen - off
            if chunk > _STDIN_CHUNK:
                chunk = _STDIN_CHUNK
            memcpy(b + pos + 8, sp + off, <size_t>chunk)
            pos = _close_record(b, pos, _STDIN, rid, chunk)
            off += chunk
        _header(b + pos, _STDIN, rid, 0, 0)
        pos += 8
        if pos != total:
            raise RuntimeError("params changed while being encoded")
    finally:
        if have_view:
            PyBuffer_Release(&view)
    return out


# --------------------------------------------------------------------------------------------
# parsing


cdef int _reserve(char** buf, Py_ssize_t* cap, Py_ssize_t need, Py_ssize_t limit) except -1:
    """Grows an output buffer to hold `need` bytes: doubling, but never past `limit`."""
    cdef Py_ssize_t newcap
    cdef char* grown
    if need <= cap[0]:
        return 0
    newcap = cap[0] * 2
    if newcap < 4096:
        newcap = 4096
    if newcap > limit:
        newcap = limit
    if newcap < need:
        newcap = need
    grown = <char*>PyMem_Realloc(buf[0], <size_t>newcap)
    if grown == NULL:
        raise MemoryError()
    buf[0] = grown
    cap[0] = newcap
    return 0


cdef class _Request:
    """Output accumulated for one request id until its END_REQUEST.

    Plain C buffers, recycled by the parser for the next request: a response of a few MB then
    costs two memcpys, where fresh allocations per request page-fault new memory every time.
    """

    cdef char* out
    cdef Py_ssize_t out_len
    cdef Py_ssize_t out_cap
    cdef char* err
    cdef Py_ssize_t err_len
    cdef Py_ssize_t err_cap
    cdef Py_ssize_t size

    def __dealloc__(self):
        PyMem_Free(self.out)
        PyMem_Free(self.err)


cdef class ResponseParser:
    """Incremental FastCGI response parser: feed it bytes as they arrive, get finished requests.

    It buffers at most one record header and one END_REQUEST body; record content goes straight
    into the request's output, which is bounded by `max_size` (stdout + stderr per request).
    Between requests it keeps up to 4 MiB of output buffer for reuse. After a ProtocolError it
    stays broken: the connection is no longer in a known state.
    """

    cdef readonly Py_ssize_t max_size
    cdef Py_ssize_t _received
    cdef unsigned char _hdr[8]
    cdef unsigned char _end[8]
    cdef int _hdr_len
    cdef int _end_len
    cdef int _state
    cdef int _type
    cdef int _rid
    cdef Py_ssize_t _content_left
    cdef Py_ssize_t _pad_left
    cdef dict _requests
    cdef _Request _req
    cdef _Request _spare
    cdef object _error

    def __init__(self, max_size=64 * 1024 * 1024):
        if not isinstance(max_size, int):
            raise TypeError(f"max_size must be an int, not {type(max_size).__name__}")
        if not 0 <= max_size <= _MAX_SIZE_LIMIT:
            raise ValueError(f"max_size must be in 0..{_MAX_SIZE_LIMIT}, got {max_size}")
        self.max_size = max_size
        self._received = 0
        self._hdr_len = 0
        self._end_len = 0
        self._state = _ST_HEADER
        self._type = 0
        self._rid = 0
        self._content_left = 0
        self._pad_left = 0
        self._requests = {}
        self._req = None
        self._spare = None
        self._error = None

    @property
    def bytes_received(self):
        """Bytes fed since construction or since the last completed END_REQUEST."""
        return self._received

    cdef _Request _lookup(self, int rid):
        cdef _Request req = self._req
        if req is not None and self._rid == rid:
            return req
        req = self._requests.get(rid)
        if req is None:
            req = self._spare
            if req is None:
                req = _Request()
            else:
                self._spare = None
            self._requests[rid] = req
        return req

    cdef int _on_header(self, const unsigned char* h) except -1:
        cdef int version = h[0]
        cdef int rtype = h[1]
        cdef int rid = (h[2] << 8) | h[3]
        cdef Py_ssize_t clen = (h[4] << 8) | h[5]
        cdef Py_ssize_t plen = h[6]
        cdef _Request req = None
        cdef Py_ssize_t left
        if version != _VERSION:
            raise ProtocolError(
                f"unsupported FastCGI version {version} in record header (expected 1)"
            )
        if rtype == _STDOUT or rtype == _STDERR or rtype == _END_REQUEST:
            if rid == 0:
                raise ProtocolError(
                    f"{_TYPE_NAMES[rtype]} record with request id 0 (reserved for management)"
                )
            req = self._lookup(rid)
            if rtype == _END_REQUEST:
                if clen != 8:
                    raise ProtocolError(
                        f"END_REQUEST record with content length {clen} (expected 8)"
                    )
                self._end_len = 0
            elif clen:
                if req.size + clen > self.max_size:
                    raise ProtocolError(
                        f"response exceeds max_size ({self.max_size} bytes) for request {rid}"
                    )
                req.size += clen
                left = self.max_size - req.size  # what this request may still add after this
                if rtype == _STDOUT:
                    _reserve(&req.out, &req.out_cap, req.out_len + clen, req.out_len + clen + left)
                else:
                    _reserve(&req.err, &req.err_cap, req.err_len + clen, req.err_len + clen + left)
        elif rtype == _GET_VALUES_RESULT or rtype == _UNKNOWN_TYPE:
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
        return 0

    cdef object _finish(self):
        """Turns the completed END_REQUEST into a result tuple; recycles the request's buffers."""
        cdef _Request req = self._req
        cdef const unsigned char* e = self._end
        cdef unsigned int app_status = (
            (<unsigned int>e[0] << 24) | (<unsigned int>e[1] << 16)
            | (<unsigned int>e[2] << 8) | <unsigned int>e[3]
        )
        result = (
            self._rid,
            PyBytes_FromStringAndSize(req.out, req.out_len),
            PyBytes_FromStringAndSize(req.err, req.err_len),
            app_status,
            e[4],
        )
        del self._requests[self._rid]
        self._req = None
        if self._spare is None:
            if req.out_cap > _RETAIN:
                PyMem_Free(req.out)
                req.out = NULL
                req.out_cap = 0
            if req.err_cap > _RETAIN:
                PyMem_Free(req.err)
                req.err = NULL
                req.err_cap = 0
            req.out_len = 0
            req.err_len = 0
            req.size = 0
            self._spare = req
        return result

    def feed(self, data):
        """Consumes bytes (any split); returns requests whose END_REQUEST completed in them."""
        cdef Py_buffer view
        cdef bint have_view = False
        cdef const unsigned char* p
        cdef Py_ssize_t n, pos = 0, mark = 0, recv, take
        cdef int need
        cdef _Request req
        cdef list results = []
        if self._error is not None:
            raise ProtocolError(f"parser is unusable after an earlier error: {self._error}")
        if PyBytes_CheckExact(data):
            p = <const unsigned char*>PyBytes_AS_STRING(data)
            n = PyBytes_GET_SIZE(data)
        else:
            data = memoryview(data).cast("B")
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            have_view = True
            p = <const unsigned char*>view.buf
            n = view.len
        recv = self._received
        try:
            while pos < n:
                if self._state == _ST_HEADER:
                    if self._hdr_len == 0 and n - pos >= 8:
                        pos += 8
                        self._on_header(p + pos - 8)
                    else:
                        need = 8 - self._hdr_len
                        take = n - pos if n - pos < need else need
                        memcpy(self._hdr + self._hdr_len, p + pos, <size_t>take)
                        self._hdr_len += <int>take
                        pos += take
                        if self._hdr_len < 8:
                            break
                        self._hdr_len = 0
                        self._on_header(self._hdr)
                elif self._state == _ST_CONTENT:
                    take = n - pos
                    if take > self._content_left:
                        take = self._content_left
                    req = self._req
                    if self._type == _STDOUT:
                        memcpy(req.out + req.out_len, p + pos, <size_t>take)
                        req.out_len += take
                    elif self._type == _STDERR:
                        memcpy(req.err + req.err_len, p + pos, <size_t>take)
                        req.err_len += take
                    elif self._type == _END_REQUEST:
                        memcpy(self._end + self._end_len, p + pos, <size_t>take)
                        self._end_len += <int>take
                    pos += take
                    self._content_left -= take
                    if self._content_left == 0:
                        self._state = _ST_PADDING
                else:
                    take = n - pos
                    if take > self._pad_left:
                        take = self._pad_left
                    pos += take
                    self._pad_left -= take
                if self._state == _ST_PADDING and self._pad_left == 0:
                    self._state = _ST_HEADER
                    if self._type == _END_REQUEST:
                        results.append(self._finish())
                        recv = 0
                        mark = pos
        except BaseException as exc:
            self._error = str(exc) or type(exc).__name__
            self._received = recv + n - mark
            raise
        finally:
            if have_view:
                PyBuffer_Release(&view)
        self._received = recv + n - mark
        return results
