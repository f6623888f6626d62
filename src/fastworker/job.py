"""What a message asks for, independent of its wire format, and why a message can be refused."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastworker.endpoint import Endpoint
from fastworker.outcome import Kind


@dataclass(slots=True)
class Job:
    """One PHP script run: where, which script, and what it receives."""

    script: str
    endpoint: Endpoint | None = None  # None: the worker's first --fpm
    data: bytes | None = None  # the deferred-event bundle's DEFERRED_DATA
    params: dict[str, str] = field(default_factory=dict)  # application params, names vetted
    body: bytes = b""  # FastCGI STDIN
    content_type: str = ""


class JobRefused(Exception):
    """A message that must not run; it is dead-lettered at once, without retries."""

    kind = Kind.BAD_MESSAGE


class BadMessage(JobRefused):
    """The message cannot be understood."""

    kind = Kind.BAD_MESSAGE


class NotAllowed(JobRefused):
    """The message names an endpoint or a script the worker was not told to allow."""

    kind = Kind.NOT_ALLOWED
