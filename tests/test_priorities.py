"""Priorities inside the worker: a priority job overtakes the backlog the worker already holds."""

from __future__ import annotations

import hashlib

import aiormq

from fastworker.message import Message
from fastworker.priorities import Prioritized, priority_of
from helpers import bundle_message, order_placed_data, read_records, wait_for
from services import PHP_DIR
from services.rabbitmq import amqp_publish
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
