"""Pausing and resuming a queue on every worker at once, through the broker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from helpers import bundle_message, complete_lines, wait_for
from services import PHP_DIR, SRC_DIR
from services.rabbitmq import amqp_publish, amqp_queue_count
from services.worker import Workers


def control(action: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastworker", action, "--amqp-url", url, "--wait", "2", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC_DIR)},
        check=False,
    )


def test_pause_stops_every_worker_and_resume_finishes_exactly_once(
    rabbitmq_url: str, queue_name: str, fpm, workers: Workers
) -> None:
    """The issue's acceptance run: two workers drain 3,000 slow jobs; `pause` after ~500 stops
    all new starts within 2 s, nothing lost; a worker started while paused stays off the queue;
    `resume` finishes the rest, each job once."""
    script = str(PHP_DIR / "record_start.php")
    starts = Path(f"{fpm.record_file}.start")
    starts.unlink(missing_ok=True)
    datas = [f"job-{i}" for i in range(3000)]
    amqp_publish(
        rabbitmq_url, queue_name, [bundle_message(d, script, host="", port="") for d in datas]
    )
    args = [
        "--amqp-url", rabbitmq_url, "--queue", queue_name, "--fpm", fpm.address,
        "--script", script, "--concurrency", "2", "--stats-interval", "0",
    ]  # fmt: skip
    first, second = workers.start(args), workers.start(args)

    def started() -> list[tuple[float, str]]:
        return [(float(a), d) for a, d in (line.split(" ", 1) for line in complete_lines(starts))]

    wait_for(lambda: len(started()) >= 500, timeout=60, what="500 jobs started")
    issued = time.time()
    paused = control("pause", rabbitmq_url, "--queue", queue_name)
    assert paused.returncode == 0, paused.stdout + paused.stderr
    assert "2 workers acknowledged" in paused.stdout
    time.sleep(1.0)
    late = [at for at, _ in started() if at > issued + 2.0]
    assert late == [], f"{len(late)} jobs started more than 2 s after the pause"
    count = len(started())
    assert count < 3000
    last = max(at for at, _ in started()) - issued
    # Nothing lost: what did not start is back in the queue, none held by a worker.
    wait_for(
        lambda: amqp_queue_count(rabbitmq_url, queue_name) == 3000 - count,
        timeout=10,
        what="the prefetched jobs back in the queue",
    )
    # A worker that starts while the queue is paused stays off it.
    third = workers.start(args)
    time.sleep(2.0)
    assert len(started()) == count
    assert "paused at start" in third.log()
    resumed_at = time.time()
    resumed = control("resume", rabbitmq_url, "--queue", queue_name)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "3 workers acknowledged" in resumed.stdout
    wait_for(lambda: len(started()) >= 3000, timeout=120, interval=0.5, what="all 3000")
    first_after = min(at for at, _ in started() if at > resumed_at) - resumed_at
    time.sleep(1.0)
    runs = Counter(d for _, d in started())
    assert set(runs) == set(datas) and max(runs.values()) == 1, "each job exactly once"
    for worker in (first, second):
        assert f"paused {queue_name}" in worker.log() and f"resumed {queue_name}" in worker.log()
    print(
        f"\n[pause] {count} jobs started when paused; last start {last:+.2f} s from the pause "
        f"command was issued; {3000 - count} back in the queue; resume -> first start "
        f"{first_after:.2f} s"
    )


def test_pause_with_no_worker_listening_says_so_and_records_it(
    rabbitmq_url: str, queue_name: str
) -> None:
    done = control("pause", rabbitmq_url, "--queue", queue_name)
    assert done.returncode == 1
    assert "0 workers acknowledged" in done.stdout and "the state is recorded" in done.stderr
    assert control("resume", rabbitmq_url, "--queue", queue_name).returncode == 1
