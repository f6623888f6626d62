"""Turns a message body into a Job: the deferred-event bundle's format, a JSON envelope, or raw.

Message content may choose values, never FastCGI param names that PHP-FPM or PHP interpret
(PHP_VALUE sets ini values; SCRIPT_FILENAME picks the script): the worker owns those.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from fastworker.fpm import Endpoint, normalize_host
from fastworker.job import BadMessage, Job

FORMATS = ("bundle", "json", "raw")

# Names the worker sets or that PHP-FPM/PHP give meaning to; a message may not set them.
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


def check_param_name(name: str) -> str:
    """An application param name a message may set, or BadMessage saying why not."""
    if not _PARAM_NAME.match(name):
        raise BadMessage(f"param name {name[:60]!r} is not of the form [A-Za-z][A-Za-z0-9_]*")
    if name.upper().startswith(_RESERVED_PREFIXES):
        raise BadMessage(f"param name {name!r} is reserved for the worker and PHP-FPM")
    return name


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadMessage(f"message is not valid UTF-8 (byte {exc.start})") from None


def parse_bundle(body: bytes, default_script: str) -> Job:
    """`name: value` header lines, one empty line, then the data (fervo/deferred-event-bundle)."""
    head_end = body.find(b"\n\n")
    if head_end == -1:
        raise BadMessage("no empty line between the header lines and the data")
    data = body[head_end + 2 :]
    if not data.isascii():
        _text(data)  # the bundle sends base64 text; anything else did not come from it
    if not data or data.isspace():  # `not data.strip()` without the copy
        raise BadMessage("the message carries no data after its header lines")
    script, endpoint = _bundle_target(body[:head_end])
    # Positional arguments: a dataclass __init__ with keywords costs twice as much per job.
    return Job(script or default_script, endpoint, data, {})


@functools.lru_cache(maxsize=256)
def _bundle_target(head: bytes) -> tuple[str | None, Endpoint | None]:
    """(dispatch_path, endpoint) of a header block; one app sends the same few blocks."""
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
    return headers.get("dispatch_path"), endpoint


def _bundle_endpoint(host: str, port: str) -> Endpoint:
    """The endpoint a header block names (called once per distinct block, via its cache)."""
    try:
        return Endpoint.parse(f"{normalize_host(host)}:{port}")
    except ValueError as exc:
        raise BadMessage(str(exc)) from None


def parse_json(body: bytes, default_script: str) -> Job:
    """`{"script": str, "params": {str: str}, "body": str, "fpm": "host:port"}`; all optional."""
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
        params={check_param_name(k): v for k, v in params.items()},
        body=text.encode(),
        content_type="application/json" if text else "",
    )


def parse_raw(body: bytes, default_script: str, properties: Mapping[str, Any]) -> Job:
    """The body goes to STDIN as is; AMQP properties and headers become AMQP_* params."""
    params: dict[str, str] = {}
    for key, value in properties.items():
        if key == "headers":
            for name, header in (value or {}).items():
                safe = re.sub(r"[^A-Za-z0-9]", "_", str(name)).upper()[:100]
                params[f"AMQP_HEADER_{safe}"] = _param_value(header)
        elif value is not None:
            params[f"AMQP_{key.upper()}"] = _param_value(value)
    content_type = str(properties.get("content_type") or "application/octet-stream")
    return Job(script=default_script, params=params, body=body, content_type=content_type)


def _param_value(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


Parser = Callable[[bytes, str, Mapping[str, Any]], Job]


def parser_for(name: str) -> Parser:
    """The message parser for `--format NAME`."""
    if name == "bundle":
        return lambda body, script, _props: parse_bundle(body, script)
    if name == "json":
        return lambda body, script, _props: parse_json(body, script)
    if name == "raw":
        return parse_raw
    raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
