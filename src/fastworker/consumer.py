"""The aiormq reference transport: the same consumer as the fast one, on a stock AMQP client.

It is what the fast transport is measured and tested against (`--amqp-client aiormq`): the
skeleton (`consuming`) is shared, only the broker side differs. Each session is one aiormq
connection: declares, the `prepare` hook, the confirmed publisher and the consuming channel. Acks
are batched (`multiple=True`) every few milliseconds; requeues travel the same ordered flush, so a
later multiple ack never covers a tag meant to be requeued. A delivery whose properties pamqp
cannot decode becomes that message's `problem` (`_decode_properties_per_message`), not a dropped
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from pamqp.header import ContentHeader

from fastworker import broker, queue_types
from fastworker.acks import AckTracker
from fastworker.amqp_base import PropertyError, decode_properties
from fastworker.amqp_nodes import Node, Nodes
from fastworker.amqp_url import AmqpUrl
from fastworker.broker import Publisher, ensure_queue
from fastworker.consuming import ACK_INTERVAL, ConsumerBase, Transport
from fastworker.message import PROPERTY_NAMES, Message

log = logging.getLogger("fastworker.consumer")


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


class AmqpConsumerBase(ConsumerBase[AbstractConnection]):
    """What both AMQP consumers read at start: the broker URLs (`url`: one, a comma list, or a
    list: a cluster's nodes), each URL's settings and TLS context. Built in `configure`, so a
    bad URL or an unreadable certificate stops the worker before it connects.

    Each session opens on `nodes.current`; the skeleton's `next_address` moves on to the next
    node when a session fails or is lost, at once within a round (see `amqp_nodes`).
    `queue_type` is how a missing work queue is declared (`queue_types`)."""

    nodes: Nodes
    queue_type: str = queue_types.CLASSIC
    max_priority: int = 0  # >0: a missing work queue is declared with x-max-priority

    def configure(self) -> None:
        self.nodes = Nodes.parse(self.url)

    @property
    def amqp(self) -> AmqpUrl:
        """The URL of the node the next session opens on."""
        return self.nodes.current.url

    @property
    def tls(self) -> ssl.SSLContext | None:
        return self.nodes.current.tls

    def next_address(self) -> str | None:
        if not self.nodes.failed():
            return None
        return self.nodes.current.masked


async def connect(consumer: AmqpConsumerBase, node: Node, role: str) -> AbstractConnection:
    """An aiormq connection to `node` (named for `role`) with the consumer's queues ready: each
    declared if missing, then `prepare`d. Both AMQP transports open one per session (the fast
    one for declares, the `prepare` hook and the publisher only)."""
    connection = await broker.connect(node.url, node.tls, role)
    try:
        for queue in consumer.queues:
            # Quorum queues of RabbitMQ 3.10 have no priorities: the worker still orders
            # what it holds, the broker does not.
            classic = consumer.queue_type == queue_types.CLASSIC
            wanted = consumer.max_priority if classic else 0
            priority = {"x-max-priority": wanted} if wanted else None
            await ensure_queue(
                connection, queue, queue_type=consumer.queue_type, arguments=priority
            )
            if consumer.prepare is not None:
                await consumer.prepare(connection, queue)
    except BaseException:
        if not connection.is_closed:
            with contextlib.suppress(Exception):
                await connection.close()
        raise
    return connection


class _Session:
    """One connection's consuming channel, its ack batching, and its publisher."""

    def __init__(self, channel: AbstractChannel, publisher: Publisher) -> None:
        self.channel = channel
        self.publisher = publisher
        self.acks = AckTracker()
        self.consumer_tags: list[str] = []
        self.queue_by_tag: dict[str, str] = {}  # consumer tag -> queue, for pause
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


class AiormqTransport(Transport):
    """One session on one aiormq connection; acks and requeues go through its `_Session`."""

    errors: ClassVar[tuple[type[BaseException], ...]] = (
        aiormq.exceptions.AMQPError,
        ConnectionError,
        OSError,
    )

    def __init__(self, consumer: AmqpConsumer) -> None:
        self.consumer = consumer
        self.node = consumer.nodes.current  # the node this session opens on
        self.connection: AbstractConnection | None = None
        self.session: _Session | None = None
        self.closed: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._observers: list[asyncio.Future[Any]] = []

    @property
    def alive(self) -> bool:
        session, connection = self.session, self.connection
        return (
            session is not None
            and session.alive
            and connection is not None
            and not connection.is_closed
        )

    def refusal(self, exc: BaseException) -> str | None:
        return broker.refusal(self.node.url.text, exc)

    def unreachable(self, exc: BaseException) -> str | None:
        return broker.unreachable(self.node.url.text, exc)

    def describe(self) -> tuple[str, str]:
        tls = ", TLS" if self.node.url.tls else ""
        details = f"prefetch {self.consumer.prefetch}{tls}, broker {self.node.masked}"
        return ", ".join(self.consumer.queues), details

    async def open(self) -> None:
        consumer = self.consumer
        connection = self.connection = await connect(consumer, self.node, "consume")
        publisher = self.publisher = await Publisher.open(connection)
        channel = await connection.channel(publisher_confirms=False)
        # aiormq only logs a broker-sent Basic.Cancel (queue deleted): end the session on it.
        cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_cancel(frame: object) -> None:
            if not cancelled.done():
                cancelled.set_result(None)

        channel.on_consumer_cancel_callbacks.add(on_cancel)
        await channel.basic_qos(prefetch_count=consumer.prefetch)
        self.session = _Session(channel, publisher)
        for queue in consumer.active_queues():
            await self.resume(queue)
        self._close_on(connection, (channel, publisher.channel), cancelled)
        consumer.nodes.connected()

    def _close_on(
        self,
        connection: AbstractConnection,
        channels: tuple[AbstractChannel, ...],
        cancelled: asyncio.Future[None],
    ) -> None:
        """Resolves `closed` when the connection or any of its channels closes, or the broker
        cancels the consumer. A dead publisher channel matters as much as the consuming one:
        without it no failed job could be retried or dead-lettered."""
        lost = asyncio.ensure_future(connection.closing)

        def on_loss(_: asyncio.Future[Any]) -> None:
            if self.closed.done():
                return
            # `lost` is cancelled by close() while the connection is open: no exception() then.
            reason = lost.exception() if lost.done() and not lost.cancelled() else None
            if cancelled.done():
                reason = "the broker cancelled the consumer (queue deleted?)"
            self.closed.set_result(repr(reason))

        self._observers = [lost, *(asyncio.ensure_future(ch.closing) for ch in channels)]
        for future in (*self._observers, cancelled):
            future.add_done_callback(on_loss)

    def _on_delivery(
        self, session: _Session, queue: str
    ) -> Callable[[DeliveredMessage], Coroutine[Any, Any, None]]:
        deliver = self.consumer.deliver

        async def on_delivery(delivered: DeliveredMessage) -> None:
            tag = delivered.delivery_tag
            assert tag is not None
            props = delivered.header.properties
            problem = getattr(delivered.header, _PROBLEM, "")
            if delivered.redelivered:
                queue_types.redelivered(queue, props.headers)
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
            deliver([(self, tag, message)])

        return on_delivery

    def finished(self, tag: int) -> None:
        if self.session is not None:
            self.session.finished(tag)

    def requeue(self, tag: int) -> None:
        if self.session is not None:
            self.session.requeue(tag)

    async def pause(self, queue: str) -> None:
        session = self.session
        if session is None:
            return
        for tag in [t for t, q in session.queue_by_tag.items() if q == queue]:
            del session.queue_by_tag[tag]
            session.consumer_tags.remove(tag)
            await session.channel.basic_cancel(tag)

    async def resume(self, queue: str) -> None:
        session = self.session
        if session is None:
            return
        ok = await session.channel.basic_consume(queue, self._on_delivery(session, queue))
        if ok.consumer_tag is not None:  # the broker always names it
            session.consumer_tags.append(ok.consumer_tag)
            session.queue_by_tag[ok.consumer_tag] = queue

    async def cancel(self) -> None:
        if self.session is None:
            return
        for tag in self.session.consumer_tags:
            try:
                await self.session.channel.basic_cancel(tag)
            except aiormq.exceptions.AMQPError:
                pass

    async def flush(self) -> None:
        if self.session is not None:
            await self.session.flush_all()

    async def close(self) -> None:
        if self.session is not None:
            self.session.alive = False
        if not self.closed.done():
            self.closed.set_result("closed")
        for observer in self._observers:
            if not observer.done():
                observer.cancel()
        if self.connection is not None and not self.connection.is_closed:
            await self.connection.close()


class AmqpConsumer(AmqpConsumerBase):
    """The reference AMQP consumer (`--amqp-client aiormq`). aiormq reads every body whole;
    the handler refuses one over `max_message_size`."""

    def configure(self) -> None:
        super().configure()
        _decode_properties_per_message()

    def new_transport(self) -> AiormqTransport:
        return AiormqTransport(self)
