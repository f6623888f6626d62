"""message -> job -> FastCGI request -> result -> (returns: ack) | retry | dead letter."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastworker.broker import Publisher
from fastworker.executor import OK, Executor, Result
from fastworker.failures import FailureHandler
from fastworker.formats import Parser
from fastworker.job import BadMessage, Job
from fastworker.message import Message

# `JobPipeline.start`'s callback: None when the message may be acked, else what is left to await.
OnDone = Callable[[Awaitable[None] | None], None]


class JobPipeline:
    """The consumer's handler: returns when the message may be acked, raises when it may not."""

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
        result = await self.run(message)
        if not result.ok:
            await self.failures.handle(message, result, publisher)

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
        job = self._job(message)
        if type(job) is Result:
            self._finish(message, publisher, on_done, job)
            return

        def done(result: Result | Exception) -> None:
            if result is OK:
                on_done(None)
            else:
                self._finish(message, publisher, on_done, result)

        self.executor.start(job, done)  # type: ignore[arg-type]

    def _finish(
        self, message: Message, publisher: Publisher, on_done: OnDone, result: Result | Exception
    ) -> None:
        if isinstance(result, Exception):
            on_done(_raise(result))
        elif result.ok:
            on_done(None)
        else:
            on_done(self.failures.handle(message, result, publisher))

    def _job(self, message: Message) -> Job | Result:
        size = len(message.body)
        if size > self.max_message_size:
            return Result(
                "bad_message",
                message=f"message of {size} bytes exceeds --max-message-size "
                f"{self.max_message_size}",
            )
        try:
            return self.parse(message.body, self.default_script, message.properties)
        except BadMessage as exc:
            return Result(exc.kind, message=str(exc))


async def _raise(exc: Exception) -> None:
    raise exc
