"""The fast AMQP connection's client side: handshake, heartbeats, the rare frames, close.

Why a client of our own: aiormq spends tens of microseconds per delivery (pamqp objects per
frame, a task per delivery), more than the worker's whole budget per job. `AmqpWire` is an
asyncio Protocol that feeds socket bytes to a frame codec (`FrameReader` of `_amqp_codec`, or its
pure-Python twin, chosen by the caller). Deliveries are a subclass's business (the fast
transport in `fast_consumer` overrides `_received`); this module answers everything else. pamqp
marshals and unmarshals the rare frames (handshake, qos, consume, cancel, close). One
connection, one consuming channel; it knows nothing of the ack policy or of jobs. What the URL
says comes parsed (`amqp_url.AmqpUrl`), and TLS as the process's one context (`amqp_tls`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from collections import deque
from collections.abc import Sequence
from types import ModuleType
from typing import Any, cast

from pamqp import commands, frame
from pamqp.base import Frame

from fastworker import __version__
from fastworker.amqp_base import Delivery
from fastworker.amqp_base import Frame as RawFrame
from fastworker.amqp_url import DEFAULT_FRAME_MAX, DEFAULT_HEARTBEAT, AmqpUrl

log = logging.getLogger("fastworker.consumer")

HANDSHAKE_TIMEOUT = 15.0  # seconds for each consume-side RPC (connecting: the URL's timeout)
CLOSE_TIMEOUT = 2.0  # seconds to wait for Close-Ok before dropping the socket
CHANNEL = 1  # the one consuming channel of the connection
_FRAME_HEADER = struct.Struct(">BHI")

# What the codec's FrameReader.feed returns: a `Delivery` per delivery, a raw `Frame` per other
# frame (amqp_base.Frame; `Frame` here is pamqp's decoded method frame).
Items = list[Delivery | RawFrame]


class AmqpProtocolError(ConnectionError):
    """The broker refused the handshake or answered out of turn; the session is retried."""


def _negotiate(server: int, client: int) -> int:
    """AMQP tuning: 0 means "no limit" on either side, otherwise the lower value wins."""
    if not server or not client:
        return server or client
    return min(server, client)


class AmqpWire(asyncio.Protocol):
    """One AMQP connection with one consuming channel.

    `_received(items)` gets everything each read decoded, in order; a subclass handles the
    deliveries there and passes every other item to `on_frame`. Whatever it raises drops the
    connection (a delivery must not vanish silently). `alive` is True from Qos-Ok until the
    connection or channel is lost or `disconnect()` is called; `closed` then resolves with the
    reason (never as an exception).
    """

    __slots__ = (
        "alive",
        "closed",
        "consumer_tags",
        "lost",
        "queue_by_tag",
        "transport",
        "_codec",
        "_feed",
        "_heartbeat",
        "_heartbeat_handle",
        "_loop",
        "_reader",
        "_replies",
        "_reply_waiter",
        "_rx",
        "_rx_seen",
        "_silent_ticks",
    )

    def __init__(self, codec: ModuleType, *, max_body_size: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._codec = codec
        self.transport: asyncio.Transport | None = None
        self.alive = False
        self.closed: asyncio.Future[object] = self._loop.create_future()
        self.lost: asyncio.Future[None] = self._loop.create_future()  # the socket is gone
        self.consumer_tags: list[str] = []
        self.queue_by_tag: dict[str, str] = {}  # consumer tag -> queue
        self._reader = codec.FrameReader(max_body_size=max_body_size)
        self._feed = self._reader.feed
        self._replies: deque[Frame] = deque()
        self._reply_waiter: asyncio.Future[None] | None = None
        self._heartbeat = 0
        self._heartbeat_handle: asyncio.TimerHandle | None = None
        self._rx = 0
        self._rx_seen = 0
        self._silent_ticks = 0

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or ConnectionError("the broker closed the connection"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._rx += 1
        try:
            items = self._feed(data)
        except Exception as exc:  # RemoteProtocolError: the stream cannot be trusted any more
            log.error("dropping the broker connection: %s", exc)
            self._drop(exc)
            return
        if not items:
            return
        try:
            self._received(items)
        except Exception as exc:  # e.g. an unknown consumer tag: a delivery must not vanish
            log.exception("dropping the broker connection: unexpected frame")
            self._drop(exc)

    def _received(self, items: Items) -> None:
        """Everything one read decoded; this class handles all but the deliveries."""
        for item in items:
            if type(item) is RawFrame:
                self.on_frame(item)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def fail(self, reason: BaseException) -> None:
        """Marks the connection unusable (not alive, `closed` resolved with `reason`)."""
        self.alive = False
        if self._heartbeat_handle is not None:
            self._heartbeat_handle.cancel()
            self._heartbeat_handle = None
        if not self.closed.done():
            self.closed.set_result(reason)
        self._wake_reply()

    def _drop(self, reason: BaseException) -> None:
        self.fail(reason)
        if self.transport is not None:
            self.transport.abort()

    # ---------------------------------------------------------------- rare frames

    def on_frame(self, item: RawFrame) -> None:
        """A frame that is not part of a delivery: a method (decoded by pamqp) or a heartbeat."""
        ftype, channel, payload = item
        codec = self._codec
        if ftype != codec.FRAME_METHOD:
            if ftype != codec.FRAME_HEARTBEAT:
                log.debug("ignoring a content frame of type %d on channel %d", ftype, channel)
            return
        method = self._method(payload, channel)
        if isinstance(method, commands.Connection.Close):
            self._write_method(commands.Connection.CloseOk(), 0)
            self.fail(
                ConnectionError(
                    f"broker closed the connection: {method.reply_code} {method.reply_text}"
                )
            )
            if self.transport is not None:
                self.transport.close()
        elif isinstance(method, commands.Connection.CloseOk):
            self.fail(ConnectionError("closed"))
            if self.transport is not None:
                self.transport.close()
        elif isinstance(method, commands.Channel.Close):
            self._write_method(commands.Channel.CloseOk(), channel)
            self.fail(
                ConnectionError(
                    f"broker closed channel {channel}: {method.reply_code} {method.reply_text}"
                )
            )
        elif isinstance(method, commands.Basic.Cancel):
            # A broker-sent cancel (queue deleted, node down): this consumer gets nothing more,
            # so the session ends and the next one declares the queue and consumes again.
            self.fail(
                ConnectionError(f"broker cancelled consumer {method.consumer_tag} (queue deleted?)")
            )
        elif isinstance(method, commands.Connection.Blocked):
            log.warning("broker blocked the connection: %s", method.reason)
        elif isinstance(method, commands.Connection.Unblocked):
            log.info("broker unblocked the connection")
        else:
            self._replies.append(method)
            self._wake_reply()

    def _method(self, payload: bytes, channel: int) -> Frame:
        """Decodes a raw method frame's payload with pamqp (only rare frames come here)."""
        header = _FRAME_HEADER.pack(self._codec.FRAME_METHOD, channel, len(payload))
        return cast(Frame, frame.unmarshal(header + payload + b"\xce")[2])

    def _wake_reply(self) -> None:
        waiter = self._reply_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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

    async def connect(
        self,
        params: AmqpUrl,
        context: ssl.SSLContext | None,
        prefetch: int,
        queues: Sequence[str],
    ) -> None:
        """Connects (over TLS with `context` for amqps://), authenticates, tunes, opens
        channel 1, sets qos and consumes `queues`."""
        if params.tls and context is None:
            raise ValueError("amqps:// needs a TLS context (amqp_tls.client_context)")
        await self._loop.create_connection(
            lambda: self,
            params.host,
            params.port,
            ssl=context if params.tls else None,
            server_hostname=params.server_hostname if params.tls else None,
        )
        assert self.transport is not None
        self.transport.write(self._codec.PROTOCOL_HEADER)
        start = await self._reply(commands.Connection.Start)
        mechanisms = start.mechanisms
        if isinstance(mechanisms, bytes):
            mechanisms = mechanisms.decode()
        if params.auth not in str(mechanisms).split():
            raise AmqpProtocolError(f"broker offers no {params.auth} authentication ({mechanisms})")
        # EXTERNAL: the broker takes the user from the client certificate.
        response = "" if params.auth == "EXTERNAL" else f"\0{params.username}\0{params.password}"
        self._write_method(
            commands.Connection.StartOk(
                client_properties={
                    "product": "fastworker",
                    "version": __version__,
                    "platform": "Python",
                    "connection_name": params.connection_name("consume"),
                    "capabilities": {
                        "basic.nack": True,
                        "consumer_cancel_notify": True,
                        "connection.blocked": True,
                        "authentication_failure_close": True,
                    },
                },
                mechanism=params.auth,
                response=response,
                locale="en_US",
            ),
            0,
        )
        tune = await self._reply(commands.Connection.Tune)
        frame_max = _negotiate(tune.frame_max, params.frame_max) or DEFAULT_FRAME_MAX
        frame_max = max(frame_max, 4096)
        wanted = DEFAULT_HEARTBEAT if params.heartbeat is None else params.heartbeat
        heartbeat = _negotiate(tune.heartbeat, wanted)
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
            self.queue_by_tag[tag] = queue  # deliveries may follow Consume-Ok at once
            ok = await self._call(
                commands.Basic.Consume(queue=queue, consumer_tag=tag),
                CHANNEL,
                commands.Basic.ConsumeOk,
            )
            self.queue_by_tag[ok.consumer_tag] = queue
            self.consumer_tags.append(ok.consumer_tag)

    async def cancel_consumers(self) -> None:
        """Stops the broker from sending more deliveries; already sent ones still arrive."""
        for tag in self.consumer_tags:
            await self._call(
                commands.Basic.Cancel(consumer_tag=tag), CHANNEL, commands.Basic.CancelOk
            )

    async def cancel_queue(self, queue: str) -> None:
        """Stops consuming `queue` alone (pause); deliveries already sent still arrive."""
        for tag in [t for t in self.consumer_tags if self.queue_by_tag.get(t) == queue]:
            self.consumer_tags.remove(tag)
            await self._call(
                commands.Basic.Cancel(consumer_tag=tag), CHANNEL, commands.Basic.CancelOk
            )

    async def consume_queue(self, queue: str) -> None:
        """Consumes `queue` again (resume), under a consumer tag not used before."""
        tag = f"fastworker.{queue}.{len(self.queue_by_tag)}"
        self.queue_by_tag[tag] = queue
        ok = await self._call(
            commands.Basic.Consume(queue=queue, consumer_tag=tag), CHANNEL, commands.Basic.ConsumeOk
        )
        self.queue_by_tag[ok.consumer_tag] = queue
        self.consumer_tags.append(ok.consumer_tag)

    async def disconnect(self) -> None:
        """Connection.Close, then waits for the socket to go (the broker requeues unacked ones)."""
        self.alive = False
        transport = self.transport
        if transport is None:
            self.fail(ConnectionError("closed"))
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
        self.fail(ConnectionError("closed"))

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
            self._drop(ConnectionError("missed broker heartbeats"))
            return
        self.transport.write(self._codec.HEARTBEAT)
        self._heartbeat_handle = self._loop.call_later(self._heartbeat / 2, self._heartbeat_tick)
