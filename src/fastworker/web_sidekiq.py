"""The dashboard's Sidekiq side: queue lengths, and the jobs of the given queues in Sidekiq's
`retry` and `dead` sorted sets, replayed or deleted one by one.

Every action is one atomic step in Redis that first removes the member from its set: replaying a
dead job is `SidekiqStore.replay` (ZREM, then LPUSH only if the ZREM removed it, with the
failure fields dropped so it gets its runs anew); replaying a retrying job moves it to its queue
now, as it is (Sidekiq's "Retry Now"); deleting is a ZREM. Two operators acting on one job act
once: the second finds it gone.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import orjson

from fastworker import sidekiq_jobs
from fastworker.sidekiq_store import SidekiqStore, connect
from fastworker.web_amqp import Outcome
from fastworker.web_letters import Letter, from_sidekiq

SETS = ("dead", "retry")


@dataclass(slots=True)
class SidekiqCounts:
    queue: str
    ready: int
    retry: int
    dead: int


class SidekiqSets:
    """One Redis client for the given queues' lists and the two sets."""

    def __init__(self, url: str, queues: Sequence[str], scan_limit: int = 10_000) -> None:
        self.store = SidekiqStore(connect(url))
        self.queues = list(queues)
        self.scan_limit = scan_limit

    async def close(self) -> None:
        await self.store.close()

    async def _members(self, name: str) -> list[tuple[bytes, dict, float]]:
        """The set's newest `scan_limit` members that parse as job objects, newest first."""
        entries = await self.store.client.zrevrange(name, 0, self.scan_limit - 1, withscores=True)
        out = []
        for entry, score in entries:
            try:
                job = orjson.loads(entry)
            except orjson.JSONDecodeError:
                continue  # Sidekiq's API skips such members too
            if isinstance(job, dict):
                out.append((bytes(entry), job, float(score)))
        return out

    async def counts(self) -> list[SidekiqCounts]:
        by_set = {name: await self._members(name) for name in SETS}
        out = []
        for queue in self.queues:
            ready = int(await self.store.client.llen(sidekiq_jobs.queue_key(queue)))
            per = {
                name: sum(1 for _, job, _ in members if job.get("queue") == queue)
                for name, members in by_set.items()
            }
            out.append(SidekiqCounts(queue, ready, per["retry"], per["dead"]))
        return out

    async def letters(self, queue: str, store: str) -> tuple[list[Letter], int]:
        """The queue's jobs in `store` ("dead" or "retry"), the latest failure first."""
        members = await self._members(store)
        letters = [
            from_sidekiq(entry, job, score, store)
            for entry, job, score in members
            if job.get("queue") == queue
        ]
        letters.sort(key=lambda letter: letter.last_failure or 0.0, reverse=True)
        return letters, len(letters)

    async def act(self, queue: str, store: str, ids: Collection[str], action: str) -> Outcome:
        wanted = set(ids)
        outcome = Outcome()
        letters, _ = await self.letters(queue, store)
        for letter in letters:
            if letter.id not in wanted:
                continue
            wanted.discard(letter.id)
            if action == "delete":
                done = bool(await self.store.client.zrem(store, letter.entry))
            elif store == "dead":
                assert letter.job is not None
                fresh = sidekiq_jobs.encode(sidekiq_jobs.replayable(letter.job))
                done = await self.store.replay(letter.entry, queue, fresh)
            else:  # a retrying job runs now, as it is
                done = await self.store.replay(letter.entry, queue, letter.entry, store)
            if done:
                outcome.done.append(letter)
            else:
                outcome.gone.append(letter.id)  # removed by someone else since it was read
        outcome.gone += sorted(wanted)
        return outcome
