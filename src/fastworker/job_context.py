"""What PHP is told about the delivery it runs, and whether the message waits before its first run.

Every attempt's request carries the job context as FastCGI params (PHP reads them in $_SERVER):
FASTWORKER_JOB_ID, the same on every attempt and replay (the AMQP message_id, else a hash of
the body, which retries, dead letters and replays then carry as their message_id);
FASTWORKER_ATTEMPT, 1-based;
FASTWORKER_QUEUE; FASTWORKER_FIRST_ENQUEUED where the message says when it was first
published; and HTTP_TRACEPARENT / HTTP_TRACESTATE when it carries a valid W3C trace context.

A `Context` fills them into a parsed Job's params (the job's own dict: nothing is copied) and
returns the milliseconds to wait before the first run, 0 to run now. There is one per backend:
`amqp_context` here, `sidekiq_jobs.context` for Sidekiq's jobs. It runs once per message on the
hot path, so the common message (no properties, no headers) costs a hash and three dict stores.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fastworker.job import Job
from fastworker.message import Message
from fastworker.trace_context import TRACESTATE_PARAM, trace_params, traceparent

JOB_ID = "FASTWORKER_JOB_ID"
ATTEMPT = "FASTWORKER_ATTEMPT"
QUEUE = "FASTWORKER_QUEUE"
FIRST_ENQUEUED = "FASTWORKER_FIRST_ENQUEUED"

# AMQP headers. The worker writes the x-fastworker-* ones (failures.py), the publisher the rest.
ATTEMPTS = "x-fastworker-attempts"  # failed attempts so far
DELAYED = "x-fastworker-delayed"  # the message waited its delay (ms): it runs when it is back
X_DELAY = "x-delay"  # ms to wait before the first run
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_FIRST = "1"
# An empty BLAKE2b-128 state: copying it and feeding the body costs ~120 ns less per message
# than hashlib.blake2b(body, digest_size=16), whose keyword arguments are slow to parse.
_BLAKE2B_128 = hashlib.blake2b(digest_size=16)

# (message, parsed job) -> ms to wait before the first run; fills the job's context params.
Context = Callable[[Message, Job], int]


def body_id(body: bytes) -> str:
    """A message's id when it names none: 128 bits of BLAKE2b of its body, in hex (about 0.7 us
    for a 600-byte bundle message; stable across workers and restarts, unlike hash())."""
    digest = _BLAKE2B_128.copy()
    digest.update(body)
    return digest.hexdigest()


def job_id(message: Message) -> str:
    """FASTWORKER_JOB_ID of a message, as `amqp_context` sets it (for log lines)."""
    given = message.properties.get("message_id") if message.properties else None
    return given or body_id(message.body)


def trace_id(message: Message) -> str | None:
    """The trace id (32 hex) of a message's valid traceparent, its header (or Sidekiq job key)
    else its bundle line, for log lines; None when it has none."""
    headers = message.headers
    parent = traceparent(headers.get(TRACEPARENT)) if headers else None
    if parent is None:
        head_end = message.body.find(b"\n\n")
        head = message.body[:head_end] if head_end > 0 else b""
        for line in head.split(b"\n") if b"traceparent" in head.lower() else ():
            name, sep, value = line.partition(b":")
            if sep and name.strip().lower() == b"traceparent":
                parent = traceparent(value.strip())
                break
    return parent[3:35] if parent else None


def amqp_context(message: Message, job: Job) -> int:
    """The job context of an AMQP delivery; the delay its x-delay header (else its bundle
    `delay:` line) asks for, unless it already waited (the x-fastworker-delayed header)."""
    params = job.params
    properties = message.properties
    if properties:
        params[JOB_ID] = properties.get("message_id") or body_id(message.body)
        stamp = properties.get("timestamp")
        if stamp is not None:
            text = unix_time(stamp)
            if text is not None:
                params[FIRST_ENQUEUED] = text
    else:  # body_id(), inlined: this is every bundle message's path
        digest = _BLAKE2B_128.copy()
        digest.update(message.body)
        params[JOB_ID] = digest.hexdigest()
    params[QUEUE] = message.queue
    headers = message.headers
    if not headers:
        params[ATTEMPT] = _FIRST
        return job.delay_ms
    params[ATTEMPT] = str(count(headers.get(ATTEMPTS)) + 1)
    if TRACEPARENT in headers:
        set_trace(params, headers.get(TRACEPARENT), headers.get(TRACESTATE))
    if DELAYED in headers:
        return 0
    if X_DELAY in headers:
        ms = x_delay_ms(headers[X_DELAY])
        if ms is not None:
            return ms
    return job.delay_ms


def set_trace(params: dict[str, str | bytes], parent: object, state: object) -> None:
    """A valid traceparent (with its tracestate) replaces the one of the bundle lines; an
    invalid one changes nothing."""
    trace = trace_params(parent, state)
    if trace is not None:
        params.pop(TRACESTATE_PARAM, None)
        params.update(trace)


def count(value: Any) -> int:
    """A counter header's value (an int as the worker writes it); 0 when absent or odd."""
    try:
        return max(0, int(value)) if value is not None else 0
    except (TypeError, ValueError, OverflowError):
        return 0


def x_delay_ms(value: Any) -> int | None:
    """The ms of an x-delay header: an integer (or integer text) >= 0; None for anything else.

    Negative values are what RabbitMQ's delayed-message exchange plugin leaves on a message it
    delayed: ignored, like a value that some clients decode from it as an unsigned 64-bit int.
    """
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit() or not value.isascii():
            return None
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not 0 <= value < 2**63:
        return None
    return int(value)


def unix_time(value: Any) -> str | None:
    """FASTWORKER_FIRST_ENQUEUED's text: unix seconds, with a fraction where the source has one
    (an AMQP timestamp is whole seconds; Sidekiq's created_at is a float)."""
    if isinstance(value, datetime):
        if value.tzinfo is None:  # AMQP timestamps are UTC
            value = value.replace(tzinfo=UTC)
        return str(int(value.timestamp()))
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        return repr(value)
    return str(value)
