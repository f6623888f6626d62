"""Poison messages and huge outputs, tried from the outside through one real worker.

Each poison message must cost one dead letter (or, for a job that kills its PHP child, exactly
--max-attempts runs and then a dead letter), while the good jobs published around them run
exactly once and the worker stays up. A job that prints hundreds of MB succeeds with the worker's
memory staying small.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

from fastworker.failures import ERROR, RetryPolicy, delay_queue
from helpers import bundle_message, read_records, wait_for
from services import PHP_DIR
from services.fpm import FpmServer
from services.rabbitmq import (
    amqp_delete_queues,
    amqp_get_all,
    amqp_host_port,
    amqp_publish,
    amqp_queue_count,
)
from services.worker import Worker, worker_args

WAIT = 60.0
RETRY = ("--max-attempts", "3", "--retry-delay", "0.2", "--retry-max-delay", "0.4")


def runs(path: Path | str) -> Counter[str]:
    """data's sha1 -> runs recorded in `path` (record.php: successes; crash.php etc.: failures)."""
    return Counter(sha for _, sha, _ in read_records(path))


def sha1(data: str) -> str:
    import hashlib

    return hashlib.sha1(data.encode()).hexdigest()


def publish_with_timestamp(url: str, queue: str, body: bytes, timestamp: int) -> None:
    """php-amqplib, as a PHP app would: it sends any 64-bit integer as the timestamp."""
    host, port = amqp_host_port(url)
    subprocess.run(
        ["php", str(PHP_DIR / "publish_with_timestamp.php"), host, str(port), queue,
         str(timestamp)],
        input=body,
        check=True,
        capture_output=True,
        timeout=60,
    )


def retry_queues(queue: str) -> list[str]:
    policy = RetryPolicy(retry_delay=0.2, retry_max_delay=0.4)
    return [delay_queue(queue, ms) for ms in policy.levels()]


def test_poison_messages_cost_one_dead_letter_each(
    fpm_factory, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    # FPM cuts each line of PHP's error text at log_limit (1024 bytes by default); pools that
    # raise it pass a 200 KB exception message on whole.
    fpm: FpmServer = fpm_factory(children=4, log_limit=1024 * 1024)
    port = fpm.port
    record = str(PHP_DIR / "record.php")
    good = [f"good-{i}" for i in range(300)]
    poison = {
        "timestamp": bundle_message("poison-timestamp", record, port=port),
        "long_path": bundle_message("poison-path", f"{PHP_DIR}/{'a' * 20_000}.php", port=port),
        "crash": bundle_message("early-poison", str(PHP_DIR / "crash.php"), port=port),
        "big_error": bundle_message("200000", str(PHP_DIR / "throw_big.php"), port=port),
    }
    amqp_publish(rabbitmq_url, queue_name, [])  # declares the queue as the bundle does
    worker = Worker(
        worker_args(rabbitmq_url, queue_name, fpm.address, *RETRY), tmp_path / "worker.log"
    )
    try:
        worker.wait_consuming()
        bodies = [bundle_message(data, record, port=port) for data in good]
        amqp_publish(rabbitmq_url, queue_name, bodies[:100])  # the connections are warm now
        publish_with_timestamp(rabbitmq_url, queue_name, poison["timestamp"], 2**63 - 1)
        amqp_publish(rabbitmq_url, queue_name, bodies[100:200])
        amqp_publish(
            rabbitmq_url, queue_name, [poison["long_path"], poison["crash"], poison["big_error"]]
        )
        amqp_publish(rabbitmq_url, queue_name, bodies[200:])

        dead_letters = f"{queue_name}.failed"
        wait_for(
            lambda: amqp_queue_count(rabbitmq_url, dead_letters) >= 4 or not worker.alive(),
            WAIT,
            what="4 dead letters",
        )
        wait_for(lambda: sum(runs(fpm.record_file).values()) >= 300, WAIT, what="300 good runs")
        assert worker.alive(), worker.log()
        letters = {m.body: m for m in amqp_get_all(rabbitmq_url, dead_letters)}
    finally:
        code = worker.stop()
        amqp_delete_queues(rabbitmq_url, retry_queues(queue_name))
    assert code == 0, worker.log()

    # The good jobs ran exactly once each, and nothing else ran to success.
    assert runs(fpm.record_file) == Counter({sha1(data): 1 for data in good})
    assert amqp_queue_count(rabbitmq_url, queue_name) == 0
    assert set(letters) == set(poison.values())
    errors = {name: json.loads(letters[body].header.properties.headers[ERROR])
              for name, body in poison.items()}
    assert errors["timestamp"]["kind"] == "bad_message"
    assert "timestamp 9223372036854775807 is out of range" in errors["timestamp"]["message"]
    assert errors["long_path"]["kind"] == "bad_message"
    assert "longer than any file path" in errors["long_path"]["message"]
    assert (errors["crash"]["kind"], errors["crash"]["attempts"]) == ("lost", 3)
    assert "died before answering" in errors["crash"]["message"]
    assert (errors["big_error"]["kind"], errors["big_error"]["attempts"]) == ("php_error", 3)
    assert errors["big_error"]["message"].startswith("Uncaught RuntimeException: big: EEE")
    assert "cut ...]" in errors["big_error"]["message"]
    assert len(letters[poison["big_error"]].header.properties.headers[ERROR]) <= 9 * 1024
    # Every run PHP saw was counted: the crashing job ran exactly --max-attempts times.
    failed = runs(f"{fpm.record_file}.fail")
    assert failed[sha1("early-poison")] == 3
    assert failed[sha1("200000")] == 3
    # One broker connection all along: no message made the worker reconnect.
    assert "broker connection lost" not in worker.log()


def test_a_job_printing_500_mb_succeeds_in_little_memory(
    fpm_factory, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    fpm: FpmServer = fpm_factory(children=2)
    body = bundle_message("500", str(PHP_DIR / "big_output.php"), port=fpm.port)  # 500 MiB
    amqp_publish(rabbitmq_url, queue_name, [body])
    worker = Worker(
        worker_args(rabbitmq_url, queue_name, fpm.address, *RETRY), tmp_path / "worker.log"
    )
    try:
        worker.wait_consuming()
        wait_for(lambda: runs(fpm.record_file)[sha1("500")] == 1, WAIT, what="the job to run")
        peak_kib = _vm_hwm_kib(worker.proc.pid)
        # SIGTERM lets the finished job be acked (or its retry be published) before exit.
        code = worker.stop(signal.SIGTERM)
    finally:
        if worker.alive():
            worker.stop()
        amqp_delete_queues(rabbitmq_url, retry_queues(queue_name))
    assert code == 0, worker.log()
    assert peak_kib < 100 * 1024, f"worker peak RSS {peak_kib} KiB"
    assert amqp_queue_count(rabbitmq_url, queue_name) == 0
    assert amqp_queue_count(rabbitmq_url, f"{queue_name}.failed") == 0
    assert "job from" not in worker.log()  # no failure, retry or dead letter was logged


def _vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}: {os.uname()}")


def test_a_script_path_too_long_for_one_record_is_a_bad_message(fpm: FpmServer) -> None:
    # 3 params carry the script path (SCRIPT_FILENAME, SCRIPT_NAME, REQUEST_URI): at 25 KB they
    # no longer fit the one PARAMS record shared by every job of a script. Such a path was let
    # through to the encoder, whose error escaped as an exception (the job looped); now it is
    # refused as bad_message, as is any path longer than PATH_MAX.
    import asyncio

    from fastworker.callbacks import awaited
    from fastworker.executor import Executor
    from fastworker.fpm import Endpoint, FpmPools
    from fastworker.job import Job
    from fastworker.targets import TargetPolicy

    async def main() -> list:
        pools = FpmPools(1)
        policy = TargetPolicy([Endpoint.parse(fpm.address)], [f"{PHP_DIR}/*"])
        executor = Executor(pools, policy, 10)
        results = [
            await awaited(executor.start, Job(f"{PHP_DIR}/{'a' * size}.php", data=b"x"))
            for size in (4090, 25_000)
        ]
        await pools.close()
        return results

    results = asyncio.run(main())
    assert [r.kind for r in results] == ["bad_message", "bad_message"]
    assert all("longer than any file path" in r.message for r in results)


def test_an_exception_of_ours_is_dead_lettered_not_looped(
    rabbitmq_url: str, queue_name: str
) -> None:
    # A bug in fastworker while it handles a message (here: the parser raises, and for one
    # message the failure handler too) must end in a dead letter of kind `internal` with the
    # traceback, after --max-attempts runs at most; the message never cycles through the queue.
    import asyncio

    import aiormq
    import uvloop

    from fastworker.executor import Executor
    from fastworker.failures import FailureHandler
    from fastworker.fast_consumer import FastAmqpConsumer
    from fastworker.fpm import Endpoint, FpmPools
    from fastworker.handler import JobHandler
    from fastworker.targets import TargetPolicy

    policy = RetryPolicy(max_attempts=2, retry_delay=0.05, retry_max_delay=0.1)
    calls: Counter[bytes] = Counter()

    def parse(body: bytes, default_script: str, properties: object, headers: object) -> object:
        calls[body] += 1
        raise RuntimeError(f"parser bug on {body!r}")

    class BrokenFailures(FailureHandler):
        async def handle(self, message, result, publisher):  # type: ignore[no-untyped-def]
            if message.body == b"bug-settle":
                raise TypeError("failure handler bug")
            await super().handle(message, result, publisher)

    amqp_publish(rabbitmq_url, queue_name, [b"bug-parse", b"bug-settle"])
    dead_letters = f"{queue_name}.failed"

    async def main() -> None:
        pools = FpmPools(1)
        executor = Executor(pools, TargetPolicy([Endpoint("127.0.0.1", 1)], ["/none"]), 1)
        failures = BrokenFailures(policy)
        pipeline = JobHandler(parse, "/none/x.php", executor, failures, 1 << 20)  # type: ignore[arg-type]
        consumer = FastAmqpConsumer(
            rabbitmq_url, [queue_name], pipeline, concurrency=2, prefetch=8,
            prepare=failures.prepare,
        )
        task = asyncio.create_task(consumer.run())
        watcher = await aiormq.connect(rabbitmq_url)
        try:
            await asyncio.wait_for(consumer.connected.wait(), 30)
            channel = await watcher.channel()
            for _ in range(600):
                ok = await channel.queue_declare(dead_letters, passive=True)
                if ok.message_count == 2:
                    break
                await asyncio.sleep(0.05)
        finally:
            await watcher.close()
            consumer.stop()
            await asyncio.wait_for(task, 30)
            await pools.close()

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
        letters = {m.body: m for m in amqp_get_all(rabbitmq_url, dead_letters)}
    finally:
        amqp_delete_queues(
            rabbitmq_url, [delay_queue(queue_name, ms) for ms in policy.levels()]
        )
    assert set(letters) == {b"bug-parse", b"bug-settle"}
    parse_error = json.loads(letters[b"bug-parse"].header.properties.headers[ERROR])
    assert (parse_error["kind"], parse_error["attempts"]) == ("internal", 2)
    assert "RuntimeError: parser bug on b'bug-parse'" in parse_error["traceback"]
    settle_error = json.loads(letters[b"bug-settle"].header.properties.headers[ERROR])
    assert settle_error["kind"] == "internal"
    assert "TypeError: failure handler bug" in settle_error["traceback"]
    assert calls == Counter({b"bug-parse": 2, b"bug-settle": 1})  # no more runs than that
    assert amqp_queue_count(rabbitmq_url, queue_name) == 0


def test_the_error_header_is_bounded_whatever_php_printed() -> None:
    from fastworker.failures import ERROR_LIMIT, FailureHandler
    from fastworker.outcome import Result

    handler = FailureHandler(RetryPolicy())
    texts = ["E" * 200_000, "é" * 200_000, "\x01" * 200_000, "😀" * 200_000]
    for text in texts:
        result = Result(
            "php_error", 500, message=text, stderr=text.encode(), stdout_head=text.encode(),
            traceback=text,
        )
        header = handler._error_json(result, 3, "q", 1.0, 2.0)
        assert len(header.encode()) <= ERROR_LIMIT
        error = json.loads(header)
        assert error["message"].startswith(text[:10]) and " cut ...] " in error["message"]
        assert " bytes cut ...] " in error["stderr"]
    short = handler._error_json(Result("php_error", 500, message="boom"), 1, "q", 1.0, 2.0)
    assert json.loads(short)["message"] == "boom"
