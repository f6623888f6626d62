"""`--route balance`: every job goes to whichever healthy FPM endpoint has the fewest jobs in
flight, whatever its message names.

An endpoint that cannot be connected to (refused, timed out) is ejected: its job is sent at
once to another endpoint, without counting an attempt (the job did not run), and the endpoint
gets no jobs until its backoff has passed (EJECT_FIRST seconds, doubled per failure up to
EJECT_MAX). Then the next job probes it: a connection that opens brings it back, a failure ejects
it again for longer. Only when every endpoint is ejected does a job fail, as `unavailable`,
which returns it to the queue after a delay without counting an attempt: it is never
dead-lettered for that. A job that started on an endpoint that then died is `lost` like on any
endpoint (it may have run), and its retry goes wherever the balance says.

A `Balancer` has the pool's `request` signature, so the executor hands it jobs as it would to
one pool.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from fastworker.endpoint import Endpoint
from fastworker.fpm import FpmConnectFailed, FpmPool, FpmUnavailable, ResponseCallback

log = logging.getLogger("fastworker.fpm")

EJECT_FIRST = 1.0  # seconds an endpoint that refused a connection gets no jobs
EJECT_MAX = 30.0


class _Member:
    """One endpoint's pool and its standing in the balance."""

    __slots__ = ("pool", "in_flight", "ejected_until", "backoff")

    def __init__(self, pool: FpmPool) -> None:
        self.pool = pool
        self.in_flight = 0
        self.ejected_until = 0.0  # loop time; 0: in the balance
        self.backoff = 0.0  # the last ejection's length; 0 after a connection that worked


class Balancer:
    def __init__(self, pools: Sequence[FpmPool]) -> None:
        if not pools:
            raise ValueError("--route balance needs at least one --fpm endpoint")
        self.members = [_Member(pool) for pool in pools]
        self.loop = pools[0].loop
        # The endpoint whose answer is being handed to a callback right now, for the caller
        # to name it (callbacks run synchronously, so no other answer can interleave).
        self.answering: Endpoint | None = None

    def request(
        self,
        params: Mapping[str | bytes, str | bytes],
        stdin: bytes,
        timeout: float,
        shared: bytes,
        callback: ResponseCallback,
        tried: tuple[_Member, ...] = (),
    ) -> None:
        """`FpmPool.request` on the least busy healthy endpoint not `tried` for this job yet,
        moving on while endpoints refuse connections."""
        member = self._pick(tried)
        if member is None:
            names = ", ".join(str(m.pool.endpoint) for m in self.members)
            callback(None, FpmUnavailable(f"every FPM endpoint refuses connections ({names})"))
            return
        member.in_flight += 1

        def answered(response: object, exc: BaseException | None) -> None:
            member.in_flight -= 1
            if isinstance(exc, FpmConnectFailed):
                self._eject(member, exc)
                self.request(params, stdin, timeout, shared, callback, (*tried, member))
                return
            if member.backoff and exc is None:
                log.warning("%s is back in the balance", member.pool.endpoint)
                member.backoff = 0.0
            self.answering = member.pool.endpoint
            try:
                callback(response, exc)  # type: ignore[arg-type]
            finally:
                self.answering = None

        member.pool.request(params, stdin, timeout, shared, answered)

    def _pick(self, tried: tuple[_Member, ...]) -> _Member | None:
        """The healthy endpoint with the fewest jobs in flight, not tried for this job yet;
        one whose ejection has run out counts as healthy (the job probes it)."""
        now = self.loop.time()
        best = None
        for member in self.members:
            if member in tried or member.ejected_until > now:
                continue
            if best is None or member.in_flight < best.in_flight:
                best = member
        return best

    def _eject(self, member: _Member, exc: BaseException) -> None:
        now = self.loop.time()
        if member.ejected_until > now:
            return  # already out: a request that was on its way there
        member.backoff = min(EJECT_MAX, member.backoff * 2 if member.backoff else EJECT_FIRST)
        member.ejected_until = now + member.backoff
        log.warning(
            "%s ejected from the balance for %.0f s: %s; its jobs go to the other endpoints",
            member.pool.endpoint,
            member.backoff,
            exc,
        )

    def healthy(self) -> list[FpmPool]:
        now = self.loop.time()
        return [m.pool for m in self.members if m.ejected_until <= now]
