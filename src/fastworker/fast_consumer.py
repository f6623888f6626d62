"""Consumes AMQP deliveries over a connection of its own, with the compiled frame codec.

Why: aiormq spends 62-89 us of CPU per message on consume + ack (pamqp objects per frame, a task
per delivery), more than the worker's whole per-job budget of about 30 us. Here an
asyncio Protocol (uvloop in the worker) feeds socket bytes to `amqp_codec.FrameReader`, which
returns one tuple per delivery; deliveries are started straight from `data_received` through the
handler's callback form (no task per delivery; runner tasks only for what must be awaited, such
as publishing a retry), and acks leave as pre-encoded frames, many per write. pamqp still
marshals and unmarshals the rare frames (handshake, qos, consume, cancel, close); aiormq stays
for everything that is not the hot path:
queue declares, the `prepare` hook and the confirmed `Publisher`, on a second connection per
session.

Same contract as `AmqpConsumer`: at most `concurrency` handlers at once, ack only after the
handler returned (batched `multiple=True` acks every ~2 ms, or as soon as half the prefetch
window is finished so the broker never stalls), a handler that raises gets its delivery
requeued, reconnects with capped backoff, a delivery is never acked on a connection other than
the one it came on, and `stop()` cancels the consumers, lets in-flight jobs finish (up to
`shutdown_timeout`), flushes acks and closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiormq
from aiormq.abc import AbstractConnection
from pamqp import commands, frame
from pamqp.base import Frame

from fastworker import __version__, amqp_py
from fastworker.acks import AckTracker
from fastworker.amqp_py import PropertyError, decode_properties
from fastworker.broker import Publisher, ensure_queue
from fastworker.consumer import ACK_INTERVAL, REQUEUE_DELAY, Handler, Prepare
from fastworker.message import Message, NotStarted

COMPILED = False
IMPORT_ERROR = ""  # why the compiled codec did not load, if it did not (see fastworker.codec)
if not os.environ.get("FASTWORKER_NO_EXTENSIONS"):
    try:
        import amqp_codec as codec  # type: ignore[import-not-found]

        COMPILED = True
    except ImportError as exc:  # pragma: no cover - exercised only without a build
        IMPORT_ERROR = str(exc)
        codec = amqp_py
else:
    codec = amqp_py

log = logging.getLogger("fastworker.consumer")

# A handler's optional callback form, `start(message, publisher, on_done)`: it calls
# `on_done(None)` when the message may be acked, or `on_done(awaitable)` with what is left to
# await (returns: ack; raises: requeue), as `JobPipeline.start` does.
OnDone = Callable[[Awaitable[None] | None], None]
Start = Callable[[Message, Publisher, OnDone], None]

HANDSHAKE_TIMEOUT = 15.0  # seconds for connect + handshake, and for each consume-side RPC
CLOSE_TIMEOUT = 2.0  # seconds to wait for Close-Ok before dropping the socket
CHANNEL = 1  # the one consuming channel of the fast connection
# Seconds a delivery that finished behind an unfinished one waits before it is acked alone: on a
# busy machine a PHP child may not run for a few ms, and once its job is done the whole run is
# acked with one multiple ack.
ACK_HOLD = 0.02
_WANTED_FRAME_MAX = 131072
_WANTED_HEARTBEAT = 60
_FRAME_HEADER = struct.Struct(">BHI")
_NO_PROPERTIES = b"\x00\x00"  # a content header's property flags when none is set


class AmqpProtocolError(ConnectionError):
    """The broker refused the handshake or answered out of turn; the session is retried."""


@dataclass(frozen=True, slots=True)
class ConnectionParams:
    """What an amqp:// URL says, for the fast connection (aiormq reads the same URL itself)."""

    host: str
    port: int
    username: str
    password: str
    vhost: str
    heartbeat: int
    frame_max: int
    tls: bool

    @classmethod
    def from_url(cls, url: str) -> ConnectionParams:
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError(f"AMQP URL must start with amqp:// or amqps://, got {url!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        tls = parts.scheme == "amqps"
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or (5671 if tls else 5672),
            username=unquote(parts.username) if parts.username is not None else "guest",
            password=unquote(parts.password) if parts.password is not None else "guest",
            vhost=unquote(path) if path else "/",
            heartbeat=int(query.get("heartbeat", _WANTED_HEARTBEAT)),
            frame_max=int(query.get("frame_max", _WANTED_FRAME_MAX)),
            tls=tls,
        )


def _negotiate(server: int, client: int) -> int:
    """AMQP tuning: 0 means "no limit" on either side, otherwise the lower value wins."""
    if not server or not client:
        return server or client
    return min(server, client)


def _method(payload: bytes, channel: int) -> Frame:
    """Decodes a raw method frame's payload with pamqp (only rare frames come here)."""
    data = _FRAME_HEADER.pack(codec.FRAME_METHOD, channel, len(payload)) + payload + b"\xce"
    return frame.unmarshal(data)[2]  # type: ignore[return-value]


class _Link(asyncio.Protocol):
    """One fast connection: handshake, one consuming channel, deliveries in, acks out.

    `alive` is True from the first Consume-Ok until the connection or channel is lost or the
    session ends; acks and nacks are written only while it is, so a delivery is never acked on a
    connection it did not come from.
    """

    __slots__ = (
        "alive",
        "closed",
        "consumer",
        "lost",
        "consumer_tags",
        "publisher",
        "transport",
        "_acks",
        "_delivered",
        "_encode_acks",
        "_encode_nack",
        "_feed",
        "_flush_at",
        "_flush_scheduled",
        "_heartbeat",
        "_heartbeat_handle",
        "_loop",
        "_queue_by_tag",
        "_reader",
        "_replies",
        "_reply_waiter",
        "_rx",
        "_rx_seen",
        "_silent_ticks",
    )

    def __init__(self, consumer: FastAmqpConsumer, publisher: Publisher) -> None:
        self._loop = asyncio.get_running_loop()
        self.consumer = consumer
        self.publisher = publisher
        self.transport: asyncio.Transport | None = None
        self.alive = False
        # Resolved (with the reason, never as an exception) when the link is unusable.
        self.closed: asyncio.Future[BaseException] = self._loop.create_future()
        self.lost: asyncio.Future[None] = self._loop.create_future()  # the socket is gone
        self.consumer_tags: list[str] = []
        self._reader = codec.FrameReader(max_body_size=consumer.max_message_size)
        self._feed = self._reader.feed
        self._encode_acks = codec.encode_acks
        self._encode_nack = codec.encode_nack
        self._acks = AckTracker()
        self._delivered = self._acks.delivered
        self._flush_at = max(1, consumer.prefetch // 2)
        self._flush_scheduled = False
        self._queue_by_tag: dict[str, str] = {}
        self._replies: deque[Frame] = deque()
        self._reply_waiter: asyncio.Future[None] | None = None
        self._heartbeat = 0
        self._heartbeat_handle: asyncio.TimerHandle | None = None
        self._rx = 0
        self._rx_seen = 0
        self._silent_ticks = 0

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("the broker closed the connection"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._rx += 1
        try:
            items = self._feed(data)
        except Exception as exc:  # AMQPFrameError: the stream cannot be trusted any more
            log.error("dropping the broker connection: %s", exc)
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()
            return
        if not items:
            return
        consumer = self.consumer
        pending = consumer._pending
        delivered = self._delivered
        queues = self._queue_by_tag
        got = False
        try:
            for item in items:
                if len(item) == 9:
                    # (channel, tag, redelivered, exchange, routing_key, consumer_tag,
                    # properties_raw, body, body_size)
                    tag = item[1]
                    delivered(tag)
                    if item[6] == _NO_PROPERTIES and item[7] is not None:  # the bundle's case
                        message = Message(item[7], queues[item[5]], {}, {}, item[2])
                    else:
                        message = self._message(item, queues[item[5]])
                    pending.append((self, tag, message))
                    got = True
                else:
                    self._on_frame(item)
        except Exception as exc:  # e.g. an unknown consumer tag: a delivery must not vanish
            log.exception("dropping the broker connection: unexpected frame")
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()
        if got:
            consumer._dispatch()

    def _message(self, item: tuple, queue: str) -> Message:
        """A delivery with properties or with a body too large to keep: whatever is wrong
        with it is the message's problem (a bad_message), never the connection's."""
        problem = ""
        try:
            properties, headers = decode_properties(item[6])
        except PropertyError as exc:
            properties, headers = {}, {}
            problem = f"AMQP properties cannot be decoded: {exc}"
        body = item[7]
        if body is None:
            body = b""
            problem = (
                f"message of {item[8]} bytes exceeds --max-message-size "
                f"{self.consumer.max_message_size}; its body was not read"
            )
        return Message(body, queue, headers, properties, item[2], problem)

    # ---------------------------------------------------------------- rare frames

    def _on_frame(self, item: tuple[int, int, bytes]) -> None:
        ftype, channel, payload = item
        if ftype != codec.FRAME_METHOD:
            if ftype != codec.FRAME_HEARTBEAT:
                log.debug("ignoring a content frame of type %d on channel %d", ftype, channel)
            return
        method = _method(payload, channel)
        if isinstance(method, commands.Connection.Close):
            self._write_method(commands.Connection.CloseOk(), 0)
            self._fail(
                ConnectionError(
                    f"broker closed the connection: {method.reply_code} {method.reply_text}"
                )
            )
            if self.transport is not None:
                self.transport.close()
        elif isinstance(method, commands.Connection.CloseOk):
            self._fail(ConnectionError("closed"))
            if self.transport is not None:
                self.transport.close()
        elif isinstance(method, commands.Channel.Close):
            self._write_method(commands.Channel.CloseOk(), channel)
            self._fail(
                ConnectionError(
                    f"broker closed channel {channel}: {method.reply_code} {method.reply_text}"
                )
            )
        elif isinstance(method, commands.Basic.Cancel):
            # A broker-sent cancel (queue deleted, node down): this consumer gets nothing more,
            # so the session ends and the next one declares the queue and consumes again.
            self._fail(
                ConnectionError(f"broker cancelled consumer {method.consumer_tag} (queue deleted?)")
            )
        elif isinstance(method, commands.Connection.Blocked):
            log.warning("broker blocked the connection: %s", method.reason)
        elif isinstance(method, commands.Connection.Unblocked):
            log.info("broker unblocked the connection")
        else:
            self._replies.append(method)
            self._wake_reply()

    def _wake_reply(self) -> None:
        waiter = self._reply_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, reason: BaseException) -> None:
        self.alive = False
        if self._heartbeat_handle is not None:
            self._heartbeat_handle.cancel()
            self._heartbeat_handle = None
        if not self.closed.done():
            self.closed.set_result(reason)
        self._wake_reply()

    def _write_method(self, method: Frame, channel: int) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame.marshal(method, channel))

    async def _reply(self, expect: type[Frame]) -> Any:
        while not self._replies:
            if self.closed.done():
                raise AmqpProtocolError(str(self.closed.result()))
            self._reply_waiter = self._loop.create_future()
            try:
                await self._reply_waiter
            finally:
                self._reply_waiter = None
        method = self._replies.popleft()
        if not isinstance(method, expect):
            raise AmqpProtocolError(f"expected {expect.name} from the broker, got {method.name}")
        return method

    async def _call(self, method: Frame, channel: int, expect: type[Frame]) -> Any:
        self._write_method(method, channel)
        return await self._reply(expect)

    # ---------------------------------------------------------------- session steps

    async def open(self, params: ConnectionParams, prefetch: int, queues: Sequence[str]) -> None:
        """Connects, authenticates, tunes, opens channel 1, sets qos and consumes `queues`."""
        await self._loop.create_connection(
            lambda: self,
            params.host,
            params.port,
            ssl=ssl.create_default_context() if params.tls else None,
        )
        assert self.transport is not None
        self.transport.write(codec.PROTOCOL_HEADER)
        start = await self._reply(commands.Connection.Start)
        mechanisms = start.mechanisms
        if isinstance(mechanisms, bytes):
            mechanisms = mechanisms.decode()
        if "PLAIN" not in str(mechanisms).split():
            raise AmqpProtocolError(f"broker offers no PLAIN authentication ({mechanisms})")
        self._write_method(
            commands.Connection.StartOk(
                client_properties={
                    "product": "fastworker",
                    "version": __version__,
                    "platform": "Python",
                    "connection_name": "fastworker",
                    "capabilities": {
                        "basic.nack": True,
                        "consumer_cancel_notify": True,
                        "connection.blocked": True,
                        "authentication_failure_close": True,
                    },
                },
                mechanism="PLAIN",
                response=f"\0{params.username}\0{params.password}",
                locale="en_US",
            ),
            0,
        )
        tune = await self._reply(commands.Connection.Tune)
        frame_max = _negotiate(tune.frame_max, params.frame_max) or _WANTED_FRAME_MAX
        frame_max = max(frame_max, 4096)
        heartbeat = _negotiate(tune.heartbeat, params.heartbeat)
        channel_max = _negotiate(tune.channel_max, 2047)
        self._write_method(
            commands.Connection.TuneOk(
                channel_max=channel_max, frame_max=frame_max, heartbeat=heartbeat
            ),
            0,
        )
        self._reader.frame_max = frame_max
        await self._call(
            commands.Connection.Open(virtual_host=params.vhost), 0, commands.Connection.OpenOk
        )
        if heartbeat:
            self._heartbeat = heartbeat
            self._heartbeat_handle = self._loop.call_later(heartbeat / 2, self._heartbeat_tick)
        await self._call(commands.Channel.Open(), CHANNEL, commands.Channel.OpenOk)
        await self._call(commands.Basic.Qos(prefetch_count=prefetch), CHANNEL, commands.Basic.QosOk)
        self.alive = True  # from here on deliveries may arrive, and must be acked here
        for index, queue in enumerate(queues):
            tag = f"fastworker.{index}"
            self._queue_by_tag[tag] = queue  # deliveries may follow Consume-Ok at once
            ok = await self._call(
                commands.Basic.Consume(queue=queue, consumer_tag=tag),
                CHANNEL,
                commands.Basic.ConsumeOk,
            )
            self._queue_by_tag[ok.consumer_tag] = queue
            self.consumer_tags.append(ok.consumer_tag)

    async def cancel(self) -> None:
        """Stops the broker from sending more deliveries; already sent ones still arrive."""
        for tag in self.consumer_tags:
            await self._call(
                commands.Basic.Cancel(consumer_tag=tag), CHANNEL, commands.Basic.CancelOk
            )

    async def close(self) -> None:
        """Connection.Close, then waits for the socket to go (the broker requeues unacked ones)."""
        self.alive = False
        transport = self.transport
        if transport is None:
            self._fail(ConnectionError("closed"))
            return
        if not transport.is_closing():
            # Acks written before stay ahead of the Close on the socket, so they count.
            self._write_method(
                commands.Connection.Close(
                    reply_code=200, reply_text="bye", class_id=0, method_id=0
                ),
                0,
            )
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), CLOSE_TIMEOUT)
        except TimeoutError:
            transport.abort()
        self._fail(ConnectionError("closed"))

    def _heartbeat_tick(self) -> None:
        """Every heartbeat/2 s: send a heartbeat; drop the link after 2 silent intervals."""
        self._heartbeat_handle = None
        if self.closed.done() or self.transport is None:
            return
        if self._rx == self._rx_seen:
            self._silent_ticks += 1
        else:
            self._rx_seen, self._silent_ticks = self._rx, 0
        if self._silent_ticks >= 4:
            log.warning(
                "no data from the broker for %d s: dropping the connection", 2 * self._heartbeat
            )
            self._fail(ConnectionError("missed broker heartbeats"))
            self.transport.abort()
            return
        self.transport.write(codec.HEARTBEAT)
        self._heartbeat_handle = self._loop.call_later(self._heartbeat / 2, self._heartbeat_tick)

    # ---------------------------------------------------------------- acks

    def finished(self, tag: int) -> None:
        if not self.alive:
            return  # the broker requeues it when this connection goes away
        acks = self._acks
        acks.finished(tag)
        if not self.consumer._pending:
            # Nothing received is waiting to start: the prefetch window is the limit, so an
            # ack now (gaps or not) is what lets the broker send the next delivery.
            self.flush()
        elif acks.pending >= self._flush_at:
            self.flush(hold=True)
        self._flush_later()

    def _flush_later(self) -> None:
        """Arms the ~ACK_INTERVAL flush while acks (sent later or held) are outstanding."""
        if not self._flush_scheduled and self._acks.unacked and self.alive:
            self._flush_scheduled = True
            self._loop.call_later(ACK_INTERVAL, self._flush_timer)

    def _flush_timer(self) -> None:
        self._flush_scheduled = False
        self.flush(hold=bool(self.consumer._pending))
        self._flush_later()  # held ones: ack them next round at the latest

    def flush(self, hold: bool = False) -> None:
        """Writes the acks that are due, in one write; all of them unless `hold`, which keeps
        a delivery finished behind an unfinished one for up to ACK_HOLD (see AckTracker.take)."""
        if not self.alive:
            return
        taken = self._acks.take(self._loop.time(), ACK_HOLD if hold else 0.0)
        if taken:
            self.transport.write(self._encode_acks(CHANNEL, taken))  # type: ignore[union-attr]

    def requeue(self, tag: int) -> None:
        """Hands a delivery back to the broker without acking it."""
        if not self.alive:
            return
        self._acks.discard(tag)
        self.transport.write(self._encode_nack(CHANNEL, tag, False, True))  # type: ignore[union-attr]


class FastAmqpConsumer:
    """`AmqpConsumer`'s interface and semantics, with the per-message path in the compiled codec."""

    def __init__(
        self,
        url: str,
        queues: Sequence[str],
        handler: Handler,
        *,
        concurrency: int,
        prefetch: int,
        prepare: Prepare | None = None,
        shutdown_timeout: float = 30.0,
        max_backoff: float = 30.0,
        max_message_size: int = amqp_py.DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        self.url = url
        self.params = ConnectionParams.from_url(url)
        self.max_message_size = max_message_size  # larger bodies are skipped, not buffered
        self.queues = list(queues)
        self.handler = handler
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.prepare = prepare
        self.shutdown_timeout = shutdown_timeout
        self.max_backoff = max_backoff
        self.processed = 0
        self.connected = asyncio.Event()  # set while consuming; tests and the CLI wait on it
        self._stopping = asyncio.Event()
        # The handler's optional callback form (JobPipeline.start): a job runs without a task
        # or coroutine unless it needs one, e.g. to publish a retry.
        self._start: Start | None = getattr(handler, "start", None)
        # (link, delivery tag, message), in delivery order, not started yet; `_dispatch` takes
        # from the left while fewer than `concurrency` jobs are in flight.
        self._pending: deque[tuple[_Link, int, Message]] = deque()
        # Started jobs the runner tasks carry on: (link, tag, message, what is left to await,
        # or None to await the handler itself).
        self._ready: deque[tuple[_Link, int, Message, Awaitable[None] | None]] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()  # idle runners
        self._in_flight = 0
        self._dispatching = False
        self._running = False  # runner tasks are up; nothing is started or carried on without
        self._idle_waiter: asyncio.Future[None] | None = None

    def stop(self) -> None:
        """Stops consuming; `run()` returns once in-flight jobs finish or the timeout passes."""
        self._stopping.set()

    async def run(self) -> None:
        runners = [asyncio.create_task(self._runner()) for _ in range(self.concurrency)]
        self._running = True
        backoff = 0.5
        try:
            while not self._stopping.is_set():
                try:
                    await self._session()
                    backoff = 0.5
                except (aiormq.exceptions.AMQPError, ConnectionError, OSError, ValueError) as exc:
                    # ValueError: the codec's AMQPFrameError, or a broker answer pamqp rejects.
                    if self._stopping.is_set():
                        break
                    delay = backoff * random.uniform(0.5, 1.0)
                    log.warning(
                        "broker connection lost or refused (%r); retrying in %.1f s", exc, delay
                    )
                    backoff = min(backoff * 2, self.max_backoff)
                    try:
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    except TimeoutError:
                        pass
        finally:
            self._running = False
            for runner in runners:
                runner.cancel()
            await asyncio.gather(*runners, return_exceptions=True)

    async def _session(self) -> None:
        control = await aiormq.connect(
            self.url, client_properties={"connection_name": "fastworker-control"}
        )
        link: _Link | None = None
        try:
            for queue in self.queues:
                await ensure_queue(control, queue)
                if self.prepare is not None:
                    await self.prepare(control, queue)
            publisher = await Publisher.open(control)
            link = _Link(self, publisher)
            try:
                await asyncio.wait_for(
                    link.open(self.params, self.prefetch, self.queues), HANDSHAKE_TIMEOUT
                )
            except TimeoutError:
                raise ConnectionError("AMQP handshake timed out") from None
            log.info(
                "consuming %s (concurrency %d, prefetch %d, %s AMQP codec)",
                ", ".join(self.queues),
                self.concurrency,
                self.prefetch,
                "compiled" if codec is not amqp_py else "pure-Python",
            )
            self.connected.set()
            try:
                await self._until_lost_or_stopped(control, link)
                if self._stopping.is_set() and link.alive:
                    await self._drain(link)
            finally:
                self.connected.clear()
                link.alive = False
                self._forget_pending(link)
        finally:
            if link is not None:
                await link.close()
            if not control.is_closed:
                await control.close()

    async def _until_lost_or_stopped(self, control: AbstractConnection, link: _Link) -> None:
        """Returns on stop; raises when the fast link, the control connection or the publisher
        channel goes (without the publisher no failed job could be retried or dead-lettered)."""
        stop = asyncio.create_task(self._stopping.wait())
        control_lost = control.closing  # independent observers: cancelling them is harmless
        publisher_lost = link.publisher.channel.closing
        watched = {stop, control_lost, publisher_lost}
        try:
            await asyncio.wait({*watched, link.closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in watched:
                if not future.done():
                    future.cancel()
        if not self._stopping.is_set():
            # Observers cancelled above count as done(): ask cancelled() before exception().
            if link.closed.done():
                reason: object = link.closed.result()
            elif control_lost.done() and not control_lost.cancelled():
                reason = f"control connection lost: {control_lost.exception()!r}"
            elif publisher_lost.done() and not publisher_lost.cancelled():
                reason = f"publisher channel lost: {publisher_lost.exception()!r}"
            else:
                reason = "unknown"
            raise ConnectionError(f"broker closed the connection or channel ({reason})")

    async def _drain(self, link: _Link) -> None:
        try:
            await asyncio.wait_for(link.cancel(), HANDSHAKE_TIMEOUT)
        except (TimeoutError, ConnectionError) as exc:
            log.warning("could not cancel the consumers (%r)", exc)
        self._forget_pending(link)  # never started: closing the connection requeues them
        if self._in_flight:
            waiter = self._idle_waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(waiter, self.shutdown_timeout)
            except TimeoutError:
                log.warning(
                    "%d jobs still running after --shutdown-timeout; they return to the queue",
                    self._in_flight,
                )
            finally:
                self._idle_waiter = None
        link.flush()

    def _forget_pending(self, link: _Link) -> None:
        if self._pending:
            kept = [delivery for delivery in self._pending if delivery[0] is not link]
            self._pending.clear()
            self._pending.extend(kept)

    def _dispatch(self) -> None:
        """Starts waiting deliveries while fewer than `concurrency` jobs are in flight."""
        if self._dispatching or not self._running:
            return  # re-entered from a job that finished at once: the outer loop goes on
        self._dispatching = True
        pending, start = self._pending, self._start
        try:
            while pending and self._in_flight < self.concurrency:
                link, tag, message = pending.popleft()
                if not link.alive:
                    continue  # its connection is gone: the broker requeues it
                self._in_flight += 1
                if start is None:
                    self._carry_on(link, tag, message, None)
                    continue
                try:
                    start(message, link.publisher, self._on_done(link, tag, message))
                except Exception as exc:
                    self._carry_on(link, tag, message, _raise(exc))
        finally:
            self._dispatching = False

    def _on_done(self, link: _Link, tag: int, message: Message) -> OnDone:
        def on_done(rest: Awaitable[None] | None) -> None:
            if rest is not None:
                self._carry_on(link, tag, message, rest)
            else:
                self.processed += 1
                link.finished(tag)
                self._job_done()

        return on_done

    def _carry_on(
        self, link: _Link, tag: int, message: Message, rest: Awaitable[None] | None
    ) -> None:
        """Hands a started job to a runner task."""
        if not self._running:  # run() is over: as if its runner had been cancelled
            if isinstance(rest, Coroutine):
                rest.close()
            self._job_done()
            return
        self._ready.append((link, tag, message, rest))
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _job_done(self) -> None:
        self._in_flight -= 1
        if not self._in_flight and self._idle_waiter is not None:
            if not self._idle_waiter.done():
                self._idle_waiter.set_result(None)
        if self._pending:
            self._dispatch()

    async def _runner(self) -> None:
        loop = asyncio.get_running_loop()
        ready, waiters, handler = self._ready, self._waiters, self.handler
        while True:
            if not ready:
                waiter = loop.create_future()
                waiters.append(waiter)
                await waiter
                continue
            link, tag, message, rest = ready.popleft()
            try:
                if rest is None:
                    if not link.alive:
                        continue  # not started, and its connection is gone
                    rest = handler(message, link.publisher)
                await rest
            except asyncio.CancelledError:
                raise
            except NotStarted:
                link.requeue(tag)
            except Exception:
                log.exception(
                    "job from %s not acknowledged; it goes back to the queue", message.queue
                )
                await asyncio.sleep(REQUEUE_DELAY)  # no hot loop if the trouble persists
                link.requeue(tag)
            else:
                self.processed += 1
                link.finished(tag)
            finally:
                self._job_done()


async def _raise(exc: Exception) -> None:
    raise exc
