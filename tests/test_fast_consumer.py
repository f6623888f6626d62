"""Both AMQP consumers against the real RabbitMQ: same tests, same contract.

`AmqpConsumer` (aiormq) is the reference; `FastAmqpConsumer` (own connection, compiled codec) must
behave the same: every message handled and acked exactly once, never more than `concurrency`
handlers at once, a handler that raises gets its message back, a killed connection loses nothing,
and `stop()` lets in-flight jobs finish. "fast-py" is the fast consumer on the pure-Python codec.

No pytest-asyncio: each test runs its coroutine on a fresh uvloop loop, as the worker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiormq
import pytest
import uvloop

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from fastworker import amqp_py, fast_consumer  # noqa: E402
from fastworker import codec as selector  # noqa: E402
from fastworker.consumer import AmqpConsumer  # noqa: E402
from fastworker.consuming import ACK_HOLD  # noqa: E402
from fastworker.fast_consumer import FastAmqpConsumer  # noqa: E402
from fastworker.message import Message  # noqa: E402
from services.proxy import TcpProxy  # noqa: E402
from services.rabbitmq import (  # noqa: E402
    amqp_delete_queues,
    amqp_get_all,
    amqp_host_port,
    amqp_publish,
    amqp_queue_count,
)

Consumer = AmqpConsumer | FastAmqpConsumer
ALL_KINDS = ["aiormq", "fast", "fast-py"]
KINDS = ["aiormq", "fast"]


@pytest.fixture(params=ALL_KINDS)
def kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    return _select(request.param, monkeypatch)


@pytest.fixture(params=KINDS)
def kind2(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    return _select(request.param, monkeypatch)


def _select(name: str, monkeypatch: pytest.MonkeyPatch) -> str:
    if name == "fast":
        assert selector.AMQP_COMPILED, (
            f"fastworker._amqp_codec did not load ({selector.AMQP_IMPORT_ERROR or 'forced off'}):"
            " python setup.py build_ext -i"
        )
    if name == "fast-py":
        monkeypatch.setattr(fast_consumer, "codec", amqp_py)
    return name


def make(kind: str, url: str, queues: list[str], handler: Any, **kw: Any) -> Consumer:
    kw.setdefault("concurrency", 4)
    kw.setdefault("prefetch", 64)
    cls = AmqpConsumer if kind == "aiormq" else FastAmqpConsumer
    return cls(url, queues, handler, **kw)


def arun(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


async def run_until(consumer: Consumer, done: Callable[[], bool], timeout: float = 60.0) -> None:
    """Runs the consumer until `done()`, then stops it and waits for `run()` to return."""
    task = asyncio.create_task(consumer.run())
    deadline = time.monotonic() + timeout
    try:
        while not done():
            if task.done():
                task.result()
                raise AssertionError("run() returned before the test was done")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s")
            await asyncio.sleep(0.01)
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 60)


def reconnects(caplog: pytest.LogCaptureFixture) -> int:
    return sum("retrying in" in r.getMessage() for r in caplog.records)


def bodies(n: int, prefix: str = "m") -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


@pytest.fixture(autouse=True)
def _log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastworker")


# --------------------------------------------------------------------------------------------
# the contract


def test_every_message_handled_and_acked_exactly_once(
    kind: str, rabbitmq_url: str, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    sent = bodies(3000)
    amqp_publish(rabbitmq_url, queue_name, sent)
    seen: list[bytes] = []

    async def main() -> Consumer:
        async def handler(message: Message, publisher: object) -> None:
            assert message.queue == queue_name and not message.redelivered
            seen.append(message.body)

        consumer = make(kind, rabbitmq_url, [queue_name], handler)
        await run_until(consumer, lambda: len(seen) >= len(sent))
        return consumer

    consumer = arun(main)
    assert sorted(seen) == sorted(sent)  # once each: a double ack or a lost one would show
    assert consumer.processed == len(sent)
    assert reconnects(caplog) == 0, caplog.text  # an ack of an unknown tag closes the channel
    # Unacked deliveries go back to the queue when the connection closes: none may be there.
    assert amqp_queue_count(rabbitmq_url, queue_name) == 0
    again: list[bytes] = []

    async def consume_again() -> None:
        async def handler(message: Message, publisher: object) -> None:
            again.append(message.body)

        consumer = make(kind, rabbitmq_url, [queue_name], handler)
        await run_until(consumer, lambda: consumer.connected.is_set())
        await asyncio.sleep(0.3)

    arun(consume_again)
    assert again == []


def test_message_fields_match_between_consumers(
    kind: str, rabbitmq_url: str, queue_name: str
) -> None:
    props = aiormq.spec.Basic.Properties(
        content_type="application/json",
        headers={"x-fastworker-attempts": 2, "note": "héllo", "nested": {"a": [1, "b"]}},
        delivery_mode=2,
        priority=3,
        correlation_id="c-1",
        message_id="m-1",
        app_id="symfony",
        message_type="OrderPlaced",
    )
    amqp_publish(rabbitmq_url, queue_name, [b"\x00binary\xff" * 1000], properties=props)
    got: list[Message] = []

    async def main() -> None:
        async def handler(message: Message, publisher: object) -> None:
            got.append(message)

        await run_until(make(kind, rabbitmq_url, [queue_name], handler), lambda: bool(got))

    arun(main)
    [message] = got
    assert message.body == b"\x00binary\xff" * 1000
    assert message.queue == queue_name
    assert message.redelivered is False
    assert message.headers == {
        "x-fastworker-attempts": 2,
        "note": "héllo",
        "nested": {"a": [1, "b"]},
    }
    assert message.properties == {
        "content_type": "application/json",
        "delivery_mode": 2,
        "priority": 3,
        "correlation_id": "c-1",
        "message_id": "m-1",
        "app_id": "symfony",
        "message_type": "OrderPlaced",
    }


def test_several_queues(kind2: str, rabbitmq_url: str, queue_name: str) -> None:
    other = queue_name + ".b"
    amqp_publish(rabbitmq_url, queue_name, bodies(50, "a"))
    amqp_publish(rabbitmq_url, other, bodies(50, "b"))
    seen: list[tuple[str, bytes]] = []
    try:

        async def main() -> None:
            async def handler(message: Message, publisher: object) -> None:
                seen.append((message.queue, message.body))

            consumer = make(kind2, rabbitmq_url, [queue_name, other], handler)
            await run_until(consumer, lambda: len(seen) >= 100)

        arun(main)
    finally:
        amqp_delete_queues(rabbitmq_url, [other])
    assert sorted(seen) == sorted(
        [(queue_name, b) for b in bodies(50, "a")] + [(other, b) for b in bodies(50, "b")]
    )


def test_concurrency_is_never_exceeded(kind: str, rabbitmq_url: str, queue_name: str) -> None:
    amqp_publish(rabbitmq_url, queue_name, bodies(300))
    in_flight = peak = done = 0

    async def main() -> None:
        async def handler(message: Message, publisher: object) -> None:
            nonlocal in_flight, peak, done
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.002 if message.body[-1] % 2 else 0)
            in_flight -= 1
            done += 1

        consumer = make(kind, rabbitmq_url, [queue_name], handler, concurrency=3, prefetch=50)
        await run_until(consumer, lambda: done >= 300)

    arun(main)
    assert peak == 3  # reached, never passed
    assert amqp_queue_count(rabbitmq_url, queue_name) == 0


def test_a_failed_handler_gets_its_message_back(
    kind: str, rabbitmq_url: str, queue_name: str
) -> None:
    sent = bodies(20)
    amqp_publish(rabbitmq_url, queue_name, sent)
    calls: list[tuple[bytes, bool]] = []
    ok: set[bytes] = set()

    async def main() -> None:
        async def handler(message: Message, publisher: object) -> None:
            calls.append((message.body, message.redelivered))
            if message.body == b"m5" and not message.redelivered:
                raise RuntimeError("boom")
            ok.add(message.body)

        consumer = make(kind, rabbitmq_url, [queue_name], handler)
        await run_until(consumer, lambda: len(ok) == len(sent), timeout=30)

    arun(main)
    counts = Counter(body for body, _ in calls)
    assert counts[b"m5"] == 2 and (b"m5", True) in calls
    assert all(counts[b] == 1 for b in sent if b != b"m5")
    assert amqp_queue_count(rabbitmq_url, queue_name) == 0


def test_stop_lets_in_flight_jobs_finish(kind: str, rabbitmq_url: str, queue_name: str) -> None:
    sent = bodies(20)
    amqp_publish(rabbitmq_url, queue_name, sent)
    started: list[bytes] = []
    finished: list[bytes] = []

    async def main() -> float:
        async def handler(message: Message, publisher: object) -> None:
            started.append(message.body)
            await asyncio.sleep(0.5)
            finished.append(message.body)

        consumer = make(kind, rabbitmq_url, [queue_name], handler, prefetch=10)
        task = asyncio.create_task(consumer.run())
        while len(started) < 4:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        consumer.stop()
        await asyncio.wait_for(task, 30)
        assert consumer.processed == 4
        return time.monotonic() - t0

    took = arun(main)
    assert sorted(started) == sorted(finished) and len(finished) == 4
    assert took < 5
    left = [m.body for m in amqp_get_all(rabbitmq_url, queue_name)]
    assert sorted(left + finished) == sorted(sent)  # the finished 4 acked, the rest returned


def test_stop_gives_up_after_shutdown_timeout(
    kind2: str, rabbitmq_url: str, queue_name: str
) -> None:
    amqp_publish(rabbitmq_url, queue_name, bodies(2))
    started: list[bytes] = []

    async def main() -> float:
        async def handler(message: Message, publisher: object) -> None:
            started.append(message.body)
            await asyncio.sleep(30)

        consumer = make(kind2, rabbitmq_url, [queue_name], handler, shutdown_timeout=0.3)
        task = asyncio.create_task(consumer.run())
        while len(started) < 2:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        consumer.stop()
        await asyncio.wait_for(task, 30)
        return time.monotonic() - t0

    assert arun(main) < 5
    assert amqp_queue_count(rabbitmq_url, queue_name) == 2  # unfinished: back in the queue


def test_stop_while_the_broker_is_unreachable(kind2: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed

    async def main() -> float:
        async def handler(message: Message, publisher: object) -> None:
            raise AssertionError("no message expected")

        consumer = make(kind2, f"amqp://guest:guest@127.0.0.1:{port}/", ["q"], handler)
        task = asyncio.create_task(consumer.run())
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        consumer.stop()
        await asyncio.wait_for(task, 10)
        return time.monotonic() - t0

    assert arun(main) < 2


def test_heartbeats_keep_an_idle_connection(
    kind2: str, rabbitmq_url: str, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With heartbeat=1 the broker drops a client that stays silent for 2 s."""
    url = rabbitmq_url.rstrip("/") + "/?heartbeat=1"
    seen: list[bytes] = []

    async def main() -> None:
        async def handler(message: Message, publisher: object) -> None:
            seen.append(message.body)

        consumer = make(kind2, url, [queue_name], handler)
        task = asyncio.create_task(consumer.run())
        try:
            await asyncio.wait_for(consumer.connected.wait(), 15)
            await asyncio.sleep(4.5)
            await asyncio.to_thread(amqp_publish, rabbitmq_url, queue_name, [b"late"])
            deadline = time.monotonic() + 10
            while not seen and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            consumer.stop()
            await asyncio.wait_for(task, 30)

    arun(main)
    assert seen == [b"late"]
    assert reconnects(caplog) == 0, caplog.text


def test_queue_deleted_under_the_consumer(
    kind2: str,
    rabbitmq_url: str,
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker cancels the consumer; the worker must notice, re-declare and consume again."""
    seen: list[bytes] = []

    async def main() -> None:
        async def handler(message: Message, publisher: object) -> None:
            seen.append(message.body)

        consumer = make(kind2, rabbitmq_url, [queue_name], handler, max_backoff=1.0)
        task = asyncio.create_task(consumer.run())
        try:
            await asyncio.wait_for(consumer.connected.wait(), 15)
            await asyncio.to_thread(amqp_delete_queues, rabbitmq_url, [queue_name])
            deadline = time.monotonic() + 20
            while not seen and time.monotonic() < deadline:
                # Publishing declares the queue if it is missing; the worker must consume it.
                await asyncio.to_thread(amqp_publish, rabbitmq_url, queue_name, [b"after"])
                await asyncio.sleep(1.0)
        finally:
            consumer.stop()
            await asyncio.wait_for(task, 30)

    arun(main)
    assert b"after" in seen, caplog.text


def test_publisher_channel_closed_by_the_broker(
    kind2: str,
    rabbitmq_url: str,
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A closed publisher channel ends the session (no retry could be published on it); the
    consumer reconnects and the message comes again."""
    amqp_publish(rabbitmq_url, queue_name, [b"one"])
    calls: list[bool] = []

    async def main() -> None:
        async def handler(message: Message, publisher: Any) -> None:
            calls.append(message.redelivered)
            if len(calls) == 1:  # a 404 on a publish closes the publisher's channel
                with contextlib.suppress(aiormq.exceptions.AMQPError):
                    await publisher.channel.basic_publish(
                        b"x", exchange="fwtest-no-such-exchange", routing_key="x"
                    )
                await asyncio.sleep(0.2)  # the session ends meanwhile: no ack for this one
                raise RuntimeError("publisher gone")

        consumer = make(kind2, rabbitmq_url, [queue_name], handler, max_backoff=1.0)
        await run_until(consumer, lambda: len(calls) >= 2, timeout=20)

    arun(main)
    assert calls == [False, True]
    assert reconnects(caplog) >= 1, caplog.text
    assert amqp_queue_count(rabbitmq_url, queue_name) == 0


# --------------------------------------------------------------------------------------------
# a broker connection killed mid-run


def _rabbitmqctl() -> str:
    path = shutil.which("rabbitmqctl") or shutil.which("rabbitmqctl", path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail("rabbitmqctl not found: the broker-side kill needs the local broker's CLI")
    return path


def broker_close_connections(peer_ports: set[int]) -> int:
    """Has RabbitMQ close (CONNECTION_FORCED) the connections coming from these client ports."""
    ctl = _rabbitmqctl()
    listing = subprocess.run(
        [ctl, "list_connections", "-q", "--no-table-headers", "pid", "peer_port"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pids = []
    for line in listing.stdout.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit() and int(fields[1]) in peer_ports:
            pids.append(fields[0])
    for pid in pids:
        subprocess.run(
            [ctl, "close_connection", pid, "fastworker test: connection killed"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    return len(pids)


@pytest.mark.parametrize("how", ["network-cut", "broker-close"])
def test_killed_connection_reconnects_and_loses_nothing(
    kind2: str,
    how: str,
    rabbitmq_url: str,
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = TcpProxy(amqp_host_port(rabbitmq_url))
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    sent = bodies(3000)
    amqp_publish(rabbitmq_url, queue_name, sent)
    seen: list[bytes] = []
    killed: list[int] = []
    at_kill: list[int] = []

    async def main() -> None:
        resume = asyncio.Event()  # jobs wait from the 300th on until the kill is done

        async def handler(message: Message, publisher: object) -> None:
            await asyncio.sleep(0.0005)
            if len(seen) >= 300:
                await resume.wait()
            seen.append(message.body)

        consumer = make(kind2, url, [queue_name], handler, max_backoff=1.0)

        async def kill_when_busy() -> None:
            while len(seen) < 300:
                await asyncio.sleep(0.005)
            if how == "network-cut":
                proxy.cut()
                killed.append(1)
            else:
                ports = set(proxy.upstream_ports)
                killed.append(await asyncio.to_thread(broker_close_connections, ports))
            at_kill.append(len(seen))
            resume.set()

        killer = asyncio.create_task(kill_when_busy())
        await run_until(consumer, lambda: bool(killed) and set(seen) >= set(sent), timeout=90)
        await killer

    try:
        arun(main)
    finally:
        proxy.close()
    assert killed and killed[0] >= 1
    assert at_kill[0] < len(sent) / 2, "the kill came too late to test anything"
    assert reconnects(caplog) >= 1, caplog.text
    assert set(seen) == set(sent)
    # At-least-once: only messages unacked at the kill (prefetch + in flight) may come twice.
    assert len(seen) - len(sent) <= 64 + 4
    assert amqp_queue_count(rabbitmq_url, queue_name) == 0


# --------------------------------------------------------------------------------------------
# the fast transport and its wire client, without a broker


class _FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


class _Owner:
    """A FastAmqpConsumer as its transport sees it: `deliver`, and `waiting` set by the test."""

    queues = ["q"]
    prefetch = 10
    concurrency = 2  # jobs in flight: acks go once half of the other 8 are finished
    max_message_size = amqp_py.DEFAULT_MAX_BODY_SIZE

    def __init__(self) -> None:
        self.waiting: list[object] = []  # deliveries received, not started
        self.ack_frames = {"multiple": 0, "single": 0}
        self.batches: list[list[tuple[Any, int, Message]]] = []

    def deliver(self, deliveries: list[tuple[Any, int, Message]]) -> None:
        self.batches.append(list(deliveries))


def _link() -> tuple[Any, _FakeTransport]:
    """A FastTransport on a fake socket, as after Qos-Ok: alive, no control connection."""
    link = fast_consumer.FastTransport(_Owner())  # type: ignore[arg-type]
    transport = _FakeTransport()
    link.connection_made(transport)
    link.alive = True
    return link, transport


def _frames(data: bytes) -> list[Any]:
    from pamqp import frame

    out = []
    while data:
        used, _, value = frame.unmarshal(data)
        out.append(value)
        data = data[used:]
    return out


def test_link_answers_broker_channel_close() -> None:
    from pamqp import commands, frame

    async def main() -> None:
        link, transport = _link()
        link.data_received(frame.marshal(commands.Channel.Close(406, "PRECONDITION", 60, 80), 1))
        assert [type(f).__name__ for f in _frames(bytes(transport.written))] == ["CloseOk"]
        assert link.closed.done() and not link.alive
        assert "406 PRECONDITION" in str(link.closed.result())
        link.finished(1)  # never written on a closed channel
        assert len(transport.written) == 12

    arun(main)


def test_link_answers_broker_connection_close() -> None:
    from pamqp import commands, frame

    async def main() -> None:
        link, transport = _link()
        close = commands.Connection.Close(320, "CONNECTION_FORCED - shutdown", 0, 0)
        link.data_received(frame.marshal(close, 0))
        [ok] = _frames(bytes(transport.written))
        assert isinstance(ok, commands.Connection.CloseOk)
        assert transport.closed and link.closed.done()

    arun(main)


def test_link_drops_a_corrupt_stream() -> None:
    async def main() -> None:
        link, transport = _link()
        link.data_received(b"\x01\x00\x01\x00\x00\x00\x04\x00\x0a\x00\x0b\x00")  # bad frame end
        assert transport.aborted and link.closed.done()
        assert "frame end" in str(link.closed.result())

    arun(main)


def _delivery(tag: int, body: bytes, consumer_tag: str = "fastworker.0") -> bytes:
    from pamqp import body as content
    from pamqp import commands, frame, header

    deliver = commands.Basic.Deliver(consumer_tag, tag, False, "", "q")
    props = commands.Basic.Properties()
    return (
        frame.marshal(deliver, 1)
        + frame.marshal(header.ContentHeader(0, len(body), props), 1)
        + frame.marshal(content.ContentBody(body), 1)
    )


def test_link_hands_one_read_s_deliveries_to_the_consumer_at_once() -> None:
    from pamqp import commands, frame

    async def main() -> None:
        link, transport = _link()
        owner = link._consumer
        link.queue_by_tag["fastworker.0"] = "q"
        link.data_received(_delivery(1, b"a") + _delivery(2, b"b"))
        [batch] = owner.batches
        assert [(t, tag, m.body, m.queue) for t, tag, m in batch] == [
            (link, 1, b"a", "q"),
            (link, 2, b"b", "q"),
        ]
        # A delivery and a channel close in one read: the delivery is handed over, but the
        # transport is no longer alive by then, so the consumer will not start it.
        close = frame.marshal(commands.Channel.Close(406, "PRECONDITION", 60, 80), 1)
        link.data_received(_delivery(3, b"c") + close)
        assert [tag for _, tag, _ in owner.batches[1]] == [3] and not link.alive
        link.finished(3)
        link.requeue(3)
        assert [type(f).__name__ for f in _frames(bytes(transport.written))] == ["CloseOk"]

    arun(main)


def test_link_acks_in_batches_and_at_half_the_prefetch() -> None:
    from pamqp import commands

    async def main() -> None:
        link, transport = _link()  # prefetch 10, 2 in flight: a flush once 4 acks are due
        waiting = link._consumer.waiting
        waiting.append(None)  # a delivery waits to start: acks may be batched
        for tag in range(1, 4):
            link._acks.delivered(tag)
            link.finished(tag)
        assert transport.written == b""  # waits for the ~2 ms timer
        await asyncio.sleep(0.02)
        [ack] = _frames(bytes(transport.written))
        assert isinstance(ack, commands.Basic.Ack) and (ack.delivery_tag, ack.multiple) == (3, True)
        transport.written.clear()
        for tag in range(4, 9):
            link._acks.delivered(tag)
        for tag in (5, 6, 7, 8):
            link.finished(tag)  # 4 is still running: held for ACK_HOLD, the gap may close
        assert transport.written == b""
        await asyncio.sleep(ACK_HOLD + 0.03)  # still behind 4 after ACK_HOLD: acked one by one
        acks = _frames(bytes(transport.written))
        assert [(a.delivery_tag, a.multiple) for a in acks] == [(5, 0), (6, 0), (7, 0), (8, 0)]
        link.requeue(4)
        [nack] = _frames(bytes(transport.written))[4:]
        assert isinstance(nack, commands.Basic.Nack) and nack.requeue and nack.delivery_tag == 4
        transport.written.clear()
        for tag in range(9, 13):
            link._acks.delivered(tag)
        for tag in (10, 11, 12, 9):  # out of order, but the gap closes within the round
            link.finished(tag)
        await asyncio.sleep(0.02)
        [ack] = _frames(bytes(transport.written))
        assert (ack.delivery_tag, ack.multiple) == (12, True)
        transport.written.clear()
        # Nothing waits to start and the window is not full: the queue ran dry. A finished
        # delivery behind a gap keeps waiting for it, as if deliveries were waiting.
        waiting.clear()
        for tag in (13, 14):
            link._acks.delivered(tag)
        link.finished(14)
        await asyncio.sleep(0.02)
        assert transport.written == b""
        # The window full (10 delivered, unacked) and nothing waiting: the prefetch window is
        # what limits the consumer, so each finished delivery is acked at once, even behind a
        # gap.
        for tag in range(15, 23):
            link._acks.delivered(tag)
        link.finished(16)
        acks = _frames(bytes(transport.written))
        assert [(a.delivery_tag, a.multiple) for a in acks] == [(14, False), (16, False)]
        # Counted for the metrics: 3, 12 multiple; 5-8, 14, 16 single.
        assert link._consumer.ack_frames == {"multiple": 2, "single": 6}

    arun(main)


def test_link_acks_a_dry_queue_s_last_deliveries_in_one_batch() -> None:
    """The queue ran dry (nothing waits, the window is not full): the last deliveries finish
    out of order, and their acks still leave as one multiple ack, not one frame each."""

    async def main() -> None:
        link, transport = _link()
        for tag in range(1, 7):
            link._acks.delivered(tag)
        for tag in (2, 3, 5, 6, 4, 1):  # 1 was the slowest job
            link.finished(tag)
        assert transport.written == b""
        await asyncio.sleep(0.02)
        [ack] = _frames(bytes(transport.written))
        assert (ack.delivery_tag, ack.multiple) == (6, True)

    arun(main)


# One bad message costs that message, never the connection: properties that do not decode and
# bodies over the size limit reach the handler as the message's `problem`.


def _nested(depth: int) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for _ in range(depth):
        table = {"k": table}
    return table


def test_undecodable_properties_are_the_message_s_problem_only(
    kind: str, rabbitmq_url: str, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    amqp_publish(rabbitmq_url, queue_name, [b"before"])
    host, port = amqp_host_port(rabbitmq_url)
    subprocess.run(  # php-amqplib sends any 64-bit integer as the timestamp
        ["php", str(ROOT / "tests" / "php" / "publish_with_timestamp.php"), host, str(port),
         queue_name, str(2**63 - 1)],
        input=b"timestamp", check=True, capture_output=True, timeout=60,
    )
    deep = aiormq.spec.Basic.Properties(headers={"deep": _nested(200)})
    amqp_publish(rabbitmq_url, queue_name, [b"deep"], properties=deep)
    amqp_publish(rabbitmq_url, queue_name, [b"after"])
    got: dict[bytes, Message] = {}

    async def main() -> None:
        async def handler(message: Message, publisher: object) -> None:
            got[message.body] = message

        await run_until(make(kind, rabbitmq_url, [queue_name], handler), lambda: len(got) == 4)

    arun(main)
    assert got[b"before"].problem == got[b"after"].problem == ""
    assert "timestamp 9223372036854775807 is out of range" in got[b"timestamp"].problem
    assert "nested deeper than" in got[b"deep"].problem
    assert got[b"deep"].headers == {} and got[b"timestamp"].properties == {}
    assert reconnects(caplog) == 0, caplog.text  # the connection was never dropped
    assert amqp_queue_count(rabbitmq_url, queue_name) == 0


@pytest.mark.parametrize("twin", ["fast", "fast-py"])
def test_a_body_over_the_limit_is_skipped_not_buffered(
    twin: str,
    rabbitmq_url: str,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _select(twin, monkeypatch)
    amqp_publish(rabbitmq_url, queue_name, [b"small", b"L" * 3_000_000, b"tail"])
    got: list[Message] = []

    async def main() -> None:
        async def handler(message: Message, publisher: object) -> None:
            got.append(message)

        consumer = make(twin, rabbitmq_url, [queue_name], handler, max_message_size=1_000_000)
        await run_until(consumer, lambda: len(got) == 3)

    arun(main)
    assert [m.body for m in got] == [b"small", b"", b"tail"]
    assert [m.problem for m in got][::2] == ["", ""]
    assert got[1].problem == (
        "message of 3000000 bytes exceeds --max-message-size 1000000; its body was not read"
    )
    assert reconnects(caplog) == 0, caplog.text
