"""Priorities inside the worker: a priority job overtakes the backlog the worker already holds."""

from __future__ import annotations

import hashlib

import aiormq

from fastworker.message import Message
from fastworker.priorities import Prioritized, priority_of
from helpers import bundle_message, complete_lines, order_placed_data, read_records, wait_for
from services import PHP_DIR
from services.rabbitmq import amqp_declare, amqp_publish
from services.worker import Workers


def delivery(tag: int, priority: int | None = None, body: bytes = b"x") -> tuple:
    properties = {} if priority is None else {"priority": priority}
    return (None, tag, Message(body, "q", {}, properties))


def test_highest_priority_first_fifo_within_one() -> None:
    waiting = Prioritized(9)
    waiting.extend([delivery(1), delivery(2, 5), delivery(3), delivery(4, 5), delivery(5, 200)])
    assert len(waiting) == 5
    assert [waiting.popleft()[1] for _ in range(5)] == [5, 2, 4, 1, 3]
    assert not waiting


def test_a_bundle_priority_line_counts_and_junk_is_priority_0() -> None:
    body = b"dispatch_path: /x.php\npriority: 7\n\ndata"
    assert priority_of(Message(body, "q"), 9) == 7
    assert priority_of(Message(b"priority: 7\n\ndata", "q"), 9) == 7
    assert priority_of(Message(b"xpriority: 7\n\ndata", "q"), 9) == 0
    assert priority_of(Message(b"priority: high\n\ndata", "q"), 9) == 0
    assert priority_of(Message(b"data: priority: 9", "q"), 9) == 0
    assert priority_of(Message(b"", "q", {}, {"priority": "x"}), 9) == 0


def test_a_priority_job_overtakes_the_prefetched_backlog(
    rabbitmq_url: str, queue_name: str, fpm, workers: Workers
) -> None:
    """200 slow jobs are all delivered to the worker (prefetch 300, one connection); a job
    published afterwards with priority 9 starts before the backlog it arrived behind."""
    script = str(PHP_DIR / "record_slow.php")
    fpm.clear_records()
    backlog = [order_placed_data(i, "backlog") for i in range(200)]
    amqp_publish(
        rabbitmq_url, queue_name, [bundle_message(d, script, host="", port="") for d in backlog]
    )
    workers.start(
        [
            "--amqp-url", rabbitmq_url, "--queue", queue_name, "--fpm", fpm.address,
            "--script", script, "--concurrency", "1", "--pipeline", "1", "--prefetch", "300",
            "--max-priority", "10",
        ]
    )  # fmt: skip
    wait_for(lambda: len(read_records(fpm.record_file)) >= 5, timeout=30, what="5 jobs")
    urgent = order_placed_data(999, "urgent")
    amqp_publish(
        rabbitmq_url,
        queue_name,
        [bundle_message(urgent, script, host="", port="")],
        properties=aiormq.spec.Basic.Properties(priority=9),
    )
    digest = hashlib.sha1(urgent.encode()).hexdigest()
    wait_for(
        lambda: digest in {d for _, d, _ in read_records(fpm.record_file)},
        timeout=30,
        what="the urgent job",
    )
    order = [d for _, d, _ in read_records(fpm.record_file)]
    position = order.index(digest)
    assert position < 40, f"the urgent job ran as number {position + 1} of {len(order)}"
    assert len(order) < 150  # it did not wait for the backlog


def declare_priority_queue(url: str, queue: str, highest: int) -> None:
    import asyncio

    async def declare() -> None:
        connection = await aiormq.connect(url)
        try:
            channel = await connection.channel()
            await channel.queue_declare(queue, arguments={"x-max-priority": highest})
        finally:
            await connection.close()

    asyncio.run(declare())


def test_priority_jobs_start_within_a_second_behind_2000_prefetched(
    rabbitmq_url: str, queue_name: str, fpm, workers: Workers
) -> None:
    """The issue's acceptance run: a priority queue with 2,000 low-priority 10 ms jobs and
    --prefetch 1000; 20 priority-9 jobs published later each start within 1 s."""
    import time
    from pathlib import Path

    script = str(PHP_DIR / "record_start.php")
    starts = Path(f"{fpm.record_file}.start")
    starts.unlink(missing_ok=True)
    declare_priority_queue(rabbitmq_url, queue_name, 10)
    low = [f"low-{i}" for i in range(2000)]
    amqp_publish(
        rabbitmq_url,
        queue_name,
        [bundle_message(d, script, host="", port="") for d in low],
        properties=aiormq.spec.Basic.Properties(priority=1),
    )
    workers.start(
        [
            "--amqp-url", rabbitmq_url, "--queue", queue_name, "--fpm", fpm.address,
            "--script", script, "--prefetch", "1000", "--max-priority", "10",
            "--concurrency", "4", "--pipeline", "1",
        ]
    )  # fmt: skip
    # 400 jobs/s: the prefetched backlog alone would hold a new job back about 2.5 s.
    wait_for(lambda: starts.exists() and len(starts.read_text().splitlines()) > 100, what="100")
    published = {}
    for i in range(20):
        data = f"urgent-{i}"
        published[data] = time.time()
        amqp_publish(
            rabbitmq_url,
            queue_name,
            [bundle_message(data, script, host="", port="")],
            properties=aiormq.spec.Basic.Properties(priority=9),
        )
        time.sleep(0.05)

    def started() -> dict[str, float] | None:
        found = {}
        for line in complete_lines(starts):
            at, data = line.split(" ", 1)
            if data in published:
                found[data] = float(at)
        return found if len(found) == 20 else None

    found = wait_for(started, timeout=30, what="20 urgent jobs started")
    waits = sorted(found[d] - published[d] for d in published)
    ran_before = sum(1 for line in starts.read_text().splitlines() if line.split(" ", 1)[1] in low)
    print(
        f"urgent jobs started {waits[0]:.3f}-{waits[-1]:.3f} s after publishing; "
        f"{ran_before} low-priority jobs had started by then"
    )
    assert waits[-1] < 1.0, waits
    assert ran_before < 1500  # they did not wait for the backlog


def test_a_missing_queue_is_declared_as_a_priority_queue(
    rabbitmq_url: str, queue_name: str, fpm, workers: Workers
) -> None:
    workers.start(
        ["--amqp-url", rabbitmq_url, "--queue", queue_name, "--fpm", fpm.address,
         "--max-priority", "5"]
    )  # fmt: skip

    amqp_declare(rabbitmq_url, queue_name, arguments={"x-max-priority": 5})  # the same: accepted
    try:
        amqp_declare(rabbitmq_url, queue_name, arguments={})
    except aiormq.exceptions.ChannelPreconditionFailed:
        pass
    else:
        raise AssertionError("the queue was not declared with x-max-priority 5")
