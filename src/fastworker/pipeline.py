"""message -> job -> FastCGI request -> result -> (returns: ack) | retry | dead letter."""

from __future__ import annotations

from fastworker.broker import Publisher
from fastworker.executor import Executor, Result
from fastworker.failures import FailureHandler
from fastworker.formats import Parser
from fastworker.job import BadMessage
from fastworker.message import Message


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
        size = len(message.body)
        if size > self.max_message_size:
            return Result(
                "bad_message",
                message=f"message of {size} bytes exceeds --max-message-size "
                f"{self.max_message_size}",
            )
        try:
            job = self.parse(message.body, self.default_script, message.properties)
        except BadMessage as exc:
            return Result(exc.kind, message=str(exc))
        return await self.executor.run(job)
