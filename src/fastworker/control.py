"""Pausing and resuming a queue on every worker at once, through the broker itself.

Commands travel on the fanout exchange `fastworker.control`: each worker binds its own
exclusive, server-named queue to it, so a command reaches every worker connected to the broker
(on every host), and the worker answers on the command's `reply_to` queue with what it did.
The state lives in the broker too: queue `fastworker.paused.<Q>` exists while Q is paused (for
`--all`, `fastworker.paused-all`). A worker reads it at start and whenever its control connection
comes back, so a worker that starts, or reconnects, while Q is paused stays off Q. No extra
service, nothing per host; the broker's user needs configure rights on those names.

Only the AMQP backend listens: a Sidekiq worker has no AMQP connection to take commands on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import aiormq
import orjson
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from pamqp.commands import Basic

from fastworker import broker
from fastworker.amqp_nodes import Nodes

log = logging.getLogger("fastworker.control")

EXCHANGE = "fastworker.control"
STATE_PREFIX = "fastworker.paused."
ALL = "*"  # the queues of `--all`
RECONNECT_FIRST = 1.0
RECONNECT_MAX = 30.0


def state_queue(queue: str) -> str:
    """The queue whose existence says `queue` is paused; AMQP short strings (and pamqp) allow
    queue names of at most 127 characters, so a long name is stood for by its hash."""
    if queue == ALL:
        return "fastworker.paused-all"  # "*" is no character a queue name may hold
    name = STATE_PREFIX + queue
    if len(name) <= 127:
        return name
    return STATE_PREFIX + "sha1." + hashlib.sha1(queue.encode()).hexdigest()


def identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def _exists(connection: AbstractConnection, name: str) -> bool:
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.queue_declare(name, passive=True)
        return True
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()


async def paused_queues(connection: AbstractConnection, queues: Iterable[str]) -> set[str]:
    """Which of `queues` are paused, as the state queues say."""
    if await _exists(connection, state_queue(ALL)):
        return set(queues)
    return {queue for queue in queues if await _exists(connection, state_queue(queue))}


class ControlListener:
    """Takes pause and resume commands for `consumer` (a ConsumerBase) while the worker runs."""

    def __init__(self, nodes: Nodes, consumer: Any) -> None:
        self.nodes = nodes
        self.consumer = consumer
        self.identity = identity()
        self.connected = asyncio.Event()

    async def sync(self, connection: AbstractConnection) -> None:
        """Applies the paused state recorded in the broker."""
        paused = await paused_queues(connection, self.consumer.queues)
        for queue in self.consumer.queues:
            if queue in paused:
                await self.consumer.pause(queue)
            else:
                await self.consumer.resume(queue)

    async def run(self) -> None:
        """Listens until cancelled, reconnecting with capped backoff; starts once the consumer
        has consumed (a broker that refuses the worker is the consumer's to report)."""
        await self.consumer.connected.wait()
        backoff = RECONNECT_FIRST
        while True:
            try:
                _, connection = await broker.connect_any(self.nodes, "control")
                try:
                    await self._listen(connection)
                    backoff = RECONNECT_FIRST
                finally:
                    self.connected.clear()
                    if not connection.is_closed:
                        await connection.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the worker goes on without control
                log.warning("control connection lost (%r); retrying in %.0f s", exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX)

    async def _listen(self, connection: AbstractConnection) -> None:
        channel = await connection.channel()
        await channel.exchange_declare(EXCHANGE, exchange_type="fanout", durable=True)
        ok = await channel.queue_declare("", exclusive=True, auto_delete=True)
        assert ok.queue is not None
        await channel.queue_bind(ok.queue, EXCHANGE)
        await self.sync(connection)
        commands: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        await channel.basic_consume(ok.queue, commands.put, no_ack=True)
        self.connected.set()
        closing = asyncio.ensure_future(connection.closing)
        try:
            while True:
                getting = asyncio.ensure_future(commands.get())
                done, _ = await asyncio.wait(
                    {getting, closing}, return_when=asyncio.FIRST_COMPLETED
                )
                if getting not in done:
                    getting.cancel()
                    raise ConnectionError("control connection closed")
                await self._command(channel, getting.result())
        finally:
            if not closing.done():
                closing.cancel()

    async def _command(self, channel: AbstractChannel, delivered: DeliveredMessage) -> None:
        try:
            command = orjson.loads(delivered.body)
            action, wanted = command["action"], command["queues"]
            if action not in ("pause", "resume") or not isinstance(wanted, list):
                raise ValueError(action)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignored a control message that is no command: %r", delivered.body[:200])
            return
        ours = self.consumer.queues
        queues = list(ours) if ALL in wanted else [q for q in wanted if q in ours]
        changed = []
        for queue in queues:
            if await getattr(self.consumer, action)(queue):
                changed.append(queue)
        sender = command.get("from", "?")
        if queues:
            log.info("%s %s: command from %s", action, ", ".join(queues), sender)
        reply_to = delivered.header.properties.reply_to
        if reply_to:
            answer = {
                "worker": self.identity,
                "id": command.get("id"),
                "queues": queues,
                "changed": changed,
                "paused": sorted(self.consumer.paused),
            }
            await channel.basic_publish(orjson.dumps(answer), routing_key=reply_to)


async def send(
    nodes: Nodes, action: str, queues: Sequence[str], wait: float
) -> tuple[list[dict[str, Any]], str]:
    """Records `action` for `queues` (ALL for every queue) in the broker, tells every worker,
    and collects their answers for `wait` seconds. Returns (answers, the node used)."""
    node, connection = await broker.connect_any(nodes, "control")
    try:
        channel = await connection.channel()
        for queue in queues:
            name = state_queue(queue)
            if action == "pause":
                await channel.queue_declare(name, durable=True)
            else:
                await channel.queue_delete(name)
        await channel.exchange_declare(EXCHANGE, exchange_type="fanout", durable=True)
        reply = await channel.queue_declare("", exclusive=True, auto_delete=True)
        assert reply.queue is not None
        answers: list[dict[str, Any]] = []
        command_id = uuid.uuid4().hex

        async def on_answer(delivered: DeliveredMessage) -> None:
            try:
                answer = orjson.loads(delivered.body)
            except orjson.JSONDecodeError:
                return
            if isinstance(answer, dict) and answer.get("id") == command_id:
                answers.append(answer)

        await channel.basic_consume(reply.queue, on_answer, no_ack=True)
        body = {"action": action, "queues": list(queues), "id": command_id, "from": identity()}
        await channel.basic_publish(
            orjson.dumps(body),
            exchange=EXCHANGE,
            properties=Basic.Properties(reply_to=reply.queue),
        )
        await asyncio.sleep(wait)
        if action == "resume" and ALL in queues:  # every queue the workers named, too
            for queue in {q for answer in answers for q in answer.get("queues", [])}:
                await channel.queue_delete(state_queue(queue))
        return answers, node.masked
    finally:
        if not connection.is_closed:
            await connection.close()
