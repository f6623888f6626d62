"""What PHP knows about its job (issue 13): FASTWORKER_JOB_ID, FASTWORKER_ATTEMPT,
FASTWORKER_QUEUE, FASTWORKER_FIRST_ENQUEUED, the W3C trace context, and delayed jobs.

The first part checks the validators and the context builders without services. The rest runs
the worker as a user does, against RabbitMQ (or Sidekiq's Redis) and a real PHP-FPM: the
script tests/php/context.php records what each run found in $_SERVER, so "the same id on
each of 3 attempts" is read from PHP's side, not inferred from the worker's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from fastworker import job_context, sidekiq_jobs
from fastworker.failures import RetryPolicy, delay_queue
from fastworker.formats import BadMessage, parse_bundle, parse_bundle_console, parse_event_data
from fastworker.job import Job
from fastworker.message import Message
from fastworker.trace_context import trace_params, traceparent, tracestate
from helpers import bundle_message, complete_lines, order_placed_data, wait_for
from services import PHP_DIR
from services.fpm import FpmServer
from services.rabbitmq import amqp_host_port, amqp_queue_count
from services.sidekiq import sidekiq_api, sidekiq_push
from services.worker import Worker, Workers, worker_env

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = str(PHP_DIR / "context.php")
IDEMPOTENT = str(ROOT / "examples" / "php" / "idempotent_listener.php")
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TS = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
WAIT = 60.0


# =========================================================================== without services

# --------------------------------------------------------------------------- traceparent


@pytest.mark.parametrize(
    "value",
    [TP, TP.encode(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", TP[:-2] + "ff"],
)
def test_a_version_00_traceparent_passes_unchanged(value: str | bytes) -> None:
    text = value.decode() if isinstance(value, bytes) else value
    assert traceparent(value) == text


@pytest.mark.parametrize(
    "value",
    [
        TP.upper(),  # uppercase hex
        "00-4BF92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "01" + TP[2:],  # a version other than 00
        "ff" + TP[2:],
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # all-zero trace-id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",  # all-zero parent-id
        TP + "-extra",  # version 00 has exactly 4 fields
        TP[:-1],
        " " + TP,
        TP + "\n",
        "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        "",
        None,
        55,
        ["00"],
        b"\xff" * 55,
    ],
)
def test_anything_but_a_version_00_traceparent_is_dropped(value: object) -> None:
    assert traceparent(value) is None


# --------------------------------------------------------------------------- tracestate


@pytest.mark.parametrize(
    "value",
    [
        TS,
        "rojo=00f067aa0ba902b7",
        "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7",  # optional whitespace around members
        " congo=t61rcWkgMzE\t,\trojo=x ",
        "a=1,,b=2",  # empty members are allowed
        "a=1, ,b=2",
        "tenant@system=1,0digit-first_key*/x=v",  # level-2 keys: digits first, @, *, /
        "k= leading spaces stay part of the value",
        "k=!#$%&'()*+-./:;<>?@[]^_`{|}~",  # printable ASCII but , and =
        ",".join(f"k{i}=v" for i in range(32)),
        "k=" + "v" * 256,
        "k" * 256 + "=v",
        "a=" + "b" * 250 + "," + "c=" + "d" * 250,  # 505 characters
    ],
)
def test_a_w3c_tracestate_passes_unchanged(value: str) -> None:
    assert tracestate(value) == value
    assert tracestate(value.encode()) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        ",",
        " , ,",
        "Congo=1",  # uppercase key
        "_a=1",  # a key starts with a letter or a digit
        "a b=1",
        "a=1,b",  # a member without =
        "a=",  # an empty value
        "a=b=c",
        "a=1 ,b=2\n",
        "a=tab\tinside",
        "a=\x7f",
        "a=caf\u00e9",
        ",".join(f"k{i}=v" for i in range(33)),  # 33 members
        ",".join(["a=1"] * 16 + [""] * 17),  # 33 members, counting empty ones
        "k=" + "v" * 257,
        "k" * 257 + "=v",
        "a=" + "b" * 254 + "," + "c=" + "d" * 254,  # 513 characters
        b"a=\xff",
        None,
        42,
    ],
)
def test_anything_but_a_w3c_tracestate_is_dropped(value: object) -> None:
    assert tracestate(value) is None


def test_a_tracestate_counts_only_beside_a_valid_traceparent() -> None:
    both = {"HTTP_TRACEPARENT": TP, "HTTP_TRACESTATE": TS}
    assert trace_params(TP, TS) == both
    assert trace_params(TP, "Bad=1") == {"HTTP_TRACEPARENT": TP}
    assert trace_params(TP, None) == {"HTTP_TRACEPARENT": TP}
    assert trace_params(TP.upper(), TS) is None
    assert trace_params(None, TS) is None


def test_a_pathological_tracestate_is_refused_in_linear_time() -> None:
    for text in (" " * 511 + "=", "a=" + "b " * 127 + " " * 250 + "\x01", " ," * 255 + "="):
        started = time.perf_counter()
        for _ in range(20):
            assert tracestate(text) is None
        assert (time.perf_counter() - started) / 20 < 0.002


# --------------------------------------------------------------------------- delays


@pytest.mark.parametrize(
    ("value", "ms"),
    [(2000, 2000), (0, 0), ("2000", 2000), (b" 150 ", 150), (1500.7, 1500), (2**40, 2**40)],
)
def test_x_delay_is_a_number_of_milliseconds(value: object, ms: int) -> None:
    assert job_context.x_delay_ms(value) == ms


@pytest.mark.parametrize(
    # Negative: what the delayed-message exchange plugin leaves; 2**64 - 30000: the same,
    # decoded as unsigned by some clients.
    "value",
    [-2000, 2**64 - 30000, "soon", "-5", "1e3", "٣", True, None, [1], float("nan"), float("inf")],
)
def test_an_x_delay_that_is_no_number_of_milliseconds_is_ignored(value: object) -> None:
    assert job_context.x_delay_ms(value) is None


def test_a_delay_goes_through_the_smallest_level_that_covers_it() -> None:
    policy = RetryPolicy(retry_delay=1.0, retry_max_delay=300.0)
    assert policy.levels()[:3] == [1000, 2000, 4000]
    assert policy.delay_level(1) == 1000
    assert policy.delay_level(1000) == 1000
    assert policy.delay_level(1001) == 2000
    assert policy.delay_level(2000) == 2000
    assert policy.delay_level(299_000) == 300_000
    assert policy.delay_level(3_600_000) == 300_000  # capped at the largest level


# --------------------------------------------------------------------------- bundle lines


def head_of(*lines: str) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode() + b"\nZGF0YQ=="


@pytest.mark.parametrize("parse", [parse_bundle, parse_bundle_console])
def test_bundle_trace_and_delay_lines(parse: Callable[..., Job]) -> None:
    job = parse(head_of("dispatch_path: /a.php", f"traceparent: {TP}", f"tracestate: {TS}"), "/d")
    assert job.script == "/a.php" and job.delay_ms == 0
    assert job.params == {"HTTP_TRACEPARENT": TP, "HTTP_TRACESTATE": TS}
    job = parse(head_of("delay: 1.5", "dispatch_path: /a.php"), "/d")
    assert job.delay_ms == 1500 and job.params == {}
    job = parse(head_of("Delay: 30", f"TraceParent : {TP}\r"), "/d")  # any case, CR LF
    assert (job.script, job.delay_ms, job.params) == ("/d", 30_000, {"HTTP_TRACEPARENT": TP})


@pytest.mark.parametrize(
    "lines",
    [
        ("traceparent: 00-XYZ", f"tracestate: {TS}"),
        (f"traceparent: {TP.upper()}",),
        (f"traceparent: {TP}", f"traceparent: {TP}"),  # two parents: which one?
        (f"tracestate: {TS}",),  # a state without its parent
    ],
)
def test_invalid_bundle_trace_lines_are_dropped(lines: tuple[str, ...]) -> None:
    job = parse_bundle(head_of("dispatch_path: /srv/trace/a.php", *lines), "/d")
    assert job.params == {} and job.script == "/srv/trace/a.php"


def test_trace_lines_do_not_fill_the_header_block_cache() -> None:
    from fastworker import formats

    formats._TARGETS.clear()
    for n in range(300):
        parent = f"00-{n + 1:032x}-00f067aa0ba902b7-01"
        job = parse_bundle(head_of("dispatch_path: /a.php", f"traceparent: {parent}"), "/d")
        assert job.params == {"HTTP_TRACEPARENT": parent}
    assert list(formats._TARGETS) == [b"dispatch_path: /a.php"]


@pytest.mark.parametrize("delay", ["soon", "-1", "1,5", "1e3", "0x10"])
def test_a_delay_line_that_is_no_number_of_seconds_is_a_bad_message(delay: str) -> None:
    with pytest.raises(BadMessage, match="is not a number of seconds"):
        parse_bundle(head_of(f"delay: {delay}"), "/d")


def test_a_bad_line_beside_trace_lines_is_reported_at_its_own_line_number() -> None:
    with pytest.raises(BadMessage, match="header line 3 has no 'name: value' form"):
        parse_bundle(head_of(f"traceparent: {TP}", "dispatch_path: /a.php", "oops"), "/d")


def test_a_sidekiq_job_may_carry_a_whole_bundle_message_with_its_lines() -> None:
    job = parse_event_data(head_of("delay: 2", f"traceparent: {TP}"), "/d")
    assert (job.delay_ms, job.params) == (2000, {"HTTP_TRACEPARENT": TP})


# --------------------------------------------------------------------------- context builders


def blake(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=16).hexdigest()


def amqp(message: Message, job: Job | None = None) -> tuple[int, dict[str, str | bytes]]:
    job = job or Job("/a.php", None, b"data", {})
    return job_context.amqp_context(message, job), job.params


def test_a_plain_message_is_attempt_1_with_its_body_hash_as_id() -> None:
    delay, params = amqp(Message(b"body", "orders"))
    assert delay == 0
    assert params == {
        "FASTWORKER_JOB_ID": blake(b"body"),
        "FASTWORKER_QUEUE": "orders",
        "FASTWORKER_ATTEMPT": "1",
    }


def test_message_id_timestamp_attempts_and_trace_headers() -> None:
    stamp = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    message = Message(
        b"body",
        "orders",
        {"x-fastworker-attempts": 2, "traceparent": TP.encode(), "tracestate": TS},
        {"message_id": "order-42", "timestamp": stamp},
    )
    delay, params = amqp(message)
    assert delay == 0
    assert params == {
        "FASTWORKER_JOB_ID": "order-42",
        "FASTWORKER_FIRST_ENQUEUED": "1714979289",
        "FASTWORKER_QUEUE": "orders",
        "FASTWORKER_ATTEMPT": "3",
        "HTTP_TRACEPARENT": TP,
        "HTTP_TRACESTATE": TS,
    }
    assert job_context.job_id(message) == "order-42"
    assert job_context.trace_id(message) == TP[3:35]
    # An empty message_id names nothing: the body's hash stands in.
    assert amqp(Message(b"body", "q", {}, {"message_id": ""}))[1]["FASTWORKER_JOB_ID"] == blake(
        b"body"
    )


def test_a_header_trace_replaces_the_bundle_lines_and_an_invalid_one_does_not() -> None:
    other = "00-11111111111111111111111111111111-2222222222222222-01"
    lines = {"HTTP_TRACEPARENT": TP, "HTTP_TRACESTATE": TS}
    _, params = amqp(Message(b"b", "q", {"traceparent": other}), Job("/a", None, b"d", dict(lines)))
    assert params["HTTP_TRACEPARENT"] == other and "HTTP_TRACESTATE" not in params
    _, params = amqp(
        Message(b"b", "q", {"traceparent": "junk"}), Job("/a", None, b"d", dict(lines))
    )
    assert params["HTTP_TRACEPARENT"] == TP and params["HTTP_TRACESTATE"] == TS


def test_the_delay_asked_for_unless_it_was_served() -> None:
    assert amqp(Message(b"b", "q", {"x-delay": 2000}))[0] == 2000
    assert amqp(Message(b"b", "q", {"x-delay": "oops"}))[0] == 0
    delayed_line = parse_bundle(head_of("delay: 3"), "/d")
    assert amqp(Message(b"b", "q"), delayed_line)[0] == 3000
    assert amqp(Message(b"b", "q", {"x-delay": 500}), delayed_line)[0] == 500  # header first
    served = {"x-delay": 2000, "x-fastworker-delayed": 2000}
    delay, params = amqp(Message(b"b", "q", served), delayed_line)
    assert delay == 0 and params["FASTWORKER_ATTEMPT"] == "1"


def test_a_trace_id_for_log_lines_from_a_header_or_a_bundle_line() -> None:
    assert job_context.trace_id(Message(head_of(f"traceparent: {TP}"), "q")) == TP[3:35]
    assert job_context.trace_id(Message(head_of(f"traceparent: {TP.upper()}"), "q")) is None
    assert job_context.trace_id(Message(b"ZGF0YQ==", "q")) is None


def sidekiq_message(**fields: Any) -> Message:
    job = {"class": "DeferEvent", "args": ["ZGF0YQ=="], "queue": "q", "jid": "b1c2", **fields}
    return sidekiq_jobs.message_of(orjson.dumps(job), "q")


def test_a_sidekiq_job_context() -> None:
    message = sidekiq_message(created_at=1714979289.25, enqueued_at=1714979300.5)
    job = parse_event_data(message.body, "/d")
    assert sidekiq_jobs.context(message, job) == 0
    assert job.params == {
        "FASTWORKER_JOB_ID": "b1c2",
        "FASTWORKER_QUEUE": "q",
        "FASTWORKER_ATTEMPT": "1",
        "FASTWORKER_FIRST_ENQUEUED": "1714979289.25",
    }
    # Retried twice (retry_count 1); Sidekiq 8's millisecond stamps; a traceparent key.
    message = sidekiq_message(
        retry_count=1, created_at=1714979289250, traceparent=TP, tracestate="Bad"
    )
    job = parse_event_data(message.body, "/d")
    sidekiq_jobs.context(message, job)
    assert job.params["FASTWORKER_ATTEMPT"] == "3"
    assert job.params["FASTWORKER_FIRST_ENQUEUED"] == "1714979289.25"
    assert job.params["HTTP_TRACEPARENT"] == TP and "HTTP_TRACESTATE" not in job.params


def test_a_sidekiq_job_waits_once_for_its_bundle_delay() -> None:
    body = head_of("delay: 2").decode()
    message = sidekiq_message(args=[body])
    assert sidekiq_jobs.context(message, parse_event_data(message.body, "/d")) == 2000
    message = sidekiq_message(args=[body], fastworker_delayed=2000)
    assert sidekiq_jobs.context(message, parse_event_data(message.body, "/d")) == 0


# =========================================================================== with services


def context_runs(fpm: FpmServer) -> list[dict[str, Any]]:
    """Every run context.php recorded, in the order they were written."""
    lines = complete_lines(f"{fpm.record_file}.context")
    return [json.loads(line) for line in lines if line.strip()]


def runs_of(fpm: FpmServer, data: str | bytes) -> list[dict[str, Any]]:
    raw = data.encode() if isinstance(data, str) else data
    digest = hashlib.sha1(raw).hexdigest()
    return sorted((r for r in context_runs(fpm) if r["sha1"] == digest), key=lambda r: r["time"])


def wait_runs(fpm: FpmServer, data: str, n: int, timeout: float = WAIT) -> list[dict[str, Any]]:
    return wait_for(
        lambda: len(runs := runs_of(fpm, data)) >= n and runs,
        timeout=timeout,
        what=f"{n} runs of {data[:24]}...",
    )


def bundle(data: str, fpm: FpmServer, *lines: str, script: str = CONTEXT) -> bytes:
    """A bundle message for `script` on `fpm`, with extra header lines before the bundle's."""
    message = bundle_message(data, script, "127.0.0.1", fpm.address.rsplit(":", 1)[1])
    return "".join(f"{line}\n" for line in lines).encode() + message


def publish(
    url: str, queue: str, messages: Sequence[tuple[bytes, dict[str, Any], dict[str, Any]]]
) -> list[float]:
    """Publishes (body, headers, properties) messages with php-amqplib, as a PHP app does: no
    message_id unless given (aiormq would make one up). Returns when each publish began."""
    host, port = amqp_host_port(url)
    lines = "".join(
        json.dumps(
            {
                "body_base64": base64.b64encode(body).decode(),
                "headers": headers,
                "properties": props,
            }
        )
        + "\n"
        for body, headers, props in messages
    )
    done = subprocess.run(
        ["php", str(PHP_DIR / "publish_messages.php"), host, str(port), queue],
        input=lines,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [float(line) for line in done.stdout.split()]


def dlq_replay(url: str, queue: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastworker", "dlq", "replay", "--queue", queue, "--amqp-url", url],
        env=worker_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def worker(workers: Workers, rabbitmq_url: str, queue_name: str) -> Callable[..., Worker]:
    """`worker(fpm, *extra)`: a worker on `queue_name` running context.php, 3 attempts, 0.2 s
    first retry delay (extra args come after and win)."""

    def start(fpm: FpmServer, *extra: str) -> Worker:
        args = [
            "--amqp-url", rabbitmq_url, "--queue", queue_name, "--fpm", fpm.address,
            "--script", CONTEXT, "--allow-script", f"{PHP_DIR}/*.php", "--allow-script",
            IDEMPOTENT, "--max-attempts", "3", "--retry-delay", "0.2", "--stats-interval", "0",
            *extra,
        ]  # fmt: skip
        return workers.start(args, timeout=WAIT)

    return start


# --------------------------------------------------------------------------- AMQP


def test_each_attempt_sees_the_same_job_id_and_trace(
    rabbitmq_url: str, queue_name: str, fpm: FpmServer, worker: Callable[..., Worker]
) -> None:
    """The issue's done-when: a failing job, 3 attempts, one id, one traceparent; the JSON log
    lines of its failures carry both ids."""
    started = worker(fpm, "--log-format", "json")
    data = order_placed_data(1, f"FAIL UNTIL 3 {queue_name}")
    body = bundle(data, fpm)
    stamp = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    headers = {"traceparent": TP, "tracestate": TS}
    publish(rabbitmq_url, queue_name, [(body, headers, {"timestamp": int(stamp.timestamp())})])
    runs = wait_runs(fpm, data, 3)
    time.sleep(0.5)  # nothing more comes
    runs = runs_of(fpm, data)
    assert [r["FASTWORKER_ATTEMPT"] for r in runs] == ["1", "2", "3"]
    assert [r["failed"] for r in runs] == [True, True, False]
    for run in runs:
        assert run["FASTWORKER_JOB_ID"] == blake(body)
        assert run["FASTWORKER_QUEUE"] == queue_name
        assert run["FASTWORKER_FIRST_ENQUEUED"] == "1714979289"
        assert (run["HTTP_TRACEPARENT"], run["HTTP_TRACESTATE"]) == (TP, TS)
    assert amqp_queue_count(rabbitmq_url, f"{queue_name}.failed") == 0
    lines = [json.loads(line) for line in started.log().splitlines() if line.startswith("{")]
    failed = [line for line in lines if line.get("kind") == "php_error"]
    assert [line["attempt"] for line in failed] == [1, 2]
    assert {(line["job_id"], line["trace_id"]) for line in failed} == {(blake(body), TP[3:35])}


def test_the_job_id_survives_dead_lettering_and_dlq_replay(
    rabbitmq_url: str, queue_name: str, fpm: FpmServer, worker: Callable[..., Worker]
) -> None:
    worker(fpm, "--max-attempts", "2")
    named = order_placed_data(2, f"FAIL ALWAYS named {queue_name}")
    hashed = order_placed_data(3, f"FAIL ALWAYS hashed {queue_name}")
    hashed_body = bundle(hashed, fpm, f"traceparent: {TP}")
    publish(
        rabbitmq_url,
        queue_name,
        [
            (bundle(named, fpm), {"a": "b"}, {"message_id": "order-2"}),
            (hashed_body, {}, {}),
        ],
    )
    wait_for(
        lambda: amqp_queue_count(rabbitmq_url, f"{queue_name}.failed") == 2,
        timeout=WAIT,
        what="2 dead letters",
    )
    replayed = dlq_replay(rabbitmq_url, queue_name)
    assert replayed.returncode == 0, replayed.stderr
    wait_runs(fpm, named, 4)
    wait_runs(fpm, hashed, 4)
    for data, job_id in ((named, "order-2"), (hashed, blake(hashed_body))):
        runs = runs_of(fpm, data)
        assert [r["FASTWORKER_ATTEMPT"] for r in runs] == ["1", "2", "1", "2"]
        assert {r["FASTWORKER_JOB_ID"] for r in runs} == {job_id}
    assert {r["HTTP_TRACEPARENT"] for r in runs_of(fpm, hashed)} == {TP}
    assert {r["HTTP_TRACEPARENT"] for r in runs_of(fpm, named)} == {None}


def test_x_delay_makes_the_first_run_wait_and_is_no_attempt(
    rabbitmq_url: str, queue_name: str, fpm: FpmServer, worker: Callable[..., Worker]
) -> None:
    """The issue's done-when: 100 events published with x-delay 2000 run no earlier than 2 s
    after publishing, each as attempt 1."""
    worker(fpm, "--retry-delay", "0.5")  # levels 500, 1000, 2000, ...: 2000 is one
    datas = [order_placed_data(i, f"delayed {i} {queue_name}") for i in range(100)]
    delay = {"x-delay": 2000}  # an int in php-amqplib's AMQPTable
    published = publish(rabbitmq_url, queue_name, [(bundle(d, fpm), delay, {}) for d in datas])
    wait_for(lambda: all(runs_of(fpm, d) for d in datas), timeout=WAIT, what="100 delayed runs")
    time.sleep(0.5)
    for data, at in zip(datas, published, strict=True):
        (run,) = runs_of(fpm, data)
        assert run["time"] >= at + 2.0, f"ran {run['time'] - at:.3f} s after publishing"
        assert run["time"] < at + 2.0 + 20.0
        assert run["FASTWORKER_ATTEMPT"] == "1" and not run["failed"]
    assert amqp_queue_count(rabbitmq_url, delay_queue(queue_name, 2000)) == 0
    assert amqp_queue_count(rabbitmq_url, queue_name) == 0


def test_bundle_delay_and_trace_lines_last_through_retries(
    rabbitmq_url: str, queue_name: str, fpm: FpmServer, worker: Callable[..., Worker]
) -> None:
    worker(fpm)
    data = order_placed_data(4, f"FAIL UNTIL 3 lines {queue_name}")
    body = bundle(data, fpm, "delay: 1.5", f"traceparent: {TP}", f"tracestate: {TS}")
    (at,) = publish(rabbitmq_url, queue_name, [(body, {}, {})])
    runs = wait_runs(fpm, data, 3)
    assert runs[0]["time"] >= at + 1.5
    assert [r["FASTWORKER_ATTEMPT"] for r in runs] == ["1", "2", "3"]
    for run in runs:
        assert run["FASTWORKER_JOB_ID"] == blake(body)
        assert (run["HTTP_TRACEPARENT"], run["HTTP_TRACESTATE"]) == (TP, TS)
        assert run["FASTWORKER_FIRST_ENQUEUED"] is None  # no timestamp property: not known


def test_invalid_trace_context_is_dropped_never_passed_on(
    rabbitmq_url: str, queue_name: str, fpm: FpmServer, worker: Callable[..., Worker]
) -> None:
    worker(fpm)
    cases = [  # (bundle lines, AMQP headers, expected HTTP_TRACEPARENT, HTTP_TRACESTATE)
        (("traceparent: 00-not-a-trace-01", f"tracestate: {TS}"), {}, None, None),
        ((), {"traceparent": TP.upper(), "tracestate": TS}, None, None),
        ((), {"traceparent": TP, "tracestate": "Bad Key=1"}, TP, None),
        ((), {"tracestate": TS}, None, None),
        ((), {"traceparent": 12345}, None, None),
        ((f"traceparent: {TP}",), {"traceparent": "00-junk"}, TP, None),  # the line stays
    ]
    messages, datas = [], []
    for n, (lines, headers, _, _) in enumerate(cases):
        datas.append(order_placed_data(10 + n, f"trace case {n} {queue_name}"))
        messages.append((bundle(datas[-1], fpm, *lines), headers, {}))
    publish(rabbitmq_url, queue_name, messages)
    for data, (_, _, parent, state) in zip(datas, cases, strict=True):
        (run,) = wait_runs(fpm, data, 1)
        assert (run["HTTP_TRACEPARENT"], run["HTTP_TRACESTATE"]) == (parent, state)


def test_the_idempotent_example_does_a_job_once_however_often_it_runs(
    rabbitmq_url: str,
    queue_name: str,
    fpm_factory: Callable[..., FpmServer],
    worker: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    log, done = tmp_path / "orders.log", tmp_path / "done"
    server = fpm_factory(
        env={"FASTWORKER_DEMO_LOG": str(log), "FASTWORKER_DEMO_DONE_DIR": str(done)}
    )
    worker(server, "--script", IDEMPOTENT)
    first = bundle(order_placed_data(7, "seven"), server, script=IDEMPOTENT)
    again = bundle(order_placed_data(7, "seven, published again"), server, script=IDEMPOTENT)
    other = bundle(order_placed_data(8, "eight"), server, script=IDEMPOTENT)
    publish(
        rabbitmq_url,
        queue_name,
        [
            (first, {}, {}),
            (first, {}, {}),  # the same body: the same id
            (again, {}, {"message_id": "order-7"}),
            (again, {}, {"message_id": "order-7"}),  # the same message_id
            (other, {}, {}),
        ],
    )
    wait_for(
        lambda: server.log_text().count("already done") == 2,
        timeout=WAIT,
        what="both repeats skipped",
    )
    time.sleep(1.0)
    lines = log.read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == ["7", "7", "8"]
    assert server.log_text().count("already done") == 2
    assert len([p for p in done.iterdir() if p.suffix != ".lock"]) == 3  # one marker per id


# --------------------------------------------------------------------------- Sidekiq


def sidekiq_args(url: str, queue: str, fpm: FpmServer, *extra: str) -> list[str]:
    return [
        "--backend", "sidekiq", "--redis-url", url, "--queue", queue, "--fpm", fpm.address,
        "--script", CONTEXT, "--allow-script", f"{PHP_DIR}/*.php", "--stats-interval", "0",
        "--max-attempts", "3", "--retry-delay", "0.2", *extra,
    ]  # fmt: skip


def test_a_sidekiq_job_gets_its_jid_attempt_and_delay(
    sidekiq_url: str, fpm: FpmServer, workers: Workers
) -> None:
    r = redis.Redis.from_url(sidekiq_url)
    data = order_placed_data(20, "FAIL UNTIL 3 sidekiq")
    assert sidekiq_push(sidekiq_url, "ctx", [data]) == 1
    pushed = orjson.loads(r.lindex("queue:ctx", 0))
    # A whole bundle message in args[0], with a delay line, and a traceparent key in the job.
    delayed_data = order_placed_data(21, "delayed sidekiq")
    delayed = {
        "class": "DeferEvent",
        "queue": "ctx",
        "args": [bundle(delayed_data, fpm, "delay: 1.5").decode()],
        "jid": "d00d" * 6,
        "retry": True,
        "created_at": time.time(),
        "enqueued_at": time.time(),
        "traceparent": TP,
    }
    pushed_at = time.time()
    r.lpush("queue:ctx", orjson.dumps(delayed))
    workers.start(sidekiq_args(sidekiq_url, "ctx", fpm), timeout=WAIT)
    runs = wait_runs(fpm, data, 3)
    assert [run["FASTWORKER_ATTEMPT"] for run in runs] == ["1", "2", "3"]
    for run in runs:
        assert run["FASTWORKER_JOB_ID"] == pushed["jid"]
        assert run["FASTWORKER_QUEUE"] == "ctx"
        assert float(run["FASTWORKER_FIRST_ENQUEUED"]) == pytest.approx(pushed["created_at"])
    (run,) = wait_runs(fpm, delayed_data, 1)
    assert run["time"] >= pushed_at + 1.5
    assert run["FASTWORKER_JOB_ID"] == delayed["jid"] and run["FASTWORKER_ATTEMPT"] == "1"
    assert run["HTTP_TRACEPARENT"] == TP
    api = wait_for(
        lambda: (a := sidekiq_api(sidekiq_url, "ctx"))["processed"] >= 5 and a,
        timeout=WAIT,
        what="every run settled",  # 3 runs, the delayed job's wait, its run
    )
    # The delay is no failure: only the first job's 2 failed runs count.
    assert api["failed"] == 2 and api["dead"] == [] and api["scheduled"] == 0
    r.close()
