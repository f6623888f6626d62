"""Scale-out on one broker: `--route balance` over several FPM pools and `--processes N` under
a supervisor, with real RabbitMQ, real PHP-FPM pools and real worker processes."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections import Counter
from pathlib import Path

from fastworker.supervisor import process_count, share
from helpers import bundle_message, order_placed_data, read_records, wait_for
from services import PHP_DIR
from services.process import free_loopback_port, proc_children
from services.rabbitmq import amqp_publish, amqp_queue_count
from services.worker import Worker, Workers


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def bodies(datas: list[str], script: str = "record.php") -> list[bytes]:
    # No fastcgi_host/port: with --route balance the message's endpoint would not matter.
    return [bundle_message(d, str(PHP_DIR / script), host="", port="") for d in datas]


def test_caps_are_split_between_processes_never_repeated() -> None:
    assert [share(3, i, 2) for i in range(2)] == [2, 1]
    assert [share(7, i, 3) for i in range(3)] == [3, 2, 2]
    assert sum(share(6, i, 4) for i in range(4)) == 6
    assert process_count("2", [3, 6]) == 2
    assert process_count("auto", [1, 6]) == 1
    for text, error in (("4", "would leave a process without a connection"), ("x", "number")):
        try:
            process_count(text, [3])
        except ValueError as exc:
            assert error in str(exc)
        else:
            raise AssertionError(f"--processes {text} accepted")


def test_balance_skips_an_endpoint_that_refuses_without_costing_attempts(
    rabbitmq_url: str, queue_name: str, fpm, workers: Workers
) -> None:
    dead = f"127.0.0.1:{free_loopback_port()}"
    fpm.clear_records()
    datas = [order_placed_data(i, "balanced") for i in range(300)]
    worker = workers.start(
        [
            "--amqp-url", rabbitmq_url, "--queue", queue_name, "--fpm", dead,
            "--fpm", fpm.address, "--route", "balance", "--script", str(PHP_DIR / "record.php"),
            "--max-attempts", "1",
        ]
    )  # fmt: skip
    amqp_publish(rabbitmq_url, queue_name, bodies(datas))
    wait_for(lambda: len(fpm.records()) >= 300, timeout=60, what="300 jobs")
    assert Counter(d for _, d, _ in fpm.records()) == Counter(sha1(d) for d in datas)
    log = worker.log()
    assert f"{dead} ejected from the balance" in log
    assert "dead-lettered" not in log and "retry in" not in log
    assert amqp_queue_count(rabbitmq_url, f"{queue_name}.failed") == 0


def test_6000_events_two_pools_two_processes_a_killed_process_and_a_pool_lost(
    rabbitmq_url: str, queue_name: str, fpm_factory, workers: Workers, tmp_path: Path
) -> None:
    """The issue's acceptance run: both pools take work; a worker process killed with SIGKILL
    is replaced; pool B stopped for good after 2000 events; every event dispatched, at most 50
    twice, nothing dead-lettered."""
    pool_a, pool_b = fpm_factory(children=6), fpm_factory(children=6)
    datas = [order_placed_data(i, f"scale {i}") for i in range(6000)]
    amqp_publish(rabbitmq_url, queue_name, bodies(datas, "record_slow.php"))
    supervisor = workers.start(
        [
            "--amqp-url", rabbitmq_url, "--queue", queue_name, "--fpm", pool_a.address,
            "--fpm", pool_b.address, "--route", "balance", "--processes", "2",
            "--concurrency", "3", "--script", str(PHP_DIR / "record_slow.php"),
            "--retry-delay", "0.2", "--stats-interval", "0",
        ]
    )  # fmt: skip

    def runs() -> list[tuple[int, str, int]]:
        return read_records(pool_a.record_file) + read_records(pool_b.record_file)

    wait_for(lambda: len(runs()) >= 600, timeout=60, what="600 events")
    children = proc_children(supervisor.pid)
    assert len(children) == 2
    os.kill(children[0], signal.SIGKILL)
    wait_for(
        lambda: len(set(proc_children(supervisor.pid)) - {children[0]}) == 2,
        timeout=30,
        what="the killed process replaced",
    )
    wait_for(lambda: len(runs()) >= 2000, timeout=120, what="2000 events")
    assert pool_a.records() and pool_b.records(), "both pools took work"
    stopped_at = len(runs())
    pool_b.stop()
    wait_for(
        lambda: {d for _, d, _ in runs()} >= {sha1(d) for d in datas},
        timeout=240,
        interval=0.5,
        what="every event dispatched",
    )
    time.sleep(1.0)
    counts = Counter(d for _, d, _ in runs())
    duplicates = sum(n - 1 for n in counts.values())
    assert duplicates <= 50, f"{duplicates} events ran twice"
    assert amqp_queue_count(rabbitmq_url, f"{queue_name}.failed") == 0
    log = supervisor.log()
    print(f"B stopped after {stopped_at} runs; A {len(pool_a.records())} runs, "
          f"B {len(read_records(pool_b.record_file))}, {duplicates} duplicates")
    assert "worker process 1 (pid" in log and "exited by signal SIGKILL" in log
    assert f"{pool_b.address} ejected from the balance" in log
    assert supervisor.terminate() == 0
    print(f"pool A {len(pool_a.records())} runs, pool B {len(read_records(pool_b.record_file))}, "
          f"{duplicates} duplicates")


def test_the_supervisor_gives_up_on_children_with_bad_settings(
    rabbitmq_url: str, queue_name: str, fpm, tmp_path: Path
) -> None:
    """A refused login ends each child with exit 2, which restarting cannot fix."""
    wrong = rabbitmq_url.replace("guest:guest@", "guest:wrong@")
    worker = Worker(
        [
            "--amqp-url", wrong, "--queue", queue_name, "--processes", "2",
            "--fpm", fpm.address, "--concurrency", "2",
        ],
        tmp_path / "w.log",
    )  # fmt: skip
    assert worker.proc.wait(timeout=60) == 2
    assert "giving up: its settings cannot work" in worker.log()
    too_many = Worker(
        ["--amqp-url", rabbitmq_url, "--processes", "3", "--concurrency", "2"], tmp_path / "x.log"
    )
    assert too_many.proc.wait(timeout=30) == 2
    assert "--processes 3 would leave a process without a connection" in too_many.log()


def test_sigterm_drains_every_process(
    rabbitmq_url: str, queue_name: str, fpm, workers: Workers
) -> None:
    supervisor = workers.start(
        [
            "--amqp-url", rabbitmq_url, "--queue", queue_name, "--fpm", fpm.address,
            "--processes", "2", "--concurrency", "2", "--script", str(PHP_DIR / "record.php"),
        ]
    )  # fmt: skip
    wait_for(lambda: supervisor.log().count("consuming ") >= 2, timeout=30, what="2 consumers")
    children = proc_children(supervisor.pid)
    assert supervisor.terminate() == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in children)
