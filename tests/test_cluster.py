"""RabbitMQ clusters: several --amqp-url (a cluster's nodes), failover when the worker's node
stops, and --queue-type quorum for the queues the worker declares (retries and dead letters
included).

The cluster is three private nodes on loopback started by the tests (`rabbit_cluster`,
services/rabbitmq_cluster.py); the single-node cases (a dead first URL, the tools) use the
machine's broker. PHP-FPM records each run with tests/php/record.php (or fail_if.php).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import aiormq
import pytest
from pamqp.commands import Basic

from fastworker import queue_types
from fastworker.amqp_nodes import Nodes
from fastworker.amqp_url import split_urls
from fastworker.cli import settings_from, worker_parser
from fastworker.config import resolve
from fastworker.failures import RetryPolicy, delay_queue
from helpers import bundle_message, wait_for
from services import PHP_DIR
from services.fpm import FpmServer
from services.process import free_loopback_port
from services.rabbitmq import (
    QUEUE_PREFIX,
    amqp_delete_queues,
    amqp_get_all,
    amqp_publish,
    amqp_queue_count,
)
from services.rabbitmq_cluster import RabbitCluster, declare_quorum_queue
from services.worker import Worker, worker_args, worker_env

RECORD = str(PHP_DIR / "record.php")
FAIL_IF = str(PHP_DIR / "fail_if.php")
PACED = str(PHP_DIR / "record_paced.php")  # 2 ms per job: 10,000 outlast a node's stop
PERSISTENT = Basic.Properties(delivery_mode=2)
QUICK_RETRIES = ["--max-attempts", "3", "--retry-delay", "0.2", "--retry-max-delay", "1"]


def sha(data: str) -> str:
    return hashlib.sha1(data.encode()).hexdigest()


def new_queue(what: str) -> str:
    return f"{QUEUE_PREFIX}cluster.{what}.{secrets.token_hex(3)}"


def dead_url() -> str:
    return f"amqp://guest:guest@127.0.0.1:{free_loopback_port()}/"


def retry_queues(queue: str, args: list[str]) -> list[str]:
    options = dict(zip(args, args[1:], strict=False))
    policy = RetryPolicy(
        retry_delay=float(options.get("--retry-delay", 1)),
        retry_max_delay=float(options.get("--retry-max-delay", 300)),
    )
    return [delay_queue(queue, ms) for ms in policy.levels()]


def log_time(line: str) -> float:
    """The unix time of a text log line (`2026-01-02 03:04:05,678 ...`, local time)."""
    stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def node_port(log: str, nth: int) -> int:
    """The port of the broker the `nth` (1-based) "consuming" line of a worker's log names."""
    lines = [line for line in log.splitlines() if " consuming " in line]
    match = re.search(r"broker amqp://guest:\*\*\*@127\.0\.0\.1:(\d+)/", lines[nth - 1])
    assert match, lines[nth - 1]
    return int(match.group(1))


def queue_types_on(cluster: RabbitCluster, prefix: str) -> dict[str, str]:
    """name -> type of the queues whose name starts with `prefix`, as the cluster lists them."""
    node = next(node for node in cluster.nodes if node.accepts_amqp())
    listing = json.loads(node.rabbitmqctl("list_queues", "name", "type", "--formatter", "json"))
    return {q["name"]: q["type"] for q in listing if q["name"].startswith(prefix)}


class Sampler(threading.Thread):
    """(time, size of the records file) every 5 ms: when jobs ran, without a clock in PHP."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                size = os.stat(self.path).st_size
            except FileNotFoundError:
                size = 0
            self.samples.append((time.time(), size))
            time.sleep(0.005)

    def size_at(self, moment: float) -> int:
        return max((size for at, size in self.samples if at <= moment), default=0)

    def first_growth_after(self, moment: float) -> float | None:
        base = None
        for at, size in self.samples:
            if at < moment:
                continue
            if base is None:
                base = size
            elif size > base:
                return at
        return None


# --------------------------------------------------------------------------- the settings


def test_urls_come_repeated_or_as_a_comma_list_and_a_password_may_hold_a_comma() -> None:
    assert split_urls(["amqp://a/,amqp://b/", "amqps://c/?cacertfile=/x,y.pem"]) == [
        "amqp://a/",
        "amqp://b/",
        "amqps://c/?cacertfile=/x,y.pem",
    ]
    env = {"FASTWORKER_AMQP_URL": "amqp://u:p,w@h1/,amqp://u:p,w@h2:5673/"}
    settings = settings_from(resolve(worker_parser(), [], env).args)
    assert settings.effective_amqp_urls == ["amqp://u:p,w@h1/", "amqp://u:p,w@h2:5673/"]
    one = {"FASTWORKER_AMQP_URL": "amqp://u:secret@broker:5672/"}
    assert settings_from(resolve(worker_parser(), [], one).args).effective_amqp_urls == [
        "amqp://u:secret@broker:5672/"
    ]
    flags = ["--amqp-url", "amqps://a/", "--amqp-url", "amqps://b/", "--amqp-ca", "/ca.pem"]
    settings = settings_from(resolve(worker_parser(), flags, {}).args)  # the flags: every node
    assert settings.effective_amqp_urls == [
        "amqps://a/?cacertfile=/ca.pem",
        "amqps://b/?cacertfile=/ca.pem",
    ]
    assert settings_from(resolve(worker_parser(), [], {}).args).queue_type == "classic"


def test_nodes_are_tried_in_order_and_a_round_ends_in_the_backoff() -> None:
    nodes = Nodes.parse("amqp://a/,amqp://b/,amqp://c/")
    tried = []
    for _ in range(3):
        tried.append(nodes.current.url.host)
        more = nodes.failed()
    assert tried == ["a", "b", "c"] and more is False  # a full round failed: back off
    assert nodes.current.url.host == "a"
    nodes.failed()
    nodes.connected()  # b worked; it is lost later: c is tried at once, then a, then back off
    assert [nodes.failed(), nodes.failed(), nodes.failed()] == [True, True, False]
    assert Nodes.parse("amqp://only/").failed() is False  # one node: the backoff, as before


def test_a_quorum_queue_s_redelivery_count_is_read_only_on_redeliveries() -> None:
    headers = {"x-delivery-count": 3}
    assert queue_types.delivery_count(headers, redelivered=True) == 3
    assert queue_types.delivery_count(headers, redelivered=False) == 0  # a republished copy
    assert queue_types.delivery_count({"x-delivery-count": "x"}, redelivered=True) == 0
    assert queue_types.declare_as("quorum", False) == (True, {"x-queue-type": "quorum"})
    assert queue_types.declare_as("classic", False, None) == (False, None)


def test_a_quorum_delivery_with_only_delivery_mode_skips_the_property_decoder() -> None:
    from fastworker.amqp_base import decode_properties
    from fastworker.fast_consumer import _MODE_ONLY

    for raw, mode in _MODE_ONLY.items():
        assert decode_properties(raw) == ({"delivery_mode": mode}, {})


def test_fastworker_config_shows_every_node_masked(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fastworker", "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=worker_env({"FASTWORKER_AMQP_URL": "amqp://u:secret@h1/,amqp://u:secret@h2/"}),
    )
    assert done.returncode == 0, done.stderr
    assert 'amqp_url = ["amqp://u:***@h1/", "amqp://u:***@h2/"]' in done.stdout
    assert "secret" not in done.stdout


# --------------------------------------------------------------------------- one node, two URLs


@pytest.mark.parametrize("how", ["flags", "environment"])
def test_the_first_url_that_answers_is_used(
    rabbitmq_url: str, queue_name: str, fpm: FpmServer, tmp_path: Path, how: str
) -> None:
    fpm.clear_records()
    datas = [f"second-{how}-{i}" for i in range(50)]
    amqp_publish(
        rabbitmq_url, queue_name, [bundle_message(d, RECORD, "127.0.0.1", fpm.port) for d in datas]
    )
    dead = dead_url()
    if how == "flags":
        args, env = worker_args(dead, queue_name, fpm.address, "--amqp-url", rabbitmq_url), None
    else:
        args = worker_args(rabbitmq_url, queue_name, fpm.address)[2:]  # no --amqp-url flag
        env = {"FASTWORKER_AMQP_URL": f"{dead},{rabbitmq_url}"}
    worker = Worker(args, tmp_path / "worker.log", env)
    try:
        worker.wait_consuming(30)
        wait_for(lambda: len(fpm.records()) >= len(datas), 30, what="the jobs, on the second URL")
    finally:
        code = worker.stop()
    log = worker.log()
    assert code == 0, log
    assert Counter(s for _, s, _ in fpm.records()) == Counter(sha(d) for d in datas)
    assert f"is RabbitMQ running at 127.0.0.1:{dead.rsplit(':', 1)[1][:-1]}?" in log
    assert "trying amqp://guest:***@127.0.0.1:5672/" in log, log
    assert "retrying in" not in log  # the next node at once, no backoff
    assert "broker amqp://guest:***@127.0.0.1:5672/)" in log


@pytest.mark.parametrize("client", ["fast", "aiormq"])
def test_a_refused_login_on_any_node_still_ends_the_worker_at_start(
    rabbitmq_url: str, tmp_path: Path, client: str
) -> None:
    wrong = rabbitmq_url.replace("guest:guest@", "guest:wrong@")
    worker = Worker(
        ["--amqp-url", f"{dead_url()},{wrong}", "--amqp-client", client, "--fpm", "127.0.0.1:9"],
        tmp_path / "worker.log",
    )
    code = worker.proc.wait(30)
    log = worker.log()
    assert code == 2, log
    assert "refused the login of user 'guest'" in log.strip().splitlines()[-1]
    assert "wrong" not in log


def test_check_and_dlq_use_the_first_node_that_answers(
    rabbitmq_url: str, queue_name: str, fpm: FpmServer
) -> None:
    amqp_publish(rabbitmq_url, f"{queue_name}.failed", [b"a dead letter"])
    urls = ["--amqp-url", dead_url(), "--amqp-url", rabbitmq_url]
    fpm_flags = ["--fpm", fpm.address, "--fpm-alias", f"localhost:9000={fpm.address}"]

    def run(*args: str) -> tuple[int, str]:
        done = subprocess.run(
            [sys.executable, "-m", "fastworker", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=worker_env(),
        )
        return done.returncode, done.stdout + done.stderr

    code, out = run("check", *urls, "--queue", queue_name, *fpm_flags, "--script", RECORD)
    assert code == 0, out
    assert "(the worker uses the nodes that answer)" in out, out
    assert re.search(
        r"ok   broker amqp://guest:\*\*\*@127.0.0.1:5672/ +connected and logged in", out
    )
    code, out = run("dlq", "show", *urls, "--queue", queue_name)
    assert code == 0, out
    assert "1 of 1 dead letters" in out
    code, out = run("check", "--amqp-url", dead_url(), "--queue", queue_name, "--fpm", fpm.address)
    assert code == 1 and "FIX  broker" in out, out
    code, out = run("dlq", "show", "--amqp-url", f"{dead_url()},{dead_url()}", "--queue", "q")
    assert code == 1 and "cannot connect to the broker at any of its nodes" in out, out


def test_a_quorum_redelivery_count_is_not_a_failed_attempt(
    rabbitmq_url: str, fpm: FpmServer, tmp_path: Path
) -> None:
    """A message a quorum queue delivered 5 times unsettled (workers lost while it ran) still
    gets its --max-attempts runs, and the worker says it came back often."""
    queue = new_queue("redelivered")
    declare_quorum_queue(rabbitmq_url, queue)
    data = "FAIL redelivered"

    async def bounce() -> None:
        connection = await aiormq.connect(rabbitmq_url)
        try:
            channel = await connection.channel()
            await channel.basic_publish(
                bundle_message(data, FAIL_IF, "127.0.0.1", fpm.port), routing_key=queue
            )
            for _ in range(5):
                got = await channel.basic_get(queue)
                assert got.delivery_tag is not None
                await channel.basic_nack(got.delivery_tag, requeue=True)
        finally:
            await connection.close()

    args = worker_args(rabbitmq_url, queue, fpm.address, "--queue-type", "quorum", *QUICK_RETRIES)
    try:
        asyncio.run(bounce())
        worker = Worker(args, tmp_path / "worker.log")
        try:
            worker.wait_consuming(30)  # it declared the dead-letter queue
            wait_for(
                lambda: amqp_queue_count(rabbitmq_url, f"{queue}.failed") == 1,
                30,
                what="the dead letter",
            )
        finally:
            assert worker.stop() == 0, worker.log()
        (letter,) = amqp_get_all(rabbitmq_url, f"{queue}.failed")
        error = json.loads(letter.header.properties.headers["x-fastworker-error"])
        assert error["attempts"] == 3, error  # its own runs, not the 5 redeliveries
        assert "was delivered 5 times before without being settled" in worker.log()
    finally:
        amqp_delete_queues(
            rabbitmq_url, [queue, f"{queue}.failed", *retry_queues(queue, QUICK_RETRIES)]
        )


# --------------------------------------------------------------------------- the cluster


def test_quorum_delay_queues_expire_by_ttl_and_expiration_back_to_the_work_queue(
    rabbit_cluster: RabbitCluster,
) -> None:
    """What the delay queues rest on, on RabbitMQ 3.10: a quorum queue honours its own TTL and
    a message's expiration (the shorter), and dead-letters at-least-once to the work queue."""
    work, delay = new_queue("ttl-work"), new_queue("ttl-delay")
    url = rabbit_cluster.urls[0]

    async def main() -> list[tuple[bytes, float]]:
        connection = await aiormq.connect(url)
        try:
            channel = await connection.channel()
            await channel.queue_declare(work, durable=True, arguments={"x-queue-type": "quorum"})
            durable, arguments = queue_types.declare_as(
                "quorum", True, queue_types.delay_arguments("quorum", 1500, work)
            )
            await channel.queue_declare(delay, durable=durable, arguments=arguments)
            started = time.monotonic()
            for body, expiration in ((b"own-300ms", "300"), (b"ttl", None), (b"own-9s", "9000")):
                props = Basic.Properties(delivery_mode=2, expiration=expiration)
                await channel.basic_publish(body, routing_key=delay, properties=props)
            got: list[tuple[bytes, float]] = []
            while len(got) < 3 and time.monotonic() - started < 10:
                message = await channel.basic_get(work, no_ack=True)
                if message.delivery_tag is None:
                    await asyncio.sleep(0.02)
                    continue
                got.append((message.body, time.monotonic() - started))
            return got
        finally:
            await connection.close()

    try:
        got = asyncio.run(main())
    finally:
        amqp_delete_queues(url, [work, delay])
    assert [body for body, _ in got] == [b"own-300ms", b"ttl", b"own-9s"], got
    assert 0.25 < got[0][1] < 1.2, got  # its own expiration
    assert 1.4 < got[1][1] < 3.0 and got[2][1] < 3.0, got  # the queue's TTL, also over 9 s


@pytest.mark.parametrize("client", ["fast", "aiormq"])
def test_retries_and_dead_letters_work_on_quorum_queues(
    rabbit_cluster: RabbitCluster, fpm: FpmServer, tmp_path: Path, client: str
) -> None:
    fpm.clear_records()
    queue = new_queue(f"retry-{client}")
    urls = rabbit_cluster.urls
    args = worker_args(
        urls[0], queue, fpm.address, "--amqp-url", urls[1], "--amqp-url", urls[2],
        "--queue-type", "quorum", "--amqp-client", client, "--stats-interval", "0",
        *QUICK_RETRIES,
    )  # fmt: skip
    datas = [f"ok-{i}" for i in range(200)]
    failing = [f"FAIL-{i}" for i in range(5)]
    worker = Worker(args, tmp_path / "worker.log")
    types: dict[str, str] = {}
    try:
        worker.wait_consuming(60)  # it declared the missing work queue: a quorum queue
        bodies = [bundle_message(d, FAIL_IF, "127.0.0.1", fpm.port) for d in datas + failing]
        amqp_publish(urls[1], queue, bodies, declare=False, properties=PERSISTENT)
        wait_for(
            lambda: amqp_queue_count(urls[2], f"{queue}.failed") == len(failing),
            60,
            what="the dead letters",
        )
        wait_for(lambda: len(fpm.records()) >= len(datas), 30, what="the jobs that succeed")
        types = queue_types_on(rabbit_cluster, queue)
    finally:
        code = worker.stop()
    try:
        assert code == 0, worker.log()
        assert Counter(s for _, s, _ in fpm.records()) == Counter(sha(d) for d in datas)
        expected = {queue, f"{queue}.failed", *retry_queues(queue, QUICK_RETRIES)}
        assert types == {name: "quorum" for name in expected}, types
        letters = amqp_get_all(urls[0], f"{queue}.failed")
        errors = [json.loads(m.header.properties.headers["x-fastworker-error"]) for m in letters]
        booms = sorted(re.sub(r".*boom: (FAIL-\d+).*", r"\1", e["message"]) for e in errors)
        assert booms == sorted(failing), errors
        assert {e["attempts"] for e in errors} == {3}
    finally:
        amqp_delete_queues(urls[0], sorted({queue, f"{queue}.failed"} | set(types)))


@pytest.mark.parametrize(
    ("client", "how"), [("fast", "stop_app"), ("aiormq", "stop_app"), ("fast", "kill")]
)
def test_persistent_events_survive_stopping_the_node_the_worker_is_connected_to(
    rabbit_cluster: RabbitCluster, fpm: FpmServer, tmp_path: Path, client: str, how: str
) -> None:
    """The issue's done-when: a quorum queue on three nodes, persistent events, the worker's
    node stopped mid-run (`rabbitmqctl stop_app`, or its VM killed: a crash): every event
    dispatched, none dead-lettered, duplicates within the prefetch window; the time to resume
    is printed."""
    fpm.clear_records()
    events = 10_000
    queue = new_queue(f"failover-{client}-{how}")
    urls = rabbit_cluster.urls
    declare_quorum_queue(urls[0], queue)  # its leader on the first node
    datas = [f"event-{client}-{i}" for i in range(events)]
    started = time.monotonic()
    amqp_publish(
        urls[0],
        queue,
        [bundle_message(d, PACED, "127.0.0.1", fpm.port) for d in datas],
        declare=False,
        properties=PERSISTENT,
    )
    published = time.monotonic() - started
    prefetch = 64
    args = worker_args(
        urls[0], queue, fpm.address, "--amqp-url", urls[1], "--amqp-url", urls[2],
        "--queue-type", "quorum", "--amqp-client", client, "--prefetch", str(prefetch),
        "--stats-interval", "0", *QUICK_RETRIES,
    )  # fmt: skip
    sampler = Sampler(fpm.record_file)
    sampler.start()
    worker = Worker(args, tmp_path / "worker.log")
    stopped, port = None, 0
    try:
        worker.wait_consuming(60)
        port = node_port(worker.log(), 1)
        node = rabbit_cluster.node_at(port)
        # rabbitmqctl takes about a second to act: most events are still to run then.
        wait_for(lambda: len(fpm.records()) >= events // 20, 60, what="some of the events")
        before_stop = len(fpm.records())
        stop_issued = time.time()
        stopped = node
        node.stop_app() if how == "stop_app" else node.kill()
        stop_returned = time.time()
        wait_for(lambda: worker.log().count(" consuming ") >= 2, 60, what="the resumption")
        wait_for(
            lambda: {s for _, s, _ in fpm.records()} >= {sha(d) for d in datas},
            180,
            what="every event dispatched",
        )
        time.sleep(1)  # anything still coming would be a duplicate: let it show
    finally:
        sampler.done.set()
        code = worker.stop()
        if stopped is not None:
            stopped.start_app() if how == "stop_app" else stopped.restart()
    log = worker.log()
    live = next(u for u in urls if not u.endswith(f":{port}/"))
    try:
        assert code == 0, log
        runs = Counter(s for _, s, _ in fpm.records())
        assert set(runs) == {sha(d) for d in datas}
        duplicates = sum(runs.values()) - len(datas)
        assert duplicates <= prefetch, f"{duplicates} duplicates"
        assert amqp_queue_count(live, f"{queue}.failed") == 0
        assert amqp_queue_count(live, queue) == 0
        assert node_port(log, 2) != port
        lost_line = next(
            line for line in log.splitlines() if "broker connection lost or refused" in line
        )
        resumed_line = [line for line in log.splitlines() if " consuming " in line][1]
        lost_at, resumed_at = log_time(lost_line), log_time(resumed_line)
        first_job = sampler.first_growth_after(resumed_at)
        assert first_job is not None, "no job ran after the resumption"
        line_size = fpm.record_file.stat().st_size / sum(runs.values())
        done_at_loss = round(sampler.size_at(lost_at) / line_size)
        assert done_at_loss <= events * 9 // 10, f"the node stopped only after {done_at_loss} jobs"
        print(
            f"\n[failover {client}, {how}] {events} persistent events on a 3-node quorum "
            f"queue (published in {published:.1f} s); {how} on {node.name} after "
            f"{before_stop} jobs, connection lost after {done_at_loss}: {how} -> connection "
            f"lost {lost_at - stop_issued:.2f} s ({how} returned after "
            f"{stop_returned - stop_issued:.2f} s); lost -> consuming on another node "
            f"{resumed_at - lost_at:.2f} s; -> first job {first_job - resumed_at:.2f} s; node "
            f"loss -> first job {first_job - lost_at:.2f} s; duplicates {duplicates} (prefetch "
            f"{prefetch})"
        )
    finally:
        amqp_delete_queues(live, [queue, f"{queue}.failed", *retry_queues(queue, QUICK_RETRIES)])
