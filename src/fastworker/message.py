"""A delivered message as the job pipeline sees it, whatever broker client received it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Message:
    body: bytes
    queue: str
    headers: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)  # content_type, message_id, ...
    redelivered: bool = False
