"""Small synchronous helpers for tests: AMQP publishing and inspection, bundle messages, records.

Everything here is synchronous (``asyncio.run`` around aiormq) so tests can use it without an
event loop of their own and without pytest-asyncio. Each call opens and closes its own connection:
fine for tests, never meant for the hot path.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import aiormq
import aiormq.abc
import aiormq.exceptions

PUBLISH_BATCH = 500


# --------------------------------------------------------------------------- the bundle's format


def bundle_message(
    data: str | bytes,
    dispatch_path: str,
    host: str = "127.0.0.1",
    port: int | str = 9000,
    php_bin: str = "/usr/bin/php",
    console_path: str = "/srv/app/app/console",
) -> bytes:
    """A body exactly as the deferred-event bundle's ``QueueMessage::getFormattedMessage()``.

    Header lines are ``name: value``; headers with empty values are left out, as the bundle does.
    """
    headers = [
        ("php_bin", php_bin),
        ("console_path", console_path),
        ("dispatch_path", dispatch_path),
        ("fastcgi_host", host),
        ("fastcgi_port", str(port)),
    ]
    head = "".join(f"{name}: {value}\n" for name, value in headers if value not in ("", None))
    raw = data.encode() if isinstance(data, str) else data
    return head.encode() + b"\n" + raw


def php_serialize_str(value: str | bytes) -> bytes:
    """PHP ``serialize()`` of a string (length counts bytes, as PHP does)."""
    raw = value.encode() if isinstance(value, str) else value
    return b's:%d:"%s";' % (len(raw), raw)


def order_placed_data(order_id: int, payload: str | bytes) -> str:
    """``base64(serialize(new OrderPlaced(id, payload)))`` as examples/php/publish.php makes it.

    Lets Python tests produce what the example PHP app publishes without running PHP. Only the
    public properties are written; PHP's unserialize() gives the others their defaults.
    """
    name = b"OrderPlaced"
    body = b's:2:"id";i:%d;' % order_id + b's:7:"payload";' + php_serialize_str(payload)
    serialized = b'O:%d:"%s":2:{%s}' % (len(name), name, body)
    return base64.b64encode(serialized).decode()


# --------------------------------------------------------------------------- records of record.php


def read_records(path: str | os.PathLike[str]) -> list[tuple[int, str, int]]:
    """Parse the lines record.php appended: ``(pid, sha1 of data, strlen of data)``.

    A missing file means no job ran, so it reads as no records.
    """
    p = Path(path)
    if not p.exists():
        return []
    out: list[tuple[int, str, int]] = []
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        pid, digest, length = line.split()
        out.append((int(pid), digest, int(length)))
    return out


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll until ``predicate()`` is truthy; return its value or raise with ``what`` in the text."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- TCP


def tcp_port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def amqp_host_port(url: str) -> tuple[str, int]:
    """Host and port of an AMQP URL (5672/5671 by default)."""
    parts = urlsplit(url)
    default = 5671 if parts.scheme == "amqps" else 5672
    return parts.hostname or "localhost", parts.port or default


# --------------------------------------------------------------------------- AMQP


async def _declare_like_bundle(
    conn: aiormq.abc.AbstractConnection, queue: str, durable: bool
) -> aiormq.abc.AbstractChannel:
    """Use the queue as it exists; declare it only when missing (as the worker must, too).

    A passive declare of a missing queue closes the channel (404), so a new one is opened.
    """
    channel = await conn.channel()
    try:
        await channel.queue_declare(queue, passive=True)
        return channel
    except aiormq.exceptions.ChannelNotFoundEntity:
        pass
    channel = await conn.channel()
    # The bundle: queue_declare($queue, false, $durable, false, false).
    await channel.queue_declare(queue, durable=durable, exclusive=False, auto_delete=False)
    return channel


async def _publish(
    url: str,
    queue: str,
    bodies: Sequence[bytes],
    durable: bool,
    declare: bool,
    properties: aiormq.spec.Basic.Properties | None,
) -> None:
    conn = await aiormq.connect(url)
    try:
        if declare:
            channel = await _declare_like_bundle(conn, queue, durable)
        else:
            channel = await conn.channel()
        # Publisher confirms (aiormq's default) so the queue holds every message on return.
        for start in range(0, len(bodies), PUBLISH_BATCH):
            batch = bodies[start : start + PUBLISH_BATCH]
            await asyncio.gather(
                *(
                    channel.basic_publish(
                        body, exchange="", routing_key=queue, properties=properties
                    )
                    for body in batch
                )
            )
    finally:
        await conn.close()


def amqp_publish(
    url: str,
    queue: str,
    bodies: Iterable[bytes],
    durable: bool = False,
    declare: bool = True,
    properties: aiormq.spec.Basic.Properties | None = None,
) -> None:
    """Publish bodies to the default exchange with routing key = queue, like the bundle.

    Messages are not persistent (no delivery_mode), as php-amqplib's AMQPMessage defaults. The
    queue is declared (non-durable by default) only if it does not exist yet.
    """
    asyncio.run(_publish(url, queue, list(bodies), durable, declare, properties))


async def _queue_count(url: str, queue: str) -> int:
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        ok = await channel.queue_declare(queue, passive=True)
        return int(ok.message_count)
    finally:
        await conn.close()


def amqp_queue_count(url: str, queue: str) -> int:
    """Ready messages in the queue (unacked ones are not counted); raises if it does not exist."""
    return asyncio.run(_queue_count(url, queue))


async def _queue_exists(url: str, queue: str) -> bool:
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        try:
            await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True
    finally:
        await conn.close()


def amqp_queue_exists(url: str, queue: str) -> bool:
    """True if the queue exists on the broker."""
    return asyncio.run(_queue_exists(url, queue))


async def _get_all(url: str, queue: str, limit: int) -> list[aiormq.abc.DeliveredMessage]:
    conn = await aiormq.connect(url)
    out: list[aiormq.abc.DeliveredMessage] = []
    try:
        channel = await conn.channel()
        while len(out) < limit:
            message = await channel.basic_get(queue, no_ack=True)
            if isinstance(message.delivery, aiormq.spec.Basic.GetEmpty):
                break
            out.append(message)
        return out
    finally:
        await conn.close()


def amqp_get_all(url: str, queue: str, limit: int = 100_000) -> list[aiormq.abc.DeliveredMessage]:
    """Take (and ack) up to ``limit`` ready messages, e.g. to inspect a dead-letter queue.

    Each item has ``.body`` and ``.header.properties`` (headers, content_type, ...).
    """
    return asyncio.run(_get_all(url, queue, limit))


async def _delete_queues(url: str, queues: Iterable[str]) -> None:
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        for queue in queues:
            try:
                await channel.queue_delete(queue)
            except aiormq.exceptions.AMQPChannelError:
                # A failed delete closes the channel; carry on with a fresh one.
                channel = await conn.channel()
    finally:
        await conn.close()


def amqp_delete_queues(url: str, queues: Iterable[str]) -> None:
    """Delete queues; missing ones are fine (RabbitMQ answers delete-ok for them)."""
    asyncio.run(_delete_queues(url, list(queues)))


def amqp_purge(url: str, queue: str) -> None:
    """Drop all ready messages of a queue."""

    async def run() -> None:
        conn = await aiormq.connect(url)
        try:
            channel = await conn.channel()
            await channel.queue_purge(queue)
        finally:
            await conn.close()

    asyncio.run(run())


__all__ = [
    "amqp_delete_queues",
    "amqp_get_all",
    "amqp_host_port",
    "amqp_publish",
    "amqp_purge",
    "amqp_queue_count",
    "amqp_queue_exists",
    "bundle_message",
    "order_placed_data",
    "php_serialize_str",
    "read_records",
    "tcp_port_open",
    "wait_for",
]


# --------------------------------------------------------------------------- network faults


class TcpProxy:
    """A TCP proxy (e.g. to RabbitMQ) in a thread: a test can cut its connections like a network
    failure, and knows the proxy's own ports towards the target to close them there."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.loop = asyncio.new_event_loop()
        self.writers: list[asyncio.StreamWriter] = []
        self.upstream_ports: set[int] = set()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(5)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            self.upstream_ports.add(up_writer.get_extra_info("sockname")[1])
            self.writers += [writer, up_writer]
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        async def main() -> asyncio.Server:
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            return server

        self.server = self.loop.run_until_complete(main())
        self.loop.run_forever()

    def cut(self) -> None:
        def close_all() -> None:
            for writer in self.writers:
                writer.transport.abort()
            self.writers.clear()

        self.loop.call_soon_threadsafe(close_all)

    def close(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
