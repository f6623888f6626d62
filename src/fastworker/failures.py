"""What happens to a job that did not succeed: a delayed retry, or a dead letter with its error.

Retries wait in the broker, not in worker memory: a failed message is republished to a delay
queue `<queue>.retry.<ms>ms` whose TTL dead-letters it back to `<queue>`, carrying its attempt
count in a header, so retries survive worker restarts. Each delay level has its own queue because
RabbitMQ expires messages only at a queue's head: within one level, TTLs differ only by jitter.
Every republish is confirmed by the broker before the original is acked, so a crash in between
can duplicate a message, never lose one.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
from aiormq.abc import AbstractConnection
from pamqp.commands import Basic

from fastworker import __version__, queue_types
from fastworker.broker import Publisher, ensure_queue
from fastworker.job_context import ATTEMPTS, DELAYED, job_id, trace_id
from fastworker.message import Message
from fastworker.outcome import INFRASTRUCTURE, REFUSED, Result

log = logging.getLogger("fastworker.failures")

# ATTEMPTS (failed attempts so far) is job_context's: PHP's FASTWORKER_ATTEMPT is 1 + it.
INFRA_RETRIES = "x-fastworker-infra-retries"  # returns for infrastructure trouble, not counted
FIRST_FAILURE = "x-fastworker-first-failure"  # unix time as text, e.g. "1718000000.25"
ERROR = "x-fastworker-error"  # JSON text: the dead letter's error
ERROR_KIND = "x-fastworker-error-kind"
ORIGINAL_QUEUE = "x-fastworker-queue"
INTERNAL_HEADERS = (ATTEMPTS, INFRA_RETRIES, FIRST_FAILURE, ERROR, ERROR_KIND, ORIGINAL_QUEUE)
# DELAYED (job_context) is not among them: `dlq replay` keeps it, so a replayed job whose
# delay was served runs at once.

JITTER = 0.2  # a retry waits between (1 - JITTER) and 1 times its level's delay
# What a dead letter's error may carry, in characters of JSON text. Headers travel in one AMQP
# frame; past the broker's frame_max it closes the connection, and the job would loop. So the
# whole x-fastworker-error header stays under about 8 KB, each excerpt within its own share.
MESSAGE_LIMIT = 1024
STDERR_LIMIT = 4 * 1024
STDOUT_LIMIT = 1024
TRACEBACK_LIMIT = 4 * 1024
ERROR_LIMIT = 8 * 1024 + 1024  # bytes of the whole header, room for the fields beside them


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    retry_delay: float = 1.0
    retry_max_delay: float = 300.0
    dead_letter_queue: str = "{queue}.failed"

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("--max-attempts must be at least 1")
        if self.retry_delay <= 0 or self.retry_max_delay < self.retry_delay:
            raise ValueError("need 0 < --retry-delay <= --retry-max-delay")

    def delay_ms(self, retry: int) -> int:
        """The delay level before retry number `retry` (1-based): exponential, capped."""
        exponent = min(retry - 1, 40)
        return max(1, round(min(self.retry_delay * 2**exponent, self.retry_max_delay) * 1000))

    def delay_level(self, ms: int) -> int:
        """The delay queue level a message asking to wait `ms` goes through: the smallest level
        of at least `ms`, or the largest level when `ms` is longer than all of them."""
        levels = self.levels()
        return next((level for level in levels if level >= ms), levels[-1])

    def levels(self) -> list[int]:
        levels, retry = [], 1
        while True:
            ms = self.delay_ms(retry)
            if ms in levels:
                return levels
            levels.append(ms)
            retry += 1

    def dead_letter_queue_for(self, queue: str) -> str:
        return self.dead_letter_queue.format(queue=queue)


def delay_queue(queue: str, ms: int) -> str:
    return f"{queue}.retry.{ms}ms"


def _int_header(headers: dict[str, Any], name: str) -> int:
    value = headers.get(name)
    try:
        return max(0, int(value)) if value is not None else 0
    except (TypeError, ValueError):
        return 0


def _time_header(headers: dict[str, Any], name: str) -> float | None:
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def excerpt(text: str | bytes, limit: int) -> str:
    """At most about `limit` characters of `text`: its start and its end, saying how much was
    cut between them (a PHP error names its cause first, a traceback its place last)."""
    size = len(text)
    if size > limit:
        unit = "bytes" if isinstance(text, bytes) else "characters"
        keep = max(0, limit - 48)
        head, tail = keep * 3 // 4, keep - keep * 3 // 4
        parts = [text[:head], f" [... {size - keep} {unit} cut ...] ", text[size - tail :]]
    else:
        parts = [text]
    return "".join(p.decode("utf-8", "replace") if isinstance(p, bytes) else p for p in parts)


def error_json(
    result: Result,
    attempts: int,
    queue: str,
    first_failure: float,
    now: float,
    worker: dict[str, Any],
) -> str:
    """A dead letter's error record as JSON text of at most ERROR_LIMIT bytes, whatever PHP
    printed (the x-fastworker-error header; the Sidekiq backend's fastworker_error field)."""
    share = 1.0
    while True:
        error = {
            "kind": result.kind,
            "message": excerpt(result.message, int(MESSAGE_LIMIT * share)),
            "status": result.status or None,
            "stderr": excerpt(result.stderr, int(STDERR_LIMIT * share)),
            "stdout_head": excerpt(result.stdout_head, int(STDOUT_LIMIT * share)),
            "endpoint": result.endpoint or None,
            "attempts": attempts,
            "queue": queue,
            "first_failure": first_failure,
            "last_failure": now,
            "worker": worker,
        }
        if result.traceback:
            error["traceback"] = excerpt(result.traceback, int(TRACEBACK_LIMIT * share))
        encoded = orjson.dumps(error)
        # Multi-byte characters and escaped control characters can make the JSON longer
        # than the excerpts' character counts: cut deeper until it fits.
        if len(encoded) <= ERROR_LIMIT or share < 0.01:
            return encoded.decode()
        share /= 2


def worker_identity() -> dict[str, Any]:
    """Which worker wrote a failure record."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "version": __version__}


# Outcomes of a failed job as the metrics name them, and as the progress line says them.
OUTCOME_WORDS = {"requeue": "requeued", "retry": "retried", "dead_letter": "dead-lettered"}


def log_fields(message: Message, result: Result, attempts: int) -> dict[str, Any]:
    """A failure's fields for the JSON log (`logs.JOB_FIELDS`)."""
    return {
        "queue": message.queue,
        "kind": str(result.kind),
        "status": result.status or None,
        "attempt": attempts or None,
        "endpoint": result.endpoint or None,
        "job_id": job_id(message),
        "trace_id": trace_id(message),
    }


class Tally:
    """The failure handlers' counts, for the progress line (`counts`) and the metrics
    (`outcomes`); both set them up in __init__."""

    counts: Counter[str]
    outcomes: dict[tuple[str, str, str], int]

    def tally(self, queue: str, kind: str, outcome: str) -> None:
        self.counts[f"{kind} {OUTCOME_WORDS[outcome]}"] += 1
        key = (queue, outcome, str(kind))
        self.outcomes[key] = self.outcomes.get(key, 0) + 1


class FailureHandler(Tally):
    """Retries or dead-letters a failed message, per the outcome's kind and the policy."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.worker = worker_identity()
        self.counts: Counter[str] = Counter()  # "<kind> retried|dead-lettered|requeued" -> n
        self.outcomes: dict[tuple[str, str, str], int] = {}  # (queue, outcome, kind) -> n

    # --queue-type: how `prepare` declares the queues that are missing (queue_types).
    queue_type: str = queue_types.CLASSIC

    async def prepare(self, connection: AbstractConnection, queue: str) -> None:
        """Declares `<queue>.failed` and the delay queues, as `queue_type` queues, when they
        are missing; idempotent."""
        dead_letters = self.policy.dead_letter_queue_for(queue)
        kind = self.queue_type
        await ensure_queue(connection, dead_letters, durable=True, queue_type=kind)
        levels = self.policy.levels()
        log.info(
            "%s: failed jobs retry through %s.retry.{%s}ms, then go to %s",
            queue,
            queue,
            ",".join(map(str, levels)),
            dead_letters,
        )
        for ms in levels:
            await ensure_queue(
                connection,
                delay_queue(queue, ms),
                durable=True,
                arguments=queue_types.delay_arguments(kind, ms, queue),
                queue_type=kind,
            )

    async def handle(self, message: Message, result: Result, publisher: Publisher) -> None:
        """Publishes the retry or dead letter; returns once the broker confirmed it."""
        headers = dict(message.headers)
        now = time.time()
        first_failure = _time_header(headers, FIRST_FAILURE) or now
        # Written as text: pamqp encodes a Python float in a header table as a 32-bit float,
        # whose resolution at today's unix times is 128 s.
        headers[FIRST_FAILURE] = repr(first_failure)
        headers[ORIGINAL_QUEUE] = message.queue
        attempts = _int_header(headers, ATTEMPTS)
        if result.kind in INFRASTRUCTURE:
            infra = _int_header(headers, INFRA_RETRIES) + 1
            headers[INFRA_RETRIES] = infra
            await self._retry(message, headers, infra, publisher)
            self.tally(message.queue, result.kind, "requeue")
            log.warning(
                "job from %s not run (%s); back to the queue after a delay",
                message.queue,
                result.message,
                extra=log_fields(message, result, attempts),
            )
            return
        if result.kind not in REFUSED:
            attempts += 1
            headers[ATTEMPTS] = attempts
            if attempts < self.policy.max_attempts:
                ms = await self._retry(message, headers, attempts, publisher)
                self.tally(message.queue, result.kind, "retry")
                log.warning(
                    "job from %s failed (%s%s): %s; attempt %d of %d, retry in %.1f s",
                    message.queue,
                    result.kind,
                    f" {result.status}" if result.status else "",
                    result.message,
                    attempts,
                    self.policy.max_attempts,
                    ms / 1000,
                    extra=log_fields(message, result, attempts),
                )
                return
        headers[ERROR_KIND] = result.kind
        headers[ERROR] = self._error_json(result, attempts, message.queue, first_failure, now)
        dead_letters = self.policy.dead_letter_queue_for(message.queue)
        await publisher.publish(dead_letters, message.body, self._properties(message, headers))
        self.tally(message.queue, result.kind, "dead_letter")
        log.error(
            "job from %s dead-lettered to %s (%s%s): %s; attempts %d",
            message.queue,
            dead_letters,
            result.kind,
            f" {result.status}" if result.status else "",
            result.message,
            attempts,
            extra=log_fields(message, result, attempts),
        )

    def _error_json(
        self, result: Result, attempts: int, queue: str, first_failure: float, now: float
    ) -> str:
        return error_json(result, attempts, queue, first_failure, now, self.worker)

    async def dead_letter_internal(
        self, message: Message, result: Result, publisher: Publisher
    ) -> None:
        """Dead-letters `message` when handling its failure went wrong in fastworker itself.

        The plainest path: the original body, and headers of our own only (the message's own
        headers and properties may be what broke the normal path).
        """
        now = time.time()
        headers: dict[str, Any] = {
            ERROR_KIND: result.kind,
            ORIGINAL_QUEUE: message.queue,
            ERROR: self._error_json(result, 0, message.queue, now, now),
        }
        dead_letters = self.policy.dead_letter_queue_for(message.queue)
        await publisher.publish(
            dead_letters,
            message.body,
            Basic.Properties(headers=headers, delivery_mode=2, message_id=job_id(message)),
        )
        self.tally(message.queue, result.kind, "dead_letter")
        log.error(
            "job from %s dead-lettered to %s (%s): %s",
            message.queue,
            dead_letters,
            result.kind,
            result.message,
            extra=log_fields(message, result, 0),
        )

    async def delay(self, message: Message, ms: int, publisher: Publisher) -> None:
        """Publishes a message that asks to wait before its first run (x-delay, a bundle
        `delay:` line) to the delay queue of `policy.delay_level(ms)`. It expires after `ms`
        (or the level, if shorter) and comes back to its queue marked with the DELAYED header,
        so it then runs, as attempt 1. Returns once the broker confirmed it."""
        level = self.policy.delay_level(ms)
        headers = dict(message.headers)
        headers[DELAYED] = ms
        props = self._properties(message, headers)
        # No jitter: a job must not run before the time it asked for.
        props.expiration = str(max(1, min(ms, level)))
        await publisher.publish(delay_queue(message.queue, level), message.body, props)
        self.counts["delayed"] += 1
        log.debug(
            "job from %s waits %.1f s before its first run (delay queue %s)",
            message.queue,
            min(ms, level) / 1000,
            delay_queue(message.queue, level),
            extra={"queue": message.queue, "job_id": job_id(message)},
        )

    async def _retry(
        self, message: Message, headers: dict[str, Any], retry: int, publisher: Publisher
    ) -> int:
        ms = self.policy.delay_ms(retry)
        props = self._properties(message, headers)
        props.expiration = str(max(1, int(ms * random.uniform(1 - JITTER, 1.0))))
        await publisher.publish(delay_queue(message.queue, ms), message.body, props)
        return ms

    @staticmethod
    def _properties(message: Message, headers: dict[str, Any]) -> Basic.Properties:
        # user_id is dropped: RabbitMQ refuses (and closes the channel on) a user_id that is not
        # the publishing connection's user, and the worker's user is rarely the producer's.
        dropped = ("expiration", "delivery_mode", "user_id")
        kept = {k: v for k, v in message.properties.items() if k not in dropped}
        if not kept.get("message_id"):
            # aiormq gives a message without one a random message_id; the id PHP got as
            # FASTWORKER_JOB_ID keeps it the same on every attempt and replay.
            kept["message_id"] = job_id(message)
        return Basic.Properties(**kept, headers=headers, delivery_mode=2)
