"""Sidekiq's job format, both ways: a job from a queue list as a Message, and a failed job as
the record Sidekiq's own API and web UI read from the `retry` and `dead` sorted sets.

A Sidekiq job is the JSON object the Sidekiq client LPUSHes onto list `queue:<name>`:
`{"class": "DeferEvent", "args": [data], "queue": ..., "jid": ..., "retry": true, ...}`. For the
deferred-event bundle, `args[0]` is what its dispatch script receives as DEFERRED_DATA. The
Message's body is that text and its `headers` the whole job object, which the failure path
writes back with Sidekiq's failure fields; nothing downstream needs to know it came from Redis.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections.abc import Collection
from typing import Any

import orjson

from fastworker.job import Job
from fastworker.job_context import (
    ATTEMPT,
    FIRST_ENQUEUED,
    JOB_ID,
    QUEUE,
    TRACEPARENT,
    TRACESTATE,
    body_id,
    set_trace,
    unix_time,
)
from fastworker.message import Message
from fastworker.outcome import Result

DEFAULT_CLASSES = ("DeferEvent",)
# Fields of Sidekiq's failure record (Sidekiq::JobRetry), and fastworker's own beside them.
FAILURE_FIELDS = ("retry_count", "error_message", "error_class", "failed_at", "retried_at")
ERROR = "fastworker_error"  # the same error record as an AMQP dead letter's x-fastworker-error
INFRA_RETRIES = "fastworker_infra_retries"  # returns for infrastructure trouble, not counted
DELAYED = "fastworker_delayed"  # the job waited its delay (ms) in `schedule`: it runs now
MALFORMED_CLASS = "FastWorker::MalformedJob"  # the class of a job that was not a JSON object
MILLISECONDS = 1e11  # a job timestamp above this is in ms (year 5138 in seconds)
ERROR_MESSAGE_LIMIT = 1024  # characters of error_message: Sidekiq's UI shows it in a table cell

_PHP_EXCEPTION = re.compile(r"Uncaught ([A-Za-z_\\][\w\\]*)")


def queue_key(queue: str) -> str:
    return f"queue:{queue}"


def message_of(raw: bytes, queue: str, classes: Collection[str] = DEFAULT_CLASSES) -> Message:
    """A job as taken from `queue:<queue>`. Whatever is wrong with it is the message's
    `problem` (dead-lettered as bad_message), and `headers` is then a job object Sidekiq can
    still read, carrying the original text."""
    try:
        job = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _malformed(raw, queue, f"Sidekiq job is not JSON: {exc}")
    if not isinstance(job, dict):
        return _malformed(raw, queue, f"Sidekiq job is a JSON {type(job).__name__}, not an object")
    problem = _problem(job, classes)
    if problem:
        return Message(b"", queue, job, _properties(job), False, problem)
    return Message(job["args"][0].encode(), queue, job, _properties(job))


def _problem(job: dict[str, Any], classes: Collection[str]) -> str:
    cls = job.get("class")
    if cls not in classes:
        wanted = ", ".join(repr(c) for c in classes)
        return f"Sidekiq job class {cls!r} is not one this worker runs ({wanted}; --sidekiq-class)"
    args = job.get("args")
    if not isinstance(args, list) or not args:
        return "Sidekiq job has no args: the event data must be args[0]"
    if not isinstance(args[0], str):
        return f"Sidekiq job's args[0] is a JSON {type(args[0]).__name__}, not the event data text"
    return ""


def _properties(job: dict[str, Any]) -> dict[str, Any]:
    jid = job.get("jid")
    return {"message_id": jid} if isinstance(jid, str) else {}


def _malformed(raw: bytes, queue: str, problem: str) -> Message:
    """A job object standing for text that was none, so the dead set stays readable by
    Sidekiq (its API parses every entry as JSON): the original text is its args[0], and its
    bytes in base64 when they are not UTF-8."""
    text = raw.decode("utf-8", "replace")
    job: dict[str, Any] = {
        "class": MALFORMED_CLASS,
        "args": [text],
        "queue": queue,
        "jid": new_jid(),
        "retry": False,
    }
    if text.encode() != raw:
        job["fastworker_raw_base64"] = base64.b64encode(raw).decode()
    return Message(b"", queue, job, {}, False, problem)


def context(message: Message, job: Job) -> int:
    """The job context of a Sidekiq job (see job_context): its jid, 1 + its failed runs, its
    queue, its created_at (else enqueued_at), and a `traceparent` / `tracestate` key of the
    job object like the AMQP headers. The delay is the one of a bundle `delay:` line in
    args[0], unless the job already waited in `schedule`."""
    params = job.params
    record = message.headers
    params[JOB_ID] = message.properties.get("message_id") or body_id(message.body)
    params[QUEUE] = message.queue
    params[ATTEMPT] = str(failed_attempts(record) + 1)
    created = record.get("created_at")
    if created is None:
        created = record.get("enqueued_at")
    if isinstance(created, int | float) and created > MILLISECONDS:
        created = created / 1000  # Sidekiq 8 writes epoch milliseconds
    first = unix_time(created)
    if first is not None:
        params[FIRST_ENQUEUED] = first
    if TRACEPARENT in record:
        set_trace(params, record.get(TRACEPARENT), record.get(TRACESTATE))
    if record.get(DELAYED):
        return 0
    return job.delay_ms


def new_jid() -> str:
    """A job id as Sidekiq makes them: 12 random bytes in hex."""
    return secrets.token_hex(12)


def failed_attempts(job: dict[str, Any]) -> int:
    """Failed runs so far: Sidekiq sets retry_count 0 at the first failure."""
    count = job.get("retry_count")
    return count + 1 if isinstance(count, int) and count >= 0 else 0


def max_runs(job: dict[str, Any], max_attempts: int) -> int:
    """Runs the job may have: its own `retry` (a number of retries, or false: none) when set,
    else --max-attempts."""
    retry = job.get("retry", True)
    if retry is False:
        return 1
    if isinstance(retry, int) and not isinstance(retry, bool):
        return max(0, retry) + 1
    return max_attempts


def error_class(result: Result) -> str:
    """PHP's exception class when PHP names one ("Uncaught RuntimeException: ..."), else the
    kind of failure, in Sidekiq's Module::Class style."""
    match = _PHP_EXCEPTION.search(result.message)
    if match is None and result.stderr:
        match = _PHP_EXCEPTION.search(result.stderr.decode("utf-8", "replace"))
    if match:
        return match.group(1)
    return "FastWorker::" + "".join(part.title() for part in str(result.kind).split("_"))


def failed(
    job: dict[str, Any], result: Result, error: dict[str, Any], now: float
) -> dict[str, Any]:
    """The job with Sidekiq's failure fields for one more failed run."""
    record = dict(job)
    if failed_attempts(job):
        record["retry_count"] = job["retry_count"] + 1
        record["retried_at"] = now
    else:
        record["retry_count"] = 0
        record["failed_at"] = now
    message = result.message or str(result.kind)
    record["error_message"] = message[:ERROR_MESSAGE_LIMIT]
    record["error_class"] = error_class(result)
    record[ERROR] = error
    return record


def encode(job: dict[str, Any]) -> bytes:
    return orjson.dumps(job)


def replayable(job: dict[str, Any]) -> dict[str, Any]:
    """A dead job as it goes back to its queue: the failure fields gone, so it gets its runs
    anew, and `enqueued_at` now."""
    fresh = {
        k: v
        for k, v in job.items()
        if k not in FAILURE_FIELDS and k not in (ERROR, INFRA_RETRIES, "error_backtrace")
    }
    fresh["enqueued_at"] = time.time()
    return fresh
