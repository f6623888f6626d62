"""The one bridge from the callback form of the core layers to a coroutine.

The pool and the executor answer through a callback, `answer(value, None)` or
`answer(None, exception)`, called exactly once: the hot path then needs no task and no future
per job. Callers that would rather await (tools, the tests) wrap a call with `awaited`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# A core layer's answer: (value, None) on success, (None, exception) otherwise.
Answer = Callable[[T | None, BaseException | None], None]


async def awaited(start: Callable[..., None], *args: Any) -> Any:
    """`start(*args, answer)`, awaited: returns the value, or raises the exception."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def answer(value: Any, exc: BaseException | None) -> None:
        if future.done():
            return  # the caller was cancelled
        if exc is None:
            future.set_result(value)
        else:
            future.set_exception(exc)

    start(*args, answer)
    return await future
