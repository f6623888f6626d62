"""Blocking AMQP for latency runs: a publisher whose messages go to the socket the moment they
are stamped, as a PHP app's php-amqplib `basic_publish` writes them, and a consumer that reads
with plain blocking `recv` (the broker's own latency floor: `broker_floor`, which
bench/broker_latency.py prints and bench/e2e.py's --rate run measures beside the worker's).

The asyncio publisher (aiormq) hands a message to a writer task, which writes it a loop turn
later, and asyncio's sleeps wake in whole milliseconds, so paced messages leave in small bursts:
between the time stamped in a message and its write lay 0.3-0.5 ms at the median, which
`bench/e2e.py` counted as the worker's latency. Here the frames are marshalled by pamqp (aiormq's
own frame codec) and written with one `sendall`; pacing sleeps with `time.sleep`.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

from pamqp import body as amqp_body
from pamqp import commands, frame, header
from pamqp.exceptions import UnmarshalingException

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


class BlockingConnection:
    """One connection and one channel; publishes without confirms (a paced run must not wait
    for them)."""

    def __init__(self, url: str, name: str = "fastworker bench") -> None:
        parts = urlsplit(url)
        if parts.scheme != "amqp":
            raise ValueError(f"the blocking publisher speaks plain amqp://, not {parts.scheme}")
        self._sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""
        self._sock.sendall(PROTOCOL_HEADER)
        self._expect(commands.Connection.Start)
        user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
        self._send(
            commands.Connection.StartOk(
                client_properties={"connection_name": name},
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
                locale="en_US",
            )
        )
        tune = self._expect(commands.Connection.Tune)
        self._send(
            commands.Connection.TuneOk(channel_max=1, frame_max=tune.frame_max, heartbeat=0)
        )
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self._send(commands.Connection.Open(virtual_host=vhost))
        self._expect(commands.Connection.OpenOk)
        self._send(commands.Channel.Open(), 1)
        self._expect(commands.Channel.OpenOk)

    def publish(self, queue: str, data: bytes) -> None:
        """basic.publish to the default exchange: method, header and body in one write."""
        properties = commands.Basic.Properties()
        self._sock.sendall(
            frame.marshal(commands.Basic.Publish(exchange="", routing_key=queue), 1)
            + frame.marshal(header.ContentHeader(0, len(data), properties), 1)
            + frame.marshal(amqp_body.ContentBody(data), 1)
        )

    def call(self, method: Any, reply: type) -> Any:
        """A synchronous method on the channel (declare, purge, qos, consume) and its reply."""
        self._send(method, 1)
        return self._expect(reply)

    def deliveries(self) -> Iterator[tuple[float, int, bytes]]:
        """(time read, delivery tag, body) of each message, as the reads bring them in; the
        time is taken once per read, right after it returned."""
        tag, parts, size = 0, [], 0
        while True:
            data = self._sock.recv(1 << 16)
            now = time.time()
            if not data:
                raise ConnectionError("the broker closed the connection")
            self._buffer += data
            while True:
                try:
                    used, _, value = frame.unmarshal(self._buffer)
                except UnmarshalingException:
                    break
                self._buffer = self._buffer[used:]
                if isinstance(value, commands.Basic.Deliver):
                    tag, parts = value.delivery_tag, []
                elif isinstance(value, header.ContentHeader):
                    size = value.body_size
                    if size == 0:
                        yield now, tag, b""
                elif isinstance(value, amqp_body.ContentBody):
                    parts.append(value.value)
                    if sum(map(len, parts)) >= size:
                        yield now, tag, b"".join(parts)

    def ack(self, tag: int) -> None:
        """Acks every delivery up to `tag` (multiple), as the worker acks in batches."""
        self._sock.sendall(frame.marshal(commands.Basic.Ack(delivery_tag=tag, multiple=True), 1))

    def close(self) -> None:
        try:
            self._send(commands.Connection.Close(reply_code=200, class_id=0, method_id=0))
            self._expect(commands.Connection.CloseOk)
        finally:
            self._sock.close()

    def _send(self, value: Any, channel: int = 0) -> None:
        self._sock.sendall(frame.marshal(value, channel))

    def _expect(self, kind: type) -> Any:
        """The next frame, which must be a `kind` (the broker's answer to the handshake)."""
        while True:
            try:
                used, _, value = frame.unmarshal(self._buffer)
            except UnmarshalingException:  # a partial frame: read on
                data = self._sock.recv(65536)
                if not data:
                    raise ConnectionError("the broker closed the connection") from None
                self._buffer += data
                continue
            self._buffer = self._buffer[used:]
            if not isinstance(value, kind):
                raise ConnectionError(f"expected {kind.__name__} from the broker, got {value!r}")
            return value


def publish_paced(
    url: str, queue: str, make_body: Callable[[int, float], bytes], count: int, rate: float
) -> float:
    """Publish ``count`` messages evenly at ``rate``/s; each body is made with the time just
    before it is written. Returns the seconds the publishing took (count/rate on pace)."""
    publisher = BlockingConnection(url, "fastworker bench publisher")
    try:
        start, sent = time.monotonic(), 0
        while sent < count:
            due = min(count, int((time.monotonic() - start) * rate) + 1)
            while sent < due:
                publisher.publish(queue, make_body(sent, time.time()))
                sent += 1
            time.sleep(max(0.0, start + sent / rate - time.monotonic()))
        return time.monotonic() - start
    finally:
        publisher.close()


ACK_EVERY = 32  # the floor's consumer acks in batches, as the worker does


def _consume_delays(url: str, queue: str, count: int, prefetch: int, ready: Any, out: Any) -> None:
    """Consumes `count` messages whose bodies are their publish times; puts the sorted
    publish -> read times (ms) on `out`."""
    conn = BlockingConnection(url, "fastworker bench consumer")
    try:
        conn.call(commands.Queue.Declare(queue=queue, auto_delete=True), commands.Queue.DeclareOk)
        conn.call(commands.Basic.Qos(prefetch_count=prefetch), commands.Basic.QosOk)
        conn.call(commands.Basic.Consume(queue=queue), commands.Basic.ConsumeOk)
        ready.set()
        delays: list[float] = []
        for read_at, tag, body in conn.deliveries():
            delays.append((read_at - float(body)) * 1e3)
            if tag % ACK_EVERY == 0 or len(delays) == count:
                conn.ack(tag)
            if len(delays) == count:
                break
        out.put(sorted(delays))
    finally:
        conn.close()


def broker_floor(url: str, rate: float, seconds: float, prefetch: int) -> tuple[list[float], float]:
    """RabbitMQ's own latency floor: `rate` messages/s for `seconds` through a fresh queue to a
    blocking consumer in a process of its own (so no worker, no PHP, no event loop). Returns the
    sorted publish -> read times in ms and the seconds the publishing took."""
    count = max(1, round(rate * seconds))
    queue = f"fwbench.floor.{secrets.token_hex(4)}"
    # spawn, not fork: the caller may have threads (e2e.py's /metrics scraper)
    context = multiprocessing.get_context("spawn")
    ready, out = context.Event(), context.Queue()
    consumer = context.Process(
        target=_consume_delays, args=(url, queue, count, prefetch, ready, out), daemon=True
    )
    consumer.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the broker-floor consumer did not start consuming within 30 s")
        time.sleep(0.2)
        took = publish_paced(url, queue, lambda _i, now: repr(now).encode(), count, rate)
        try:
            return out.get(timeout=60), took
        except queue_module.Empty:
            raise RuntimeError(
                f"the broker-floor consumer gave no figures within 60 s of the last publish "
                f"(exit code {consumer.exitcode}; it needs all {count} messages)"
            ) from None
    finally:
        consumer.join(10)
        if consumer.is_alive():
            consumer.kill()
