"""The default AMQP transport: deliveries in and acks out on the compiled frame codec.

Why: aiormq spends 62-89 us of CPU per message on consume + ack, more than the worker's whole
per-job budget of about 30 us. `FastTransport` is an `amqp_wire.AmqpWire` (the client side of
the connection, reading the socket through the frame codec's `FrameReader`) that adds what is
per delivery: each `Delivery` becomes a `Message` (properties decoded per delivery, so one bad
message is that message's `problem` alone), and each read's deliveries go to the consumer
skeleton (`consuming`) in one batch, which starts jobs straight from the data callback. Acks
leave as pre-encoded frames, many per write: batched `multiple=True` acks every ~2 ms, or as soon
as half of the window the jobs in flight leave free is finished, so the broker never stalls; at
once only when the prefetch window is full and nothing waits to start (an ack is then what lets
the broker send the next delivery). A delivery that finished behind a running one waits up to
ACK_HOLD for the gap to close, so that it is acked with its neighbours instead of alone.
aiormq stays for what is not the hot path: queue declares, the `prepare` hook and the confirmed
`Publisher`, on a second ("control") connection per session.

`codec` is the frame codec new connections use, as `fastworker.codec` chose it (`amqp`): the
compiled `_amqp_codec`, or the pure-Python twin `amqp_py` when FASTWORKER_NO_EXTENSIONS is set or
the build is missing. Tests and benches swap it here; both return `amqp_base.Delivery` and `Frame`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import aiormq
from aiormq.abc import AbstractConnection

from fastworker import amqp_py, broker, queue_types
from fastworker import codec as selected
from fastworker.acks import AckTracker
from fastworker.amqp_base import Delivery, PropertyError, RemoteProtocolError, decode_properties
from fastworker.amqp_nodes import Node
from fastworker.amqp_wire import CHANNEL, HANDSHAKE_TIMEOUT, AmqpWire, Items
from fastworker.broker import Publisher
from fastworker.consumer import AmqpConsumerBase, connect
from fastworker.consuming import ACK_HOLD, ACK_INTERVAL, Transport
from fastworker.message import Message

__all__ = ["ACK_HOLD", "FastAmqpConsumer", "FastTransport", "codec"]

codec = selected.amqp  # read per connection (FastTransport.__init__): swap it to switch twins

log = logging.getLogger("fastworker.consumer")

_NO_PROPERTIES = b"\x00\x00"  # a content header's property flags when none is set
# Property flags with delivery_mode alone, and its value: what a quorum queue delivers for a
# message published without properties (it sets delivery_mode), or with only persistence.
_MODE_ONLY = {b"\x10\x00\x01": 1, b"\x10\x00\x02": 2}


class FastTransport(AmqpWire, Transport):
    """One session: the fast connection (this AmqpWire) and the control connection (aiormq)."""

    errors: ClassVar[tuple[type[BaseException], ...]] = (
        aiormq.exceptions.AMQPError,
        ConnectionError,
        OSError,
        RemoteProtocolError,  # the frame codec's: a byte stream that cannot be trusted
        ValueError,  # a broker answer pamqp rejects
    )

    __slots__ = (
        "publisher",
        "_acks",
        "_consumer",
        "_control",
        "_node",
        "_deliver",
        "_delivered",
        "_encode_acks",
        "_encode_nack",
        "_flush_at",
        "_flush_scheduled",
        "_observers",
        "_waiting",
        "_window",
    )

    def __init__(self, consumer: FastAmqpConsumer) -> None:
        # The codec is read per connection, so a swapped one counts from the next connection.
        super().__init__(codec, max_body_size=consumer.max_message_size)
        self._consumer = consumer
        self._deliver = consumer.deliver
        self._waiting = consumer.waiting
        self._control: AbstractConnection | None = None
        self._node: Node | None = None  # the node `open` connects to
        self._observers: list[asyncio.Future[Any]] = []
        self._acks = AckTracker()
        self._delivered = self._acks.delivered
        self._encode_acks = codec.encode_acks
        self._encode_nack = codec.encode_nack
        # The window: deliveries the broker sends ahead of the acks. The jobs in flight fill
        # part of it; acks go once half of the rest is finished, so that deliveries keep
        # waiting to start while the next batch of acks builds up.
        self._window = consumer.prefetch
        self._flush_at = max(1, (consumer.prefetch - consumer.concurrency) // 2)
        self._flush_scheduled = False

    def refusal(self, exc: BaseException) -> str | None:
        node = self._node
        return None if node is None else broker.refusal(node.url.text, exc)

    def unreachable(self, exc: BaseException) -> str | None:
        node = self._node
        return None if node is None else broker.unreachable(node.url.text, exc)

    def describe(self) -> tuple[str, str]:
        how = "compiled" if self._codec is not amqp_py else "pure-Python"
        consumer = self._consumer
        node = self._node
        tls = ", TLS" if node is not None and node.url.tls else ""
        where = f", broker {node.masked}" if node is not None else ""
        details = f"prefetch {consumer.prefetch}, {how} AMQP codec{tls}{where}"
        return ", ".join(consumer.queues), details

    # ---------------------------------------------------------------- deliveries in

    def _received(self, items: Items) -> None:
        """What one socket read decoded: its deliveries go to the consumer in one batch."""
        batch = []
        delivered = self._delivered
        queues = self.queue_by_tag
        for item in items:
            if type(item) is Delivery:
                tag = item.delivery_tag
                delivered(tag)
                body = item.body
                if item.properties_raw == _NO_PROPERTIES and body is not None:  # the bundle's
                    message = Message(body, queues[item.consumer_tag], {}, {}, item.redelivered)
                else:
                    message = self._message(item, queues[item.consumer_tag])
                batch.append((self, tag, message))
            else:
                self.on_frame(item)
        if batch:
            self._deliver(batch)

    def _message(self, item: Delivery, queue: str) -> Message:
        """A delivery with properties or with a body too large to keep: whatever is wrong
        with it is the message's problem (a bad_message), never the connection's."""
        mode = _MODE_ONLY.get(item.properties_raw)
        if mode is not None and item.body is not None:  # as decode_properties would say
            return Message(item.body, queue, {}, {"delivery_mode": mode}, item.redelivered)
        problem = ""
        try:
            properties, headers = decode_properties(item.properties_raw)
        except PropertyError as exc:
            properties, headers = {}, {}
            problem = f"AMQP properties cannot be decoded: {exc}"
        if item.redelivered:  # rare: a quorum queue's count may say why (queue_types)
            queue_types.redelivered(queue, headers)
        body = item.body
        if body is None:
            body = b""
            problem = (
                f"message of {item.body_size} bytes exceeds --max-message-size "
                f"{self._consumer.max_message_size}; its body was not read"
            )
        return Message(body, queue, headers, properties, item.redelivered, problem)

    # ---------------------------------------------------------------- acks out

    def finished(self, tag: int) -> None:
        if not self.alive:
            return  # the broker requeues it when this connection goes away
        acks = self._acks
        acks.finished(tag)
        if self._starved():
            # The window is full and nothing received waits to start: an ack now (gaps or
            # not) is what lets the broker send the next delivery.
            self._send_acks()
        elif acks.pending >= self._flush_at:
            self._send_acks(hold=True)
        self._flush_later()

    def _starved(self) -> bool:
        """Whether the prefetch window is what keeps jobs from starting. With nothing waiting
        and the window not full, the queue is empty (or the broker slow): acking a delivery
        behind a gap alone, at once, would cost the broker a frame and start nothing."""
        # With several queues each has its own window; counting them together errs towards
        # acking at once.
        return not self._waiting and self._acks.outstanding >= self._window

    def _flush_later(self) -> None:
        """Arms the ~ACK_INTERVAL flush while acks (sent later or held) are outstanding."""
        if not self._flush_scheduled and self._acks.unacked and self.alive:
            self._flush_scheduled = True
            self._loop.call_later(ACK_INTERVAL, self._flush_timer)

    def _flush_timer(self) -> None:
        self._flush_scheduled = False
        self._send_acks(hold=not self._starved())
        self._flush_later()  # held ones: ack them next round at the latest

    def _send_acks(self, hold: bool = False) -> None:
        """Writes the acks that are due, in one write; all of them unless `hold`, which keeps
        a delivery finished behind an unfinished one for up to ACK_HOLD (see AckTracker.take)."""
        if not self.alive:
            return
        taken = self._acks.take(self._loop.time(), ACK_HOLD if hold else 0.0)
        if taken:
            self.write(self._encode_acks(CHANNEL, taken))
            frames = self._consumer.ack_frames
            multiple = taken[0][1]  # only the first may be a multiple ack
            frames["multiple"] += multiple
            frames["single"] += len(taken) - multiple

    def requeue(self, tag: int) -> None:
        """Hands a delivery back to the broker without acking it; written at once, so no later
        multiple ack can overtake it."""
        if not self.alive:
            return
        self._acks.discard(tag)
        self.write(self._encode_nack(CHANNEL, tag, False, True))

    async def flush(self) -> None:
        self._send_acks()

    # ---------------------------------------------------------------- session

    async def open(self) -> None:
        consumer = self._consumer
        # Both connections of the session go to the same node, the consumer's current one.
        node = self._node = consumer.nodes.current
        # The control connection declares, prepares and publishes retries and dead letters.
        control = self._control = await connect(consumer, node, "publish")
        self.publisher = await Publisher.open(control)
        try:
            await asyncio.wait_for(
                self.connect(node.url, node.tls, consumer.prefetch, consumer.active_queues()),
                node.url.connect_timeout,
            )
        except TimeoutError:
            raise ConnectionError("AMQP handshake timed out") from None
        self._close_on(control.closing, self.publisher.channel.closing)
        consumer.nodes.connected()

    def _close_on(
        self, control_lost: asyncio.Future[Any], publisher_lost: asyncio.Future[Any]
    ) -> None:
        """Resolves `closed` (as the fast connection does on its own) when the control
        connection or the publisher channel goes: without the publisher no failed job could be
        retried or dead-lettered."""

        def on_loss(_: asyncio.Future[Any]) -> None:
            if self.closed.done():
                return
            # Observers cancelled by close() count as done(): ask cancelled() before exception().
            if control_lost.done() and not control_lost.cancelled():
                self.closed.set_result(f"control connection lost: {control_lost.exception()!r}")
            elif publisher_lost.done() and not publisher_lost.cancelled():
                self.closed.set_result(f"publisher channel lost: {publisher_lost.exception()!r}")

        self._observers = [control_lost, publisher_lost]  # independent observers: cancellable
        for future in self._observers:
            future.add_done_callback(on_loss)

    async def cancel(self) -> None:
        try:
            await asyncio.wait_for(self.cancel_consumers(), HANDSHAKE_TIMEOUT)
        except (TimeoutError, ConnectionError) as exc:
            log.warning("could not cancel the consumers (%r)", exc)

    async def pause(self, queue: str) -> None:
        await asyncio.wait_for(self.cancel_queue(queue), HANDSHAKE_TIMEOUT)

    async def resume(self, queue: str) -> None:
        await asyncio.wait_for(self.consume_queue(queue), HANDSHAKE_TIMEOUT)

    async def close(self) -> None:
        for observer in self._observers:
            if not observer.done():
                observer.cancel()
        try:
            await self.disconnect()  # not alive from its first line on
        finally:
            control = self._control
            if control is not None and not control.is_closed:
                await control.close()


class FastAmqpConsumer(AmqpConsumerBase):
    """The default AMQP consumer: `AmqpConsumer`'s arguments and semantics, with the per-message
    path in the compiled codec. Bodies over `max_message_size` are skipped while they are read,
    not buffered."""

    def configure(self) -> None:
        super().configure()
        # Ack frames its transports sent, multiple or single, for the metrics.
        self.ack_frames = {"multiple": 0, "single": 0}

    def new_transport(self) -> FastTransport:
        return FastTransport(self)
