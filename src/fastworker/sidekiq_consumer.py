"""The Sidekiq transport: jobs the Sidekiq client pushed onto Redis lists, with reliable fetch.

Each job taken from `queue:<name>` moves, in the same step, to this process's in-progress list
(`sidekiq_store`), and leaves it only once settled: succeeded, or written to Sidekiq's `retry`,
`schedule` or `dead` set. A process that dies (SIGKILL, OOM, power) leaves its list behind with
its heartbeat key expiring after HEARTBEAT_TTL seconds; every worker looks for such lists at
start and every RECOVER_INTERVAL, and pushes them back to their queues. So a job is never lost;
one that was running when its process died runs again.

Jobs are taken in batches (a Lua script moves up to FETCH_BATCH at once) while fewer than
`prefetch` are unsettled, and with one blocking BLMOVE per queue when the queue is empty.
Settled jobs leave the in-progress list in batches too, one removal in flight at a time. A
poller moves due jobs of `retry` and `schedule` back to their queues, as Sidekiq's own
scheduler does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar

import redis.exceptions

from fastworker import sidekiq_jobs
from fastworker.broker import masked
from fastworker.consuming import ConsumerBase, Delivery, Transport
from fastworker.sidekiq_store import (
    CONNECTION_ERRORS,
    HEARTBEAT_TTL,
    SidekiqStore,
    connect,
    inprogress_key,
    process_id,
)

log = logging.getLogger("fastworker.consumer")

FETCH_BATCH = 64  # most jobs one fetch moves
BLOCK_TIMEOUT = 1.0  # seconds a BLMOVE waits on an empty queue before it looks again
BEAT_INTERVAL = 5.0  # seconds between heartbeats (HEARTBEAT_TTL is several of them)
RECOVER_INTERVAL = 15.0  # seconds between looks for gone processes' jobs
SETTLE_BATCH = 512  # most settled jobs removed from the in-progress list in one step


class SidekiqTransport(Transport):
    """One session on Redis; its `publisher` is the store the failure handler writes with."""

    errors: ClassVar[tuple[type[BaseException], ...]] = CONNECTION_ERRORS
    holds_slot: ClassVar[bool] = True

    def __init__(self, consumer: SidekiqConsumer) -> None:
        self._consumer = consumer
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()
        self.publisher: SidekiqStore = SidekiqStore(connect(consumer.url))
        self._alive = False
        self._fetching = False
        self._lists = {queue: inprogress_key(consumer.process, queue) for queue in consumer.queues}
        self._jobs: dict[int, tuple[str, bytes]] = {}  # unsettled: tag -> (queue, raw job)
        self._next_tag = 0
        self._settled: dict[str, list[bytes]] = {}  # in-progress list -> jobs to remove
        self._settling = False  # a removal of settled jobs is scheduled
        self._releases: list[Callable[[], None]] = []  # their slots, freed once removed
        self._room = asyncio.Event()  # set when a job settles: the fetchers may take more
        self._tasks: list[asyncio.Task[None]] = []
        self._writes: set[asyncio.Task[Any]] = set()

    @property
    def alive(self) -> bool:
        return self._alive

    def refusal(self, exc: BaseException) -> str | None:
        if isinstance(exc, redis.exceptions.AuthenticationError):
            return f"Redis at {_where(self._consumer.url)} refused the worker: {exc}"
        return None

    def unreachable(self, exc: BaseException) -> str | None:
        if isinstance(exc, redis.exceptions.ConnectionError):
            return f"is Redis running at {_where(self._consumer.url)}? (--redis-url)"
        return None

    def describe(self) -> tuple[str, str]:
        consumer = self._consumer
        queues = ", ".join(f"queue:{q}" for q in consumer.queues)
        return queues, f"Redis, prefetch {consumer.prefetch}, process {consumer.process}"

    # ---------------------------------------------------------------- session

    async def open(self) -> None:
        store, consumer = self.publisher, self._consumer
        await store.client.ping()
        lists = list(self._lists.values())
        await store.beat(consumer.process, lists)
        # This process's lists from a session that was lost: like a broker's unacked
        # deliveries, they go back to the queue.
        for key in lists:
            moved = await store.recover(key, own=True)
            if moved > 0:
                log.warning("%d unsettled jobs of a lost session back to their queue", moved)
        await self._recover_gone()
        self._alive = self._fetching = True
        self._tasks = [
            self._task(self._keep_beating()),
            self._task(self._poll_due()),
            *(self._task(self._fetch(queue)) for queue in consumer.queues),
        ]

    def _task(self, work: Any) -> asyncio.Task[None]:
        task = self._loop.create_task(work)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.closed.done():
            return
        exc = task.exception()
        if exc is not None:
            self._failed(exc, "Sidekiq transport task failed")

    def _failed(self, exc: BaseException, what: str) -> None:
        """A task or write failed: the session ends (a lost connection quietly, anything
        else logged with its traceback)."""
        if not isinstance(exc, CONNECTION_ERRORS):
            log.error(what, exc_info=exc)
        self._lose(f"{what}: {exc!r}")

    def _lose(self, reason: str) -> None:
        self._alive = False
        if not self.closed.done():
            self.closed.set_result(reason)

    async def _recover_gone(self) -> None:
        moved = await self.publisher.recover_gone(self._consumer.process)
        for key, n in moved.items():
            log.warning("%d jobs of a gone worker back to their queue (%s)", n, key)

    async def _keep_beating(self) -> None:
        store, process = self.publisher, self._consumer.process
        lists = list(self._lists.values())
        since_recover = 0.0
        while self._alive:
            await asyncio.sleep(BEAT_INTERVAL)
            await store.beat(process, lists)
            since_recover += BEAT_INTERVAL
            if since_recover >= RECOVER_INTERVAL:
                since_recover = 0.0
                await self._recover_gone()

    async def _poll_due(self) -> None:
        """Moves due retries and scheduled jobs to their queues, as Sidekiq's poller does."""
        interval = self._consumer.poll_interval
        store = self.publisher
        while self._alive:
            for sorted_set in ("retry", "schedule"):
                while await store.enqueue_due(sorted_set) > 0:
                    pass
            await asyncio.sleep(interval)

    async def _fetch(self, queue: str) -> None:
        consumer, store = self._consumer, self.publisher
        inprogress = self._lists[queue]
        classes = consumer.classes
        waiting = consumer.waiting
        while self._fetching:
            room = consumer.prefetch - len(self._jobs)
            # Refill when the jobs waiting to start run low or half the window is free: one
            # script call then moves many jobs, instead of one call per job that settled.
            if room <= 0 or (len(waiting) >= consumer.concurrency and 2 * room < consumer.prefetch):
                self._room.clear()
                await self._room.wait()
                continue
            raws = await store.fetch(queue, inprogress, min(room, FETCH_BATCH))
            if not raws:
                raw = await store.wait_fetch(queue, inprogress, BLOCK_TIMEOUT)
                if raw is None:
                    continue
                raws = [raw]
            if not self._fetching:
                return  # taken after cancel(): close() pushes it back with the rest
            batch: list[Delivery] = []
            jobs = self._jobs
            for raw in raws:
                self._next_tag += 1
                jobs[self._next_tag] = (queue, raw)
                message = sidekiq_jobs.message_of(raw, queue, classes)
                message.receipt = (inprogress, raw)
                batch.append((self, self._next_tag, message))
            consumer.deliver(batch)

    async def cancel(self) -> None:
        self._fetching = False
        self._room.set()
        fetchers = self._tasks[2:]
        if fetchers:
            # A fetcher ends within BLOCK_TIMEOUT; cancelling it mid-command could lose the
            # reply of a move Redis made (the job would wait for close() in the list).
            await asyncio.wait(fetchers, timeout=BLOCK_TIMEOUT + 5.0)

    # ---------------------------------------------------------------- settling

    def finished(self, tag: int) -> None:
        self.finished_then(tag, _nothing)

    def finished_then(self, tag: int, release: Callable[[], None]) -> None:
        """Removes the job from the in-progress list, and frees its slot once Redis has done it
        (`holds_slot`): so a worker killed at any moment leaves at most `concurrency` jobs that
        ran but were not removed, which run again."""
        if not self._alive:
            release()
            return
        queue, raw = self._jobs.pop(tag)
        self._settled.setdefault(self._lists[queue], []).append(raw)
        self._releases.append(release)
        self._room.set()
        if not self._settling:
            self._settling = True
            self._loop.call_soon(self._settle_next)

    def _settle_next(self) -> None:
        """Removes what settled in this loop iteration, in one step, without waiting for the
        removals still in flight (they run on other pooled connections)."""
        self._settling = False
        if self._settled:
            settled, self._settled = self._settled, {}
            releases, self._releases = self._releases, []
            if self._alive:
                self._write(self._remove(settled), releases)
            else:
                _release(releases)

    async def _remove(self, settled: dict[str, list[bytes]]) -> None:
        for key, raws in settled.items():
            for start in range(0, len(raws), SETTLE_BATCH):
                await self.publisher.settled(key, raws[start : start + SETTLE_BATCH])

    def requeue(self, tag: int) -> None:
        if not self._alive:
            return
        queue, raw = self._jobs.pop(tag)
        self._room.set()
        self._write(self.publisher.requeue(self._lists[queue], queue, raw))

    def _write(self, work: Any, releases: Sequence[Callable[[], None]] = ()) -> None:
        """Runs a Redis write as a task, and `releases` when it is over, whatever the outcome;
        a failed write ends the session (what it did not remove stays in progress and comes
        back)."""
        task = self._loop.create_task(work)
        self._writes.add(task)
        task.add_done_callback(partial(self._write_done, releases))

    def _write_done(self, releases: Sequence[Callable[[], None]], task: asyncio.Task[Any]) -> None:
        self._writes.discard(task)
        _release(releases)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._failed(exc, "Redis write failed")

    async def flush(self) -> None:
        if self._settled and not self._settling:
            self._settle_next()
        # Each removal starts the next when more settled meanwhile: wait for the chain.
        deadline = self._loop.time() + 10.0
        while self._writes and self._loop.time() < deadline:
            await asyncio.wait(list(self._writes), timeout=deadline - self._loop.time())

    async def close(self) -> None:
        self._alive = self._fetching = False
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Not gather(): redis-py may swallow a cancellation that lands mid-command; the
            # loops then end at their next turn, as they see the transport is not alive.
            await asyncio.wait(self._tasks, timeout=BLOCK_TIMEOUT + 5.0)
        if not self.closed.done():
            self.closed.set_result("closed")
        try:
            if self._writes:
                await asyncio.wait(list(self._writes), timeout=10.0)
            # What is still in this process's lists was not settled: back to the queues.
            await self.publisher.leave(self._consumer.process, list(self._lists.values()))
        except CONNECTION_ERRORS as exc:
            log.warning(
                "could not return unsettled jobs to their queues (%r); a worker will when "
                "this process's heartbeat expires (%d s)",
                exc,
                HEARTBEAT_TTL,
            )
        finally:
            await self.publisher.close()


class SidekiqConsumer(ConsumerBase[Any]):
    """Consumes Sidekiq queues from Redis (`url` is a redis:// URL, `queues` Sidekiq queue
    names); the same skeleton, handler and settings as the AMQP consumers."""

    classes: Sequence[str] = sidekiq_jobs.DEFAULT_CLASSES  # job classes this worker runs
    poll_interval = 1.0  # seconds between looks for due retries

    def configure(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--redis-url must be a redis:// URL, got {_where(self.url)!r}")
        self.process = process_id()

    def new_transport(self) -> SidekiqTransport:
        return SidekiqTransport(self)


def _nothing() -> None:
    pass


def _release(releases: Sequence[Callable[[], None]]) -> None:
    for release in releases:
        release()


def _where(url: str) -> str:
    return masked(url)
