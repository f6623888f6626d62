"""What happens to a Sidekiq job that did not succeed, the way Sidekiq itself does it, so that
Sidekiq's API and web UI read fastworker's failures as their own.

A failed run puts the job into sorted set `retry`, scored by when it runs again, with Sidekiq's
fields: `retry_count` (0 after the first failure), `error_message`, `error_class`, `failed_at`,
`retried_at`. When its runs are used up (the job's own `retry`: a number of retries, or false for
none; else --max-attempts) it goes to sorted set `dead` instead. The delays are the AMQP
backend's (--retry-delay doubled per retry up to --retry-max-delay, with jitter). A job that did
not run for trouble that is not its own (FPM unreachable) waits in `schedule` without counting a
run; a job that can never run (bad_message, not_allowed) goes to `dead` at once. A job whose
bundle message asks for a `delay:` waits in `schedule` for exactly that long, counted neither
as a run nor as failed. The same protocol as `failures.FailureHandler`: `handle`,
`dead_letter_internal`, `delay`, `counts`.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from typing import Any

import orjson

from fastworker import sidekiq_jobs as jobs
from fastworker.failures import (
    JITTER,
    RetryPolicy,
    Tally,
    error_json,
    log_fields,
    worker_identity,
)
from fastworker.message import Message
from fastworker.outcome import INFRASTRUCTURE, REFUSED, Result
from fastworker.sidekiq_store import SidekiqStore

log = logging.getLogger("fastworker.failures")


class SidekiqFailures(Tally):
    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.worker = worker_identity()
        self.counts: Counter[str] = Counter()  # "<kind> retried|dead-lettered|requeued" -> n
        self.outcomes: dict[tuple[str, str, str], int] = {}  # (queue, outcome, kind) -> n

    def _error(self, job: dict[str, Any], result: Result, attempts: int, now: float) -> Any:
        """The AMQP dead letter's error record (kind, status, stderr, endpoint, ...)."""
        first = job.get("failed_at")
        first_failure = first if isinstance(first, int | float) else now
        queue = job.get("queue")
        queue = queue if isinstance(queue, str) else ""
        return orjson.loads(error_json(result, attempts, queue, first_failure, now, self.worker))

    async def handle(self, message: Message, result: Result, store: SidekiqStore) -> None:
        """Writes the job to `retry`, `schedule` or `dead`; returns once Redis has it (raises
        PublishFailed if not: the job then stays in progress and comes back)."""
        job = dict(message.headers)
        job.setdefault("queue", message.queue)
        now = time.time()
        if result.kind in INFRASTRUCTURE:
            infra = job.get(jobs.INFRA_RETRIES)
            infra = infra + 1 if isinstance(infra, int) and infra >= 0 else 1
            job[jobs.INFRA_RETRIES] = infra
            at = now + self._delay(infra)
            if not await store.add_failed("schedule", at, jobs.encode(job), message.receipt):
                return _gone(message)
            self.tally(message.queue, result.kind, "requeue")
            log.warning(
                "job %s from %s not run (%s); back to the queue after a delay",
                job.get("jid"),
                message.queue,
                result.message,
                extra=log_fields(message, result, 0),
            )
            return
        attempts = jobs.failed_attempts(job) + 1
        error = self._error(job, result, attempts, now)
        record = jobs.failed(job, result, error, now)
        runs = 1 if result.kind in REFUSED else jobs.max_runs(job, self.policy.max_attempts)
        if attempts < runs:
            delay = self._delay(attempts)
            if not await store.add_failed(
                "retry", now + delay, jobs.encode(record), message.receipt
            ):
                return _gone(message)
            self.tally(message.queue, result.kind, "retry")
            log.warning(
                "job %s from %s failed (%s%s): %s; attempt %d of %d, retry in %.1f s",
                job.get("jid"),
                message.queue,
                result.kind,
                f" {result.status}" if result.status else "",
                result.message,
                attempts,
                runs,
                delay,
                extra=log_fields(message, result, attempts),
            )
            return
        if not await store.kill(jobs.encode(record), message.receipt):
            return _gone(message)
        self.tally(message.queue, result.kind, "dead_letter")
        log.error(
            "job %s from %s moved to Sidekiq's dead set (%s%s): %s; attempts %d",
            job.get("jid"),
            message.queue,
            result.kind,
            f" {result.status}" if result.status else "",
            result.message,
            attempts,
            extra=log_fields(message, result, attempts),
        )

    async def dead_letter_internal(
        self, message: Message, result: Result, store: SidekiqStore
    ) -> None:
        """The plainest way to `dead` when handling a failure went wrong in fastworker: the
        job's own fields and the error, nothing computed from what may have broken."""
        now = time.time()
        job = {k: v for k, v in message.headers.items() if k not in jobs.FAILURE_FIELDS}
        job.setdefault("queue", message.queue)
        job.update(
            error_message=result.message[: jobs.ERROR_MESSAGE_LIMIT],
            error_class=jobs.error_class(result),
            failed_at=now,
            retry_count=0,
        )
        job[jobs.ERROR] = orjson.loads(error_json(result, 0, message.queue, now, now, self.worker))
        if not await store.kill(jobs.encode(job), message.receipt):
            return _gone(message)
        self.tally(message.queue, result.kind, "dead_letter")
        log.error(
            "job %s from %s moved to Sidekiq's dead set (%s): %s",
            job.get("jid"),
            message.queue,
            result.kind,
            result.message,
            extra=log_fields(message, result, 0),
        )

    async def delay(self, message: Message, ms: int, store: SidekiqStore) -> None:
        """Puts a job that asks to wait before its first run into `schedule`, due in `ms`, marked
        (jobs.DELAYED) so that it then runs; returns once Redis has it."""
        job = dict(message.headers)
        job.setdefault("queue", message.queue)
        job[jobs.DELAYED] = ms
        if not await store.schedule(time.time() + ms / 1000, jobs.encode(job), message.receipt):
            return _gone(message)
        self.counts["delayed"] += 1
        log.debug(
            "job %s from %s waits %.1f s in Sidekiq's schedule before its first run",
            job.get("jid"),
            message.queue,
            ms / 1000,
            extra={"queue": message.queue, "job_id": job.get("jid")},
        )

    def _delay(self, retry: int) -> float:
        return self.policy.delay_ms(retry) / 1000 * random.uniform(1 - JITTER, 1.0)


def _gone(message: Message) -> None:
    """The job was no longer in this process's in-progress list when its outcome was to be
    written: this process was taken for gone (its heartbeat expired) and the job went back to
    its queue, where it runs again. Writing the outcome too would make two of it."""
    log.warning(
        "job %s from %s had gone back to its queue (this worker was taken for gone); its "
        "outcome here is dropped, the job runs again",
        message.headers.get("jid"),
        message.queue,
    )
