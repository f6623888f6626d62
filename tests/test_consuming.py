"""The consumer skeleton against an in-memory transport: the seams, without a broker.

What every transport relies on: the error policy, the concurrency limit, the drain order, no
ack or requeue through a transport that is gone, and a new transport per reconnect. The AMQP
transports are tested against RabbitMQ in test_fast_consumer.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from fastworker import consuming
from fastworker.consuming import ConsumerBase, OnDone, Transport
from fastworker.message import Message, NotStarted


class FakeTransport(Transport):
    """Records what the skeleton asks of it, in order; deliveries come from the test."""

    def __init__(self, calls: list[tuple[str, ...]], fail_open: bool = False) -> None:
        self.calls = calls
        self.fail_open = fail_open
        self.is_alive = False
        self.publisher = None  # type: ignore[assignment]
        self.closed: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    @property
    def alive(self) -> bool:
        return self.is_alive

    def describe(self) -> tuple[str, str]:
        return "q", "fake"

    def lose(self, reason: str) -> None:
        """The connection dies under the consumer."""
        self.is_alive = False
        self.closed.set_result(reason)

    async def open(self) -> None:
        self.calls.append(("open",))
        if self.fail_open:
            raise ConnectionError("refused")
        self.is_alive = True

    async def cancel(self) -> None:
        self.calls.append(("cancel",))

    def finished(self, tag: int) -> None:
        self.calls.append(("finished", str(tag)) if self.is_alive else ("finished-dead", str(tag)))

    def requeue(self, tag: int) -> None:
        self.calls.append(("requeue", str(tag)) if self.is_alive else ("requeue-dead", str(tag)))

    async def flush(self) -> None:
        self.calls.append(("flush",))

    async def close(self) -> None:
        self.is_alive = False
        self.calls.append(("close",))
        if not self.closed.done():
            self.closed.set_result("closed")


class FakeConsumer(ConsumerBase[None]):
    def configure(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.transports: list[FakeTransport] = []
        self.refuse = 0  # how many open() calls fail first

    def new_transport(self) -> FakeTransport:
        transport = FakeTransport(self.calls, fail_open=self.refuse > 0)
        self.refuse -= 1
        self.transports.append(transport)
        return transport


def make(handler: Any, **kw: Any) -> FakeConsumer:
    kw.setdefault("concurrency", 2)
    kw.setdefault("prefetch", 8)
    kw.setdefault("shutdown_timeout", 5.0)
    kw.setdefault("max_backoff", 0.05)
    return FakeConsumer("fake://", ["q"], handler, **kw)


def arun(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


async def until(done: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not done():
            await asyncio.sleep(0.001)


def deliver(consumer: FakeConsumer, *bodies: bytes, first_tag: int = 1) -> None:
    transport = consumer.transports[-1]
    consumer.deliver(
        [(transport, first_tag + i, Message(body, "q")) for i, body in enumerate(bodies)]
    )


@pytest.fixture(autouse=True)
def _fast_requeue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consuming, "REQUEUE_DELAY", 0.01)


def acks(calls: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    return [c for c in calls if c[0] not in ("open", "cancel", "flush", "close")]


class CallbackHandler:
    """A handler in the callback form, as JobHandler: `start` answers through `on_done`."""

    def __init__(self, outcome: Callable[[Message], Awaitable[None] | None]) -> None:
        self.outcome = outcome
        self.started: list[bytes] = []

    async def __call__(self, message: Message, publisher: object) -> None:
        raise AssertionError("the skeleton only calls `start`")

    def start(self, message: Message, publisher: object, on_done: OnDone) -> None:
        self.started.append(message.body)
        on_done(self.outcome(message))


async def _fail(exc: Exception) -> None:
    raise exc


def _outcome(message: Message) -> Awaitable[None] | None:
    if message.body == b"ok":
        return None  # ack at once, from inside start()
    if message.body == b"not-started":
        return _fail(NotStarted())
    return _fail(RuntimeError("boom"))


@pytest.mark.parametrize("form", ["coroutine", "callback"])
def test_error_policy_in_both_handler_forms(
    form: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def coroutine_handler(message: Message, publisher: object) -> None:
        rest = _outcome(message)
        if rest is not None:
            await rest

    handler = coroutine_handler if form == "coroutine" else CallbackHandler(_outcome)

    async def main() -> FakeConsumer:
        consumer = make(handler)
        task = asyncio.create_task(consumer.run())
        await asyncio.wait_for(consumer.connected.wait(), 5)
        deliver(consumer, b"ok", b"not-started", b"boom")
        await until(lambda: len(acks(consumer.calls)) == 3)
        consumer.stop()
        await task
        return consumer

    consumer = arun(main)
    assert sorted(acks(consumer.calls)) == [("finished", "1"), ("requeue", "2"), ("requeue", "3")]
    # NotStarted goes back at once; any other exception after REQUEUE_DELAY, logged.
    assert acks(consumer.calls).index(("requeue", "2")) < acks(consumer.calls).index(
        ("requeue", "3")
    )
    assert consumer.processed == 1
    assert "job from q not acknowledged" in caplog.text


def test_concurrency_and_order_with_jobs_that_finish_inside_start() -> None:
    in_flight = peak = 0
    pending: list[asyncio.Future[None]] = []

    async def hold(message: Message) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        future = asyncio.get_running_loop().create_future()
        pending.append(future)
        await future
        in_flight -= 1

    handler = CallbackHandler(lambda m: None if m.body.startswith(b"now") else hold(m))

    async def main() -> FakeConsumer:
        consumer = make(handler, concurrency=2)
        task = asyncio.create_task(consumer.run())
        await asyncio.wait_for(consumer.connected.wait(), 5)
        deliver(consumer, b"now1", b"slow1", b"now2", b"slow2", b"slow3", b"now3")
        await until(lambda: len(pending) == 2)
        # now1 and now2 finished inside start(), slow1 holds a slot: slow2 got the other one
        # once now2 was done; the rest waits, in order.
        assert handler.started == [b"now1", b"slow1", b"now2", b"slow2"]
        while len(pending) < 3 or not all(f.done() for f in pending):
            for future in pending:
                if not future.done():
                    future.set_result(None)
            await asyncio.sleep(0.01)
        await until(lambda: consumer.processed == 6)
        consumer.stop()
        await task
        return consumer

    consumer = arun(main)
    assert peak <= 2
    assert handler.started == [b"now1", b"slow1", b"now2", b"slow2", b"slow3", b"now3"]
    assert sorted(acks(consumer.calls)) == [("finished", str(t)) for t in range(1, 7)]


def test_drain_cancels_forgets_waits_flushes_then_closes() -> None:
    release = asyncio.Event()
    started: list[bytes] = []

    async def handler(message: Message, publisher: object) -> None:
        started.append(message.body)
        await release.wait()

    async def main() -> FakeConsumer:
        consumer = make(handler, concurrency=2)
        task = asyncio.create_task(consumer.run())
        await asyncio.wait_for(consumer.connected.wait(), 5)
        deliver(consumer, b"a", b"b", b"c", b"d")  # c and d wait for a slot
        await until(lambda: len(started) == 2)
        consumer.stop()
        await until(lambda: ("cancel",) in consumer.calls)
        await asyncio.sleep(0.05)
        release.set()
        await task
        return consumer

    consumer = arun(main)
    assert started == [b"a", b"b"]  # c and d never started: the broker requeues them
    assert consumer.calls == [
        ("open",),
        ("cancel",),
        ("finished", "1"),
        ("finished", "2"),
        ("flush",),
        ("close",),
    ]
    assert not consumer.connected.is_set()


def test_a_closed_transport_sees_no_ack_or_requeue() -> None:
    """Jobs still running when their connection is lost finish without a word to its transport
    (nor to the next one): the broker delivers their messages again."""
    release = asyncio.Event()
    started: list[bytes] = []

    async def handler(message: Message, publisher: object) -> None:
        started.append(message.body)
        await release.wait()
        if message.body == b"fails":
            raise RuntimeError("late failure")

    async def main() -> FakeConsumer:
        consumer = make(handler, concurrency=2)
        task = asyncio.create_task(consumer.run())
        await asyncio.wait_for(consumer.connected.wait(), 5)
        deliver(consumer, b"ok", b"fails")
        await until(lambda: len(started) == 2)
        consumer.transports[-1].lose("connection reset")
        await until(lambda: len(consumer.transports) == 2 and consumer.connected.is_set())
        release.set()
        await asyncio.sleep(0.1)  # both jobs end, one of them after REQUEUE_DELAY
        consumer.stop()
        await task
        return consumer

    consumer = arun(main)
    assert acks(consumer.calls) == []
    assert consumer.processed == 1  # it ran; only its ack went nowhere


def test_deliveries_of_a_lost_transport_are_not_started_and_run_reconnects(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started: list[bytes] = []
    release = asyncio.Event()

    async def handler(message: Message, publisher: object) -> None:
        started.append(message.body)
        await release.wait()

    async def main() -> FakeConsumer:
        consumer = make(handler, concurrency=1)
        consumer.refuse = 1  # the first open() is refused: retried with backoff
        task = asyncio.create_task(consumer.run())
        await asyncio.wait_for(consumer.connected.wait(), 5)
        deliver(consumer, b"running", b"waiting")
        await until(lambda: started == [b"running"])
        consumer.transports[-1].lose("connection reset")
        await until(lambda: len(consumer.transports) == 3 and consumer.connected.is_set())
        release.set()
        deliver(consumer, b"again", first_tag=1)  # the broker delivers it again, new tags
        await until(lambda: consumer.processed == 2)
        consumer.stop()
        await task
        return consumer

    consumer = arun(main)
    assert started == [b"running", b"again"]  # `waiting` was never started
    first, lost, second = consumer.transports
    assert [c[0] for c in consumer.calls] == [
        "open",  # refused
        "close",
        "open",  # lost later
        "close",
        "open",
        "finished",  # `again`, on the new transport only
        "cancel",
        "flush",
        "close",
    ]
    assert lost.closed.result() == "connection reset"
    assert caplog.text.count("retrying in") == 2
    assert "(connection reset)" in caplog.text


def test_a_coroutine_handler_is_not_called_once_its_transport_is_gone() -> None:
    calls: list[bytes] = []

    async def handler(message: Message, publisher: object) -> None:
        calls.append(message.body)

    async def main() -> None:
        consumer = make(handler, concurrency=1)
        task = asyncio.create_task(consumer.run())
        await asyncio.wait_for(consumer.connected.wait(), 5)
        transport = consumer.transports[-1]
        # Started (handed to a runner), then the connection dies before the runner gets to it.
        deliver(consumer, b"x")
        transport.is_alive = False
        await asyncio.sleep(0.05)
        consumer.stop()
        transport.lose("gone")
        await task

    arun(main)
    assert calls == []
