# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Sans-IO AMQP 0-9-1 frame codec, compiled: deliveries out of a byte stream, acks into bytes.

Why compiled: aiormq spends 62-89 us of CPU per message on consume + ack (pamqp objects for
every frame, a task per delivery), while the whole per-job budget is ~60 us. Here the
Basic.Deliver method, the content header and the body frames of a delivery are walked with C
ints and turned into one `Delivery`; consumer tags, exchanges, routing keys and property blocks
repeat, so the last object of each is reused instead of built again; a body that fits one frame
is copied once from the input; acks are written straight into one bytes object. Everything else
(handshake, qos, consume-ok, cancel, close, heartbeats) is returned raw, as a `Frame`, for the
Python side.

The pure-Python twin `fastworker.amqp_py` has the same API, the same results, the same error
types and messages, and byte-identical acks; tests/test_amqp_codec.py and
tests/test_amqp_fuzz.py run every vector through both. What the twins share (the exceptions,
`Delivery` and `Frame`, the argument checks and error messages, `decode_properties`, the
protocol's numbers) lives in `fastworker.amqp_base`; this module repeats the numbers as C enums
for its loops and refuses to import if they ever disagree. Keep the loops in step with the twin.

`FrameReader(frame_max, max_body_size).feed(data)` returns, in stream order, a
`Delivery(channel, delivery_tag, redelivered, exchange, routing_key, consumer_tag,
properties_raw, body, body_size)` per completed delivery and a `Frame(frame_type, channel,
payload)` per other frame. `properties_raw` is the content header from the property-flags word
on, undecoded: the per-message path decodes no properties; `decode_properties` turns it into
`(properties, headers)` and raises only `PropertyError`, a fault of that one message.
`body` is None when `body_size > max_body_size`: that body is counted and discarded frame by
frame, the stream stays usable. A body of several frames is kept as the frames received (joined
at the end), never reserved ahead of the data; a partial frame buffer grows with the data too.

`feed` raises only `RemoteProtocolError` (not a ValueError): drop the connection. The reader then
stays unusable: every later `feed` raises `RemoteProtocolError("reader is unusable after an
earlier error: <first error>")`. The encoders raise TypeError for a channel or tag that is no
int, LocalProtocolError (a ValueError) for one out of range.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.list cimport PyList_GET_SIZE
from cpython.long cimport PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.object cimport PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from fastworker import amqp_base
from fastworker.amqp_base import (
    DEFAULT_FRAME_MAX,
    DEFAULT_MAX_BODY_SIZE,
    FRAME_BODY,
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

# amqp_base's numbers, as C constants for the loops (checked against amqp_base below)
cdef enum:
    _METHOD = 1
    _HEADER = 2
    _BODY = 3
    _HEARTBEAT = 8
    _FRAME_END = 0xCE
    _CLASS_BASIC = 60
    _DELIVER = 60
    _ACK_METHOD = 80
    _NACK_METHOD = 120
    _ACK_SIZE = 21
    _MAX_CHANNEL = 0xFFFF

cdef enum:
    _MIN_CAP = 4096  # smallest partial-frame buffer allocated

cdef enum:  # assembly states
    _IDLE = 0
    _WANT_HEADER = 1
    _WANT_BODY = 2

cdef bytes _EMPTY = b""


cdef int _agree_with_base() except -1:
    cdef dict ours = {
        "FRAME_METHOD": _METHOD, "FRAME_HEADER": _HEADER, "FRAME_BODY": _BODY,
        "FRAME_HEARTBEAT": _HEARTBEAT, "FRAME_END": _FRAME_END, "CLASS_BASIC": _CLASS_BASIC,
        "BASIC_DELIVER": _DELIVER, "BASIC_ACK": _ACK_METHOD, "BASIC_NACK": _NACK_METHOD,
        "ACK_SIZE": _ACK_SIZE, "MAX_CHANNEL": _MAX_CHANNEL, "MAX_TAG": 0xFFFFFFFFFFFFFFFF,
        "MAX_FRAME_MAX": 0xFFFFFFFF,
    }
    cdef list differ = [name for name, value in ours.items() if getattr(amqp_base, name) != value]
    if differ:
        raise ImportError(
            f"fastworker._amqp_codec disagrees with fastworker.amqp_base on {differ}: rebuild it"
        )
    return 0


_agree_with_base()

cdef extern from "Python.h":
    object PyType_GenericAlloc(PyTypeObject* t, Py_ssize_t nitems)

cdef object _Delivery = Delivery
cdef object _Frame = Frame
for _cls in (Delivery, Frame):
    if _cls.__base__ is not tuple or _cls.__basicsize__ != tuple.__basicsize__:
        raise ImportError(f"fastworker.amqp_base.{_cls.__name__} is no longer a plain NamedTuple")
del _cls


cdef inline void _put(object t, Py_ssize_t i, object item) noexcept:
    Py_INCREF(item)
    PyTuple_SET_ITEM(t, i, item)


cdef inline object _new_frame(int ftype, int channel, bytes payload):
    """A Frame, built the way tuple.__new__(Frame, ...) builds it, minus the calls."""
    cdef object f = PyType_GenericAlloc(<PyTypeObject*>_Frame, 3)
    _put(f, 0, ftype)
    _put(f, 1, channel)
    _put(f, 2, payload)
    return f


cdef inline unsigned int _u16(const unsigned char* p) noexcept nogil:
    return (<unsigned int>p[0] << 8) | p[1]


cdef inline uint32_t _u32(const unsigned char* p) noexcept nogil:
    return (
        (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]
    )


cdef inline uint64_t _u64(const unsigned char* p) noexcept nogil:
    return (<uint64_t>_u32(p) << 32) | <uint64_t>_u32(p + 4)


cdef inline str _utf8(const unsigned char* p, Py_ssize_t n):
    return PyUnicode_DecodeUTF8(<const char*>p, n, "replace")


cdef class _StrCache:
    """The last decoded value of one shortstr field: deliveries repeat it, so reuse the str."""

    cdef bytes raw
    cdef str value

    def __cinit__(self):
        self.raw = _EMPTY
        self.value = ""

    cdef inline str get(self, const unsigned char* p, Py_ssize_t n):
        if n == PyBytes_GET_SIZE(self.raw) and memcmp(PyBytes_AS_STRING(self.raw), p, n) == 0:
            return self.value
        self.value = _utf8(p, n)
        self.raw = PyBytes_FromStringAndSize(<const char*>p, n)
        return self.value


cdef class _BytesCache:
    """The last property block: publishers repeat it, so reuse the (immutable) bytes."""

    cdef bytes raw

    def __cinit__(self):
        self.raw = _EMPTY

    cdef inline bytes get(self, const unsigned char* p, Py_ssize_t n):
        if n == PyBytes_GET_SIZE(self.raw) and memcmp(PyBytes_AS_STRING(self.raw), p, n) == 0:
            return self.raw
        self.raw = PyBytes_FromStringAndSize(<const char*>p, n)
        return self.raw


cdef class _Assembly:
    """A delivery whose content frames are still arriving on one channel."""

    cdef int state
    cdef uint64_t delivery_tag
    cdef bint redelivered
    cdef bint skip  # over max_body_size: body frames are counted, not kept
    cdef str exchange
    cdef str routing_key
    cdef str consumer_tag
    cdef bytes properties
    cdef list parts  # body frames received so far (only when a body spans several frames)
    cdef uint64_t body_size
    cdef uint64_t received


cdef inline int _check_header(
    const unsigned char* h, int ftype, int channel, uint64_t size, Py_ssize_t frame_max
) except -1:
    if ftype != _METHOD and ftype != _HEADER and ftype != _BODY and ftype != _HEARTBEAT:
        if memcmp(h, b"AMQP", 4) == 0:
            raise protocol_header_received()
        raise unknown_frame_type(ftype, channel)
    if size + 8 > <uint64_t>frame_max:
        raise frame_too_large(size, channel, frame_max)
    if ftype == _HEARTBEAT and size:
        raise heartbeat_with_payload(size)
    return 0


cdef inline Py_ssize_t _short_end(
    const unsigned char* p, Py_ssize_t off, Py_ssize_t end
) noexcept nogil:
    """End offset of the shortstr at `off`, or -1 if it runs past `end`."""
    if off >= end:
        return -1
    cdef Py_ssize_t stop = off + 1 + p[off]
    return -1 if stop > end else stop


cdef class FrameReader:
    """Sans-IO reader: bytes in, deliveries and raw frames out, at most one partial frame kept."""

    cdef unsigned char* _buf  # an incomplete frame carried over to the next feed()
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _frame_max
    cdef uint64_t _max_body
    cdef dict _channels
    cdef int _last_channel
    cdef _Assembly _last
    cdef _StrCache _tags
    cdef _StrCache _exchanges
    cdef _StrCache _keys
    cdef _BytesCache _props
    cdef list _out
    cdef str _error  # set by the first error: the reader refuses every later feed()

    def __cinit__(self):
        self._buf = NULL
        self._len = 0
        self._cap = 0
        self._channels = {}
        self._last_channel = -1
        self._tags = _StrCache()
        self._exchanges = _StrCache()
        self._keys = _StrCache()
        self._props = _BytesCache()
        self._error = None

    def __init__(self, frame_max=DEFAULT_FRAME_MAX, max_body_size=DEFAULT_MAX_BODY_SIZE):
        self.frame_max = frame_max
        self.max_body_size = max_body_size

    def __dealloc__(self):
        if self._buf != NULL:
            PyMem_Free(self._buf)

    @property
    def frame_max(self):
        """Largest frame accepted, header and end octet included (from Connection.Tune)."""
        return self._frame_max

    @frame_max.setter
    def frame_max(self, value):
        self._frame_max = check_frame_max(value)

    @property
    def max_body_size(self):
        """Largest body buffered; a larger one is skipped and its delivery has body None."""
        return self._max_body

    @max_body_size.setter
    def max_body_size(self, value):
        self._max_body = check_max_body_size(value)

    @property
    def buffered(self):
        """Bytes of an incomplete frame held until more data arrives."""
        return self._len

    cdef int _reserve(self, Py_ssize_t need, Py_ssize_t limit) except -1:
        """Room for `need` bytes; grows geometrically, but never past `limit` (the frame)."""
        cdef unsigned char* grown
        cdef Py_ssize_t cap
        if need <= self._cap:
            return 0
        cap = self._cap * 2
        if cap < _MIN_CAP:
            cap = _MIN_CAP
        if cap > limit:
            cap = limit
        if cap < need:
            cap = need
        grown = <unsigned char*>PyMem_Realloc(self._buf, <size_t>cap)
        if grown == NULL:
            raise MemoryError()
        self._buf = grown
        self._cap = cap
        return 0

    def feed(self, data):
        """Parses what `data` completes; returns deliveries and raw frames in stream order."""
        cdef Py_buffer view
        cdef bint have_view = False
        cdef const unsigned char* p
        cdef Py_ssize_t n
        if self._error is not None:
            raise unusable(self._error)
        if PyBytes_CheckExact(data):
            p = <const unsigned char*>PyBytes_AS_STRING(data)
            n = PyBytes_GET_SIZE(data)
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            have_view = True
            p = <const unsigned char*>view.buf
            n = view.len
        try:
            return self._feed(p, n)
        except RemoteProtocolError as exc:
            self._error = str(exc)
            raise
        except BaseException as exc:  # e.g. MemoryError: the state is no longer trustworthy
            self._error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._out = None
            if have_view:
                PyBuffer_Release(&view)

    cdef list _feed(self, const unsigned char* p, Py_ssize_t n):
        cdef Py_ssize_t pos = 0, total, take
        cdef uint64_t size
        cdef list out = []
        self._out = out
        if self._len:
            # Complete the carried-over frame first: its header, then the rest.
            if self._len < 7:
                take = min(7 - self._len, n)
                self._reserve(7, 7)
                memcpy(self._buf + self._len, p, <size_t>take)
                self._len += take
                pos = take
                if self._len < 7:
                    return out
                size = _u32(self._buf + 3)
                _check_header(self._buf, self._buf[0], _u16(self._buf + 1), size, self._frame_max)
            else:
                size = _u32(self._buf + 3)
            total = <Py_ssize_t>size + 8
            take = min(total - self._len, n - pos)
            self._reserve(self._len + take, total)
            memcpy(self._buf + self._len, p + pos, <size_t>take)
            self._len += take
            pos += take
            if self._len < total:
                return out
            self._len = 0
            self._complete(self._buf, size)
        while n - pos >= 7:
            size = _u32(p + pos + 3)
            _check_header(p + pos, p[pos], _u16(p + pos + 1), size, self._frame_max)
            total = <Py_ssize_t>size + 8
            if n - pos < total:
                break
            self._complete(p + pos, size)
            pos += total
        if pos < n:
            take = n - pos  # only what arrived: the rest of the frame may never come
            self._reserve(take, take if take < 7 else <Py_ssize_t>_u32(p + pos + 3) + 8)
            memcpy(self._buf, p + pos, <size_t>take)
            self._len = take
        return out

    cdef int _complete(self, const unsigned char* f, uint64_t size) except -1:
        """Checks the end octet of the whole frame at `f`, then dispatches its payload."""
        cdef int ftype = f[0]
        cdef int channel = _u16(f + 1)
        cdef unsigned char end = f[7 + size]
        if end != _FRAME_END:
            raise bad_frame_end(end, ftype, channel, size)
        return self._frame(ftype, channel, f + 7, <Py_ssize_t>size)

    cdef inline _Assembly _assembly(self, int channel):
        if channel == self._last_channel:
            return self._last
        cdef _Assembly a = self._channels.get(channel)
        if a is not None:
            self._last_channel = channel
            self._last = a
        return a

    cdef int _frame(
        self, int ftype, int channel, const unsigned char* p, Py_ssize_t size
    ) except -1:
        cdef _Assembly a = self._assembly(channel)
        if ftype == _METHOD:
            if size < 4:
                raise method_too_short(size, channel)
            if a is not None and a.state != _IDLE:
                raise method_during_content(channel)
            if _u16(p) == _CLASS_BASIC and _u16(p + 2) == _DELIVER:
                if a is None:
                    a = _Assembly()
                    self._channels[channel] = a
                    self._last_channel = channel
                    self._last = a
                return self._deliver(a, channel, p, size)
            self._out.append(
                _new_frame(ftype, channel, PyBytes_FromStringAndSize(<const char*>p, size))
            )
            return 0
        if ftype == _HEADER:
            if a is None or a.state == _IDLE:
                self._out.append(
                    _new_frame(ftype, channel, PyBytes_FromStringAndSize(<const char*>p, size))
                )
                return 0
            if a.state == _WANT_BODY:
                raise header_during_body(channel)
            return self._content_header(a, channel, p, size)
        if ftype == _BODY:
            if a is None or a.state == _IDLE:
                self._out.append(
                    _new_frame(ftype, channel, PyBytes_FromStringAndSize(<const char*>p, size))
                )
                return 0
            if a.state == _WANT_HEADER:
                raise body_before_header(channel)
            return self._body(a, channel, p, size)
        self._out.append(_new_frame(ftype, channel, _EMPTY))
        return 0

    cdef int _deliver(
        self, _Assembly a, int channel, const unsigned char* p, Py_ssize_t end
    ) except -1:
        cdef Py_ssize_t off = 4, stop
        stop = _short_end(p, off, end)
        if stop < 0 or stop + 9 > end:
            raise deliver_truncated(channel)
        consumer_tag = self._tags.get(p + off + 1, stop - off - 1)
        off = stop
        a.delivery_tag = _u64(p + off)
        a.redelivered = p[off + 8] & 1
        off += 9
        stop = _short_end(p, off, end)
        if stop < 0:
            raise deliver_truncated(channel)
        exchange = self._exchanges.get(p + off + 1, stop - off - 1)
        off = stop
        stop = _short_end(p, off, end)
        if stop < 0:
            raise deliver_truncated(channel)
        a.routing_key = self._keys.get(p + off + 1, stop - off - 1)
        a.consumer_tag = consumer_tag
        a.exchange = exchange
        a.state = _WANT_HEADER
        return 0

    cdef int _content_header(
        self, _Assembly a, int channel, const unsigned char* p, Py_ssize_t end
    ) except -1:
        # class-id, weight, body-size, then the properties: handed out undecoded.
        cdef unsigned int class_id
        cdef uint64_t body_size
        if end < 12:
            raise content_header_truncated(channel)
        class_id = _u16(p)
        if class_id != _CLASS_BASIC:
            raise content_header_class(class_id, channel)
        body_size = _u64(p + 4)
        a.properties = self._props.get(p + 12, end - 12)
        a.body_size = body_size
        if body_size == 0:
            self._emit(a, channel, _EMPTY)
            return 0
        a.received = 0
        a.parts = None
        a.skip = body_size > self._max_body
        a.state = _WANT_BODY
        return 0

    cdef int _body(
        self, _Assembly a, int channel, const unsigned char* p, Py_ssize_t size
    ) except -1:
        cdef uint64_t received = a.received + <uint64_t>size
        cdef bytes body
        if received > a.body_size:
            raise body_overrun(channel, a.body_size)
        a.received = received
        if a.skip:  # over max_body_size: counted and discarded, the stream stays in sync
            if received == a.body_size:
                self._emit(a, channel, None)
            return 0
        if received == a.body_size and a.parts is None:
            # The usual case: the whole body in one frame, one copy.
            self._emit(a, channel, PyBytes_FromStringAndSize(<const char*>p, size))
            return 0
        # Several frames: keep what arrived (never reserve the announced size), join at the end.
        if a.parts is None:
            a.parts = []
        a.parts.append(PyBytes_FromStringAndSize(<const char*>p, size))
        if received == a.body_size:
            body = a.parts[0] if PyList_GET_SIZE(a.parts) == 1 else _EMPTY.join(a.parts)
            self._emit(a, channel, body)
        return 0

    cdef inline int _emit(self, _Assembly a, int channel, bytes body) except -1:
        # A Delivery, built the way tuple.__new__(Delivery, ...) builds it, minus the calls and
        # the temporary tuple.
        cdef object ch = channel, tag = a.delivery_tag, size = a.body_size
        cdef object redelivered = True if a.redelivered else False
        cdef object d = PyType_GenericAlloc(<PyTypeObject*>_Delivery, 9)
        _put(d, 0, ch)
        _put(d, 1, tag)
        _put(d, 2, redelivered)
        _put(d, 3, a.exchange)
        _put(d, 4, a.routing_key)
        _put(d, 5, a.consumer_tag)
        _put(d, 6, a.properties)
        _put(d, 7, body)
        _put(d, 8, size)
        self._out.append(d)
        a.state = _IDLE
        a.parts = None
        a.properties = None
        return 0


# --------------------------------------------------------------------------------------------
# encoding


cdef inline void _put_ack(
    unsigned char* b, unsigned int channel, uint64_t tag, int method, unsigned char bits
) noexcept nogil:
    cdef int i
    b[0] = _METHOD
    b[1] = <unsigned char>((channel >> 8) & 0xFF)
    b[2] = <unsigned char>(channel & 0xFF)
    b[3] = 0
    b[4] = 0
    b[5] = 0
    b[6] = 13
    b[7] = 0
    b[8] = _CLASS_BASIC
    b[9] = 0
    b[10] = <unsigned char>method
    for i in range(8):
        b[11 + i] = <unsigned char>((tag >> (56 - 8 * i)) & 0xFF)
    b[19] = bits
    b[20] = _FRAME_END


cdef inline unsigned int _channel(object channel) except? 0:
    """The common case inline; amqp_base.check_channel raises the twin's errors."""
    if PyLong_CheckExact(channel) and 0 <= channel <= _MAX_CHANNEL:
        return channel
    return check_channel(channel)


cdef inline uint64_t _tag(object tag) except? 0:
    """The common case inline; amqp_base.check_tag raises the twin's errors."""
    if PyLong_CheckExact(tag) and 0 <= tag <= 0xFFFFFFFFFFFFFFFF:
        return tag
    return check_tag(tag)


def encode_ack(channel, delivery_tag, multiple=False):
    """One Basic.Ack frame (21 bytes). channel and tag: int (not bool), else TypeError; out of
    range, LocalProtocolError."""
    cdef unsigned int ch = _channel(channel)
    cdef uint64_t tag = _tag(delivery_tag)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _ACK_SIZE)
    _put_ack(<unsigned char*>PyBytes_AS_STRING(out), ch, tag, _ACK_METHOD, 1 if multiple else 0)
    return out


def encode_nack(channel, delivery_tag, multiple=False, requeue=True):
    """One Basic.Nack frame (21 bytes); `requeue=True` gives the message back to the queue."""
    cdef unsigned int ch = _channel(channel)
    cdef uint64_t tag = _tag(delivery_tag)
    cdef unsigned char bits = (1 if multiple else 0) | (2 if requeue else 0)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _ACK_SIZE)
    _put_ack(<unsigned char*>PyBytes_AS_STRING(out), ch, tag, _NACK_METHOD, bits)
    return out


def encode_acks(channel, acks):
    """Several Basic.Ack frames in one buffer, for one write: `acks` as (tag, multiple)."""
    cdef unsigned int ch = _channel(channel)
    cdef list items = acks if type(acks) is list else list(acks)
    cdef Py_ssize_t n = len(items), i
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n * _ACK_SIZE)
    cdef unsigned char* b = <unsigned char*>PyBytes_AS_STRING(out)
    cdef uint64_t tag
    for i in range(n):
        item_tag, multiple = items[i]
        tag = _tag(item_tag)
        _put_ack(b + i * _ACK_SIZE, ch, tag, _ACK_METHOD, 1 if multiple else 0)
    return out
