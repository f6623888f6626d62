"""A failed job as the dashboard shows it, whichever store it sits in: an AMQP dead letter, or a
job in Sidekiq's `dead` or `retry` set.

Why one shape: the pages list, search and detail failures the same way for both backends. A
letter's `id` is a digest of what it holds (for AMQP: body, headers and properties, which carry
its first and last failure times; for Sidekiq: the set's member as stored), so an action names
exactly the letter the operator saw, and a letter that is gone (replayed or deleted by someone
else) is found missing instead of another one being hit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiormq.abc import DeliveredMessage

from fastworker import sidekiq_jobs
from fastworker.dlq import DeadLetter
from fastworker.failures import ATTEMPTS
from fastworker.formats import parse_event_data, parser_for
from fastworker.job import JobRefused
from fastworker.job_context import amqp_context
from fastworker.message import PROPERTY_NAMES, Message

# Param names whose values are not shown: credentials an app may pass to its jobs.
_SECRET_NAME = re.compile(
    r"pass|secret|token|api_?key|private|credential|auth|cookie|session|signature|(^|_)key($|_)",
    re.IGNORECASE,
)
# Values that carry a credential whatever their name: URL passwords, bearer tokens, JWTs.
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+(?=@)", re.I)
_BEARER = re.compile(r"\b(?P<head>(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{8,}", re.I)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+")
MASK = "***"
DELIVERY_COUNT = "x-delivery-count"
_EVENT_CLASS = re.compile(rb'^[OC]:\d+:"([A-Za-z_\\][A-Za-z0-9_\\]*)"')
_BUNDLE_LINE = re.compile(rb"^[a-z_]+: ")


@dataclass(slots=True)
class Letter:
    """One failed job: where it is, why it failed, and what it carried."""

    id: str
    store: str  # "dead" (AMQP dead-letter queue or Sidekiq's dead set) or "retry" (Sidekiq)
    queue: str  # the work queue it came from and goes back to
    kind: str
    status: int | None
    attempts: int
    message: str  # PHP's error message (Uncaught ...) or fastworker's reason
    error: dict[str, Any]  # the whole error record
    body: bytes  # what the job carried: the AMQP body, or a Sidekiq job's args[0]
    first_failure: float | None = None
    last_failure: float | None = None
    next_run: float | None = None  # Sidekiq's retry set: when it runs again
    headers: dict[str, Any] = field(default_factory=dict)  # AMQP headers (not ours)
    properties: dict[str, Any] = field(default_factory=dict)
    job: dict[str, Any] | None = None  # a Sidekiq job object
    entry: bytes = b""  # the Sidekiq set's member, as stored

    @property
    def first_line(self) -> str:
        for line in self.message.splitlines():
            if line.strip():
                return line.strip()
        return ""

    @property
    def bundle(self) -> Bundle | None:
        return Bundle.read(self.body)

    @property
    def event(self) -> str:
        """The event's PHP class when the data is a serialized object, else ""."""
        bundle = self.bundle
        return bundle.event if bundle is not None else _event_class(self.body)

    @property
    def script(self) -> str:
        bundle = self.bundle
        if bundle is not None and bundle.fields.get("dispatch_path"):
            return bundle.fields["dispatch_path"]
        if self.job is not None:
            return str(self.job.get("class") or "")
        return ""

    def matches(self, kind: str, text: str) -> bool:
        """The search: `kind` exactly (empty: any), `text` case-insensitively anywhere in the
        error, the script, the event or the body."""
        if kind and self.kind != kind:
            return False
        if not text:
            return True
        needle = text.lower()
        haystack = [
            self.message,
            str(self.error.get("stderr") or ""),
            self.script,
            self.event,
            self.body.decode("utf-8", "replace"),
        ]
        return any(needle in part.lower() for part in haystack)


@dataclass(frozen=True, slots=True)
class Bundle:
    """A body in the deferred-event bundle's format: header lines, an empty line, the data."""

    fields: dict[str, str]
    data: bytes
    decoded: bytes | None  # base64-decoded data: PHP's serialize() output

    @classmethod
    def read(cls, body: bytes) -> Bundle | None:
        head, sep, data = body.partition(b"\n\n")
        if not sep or not _BUNDLE_LINE.match(head):
            return None
        fields = {}
        for line in head.split(b"\n"):
            name, colon, value = line.partition(b":")
            if colon:
                fields[name.decode("utf-8", "replace").strip()] = value.decode(
                    "utf-8", "replace"
                ).strip()
        return cls(fields, data, _base64(data))

    @property
    def event(self) -> str:
        return _event_class(self.decoded or self.data)


def _base64(data: bytes) -> bytes | None:
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def _event_class(data: bytes) -> str:
    decoded = _base64(data)
    match = _EVENT_CLASS.match(decoded if decoded is not None else data)
    return match.group(1).decode("ascii") if match else ""


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, default=str, option=orjson.OPT_SORT_KEYS)


def digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _status(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "", 0) else None
    except (TypeError, ValueError):
        return None


def from_amqp(delivered: DeliveredMessage, default_queue: str) -> Letter:
    """A dead letter fetched from an AMQP dead-letter queue (dlq's reader decodes it)."""
    props = delivered.header.properties
    # A quorum queue counts redeliveries in x-delivery-count: not part of what the letter is.
    all_headers = {k: v for k, v in (props.headers or {}).items() if k != DELIVERY_COUNT}
    properties = {
        name: value for name in PROPERTY_NAMES if (value := getattr(props, name, None)) is not None
    }
    letter_id = digest(delivered.body, _canonical(all_headers), _canonical(properties))
    dead = DeadLetter.parse(0, delivered, default_queue)
    error = dead.error
    return Letter(
        id=letter_id,
        store="dead",
        queue=dead.queue,
        kind=dead.kind,
        status=_status(error.get("status")),
        attempts=dead.attempts,
        message=str(error.get("message") or ""),
        error=error,
        body=bytes(delivered.body),
        first_failure=_float(error.get("first_failure")),
        last_failure=_float(error.get("last_failure")),
        headers=dead.headers,
        properties=properties,
    )


def from_sidekiq(entry: bytes, job: dict[str, Any], score: float, store: str) -> Letter:
    """A job of Sidekiq's `dead` (scored by when it died) or `retry` set (by its next run)."""
    error = job.get(sidekiq_jobs.ERROR)
    error = dict(error) if isinstance(error, dict) else {}
    message = str(job.get("error_message") or error.get("message") or "")
    if job.get("error_class") and not message.startswith("Uncaught"):
        message = f"{job['error_class']}: {message}"
    args = job.get("args")
    body = args[0] if isinstance(args, list) and args and isinstance(args[0], str) else ""
    last = _float(job.get("retried_at")) or _float(job.get("failed_at"))
    return Letter(
        id=digest(entry),
        store=store,
        queue=str(job.get("queue") or ""),
        kind=str(error.get("kind") or "unknown"),
        status=_status(error.get("status")),
        attempts=sidekiq_jobs.failed_attempts(job),
        message=message,
        error=error,
        body=body.encode(),
        first_failure=_float(job.get("failed_at")) or _float(error.get("first_failure")),
        last_failure=last or (score if store == "dead" else None),
        next_run=score if store == "retry" else None,
        job=job,
        entry=entry,
    )


# ---------------------------------------------------------------- what PHP was sent


def mask(name: str, value: str) -> str:
    """A param's value as shown: *** for a name that says secret, credentials cut out of
    values that carry them (URL passwords, bearer tokens, JWTs)."""
    if _SECRET_NAME.search(name):
        return MASK if value else value
    value = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, value)
    value = _BEARER.sub(lambda m: m.group("head") + MASK, value)
    return _JWT.sub(MASK, value)


@dataclass(frozen=True, slots=True)
class ParseSettings:
    """How the worker reads messages (its --format, --script, --allow-param), to rebuild
    the params a dead letter's last run was sent."""

    format: str = "bundle"
    script: str = "/var/www/bin/dispatch.php"
    allow_param: Sequence[str] = ()


def params_sent(letter: Letter, settings: ParseSettings) -> tuple[list[tuple[str, str]], str]:
    """The FastCGI params of the letter's last run that carry the job (the fixed CGI ones left
    out), masked; and "" or why they cannot be rebuilt (the message was refused)."""
    try:
        if letter.job is not None:
            record = dict(letter.job)
            record.pop("retry_count", None)
            if letter.attempts > 1:
                record["retry_count"] = letter.attempts - 2  # as the last run saw it
            jid = record.get("jid")
            props = {"message_id": jid} if isinstance(jid, str) else {}
            job = parse_event_data(letter.body, settings.script)
            sidekiq_jobs.context(Message(letter.body, letter.queue, record, props), job)
        else:
            parse = parser_for(settings.format, settings.allow_param)
            job = parse(letter.body, settings.script, letter.properties, letter.headers)
            headers: dict[str, Any] = dict(letter.headers)
            if letter.attempts > 1:
                headers[ATTEMPTS] = letter.attempts - 1  # the last run was attempt N
            amqp_context(Message(letter.body, letter.queue, headers, letter.properties), job)
    except (JobRefused, ValueError) as exc:
        return [], f"not rebuilt: the worker refuses this message ({exc})"
    params: dict[str, str | bytes] = {"SCRIPT_FILENAME": job.script}
    params.update(job.params)
    if job.data is not None:
        params["DEFERRED_DATA"] = job.data
    shown = []
    for name, value in params.items():
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        shown.append((name, mask(name, text)))
    return shown, ""


def group_kinds(letters: Sequence[Letter]) -> dict[str, int]:
    """kind -> letters, for the search's choices."""
    kinds: dict[str, int] = {}
    for letter in letters:
        kinds[letter.kind] = kinds.get(letter.kind, 0) + 1
    return dict(sorted(kinds.items()))


def json_view(letter: Letter) -> Mapping[str, Any]:
    """The error record for the detail page, the fields PHP wrote first."""
    order = ("kind", "status", "message", "stderr", "stdout_head", "traceback", "endpoint")
    error = letter.error
    first = {k: error[k] for k in order if error.get(k) not in (None, "")}
    rest = {k: v for k, v in error.items() if k not in order}
    return {**first, **rest}
