"""Failures that explain themselves (issue 3): retries, dead letters, `fastworker dlq`.

Everything is real: RabbitMQ, a private PHP-FPM per test, and the worker as a subprocess, the
way a user runs it. Scripts in tests/php record every run (successes in FW_RECORD_FILE, failures
of listener.php / flaky.php in FW_RECORD_FILE.fail), so "ran exactly N times" is counted, not
guessed. Waits are bounded by timeouts only; no assertion depends on how fast anything ran.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import secrets
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiormq
import aiormq.abc
import aiormq.exceptions
import pytest
from pamqp.commands import Basic

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # a source checkout need not be installed to be tested
    sys.path.insert(0, str(ROOT / "src"))

from fastworker import __version__  # noqa: E402
from fastworker.failures import (  # noqa: E402
    ATTEMPTS,
    ERROR,
    ERROR_KIND,
    FIRST_FAILURE,
    INFRA_RETRIES,
    ORIGINAL_QUEUE,
    RetryPolicy,
    delay_queue,
)
from helpers import (  # noqa: E402
    bundle_message,
    order_placed_data,
    read_records,
    wait_for,
)
from services.fpm import FpmServer  # noqa: E402
from services.process import free_loopback_port  # noqa: E402
from services.rabbitmq import (  # noqa: E402
    amqp_declare,
    amqp_delete_queues,
    amqp_get_all,
    amqp_publish,
    amqp_queue_count,
)
from services.worker import Worker, Workers, worker_env  # noqa: E402

PHP_DIR = ROOT / "tests" / "php"
ALLOW = f"{PHP_DIR}/*.php"
RECORD = str(PHP_DIR / "record.php")
FAIL = str(PHP_DIR / "fail.php")
LISTENER = str(PHP_DIR / "listener.php")
FLAKY = str(PHP_DIR / "flaky.php")
SLEEP = str(PHP_DIR / "sleep.php")
CRASH = str(PHP_DIR / "crash.php")
ENV = worker_env()
WAIT = 30.0  # upper bound of every wait; tests normally pass in a fraction of it


# --------------------------------------------------------------------------- small helpers


def sha1(data: str | bytes) -> str:
    return hashlib.sha1(data.encode() if isinstance(data, str) else data).hexdigest()


def token() -> str:
    return secrets.token_hex(6)


def successes(fpm: FpmServer) -> Counter[str]:
    """sha1(data) -> successful runs (record.php, listener.php, flaky.php)."""
    return Counter(digest for _, digest, _ in fpm.records())


def failures(fpm: FpmServer) -> Counter[str]:
    """sha1(data) -> failed runs of listener.php / flaky.php."""
    return Counter(digest for _, digest, _ in read_records(f"{fpm.record_file}.fail"))


def data_of(body: bytes) -> bytes:
    """The data part of a bundle message."""
    return body.split(b"\n\n", 1)[1]


def count(url: str, queue: str) -> int:
    return amqp_queue_count(url, queue)


def peek(url: str, queue: str) -> list[aiormq.abc.DeliveredMessage]:
    """Every ready message of `queue`, in order, without consuming any (unacked, then returned)."""

    async def run() -> list[aiormq.abc.DeliveredMessage]:
        conn = await aiormq.connect(url)
        try:
            channel = await conn.channel()
            out = []
            while True:
                message = await channel.basic_get(queue, no_ack=False)
                if message.delivery_tag is None:
                    return out
                out.append(message)
        finally:
            await conn.close()

    return asyncio.run(run())


def publish_each(url: str, queue: str, messages: Sequence[tuple[bytes, Basic.Properties]]) -> None:
    """Publishes with per-message properties (confirmed), declaring nothing."""

    async def run() -> None:
        conn = await aiormq.connect(url)
        try:
            channel = await conn.channel()
            for body, props in messages:
                await channel.basic_publish(body, routing_key=queue, properties=props)
        finally:
            await conn.close()

    asyncio.run(run())


def error_of(message: aiormq.abc.DeliveredMessage) -> dict[str, Any]:
    return json.loads(message.header.properties.headers[ERROR])


def headers_of(message: aiormq.abc.DeliveredMessage) -> dict[str, Any]:
    return dict(message.header.properties.headers or {})


def dlq(url: str, command: str, queue: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs `fastworker dlq COMMAND --queue QUEUE --amqp-url URL ARGS...`."""
    return subprocess.run(
        [sys.executable, "-m", "fastworker", "dlq", command, "--queue", queue, "--amqp-url", url,
         *args],
        env=ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def dlq_json(url: str, queue: str, *args: str) -> list[dict[str, Any]]:
    result = dlq(url, "show", queue, "--json", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


# --------------------------------------------------------------------------- the worker


@pytest.fixture
def worker(workers: Workers, rabbitmq_url: str, queue_name: str) -> Callable[..., Worker]:
    """`worker([fpm addresses], *extra_args)`: a worker on `queue_name`, started and consuming.

    Defaults: --concurrency 4 --max-attempts 3 --retry-delay 0.2 (extra args come after and
    win). Workers still running at the end get SIGTERM; the retry queues are deleted (see the
    `workers` fixture).
    """

    def start(fpm: Sequence[str], *extra: str) -> Worker:
        args = [
            "--amqp-url", rabbitmq_url, "--queue", queue_name,
            *(arg for address in fpm for arg in ("--fpm", address)),
            "--allow-script", ALLOW, "--concurrency", "4", "--max-attempts", "3",
            "--retry-delay", "0.2", *extra,
        ]
        return workers.start(args, timeout=WAIT)

    return start


def retry_queue_counts(url: str, queue: str, delay: float = 0.2, max_delay: float = 300.0) -> int:
    """Messages waiting in all of `queue`'s retry delay queues."""
    policy = RetryPolicy(retry_delay=delay, retry_max_delay=max_delay)
    return sum(count(url, delay_queue(queue, ms)) for ms in policy.levels())


def assert_settled(url: str, queue: str, **policy: float) -> None:
    """Nothing left to run: the work queue and every retry queue are empty."""
    assert count(url, queue) == 0
    assert retry_queue_counts(url, queue, **policy) == 0


# --------------------------------------------------------------------------- job failures


def test_php_error_retried_max_attempts_then_dead_lettered(
    rabbitmq_url, queue_name, fpm_factory, worker
):
    fpm = fpm_factory()
    w = worker([fpm.address])
    tok = token()
    failing_data = f"FAIL-{tok}"
    boom = bundle_message(f"boom-{tok}", FAIL, port=fpm.port)
    listener = bundle_message(failing_data, LISTENER, port=fpm.port)
    props = Basic.Properties(
        content_type="text/plain",
        message_id=f"msg-{tok}",
        app_id="shop",
        headers={"x-app": "shop", "trace": tok},
    )
    publish_each(rabbitmq_url, queue_name, [(boom, props), (listener, props)])

    dead_letters = f"{queue_name}.failed"
    wait_for(lambda: count(rabbitmq_url, dead_letters) == 2, WAIT, what="2 dead letters")
    assert_settled(rabbitmq_url, queue_name)
    # Exactly --max-attempts runs, none of them a success.
    assert failures(fpm) == {sha1(failing_data): 3}
    assert successes(fpm) == {}

    letters = {m.body: m for m in amqp_get_all(rabbitmq_url, dead_letters)}
    assert set(letters) == {boom, listener}  # the original bodies, byte for byte
    for body, message in letters.items():
        headers = headers_of(message)
        assert headers[ATTEMPTS] == 3
        assert headers[ERROR_KIND] == "php_error"
        assert headers[ORIGINAL_QUEUE] == queue_name
        assert headers["x-app"] == "shop" and headers["trace"] == tok
        p = message.header.properties
        assert (p.content_type, p.message_id, p.app_id) == ("text/plain", f"msg-{tok}", "shop")
        assert p.delivery_mode == 2  # persistent
        error = error_of(message)
        assert error["kind"] == "php_error"
        assert error["status"] == 500
        assert error["attempts"] == 3
        assert error["queue"] == queue_name
        assert error["endpoint"] == fpm.address
        assert error["first_failure"] <= error["last_failure"]
        # Exact, not rounded to a 32-bit float (128 s steps at today's unix times).
        assert float(headers[FIRST_FAILURE]) == error["first_failure"]
        assert error["last_failure"] - error["first_failure"] < 60
        assert error["worker"]["pid"] == w.proc.pid
        assert error["worker"]["version"] == __version__
        assert error["worker"]["host"]
        assert error["stdout_head"].startswith("Status: 500")
        if body == boom:
            expected = f"Uncaught RuntimeException: boom: boom-{tok}"
        else:
            expected = f"Uncaught RuntimeException: listener failed for event {sha1(failing_data)}"
        assert error["message"].startswith(expected), error
        assert expected.removeprefix("Uncaught ") in error["stderr"]
        assert "Stack trace" in error["stderr"]
    # The dead-letter queue is durable: redeclaring it non-durable is refused.
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
        amqp_declare(rabbitmq_url, dead_letters, durable=False)
    assert w.alive()


def test_retry_succeeds_on_second_attempt(rabbitmq_url, queue_name, fpm_factory, worker):
    fpm = fpm_factory()
    w = worker([fpm.address])
    data = f"flaky-{token()}"
    amqp_publish(rabbitmq_url, queue_name, [bundle_message(data, FLAKY, port=fpm.port)])

    wait_for(lambda: successes(fpm)[sha1(data)] == 1, WAIT, what="the retry to succeed")
    assert failures(fpm) == {sha1(data): 1}
    assert "attempt 1 of 3" in w.log()
    assert count(rabbitmq_url, f"{queue_name}.failed") == 0
    assert_settled(rabbitmq_url, queue_name)
    assert successes(fpm) == {sha1(data): 1}


def test_attempt_count_travels_with_the_message(rabbitmq_url, queue_name, fpm_factory, worker):
    """A message that already failed twice (on another worker) gets one more run, not three."""
    fpm = fpm_factory()
    worker([fpm.address])
    data = f"FAIL-{token()}"
    props = Basic.Properties(headers={ATTEMPTS: 2, FIRST_FAILURE: 1_000_000.5})
    publish_each(rabbitmq_url, queue_name, [(bundle_message(data, LISTENER, port=fpm.port), props)])

    dead_letters = f"{queue_name}.failed"
    wait_for(lambda: count(rabbitmq_url, dead_letters) == 1, WAIT, what="the dead letter")
    assert failures(fpm) == {sha1(data): 1}
    (message,) = amqp_get_all(rabbitmq_url, dead_letters)
    error = error_of(message)
    assert error["attempts"] == 3
    assert error["first_failure"] == 1_000_000.5


def test_timeout_is_a_failed_attempt(rabbitmq_url, queue_name, fpm_factory, worker):
    fpm = fpm_factory()
    w = worker([fpm.address], "--job-timeout", "0.5")
    body = bundle_message("1.5", SLEEP, port=fpm.port)
    amqp_publish(rabbitmq_url, queue_name, [body])

    dead_letters = f"{queue_name}.failed"
    wait_for(lambda: count(rabbitmq_url, dead_letters) == 1, WAIT, what="the dead letter")
    (message,) = amqp_get_all(rabbitmq_url, dead_letters)
    assert message.body == body
    assert headers_of(message)[ERROR_KIND] == "timeout"
    error = error_of(message)
    assert (error["kind"], error["attempts"], error["status"]) == ("timeout", 3, None)
    assert error["message"] == "no response within 0.5 s"
    log = w.log()
    assert "attempt 1 of 3, retry in" in log and "attempt 2 of 3, retry in" in log
    assert "attempt 3 of 3" not in log
    assert w.alive()


def test_connection_lost_mid_response_is_a_failed_attempt(
    rabbitmq_url, queue_name, fpm_factory, worker
):
    """The PHP child dies after sending part of its answer (segfault, OOM kill): kind lost."""
    fpm = fpm_factory()
    worker([fpm.address])
    data = f"late-{token()}"
    body = bundle_message(data, CRASH, port=fpm.port)
    amqp_publish(rabbitmq_url, queue_name, [body])

    dead_letters = f"{queue_name}.failed"
    wait_for(lambda: count(rabbitmq_url, dead_letters) == 1, WAIT, what="the dead letter")
    assert failures(fpm) == {sha1(data): 3}
    (message,) = amqp_get_all(rabbitmq_url, dead_letters)
    assert message.body == body
    error = error_of(message)
    assert (error["kind"], error["attempts"]) == ("lost", 3)
    assert "connection lost mid-response" in error["message"]


def test_crash_before_any_output_is_a_failed_attempt(
    rabbitmq_url, queue_name, fpm_factory, worker
):
    fpm = fpm_factory()
    worker([fpm.address], "--retry-max-delay", "0.4")
    data = f"early-{token()}"
    amqp_publish(rabbitmq_url, queue_name, [bundle_message(data, CRASH, port=fpm.port)])

    dead_letters = f"{queue_name}.failed"
    wait_for(
        lambda: count(rabbitmq_url, dead_letters) == 1 or failures(fpm)[sha1(data)] > 3,
        WAIT,
        what="a dead letter or a 4th run",
    )
    assert failures(fpm) == {sha1(data): 3}
    assert count(rabbitmq_url, dead_letters) == 1


# --------------------------------------------------------------------------- refused at once


def test_bad_messages_are_dead_lettered_at_once(rabbitmq_url, queue_name, fpm_factory, worker):
    fpm = fpm_factory()
    w = worker([fpm.address])  # default --max-message-size: 8 MiB
    tok = token()
    head = f"dispatch_path: {RECORD}\nfastcgi_host: 127.0.0.1\nfastcgi_port: {fpm.port}\n"
    bad = {
        "random bytes": b"\x00\xff" + random.Random(tok).randbytes(1000),
        "no blank line": head.encode() + f"data-{tok}".encode(),
        "invalid utf-8": bundle_message(b"\xff\xfe\xfd" + tok.encode(), RECORD, port=fpm.port),
        "no colon": f"dispatch_path {RECORD}\nfastcgi_port: {fpm.port}\n\nd-{tok}".encode(),
        "10 MB": bundle_message(b"A" * (10 * 1024 * 1024), RECORD, port=fpm.port),
    }
    reasons = {
        "no blank line": "no empty line between the header lines and the data",
        "invalid utf-8": "not valid UTF-8",
        "no colon": "has no 'name: value' form",
        "10 MB": "exceeds --max-message-size 8388608",
    }
    good = f"good-{tok}"
    good_body = bundle_message(good, RECORD, port=fpm.port)
    amqp_publish(rabbitmq_url, queue_name, [*bad.values(), good_body])

    dead_letters = f"{queue_name}.failed"
    wait_for(lambda: successes(fpm)[sha1(good)] == 1, WAIT, what="the good message after them")
    wait_for(lambda: count(rabbitmq_url, dead_letters) == 5, WAIT, what="5 dead letters")
    assert successes(fpm) == {sha1(good): 1}  # FPM ran the good one only
    assert failures(fpm) == {}
    assert_settled(rabbitmq_url, queue_name)  # no retries
    assert "retry in" not in w.log()

    letters = {m.body: m for m in amqp_get_all(rabbitmq_url, dead_letters)}
    # Byte for byte, except the 10 MB body: over --max-message-size, it is skipped while being
    # read (bounded memory), and its dead letter says so and keeps the rest of the message.
    kept = {name: body for name, body in bad.items() if name != "10 MB"}
    assert set(letters) == {*kept.values(), b""}
    assert "its body was not read" in error_of(letters[b""])["message"]
    for name, body in {**kept, "10 MB": b""}.items():
        message = letters[body]
        assert ATTEMPTS not in headers_of(message)
        error = error_of(message)
        assert (error["kind"], error["attempts"], error["status"]) == ("bad_message", 0, None)
        assert error["message"], name
        if name in reasons:
            assert reasons[name] in error["message"], (name, error["message"])
    assert w.alive()


def test_not_allowed_is_dead_lettered_at_once(rabbitmq_url, queue_name, fpm_factory, worker):
    fpm = fpm_factory()
    unlisted = fpm_factory()  # a real FPM the worker was not told about
    w = worker([fpm.address])
    tok = token()
    refused = [
        bundle_message(f"a-{tok}", "/srv/app/vendor/evil/dispatch.php", port=fpm.port),
        bundle_message(f"b-{tok}", f"{PHP_DIR}/../helpers.py", port=fpm.port),
        bundle_message(f"c-{tok}", "record.php", port=fpm.port),
        bundle_message(f"d-{tok}", RECORD, port=unlisted.port),
    ]
    good = f"good-{tok}"
    amqp_publish(rabbitmq_url, queue_name, [*refused, bundle_message(good, RECORD, port=fpm.port)])

    dead_letters = f"{queue_name}.failed"
    wait_for(lambda: count(rabbitmq_url, dead_letters) == 4, WAIT, what="4 dead letters")
    wait_for(lambda: successes(fpm)[sha1(good)] == 1, WAIT, what="the good message")
    assert successes(fpm) == {sha1(good): 1}
    assert unlisted.records() == []
    assert_settled(rabbitmq_url, queue_name)

    letters = {m.body: m for m in amqp_get_all(rabbitmq_url, dead_letters)}
    assert set(letters) == set(refused)
    messages = []
    for body in refused:
        error = error_of(letters[body])
        assert (error["kind"], error["attempts"]) == ("not_allowed", 0)
        messages.append(error["message"])
    assert "matches no --allow-script glob" in messages[0]
    assert f"'{ROOT}/tests/helpers.py' matches no --allow-script glob" in messages[1]
    assert "is not an absolute path" in messages[2]
    assert f"{unlisted.address} is not listed with --fpm" in messages[3]
    assert w.alive()


# --------------------------------------------------------------------------- infrastructure


def test_unavailable_fpm_is_retried_not_dead_lettered(
    rabbitmq_url, queue_name, fpm_factory, worker
):
    fpm = fpm_factory()
    down = fpm_factory()
    down.stop()  # nothing listens on its port now; its config keeps the port for the restart
    args = ([fpm.address, down.address], "--retry-max-delay", "0.4")
    w = worker(*args)
    data = f"later-{token()}"
    body = bundle_message(data, RECORD, port=down.port)
    amqp_publish(rabbitmq_url, queue_name, [body])

    wait_for(lambda: w.log().count(" not run (") >= 3, WAIT, what="3 returns for FPM trouble")
    assert count(rabbitmq_url, f"{queue_name}.failed") == 0
    assert w.terminate() == 0

    # Not lost: with no worker running, its retry delay expires into the work queue.
    wait_for(lambda: count(rabbitmq_url, queue_name) == 1, WAIT, what="the job back in its queue")
    assert retry_queue_counts(rabbitmq_url, queue_name, max_delay=0.4) == 0
    (message,) = peek(rabbitmq_url, queue_name)
    assert message.body == body
    headers = headers_of(message)
    assert headers[INFRA_RETRIES] >= 3
    assert ATTEMPTS not in headers  # FPM trouble is no failed attempt
    assert count(rabbitmq_url, f"{queue_name}.failed") == 0

    # A new worker keeps retrying it until FPM is back, then runs it once.
    w2 = worker(*args)
    wait_for(lambda: w2.log().count(" not run (") >= 1, WAIT, what="the new worker's retry")
    down.restart()
    wait_for(lambda: successes(down)[sha1(data)] == 1, WAIT, what="the job to run")
    wait_for(
        lambda: count(rabbitmq_url, queue_name) == 0
        and retry_queue_counts(rabbitmq_url, queue_name, max_delay=0.4) == 0,
        WAIT,
        what="the queues to drain",
    )
    assert successes(down) == {sha1(data): 1}
    assert fpm.records() == []
    assert count(rabbitmq_url, f"{queue_name}.failed") == 0


def test_worker_killed_during_backoff_still_retries(rabbitmq_url, queue_name, fpm_factory, worker):
    fpm = fpm_factory()
    w = worker([fpm.address], "--retry-delay", "2")
    data = f"flaky-{token()}"
    amqp_publish(rabbitmq_url, queue_name, [bundle_message(data, FLAKY, port=fpm.port)])

    # The retry is confirmed in the 2 s delay queue before the log line; then the ack goes out.
    wait_for(lambda: "attempt 1 of 3, retry in" in w.log(), WAIT, what="the first failure")
    wait_for(lambda: count(rabbitmq_url, delay_queue(queue_name, 2000)) == 1, WAIT, what="retry")
    w.kill()
    assert failures(fpm) == {sha1(data): 1}
    assert successes(fpm) == {}
    # The job survives the worker: it waits in the broker, then returns to its queue.
    wait_for(lambda: count(rabbitmq_url, queue_name) == 1, WAIT, what="the delay to expire")
    assert count(rabbitmq_url, delay_queue(queue_name, 2000)) == 0

    worker([fpm.address], "--retry-delay", "2")
    wait_for(lambda: successes(fpm)[sha1(data)] == 1, WAIT, what="the retry to run")
    assert failures(fpm) == {sha1(data): 1}
    assert count(rabbitmq_url, f"{queue_name}.failed") == 0
    assert_settled(rabbitmq_url, queue_name, delay=2)
    assert successes(fpm) == {sha1(data): 1}


# --------------------------------------------------------------------------- the scenario


def test_done_when_scenario(rabbitmq_url, queue_name, fpm_factory, worker, tmp_path):
    """200 events, 20 failing, 2 malformed, 2 not allowed; show; fix; replay."""
    fixed = tmp_path / "listener-fixed"
    fpm = fpm_factory(env={"FW_FIXED_FILE": str(fixed)})
    w = worker([fpm.address], "--max-attempts", "3", "--retry-delay", "0.2")
    tok = token()
    events = []
    for i in range(200):
        payload = f"order {i} {tok}" + (" FAIL" if i % 10 == 7 else "")
        events.append(order_placed_data(i, payload))
    failing = {sha1(d) for i, d in enumerate(events) if i % 10 == 7}
    good = {sha1(d) for i, d in enumerate(events) if i % 10 != 7}
    assert (len(failing), len(good)) == (20, 180)
    bodies = [bundle_message(d, LISTENER, port=fpm.port) for d in events]
    malformed = [
        f"dispatch_path: {LISTENER}\nfastcgi_port: {fpm.port}\n{events[0]}".encode(),
        b"\x00\xff" + random.Random(tok).randbytes(300),
    ]
    not_allowed = [
        bundle_message(events[1], "/srv/app/vendor/evil/dispatch.php", port=fpm.port),
        bundle_message(events[2], LISTENER, port=free_loopback_port()),
    ]
    for position, body in zip((30, 80, 130, 180), malformed + not_allowed, strict=True):
        bodies.insert(position, body)
    amqp_publish(rabbitmq_url, queue_name, bodies)

    dead_letters = f"{queue_name}.failed"
    wait_for(
        lambda: len(successes(fpm)) == 180 and count(rabbitmq_url, dead_letters) == 24,
        WAIT,
        what="180 runs and 24 dead letters",
    )
    assert_settled(rabbitmq_url, queue_name)
    assert successes(fpm) == {digest: 1 for digest in good}  # each good event ran once
    assert failures(fpm) == {digest: 3 for digest in failing}  # each failing one 3 times

    # dlq show --json: all 24, explained, not consumed (twice the same, in the same order).
    shown = dlq_json(rabbitmq_url, queue_name)
    assert dlq_json(rabbitmq_url, queue_name) == shown
    assert count(rabbitmq_url, dead_letters) == 24
    assert Counter(d["error"]["kind"] for d in shown) == {
        "php_error": 20,
        "bad_message": 2,
        "not_allowed": 2,
    }
    assert [d["position"] for d in shown] == list(range(1, 25))
    for d in shown:
        assert d["queue"] == queue_name
        if d["error"]["kind"] == "php_error":
            data = data_of(d["body"].encode())
            assert sha1(data) in failing
            assert (d["attempts"], d["error"]["status"]) == (3, 500)
            assert d["error"]["message"].startswith(
                f"Uncaught RuntimeException: listener failed for event {sha1(data)}"
            )
        else:
            assert (d["attempts"], d["error"]["status"]) == (0, None)
            assert d["error"]["message"]
    bad_bodies = {
        base64.b64decode(d["body_base64"]) if "body_base64" in d else d["body"].encode()
        for d in shown
        if d["error"]["kind"] != "php_error"
    }
    assert bad_bodies == set(malformed + not_allowed)
    table = dlq(rabbitmq_url, "show", queue_name)
    assert table.returncode == 0, table.stderr
    php_rows = [line for line in table.stdout.splitlines() if " php_error " in line]
    assert len(php_rows) == 20
    assert all("listener.php: " in row for row in php_rows)  # body preview: script and data
    assert "24 of 24 dead letters" in table.stdout

    # Remove the cause, replay: the 20 succeed, the 4 that cannot succeed come back.
    fixed.touch()
    replayed = dlq(rabbitmq_url, "replay", queue_name)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.startswith(f"replayed 24 dead letters from {dead_letters}")
    wait_for(
        lambda: len(successes(fpm)) == 200 and count(rabbitmq_url, dead_letters) == 4,
        WAIT,
        what="the 20 replayed to succeed and the 4 to return",
    )
    assert_settled(rabbitmq_url, queue_name)
    assert successes(fpm) == {digest: 1 for digest in good | failing}
    assert failures(fpm) == {digest: 3 for digest in failing}  # no new failures
    back = dlq_json(rabbitmq_url, queue_name)
    assert Counter(d["error"]["kind"] for d in back) == {"bad_message": 2, "not_allowed": 2}
    assert all(d["attempts"] == 0 and d["error"]["attempts"] == 0 for d in back)

    # The worker never restarted.
    assert w.alive()
    assert w.log().count("consuming ") == 1


# --------------------------------------------------------------------------- dlq tools


def dead_letter(
    kind: str, n: int, queue: str, body: bytes | None = None
) -> tuple[bytes, Basic.Properties]:
    """A dead letter as the worker writes it, with some headers and properties of its own."""
    attempts = 3 if kind in ("php_error", "timeout") else 0
    error = {
        "kind": kind,
        "message": f"{kind} number {n}",
        "status": 500 if kind == "php_error" else None,
        "stderr": "",
        "stdout_head": "",
        "endpoint": "127.0.0.1:9000",
        "attempts": attempts,
        "queue": queue,
        "first_failure": 1_700_000_000.0,
        "last_failure": 1_700_000_100.0,
        "worker": {"host": "h", "pid": 1, "version": "0"},
    }
    headers = {
        ERROR_KIND: kind,
        ERROR: json.dumps(error),
        ORIGINAL_QUEUE: queue,
        FIRST_FAILURE: "1700000000.0",
        "x-app": f"app-{n}",
        "x-first-death-queue": f"{queue}.retry.200ms",
        "x-death": [{"count": 1, "queue": f"{queue}.retry.200ms", "reason": "expired"}],
    }
    if attempts:
        headers[ATTEMPTS] = attempts
    props = Basic.Properties(
        headers=headers,
        delivery_mode=2,
        content_type="application/x-bundle",
        message_id=f"m{n}",
        app_id="shop",
        expiration="600000",
    )
    return body if body is not None else f"body {n} {kind}".encode(), props


@pytest.fixture
def queues(rabbitmq_url: str, queue_name: str) -> str:
    """The work queue (non-durable, like the bundle's) and its durable `.failed`, empty."""
    amqp_declare(rabbitmq_url, queue_name, durable=False)
    amqp_declare(rabbitmq_url, f"{queue_name}.failed", durable=True)
    return queue_name


def test_dlq_show_json_and_table_consume_nothing(rabbitmq_url, queues):
    q, dead_letters = queues, f"{queues}.failed"
    letters = [
        dead_letter("php_error", 1, q),
        dead_letter("bad_message", 2, q, body=b"\xff\xfe not utf-8"),
        (b"put here by hand", Basic.Properties(headers={"x-app": "other"})),
        dead_letter("timeout", 4, q),
    ]
    publish_each(rabbitmq_url, dead_letters, letters)

    shown = dlq_json(rabbitmq_url, q)
    assert [d["position"] for d in shown] == [1, 2, 3, 4]
    assert [d["error"]["kind"] for d in shown] == ["php_error", "bad_message", "unknown", "timeout"]
    first = shown[0]
    assert first["queue"] == q and first["dead_letter_queue"] == dead_letters
    assert first["attempts"] == 3
    assert first["error"]["message"] == "php_error number 1"
    assert first["error"]["status"] == 500
    assert first["error"]["endpoint"] == "127.0.0.1:9000"
    assert first["body"] == "body 1 php_error" and "body_base64" not in first
    assert first["headers"] == {"x-app": "app-1"}  # no x-fastworker-*, no x-death history
    assert first["properties"]["message_id"] == "m1"
    assert shown[1]["body_base64"] == "//4gbm90IHV0Zi04"
    assert shown[1]["body"] == "\ufffd\ufffd not utf-8"
    foreign = shown[2]
    assert (foreign["queue"], foreign["attempts"], foreign["error"]["status"]) == (q, 0, None)
    assert foreign["headers"] == {"x-app": "other"}

    assert [d["position"] for d in dlq_json(rabbitmq_url, q, "--limit", "2")] == [1, 2]
    table = dlq(rabbitmq_url, "show", q)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["#", "KIND", "STATUS", "ATTEMPTS", "LAST"]
    assert lines[1].split()[:4] == ["1", "php_error", "500", "3"]
    assert "php_error number 1" in lines[1] and "body 1 php_error" in lines[1]
    assert lines[3].split()[:4] == ["3", "unknown", "-", "0"]
    assert lines[-1] == f"4 of 4 dead letters in {dead_letters} shown; none consumed"

    # Still all there, in the same order.
    assert [m.body for m in amqp_get_all(rabbitmq_url, dead_letters)] == [b for b, _ in letters]
    empty = dlq(rabbitmq_url, "show", q)
    assert empty.stdout == f"no dead letters in {dead_letters}\n"


def test_dlq_replay_kind_filter_keeps_the_others_in_order(rabbitmq_url, queues):
    q, dead_letters = queues, f"{queues}.failed"
    kinds = ["php_error", "bad_message", "php_error", "timeout", "php_error", "not_allowed"]
    letters = [dead_letter(kind, n, q) for n, kind in enumerate(kinds)]
    publish_each(rabbitmq_url, dead_letters, letters)

    result = dlq(rabbitmq_url, "replay", q, "--kind", "php_error")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"replayed 3 dead letters from {dead_letters} (3 to {q})\n"
    assert [m.body for m in peek(rabbitmq_url, dead_letters)] == [
        letters[i][0] for i in (1, 3, 5)
    ]
    replayed = amqp_get_all(rabbitmq_url, q)
    assert [m.body for m in replayed] == [letters[i][0] for i in (0, 2, 4)]
    for m, n in zip(replayed, (0, 2, 4), strict=True):
        p = m.header.properties
        assert p.headers == {"x-app": f"app-{n}"}  # attempts and error gone, own headers kept
        assert (p.content_type, p.message_id, p.app_id) == ("application/x-bundle", f"m{n}", "shop")
        assert p.expiration is None

    # --limit counts replayed ones; a second kind filter adds to the first.
    result = dlq(rabbitmq_url, "replay", q, "--limit", "1", "--kind", "timeout", "--kind", "nope")
    assert result.stdout.startswith("replayed 1 dead letters")
    assert [m.body for m in peek(rabbitmq_url, dead_letters)] == [letters[i][0] for i in (1, 5)]
    result = dlq(rabbitmq_url, "replay", q, "--limit", "1")
    assert result.stdout.startswith("replayed 1 dead letters")
    assert [m.body for m in peek(rabbitmq_url, dead_letters)] == [letters[5][0]]
    assert [m.body for m in amqp_get_all(rabbitmq_url, q)] == [letters[i][0] for i in (3, 1)]


def test_dlq_replay_without_fastworker_headers_goes_to_queue(rabbitmq_url, queues):
    q, dead_letters = queues, f"{queues}.failed"
    props = Basic.Properties(headers={"x-app": "other"}, content_type="text/plain")
    publish_each(rabbitmq_url, dead_letters, [(b"by hand", props)])
    result = dlq(rabbitmq_url, "replay", q, "--kind", "unknown")
    assert result.returncode == 0, result.stderr
    (m,) = amqp_get_all(rabbitmq_url, q)
    assert (m.body, m.header.properties.headers) == (b"by hand", {"x-app": "other"})
    assert count(rabbitmq_url, dead_letters) == 0


def test_dlq_replay_to_a_missing_queue_keeps_the_dead_letter(rabbitmq_url, queues):
    q, dead_letters = queues, f"{queues}.failed"
    gone = f"{q}.gone"
    letters = [dead_letter("php_error", 0, q), dead_letter("php_error", 1, gone),
               dead_letter("php_error", 2, q)]
    publish_each(rabbitmq_url, dead_letters, letters)
    result = dlq(rabbitmq_url, "replay", q)
    assert result.returncode == 1
    assert result.stdout.startswith("replayed 1 dead letters")
    assert f"dead letter #2 not replayed: queue {gone}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert [m.body for m in peek(rabbitmq_url, dead_letters)] == [letters[1][0], letters[2][0]]
    assert [m.body for m in amqp_get_all(rabbitmq_url, q)] == [letters[0][0]]


def test_dlq_purge(rabbitmq_url, queues):
    q, dead_letters = queues, f"{queues}.failed"
    publish_each(rabbitmq_url, dead_letters, [dead_letter("timeout", n, q) for n in range(3)])
    refused = dlq(rabbitmq_url, "purge", q)  # no --yes and no terminal to ask on
    assert refused.returncode == 1
    assert "add --yes" in refused.stderr
    assert count(rabbitmq_url, dead_letters) == 3
    purged = dlq(rabbitmq_url, "purge", q, "--yes")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout == f"purged 3 dead letters from {dead_letters}\n"
    assert count(rabbitmq_url, dead_letters) == 0


@pytest.mark.parametrize("command", [["show"], ["replay"], ["purge", "--yes"]])
def test_dlq_clear_errors(rabbitmq_url, queue_name, command):
    missing = dlq(rabbitmq_url, command[0], queue_name, *command[1:])
    assert missing.returncode == 1
    assert missing.stderr == f"fastworker dlq: no dead-letter queue {queue_name}.failed\n"

    url = f"amqp://guest:secret@127.0.0.1:{free_loopback_port()}/"
    unreachable = dlq(url, command[0], queue_name, *command[1:])
    assert unreachable.returncode == 1
    assert len(unreachable.stderr.splitlines()) == 1, unreachable.stderr
    assert unreachable.stderr.startswith("fastworker dlq: cannot connect to the broker at")
    assert "secret" not in unreachable.stderr


def test_dlq_custom_dead_letter_queue_name(rabbitmq_url, queue_name):
    custom = f"{queue_name}.dead"
    amqp_declare(rabbitmq_url, custom, durable=True)
    try:
        publish_each(rabbitmq_url, custom, [dead_letter("lost", 0, queue_name)])
        shown = dlq_json(rabbitmq_url, queue_name, "--dead-letter-queue", "{queue}.dead")
        assert [(d["error"]["kind"], d["dead_letter_queue"]) for d in shown] == [("lost", custom)]
    finally:
        amqp_delete_queues(rabbitmq_url, [custom])
