"""What a message asks for, independent of its wire format, and why a message can be refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from fastworker.endpoint import Endpoint
from fastworker.outcome import Kind


@dataclass(slots=True)
class Job:
    """One PHP script run: where, which script, and what it receives."""

    script: str
    endpoint: Endpoint | None = None  # None: the worker's first --fpm
    data: bytes | None = None  # the deferred-event bundle's DEFERRED_DATA
    # Application params (names vetted), then the job context (job_context.py); the job's own
    # dict, which the executor completes and sends as it is.
    params: dict[str, str | bytes] = field(default_factory=dict)
    body: bytes = b""  # FastCGI STDIN
    content_type: str = ""
    # What `--executor cli` runs; None: the worker's --php-bin / --console. Only a ConsoleJob
    # holds values: as fields here they would cost every FastCGI job's __init__.
    php_bin: ClassVar[str | None] = None
    console_path: ClassVar[str | None] = None
    # Milliseconds the message asks to wait before its first run (a bundle `delay:` line); only
    # a DelayedJob or a ConsoleJob holds a value, for the same reason.
    delay_ms: ClassVar[int] = 0


@dataclass(slots=True)
class DelayedJob(Job):
    """A bundle job whose header lines ask for a delay before the first run."""

    delay_ms: int = 0  # type: ignore[misc]


@dataclass(slots=True)
class ConsoleJob(Job):
    """A bundle job for `--executor cli`, with the message's php_bin and console_path."""

    php_bin: str | None = None  # type: ignore[misc]
    console_path: str | None = None  # type: ignore[misc]
    delay_ms: int = 0  # type: ignore[misc]


class JobRefused(Exception):
    """A message that must not run; it is dead-lettered at once, without retries."""

    kind = Kind.BAD_MESSAGE


class BadMessage(JobRefused):
    """The message cannot be understood."""

    kind = Kind.BAD_MESSAGE


class NotAllowed(JobRefused):
    """The message names an endpoint or a script the worker was not told to allow."""

    kind = Kind.NOT_ALLOWED
