"""Turns a message body into a Job: the deferred-event bundle's format, a JSON envelope, or raw.

Message content may choose values, never FastCGI param names that PHP-FPM or PHP interpret
(PHP_VALUE sets ini values; SCRIPT_FILENAME picks the script): the worker owns those.

Every parser has the `Parser` signature `(body, default_script, properties, headers)`: the
message body, `--script`, the AMQP basic properties and the AMQP headers table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from fnmatch import fnmatchcase
from typing import Any

import orjson

from fastworker.endpoint import Endpoint, normalize_host
from fastworker.job import BadMessage, ConsoleJob, DelayedJob, Job
from fastworker.trace_context import trace_params

FORMATS = ("bundle", "json", "raw")

# Names the worker sets or that PHP-FPM/PHP give meaning to. A message may never set them, not
# even through an --allow-param glob: this is the floor under the allow-list below.
_RESERVED_PREFIXES = (
    "PHP_",
    "SCRIPT_",
    "DOCUMENT_",
    "PATH_",
    "REQUEST_",
    "CONTENT_",
    "SERVER_",
    "GATEWAY_",
    "REMOTE_",
    "REDIRECT_",
    "ORIG_",
    "FCGI_",
    "HTTP_",
    "AUTH_",
    "QUERY_",
    "HTTPS",
    "DEFERRED_DATA",
    "FASTWORKER_",
)
_PARAM_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,127}$")

# The json format's allow-list: params named JOB_PARAM_* pass, and names matching the operator's
# --allow-param globs. PHP sees params in $_SERVER (and getenv()), where Symfony, Laravel and
# most apps read their configuration (APP_ENV, APP_DEBUG, DATABASE_URL, ...), and where PATH and
# LD_PRELOAD mean something to every child process. JOB_PARAM_ is no CGI, FPM, PHP or framework
# name and sits outside the APP_ namespace that apps fill with their own settings, so a message
# can only add values the app reads on purpose; the name also tells a reader where it came from.
PARAM_PREFIX = "JOB_PARAM_"
_GLOB_CHARS = frozenset("*?[")


def check_param_name(name: str, allow: Sequence[str] = ()) -> str:
    """A json param name a message may set, or BadMessage saying why not.

    `allow` holds the --allow-param globs (fnmatch, case-sensitive), which add names on top of
    the JOB_PARAM_ prefix; no glob lets through a name CGI, FPM or PHP interpret.
    """
    if not _PARAM_NAME.match(name):
        raise BadMessage(f"param name {name[:60]!r} is not of the form [A-Za-z][A-Za-z0-9_]*")
    if name.upper().startswith(_RESERVED_PREFIXES):
        raise BadMessage(
            f"param name {name!r} is reserved for the worker and PHP-FPM; no --allow-param "
            "can allow it"
        )
    if name.startswith(PARAM_PREFIX) or any(fnmatchcase(name, glob) for glob in allow):
        return name
    raise BadMessage(
        f"param name {name!r} is not allowed: name it {PARAM_PREFIX}..., or start the worker "
        f"with --allow-param {name!r} (or a glob matching it)"
    )


def check_allow_params(globs: Sequence[str]) -> tuple[str, ...]:
    """The --allow-param globs, or ValueError for one that can never allow anything."""
    for glob in globs:
        if not glob:
            raise ValueError("--allow-param needs a non-empty glob")
        if _GLOB_CHARS.isdisjoint(glob):  # a plain name: it must be one a message may set
            try:
                check_param_name(glob, (glob,))
            except BadMessage as exc:
                raise ValueError(f"--allow-param {glob!r}: {exc}") from None
    return tuple(globs)


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadMessage(f"message is not valid UTF-8 (byte {exc.start})") from None


def parse_bundle(
    body: bytes,
    default_script: str,
    properties: Mapping[str, Any] | None = None,
    headers: Mapping[str, Any] | None = None,
) -> Job:
    """`name: value` header lines, one empty line, then the data (fervo/deferred-event-bundle).

    Besides the bundle's own lines, a block may carry `traceparent:` / `tracestate:` (W3C trace
    context, passed to PHP when valid) and `delay: <seconds>` (wait before the first run).
    A `Parser` itself (properties and headers are not used), so no wrapper call per message.
    """
    head_end = body.find(b"\n\n")
    if head_end == -1:
        raise BadMessage("no empty line between the header lines and the data")
    data = body[head_end + 2 :]
    if not data.isascii():
        _text(data)  # the bundle sends base64 text; anything else did not come from it
    if not data or data.isspace():  # `not data.strip()` without the copy
        raise BadMessage("the message carries no data after its header lines")
    head = body[:head_end]
    target = _TARGETS.get(head)
    params: dict[str, str | bytes] = {}
    if target is None:
        target, params = _target_and_trace(head)
    # Positional arguments: a dataclass __init__ with keywords costs twice as much per job.
    if target[4]:
        return DelayedJob(target[0] or default_script, target[1], data, params, b"", "", target[4])
    return Job(target[0] or default_script, target[1], data, params)


def parse_bundle_console(
    body: bytes,
    default_script: str,
    properties: Mapping[str, Any] | None = None,
    headers: Mapping[str, Any] | None = None,
) -> Job:
    """`parse_bundle`, plus the php_bin and console_path headers that `--executor cli` runs.

    A twin rather than a flag, so the FastCGI path's Job stays as small and as quick to build
    (tests/test_console_executor.py checks that both read every body alike).
    """
    head_end = body.find(b"\n\n")
    if head_end == -1:
        raise BadMessage("no empty line between the header lines and the data")
    data = body[head_end + 2 :]
    if not data.isascii():
        _text(data)
    if not data or data.isspace():
        raise BadMessage("the message carries no data after its header lines")
    head = body[:head_end]
    target = _TARGETS.get(head)
    params: dict[str, str | bytes] = {}
    if target is None:
        target, params = _target_and_trace(head)
    return ConsoleJob(
        target[0] or default_script,
        target[1],
        data,
        params,
        b"",
        "",
        target[2],
        target[3],
        target[4],
    )


# Header block -> its Target: one app sends the same few blocks (~250 bytes), so
# parsing each distinct block once saves most of a bundle message's cost. Only blocks up to
# TARGET_CACHE_BLOCK bytes are kept, at most TARGET_CACHE_ENTRIES of them (the oldest goes
# first), so the cache holds at most 256 x 4 KiB of keys whatever the messages carry.
TARGET_CACHE_BLOCK = 4 * 1024
TARGET_CACHE_ENTRIES = 256
# (dispatch_path, endpoint, php_bin, console_path, delay in ms) of a header block; None where
# it names none, 0 for no delay.
Target = tuple[str | None, Endpoint | None, str | None, str | None, int]
_TARGETS: dict[bytes, Target] = {}
_NO_TARGET: Target = (None, None, None, None, 0)  # a block of trace lines only
# Lines that differ from message to message: kept out of the cache's keys.
_TRACE_LINES = (b"traceparent", b"tracestate")
_SECONDS = re.compile(r"[0-9]{1,10}(?:\.[0-9]{1,6})?")


def _target_and_trace(head: bytes) -> tuple[Target, dict[str, str | bytes]]:
    """A header block the cache does not hold: its Target, and the params of its trace lines.

    Trace lines are cut out before the block is parsed and cached, so that the messages of an
    app that traces them all still share one cache entry; they are found by search, not by
    splitting the block. Invalid trace values are dropped.
    """
    lower = head.lower()
    at = lower.find(b"trace")
    if at == -1:
        return _cached_target(head), {}
    parent: bytes | None = None
    states: list[bytes] = []
    duplicate = False
    rest = head
    while at != -1:
        start = lower.rfind(b"\n", 0, at) + 1
        end = lower.find(b"\n", at)
        if end == -1:
            end = len(lower)
        name, sep, value = rest[start:end].partition(b":")
        name = name.strip().lower()
        if not sep or name not in _TRACE_LINES:
            at = lower.find(b"trace", end)  # e.g. a path holding "trace": not a trace line
            continue
        if name == b"tracestate":
            states.append(value.strip())  # several lines are one list, as HTTP combines them
        else:
            duplicate = duplicate or parent is not None
            parent = value.strip()
        # Cut the line and one line break next to it.
        if end < len(lower):
            end += 1
        elif start > 0:
            start -= 1
        rest, lower = rest[:start] + rest[end:], lower[:start] + lower[end:]
        at = lower.find(b"trace", start)
    if not rest:
        target = _NO_TARGET
    else:
        cached = _TARGETS.get(rest)
        try:
            target = cached if cached is not None else _cached_target(rest)
        except BadMessage:
            _bundle_target(head)  # the same error, its line number counted in the whole block
            raise
    if duplicate or parent is None:
        return target, {}
    return target, trace_params(parent, b",".join(states) if states else None) or {}


def _cached_target(head: bytes) -> Target:
    target = _bundle_target(head)  # raises BadMessage: an error is never cached
    if len(head) <= TARGET_CACHE_BLOCK:
        if len(_TARGETS) >= TARGET_CACHE_ENTRIES:
            del _TARGETS[next(iter(_TARGETS))]
        _TARGETS[head] = target
    return target


def _bundle_target(head: bytes) -> Target:
    """(dispatch_path, endpoint, php_bin, console_path, delay in ms) of a header block."""
    headers: dict[str, str] = {}
    for number, line in enumerate(_text(head).split("\n"), 1):
        line = line.rstrip("\r")
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise BadMessage(f"header line {number} has no 'name: value' form: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    endpoint = None
    host, port = headers.get("fastcgi_host"), headers.get("fastcgi_port")
    if host or port:
        if not (host and port):
            raise BadMessage("fastcgi_host and fastcgi_port must be given together")
        endpoint = _bundle_endpoint(host, port)
    delay = headers.get("delay")
    return (
        headers.get("dispatch_path"),
        endpoint,
        headers.get("php_bin") or None,  # read by --executor cli only
        headers.get("console_path") or None,
        _delay_ms(delay) if delay else 0,
    )


def _delay_ms(seconds: str) -> int:
    """A `delay:` line's seconds (e.g. `30` or `1.5`) in milliseconds."""
    if not _SECONDS.fullmatch(seconds):
        raise BadMessage(
            f"delay: {seconds[:40]!r} is not a number of seconds (e.g. 'delay: 30', 'delay: 1.5')"
        )
    return round(float(seconds) * 1000)


def _bundle_endpoint(host: str, port: str) -> Endpoint:
    """The endpoint a header block names (called once per distinct block, via its cache)."""
    try:
        return Endpoint.parse(f"{normalize_host(host)}:{port}")
    except ValueError as exc:
        raise BadMessage(str(exc)) from None


def parse_json(body: bytes, default_script: str, allow_params: Sequence[str] = ()) -> Job:
    """`{"script": str, "params": {str: str}, "body": str, "fpm": "host:port"}`; all optional.

    Param names must start with JOB_PARAM_ or match an `allow_params` glob (see
    `check_param_name`).
    """
    try:
        envelope: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadMessage(f"not a JSON envelope: {exc}") from None
    if not isinstance(envelope, dict):
        raise BadMessage("the JSON envelope must be an object")
    unknown = set(envelope) - {"script", "params", "body", "fpm"}
    if unknown:
        raise BadMessage(f"unknown envelope keys: {', '.join(sorted(unknown))}")
    script = envelope.get("script", default_script)
    params = envelope.get("params", {})
    text = envelope.get("body", "")
    fpm = envelope.get("fpm")
    if not isinstance(script, str) or not isinstance(text, str):
        raise BadMessage("'script' and 'body' must be strings")
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        raise BadMessage("'params' must be an object of strings")
    endpoint = None
    if fpm is not None:
        if not isinstance(fpm, str):
            raise BadMessage("'fpm' must be a string like host:port")
        try:
            endpoint = Endpoint.parse(fpm)
        except ValueError as exc:
            raise BadMessage(str(exc)) from None
    return Job(
        script=script,
        endpoint=endpoint,
        params={check_param_name(k, allow_params): v for k, v in params.items()},
        body=text.encode(),
        content_type="application/json" if text else "",
    )


# The raw format's AMQP headers: at most this many become params, each value cut to this many
# bytes (UTF-8), so no message can make a request FastCGI cannot encode (a pair must fit in one
# 65535-byte record) or PHP would choke on.
HEADER_PARAMS_MAX = 64
HEADER_VALUE_MAX = 4 * 1024
HEADER_NAME_MAX = 100
INTERNAL_HEADER_PREFIX = "x-fastworker-"  # the worker's retry bookkeeping (failures.py)
_SCALARS = (str, bytes, bool, int, float, datetime, Decimal)
_NOT_NAME_CHAR = re.compile(r"[^A-Z0-9_]")


def parse_raw(
    body: bytes,
    default_script: str,
    properties: Mapping[str, Any],
    headers: Mapping[str, Any] | None = None,
) -> Job:
    """The body goes to STDIN as is; AMQP properties and headers become AMQP_* params.

    Each property becomes AMQP_<NAME>. Each header whose value is a scalar (text, bytes, number,
    bool, timestamp, decimal) becomes AMQP_HEADER_<NAME>: the name upper-cased, every character
    outside [A-Z0-9_] replaced by `_`, cut to 100 characters; the value cut to 4 KiB. Tables,
    arrays and voids are skipped, and so are the worker's own x-fastworker-* headers. At most
    64 headers are mapped, in the table's order; of two that map to the same name the first
    wins. Never raises for odd header content: a header that cannot be turned into text is
    skipped.
    """
    params: dict[str, str] = {}
    for key, value in properties.items():
        if isinstance(value, _SCALARS):  # a `headers` key here is a table: skipped
            text = _param_value(value)
            if text is not None:
                params[f"AMQP_{key.upper()}"] = text
    mapped = 0
    for name, value in (headers or {}).items():
        if mapped >= HEADER_PARAMS_MAX:
            break
        if not isinstance(value, _SCALARS):
            continue
        if not isinstance(name, str):
            name = _param_value(name) or ""
        if name.lower().startswith(INTERNAL_HEADER_PREFIX):
            continue
        param = "AMQP_HEADER_" + _NOT_NAME_CHAR.sub("_", name.upper()[:HEADER_NAME_MAX])
        if param in params:
            continue
        text = _param_value(value)
        if text is not None:
            params[param] = text
            mapped += 1
    content_type = str(properties.get("content_type") or "application/octet-stream")
    return Job(script=default_script, params=params, body=body, content_type=content_type)


def _param_value(value: Any) -> str | None:
    """A scalar as a param value of at most HEADER_VALUE_MAX UTF-8 bytes; None if it has none."""
    try:
        if isinstance(value, bytes):
            text = value[:HEADER_VALUE_MAX].decode("utf-8", "replace")
        elif isinstance(value, bool):
            text = "1" if value else "0"  # PHP reads "0" as false; "False" would be true
        else:
            text = str(value)[:HEADER_VALUE_MAX]
    except Exception:  # e.g. an int too long for str(); a subclass with a broken __str__
        return None
    try:
        raw = text.encode()
    except UnicodeEncodeError:  # lone surrogates: FastCGI could not encode them
        raw = text.encode("utf-8", "replace")
        text = raw.decode()
    if len(raw) > HEADER_VALUE_MAX:
        text = raw[:HEADER_VALUE_MAX].decode("utf-8", "ignore")  # no half character at the end
    return text


_BUNDLE_HEAD = re.compile(rb"[a-z_]+: ")


def parse_event_data(
    body: bytes,
    default_script: str,
    properties: Mapping[str, Any] | None = None,
    headers: Mapping[str, Any] | None = None,
) -> Job:
    """A Sidekiq job's args[0]: the event data itself (what the bundle's Sidekiq backend
    pushes), run by --script, or a whole bundle message (header lines, an empty line, data;
    its php_bin and console_path headers too, for --executor cli).
    Neither base64 nor PHP's serialize() output starts with a lowercase `name: ` line."""
    if _BUNDLE_HEAD.match(body) and b"\n\n" in body:
        return parse_bundle_console(body, default_script)
    if not body.isascii():
        _text(body)
    if not body or body.isspace():
        raise BadMessage("the job carries no event data")
    return Job(default_script, None, body, {})


# (body, --script, AMQP basic properties, AMQP headers table) -> Job, or BadMessage.
Parser = Callable[[bytes, str, Mapping[str, Any], Mapping[str, Any]], Job]


def parser_for(name: str, allow_params: Sequence[str] = (), console: bool = False) -> Parser:
    """The message parser for `--format NAME`; `allow_params` are the --allow-param globs;
    `console`: for `--executor cli`, which runs the bundle's php_bin and console_path.

    Raises ValueError for an unknown format, an --allow-param glob that allows nothing, or a
    console executor with a format other than bundle (only the bundle names a console).
    """
    allow = check_allow_params(allow_params)
    if name == "bundle":
        return parse_bundle_console if console else parse_bundle
    if console and name in FORMATS:
        raise ValueError(f"--executor cli runs bundle messages only, not --format {name}")
    if name == "json":
        return lambda body, script, _props, _headers=None: parse_json(body, script, allow)
    if name == "raw":
        return parse_raw
    raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
