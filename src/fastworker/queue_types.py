"""`--queue-type classic|quorum`: how the queues fastworker declares are declared, and what a
quorum queue's `x-delivery-count` header means to the worker.

Why quorum queues: a classic queue lives on one node, so stopping that node stops its jobs (and
loses those that were not persistent). A quorum queue is replicated over the cluster (Raft) and
survives the loss of a minority of its nodes. Quorum queues must be durable, and RabbitMQ
refuses to redeclare a queue with another type, so an existing queue is always used as it is
(`broker.ensure_queue`): `--queue-type` applies only to the queues the worker declares because
they are missing (the work queue, `<queue>.failed`, and the `<queue>.retry.<ms>ms` delay queues).

What was checked on RabbitMQ 3.10 (tests/test_cluster.py): a quorum delay queue honours both its
`x-message-ttl` and a message's own `expiration`, whichever is shorter, expires at its head as a
classic queue does, and dead-letters the expired message back to the work queue. Dead-lettering
out of a quorum queue is at-most-once by default: if the work queue cannot take the message at
that moment (its leader is being elected after a node loss), the message is dropped. So delay
queues are declared with `x-dead-letter-strategy: at-least-once`, which keeps the message in the
delay queue until the work queue has confirmed it (RabbitMQ requires `x-overflow:
reject-publish` for that; no length limit is set, so it never rejects anything). A retry may
then arrive twice after a node loss, never not at all.

`x-delivery-count`: a quorum queue counts the deliveries of each message that were not acked
(a consumer's connection lost with the message unacked, a requeue) and sends the count with a
redelivery. fastworker does not count these as failed attempts: a worker that crashed, or lost
its node, while a job ran is not the job's fault, and the job's own attempts travel in
`x-fastworker-attempts`. It logs a warning when a message comes back often (see `redelivered`),
because a job that keeps killing its worker looks like that; to cap it, set a `delivery-limit`
policy on the queue (RabbitMQ then dead-letters the message itself).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("fastworker.consumer")

CLASSIC = "classic"
QUORUM = "quorum"
QUEUE_TYPES = (CLASSIC, QUORUM)
DELIVERY_COUNT = "x-delivery-count"  # a quorum queue's count of earlier, unacked deliveries
# A redelivery that has been delivered this often without being settled is logged as a warning.
REDELIVERY_WARNING = 5


def check(queue_type: str) -> str:
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"unknown --queue-type {queue_type!r}; choose classic or quorum")
    return queue_type


def declare_as(
    queue_type: str, durable: bool, arguments: dict[str, Any] | None = None
) -> tuple[bool, dict[str, Any] | None]:
    """The `durable` flag and arguments to declare a missing queue with: a quorum queue is
    always durable and says its type."""
    if check(queue_type) == CLASSIC:
        return durable, arguments
    return True, {**(arguments or {}), "x-queue-type": QUORUM}


def delay_arguments(queue_type: str, ttl_ms: int, back_to: str) -> dict[str, Any]:
    """A delay queue's arguments: its messages expire after `ttl_ms` (or their own
    expiration, if shorter) and are dead-lettered back to the queue `back_to`; on a quorum
    queue at-least-once (see the module's text)."""
    arguments: dict[str, Any] = {
        "x-message-ttl": ttl_ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": back_to,
    }
    if check(queue_type) == QUORUM:
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    return arguments


def delivery_count(headers: dict[str, Any] | None, redelivered: bool) -> int:
    """How often a message was delivered before without being settled, by its quorum queue's
    count; 0 for a first delivery. The header is read only on a redelivery: a retry or dead
    letter republishes the message's headers, so a copy may carry an old count."""
    if not redelivered or not headers:
        return 0
    value = headers.get(DELIVERY_COUNT)
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(0, value)


def redelivered(queue: str, headers: dict[str, Any] | None) -> None:
    """Called by the transports for a delivery flagged `redelivered` (rare: never on the hot
    path): logs a warning when its quorum queue counts REDELIVERY_WARNING deliveries or more."""
    count = delivery_count(headers, True)
    if count >= REDELIVERY_WARNING:
        log.warning(
            "a message from %s was delivered %d times before without being settled: do "
            "workers crash or lose the broker while it runs? (not counted as failed attempts; "
            "a delivery-limit policy on the queue caps it)",
            queue,
            count,
        )


__all__ = [
    "CLASSIC",
    "DELIVERY_COUNT",
    "QUEUE_TYPES",
    "QUORUM",
    "check",
    "declare_as",
    "delay_arguments",
    "delivery_count",
    "redelivered",
]
