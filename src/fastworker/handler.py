"""The consumers' job handler: message -> job -> FastCGI request -> outcome -> settle.

Settling is: ack (the job succeeded, or its retry or dead letter was confirmed), retry, or dead
letter. Whatever goes wrong inside fastworker while a job runs (a bug, not the job's fault)
becomes the outcome `internal` with its traceback, retried and dead-lettered like any failed
attempt: a message never cycles through the queue because of an exception of ours.
"""

from __future__ import annotations

import logging
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastworker.broker import PublishFailed
from fastworker.console_executor import ConsoleExecutor
from fastworker.executor import Executor
from fastworker.formats import Parser
from fastworker.job import BadMessage, Job
from fastworker.job_context import Context, amqp_context
from fastworker.message import Message, NotStarted
from fastworker.outcome import OK, Kind, Result

log = logging.getLogger("fastworker.handler")

# `JobHandler.start`'s callback: None when the message may be acked, else what is left to
# await, which returns when the message may be acked and raises when it may not.
OnDone = Callable[[Awaitable[None] | None], None]


class Failures(Protocol):
    """What a backend does with a job that did not succeed, or must wait before its first run
    (failures.FailureHandler for AMQP, sidekiq_failures.SidekiqFailures): `publisher` is what
    its transport hands over with each delivery to write with. Each method returns once the
    retry, dead letter or delayed message is stored, and raises PublishFailed when it was not."""

    counts: Counter[str]  # "<kind> retried|dead-lettered|requeued" -> n

    async def handle(self, message: Message, result: Result, publisher: Any) -> None: ...

    async def dead_letter_internal(
        self, message: Message, result: Result, publisher: Any
    ) -> None: ...

    async def delay(self, message: Message, ms: int, publisher: Any) -> None:
        """Stores `message` to come back after about `ms` milliseconds, marked as having
        waited, so that it then runs; not an attempt."""
        ...


class JobHandler:
    """Runs each message's job and settles it; the consumer acks or requeues as told.

    What is left to await raises only NotStarted (the worker is stopping: requeue the message
    as it was) and PublishFailed (the broker did not confirm a retry or dead letter: do not ack).
    """

    def __init__(
        self,
        parse: Parser,
        default_script: str,
        executor: Executor | ConsoleExecutor,
        failures: Failures,
        max_message_size: int,
        context: Context = amqp_context,
    ) -> None:
        self.parse = parse
        self.default_script = default_script
        self.executor = executor
        self.failures = failures
        self.max_message_size = max_message_size
        # The backend's job context (job_context.py): FASTWORKER_* and trace params, and the
        # delay a message asks for before its first run.
        self.context = context

    def start(self, message: Message, publisher: Any, on_done: OnDone) -> None:
        """Starts `message`'s job; `on_done` is called exactly once, without a coroutine in the
        common case: `on_done(None)` once the message may be acked (the job succeeded), or
        `on_done(awaitable)` with what is left to do (a failed job's retry or dead letter, or
        the delayed message a message asking to wait becomes)."""
        answered = False

        def done(result: Result | None, exc: BaseException | None) -> None:
            nonlocal answered
            answered = True
            if result is OK:
                on_done(None)
            elif isinstance(exc, NotStarted):
                on_done(_raise(exc))
            else:
                if result is None:
                    result = internal_error(message, exc or RuntimeError("no outcome"))
                on_done(None if result.ok else self._settle(message, result, publisher))

        try:
            job = self._job(message)
            if isinstance(job, Result):
                done(job, None)
                return
            delay = self.context(message, job)
            if delay:
                answered = True
                on_done(self._delay(message, delay, publisher))
            else:
                self.executor.start(job, done)
        except Exception as exc:
            if answered:
                raise  # from the consumer's own on_done: not the job's outcome
            done(internal_error(message, exc), None)

    async def _settle(self, message: Message, result: Result, publisher: Any) -> None:
        """Retry or dead letter; a bug on that path still ends in a dead letter, not a loop."""
        try:
            await self.failures.handle(message, result, publisher)
        except PublishFailed:
            raise
        except Exception as exc:
            await self.failures.dead_letter_internal(
                message, internal_error(message, exc), publisher
            )

    async def _delay(self, message: Message, ms: int, publisher: Any) -> None:
        """The message waits before its first run; a bug on that path ends in a dead letter."""
        try:
            await self.failures.delay(message, ms, publisher)
        except PublishFailed:
            raise
        except Exception as exc:
            await self.failures.dead_letter_internal(
                message, internal_error(message, exc), publisher
            )

    def _job(self, message: Message) -> Job | Result:
        if message.problem:
            return Result(Kind.BAD_MESSAGE, message=message.problem)
        size = len(message.body)
        if size > self.max_message_size:
            return Result(
                Kind.BAD_MESSAGE,
                message=f"message of {size} bytes exceeds --max-message-size "
                f"{self.max_message_size}",
            )
        try:
            return self.parse(
                message.body, self.default_script, message.properties, message.headers
            )
        except BadMessage as exc:
            return Result(exc.kind, message=str(exc))


def internal_error(message: Message, exc: BaseException) -> Result:
    """The outcome of an exception of fastworker's own while it handled `message`."""
    log.error(
        "job from %s: internal error %s: %s", message.queue, type(exc).__name__, exc, exc_info=exc
    )
    text = "".join(traceback.format_exception(exc))
    return Result(Kind.INTERNAL, message=f"{type(exc).__name__}: {exc}"[:1000], traceback=text)


async def _raise(exc: BaseException) -> None:
    raise exc
