"""The default AMQP transport: deliveries in and acks out on the compiled frame codec.

Why: aiormq spends 62-89 us of CPU per message on consume + ack, more than the worker's whole
per-job budget of about 30 us. Here `amqp_wire.AmqpWire` reads the socket through
`amqp_codec.FrameReader`, which returns one tuple per delivery; this module turns each into a
`Message` (properties decoded per delivery, so one bad message is that message's `problem`
alone) and hands them to the consumer skeleton (`consuming`), which starts jobs straight from the
data callback. Acks leave as pre-encoded frames, many per write: batched `multiple=True` acks
every ~2 ms, at once when nothing waits to start, or as soon as half the prefetch window is
finished, so the broker never stalls. aiormq stays for everything that is not the hot path:
queue declares, the `prepare` hook and the confirmed `Publisher`, on a second ("control")
connection per session.

`codec` is the frame codec new connections use: the compiled one, or the pure-Python twin when
FASTWORKER_NO_EXTENSIONS is set or the build is missing (tests and benches may swap it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, ClassVar

import aiormq
from aiormq.abc import AbstractConnection

from fastworker import amqp_py
from fastworker.acks import AckTracker
from fastworker.amqp_py import PropertyError, decode_properties
from fastworker.amqp_wire import (
    CHANNEL,
    HANDSHAKE_TIMEOUT,
    AmqpWire,
    ConnectionParams,
    Items,
)
from fastworker.broker import Publisher, ensure_queue
from fastworker.consuming import ACK_HOLD, ACK_INTERVAL, ConsumerBase, Transport
from fastworker.message import Message

__all__ = ["ACK_HOLD", "COMPILED", "IMPORT_ERROR", "FastAmqpConsumer", "FastTransport", "codec"]

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

_NO_PROPERTIES = b"\x00\x00"  # a content header's property flags when none is set


class FastTransport(Transport):
    """One session: the control connection (aiormq) and the fast connection (`AmqpWire`)."""

    errors: ClassVar[tuple[type[BaseException], ...]] = (
        aiormq.exceptions.AMQPError,
        ConnectionError,
        OSError,
        ValueError,  # the codec's AMQPFrameError, or a broker answer pamqp rejects
    )

    __slots__ = (
        "closed",
        "publisher",
        "_acks",
        "_codec",
        "_consumer",
        "_control",
        "_deliver",
        "_delivered",
        "_encode_acks",
        "_encode_nack",
        "_flush_at",
        "_flush_scheduled",
        "_loop",
        "_observers",
        "_queues",
        "_wire",
    )

    def __init__(self, consumer: FastAmqpConsumer) -> None:
        self._loop = asyncio.get_running_loop()
        self._consumer = consumer
        self._deliver = consumer.deliver
        self._codec = codec  # read per connection, so a swapped codec counts from the next one
        self._wire = AmqpWire(codec, self._received, max_body_size=consumer.max_message_size)
        self._queues = self._wire.queue_by_tag
        self._control: AbstractConnection | None = None
        self._observers: list[asyncio.Future[Any]] = []
        self.closed: asyncio.Future[object] = self._loop.create_future()
        self._acks = AckTracker()
        self._delivered = self._acks.delivered
        self._encode_acks = codec.encode_acks
        self._encode_nack = codec.encode_nack
        self._flush_at = max(1, consumer.prefetch // 2)
        self._flush_scheduled = False

    @property
    def alive(self) -> bool:
        return self._wire.alive

    def describe(self) -> tuple[str, str]:
        how = "compiled" if self._codec is not amqp_py else "pure-Python"
        consumer = self._consumer
        return ", ".join(consumer.queues), f"prefetch {consumer.prefetch}, {how} AMQP codec"

    # ---------------------------------------------------------------- deliveries in

    def _received(self, items: Items) -> None:
        """What one socket read decoded: deliveries go to the consumer, in one batch."""
        batch = []
        delivered = self._delivered
        queues = self._queues
        on_frame = self._wire.on_frame
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
                batch.append((self, tag, message))
            else:
                on_frame(item)
        if batch:
            self._deliver(batch)

    def _message(self, item: tuple[Any, ...], queue: str) -> Message:
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
                f"{self._consumer.max_message_size}; its body was not read"
            )
        return Message(body, queue, headers, properties, item[2], problem)

    # ---------------------------------------------------------------- acks out

    def finished(self, tag: int) -> None:
        if not self._wire.alive:
            return  # the broker requeues it when this connection goes away
        acks = self._acks
        acks.finished(tag)
        if not self._consumer.waiting:
            # Nothing received is waiting to start: the prefetch window is the limit, so an
            # ack now (gaps or not) is what lets the broker send the next delivery.
            self._send_acks()
        elif acks.pending >= self._flush_at:
            self._send_acks(hold=True)
        self._flush_later()

    def _flush_later(self) -> None:
        """Arms the ~ACK_INTERVAL flush while acks (sent later or held) are outstanding."""
        if not self._flush_scheduled and self._acks.unacked and self._wire.alive:
            self._flush_scheduled = True
            self._loop.call_later(ACK_INTERVAL, self._flush_timer)

    def _flush_timer(self) -> None:
        self._flush_scheduled = False
        self._send_acks(hold=bool(self._consumer.waiting))
        self._flush_later()  # held ones: ack them next round at the latest

    def _send_acks(self, hold: bool = False) -> None:
        """Writes the acks that are due, in one write; all of them unless `hold`, which keeps
        a delivery finished behind an unfinished one for up to ACK_HOLD (see AckTracker.take)."""
        if not self._wire.alive:
            return
        taken = self._acks.take(self._loop.time(), ACK_HOLD if hold else 0.0)
        if taken:
            self._wire.write(self._encode_acks(CHANNEL, taken))

    def requeue(self, tag: int) -> None:
        """Hands a delivery back to the broker without acking it, behind the acks written so
        far (a later multiple ack cannot overtake it: it is written at once)."""
        if not self._wire.alive:
            return
        self._acks.discard(tag)
        self._wire.write(self._encode_nack(CHANNEL, tag, False, True))

    async def flush(self) -> None:
        self._send_acks()

    # ---------------------------------------------------------------- session

    async def open(self) -> None:
        consumer = self._consumer
        control = self._control = await aiormq.connect(
            consumer.url, client_properties={"connection_name": "fastworker-control"}
        )
        for queue in consumer.queues:
            await ensure_queue(control, queue)
            if consumer.prepare is not None:
                await consumer.prepare(control, queue)
        self.publisher = await Publisher.open(control)
        try:
            await asyncio.wait_for(
                self._wire.open(consumer.params, consumer.prefetch, consumer.queues),
                HANDSHAKE_TIMEOUT,
            )
        except TimeoutError:
            raise ConnectionError("AMQP handshake timed out") from None
        self._close_on(self._wire.closed, control.closing, self.publisher.channel.closing)

    def _close_on(
        self,
        wire_closed: asyncio.Future[BaseException],
        control_lost: asyncio.Future[Any],
        publisher_lost: asyncio.Future[Any],
    ) -> None:
        """Resolves `closed` when the fast connection, the control connection or the publisher
        channel goes (without the publisher no failed job could be retried or dead-lettered)."""

        def on_loss(_: asyncio.Future[Any]) -> None:
            if self.closed.done():
                return
            # Observers cancelled by close() count as done(): ask cancelled() before exception().
            if wire_closed.done():
                reason: object = wire_closed.result()
            elif control_lost.done() and not control_lost.cancelled():
                reason = f"control connection lost: {control_lost.exception()!r}"
            elif publisher_lost.done() and not publisher_lost.cancelled():
                reason = f"publisher channel lost: {publisher_lost.exception()!r}"
            else:
                return
            self.closed.set_result(reason)

        self._observers = [control_lost, publisher_lost]  # independent observers: cancellable
        for future in (wire_closed, control_lost, publisher_lost):
            future.add_done_callback(on_loss)

    async def cancel(self) -> None:
        try:
            await asyncio.wait_for(self._wire.cancel(), HANDSHAKE_TIMEOUT)
        except (TimeoutError, ConnectionError) as exc:
            log.warning("could not cancel the consumers (%r)", exc)

    async def close(self) -> None:
        if not self.closed.done():
            self.closed.set_result("closed")
        for observer in self._observers:
            if not observer.done():
                observer.cancel()
        try:
            await self._wire.close()  # not alive from its first line on
        finally:
            control = self._control
            if control is not None and not control.is_closed:
                await control.close()


class FastAmqpConsumer(ConsumerBase[AbstractConnection]):
    """The default AMQP consumer: `AmqpConsumer`'s arguments and semantics, with the per-message
    path in the compiled codec. Bodies over `max_message_size` are skipped while they are read,
    not buffered."""

    def configure(self) -> None:
        self.params = ConnectionParams.from_url(self.url)

    def new_transport(self) -> FastTransport:
        return FastTransport(self)
