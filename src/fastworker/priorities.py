"""Deliveries waiting to start, highest priority first: a prefetched backlog must not make an
urgent job wait behind it.

`Prioritized` has the deque methods the consumer skeleton uses (`extend`, `popleft`, `clear`,
`len`, iteration). A delivery's priority is its message's AMQP `priority` property, else a
`priority:` line in a bundle message's header block, capped at --max-priority; within one
priority, deliveries keep their order. Without --max-priority the skeleton keeps its plain
deque and pays nothing for this.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from fastworker.message import Message

_BUNDLE_LINE = b"priority:"


def priority_of(message: Message, highest: int) -> int:
    """The message's priority, 0..highest."""
    value = message.properties.get("priority")
    if value is None:
        value = _bundle_priority(message.body)
    try:
        number = int(value or 0)
    except (TypeError, ValueError):
        return 0
    return min(max(number, 0), highest)


def _bundle_priority(body: bytes) -> bytes | None:
    """The value of a `priority:` line in a bundle message's header block, if it has one."""
    head_end = body.find(b"\n\n")
    if head_end <= 0:
        return None
    head = body[:head_end]
    at = head.find(_BUNDLE_LINE)
    if at < 0 or (at > 0 and head[at - 1 : at] != b"\n"):
        return None
    line_end = head.find(b"\n", at)
    return head[at + len(_BUNDLE_LINE) : line_end if line_end >= 0 else len(head)].strip()


class Prioritized:
    """One FIFO per priority; `popleft` takes from the highest that holds something."""

    def __init__(self, highest: int) -> None:
        self.highest = highest
        self._queues: list[deque[Any]] = [deque() for _ in range(highest + 1)]
        self._size = 0

    def extend(self, deliveries: Iterable[Any]) -> None:
        queues, highest = self._queues, self.highest
        for delivery in deliveries:
            queues[priority_of(delivery[2], highest)].append(delivery)
            self._size += 1

    def popleft(self) -> Any:
        for queue in reversed(self._queues):
            if queue:
                self._size -= 1
                return queue.popleft()
        raise IndexError("pop from an empty Prioritized")

    def clear(self) -> None:
        for queue in self._queues:
            queue.clear()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[Any]:
        for queue in reversed(self._queues):
            yield from queue
