"""message -> job -> FastCGI request -> result -> (returns: ack) | retry | dead letter.

Whatever goes wrong inside fastworker while a job runs (a bug, not the job's fault) becomes the
outcome `internal` with its traceback, which is retried and dead-lettered like any failed attempt:
a message never cycles through the queue because of an exception of ours.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable

from fastworker.broker import Publisher, PublishFailed
from fastworker.executor import OK, Executor, Result
from fastworker.failures import FailureHandler
from fastworker.formats import Parser
from fastworker.job import BadMessage, Job
from fastworker.message import Message, NotStarted

log = logging.getLogger("fastworker.pipeline")

# `JobPipeline.start`'s callback: None when the message may be acked, else what is left to await.
OnDone = Callable[[Awaitable[None] | None], None]


class JobPipeline:
    """The consumer's handler: returns when the message may be acked, raises when it may not.

    It raises only NotStarted (the worker is stopping: requeue the message as it was) and
    PublishFailed (the broker did not confirm a retry or dead letter: do not ack).
    """

    def __init__(
        self,
        parse: Parser,
        default_script: str,
        executor: Executor,
        failures: FailureHandler,
        max_message_size: int,
    ) -> None:
        self.parse = parse
        self.default_script = default_script
        self.executor = executor
        self.failures = failures
        self.max_message_size = max_message_size

    async def __call__(self, message: Message, publisher: Publisher) -> None:
        try:
            result = await self.run(message)
        except NotStarted:
            raise
        except Exception as exc:
            result = internal_error(message, exc)
        if not result.ok:
            await self._settle(message, result, publisher)

    async def run(self, message: Message) -> Result:
        job = self._job(message)
        if type(job) is Result:
            return job
        return await self.executor.run(job)  # type: ignore[arg-type]

    def start(self, message: Message, publisher: Publisher, on_done: OnDone) -> None:
        """`__call__` without a coroutine in the common case, for consumers that can use it.

        Calls `on_done(None)` once the message may be acked (the job succeeded), or
        `on_done(awaitable)` with what is left to do, which the consumer awaits like
        `__call__`: returns when the message may be acked, raises when it may not. A job
        that failed needs that, to publish its retry or dead letter.
        """
        answered = False

        def done(result: Result | Exception) -> None:
            nonlocal answered
            answered = True
            if result is OK:
                on_done(None)
            else:
                self._finish(message, publisher, on_done, result)

        try:
            job = self._job(message)
            if type(job) is Result:
                done(job)
                return
            self.executor.start(job, done)  # type: ignore[arg-type]
        except Exception as exc:
            if answered:
                raise  # from the consumer's own on_done: not the job's outcome
            done(internal_error(message, exc))

    def _finish(
        self, message: Message, publisher: Publisher, on_done: OnDone, result: Result | Exception
    ) -> None:
        if isinstance(result, NotStarted):
            on_done(_raise(result))
            return
        if isinstance(result, Exception):
            result = internal_error(message, result)
        if result.ok:
            on_done(None)
        else:
            on_done(self._settle(message, result, publisher))

    async def _settle(self, message: Message, result: Result, publisher: Publisher) -> None:
        """Retry or dead letter; a bug on that path still ends in a dead letter, not a loop."""
        try:
            await self.failures.handle(message, result, publisher)
        except PublishFailed:
            raise
        except Exception as exc:
            result = internal_error(message, exc)
            await self.failures.dead_letter_internal(message, result, publisher)

    def _job(self, message: Message) -> Job | Result:
        if message.problem:
            return Result("bad_message", message=message.problem)
        size = len(message.body)
        if size > self.max_message_size:
            return Result(
                "bad_message",
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
        "job from %s: internal error %s: %s",
        message.queue,
        type(exc).__name__,
        exc,
        exc_info=exc,
    )
    text = "".join(traceback.format_exception(exc))
    return Result(
        "internal", message=f"{type(exc).__name__}: {exc}"[:1000], traceback=text
    )


async def _raise(exc: Exception) -> None:
    raise exc
