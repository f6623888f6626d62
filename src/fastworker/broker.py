"""Broker chores on aiormq that are not the per-message hot path: queues, confirmed publishing.

RabbitMQ closes a channel on a failed declare, so each probe gets a channel of its own.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection
from pamqp.commands import Basic

log = logging.getLogger("fastworker.broker")

# Seconds a publish may wait for the broker's confirm. A broker short of memory or disk blocks
# publishers (connection.blocked) indefinitely; the job's slot must not wait with it: the
# message is then not acked, and comes back when the broker delivers it again.
PUBLISH_TIMEOUT = 30.0


class PublishFailed(Exception):
    """The broker did not confirm a publish; the message it stood for must not be acked."""


async def ensure_queue(
    connection: AbstractConnection,
    name: str,
    *,
    durable: bool = False,
    arguments: dict[str, Any] | None = None,
) -> int:
    """Uses `name` as it exists; declares it only when missing. Returns its message count.

    The deferred-event bundle declares its queue `durable=false`; declaring it again with other
    flags would fail with PRECONDITION_FAILED, so an existing queue is only checked passively.
    """
    channel = await connection.channel(publisher_confirms=False)
    try:
        ok = await channel.queue_declare(name, passive=True)
        return int(ok.message_count or 0)
    except aiormq.exceptions.ChannelNotFoundEntity:
        pass
    finally:
        if not channel.is_closed:
            await channel.close()
    channel = await connection.channel(publisher_confirms=False)
    try:
        ok = await channel.queue_declare(name, durable=durable, arguments=arguments)
        log.debug("declared missing queue %s (durable=%s)", name, durable)
        return int(ok.message_count or 0)
    finally:
        if not channel.is_closed:
            await channel.close()


class Publisher:
    """Publishes with publisher confirms and `mandatory`, one confirmed message at a time."""

    def __init__(self, channel: AbstractChannel, timeout: float = PUBLISH_TIMEOUT) -> None:
        self.channel = channel
        self.timeout = timeout

    @classmethod
    async def open(cls, connection: AbstractConnection) -> Publisher:
        return cls(await connection.channel(publisher_confirms=True))

    async def publish(self, queue: str, body: bytes, properties: Basic.Properties) -> None:
        """Returns once the broker has the message in `queue`; raises PublishFailed if not."""
        try:
            async with asyncio.timeout(self.timeout):
                confirm = await self.channel.basic_publish(
                    body, exchange="", routing_key=queue, properties=properties, mandatory=True
                )
        except TimeoutError:
            raise PublishFailed(
                f"queue {queue}: no confirm from the broker within {self.timeout:g} s "
                "(is it blocking publishers for lack of memory or disk?)"
            ) from None
        except aiormq.exceptions.PublishError as exc:
            raise PublishFailed(f"queue {queue}: message returned by the broker ({exc})") from None
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError) as exc:
            raise PublishFailed(f"queue {queue}: {exc!r}") from None
        if not isinstance(confirm, Basic.Ack):
            raise PublishFailed(f"queue {queue}: broker answered {type(confirm).__name__}")

    async def close(self) -> None:
        if not self.channel.is_closed:
            await self.channel.close()


def masked(url: str) -> str:
    """`url` with its password replaced by ***, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


def refusal(url: str, exc: BaseException) -> str | None:
    """What to check when RabbitMQ refuses this URL's login, vhost or permissions; None for
    trouble that retrying may cure (the broker down, a lost connection)."""
    parts = urlsplit(url)
    where = f"RabbitMQ at {parts.hostname or 'localhost'}:{parts.port or 5672}"
    user = unquote(parts.username) if parts.username is not None else "guest"
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    vhost = unquote(path) if path else "/"
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return (
            f"{where} refused the login of user {user!r} ({exc.args[0] if exc.args else exc}): "
            f"check the user name and password in --amqp-url {masked(url)}"
        )
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        return (
            f"{where} closed the connection when user {user!r} asked for vhost {vhost!r}: check "
            f"that the vhost exists and that the user may use it (--amqp-url {masked(url)})"
        )
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return (
            f"{where} refused user {user!r} access ({exc.args[0] if exc.args else exc}): check "
            f"the user's permissions on vhost {vhost!r} (--amqp-url {masked(url)})"
        )
    return None


def unreachable(url: str, exc: BaseException) -> str | None:
    """A hint when nothing answers where the broker should be."""
    if isinstance(exc, ConnectionRefusedError) or (
        isinstance(exc, aiormq.exceptions.AMQPConnectionError)
        and exc.args
        and exc.args[0] == errno.ECONNREFUSED
    ):
        parts = urlsplit(url)
        return (
            f"is RabbitMQ running at {parts.hostname or 'localhost'}:{parts.port or 5672}? "
            f"(--amqp-url {masked(url)})"
        )
    return None
