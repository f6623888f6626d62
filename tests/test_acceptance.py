"""The core issue's acceptance run, as a new user would do it.

A PHP app publishes OrderPlaced events with php-amqplib in the deferred-event bundle's exact
format (queue declared non-durable, as the bundle does); the dispatch script hands them to
Symfony's EventDispatcher; fastworker runs them all exactly once and exits 0 soon after SIGTERM.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from helpers import complete_lines, wait_for
from services import ROOT
from services.fpm import FpmServer
from services.rabbitmq import amqp_queue_count
from services.worker import Worker

PHP = ROOT / "examples" / "php"


def publish(queue: str, port: int, count: int, size: int, start_id: int) -> None:
    subprocess.run(
        [
            "php",
            str(PHP / "publish.php"),
            "--queue",
            queue,
            "--count",
            str(count),
            "--size",
            str(size),
            "--fpm-port",
            str(port),
            "--start-id",
            str(start_id),
            "--dispatch",
            str(PHP / "dispatch.php"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def test_symfony_events_from_php_amqplib_run_exactly_once(
    fpm_factory, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    orders = tmp_path / "orders.log"
    fpm: FpmServer = fpm_factory(children=4, env={"FASTWORKER_DEMO_LOG": str(orders)})
    publish(queue_name, fpm.port, 3000, 200, 1)
    publish(queue_name, fpm.port, 40, 200_000, 100_001)
    assert amqp_queue_count(rabbitmq_url, queue_name) == 3040

    worker = Worker(
        [
            "--amqp-url",
            rabbitmq_url,
            "--queue",
            queue_name,
            "--fpm",
            f"127.0.0.1:{fpm.port}",
            "--allow-script",
            f"{PHP}/*.php",
            "--concurrency",
            "4",
        ],
        tmp_path / "worker.log",
    )

    def dispatched() -> list[list[str]]:
        return [line.split() for line in complete_lines(orders)]

    try:
        wait_for(lambda: len(dispatched()) >= 3040, 120, what="3040 events dispatched")
    finally:
        stopped = time.monotonic()
        code = worker.stop(signal.SIGTERM)
    assert code == 0, worker.log()
    assert time.monotonic() - stopped < 10
    ids = Counter(int(fields[0]) for fields in dispatched())
    expected = [*range(1, 3001), *range(100_001, 100_041)]
    assert sorted(ids) == expected and set(ids.values()) == {1}  # exactly once
    sizes = Counter(int(fields[1]) for fields in dispatched())
    assert sizes[200_000] == 40
    assert amqp_queue_count(rabbitmq_url, queue_name) == 0
    assert amqp_queue_count(rabbitmq_url, f"{queue_name}.failed") == 0
