"""Keep-alive FastCGI connection pools, one per PHP-FPM endpoint.

PHP-FPM serves one request at a time per connection, and a kept-alive connection pins one FPM
child while it stays open. So a pool opens connections only when a job needs one, never holds more
than `max_connections`, hands idle connections to the next job (LIFO, so few stay warm), and closes
connections that sat idle too long. When every connection is busy, up to `pipeline` - 1 more
requests are written behind a running one, which FPM reads as soon as its child is free; requests
that still find no room wait in one FIFO backlog. It knows FastCGI and sockets, nothing of queues
or messages.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Mapping
from typing import Any

from fastworker.callbacks import Answer
from fastworker.codec import (
    RemoteProtocolError,
    Response,
    ResponseParser,
    encode_params,
    encode_request,
)
from fastworker.endpoint import Endpoint
from fastworker.fcgi_base import GET_VALUES, VERSION

log = logging.getLogger("fastworker.fpm")

REQUEST_ID = 1  # one request per connection at a time, so the id never needs to vary

# How many times a request moves to another connection when FPM closed one without reading it.
_STALE_RETRIES = 3

# Seconds after which a pool kept below max_connections (FPM served fewer) tries one more.
LIMIT_RECHECK = 300.0

# A request is pipelined only behind one that has run for less than this: a request that has
# already run long is likely a long job, and whatever waits behind it waits as long.
PIPELINE_MAX_HEAD_AGE = 0.05


# FPM closed a connection before answering its head request: after writing _PROBE (an empty
# FCGI_GET_VALUES record, which a child that reads on discards), wait this long for the kernel's
# reset that says the child is gone (see _Connection.eof_received).
PROBE_WAIT = 0.02
_PROBE = bytes((VERSION, GET_VALUES, 0, 0, 0, 0, 0, 0))
_TCP_CLOSE = 7  # tcp_info.tcpi_state after a reset

# _Connection.ending: how the connection is going away.
_OPEN = 0
_PROBING = 1  # FPM closed its side before answering; the probe is out
_GRACEFUL = 2  # FPM read on after its close: the child ended without reading the head
_GONE = 3  # the probe was refused: the child that had the head is dead
_ABORTED = 4  # the pool closed it


def _peer_gone(transport: asyncio.BaseTransport) -> bool:
    """Whether the peer reset the connection (its process is gone) rather than reading on."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return True
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return True
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE
    except OSError:
        return True
    return False


class FpmError(Exception):
    """Base of everything a pool raises."""


class FpmUnavailable(FpmError):
    """FPM refused, reset or closed before any response byte: the job did not run."""


class FpmConnectFailed(FpmUnavailable):
    """No connection to the endpoint could be opened (refused, timed out, no such socket)."""


class FpmConnectionLost(FpmError):
    """The connection died after the response started: the job may have run."""


class FpmTimeout(FpmError):
    """No complete response within the job timeout; the connection was closed."""


class FpmNotStarted(FpmError):
    """The pool stopped starting requests (`stop_starting`) before this one was written."""


class FpmBadRequest(FpmError):
    """The request cannot be encoded (e.g. a param too large for one record); nothing was sent."""


class FpmProtocolError(FpmError):
    """FPM sent bytes that are not valid FastCGI; the connection was closed."""


def encode_shared_params(params: Mapping[str | bytes, str | bytes]) -> bytes:
    """Name-value pairs many requests share, encoded once for `FpmPool.request` (`shared`).

    They go at the start of each request's first PARAMS record, so they cost FPM no extra
    record (each record is two reads for a PHP child). Raises ValueError above the 65535 bytes
    of one PARAMS record.
    """
    return encode_params(params)


def _payload(params: Mapping[str | bytes, str | bytes], stdin: bytes, shared: bytes) -> bytes:
    try:
        return encode_request(REQUEST_ID, params, stdin, True, shared)
    except (ValueError, TypeError) as exc:
        raise FpmBadRequest(str(exc)) from None


# A completed request, as the codec made it: `stdout` and `stderr` are the heads of PHP's output
# (at most the pool's `max_response_head` bytes each); `stdout_size` and `stderr_size` count all.
FpmResponse = Response

# `FpmPool.request`'s callback: (response, None) or (None, an FpmError).
ResponseCallback = Answer[FpmResponse]


class _ClosedBeforeResponse(Exception):
    """Internal: the connection closed before a single byte of the head's answer arrived.

    `ran` is False only when the child cannot have read the request: FPM still read from the
    connection after closing its side (a child ending under pm.max_requests), or the pool
    closed the connection itself.
    """

    def __init__(self, reason: str, ran: bool) -> None:
        super().__init__(reason)
        self.ran = ran


# A request on its way to FPM: (payload, job timeout, callback, stale_left). `stale_left` is how
# many more times it may move to another connection when a reused one turns out closed before
# answering (FPM recycled its child); it bounds the retries if FPM keeps doing that.
_Request = tuple[bytes, float, ResponseCallback, int]


class _Connection(asyncio.Protocol):
    """One FastCGI connection: the request FPM is running, and any pipelined behind it.

    PHP-FPM runs one request at a time per connection, but it reads the next request from the
    same socket as soon as it has finished one. A request written while the one before is still
    running (pipelined) is therefore ready the moment the child is free: the child never waits
    for the worker. Pipelined requests wait in `queued` until they reach the head.

    A write to a loopback socket costs the worker more than anything else it does per job (the
    kernel delivers the data and wakes the child inside the `write`). So pipelined requests are
    written in batches: while more than `pool.refill_at` requests are written and unanswered
    (the child has work in hand), a new one waits in `unwritten`, and they all leave in one
    write once the child is down to `refill_at`. The first `unwritten` request is never the
    head: the flush comes, at the latest, with the answer that would make it one. Only on Unix
    sockets: PHP-FPM leaves Nagle's algorithm on for TCP, so its second answer in a row waits
    for our delayed ACK (milliseconds) unless a request of ours carries the ACK back at once.
    """

    __slots__ = (
        "pool",
        "transport",
        "parser",
        "callback",
        "queued",
        "unwritten",
        "payload",
        "timeout",
        "stale_left",
        "ending",
        "deadline",
        "served",
        "closed",
        "last_used",
        "sent_at",
        "completed_at_send",
        "stall_reported",
        "draining",
    )

    def __init__(self, pool: FpmPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser(pool.max_response_head, (REQUEST_ID,))
        # The head, answered through `callback`; `payload`, `timeout` and `stale_left` are kept
        # to move it elsewhere if FPM closes the connection without having read it.
        self.callback: ResponseCallback | None = None
        self.queued: deque[_Request] = deque()  # behind the head, not yet started
        self.unwritten: list[bytes] = []  # the payloads of the last of `queued`, held back
        self.payload = b""
        self.timeout = 0.0
        self.stale_left = 0
        self.ending = _OPEN
        self.served = 0
        self.closed = False
        self.last_used = 0.0
        self.sent_at = 0.0
        self.deadline = 0.0
        self.completed_at_send = 0
        self.stall_reported = False
        self.draining = False  # close once its requests are done: its child is needed elsewhere

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            done = self.parser.feed(data)
        except RemoteProtocolError as exc:
            self.close()
            self._fail(FpmProtocolError(f"{self.pool.endpoint}: {exc}"))
            return
        # FPM answers the requests in flight one after the other and sends nothing once all
        # are answered. An answer, or any byte, beyond them comes from a confused or hostile
        # peer: nothing on this connection can be trusted any more.
        in_flight = self.written
        if len(done) > in_flight or (len(done) == in_flight and self.parser.bytes_received):
            self.close()
            self._fail(
                FpmProtocolError(
                    f"{self.pool.endpoint}: FastCGI data after the last request in flight "
                    f"was answered"
                )
            )
            return
        for response in done:  # more than one only when requests were pipelined
            callback = self.callback
            if callback is None:
                return  # only if a callback below closed the connection
            self.callback = None
            self.payload = b""
            self.served += 1
            if self.queued:
                self._promote()
            self.pool._answered(self, callback, response)
            if self.unwritten and self.written <= self.pool.refill_at and not self.closed:
                self._flush()

    def eof_received(self) -> bool:
        """FPM closed its side. Before any byte of the head's answer, find out whether the
        child read the head (it died running it) or never will (it ended: pm.max_requests)."""
        if self.callback is None or self.parser.bytes_received or self.transport is None:
            # Idle or mid-response: the connection simply ends. It is closed from now on, so
            # no request is written to it while connection_lost is still to come.
            self.closed = True
            return False
        # A child that ends under pm.max_requests (or a graceful reload) shuts down only its
        # sending side after its last answer and reads on until we close, discarding what we
        # sent. A child that died has no socket any more: the kernel answers the probe with a
        # reset. Either way nothing more will come, so the connection is done for the pool.
        self.closed = True
        self.ending = _PROBING
        self._give_back_queued()
        self.pool._serve_backlog()
        self.transport.write(_PROBE)
        self.pool.loop.call_later(PROBE_WAIT, self._probe_verdict)
        return True  # keep the socket open until the verdict

    def _probe_verdict(self) -> None:
        transport = self.transport
        if self.ending != _PROBING or transport is None or transport.is_closing():
            return  # connection_lost came first (a reset or a broken pipe: the child died)
        self.ending = _GONE if _peer_gone(transport) else _GRACEFUL
        transport.abort()

    def _give_back_queued(self) -> None:
        """Requests pipelined behind the head never started: FPM reads a request only after it
        has finished the one before. They go back to the front of the pool's backlog (the
        head, if it may move too, goes in front of them)."""
        self.unwritten.clear()
        if self.queued:
            queued, self.queued = self.queued, deque()
            self.pool._put_back(queued)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._give_back_queued()
        if self.parser.bytes_received == 0:
            # Nothing of the head's answer arrived: it is safe to move only if the child cannot
            # have read it (FPM still read after its close), or if the pool closed it.
            unread = exc is None and self.ending in (_GRACEFUL, _ABORTED)
            reason = f"{exc}" if exc else "closed by FPM"
            self._fail(_ClosedBeforeResponse(reason, ran=not unread))
        else:
            reason = f": {exc}" if exc else ""
            self._fail(
                FpmConnectionLost(f"{self.pool.endpoint}: connection lost mid-response{reason}")
            )
        self.pool._on_closed(self)

    # used by the pool
    def _fail(self, exc: Exception) -> None:
        callback = self.callback
        if callback is not None:
            self.callback = None
            self.served += 1
            self.pool._failed(self, callback, exc)

    @property
    def in_flight(self) -> bool:
        return self.callback is not None

    @property
    def written(self) -> int:
        """Requests written and not yet answered, the head included (the held-back ones are
        always the last of `queued`)."""
        return (self.callback is not None) + len(self.queued) - len(self.unwritten)

    def _on_timeout(self) -> None:
        self.close()
        self._fail(FpmTimeout(f"{self.pool.endpoint}: no response within the job timeout"))

    def close(self) -> None:
        """Aborts the connection; from here on the pool never hands it out again."""
        if self.transport is not None and not self.closed:
            self.ending = _ABORTED
            self.transport.abort()
            # connection_lost follows (and frees the pool slot); until then nothing may pick
            # this connection from the idle list or put it back there.
            self.closed = True

    def send(
        self, payload: bytes, timeout: float, callback: ResponseCallback, stale_left: int
    ) -> None:
        """Writes one request as the head; `callback` gets its answer, via the pool."""
        self.callback = callback
        self.payload = payload
        self.timeout = timeout
        self.stale_left = stale_left
        self._start(timeout)
        self.pool.writes += 1
        self.transport.write(payload)  # type: ignore[union-attr]

    def _start(self, timeout: float) -> None:
        """The head request starts now: its job timeout runs from here."""
        self.sent_at = now = self.pool.loop.time()
        self.deadline = now + timeout
        self.completed_at_send = self.pool.completed
        self.stall_reported = False
        self.pool._watch(self.deadline)

    def pipeline(
        self, payload: bytes, timeout: float, callback: ResponseCallback, stale_left: int
    ) -> None:
        """Queues a request behind the head; it starts (and its timeout runs) when it is next.
        It is written now if the child is down to `refill_at` requests, else with the batch."""
        hold = self.unwritten or self.written > self.pool.refill_at
        self.queued.append((payload, timeout, callback, stale_left))
        if hold:
            self.unwritten.append(payload)
        else:
            self.pool.writes += 1
            self.transport.write(payload)  # type: ignore[union-attr]

    def _flush(self) -> None:
        """Writes the held-back requests, in one write."""
        pool = self.pool
        pool.held += len(self.unwritten)
        pool.writes += 1
        data = b"".join(self.unwritten)
        self.unwritten.clear()
        self.transport.write(data)  # type: ignore[union-attr]

    def _promote(self) -> None:
        """The head completed: the first pipelined request is now the one FPM runs."""
        self.payload, self.timeout, self.callback, self.stale_left = self.queued.popleft()
        self._start(self.timeout)


class FpmPool:
    """Connections to one endpoint, opened lazily and kept alive between jobs."""

    def __init__(
        self,
        endpoint: Endpoint,
        max_connections: int,
        *,
        connect_timeout: float = 5.0,
        idle_timeout: float = 30.0,
        stall_warning_after: float = 5.0,
        pipeline: int = 1,
        batch_writes: bool = False,
        max_response_head: int = 65536,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if pipeline < 1:
            raise ValueError("pipeline must be at least 1")
        ResponseParser(max_response_head)  # the TypeError/ValueError now, not per connection
        # Bytes kept from the start of each response's STDOUT, and of its STDERR (for the
        # Status header and PHP's error text); the rest is counted and dropped.
        self.max_response_head = max_response_head
        self.endpoint = endpoint
        self.max_connections = max_connections
        self.pipeline = pipeline  # requests per connection at once: the head + pipelined
        # Written requests a connection is down to before its held-back ones are written, in
        # one write (see _Connection): with `batch_writes` on a Unix socket half the pipeline,
        # so the child always has one in hand; else the whole pipeline (written at once).
        batched = batch_writes and bool(endpoint.path)
        self.refill_at = max(1, pipeline // 2) if batched else pipeline
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.stall_warning_after = stall_warning_after
        self.loop = asyncio.get_running_loop()
        self.completed = 0  # requests answered, for the stall check
        # Connections this pool opens at most: max_connections, lowered while FPM serves
        # fewer (its children are fewer than --concurrency; see _unstick), raised again later.
        self.limit = max_connections
        self._limited_at = 0.0
        self._children_wanted = 0  # stuck connections still waiting for a child
        self._draining = 0  # served connections marked to close for them
        self.opened = 0  # connections ever opened, for tests and stats
        self.connect_failures = 0  # connects failed since the last that worked: down if > 0
        self.pipelined = 0  # requests ever written behind another, for tests and stats
        self.held = 0  # pipelined requests held back for a batched write, for tests and stats
        self.writes = 0  # writes of requests to FPM sockets, for benches
        self._open = 0  # connections open or being opened
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        # Requests waiting for a free connection or a pipeline slot, oldest first. A new
        # request never overtakes them (their deliveries would hold back the batched acks).
        self._backlog: deque[_Request] = deque()
        self._closing = False
        self._stopping = False  # stop_starting(): requests not yet written fail as not started
        # One timer per pool, armed at the earliest job deadline, instead of one per job.
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()  # connections being opened

    @property
    def open_connections(self) -> int:
        return self._open

    def request(
        self,
        params: Mapping[str | bytes, str | bytes],
        stdin: bytes,
        timeout: float,
        shared: bytes,
        callback: ResponseCallback,
    ) -> None:
        """Runs one FastCGI request: `callback(response, None)`, or `callback(None, exc)` with
        an FpmError subclass when it cannot complete. `callback` is called exactly once.

        `shared` is a block from `encode_shared_params`: params that many requests share,
        encoded once and sent ahead of `params`.

        The request is written at once to an idle connection, else to a new connection (in a
        task) while the pool is below its limit, else pipelined behind a running request (see
        `_pipelinable`), else it waits in the backlog for the first of these, after the
        requests already waiting. The answer is handed to `callback` from the connection's
        data_received (`callbacks.awaited` turns this into a coroutine).
        """
        if self._stopping or self._closing:
            callback(None, self._refusal())
            return
        try:
            payload = _payload(params, stdin, shared)
        except FpmBadRequest as exc:
            callback(None, exc)
            return
        if self._backlog or not self._place(payload, timeout, callback, _STALE_RETRIES):
            self._backlog.append((payload, timeout, callback, _STALE_RETRIES))

    def _place(
        self, payload: bytes, timeout: float, callback: ResponseCallback, stale_left: int
    ) -> bool:
        """Writes a request wherever it can start now; False if it has to wait."""
        conn = self._take_idle()
        if conn is not None:
            conn.send(payload, timeout, callback, stale_left)
            return True
        if self._open < self.limit:
            self._open += 1  # reserved now, so the requests right behind do not open more
            task = self.loop.create_task(
                self._open_and_send(payload, timeout, callback, stale_left)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return True
        if self.pipeline > 1:
            conn = self._pipelinable()
            if conn is not None:
                self.pipelined += 1
                conn.pipeline(payload, timeout, callback, stale_left)
                return True
        return False

    def _serve_backlog(self) -> None:
        """Starts waiting requests, oldest first, on whatever has become free."""
        backlog = self._backlog
        while backlog:
            if self._closing or self._stopping:
                self._fail_backlog()
                return
            if not self._place(*backlog[0]):
                return
            backlog.popleft()

    def _put_back(self, requests: deque[_Request]) -> None:
        """Requests that never started go back to the front of the backlog, in order."""
        self._backlog.extendleft(reversed(requests))

    def _refusal(self) -> FpmError:
        """Why a request can no longer start (only once stopping or closing)."""
        if self._stopping:
            return FpmNotStarted(f"{self.endpoint}: the worker is stopping")
        return FpmUnavailable(f"{self.endpoint}: pool is closed")

    def _fail_backlog(self) -> None:
        backlog, self._backlog = self._backlog, deque()
        for _, _, callback, _ in backlog:
            callback(None, self._refusal())

    async def _open_and_send(
        self, payload: bytes, timeout: float, callback: ResponseCallback, stale_left: int
    ) -> None:
        """Opens a connection (its slot already counted in `_open`) and writes the request."""
        try:
            conn = await self._connect()
        except FpmError as exc:
            callback(None, exc)
            return
        except BaseException:
            callback(None, FpmUnavailable(f"{self.endpoint}: connecting was cancelled"))
            raise
        if self._closing or self._stopping:  # while we connected: this one never started
            self._release(conn)
            callback(None, self._refusal())
            return
        conn.send(payload, timeout, callback, stale_left)

    def _pipelinable(self) -> _Connection | None:
        """The busy connection best placed to take a pipelined request, if any may.

        Only connections that already completed a request (a child is behind them, not FPM's
        backlog) whose head started less than PIPELINE_MAX_HEAD_AGE ago; of those, the one
        with the fewest requests, then the youngest head (the likeliest to finish first
        when job times vary).
        """
        limit = self.pipeline - 1
        oldest = self.loop.time() - PIPELINE_MAX_HEAD_AGE
        best: _Connection | None = None
        best_queued = limit
        best_sent = 0.0
        for conn in self._busy:
            sent_at = conn.sent_at
            if sent_at < oldest:
                continue
            queued = len(conn.queued)
            if queued >= limit or queued > best_queued:
                continue
            if queued == best_queued and sent_at <= best_sent:
                continue
            if conn.closed or not conn.served or conn.callback is None or conn.draining:
                continue
            best, best_queued, best_sent = conn, queued, sent_at
        return best

    def _answered(self, conn: _Connection, callback: ResponseCallback, done: Response) -> None:
        """A request's response is complete (called from data_received)."""
        self._release(conn)
        if self._backlog:  # the connection may take a pipelined request now
            self._serve_backlog()
        self.completed += 1
        callback(done, None)

    def _failed(self, conn: _Connection, callback: ResponseCallback, exc: Exception) -> None:
        """A request failed: the FpmError for its callback, or a move to another connection."""
        payload, conn.payload = conn.payload, b""
        self._release(conn)
        if isinstance(exc, _ClosedBeforeResponse):
            if exc.ran:
                # The child had the request and died before answering (crash, OOM kill,
                # request_terminate_timeout): the job may have run, a failed attempt.
                exc = FpmConnectionLost(
                    f"{self.endpoint}: the PHP process died before answering "
                    f"(connection closed before any response: {exc})"
                )
            elif conn.stale_left > 0:  # the child ended without reading it: nothing ran
                self._backlog.appendleft((payload, conn.timeout, callback, conn.stale_left - 1))
                self._serve_backlog()
                return
            else:
                exc = FpmUnavailable(
                    f"{self.endpoint}: connections kept closing before reading the request"
                )
        callback(None, exc)

    def _watch(self, deadline: float) -> None:
        if self._watchdog is None or deadline < self._watchdog_at:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watchdog_at = deadline
            self._watchdog = self.loop.call_at(deadline, self._check_deadlines)

    def _check_deadlines(self) -> None:
        """Times out requests past their deadline; re-arms for the earliest one left."""
        self._watchdog = None
        now = self.loop.time()
        earliest = 0.0
        for conn in list(self._busy):
            if not conn.in_flight:
                continue
            if conn.deadline <= now:
                conn._on_timeout()
            elif not earliest or conn.deadline < earliest:
                earliest = conn.deadline
        if earliest:
            self._watch(earliest)

    def _take_idle(self) -> _Connection | None:
        """The most recently used open idle connection, if any (the no-wait fast path)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                self._busy.add(conn)
                return conn
        return None

    async def _connect(self) -> _Connection:
        """A new connection, busy; its slot must already be counted in `_open`."""
        self.opened += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.endpoint.path:
                    _, conn = await self.loop.create_unix_connection(
                        lambda: _Connection(self), self.endpoint.path
                    )
                else:
                    _, conn = await self.loop.create_connection(
                        lambda: _Connection(self), self.endpoint.host, self.endpoint.port
                    )
        except (OSError, TimeoutError) as exc:
            self._slot_freed()
            self.connect_failures += 1
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            raise FpmConnectFailed(f"{self.endpoint}: cannot connect: {reason}") from None
        except BaseException:
            self._slot_freed()
            raise
        self.connect_failures = 0
        self._busy.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.in_flight:
            return  # a pipelined request became the head; the connection stays busy
        self._busy.discard(conn)
        if conn.closed:
            return  # _on_closed frees its slot
        if self._closing:
            conn.close()
            return
        if conn.draining:
            self._free_child(conn)
            return
        conn.last_used = self.loop.time()
        self._idle.append(conn)
        if self._backlog:
            self._serve_backlog()

    def _on_closed(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        if conn.draining:  # closed before its turn (FPM closed it, a timeout): free another
            conn.draining = False
            self._draining -= 1
        self._slot_freed()

    def _slot_freed(self) -> None:
        """A connection (or one being opened) is gone: room for another."""
        self._open -= 1
        if self._backlog:
            self._serve_backlog()

    def sweep(self) -> None:
        """Closes connections idle too long and reports requests stuck in FPM's backlog."""
        now = self.loop.time()
        keep = []
        for conn in self._idle:
            if conn.closed:
                continue
            if now - conn.last_used > self.idle_timeout:
                conn.close()
            else:
                keep.append(conn)
        self._idle[:] = keep
        stuck = [
            conn
            for conn in self._busy
            if conn.served == 0
            and not conn.stall_reported
            and conn.in_flight
            and conn.parser.bytes_received == 0
            and now - conn.sent_at > self.stall_warning_after
            and self.completed > conn.completed_at_send
        ]
        if stuck:
            self._unstick(stuck, now)
        elif self.limit < self.max_connections and now - self._limited_at > LIMIT_RECHECK:
            self.limit += 1  # FPM may have more children by now: try one more connection
            self._limited_at = now
            log.info("%s: trying %d connections again", self.endpoint, self.limit)

    def _unstick(self, stuck: list[_Connection], now: float) -> None:
        """Connections that no PHP child took (they wait in FPM's listen backlog) while others
        are served: FPM has fewer children than --concurrency. Keep only as many connections
        as FPM serves, and free one child per stuck connection by closing a served connection
        once its requests are done; FPM then accepts the stuck one and its request runs.

        Closing the stuck connection instead would be faster, but from this side it looks the
        same as a child running a long first request, which must not run twice.
        """
        served = sum(1 for conn in (*self._busy, *self._idle) if conn.served and not conn.closed)
        for conn in stuck:
            conn.stall_reported = True
        self._children_wanted += len(stuck)
        oldest = min(stuck, key=lambda conn: conn.sent_at)
        limited = bool(served) and served < self.limit
        if limited:
            self.limit = served
            self._limited_at = now
        log.warning(
            "%s: a request on a new connection has had no answer for %.0f s while other "
            "connections completed %d requests; FPM has fewer children than --concurrency (%d) "
            "and this connection waits in its backlog. %sFreeing a PHP child for each waiting "
            "request. Set --concurrency to the pool's pm.max_children to avoid the wait.",
            self.endpoint,
            now - oldest.sent_at,
            self.completed - oldest.completed_at_send,
            self.max_connections,
            f"Keeping at most {served} connections to it (FPM served that many; one more is "
            f"tried every {LIMIT_RECHECK:.0f} s). "
            if limited
            else "",
        )
        # Idle served connections go at once; busy ones once their requests are done.
        for conn in [*self._idle]:
            if self._children_wanted <= self._draining or not conn.served or conn.closed:
                continue
            self._idle.remove(conn)
            self._free_child(conn, counted=False)
        for conn in self._busy:
            if self._children_wanted <= self._draining:
                break
            if conn.served and not conn.draining and not conn.closed:
                conn.draining = True
                self._draining += 1

    def _free_child(self, conn: _Connection, counted: bool = True) -> None:
        """Closes a served connection so that its PHP child can accept a stuck one."""
        if counted:
            conn.draining = False
            self._draining -= 1
        self._children_wanted = max(0, self._children_wanted - 1)
        conn.close()

    def stop_starting(self) -> None:
        """From now on requests not yet written to FPM fail with FpmNotStarted (shutdown):
        jobs waiting for a connection go back to their queue instead of running late."""
        self._stopping = True
        self._fail_backlog()

    async def close(self) -> None:
        """Closes every connection; busy ones are aborted."""
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._fail_backlog()
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)


class FpmPools:
    """One pool per endpoint, created on first use, with a shared housekeeping timer."""

    def __init__(
        self, max_connections: int, caps: Mapping[Endpoint, int] | None = None, **pool_options: Any
    ) -> None:
        self.max_connections = max_connections
        self.caps = dict(caps or {})  # endpoints with their own cap (--fpm ADDR=max:N)
        self.pool_options = pool_options
        self._stopping = False
        self._pools: dict[Endpoint, FpmPool] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def get(self, endpoint: Endpoint) -> FpmPool:
        pool = self._pools.get(endpoint)
        if pool is None:
            cap = self.caps.get(endpoint, self.max_connections)
            pool = self._pools[endpoint] = FpmPool(endpoint, cap, **self.pool_options)
            if self._stopping:
                pool.stop_starting()
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        return pool

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for pool in self._pools.values():
                pool.sweep()

    def pools(self) -> list[FpmPool]:
        """The pools made so far (one per endpoint a job went to), for metrics and health."""
        return list(self._pools.values())

    def stop_starting(self) -> None:
        """See `FpmPool.stop_starting`; pools created later start stopped too."""
        self._stopping = True
        for pool in self._pools.values():
            pool.stop_starting()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for pool in self._pools.values():
            await pool.close()
