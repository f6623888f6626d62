"""RabbitMQ: reaching (or starting) the broker, the session's queue prefix, and synchronous AMQP
helpers for tests.

Every helper is synchronous (``asyncio.run`` around aiormq) so tests can use it without an event
loop of their own and without pytest-asyncio. Each call opens and closes its own connection:
fine for tests, never meant for the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiormq
import aiormq.abc
import aiormq.exceptions
import pytest

from services.process import is_loopback, tcp_port_open, which

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# One token per test session, so a session sweeps only its own leftover queues.
QUEUE_PREFIX = f"fwtest.{secrets.token_hex(3)}."
PUBLISH_BATCH = 500
READY_TIMEOUT = 60.0


# --------------------------------------------------------------------------- the broker


def amqp_url() -> str:
    """FASTWORKER_TEST_AMQP_URL, or the local guest account."""
    return os.environ.get("FASTWORKER_TEST_AMQP_URL", DEFAULT_AMQP_URL)


def amqp_host_port(url: str) -> tuple[str, int]:
    """Host and port of an AMQP URL (5672/5671 by default)."""
    parts = urlsplit(url)
    default = 5671 if parts.scheme == "amqps" else 5672
    return parts.hostname or "localhost", parts.port or default


def rabbitmq_ready(url: str) -> bool:
    """True once an AMQP handshake succeeds (the port opens a little before the broker is up)."""

    async def probe() -> None:
        conn = await asyncio.wait_for(aiormq.connect(url), 5)
        await conn.close()

    try:
        asyncio.run(probe())
        return True
    except Exception:
        return False


def ensure_rabbitmq(url: str) -> str:
    """Waits until the broker at ``url`` answers; starts a local one first if nothing listens.

    Fails the test (``pytest.fail``) when it cannot be reached.
    """
    host, port = amqp_host_port(url)
    if not tcp_port_open(host, port):
        if not is_loopback(host):
            pytest.fail(f"RabbitMQ at {host}:{port} does not answer ({url})")
        rabbitmq_server = which("rabbitmq-server")
        if rabbitmq_server is None:
            pytest.fail(
                f"RabbitMQ at {host}:{port} does not answer and rabbitmq-server is not installed:"
                " run scripts/setup-deps.sh"
            )
        env = dict(os.environ, RABBITMQ_NODE_IP_ADDRESS="127.0.0.1")
        subprocess.run(
            [rabbitmq_server, "-detached"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    deadline = time.monotonic() + READY_TIMEOUT
    while not (tcp_port_open(host, port) and rabbitmq_ready(url)):
        if time.monotonic() >= deadline:
            pytest.fail(
                f"RabbitMQ at {host}:{port} not reachable within {READY_TIMEOUT:.0f} s ({url}); "
                "see /var/log/rabbitmq/ or run scripts/setup-deps.sh"
            )
        time.sleep(0.5)
    return url


def sweep_test_queues(url: str, prefix: str = QUEUE_PREFIX) -> None:
    """Deletes the leftover queues named ``prefix*`` (needs rabbitmqctl)."""
    rabbitmqctl = which("rabbitmqctl")
    if rabbitmqctl is None:
        return
    try:
        listing = subprocess.run(
            [rabbitmqctl, "list_queues", "-q", "--no-table-headers", "name"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return
    names = [n.strip() for n in listing.stdout.splitlines() if n.strip().startswith(prefix)]
    if names:
        with contextlib.suppress(Exception):
            amqp_delete_queues(url, names)


# --------------------------------------------------------------------------- AMQP helpers


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


def amqp_declare(
    url: str, queue: str, durable: bool = False, arguments: dict[str, Any] | None = None
) -> None:
    """Declare a queue (raises the broker's refusal, e.g. ChannelPreconditionFailed when it
    exists with other arguments)."""

    async def run() -> None:
        conn = await aiormq.connect(url)
        try:
            channel = await conn.channel()
            await channel.queue_declare(queue, durable=durable, arguments=arguments)
        finally:
            await conn.close()

    asyncio.run(run())


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
    "DEFAULT_AMQP_URL",
    "QUEUE_PREFIX",
    "amqp_declare",
    "amqp_delete_queues",
    "amqp_get_all",
    "amqp_host_port",
    "amqp_publish",
    "amqp_purge",
    "amqp_queue_count",
    "amqp_queue_exists",
    "amqp_url",
    "ensure_rabbitmq",
    "rabbitmq_ready",
    "sweep_test_queues",
]
