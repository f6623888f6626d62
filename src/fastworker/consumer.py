"""Consumes AMQP deliveries with aiormq and runs them through a handler, `concurrency` at a time.

aiormq runs every delivery as a task of its own, so prefetch is no concurrency limit: deliveries
are queued here and a fixed set of runners take them. A delivery is acked only after the handler
returned; a handler that raises leaves it unacked, so the broker delivers it again. Acks are sent
in batches (`multiple=True`) every few milliseconds. After a reconnect the old channel's
deliveries come again from the broker, so a job that finishes late is never acked on the new one.
The consumer knows nothing of FastCGI; the handler knows nothing of delivery tags.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from pamqp.header import ContentHeader

from fastworker.acks import AckTracker
from fastworker.amqp_py import PropertyError, decode_properties
from fastworker.broker import Publisher, ensure_queue
from fastworker.message import PROPERTY_NAMES, Message, NotStarted

log = logging.getLogger("fastworker.consumer")

Handler = Callable[[Message, Publisher], Awaitable[None]]
# Called once per connection before consuming starts, e.g. to declare retry queues.
Prepare = Callable[[AbstractConnection, str], Awaitable[None]]

ACK_INTERVAL = 0.002  # seconds finished deliveries may wait to share one ack
REQUEUE_DELAY = 1.0  # seconds before a delivery whose handler failed goes back to the queue


_PROBLEM = "fastworker_problem"


def _decode_properties_per_message() -> None:
    """Makes a delivery whose properties cannot be decoded the message's problem alone.

    pamqp raises while aiormq reads the content header (a timestamp out of range, tables nested
    too deep), aiormq then drops the connection, and the broker delivers the same message again:
    one message would stall the worker forever. The content header is decoded by fastworker's
    own property decoder first (the fast consumer's): if it refuses, the header keeps no
    properties and says why in `fastworker_problem`; the message is then dead-lettered.
    """
    original = ContentHeader.unmarshal
    if getattr(original, "__fastworker__", False):
        return

    def unmarshal(self: ContentHeader, data: bytes) -> None:
        try:
            decode_properties(data[12:])
        except PropertyError as exc:
            original(self, data[:12] + b"\x00\x00")  # class, weight, body size: no properties
            setattr(self, _PROBLEM, f"AMQP properties cannot be decoded: {exc}")
            return
        original(self, data)

    unmarshal.__fastworker__ = True  # type: ignore[attr-defined]
    ContentHeader.unmarshal = unmarshal  # type: ignore[method-assign]


@dataclass(slots=True)
class _Delivery:
    session: _Session
    tag: int
    message: Message


class _Session:
    """One connection's consuming channel, its ack batching, and its publisher."""

    def __init__(self, channel: AbstractChannel, publisher: Publisher) -> None:
        self.channel = channel
        self.publisher = publisher
        self.acks = AckTracker()
        self.consumer_tags: list[str] = []
        self.requeues: deque[int] = deque()  # nacks not yet sent, sent before any later ack
        self.flush_scheduled = False
        self.flushing: set[asyncio.Task[None]] = set()
        self.flush_lock = asyncio.Lock()
        self.alive = True

    def finished(self, tag: int) -> None:
        if not self.alive:
            return  # the broker already requeued it when the old channel went away
        self.acks.finished(tag)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_later(ACK_INTERVAL, self._flush_soon)

    def requeue(self, tag: int) -> None:
        """Hands a delivery back to the broker without acking it."""
        if not self.alive:
            return
        self.acks.discard(tag)
        # Through the flush, not a task of its own: once discarded, the tag may lie inside a
        # multiple=True ack taken later, which must reach the broker after this nack (else it
        # would ack the message meant to be requeued).
        self.requeues.append(tag)
        self._flush_soon()

    def _flush_soon(self) -> None:
        self.flush_scheduled = False
        task = asyncio.get_running_loop().create_task(self.flush())
        self.flushing.add(task)
        task.add_done_callback(self.flushing.discard)

    async def flush(self, wait: bool = False) -> None:
        # One flush at a time, taking its acks inside the lock: a later multiple=True ack must
        # never overtake an earlier single ack of a tag it covers (RabbitMQ would close the
        # channel with "unknown delivery tag" and redeliver everything unacked). Requeues go
        # first, for the same reason.
        async with self.flush_lock:
            while self.requeues:
                tag = self.requeues.popleft()
                if not self.alive or self.channel.is_closed:
                    return
                try:
                    await self.channel.basic_nack(tag, requeue=True, wait=wait)
                except (aiormq.exceptions.AMQPError, RuntimeError) as exc:
                    log.warning("requeue of delivery %d failed (%r)", tag, exc)
                    return
            for tag, multiple in self.acks.take():
                if not self.alive or self.channel.is_closed:
                    return
                try:
                    await self.channel.basic_ack(tag, multiple=multiple, wait=wait)
                except (aiormq.exceptions.AMQPError, RuntimeError) as exc:
                    log.warning("ack of delivery %d failed (%r); it will be redelivered", tag, exc)
                    return

    async def flush_all(self) -> None:
        """Sends every pending ack and waits until they are written, before the channel closes."""
        if self.flushing:
            await asyncio.gather(*self.flushing, return_exceptions=True)
        await self.flush(wait=True)


class AmqpConsumer:
    """Reconnects with capped backoff until `stop()`, then drains in-flight jobs and exits."""

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
        max_message_size: int = 0,  # aiormq reads every body whole; the pipeline refuses it
    ) -> None:
        _decode_properties_per_message()
        self.url = url
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
        self._pending: asyncio.Queue[_Delivery] = asyncio.Queue()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def stop(self) -> None:
        """Stops consuming; `run()` returns once in-flight jobs finish or the timeout passes."""
        self._stopping.set()

    async def run(self) -> None:
        runners = [asyncio.create_task(self._runner()) for _ in range(self.concurrency)]
        backoff = 0.5
        try:
            while not self._stopping.is_set():
                try:
                    await self._session()
                    backoff = 0.5
                except (aiormq.exceptions.AMQPError, ConnectionError, OSError) as exc:
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
            for runner in runners:
                runner.cancel()
            await asyncio.gather(*runners, return_exceptions=True)

    async def _session(self) -> None:
        connection = await aiormq.connect(
            self.url, client_properties={"connection_name": "fastworker"}
        )
        try:
            for queue in self.queues:
                await ensure_queue(connection, queue)
                if self.prepare is not None:
                    await self.prepare(connection, queue)
            publisher = await Publisher.open(connection)
            channel = await connection.channel(publisher_confirms=False)
            # aiormq only logs a broker-sent Basic.Cancel (queue deleted): end the session on it.
            cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            channel.on_consumer_cancel_callbacks.add(
                lambda frame: cancelled.done() or cancelled.set_result(None)
            )
            await channel.basic_qos(prefetch_count=self.prefetch)
            session = _Session(channel, publisher)
            for queue in self.queues:
                ok = await channel.basic_consume(queue, self._on_delivery(session, queue))
                session.consumer_tags.append(ok.consumer_tag)
            log.info(
                "consuming %s (concurrency %d, prefetch %d)",
                ", ".join(self.queues),
                self.concurrency,
                self.prefetch,
            )
            self.connected.set()
            try:
                await self._until_lost_or_stopped(
                    connection, channel, publisher.channel, cancelled=cancelled
                )
                if self._stopping.is_set() and not connection.is_closed:
                    await self._drain(session)
            finally:
                self.connected.clear()
                session.alive = False
                self._forget_pending(session)
        finally:
            if not connection.is_closed:
                await connection.close()

    async def _until_lost_or_stopped(
        self,
        connection: AbstractConnection,
        *channels: AbstractChannel,
        cancelled: asyncio.Future[None] | None = None,
    ) -> None:
        """Returns on stop; raises when the connection or any of its channels closes.

        A dead publisher channel matters as much as the consuming one: without it no failed job
        could be retried or dead-lettered.
        """
        stop = asyncio.create_task(self._stopping.wait())
        lost = asyncio.ensure_future(connection.closing)
        watched = {stop, lost, *(asyncio.ensure_future(ch.closing) for ch in channels)}
        try:
            await asyncio.wait(
                watched | ({cancelled} if cancelled else set()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for future in watched:
                if not future.done():
                    future.cancel()
        if not self._stopping.is_set():
            # A closed channel (a broker-sent cancel, a consumer_timeout) ends the session too.
            # `lost` was cancelled above if the connection is still open: no exception() then.
            reason = lost.exception() if lost.done() and not lost.cancelled() else None
            if cancelled is not None and cancelled.done():
                reason = "the broker cancelled the consumer (queue deleted?)"
            raise ConnectionError(f"broker closed the connection or channel ({reason!r})")

    async def _drain(self, session: _Session) -> None:
        for tag in session.consumer_tags:
            try:
                await session.channel.basic_cancel(tag)
            except aiormq.exceptions.AMQPError:
                pass
        self._forget_pending(session)  # never started: closing the channel requeues them
        try:
            await asyncio.wait_for(self._idle.wait(), self.shutdown_timeout)
        except TimeoutError:
            log.warning(
                "%d jobs still running after --shutdown-timeout; they return to the queue",
                self._in_flight,
            )
        await session.flush_all()

    def _forget_pending(self, session: _Session) -> None:
        kept = []
        while not self._pending.empty():
            delivery = self._pending.get_nowait()
            if delivery.session is not session:
                kept.append(delivery)
        for delivery in kept:
            self._pending.put_nowait(delivery)

    def _on_delivery(
        self, session: _Session, queue: str
    ) -> Callable[[DeliveredMessage], Awaitable[None]]:
        async def on_delivery(delivered: DeliveredMessage) -> None:
            tag = delivered.delivery_tag
            assert tag is not None
            props = delivered.header.properties
            problem = getattr(delivered.header, _PROBLEM, "")
            message = Message(
                body=delivered.body,
                queue=queue,
                headers=dict(props.headers or {}),
                properties={
                    name: value
                    for name in PROPERTY_NAMES
                    if (value := getattr(props, name, None)) is not None
                },
                redelivered=bool(delivered.redelivered),
                problem=problem,
            )
            session.acks.delivered(tag)
            self._pending.put_nowait(_Delivery(session, tag, message))

        return on_delivery

    async def _runner(self) -> None:
        while True:
            delivery = await self._pending.get()
            session = delivery.session
            if not session.alive:
                continue
            self._in_flight += 1
            self._idle.clear()
            try:
                await self.handler(delivery.message, session.publisher)
            except asyncio.CancelledError:
                raise
            except NotStarted:
                session.requeue(delivery.tag)
            except Exception:
                log.exception(
                    "job from %s not acknowledged; it goes back to the queue",
                    delivery.message.queue,
                )
                await asyncio.sleep(REQUEUE_DELAY)  # no hot loop if the trouble persists
                session.requeue(delivery.tag)
            else:
                self.processed += 1
                session.finished(delivery.tag)
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()
