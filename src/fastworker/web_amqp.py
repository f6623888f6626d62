"""The dashboard's RabbitMQ side: queue counts by passive declares, and the dead letters of the
queues it was given, listed without consuming and replayed or deleted one by one.

Listing takes every dead letter with basic.get and no ack, then closes the channel: they go back
to their places, as with `fastworker dlq show`. An action does the same until it meets the
letters it was asked for (by `Letter.id`); only those are acked, after their replay was
confirmed, and the rest go back unacked. A letter another operator replayed or deleted first is
no longer there, so the action reports it gone instead of running the job twice. Within this
process, listing and acting on one dead-letter queue take turns (a lock), so a listing never
hides a letter from an action.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection

from fastworker import broker
from fastworker.amqp_nodes import Nodes
from fastworker.broker import Publisher, PublishFailed
from fastworker.dlq import DeadLetter
from fastworker.failures import RetryPolicy, delay_queue
from fastworker.web_letters import Letter, from_amqp

log = logging.getLogger("fastworker.web")

CONNECT_TIMEOUT = 10.0


@dataclass(slots=True)
class QueueCounts:
    """Ready messages of a queue, its delay queues and its dead-letter queue; None: missing."""

    queue: str
    ready: int | None
    retry: dict[str, int | None] = field(default_factory=dict)  # delay queue -> ready
    dead_letter_queue: str = ""
    dead: int | None = None

    @property
    def retrying(self) -> int:
        return sum(n for n in self.retry.values() if n)


@dataclass(slots=True)
class Outcome:
    """What an action did: letters acted on, letters no longer there, and why any failed."""

    done: list[Letter] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class AmqpStore:
    """One broker connection (to the first of a cluster's nodes that answers), opened when
    first needed and again after it is lost."""

    def __init__(
        self,
        urls: Sequence[str],
        queues: Sequence[str],
        policy: RetryPolicy,
        scan_limit: int = 10_000,
    ) -> None:
        self.nodes = Nodes.parse(urls)  # UrlError: a configuration error, said at start
        self.queues = list(queues)
        self.policy = policy
        self.scan_limit = scan_limit
        self._connection: AbstractConnection | None = None
        self._connecting = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}

    def dead_letter_queue(self, queue: str) -> str:
        return self.policy.dead_letter_queue_for(queue)

    async def connection(self) -> AbstractConnection:
        async with self._connecting:
            if self._connection is None or self._connection.is_closed:
                # The first node that answers (a cluster's); NoBrokerAnswered says why none did.
                _, self._connection = await broker.connect_any(self.nodes, "web", CONNECT_TIMEOUT)
            return self._connection

    async def close(self) -> None:
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # ---------------------------------------------------------------- counts

    async def counts(self) -> list[QueueCounts]:
        """Every given queue's counts; raises on a broker that cannot be reached."""
        connection = await self.connection()
        out = []
        channel: AbstractChannel | None = None
        try:
            for queue in self.queues:
                names = [delay_queue(queue, ms) for ms in self.policy.levels()]
                dead_name = self.dead_letter_queue(queue)
                found: dict[str, int | None] = {}
                for name in (queue, *names, dead_name):
                    if channel is None or channel.is_closed:
                        channel = await connection.channel(publisher_confirms=False)
                    found[name] = await _passive_count(channel, name)
                out.append(
                    QueueCounts(
                        queue,
                        found[queue],
                        {name: found[name] for name in names},
                        dead_name,
                        found[dead_name],
                    )
                )
        finally:
            if channel is not None and not channel.is_closed:
                await channel.close()
        return out

    # ---------------------------------------------------------------- dead letters

    async def letters(self, queue: str) -> tuple[list[Letter], int]:
        """The queue's dead letters, newest first, and how many the queue holds (more than
        listed when over the scan limit: the oldest are listed)."""
        name = self.dead_letter_queue(queue)
        connection = await self.connection()
        async with self._lock(name):
            channel = await connection.channel(publisher_confirms=False)
            try:
                total = await _passive_count(channel, name)
                if total is None:
                    return [], 0
                found = []
                for _ in range(min(total, self.scan_limit)):
                    delivered = await channel.basic_get(name, no_ack=False)
                    if delivered.delivery_tag is None:  # empty: someone else took the rest
                        break
                    found.append(from_amqp(delivered, queue))
            finally:
                if not channel.is_closed:
                    await channel.close()  # every letter back in its place
        found.reverse()
        return found, total

    async def act(self, queue: str, ids: Collection[str], action: str) -> Outcome:
        """Replays (to the queue each letter came from) or deletes the letters `ids` of
        `queue`'s dead-letter queue; the others stay, in their order."""
        name = self.dead_letter_queue(queue)
        wanted = set(ids)
        outcome = Outcome()
        connection = await self.connection()
        async with self._lock(name):
            channel = await connection.channel(publisher_confirms=False)
            publisher = await Publisher.open(connection) if action == "replay" else None
            try:
                total = await _passive_count(channel, name) or 0
                for _ in range(total):
                    if not wanted:
                        break
                    delivered = await channel.basic_get(name, no_ack=False)
                    tag = delivered.delivery_tag
                    if tag is None:
                        break
                    letter = from_amqp(delivered, queue)
                    if letter.id not in wanted:
                        continue  # held unacked: back in its place when the channel closes
                    wanted.discard(letter.id)
                    if publisher is not None:
                        dead = DeadLetter.parse(0, delivered, queue)
                        problem = await self._replay(publisher, letter, dead)
                        if problem:
                            outcome.failed.append(problem)
                            continue
                    await channel.basic_ack(tag)
                    outcome.done.append(letter)
            finally:
                if not channel.is_closed:
                    await channel.close()
                if publisher is not None:
                    await publisher.close()
        outcome.gone = sorted(wanted)
        for letter in outcome.done:
            log.info(
                "%s dead letter %s of %s (%s: %s)",
                "replayed" if action == "replay" else "deleted",
                letter.id,
                name,
                letter.kind,
                letter.first_line[:200],
            )
        return outcome

    async def _replay(self, publisher: Publisher, letter: Letter, dead: DeadLetter) -> str:
        """Publishes the letter back to its queue, confirmed; "" or why not."""
        if letter.queue not in self.queues:
            # The x-fastworker-queue header names the target; a letter that names a queue
            # this dashboard was not given is not sent there.
            return (
                f"dead letter {letter.id} names queue {letter.queue!r}, which this dashboard "
                "was not given (--queue): not replayed"
            )
        try:
            await publisher.publish(letter.queue, dead.body, dead.replay_properties())
        except (PublishFailed, aiormq.exceptions.ChannelInvalidStateError) as exc:
            return f"dead letter {letter.id} not replayed: {exc}"
        return ""


async def _passive_count(channel: AbstractChannel, name: str) -> int | None:
    """Ready messages of `name`, None if it does not exist (which closes the channel)."""
    try:
        ok = await channel.queue_declare(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    return int(ok.message_count or 0)
