"""The `fastworker` command end to end: real RabbitMQ, real PHP-FPM, the worker as a subprocess."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiormq
import orjson
import pytest
from pamqp.commands import Basic

from helpers import bundle_message, wait_for
from services import PHP_DIR, ROOT
from services.fpm import FpmServer
from services.process import free_loopback_port
from services.proxy import TcpProxy
from services.rabbitmq import amqp_get_all, amqp_host_port, amqp_publish, amqp_queue_count
from services.worker import Worker, worker_args

RECORD = str(PHP_DIR / "record.php")
SLEEP = str(PHP_DIR / "sleep.php")


def sha(data: bytes | str) -> str:
    return hashlib.sha1(data.encode() if isinstance(data, str) else data).hexdigest()


def test_bundle_jobs_run_exactly_once_and_the_queue_drains(
    fpm: FpmServer, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    fpm.clear_records()
    small = [f"event-{i}" for i in range(1500)]
    large = [(f"big-{i}-" * 60_000)[:300_000] for i in range(6)]
    # Over the 32 KB inline limit data travels form-encoded in the body: every byte that has a
    # meaning there (+ & = % / space, UTF-8) must reach PHP unchanged.
    large += [base64.b64encode(random.Random(seed).randbytes(75_000)).decode() for seed in range(3)]
    large.append("a+b&c=d%2B/e f\u00e9\n" * 4_000)
    amqp_publish(
        rabbitmq_url,
        queue_name,
        [bundle_message(d, RECORD, "localhost", fpm.port) for d in small + large],
    )
    worker = Worker(
        worker_args(rabbitmq_url, queue_name, fpm.address, "--concurrency", "4"),
        tmp_path / "worker.log",
    )
    try:
        wait_for(lambda: len(fpm.records()) >= len(small) + len(large), 60, what="all jobs run")
    finally:
        code = worker.stop()
    assert code == 0, worker.log()
    runs = Counter(s for _, s, _ in fpm.records())
    assert runs == Counter(sha(d) for d in small + large)  # each exactly once
    sizes = {size for _, _, size in fpm.records()}
    assert 300_000 in sizes
    assert amqp_queue_count(rabbitmq_url, queue_name) == 0
    assert amqp_queue_count(rabbitmq_url, f"{queue_name}.failed") == 0


def test_keep_alive_few_connections_serve_many_jobs(
    fpm_factory, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    server = fpm_factory(children=8)
    amqp_publish(
        rabbitmq_url,
        queue_name,
        [bundle_message(f"k{i}", RECORD, "127.0.0.1", server.port) for i in range(400)],
    )
    worker = Worker(
        worker_args(rabbitmq_url, queue_name, server.address, "--concurrency", "2"),
        tmp_path / "worker.log",
    )
    try:
        wait_for(lambda: len(server.records()) >= 400, 60, what="400 jobs")
    finally:
        assert worker.stop() == 0
    pids = {pid for pid, _, _ in server.records()}
    # A connection per job would spread 400 jobs over all 8 children; two kept-alive
    # connections pin two children.
    assert len(pids) <= 2, pids


def test_max_requests_churn_loses_and_fails_nothing(
    fpm_factory, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    server = fpm_factory(children=4, max_requests=5)
    datas = [f"churn-{i}" for i in range(300)]
    amqp_publish(
        rabbitmq_url,
        queue_name,
        [bundle_message(d, RECORD, "127.0.0.1", server.port) for d in datas],
    )
    worker = Worker(
        worker_args(rabbitmq_url, queue_name, server.address, "--concurrency", "4"),
        tmp_path / "worker.log",
    )
    try:
        wait_for(lambda: len(server.records()) >= 300, 60, what="300 jobs")
        time.sleep(0.3)
    finally:
        assert worker.stop() == 0
    assert Counter(s for _, s, _ in server.records()) == Counter(sha(d) for d in datas)
    assert amqp_queue_count(rabbitmq_url, f"{queue_name}.failed") == 0
    assert " WARNING " not in worker.log() and " ERROR " not in worker.log()


def test_refused_targets_never_reach_fpm(
    fpm: FpmServer, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    fpm.clear_records()
    outside = str(ROOT / "examples" / "php" / "dispatch.php")
    bad = [
        bundle_message("wrong-port", RECORD, "127.0.0.1", free_loopback_port()),
        bundle_message("wrong-host", RECORD, "10.1.2.3", fpm.port),
        bundle_message("wrong-script", outside, "127.0.0.1", fpm.port),
        bundle_message(
            "dotdot", f"{PHP_DIR}/../../examples/php/dispatch.php", "127.0.0.1", fpm.port
        ),
    ]
    good = bundle_message("good", RECORD, "127.0.0.1", fpm.port)
    amqp_publish(rabbitmq_url, queue_name, [*bad, good])
    worker = Worker(
        worker_args(rabbitmq_url, queue_name, fpm.address), tmp_path / "worker.log"
    )
    try:
        wait_for(lambda: len(fpm.records()) >= 1, 30, what="the good job")
        wait_for(
            lambda: amqp_queue_count(rabbitmq_url, f"{queue_name}.failed") == 4,
            30,
            what="4 dead letters",
        )
    finally:
        assert worker.stop() == 0
    assert [s for _, s, _ in fpm.records()] == [sha("good")]
    dead = amqp_get_all(rabbitmq_url, f"{queue_name}.failed")
    assert sorted(m.body for m in dead) == sorted(bad)  # byte for byte
    for message in dead:
        headers = message.header.properties.headers
        assert headers["x-fastworker-error-kind"] == "not_allowed"
    log = worker.log()
    assert "is not listed with --fpm" in log and "matches no --allow-script glob" in log


def test_existing_durable_queue_is_used_as_declared(
    fpm: FpmServer, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    fpm.clear_records()
    amqp_publish(
        rabbitmq_url,
        queue_name,
        [bundle_message("durable", RECORD, "127.0.0.1", fpm.port)],
        durable=True,
    )
    worker = Worker(worker_args(rabbitmq_url, queue_name, fpm.address), tmp_path / "w.log")
    try:
        wait_for(lambda: len(fpm.records()) == 1, 30, what="the job")
    finally:
        assert worker.stop() == 0
    assert "PRECONDITION" not in worker.log()


def test_missing_queue_is_declared_as_the_bundle_declares_it(
    fpm: FpmServer, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    worker = Worker(worker_args(rabbitmq_url, queue_name, fpm.address), tmp_path / "w.log")
    try:
        worker.wait_consuming()

        async def bundle_declare() -> None:
            connection = await aiormq.connect(rabbitmq_url)
            channel = await connection.channel()
            # php-amqplib: queue_declare($queue, false, false, false, false)
            await channel.queue_declare(queue_name, durable=False)
            await connection.close()

        asyncio.run(bundle_declare())  # would fail with PRECONDITION_FAILED had we used durable
    finally:
        assert worker.stop() == 0


@pytest.mark.parametrize("pipeline", ["1", "2"])
def test_sigterm_finishes_in_flight_jobs_then_exits_zero(
    fpm: FpmServer, rabbitmq_url: str, queue_name: str, tmp_path: Path, pipeline: str
) -> None:
    sleeper = str(PHP_DIR / "sleep.php")
    amqp_publish(
        rabbitmq_url,
        queue_name,
        [bundle_message("1.5", sleeper, "127.0.0.1", fpm.port) for _ in range(12)],
    )
    worker = Worker(
        worker_args(
            rabbitmq_url,
            queue_name,
            fpm.address,
            "--concurrency",
            "4",
            "--pipeline",
            pipeline,
            "--shutdown-timeout",
            "20",
        ),
        tmp_path / "w.log",
    )
    worker.wait_consuming()
    time.sleep(0.5)  # four jobs are now sleeping in PHP
    started = time.monotonic()
    code = worker.stop(signal.SIGTERM)
    assert code == 0, worker.log()
    assert time.monotonic() - started < 15
    # The four running jobs finished and were acked; the eight not started went back, also
    # those the worker had taken to pipeline (they waited for a connection: no request is
    # pipelined behind one that has run for long).
    assert amqp_queue_count(rabbitmq_url, queue_name) == 8, worker.log()
    assert amqp_queue_count(rabbitmq_url, f"{queue_name}.failed") == 0


def test_json_and_raw_formats(
    fpm: FpmServer, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    fpm.clear_records()
    script = str(PHP_DIR / "record_input.php")
    envelope = orjson.dumps({"script": script, "params": {"TENANT": "t7"}, "body": '{"a":1}'})
    amqp_publish(rabbitmq_url, queue_name, [envelope])
    worker = Worker(
        worker_args(
            rabbitmq_url, queue_name, fpm.address, "--format", "json", "--allow-param", "TENANT"
        ),
        tmp_path / "j.log",
    )
    try:
        wait_for(lambda: len(fpm.records()) == 1, 30, what="the json job")
    finally:
        assert worker.stop() == 0
    assert fpm.records()[0][1] == sha('{"a":1}|t7|')

    raw_queue = f"{queue_name}.raw"
    amqp_publish(
        rabbitmq_url,
        raw_queue,
        [b"\x00\x01binary"],
        properties=Basic.Properties(message_id="m-1"),
    )
    worker = Worker(
        [*worker_args(rabbitmq_url, raw_queue, fpm.address, "--format", "raw"), "--script", script],
        tmp_path / "r.log",
    )
    try:
        wait_for(lambda: len(fpm.records()) == 2, 30, what="the raw job")
    finally:
        assert worker.stop() == 0
    assert fpm.records()[1][1] == sha(b"\x00\x01binary||m-1")


def test_reconnects_after_broker_connection_loss_and_loses_nothing(
    fpm: FpmServer, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    fpm.clear_records()
    proxy = TcpProxy(amqp_host_port(rabbitmq_url))
    proxied = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    datas = [f"r{i}" for i in range(3000)]
    amqp_publish(
        rabbitmq_url, queue_name, [bundle_message(d, RECORD, "127.0.0.1", fpm.port) for d in datas]
    )
    worker = Worker(worker_args(proxied, queue_name, fpm.address), tmp_path / "w.log")
    try:
        wait_for(lambda: len(fpm.records()) >= 300, 30, what="some jobs")
        proxy.cut()
        wait_for(lambda: "retrying in" in worker.log(), 10, what="the reconnect attempt")
        wait_for(lambda: amqp_queue_count(rabbitmq_url, queue_name) == 0, 60, what="drain")
        wait_for(
            lambda: set(d for _, d, _ in fpm.records()) >= {sha(d) for d in datas},
            30,
            what="every job run",
        )
    finally:
        assert worker.stop() == 0
        proxy.close()
    runs = Counter(s for _, s, _ in fpm.records())
    assert set(runs) == {sha(d) for d in datas}
    # At-least-once: only jobs that were in flight or unacked at the cut may run twice.
    assert sum(runs.values()) - len(datas) <= 64 + 4
    assert amqp_queue_count(rabbitmq_url, queue_name) == 0


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastworker", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )


def test_cli_version_help_and_bad_arguments() -> None:
    from fastworker import __version__

    assert run_cli("--version").stdout.strip() == f"fastworker {__version__}"
    help_text = run_cli("--help").stdout
    for option in [
        "--amqp-url",
        "--queue",
        "--fpm",
        "--allow-script",
        "--concurrency",
        "--prefetch",
        "--format",
        "--job-timeout",
        "--shutdown-timeout",
    ]:
        assert option in help_text
    assert "pm.max_children" in help_text
    bad = run_cli("--fpm", "nowhere", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/")
    assert bad.returncode == 2 and "expected host:port or unix:/path" in bad.stderr
    bad = run_cli("--concurrency", "0")
    assert bad.returncode == 2 and "must be at least 1" in bad.stderr


@pytest.mark.parametrize("flag", ["--format", "--queue"])
def test_cli_rejects_unknown_choices(flag: str) -> None:
    result = run_cli(flag) if flag == "--queue" else run_cli(flag, "xml")
    assert result.returncode == 2


def test_unencodable_request_is_dead_lettered_not_retried_forever(
    fpm: FpmServer, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    """A json param too large for one FastCGI record cannot be sent: bad_message, at once."""
    fpm.clear_records()
    script = str(PHP_DIR / "record_input.php")
    huge = orjson.dumps({"script": script, "params": {"TENANT": "x" * 70_000}, "body": "h"})
    fine = orjson.dumps({"script": script, "params": {"TENANT": "t"}, "body": "f"})
    amqp_publish(rabbitmq_url, queue_name, [huge, fine])
    worker = Worker(
        worker_args(
            rabbitmq_url, queue_name, fpm.address, "--format", "json", "--allow-param", "TENANT"
        ),
        tmp_path / "w.log",
    )
    try:
        wait_for(lambda: len(fpm.records()) == 1, 30, what="the good job")
        wait_for(
            lambda: amqp_queue_count(rabbitmq_url, f"{queue_name}.failed") == 1,
            30,
            what="the dead letter",
        )
    finally:
        assert worker.stop() == 0
    assert fpm.records()[0][1] == sha("f|t|")
    (dead,) = amqp_get_all(rabbitmq_url, f"{queue_name}.failed")
    assert dead.body == huge
    error = orjson.loads(dead.header.properties.headers["x-fastworker-error"])
    assert error["kind"] == "bad_message" and "65535" in error["message"]


def test_warns_when_concurrency_exceeds_fpm_children(
    fpm_factory, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    """Two children, four connections: two wait in FPM's backlog; the worker names the cause."""
    server = fpm_factory(children=2)
    amqp_publish(
        rabbitmq_url,
        queue_name,
        # Slow jobs keep the two served connections busy completing for the whole test.
        [bundle_message("0.05", SLEEP, "127.0.0.1", server.port) for _ in range(600)],
    )
    worker = Worker(
        worker_args(
            rabbitmq_url,
            queue_name,
            server.address,
            "--concurrency",
            "4",
            "--job-timeout",
            "30",
            "--shutdown-timeout",
            "1",
        ),
        tmp_path / "w.log",
    )
    try:
        wait_for(lambda: "waits in its backlog" in worker.log(), 20, what="the backlog warning")
    finally:
        assert worker.stop() == 0
    warning = next(line for line in worker.log().splitlines() if "backlog" in line)
    assert server.address in warning and "--concurrency (4)" in warning
    assert "pm.max_children" in warning
    # The warning itself says the other connections kept completing requests meanwhile.
    assert re.search(r"while other connections completed [1-9]\d* requests", warning)


def test_progress_lines_count_jobs_retries_and_dead_letters(
    fpm: FpmServer, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    fail = str(PHP_DIR / "fail.php")
    bodies = [bundle_message(f"ok{i}", RECORD, "127.0.0.1", fpm.port) for i in range(50)]
    bodies += [bundle_message(f"bad{i}", fail, "127.0.0.1", fpm.port) for i in range(3)]
    amqp_publish(rabbitmq_url, queue_name, bodies)
    worker = Worker(
        worker_args(
            rabbitmq_url,
            queue_name,
            fpm.address,
            "--stats-interval",
            "0.3",
            "--max-attempts",
            "2",
            "--retry-delay",
            "0.1",
        ),
        tmp_path / "w.log",
    )
    try:
        worker.wait_consuming()
        wait_for(
            lambda: amqp_queue_count(rabbitmq_url, f"{queue_name}.failed") == 3,
            30,
            what="3 dead letters",
        )
        time.sleep(1.0)  # at least one more progress line after the last job
    finally:
        assert worker.stop() == 0
    lines = [line for line in worker.log().splitlines() if " jobs done (" in line]
    assert lines, worker.log()

    def total(pattern: str) -> int:
        return sum(int(m.group(1)) for line in lines for m in [re.search(pattern, line)] if m)

    assert total(r": (\d+) jobs done") == 50 + 3 * 2  # every attempt is a job done and acked
    assert total(r"php_error retried (\d+)") == 3
    assert total(r"php_error dead-lettered (\d+)") == 3


def test_refuses_to_start_without_the_compiled_codecs(tmp_path: Path) -> None:
    # A broken build must not quietly run on the pure-Python twins (several times the CPU):
    # the worker names what failed and how to proceed, before it connects to anything. The
    # build is simulated missing by a copy of the package without its compiled modules, found
    # first on PYTHONPATH.
    shutil.copytree(
        ROOT / "src" / "fastworker",
        tmp_path / "fastworker",
        ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"),
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    args = [sys.executable, "-m", "fastworker", "--amqp-url", "amqp://nobody@127.0.0.1:1/"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 2, result.stderr
    assert "the compiled codecs did not load: fastworker._fcgi_codec (" in result.stderr
    assert "), fastworker._amqp_codec (" in result.stderr
    assert "FASTWORKER_NO_EXTENSIONS=1" in result.stderr
    assert "broker connection" not in result.stderr  # it never tried to connect
    # Asked for, the twins run (here the broker is unreachable: it keeps retrying).
    env["FASTWORKER_NO_EXTENSIONS"] = "1"
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait()
    assert "codecs: FastCGI pure-Python (FASTWORKER_NO_EXTENSIONS), AMQP pure-Python" in line


def test_settle_heap_takes_start_up_objects_out_of_the_cyclic_gc() -> None:
    """After settle_heap, a full collection has (almost) nothing of start-up left to scan."""
    import gc

    from fastworker.worker import settle_heap

    try:
        frozen = settle_heap()
        assert frozen == gc.get_freeze_count() and frozen > 10_000  # this test process's heap
        assert len(gc.get_objects(generation=2)) < frozen // 100
    finally:
        gc.unfreeze()


def test_the_worker_freezes_its_start_up_heap_once_consuming(
    fpm: FpmServer, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    fpm.clear_records()
    bodies = [bundle_message(f"g{i}", RECORD, "127.0.0.1", fpm.port) for i in range(50)]
    amqp_publish(rabbitmq_url, queue_name, bodies)
    worker = Worker(
        worker_args(rabbitmq_url, queue_name, fpm.address, "--log-level", "DEBUG"),
        tmp_path / "worker.log",
    )
    try:
        wait_for(lambda: len(fpm.records()) >= 50, 30, what="50 jobs")
        found = wait_for(
            lambda: re.search(r"(\d+) start-up objects frozen", worker.log()), 10, what="freeze"
        )
    finally:
        assert worker.stop() == 0
    assert int(found.group(1)) > 10_000
