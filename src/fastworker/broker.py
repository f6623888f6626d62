"""Broker chores on aiormq that are not the per-message hot path: connecting, queues,
confirmed publishing, and what to tell the user when the broker refuses.

Every aiormq connection of the process opens through `connect`: over TLS with the one context
`amqp_tls` built, and named for what it does. RabbitMQ closes a channel on a failed declare, so
each probe gets a channel of its own.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
from typing import Any

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection
from pamqp.commands import Basic

from fastworker import amqp_tls, amqp_url, queue_types
from fastworker.amqp_nodes import Node, Nodes
from fastworker.amqp_url import AmqpUrl, UrlError

log = logging.getLogger("fastworker.broker")


class _NoConnectErrors(logging.Filter):
    """aiormq logs each failed connect at ERROR, then raises it, and a lost connection twice
    (once with a traceback); fastworker says each once (the retry or failover line, or the
    line that ends the process), naming the cause."""

    _SAID_BY_FASTWORKER = (
        "error when creating transport",
        "Unexpected connection close from remote",
    )
    _READER_EXITED = "Cancelling cause reader exited abnormally"  # kept for a malformed frame
    _LOST = (ConnectionError, OSError)  # aiormq's connection errors among them

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if text.startswith(self._READER_EXITED):
            error = record.exc_info[1] if record.exc_info else None
            return not (
                isinstance(error, self._LOST) or isinstance(error and error.__cause__, self._LOST)
            )
        return not text.startswith(self._SAID_BY_FASTWORKER)


logging.getLogger("aiormq.connection").addFilter(_NoConnectErrors())

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
    queue_type: str = queue_types.CLASSIC,
) -> int:
    """Uses `name` as it exists; declares it only when missing, as a `queue_type` queue (a
    quorum queue is always durable). Returns its message count.

    The deferred-event bundle declares its queue `durable=false`; declaring it again with other
    flags (or another type) would fail with PRECONDITION_FAILED, so an existing queue is only
    checked passively.
    """
    durable, arguments = queue_types.declare_as(queue_type, durable, arguments)
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
        log.debug("declared missing %s queue %s (durable=%s)", queue_type, name, durable)
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


async def connect(url: AmqpUrl, context: ssl.SSLContext | None, role: str) -> AbstractConnection:
    """An aiormq connection to `url`, over TLS with `context` for amqps://, named
    `<name> <host>:<pid> <role>` in RabbitMQ. No answer within the URL's connect timeout raises
    ConnectionError; a TLS session the broker ends before AMQP begins raises
    `amqp_tls.TlsRefused` caused by the TLS error behind it, when `amqp_tls.probe` can read it."""
    extra: dict[str, Any] = {}
    if context is not None:
        extra = {"context": context, "server_hostname": url.server_hostname}
    try:
        return await asyncio.wait_for(
            aiormq.connect(url.aiormq_url, client_properties=url.client_properties(role), **extra),
            url.connect_timeout,
        )
    except TimeoutError:
        raise ConnectionError(
            f"no AMQP handshake with {url.where} within {url.connect_timeout:g} s"
        ) from None
    except Exception as exc:
        if context is None or amqp_tls.ssl_error(exc) is not None:
            raise
        if _refusal(url, exc) is not None or unreachable(url.text, exc) is not None:
            raise
        # Lost after the handshake, before AMQP began: a refused client certificate looks like
        # this when the reset overtook the broker's alert. Listen for the alert.
        found = await amqp_tls.probe(url, context)
        if found is None:
            raise
        raise amqp_tls.TlsRefused(f"TLS session ended by the broker: {found}") from found


class NoBrokerAnswered(ConnectionError):
    """`connect_any` tried every node and none took the connection; `errors` says why each
    did not, in the order tried."""

    def __init__(self, errors: list[tuple[Node, BaseException]]) -> None:
        self.errors = errors
        super().__init__(
            "; ".join(f"{node.url.where}: {_reason(exc)}" for node, exc in errors)
        )

    def refusal(self) -> str | None:
        """The first node's refusal (TLS, login, vhost, access) among the errors, if any."""
        for node, exc in self.errors:
            found = refusal(node.url.text, exc)
            if found is not None:
                return found
        return None


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def connect_any(
    nodes: Nodes, role: str, timeout: float | None = None
) -> tuple[Node, AbstractConnection]:
    """A connection to the first of `nodes` (from the current one on) that takes it, for the
    tools (`check`, `dlq`); raises NoBrokerAnswered naming each node's error. `timeout`
    bounds each attempt (else the URL's connect timeout does)."""
    errors: list[tuple[Node, BaseException]] = []
    for node in nodes.in_order():
        try:
            connection = await asyncio.wait_for(connect(node.url, node.tls, role), timeout)
        except TimeoutError:
            errors.append((node, ConnectionError(f"no answer within {timeout:g} s")))
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, ValueError) as exc:
            errors.append((node, exc))
        else:
            return node, connection
    raise NoBrokerAnswered(errors)


def masked(url: str) -> str:
    """`url` with its password (and key path, key password) replaced by ***, for logs."""
    return amqp_url.masked(url)


def refusal(url: str, exc: BaseException) -> str | None:
    """What to check when RabbitMQ refuses this URL's TLS handshake, login, vhost or
    permissions; None for trouble that retrying may cure (the broker down, a lost connection)."""
    try:
        parsed = AmqpUrl.parse(url)
    except UrlError:
        return None
    return amqp_tls.refusal(parsed, exc) or _refusal(parsed, exc)


def _refusal(url: AmqpUrl, exc: BaseException) -> str | None:
    """The AMQP-level refusals: login, vhost, access."""
    where = f"RabbitMQ at {url.where}"
    user, vhost = url.username, url.vhost
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return (
            f"{where} refused the login of user {user!r} ({exc.args[0] if exc.args else exc}): "
            f"check the user name and password in --amqp-url {url.masked}"
        )
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        return (
            f"{where} closed the connection when user {user!r} asked for vhost {vhost!r}: check "
            f"that the vhost exists and that the user may use it (--amqp-url {url.masked})"
        )
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return (
            f"{where} refused user {user!r} access ({exc.args[0] if exc.args else exc}): check "
            f"the user's permissions on vhost {vhost!r} (--amqp-url {url.masked})"
        )
    return None


def unreachable(url: str, exc: BaseException) -> str | None:
    """A hint when nothing answers where the broker should be."""
    if isinstance(exc, ConnectionRefusedError) or (
        isinstance(exc, aiormq.exceptions.AMQPConnectionError)
        and exc.args
        and exc.args[0] == errno.ECONNREFUSED
    ):
        try:
            where = AmqpUrl.parse(url).where
        except UrlError:
            where = "the --amqp-url address"
        return f"is RabbitMQ running at {where}? (--amqp-url {masked(url)})"
    return None
