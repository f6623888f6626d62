"""Decides which acks to send, so many finished deliveries cost one `multiple=True` ack.

A multiple ack covers every outstanding tag up to the one it names, so it is only safe over a run
of finished deliveries at the front of the channel's outstanding list; a finished delivery behind a
slow one is acked on its own instead. With many jobs in flight they finish out of order all the
time, and most of those gaps close soon (a PHP child that was not scheduled for a few ms gets its
turn): `take(now, hold)` keeps such a delivery pending for up to `hold` seconds and acks it alone
only if it is still behind a gap then, so single acks (each one work for the broker) stay rare.
Every tag is acked exactly once (a second ack of a tag is a channel error in RabbitMQ). Sans-IO:
the consumer sends what `take()` returns.
"""

from __future__ import annotations

from collections import deque


class AckTracker:
    __slots__ = ("_outstanding", "_finished", "_held")

    def __init__(self) -> None:
        self._outstanding: deque[int] = deque()  # delivered, not yet acked, in delivery order
        self._finished: set[int] = set()  # finished, ack not yet sent
        self._held: dict[int, float] = {}  # finished behind a gap: since when (a subset)

    def delivered(self, tag: int) -> None:
        self._outstanding.append(tag)

    def finished(self, tag: int) -> None:
        self._finished.add(tag)

    def discard(self, tag: int) -> None:
        """Forgets a delivery that is being rejected instead of acked."""
        self._finished.discard(tag)
        self._held.pop(tag, None)
        try:
            self._outstanding.remove(tag)
        except ValueError:
            pass

    @property
    def outstanding(self) -> int:
        """Delivered and not acked (finished or not): what the broker counts against the
        prefetch window."""
        return len(self._outstanding)

    @property
    def pending(self) -> int:
        """Finished deliveries not yet acked nor held behind a gap: what a flush would send."""
        return len(self._finished) - len(self._held)

    @property
    def unacked(self) -> int:
        """Finished deliveries whose ack has not been sent, held ones included."""
        return len(self._finished)

    def take(self, now: float = 0.0, hold: float = 0.0) -> list[tuple[int, bool]]:
        """The acks to send now, as (delivery_tag, multiple).

        A finished delivery behind an unfinished one is acked alone once it has been held
        behind it for `hold` seconds (0: at once; `now` is the caller's clock).
        """
        if not self._finished:
            return []
        outstanding, finished = self._outstanding, self._finished
        acks: list[tuple[int, bool]] = []
        last = 0
        while outstanding and outstanding[0] in finished:
            last = outstanding.popleft()
            finished.discard(last)
        if last:
            acks.append((last, True))
        held = self._held
        if finished:
            if hold > 0:
                due = {tag for tag in finished if now - held.setdefault(tag, now) >= hold}
            else:
                due = set(finished)
            if due:
                acks.extend((tag, False) for tag in sorted(due))
                finished -= due
                self._outstanding = deque(tag for tag in outstanding if tag not in due)
        if held and len(held) != len(finished):
            self._held = {tag: since for tag, since in held.items() if tag in finished}
        return acks
