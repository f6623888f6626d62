"""Decides which acks to send, so many finished deliveries cost one `multiple=True` ack.

A multiple ack covers every outstanding tag up to the one it names, so it is only safe over a run
of finished deliveries at the front of the channel's outstanding list; a finished delivery behind a
slow one is acked on its own instead. With many jobs in flight they finish out of order all the
time, and most of those gaps close within moments: `take(hold=True)` keeps such a delivery for one
more round and acks it alone only if it is still behind a gap then, so single acks (each one work
for the broker) stay rare. Every tag is acked exactly once (a second ack of a tag is a channel
error in RabbitMQ). Sans-IO: the consumer sends what `take()` returns.
"""

from __future__ import annotations

from collections import deque


class AckTracker:
    __slots__ = ("_outstanding", "_finished", "_held")

    def __init__(self) -> None:
        self._outstanding: deque[int] = deque()  # delivered, not yet acked, in delivery order
        self._finished: set[int] = set()  # finished, ack not yet sent
        self._held: set[int] = set()  # finished behind a gap at the last take(hold=True)

    def delivered(self, tag: int) -> None:
        self._outstanding.append(tag)

    def finished(self, tag: int) -> None:
        self._finished.add(tag)

    def discard(self, tag: int) -> None:
        """Forgets a delivery that is being rejected instead of acked."""
        self._finished.discard(tag)
        self._held.discard(tag)
        try:
            self._outstanding.remove(tag)
        except ValueError:
            pass

    @property
    def pending(self) -> int:
        return len(self._finished)

    def take(self, hold: bool = False) -> list[tuple[int, bool]]:
        """The acks to send now, as (delivery_tag, multiple).

        With `hold`, a finished delivery behind an unfinished one is acked alone only if it
        was already held at the previous `take(hold=True)`; until then it stays pending.
        """
        if not self._finished:
            self._held = set()
            return []
        outstanding, finished = self._outstanding, self._finished
        acks: list[tuple[int, bool]] = []
        last = 0
        while outstanding and outstanding[0] in finished:
            last = outstanding.popleft()
            finished.discard(last)
        if last:
            acks.append((last, True))
        if finished:
            if hold:
                due = finished & self._held
                self._held = finished - due
            else:
                due, self._held = set(finished), set()
            if due:
                acks.extend((tag, False) for tag in sorted(due))
                finished -= due
                self._outstanding = deque(tag for tag in outstanding if tag not in due)
        else:
            self._held = set()
        return acks
