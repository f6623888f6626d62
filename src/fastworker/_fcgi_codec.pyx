# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Sans-IO FastCGI codec, compiled: requests encoded into one buffer, responses parsed in C.

The pure-Python twin `fastworker.fcgi_py` has the same API, the same results, the same error
types and messages, and byte-identical output; tests/test_codec.py and tests/test_fcgi_fuzz.py
run every vector through both. What the twins share (the exceptions, the `Response` result,
the argument checks and error messages, the protocol's numbers) lives in `fastworker.fcgi_base`;
this module repeats the numbers as C enums for its loops and refuses to import if they ever
disagree. Keep the loops in step with the twin.

Why compiled: the worker encodes one request and parses one response per job, and the whole
per-job worker CPU is a few tens of microseconds. Encoding therefore walks the params once,
borrowing each name's and value's bytes (an ASCII str's own data, inline) into a C array, sizes
the output and writes straight into one bytes object; parsing walks records with C ints, keeps
only the head of each output stream in per-request C buffers (reused from request to request),
counts the rest, and creates no Python objects per record. A response that arrives as whole
records of the one request id (the usual case) takes a straight-line fast path through them.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_Check,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.dict cimport PyDict_Next, PyDict_Size
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_Check
from libc.string cimport memcpy, memset

from fastworker import fcgi_base
from fastworker.fcgi_base import (
    FORM_SAFE,
    TYPE_NAMES,
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

# fcgi_base's numbers, as C constants for the loops (checked against fcgi_base below)
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
    _RETAIN = 4 * 1024 * 1024  # head buffer kept between requests for reuse
    _MIN_ALLOC = 256  # smallest head buffer allocated

cdef enum:  # parser states
    _ST_HEADER = 0
    _ST_CONTENT = 1
    _ST_PADDING = 2


cdef int _agree_with_base() except -1:
    cdef dict ours = {
        "VERSION": _VERSION, "BEGIN_REQUEST": _BEGIN_REQUEST, "END_REQUEST": _END_REQUEST,
        "PARAMS": _PARAMS, "STDIN": _STDIN, "STDOUT": _STDOUT, "STDERR": _STDERR,
        "GET_VALUES_RESULT": _GET_VALUES_RESULT, "UNKNOWN_TYPE": _UNKNOWN_TYPE,
        "RESPONDER": _RESPONDER, "KEEP_CONN": _KEEP_CONN, "MAX_CONTENT": _MAX_CONTENT,
        "STDIN_CHUNK": _STDIN_CHUNK,
    }
    cdef list differ = [name for name, value in ours.items() if getattr(fcgi_base, name) != value]
    if differ or fcgi_base.MAX_HEAD_LIMIT > (<Py_ssize_t>1 << 62):
        raise ImportError(
            f"fastworker._fcgi_codec disagrees with fastworker.fcgi_base on {differ}: rebuild it"
        )
    return 0


_agree_with_base()

cdef extern from "Python.h":
    object PyType_GenericAlloc(PyTypeObject* t, Py_ssize_t nitems)

cdef object _Response = Response
if Response.__base__ is not tuple or Response.__basicsize__ != tuple.__basicsize__:
    raise ImportError("fastworker.fcgi_base.Response is no longer a plain NamedTuple")


cdef inline void _put(object t, Py_ssize_t i, object item) noexcept:
    Py_INCREF(item)
    PyTuple_SET_ITEM(t, i, item)


cdef object _new_response(
    object rid, object out, object err, object app_status, object protocol_status,
    object out_size, object err_size,
):
    """A Response, built the way tuple.__new__(Response, ...) builds it, minus the calls and
    the temporary tuple (which took parse_small from 240 to 400 ns)."""
    cdef object r = PyType_GenericAlloc(<PyTypeObject*>_Response, 7)
    _put(r, 0, rid)
    _put(r, 1, out)
    _put(r, 2, err)
    _put(r, 3, app_status)
    _put(r, 4, protocol_status)
    _put(r, 5, out_size)
    _put(r, 6, err_size)
    return r


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


cdef extern from *:
    """
    #include <stdint.h>
    /* (dst - src) modulo 4 KiB: how far the destination runs ahead of the source in the page. */
    #define __pyx_fw_page_delta(d, s) ((size_t)(((uintptr_t)(d) - (uintptr_t)(s)) & 4095))
    """
    size_t _page_delta "__pyx_fw_page_delta"(const void* d, const void* s) noexcept nogil


cdef inline void _copy(void* dst, const void* src, Py_ssize_t n) noexcept nogil:
    """memcpy for bulk data (stdin, output heads) that keeps its speed wherever the buffers lie.

    A large forward copy whose destination sits 1..63 bytes past its source modulo 4 KiB
    suffers 4K aliasing (each load waits on a store to the same page offset): glibc's memcpy
    then runs up to 20 times slower (30 us instead of 1.2 for 64 KiB here). Where our output
    lands is malloc's choice, so that is a lottery; in that window, copy from the end down in
    64-byte steps (inlined), so that no load follows a recent store to its page offset.
    """
    cdef unsigned char* d = <unsigned char*>dst
    cdef const unsigned char* s = <const unsigned char*>src
    cdef size_t delta = _page_delta(d, s)
    if n > 4096 and 0 < delta < 64:
        while n >= 64:
            n -= 64
            memcpy(d + n, s + n, 64)
    memcpy(d, s, <size_t>n)


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


cdef inline Py_ssize_t _put_pair(
    unsigned char* b, const char* np, Py_ssize_t nlen, const char* vp, Py_ssize_t vlen
) noexcept nogil:
    """Writes one name-value pair; returns its size."""
    cdef Py_ssize_t pos = _put_len(b, nlen)
    pos += _put_len(b + pos, vlen)
    memcpy(b + pos, np, <size_t>nlen)
    pos += nlen
    memcpy(b + pos, vp, <size_t>vlen)
    return pos + vlen


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
    raise not_str_or_bytes(what, o)


cdef extern from *:
    """
    /* The bytes of an exact ASCII str (its UTF-8 is its data) or an exact bytes object,
       inline and without a call; NULL for anything else, which takes _utf8. */
    static CYTHON_INLINE const char* __pyx_fw_fast_utf8(PyObject* o, Py_ssize_t* n) {
        if (PyUnicode_CheckExact(o) && PyUnicode_IS_COMPACT_ASCII(o)) {
            *n = PyUnicode_GET_LENGTH(o);
            return (const char*)PyUnicode_DATA(o);
        }
        if (PyBytes_CheckExact(o)) {
            *n = PyBytes_GET_SIZE(o);
            return PyBytes_AS_STRING(o);
        }
        return NULL;
    }
    """
    const char* _fast_utf8 "__pyx_fw_fast_utf8"(PyObject* o, Py_ssize_t* n) noexcept


cdef struct _Pair:
    const char* np  # borrowed from the name/value objects, which the dict keeps alive
    const char* vp
    Py_ssize_t nlen
    Py_ssize_t vlen
    Py_ssize_t size  # encoded size: both lengths and both strings

cdef enum:
    _STACK_PAIRS = 64  # pairs collected on the C stack; more take one PyMem_Malloc


cdef Py_ssize_t _collect(dict d, _Pair* pairs, Py_ssize_t cap) except -1:
    """Checks and borrows every pair of `d`, in order (one pass, no Python objects made).

    Raises what the twin raises for the first bad pair. Nothing here runs Python code, so `d`
    and its strings cannot change (or go away) until the caller has written the pairs out.
    """
    cdef Py_ssize_t i = 0, k = 0, nlen, vlen, ps
    cdef PyObject* key
    cdef PyObject* value
    cdef const char* np
    cdef const char* vp
    while PyDict_Next(d, &i, &key, &value):
        np = _fast_utf8(key, &nlen)
        if np == NULL:
            np = _utf8(<object>key, &nlen, "name")
        vp = _fast_utf8(value, &vlen)
        if vp == NULL:
            vp = _utf8(<object>value, &vlen, "value")
        ps = _pair_size(nlen, vlen)
        if ps > _MAX_CONTENT:
            raise pair_too_big(<object>key, ps)
        if k >= cap:  # cannot happen: nothing can add to the dict while we walk it
            raise RuntimeError("params changed while being encoded")
        pairs[k].np = np
        pairs[k].vp = vp
        pairs[k].nlen = nlen
        pairs[k].vlen = vlen
        pairs[k].size = ps
        k += 1
    return k


cdef inline Py_ssize_t _put_pairs(
    unsigned char* b, const _Pair* pairs, Py_ssize_t first, Py_ssize_t last
) noexcept nogil:
    """Writes pairs[first:last] at `b`; returns the bytes written."""
    cdef Py_ssize_t pos = 0, k
    for k in range(first, last):
        pos += _put_pair(b + pos, pairs[k].np, pairs[k].nlen, pairs[k].vp, pairs[k].vlen)
    return pos


def encode_params(params):
    """The name-value pairs of `params`, encoded as the content of one PARAMS record.

    What `encode_request` takes as `shared`: params many requests share, encoded once.
    Raises LocalProtocolError (a ValueError) when they take more than the 65535 bytes of one
    record (after checking every pair, in order, as `encode_request` does), TypeError for
    names/values that are neither str nor bytes.
    """
    cdef Py_ssize_t total = 0, npairs, count, k
    cdef _Pair stack[_STACK_PAIRS]
    cdef _Pair* pairs = stack
    cdef dict d = params if type(params) is dict else dict(params)
    cdef bytes out
    npairs = PyDict_Size(d)
    if npairs > _STACK_PAIRS:
        pairs = <_Pair*>PyMem_Malloc(<size_t>npairs * sizeof(_Pair))
        if pairs == NULL:
            raise MemoryError()
    try:
        count = _collect(d, pairs, npairs)
        for k in range(count):
            total += pairs[k].size
        if total > _MAX_CONTENT:
            raise params_too_big(total)
        out = PyBytes_FromStringAndSize(NULL, total)
        _put_pairs(<unsigned char*>PyBytes_AS_STRING(out), pairs, 0, count)
    finally:
        if pairs != stack:
            PyMem_Free(pairs)
    return out


def encode_request(request_id, params, stdin=b"", keep_conn=True, shared=b""):
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
    cdef Py_ssize_t rid, total, cur, ps, pos, start, slen, off, chunk, nfull, rem
    cdef Py_ssize_t shlen, npairs, count, k
    cdef const unsigned char* sp
    cdef unsigned char* b
    cdef Py_buffer view
    cdef bint have_view = False
    cdef _Pair stack[_STACK_PAIRS]
    cdef _Pair* pairs = stack
    cdef dict d
    cdef bytes out
    cdef unsigned char flags

    if not isinstance(request_id, int) or not (0 < request_id < 65536):
        check_request_id(request_id)  # raises the error the twin raises
    rid = request_id
    flags = _KEEP_CONN if keep_conn else 0
    d = params if type(params) is dict else dict(params)
    if not PyBytes_CheckExact(stdin):
        stdin = byte_view(stdin, "stdin")
    if not PyBytes_CheckExact(shared):
        shared = bytes(byte_view(shared, "shared"))
    shlen = PyBytes_GET_SIZE(shared)
    if shlen > _MAX_CONTENT:
        raise shared_too_big(shlen)

    # nothing that can run Python code may happen between here and the end of pass 2
    if PyBytes_CheckExact(stdin):
        sp = <const unsigned char*>PyBytes_AS_STRING(stdin)
        slen = PyBytes_GET_SIZE(stdin)
    else:
        PyObject_GetBuffer(stdin, &view, PyBUF_SIMPLE)
        have_view = True
        sp = <const unsigned char*>view.buf
        slen = view.len
    try:
        npairs = PyDict_Size(d)
        if npairs > _STACK_PAIRS:
            pairs = <_Pair*>PyMem_Malloc(<size_t>npairs * sizeof(_Pair))
            if pairs == NULL:
                raise MemoryError()

        # pass 1: validate and borrow every pair, then size the records (the first PARAMS
        # record starts with shared)
        count = _collect(d, pairs, npairs)
        total = 16
        cur = shlen
        for k in range(count):
            ps = pairs[k].size
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
            _copy(b + pos, PyBytes_AS_STRING(shared), shlen)
            pos += shlen
        for k in range(count):
            ps = pairs[k].size
            if cur + ps > _MAX_CONTENT:
                start = _close_record(b, start, _PARAMS, rid, cur)
                pos = start + 8
                cur = 0
            pos += _put_pair(b + pos, pairs[k].np, pairs[k].nlen, pairs[k].vp, pairs[k].vlen)
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
            _copy(b + pos + 8, sp + off, chunk)
            pos = _close_record(b, pos, _STDIN, rid, chunk)
            off += chunk
        _header(b + pos, _STDIN, rid, 0, 0)
        pos += 8
        if pos != total:  # cannot happen: the sizes above are the ones written
            raise RuntimeError("params changed while being encoded")
    finally:
        if have_view:
            PyBuffer_Release(&view)
        if pairs != stack:
            PyMem_Free(pairs)
    return out


# encode_form_value: 1 for a byte that becomes %XX (all but fcgi_base.FORM_SAFE)
cdef unsigned char _FORM_UNSAFE[256]
cdef const char* _HEX = b"0123456789ABCDEF"


cdef int _init_form_table() except -1:
    cdef int c
    memset(_FORM_UNSAFE, 1, 256)
    for c in FORM_SAFE:
        _FORM_UNSAFE[c] = 0
    return 0


_init_form_table()


def encode_form_value(data):
    """`data` percent-encoded as one application/x-www-form-urlencoded value (a job's data sent
    as the request body): every byte outside fcgi_base.FORM_SAFE becomes %XX, upper-case hex,
    as the twin's urllib.parse.quote_from_bytes does (about 60 ns a byte there: 4 ms for the
    64 KiB a large job carries).

    Runs of bytes that pass unchanged (nearly all of the base64 text the bundle sends) are
    found eight bytes at a time and copied whole."""
    cdef Py_buffer view
    cdef const unsigned char* s
    cdef unsigned char* d
    cdef Py_ssize_t n, i, start, escaped = 0
    if not PyBytes_CheckExact(data):
        data = byte_view(data, "data")
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        s = <const unsigned char*>view.buf
        n = view.len
        i = 0
        while i + 8 <= n:
            escaped += (
                _FORM_UNSAFE[s[i]] + _FORM_UNSAFE[s[i + 1]] + _FORM_UNSAFE[s[i + 2]]
                + _FORM_UNSAFE[s[i + 3]] + _FORM_UNSAFE[s[i + 4]] + _FORM_UNSAFE[s[i + 5]]
                + _FORM_UNSAFE[s[i + 6]] + _FORM_UNSAFE[s[i + 7]]
            )
            i += 8
        while i < n:
            escaped += _FORM_UNSAFE[s[i]]
            i += 1
        if not escaped:
            return PyBytes_FromStringAndSize(<const char*>s, n)
        out = PyBytes_FromStringAndSize(NULL, n + 2 * escaped)
        d = <unsigned char*>PyBytes_AS_STRING(out)
        i = 0
        while i < n:
            start = i
            while i + 8 <= n and not (
                _FORM_UNSAFE[s[i]] | _FORM_UNSAFE[s[i + 1]] | _FORM_UNSAFE[s[i + 2]]
                | _FORM_UNSAFE[s[i + 3]] | _FORM_UNSAFE[s[i + 4]] | _FORM_UNSAFE[s[i + 5]]
                | _FORM_UNSAFE[s[i + 6]] | _FORM_UNSAFE[s[i + 7]]
            ):
                i += 8
            while i < n and not _FORM_UNSAFE[s[i]]:
                i += 1
            if i > start:
                memcpy(d, s + start, <size_t>(i - start))
                d += i - start
            while i < n and _FORM_UNSAFE[s[i]]:
                d[0] = 37  # '%'
                d[1] = _HEX[s[i] >> 4]
                d[2] = _HEX[s[i] & 15]
                d += 3
                i += 1
        return out
    finally:
        PyBuffer_Release(&view)


# --------------------------------------------------------------------------------------------
# parsing


cdef int _keep(
    char** buf, Py_ssize_t* length, Py_ssize_t* cap, const unsigned char* src, Py_ssize_t n,
    Py_ssize_t max_head,
) except -1:
    """Appends what fits of `n` bytes under `max_head`; the buffer grows with the data only."""
    cdef Py_ssize_t room = max_head - length[0], need, newcap
    cdef char* grown
    if n > room:
        n = room
    if n <= 0:
        return 0
    need = length[0] + n
    if need > cap[0]:
        newcap = cap[0] * 2
        if newcap < _MIN_ALLOC:
            newcap = _MIN_ALLOC
        if newcap < need:
            newcap = need
        if newcap > max_head:
            newcap = max_head
        grown = <char*>PyMem_Realloc(buf[0], <size_t>newcap)
        if grown == NULL:
            raise MemoryError()
        buf[0] = grown
        cap[0] = newcap
    _copy(buf[0] + length[0], src, n)
    length[0] = need
    return 0


cdef inline object _response(_Request req, int rid, const unsigned char* e):
    """The Response for `req`, whose END_REQUEST body (8 bytes) is at `e`."""
    cdef unsigned int app_status = (
        (<unsigned int>e[0] << 24) | (<unsigned int>e[1] << 16)
        | (<unsigned int>e[2] << 8) | <unsigned int>e[3]
    )
    return _new_response(
        rid,
        PyBytes_FromStringAndSize(req.out, req.out_len),
        PyBytes_FromStringAndSize(req.err, req.err_len),
        app_status,
        e[4],
        req.out_size,
        req.err_size,
    )


cdef class _Request:
    """One open request: the heads of its STDOUT and STDERR, and how much of each arrived.

    Plain C buffers, recycled by the parser for the next request, so a parser that keeps
    answering small responses allocates nothing after the first one.
    """

    cdef char* out
    cdef Py_ssize_t out_len
    cdef Py_ssize_t out_cap
    cdef Py_ssize_t out_size
    cdef char* err
    cdef Py_ssize_t err_len
    cdef Py_ssize_t err_cap
    cdef Py_ssize_t err_size

    cdef void reset(self) noexcept:
        if self.out_cap > _RETAIN:
            PyMem_Free(self.out)
            self.out = NULL
            self.out_cap = 0
        if self.err_cap > _RETAIN:
            PyMem_Free(self.err)
            self.err = NULL
            self.err_cap = 0
        self.out_len = 0
        self.err_len = 0
        self.out_size = 0
        self.err_size = 0

    def __dealloc__(self):
        PyMem_Free(self.out)
        PyMem_Free(self.err)


cdef class ResponseParser:
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

    cdef readonly Py_ssize_t max_head
    cdef Py_ssize_t _received
    cdef unsigned char _hdr[8]
    cdef unsigned char _end[8]
    cdef int _hdr_len
    cdef int _end_len
    cdef int _state
    cdef int _type
    cdef int _rid
    cdef int _single  # the one accepted request id, or 0 when there are several
    cdef object _ids
    cdef Py_ssize_t _content_left
    cdef Py_ssize_t _pad_left
    cdef _Request _only  # with a single id: its request, reset in place after each END_REQUEST
    cdef dict _requests  # with several ids: the open requests by id
    cdef _Request _req
    cdef _Request _spare
    cdef object _error

    def __init__(self, max_head=65536, request_ids=(1,)):
        self.max_head = check_max_head(max_head)
        self._ids = check_request_ids(request_ids)
        self._single = next(iter(self._ids)) if len(self._ids) == 1 else 0
        self._received = 0
        self._hdr_len = 0
        self._end_len = 0
        self._state = _ST_HEADER
        self._type = 0
        self._rid = 0
        self._content_left = 0
        self._pad_left = 0
        self._only = None
        self._requests = {}
        self._req = None
        self._spare = None
        self._error = None

    @property
    def request_ids(self):
        """The request ids whose records are accepted."""
        return self._ids

    @property
    def bytes_received(self):
        """Bytes fed since construction or since the last completed END_REQUEST."""
        return self._received

    @property
    def buffered(self):
        """Head bytes held for requests whose END_REQUEST has not arrived."""
        cdef _Request req
        cdef Py_ssize_t total = 0
        if self._only is not None:
            total = self._only.out_len + self._only.err_len
        for req in self._requests.values():
            total += req.out_len + req.err_len
        return total

    cdef _Request _lookup(self, int rtype, int rid):
        cdef _Request req
        if rid == self._single:
            req = self._only
            if req is None:
                req = self._only = _Request()
            return req
        if self._single or rid not in self._ids:
            raise RemoteProtocolError(
                f"{TYPE_NAMES[rtype]} record for request id {rid}, which this client did "
                f"not send"
            )
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
        if version != _VERSION:
            raise RemoteProtocolError(
                f"unsupported FastCGI version {version} in record header (expected 1)"
            )
        if rtype == _STDOUT or rtype == _STDERR or rtype == _END_REQUEST:
            if rid == 0:
                raise RemoteProtocolError(
                    f"{TYPE_NAMES[rtype]} record with request id 0 (reserved for management)"
                )
            req = self._lookup(rtype, rid)
            if rtype == _END_REQUEST:
                if clen != 8:
                    raise RemoteProtocolError(
                        f"END_REQUEST record with content length {clen} (expected 8)"
                    )
                self._end_len = 0
        elif rtype == _GET_VALUES_RESULT or rtype == _UNKNOWN_TYPE:
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
        return 0

    cdef object _finish(self):
        """Turns the completed END_REQUEST into a Response; recycles the request's buffers."""
        cdef _Request req = self._req
        result = _response(req, self._rid, self._end)
        self._req = None
        if req is self._only:
            req.reset()
        else:
            del self._requests[self._rid]
            if self._spare is None:
                req.reset()
                self._spare = req
        return result

    def feed(self, data):
        """Consumes bytes (any split); returns requests whose END_REQUEST completed in them."""
        cdef Py_buffer view
        cdef bint have_view = False
        cdef const unsigned char* p
        cdef Py_ssize_t n, pos = 0, mark = 0, recv, take
        cdef const unsigned char* h
        cdef Py_ssize_t clen, end, max_head
        cdef int need, rtype, single
        cdef _Request req
        cdef list results = None  # created at the first response, exactly sized (usually 1)
        if self._error is not None:
            raise RemoteProtocolError(f"parser is unusable after an earlier error: {self._error}")
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
            if self._single and self._state == _ST_HEADER and self._hdr_len == 0:
                # fast path, the usual case: whole STDOUT/STDERR/END_REQUEST records of the one
                # request id, from a record boundary. Anything else (a split record, another
                # type, a bad header) leaves it at that record's header for the loop below,
                # which treats it (and raises) exactly as if the fast path did not exist.
                single = self._single
                max_head = self.max_head
                while n - pos >= 8:
                    h = p + pos
                    clen = (h[4] << 8) | h[5]
                    end = pos + 8 + clen + h[6]
                    if h[0] != _VERSION or ((h[2] << 8) | h[3]) != single or end > n:
                        break
                    rtype = h[1]
                    if rtype != _STDOUT and rtype != _STDERR and (
                        rtype != _END_REQUEST or clen != 8
                    ):
                        break
                    req = self._only
                    if req is None:
                        req = self._only = _Request()
                    if rtype == _STDOUT:
                        req.out_size += clen
                        if req.out_len < max_head:
                            _keep(&req.out, &req.out_len, &req.out_cap, h + 8, clen, max_head)
                    elif rtype == _STDERR:
                        req.err_size += clen
                        if req.err_len < max_head:
                            _keep(&req.err, &req.err_len, &req.err_cap, h + 8, clen, max_head)
                    else:  # END_REQUEST: its 8-byte body is right here
                        result = _response(req, single, h + 8)
                        req.reset()
                        if results is None:
                            results = [result]
                        else:
                            results.append(result)
                        recv = 0
                        mark = end
                    pos = end
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
                        req.out_size += take
                        if req.out_len < self.max_head:
                            _keep(&req.out, &req.out_len, &req.out_cap, p + pos, take,
                                  self.max_head)
                    elif self._type == _STDERR:
                        req.err_size += take
                        if req.err_len < self.max_head:
                            _keep(&req.err, &req.err_len, &req.err_cap, p + pos, take,
                                  self.max_head)
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
                        if results is None:
                            results = [self._finish()]
                        else:
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
        return results if results is not None else []
