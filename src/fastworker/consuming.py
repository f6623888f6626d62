"""The consumer skeleton: what every broker's consumer does the same way, written once.

A consumer is this skeleton plus a transport. The skeleton owns the session loop (reconnects with
capped, jittered backoff), the dispatch of deliveries to the job handler with at most
`concurrency` jobs in flight, the drain on `stop()`, and the error policy. A transport
(`Transport`, below, where its contract is written down) owns one broker connection: it
connects, hands deliveries in through `ConsumerBase.deliver`, and acks or requeues what the
skeleton tells it to. AMQP has two
(`fast_consumer`, `consumer`); a new broker is a new transport and a `ConsumerBase` subclass that
creates it, nothing here changes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence, Sized
from functools import partial
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from fastworker.message import Message, NotStarted
from fastworker.priorities import Prioritized
from fastworker.stats import Durations

log = logging.getLogger("fastworker.consumer")

ACK_INTERVAL = 0.002  # seconds finished deliveries may wait to share one ack
# Seconds a delivery that finished behind an unfinished one waits before it is acked alone: on a
# busy machine a PHP child may not run for a few ms, and once its job is done the whole run is
# acked with one multiple ack (see acks.AckTracker.take).
ACK_HOLD = 0.02
REQUEUE_DELAY = 1.0  # seconds before a delivery whose handler failed goes back to the queue
MAX_MESSAGE_SIZE = 8 * 1024 * 1024  # default --max-message-size
FIRST_BACKOFF = 0.5  # seconds before the first reconnect; doubled per failure up to max_backoff

# A handler, awaitable form: returns when the message may be acked, raises when it may not.
Handler = Callable[[Message, Any], Awaitable[None]]
# A handler's callback form, `start(message, publisher, on_done)`: it calls `on_done(None)` when
# the message may be acked, or `on_done(awaitable)` with what is left to await (returns: ack;
# raises: requeue), as `JobHandler.start` does. The skeleton only ever calls this form.
OnDone = Callable[[Awaitable[None] | None], None]
Start = Callable[[Message, Any, OnDone], None]

C = TypeVar("C")
# Called once per connection and queue before consuming starts, e.g. to declare retry queues;
# C is the transport's control connection (aiormq's for AMQP).
Prepare = Callable[[C, str], Awaitable[None]]


class BrokerRefused(Exception):
    """The broker refused the worker at start (login, vhost, access, TLS certificates): a
    configuration error, which retrying cannot fix. The message says what to check."""


class Consumer(Protocol):
    """What the worker sees of any consumer."""

    processed: int  # deliveries acked after their handler succeeded
    connected: asyncio.Event  # set while consuming; tests and the CLI wait on it

    async def run(self) -> None:
        """Consumes until `stop()`, reconnecting as needed; returns after the drain."""

    def stop(self) -> None:
        """Stops consuming; `run()` returns once in-flight jobs finish or the timeout passes."""


class Transport(ABC):
    """One broker connection, from connect to close: all a consumer needs from a broker.

    The skeleton creates one per session (`ConsumerBase.new_transport`), calls `open()`, then
    waits for `stop()` or `closed`. The transport hands deliveries to the skeleton with
    `consumer.deliver([(transport, tag, message), ...])`, and may read `len(consumer.waiting)`
    for its ack policy; nothing else of the skeleton is its business. The skeleton calls
    `finished(tag)` or `requeue(tag)` once per delivery, on the transport it came from, and only
    while that transport is alive. On `stop()`: `cancel()`, then (in-flight jobs done) `flush()`,
    then `close()`; `close()` also ends every other session, whatever happened.

    What a transport must guarantee:
    - `alive` is True from when deliveries may arrive until the connection is lost or `close()`
      is called, and turns False at once (never a loop iteration later): the skeleton starts no
      delivery and sends no ack or requeue through a transport that is not alive, so a delivery
      is never acked on a connection other than the one it came on (the broker requeues the
      old connection's unacked deliveries itself). `finished` and `requeue` must be no-ops
      then anyway.
    - A tag is acked once at most, and a requeue is never overtaken by a later multiple ack
      that covers it: acks and requeues reach the broker in the order they were asked for.
    - `closed` resolves, with the reason as its result (never as an exception), once the
      transport can no longer deliver or ack, or anything it needs for settling (its
      publisher) is gone; `close()` resolves it too.
    - `cancel()` and `flush()` do not raise: they log what failed. `close()` is safe after an
      `open()` that failed halfway.
    """

    __slots__ = ()

    # What `open()` and a lost session raise that is worth a reconnect with backoff.
    errors: ClassVar[tuple[type[BaseException], ...]] = (ConnectionError, OSError)

    def refusal(self, exc: BaseException) -> str | None:
        """If `exc` says the broker refuses this configuration (a wrong password, a missing
        vhost, no permission, a certificate that does not verify or is refused), what to
        check; None for trouble that retrying may cure."""
        return None

    def unreachable(self, exc: BaseException) -> str | None:
        """If `exc` says nothing listens where the broker should be, a hint for the log."""
        return None
    # Handed to the handler with each delivery, for writing retries and dead letters: the
    # backend's own (broker.Publisher for AMQP, sidekiq_store.SidekiqStore for Sidekiq).
    publisher: Any
    closed: asyncio.Future[object]

    @property
    @abstractmethod
    def alive(self) -> bool:
        """True while its deliveries may be started, acked and requeued."""

    @abstractmethod
    def describe(self) -> tuple[str, str]:
        """What it consumes and how, for the log: ("q1, q2", "prefetch 64, ...")."""

    @abstractmethod
    async def open(self) -> None:
        """Connects and starts consuming; returns when deliveries may arrive."""

    @abstractmethod
    async def cancel(self) -> None:
        """Asks the broker for no new deliveries (those already sent may still arrive)."""

    async def pause(self, queue: str) -> None:
        """No new deliveries from `queue` alone (those already sent may still arrive)."""
        raise NotImplementedError(f"{type(self).__name__} cannot pause one queue")

    async def resume(self, queue: str) -> None:
        """Deliveries from a paused `queue` again."""
        raise NotImplementedError(f"{type(self).__name__} cannot resume one queue")

    @abstractmethod
    def finished(self, tag: int) -> None:
        """Delivery `tag` may be acked (now or batched with others, soon)."""

    # A transport whose acks take a round trip (a Redis write, not a frame in a socket buffer)
    # may hold each job's slot until its ack is stored: then a crash runs at most `concurrency`
    # finished-but-unacked jobs again, whatever the load.
    holds_slot: ClassVar[bool] = False

    def finished_then(self, tag: int, release: Callable[[], None]) -> None:
        """`finished(tag)`, and `release()` once the ack is stored or can no longer be."""
        self.finished(tag)
        release()

    @abstractmethod
    def requeue(self, tag: int) -> None:
        """Delivery `tag` goes back to the broker unacked."""

    @abstractmethod
    async def flush(self) -> None:
        """Sends every ack and requeue still held back (at the drain, before `close()`)."""

    @abstractmethod
    async def close(self) -> None:
        """Closes the connection; its unacked deliveries return to the queue."""


Delivery = tuple[Transport, int, Message]  # (its transport, its delivery tag, the message)


def coroutine_start(handler: Handler) -> Start:
    """The callback form of an `async def` handler: its call's coroutine, not started yet, is
    what is left to await, which a runner task does."""

    def start(message: Message, publisher: Any, on_done: OnDone) -> None:
        on_done(handler(message, publisher))

    return start


class ConsumerBase(ABC, Generic[C]):
    """Reconnects with capped backoff until `stop()`, then drains in-flight jobs and exits.

    Jobs start straight from the transport's data callback, through the handler's callback form:
    no task per delivery. `concurrency` runner tasks carry on what must be awaited (a retry to
    publish, a coroutine handler). Subclasses implement `new_transport()`, and may check their
    settings in `configure()`.
    """

    def __init__(
        self,
        url: str,
        queues: Sequence[str],
        handler: Handler,
        *,
        concurrency: int,
        prefetch: int,
        prepare: Prepare[C] | None = None,
        shutdown_timeout: float = 30.0,
        max_backoff: float = 30.0,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> None:
        self.url = url
        self.queues = list(queues)
        self.handler = handler
        self.concurrency = concurrency
        self.prefetch = prefetch  # deliveries the broker may send ahead of the acks
        self.prepare = prepare
        self.shutdown_timeout = shutdown_timeout
        self.max_backoff = max_backoff
        self.max_message_size = max_message_size  # larger messages are the message's problem
        self.processed = 0
        # For the metrics, read at scrape time (see stats.py): jobs that succeeded by queue,
        # settled jobs' durations by queue, sessions opened after the first.
        self.succeeded: dict[str, int] = {}
        self.durations = Durations()
        self.reconnects = 0
        self.paused: set[str] = set()  # queues not consumed (fastworker pause), see pause()
        self._transport: Transport | None = None  # the session's, while one is open
        self._loop_time = time.monotonic  # the loop's clock once run() starts
        # How the start line names `concurrency` (the worker says where the number comes from).
        self.in_flight_note = f"{concurrency} jobs in flight"
        self.connected = asyncio.Event()  # set while consuming; tests and the CLI wait on it
        self._stopping = asyncio.Event()
        start: Start | None = getattr(handler, "start", None)
        self._start: Start = start if start is not None else coroutine_start(handler)
        # With an `async def` handler, every job's rest is the handler's call, not started yet:
        # a runner skips it once its transport is gone (the broker delivers the message again,
        # so running it then would run it twice).
        self._rest_unstarted = start is None
        # Delivered, not started yet, in delivery order; `_dispatch` takes from the left while
        # fewer than `concurrency` jobs are in flight.
        self._pending: deque[Delivery] | Prioritized = deque()
        # The same, for transports to read (only its length): while deliveries wait to start,
        # acks may be batched; while none do, the prefetch window limits the consumer, and acks
        # should go at once.
        self.waiting: Sized = self._pending
        # Started jobs the runner tasks carry on: (transport, tag, message, what is left to await).
        self._ready: deque[tuple[Transport, int, Message, float, Awaitable[None]]] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()  # idle runners
        self._in_flight = 0
        self._dispatching = False
        self._running = False  # runner tasks are up; nothing is started or carried on without
        self._idle_waiter: asyncio.Future[None] | None = None
        self._started = False  # consumed at least once: later losses are retried
        self.configure()

    @property
    def in_flight(self) -> int:
        """Jobs started and not settled (their slots)."""
        return self._in_flight

    # ---------------------------------------------------------------- for subclasses

    def prioritize(self, highest: int) -> None:
        """Starts waiting deliveries highest priority first (0..highest), FIFO within one; call
        before `run()`. Without it, deliveries start in the order they came."""
        if highest > 0:
            self._pending = Prioritized(highest)
            self.waiting = self._pending

    def configure(self) -> None:
        """Checks and derives settings at construction (a bad URL fails here, not in `run()`)."""

    @abstractmethod
    def new_transport(self) -> Transport:
        """A transport for one session, not opened yet."""

    def next_address(self) -> str | None:
        """Called after a session failed to open or was lost: moves on to the broker address
        the next session uses, and returns it (for the log) when it is to be tried at once,
        still in this round (a cluster's next node); None when the round is over, and the
        capped backoff applies before the next one. One address: always None."""
        return None

    # ---------------------------------------------------------------- for transports

    def deliver(self, deliveries: Iterable[Delivery]) -> None:
        """Takes deliveries, in the order received, and starts what the concurrency allows."""
        if self.paused:  # sent before the broker took the pause in: back to the queue
            deliveries = self._returned(deliveries)
        self._pending.extend(deliveries)
        self._dispatch()

    # ---------------------------------------------------------------- pause and resume

    def active_queues(self) -> list[str]:
        """The queues to consume: all but the paused ones (transports read it at open)."""
        return [queue for queue in self.queues if queue not in self.paused]

    async def pause(self, queue: str) -> bool:
        """Stops taking jobs from `queue`: its consumer is cancelled, what was delivered and not
        started goes back to the broker, running jobs finish. False if it is not one of ours or
        already paused."""
        if queue not in self.queues or queue in self.paused:
            return False
        self.paused.add(queue)
        transport = self._transport
        if transport is not None and transport.alive:
            await transport.pause(queue)
        if self._pending:
            kept = self._returned(self._pending)
            self._pending.clear()
            self._pending.extend(kept)
        log.info("paused %s: no new jobs from it until resumed", queue)
        return True

    async def resume(self, queue: str) -> bool:
        """Takes jobs from a paused `queue` again; False if it was not paused."""
        if queue not in self.paused:
            return False
        self.paused.discard(queue)
        transport = self._transport
        if transport is not None and transport.alive:
            await transport.resume(queue)
        log.info("resumed %s", queue)
        return True

    def _returned(self, deliveries: Iterable[Delivery]) -> list[Delivery]:
        """`deliveries` without those of paused queues, which go back to the broker."""
        kept = []
        paused = self.paused
        for delivery in deliveries:
            transport, tag, message = delivery
            if message.queue in paused:
                if transport.alive:
                    transport.requeue(tag)
            else:
                kept.append(delivery)
        return kept

    # ---------------------------------------------------------------- the session loop

    def stop(self) -> None:
        """Stops consuming; `run()` returns once in-flight jobs finish or the timeout passes."""
        self._stopping.set()

    async def run(self) -> None:
        self._loop_time = asyncio.get_running_loop().time
        runners = [asyncio.create_task(self._runner()) for _ in range(self.concurrency)]
        self._running = True
        backoff = FIRST_BACKOFF
        try:
            while not self._stopping.is_set():
                transport = self.new_transport()
                opened = self.reconnects + self._started  # sessions opened so far
                try:
                    await self._session(transport)
                    backoff = FIRST_BACKOFF
                except transport.errors as exc:
                    if self._stopping.is_set():
                        break
                    # At start a refusal is a configuration error: say so and end. Once the
                    # worker has consumed, the broker may come back to its senses: retry.
                    reason = None if self._started else transport.refusal(exc)
                    if reason is not None:
                        raise BrokerRefused(reason) from None
                    hint = transport.unreachable(exc)
                    if self.reconnects + self._started != opened:
                        backoff = FIRST_BACKOFF  # it had consumed: a loss starts afresh
                    following = self.next_address()
                    if following is not None:
                        log.warning(
                            "broker connection lost or refused (%r)%s; trying %s",
                            exc,
                            f": {hint}" if hint else "",
                            following,
                        )
                        continue
                    delay = backoff * random.uniform(0.5, 1.0)
                    log.warning(
                        "broker connection lost or refused (%r)%s; retrying in %.1f s",
                        exc,
                        f": {hint}" if hint else "",
                        delay,
                    )
                    backoff = min(backoff * 2, self.max_backoff)
                    try:
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    except TimeoutError:
                        pass
        finally:
            self._running = False
            for runner in runners:
                runner.cancel()
            await asyncio.gather(*runners, return_exceptions=True)

    async def _session(self, transport: Transport) -> None:
        self._transport = transport
        try:
            await transport.open()
            if self._started:
                self.reconnects += 1
            self._started = True
            sources, details = transport.describe()
            log.info("consuming %s (%s, %s)", sources, self.in_flight_note, details)
            self.connected.set()
            try:
                await self._until_lost_or_stopped(transport)
                if self._stopping.is_set() and transport.alive:
                    await self._drain(transport)
            finally:
                self.connected.clear()
        finally:
            try:
                await transport.close()  # not alive from here on
            finally:
                self._forget_pending(transport)

    async def _until_lost_or_stopped(self, transport: Transport) -> None:
        """Returns on stop; raises when the transport is closed or lost."""
        stop = asyncio.ensure_future(self._stopping.wait())
        watched: set[asyncio.Future[Any]] = {stop, transport.closed}
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not stop.done():
                stop.cancel()
        if not self._stopping.is_set():
            reason = transport.closed.result()
            raise ConnectionError(f"broker closed the connection or channel ({reason})")

    async def _drain(self, transport: Transport) -> None:
        await transport.cancel()
        self._forget_pending(transport)  # never started: closing the connection requeues them
        if self._in_flight:
            waiter = self._idle_waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(waiter, self.shutdown_timeout)
            except TimeoutError:
                log.warning(
                    "%d jobs still running after --shutdown-timeout; they return to the queue",
                    self._in_flight,
                )
            finally:
                self._idle_waiter = None
        await transport.flush()

    def _forget_pending(self, transport: Transport) -> None:
        if self._pending:
            kept = [delivery for delivery in self._pending if delivery[0] is not transport]
            self._pending.clear()
            self._pending.extend(kept)

    # ---------------------------------------------------------------- dispatch

    def _dispatch(self) -> None:
        """Starts waiting deliveries while fewer than `concurrency` jobs are in flight."""
        if self._dispatching or not self._running:
            return  # re-entered from a job that finished at once: the outer loop goes on
        self._dispatching = True
        pending, start, done = self._pending, self._start, self._done
        now = self._loop_time()  # the jobs' start, for the duration histogram
        try:
            while pending and self._in_flight < self.concurrency:
                transport, tag, message = pending.popleft()
                if not transport.alive:
                    continue  # its connection is gone: the broker requeues it
                self._in_flight += 1
                try:
                    start(
                        message, transport.publisher, partial(done, transport, tag, message, now)
                    )
                except Exception as exc:
                    done(transport, tag, message, now, _raise(exc))
        finally:
            self._dispatching = False

    def _done(
        self,
        transport: Transport,
        tag: int,
        message: Message,
        started: float,
        rest: Awaitable[None] | None,
    ) -> None:
        """A job's `on_done` (bound to its delivery with a partial: no closure per job): acks it,
        or hands what is left to await to a runner task."""
        if rest is None:
            succeeded = self.succeeded
            queue = message.queue
            succeeded[queue] = succeeded.get(queue, 0) + 1
            self._succeeded(transport, tag, queue, started)
        elif not self._running:  # run() is over: as if its runner had been cancelled
            if isinstance(rest, Coroutine):
                rest.close()
            self._job_done()
        else:
            self._ready.append((transport, tag, message, started, rest))
            waiters = self._waiters
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return

    def _succeeded(self, transport: Transport, tag: int, queue: str, started: float) -> None:
        """Acks a job whose handler succeeded; its slot is free once the transport says so."""
        self.processed += 1
        self.durations.observe(queue, self._loop_time() - started)
        if not transport.alive:
            self._job_done()
        elif transport.holds_slot:
            transport.finished_then(tag, self._job_done)
        else:
            transport.finished(tag)
            self._job_done()

    def _job_done(self) -> None:
        self._in_flight -= 1
        if not self._in_flight and self._idle_waiter is not None:
            if not self._idle_waiter.done():
                self._idle_waiter.set_result(None)
        if self._pending:
            self._dispatch()

    async def _runner(self) -> None:
        """Awaits what a job left to await, then settles its delivery by the error policy:
        returns -> ack; NotStarted -> requeue at once; any other exception -> log, wait
        REQUEUE_DELAY (no hot loop if the trouble persists), requeue."""
        loop = asyncio.get_running_loop()
        ready, waiters, unstarted = self._ready, self._waiters, self._rest_unstarted
        while True:
            if not ready:
                waiter = loop.create_future()
                waiters.append(waiter)
                await waiter
                continue
            transport, tag, message, started, rest = ready.popleft()
            succeeded = False
            try:
                if unstarted and not transport.alive:
                    if isinstance(rest, Coroutine):
                        rest.close()
                    continue  # not started, and its connection is gone
                await rest
            except asyncio.CancelledError:
                raise
            except NotStarted:
                if transport.alive:
                    transport.requeue(tag)
            except Exception:
                log.exception(
                    "job from %s not acknowledged; it goes back to the queue", message.queue
                )
                await asyncio.sleep(REQUEUE_DELAY)
                if transport.alive:
                    transport.requeue(tag)
            else:
                succeeded = True
            finally:
                if succeeded:
                    self._succeeded(transport, tag, message.queue, started)
                else:
                    self._job_done()


async def _raise(exc: Exception) -> None:
    raise exc
