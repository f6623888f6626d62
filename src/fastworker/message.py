"""A delivered message as the job pipeline sees it, whatever broker client received it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# AMQP basic properties by pamqp's attribute names (`message_type` is AMQP's `type`).
PROPERTY_NAMES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "message_type",
    "user_id",
    "app_id",
)


class NotStarted(Exception):
    """A handler gives the message back unrun (the worker is stopping): requeue it as it was."""


@dataclass(slots=True)
class Message:
    body: bytes
    queue: str
    headers: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)  # content_type, message_id, ...
    redelivered: bool = False
    # Why the delivery cannot run, found while receiving it: properties that do not decode, or
    # a body over --max-message-size (then not kept: `body` is empty). The job is refused as
    # bad_message with this text; nothing else about the connection is affected.
    problem: str = ""
    # What the transport needs to take the delivery off the broker in the same step as its
    # failure record is written (Sidekiq: the in-progress list and the job's text), so a worker
    # killed in between leaves either the job or its record, never both; None for AMQP.
    receipt: Any = None
