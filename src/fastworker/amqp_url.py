"""What an AMQP URL says, read once and checked: where the broker is, how to log in, and TLS.

Why one reader: the fast connection, the aiormq connections (publisher, `dlq`, `check`) and
the messages that name the broker must all agree on what a URL means, and a setting nobody
reads must not be silently dropped. The query parameters are those of RabbitMQ's URI spec
(`heartbeat`, `connection_timeout`, `auth_mechanism`, and for TLS `cacertfile`, `certfile`,
`keyfile`, `password`, `verify`, `server_name_indication`), plus `frame_max` and the names aiormq
has always read (`cafile`, `capath`, `cadata`, `no_verify_ssl`, `auth`, `name`, `timeout`), so
URLs that worked with `--amqp-client aiormq` keep working. Anything else is an error.
`amqp_tls` turns the TLS part into an `ssl.SSLContext`.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

DEFAULT_HEARTBEAT = 60  # seconds; the broker may ask for less
DEFAULT_FRAME_MAX = 131072
DEFAULT_CONNECT_TIMEOUT = 15.0  # seconds for TCP + TLS + the AMQP handshake
DEFAULT_NAME = "fastworker"

TLS_PARAMS = frozenset(
    {
        "cacertfile", "cafile", "capath", "cadata", "certfile", "keyfile", "password",
        "verify", "no_verify_ssl", "server_name_indication",
    }
)  # fmt: skip
KNOWN_PARAMS = TLS_PARAMS | {
    "heartbeat", "frame_max", "connection_timeout", "timeout", "auth_mechanism", "auth", "name",
}  # fmt: skip
# RabbitMQ's URI spec has these too; they mean nothing to this client, so they are refused
# with the reason instead of being ignored.
_NOT_SUPPORTED = {
    "channel_max": "fastworker opens one consuming channel per connection",
    "depth": "the certificate chain depth cannot be limited here",
    "fail_if_no_peer_cert": "it is a broker setting (ssl_options.fail_if_no_peer_cert)",
}
# Query values that are secrets (a key's password) or that the issue asks to keep out of logs.
_SECRET_PARAMS = re.compile(r"(^|&)(keyfile|password)=[^&]*")
# Where a comma list of URLs splits (`split_urls`), and what a URL starts with.
_URL_START = re.compile(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")
_HAS_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


# The flags that set the URL's TLS files (worker, `check`, `dlq`): (flag, dest, help).
TLS_FLAGS = (
    ("--amqp-ca", "amqp_ca", "amqps://: the CA certificates (PEM) that signed the broker's "
     "certificate, instead of the system's; the URL's cacertfile="),
    ("--amqp-cert", "amqp_cert", "amqps://: the client certificate (PEM) for brokers that "
     "require one (mutual TLS); the URL's certfile="),
    ("--amqp-key", "amqp_key", "amqps://: the client certificate's private key (PEM); the "
     "URL's keyfile= (its password, if any: password= in the URL)"),
)  # fmt: skip
URL_HELP = (
    "broker URL; repeat it (or give a comma list) for a cluster's nodes: the first that "
    "answers is used, another when its node goes away; amqps:// for TLS, with RabbitMQ's "
    "URI query parameters: cacertfile, certfile, "
    "keyfile, password, verify (verify_peer, or verify_none: no certificate check), "
    "server_name_indication, heartbeat, connection_timeout (ms), auth_mechanism (plain, "
    "external), and frame_max, name (the connections' name in RabbitMQ)"
)


class UrlError(ValueError):
    """The URL (or a --amqp-* flag) cannot work as written: a configuration error."""


@dataclass(frozen=True, slots=True)
class AmqpUrl:
    """One broker URL, parsed and checked. `text` holds the password: never log it (the
    secrets are left out of the repr)."""

    text: str = field(repr=False)
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    vhost: str
    tls: bool
    heartbeat: int | None  # None: not in the URL (the clients' default, 60 s)
    frame_max: int
    connect_timeout: float
    auth: str  # "PLAIN" or "EXTERNAL" (the client certificate names the user)
    name: str  # the start of each connection's name
    cacertfile: str | None = None
    capath: str | None = None
    cadata: bytes | None = None  # DER, from aiormq's base64 `cadata`
    certfile: str | None = None
    keyfile: str | None = field(default=None, repr=False)
    key_password: str | None = field(default=None, repr=False)
    verify: bool = True
    server_name: str | None = None  # server_name_indication; "" when disabled

    @classmethod
    def parse(cls, text: str) -> AmqpUrl:
        """Raises UrlError naming what is wrong (never showing the password)."""
        parts = urlsplit(text)
        if parts.scheme not in ("amqp", "amqps"):
            raise UrlError(
                f"--amqp-url must start with amqp:// or amqps://, got {parts.scheme or 'none'}://"
            )
        tls = parts.scheme == "amqps"
        query: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in _NOT_SUPPORTED:
                raise UrlError(f"--amqp-url: {key}= is not supported: {_NOT_SUPPORTED[key]}")
            if key not in KNOWN_PARAMS:
                raise UrlError(
                    f"--amqp-url: unknown query parameter {key!r}; fastworker reads "
                    f"{', '.join(sorted(KNOWN_PARAMS))}"
                )
            query[key] = value  # the last one wins, as before
        if not tls and (given := sorted(TLS_PARAMS & query.keys())):
            raise UrlError(
                f"--amqp-url: {', '.join(given)} are TLS settings, but the URL is amqp://: "
                "use amqps:// (and the broker's TLS port, usually 5671)"
            )
        try:
            port = parts.port or (5671 if tls else 5672)
        except ValueError:
            raise UrlError("--amqp-url: the port is not a number from 1 to 65535") from None
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        timeout = DEFAULT_CONNECT_TIMEOUT
        if "connection_timeout" in query:  # RabbitMQ's spec: milliseconds
            timeout = _number(query, "connection_timeout", 1) / 1000
        elif "timeout" in query:  # aiormq's: seconds
            timeout = _number(query, "timeout", 0.001)
        frame_max = int(_number(query, "frame_max", 0, DEFAULT_FRAME_MAX))
        if 0 < frame_max < 4096:
            raise UrlError("--amqp-url: frame_max must be 0 (no limit) or at least 4096")
        auth = query.get("auth_mechanism", query.get("auth", "plain")).upper()
        if auth not in ("PLAIN", "EXTERNAL"):
            raise UrlError(
                f"--amqp-url: auth_mechanism must be plain or external, got {auth.lower()!r}"
            )
        verify = query.get("verify", "verify_peer")
        if verify not in ("verify_peer", "verify_none"):
            raise UrlError(f"--amqp-url: verify must be verify_peer or verify_none, not {verify!r}")
        if query.get("no_verify_ssl", "0") not in ("0", "1"):
            raise UrlError("--amqp-url: no_verify_ssl must be 0 or 1")
        server_name = query.get("server_name_indication")
        if server_name == "disable":
            server_name = ""
        cadata = None
        if query.get("cadata"):
            try:
                cadata = base64.b64decode(query["cadata"], validate=True)
            except binascii.Error:
                raise UrlError("--amqp-url: cadata must be base64 (of DER certificates)") from None
        heartbeat = query.get("heartbeat")
        return cls(
            text=text,
            host=parts.hostname or "localhost",
            port=port,
            username=unquote(parts.username) if parts.username is not None else "guest",
            password=unquote(parts.password) if parts.password is not None else "guest",
            vhost=unquote(path) if path else "/",
            tls=tls,
            heartbeat=None if heartbeat is None else int(_number(query, "heartbeat", 0)),
            frame_max=frame_max,
            connect_timeout=timeout,
            auth=auth,
            name=query.get("name") or DEFAULT_NAME,
            cacertfile=query.get("cacertfile") or query.get("cafile") or None,
            capath=query.get("capath") or None,
            cadata=cadata,
            certfile=query.get("certfile") or None,
            keyfile=query.get("keyfile") or None,
            key_password=query.get("password") or None,
            verify=verify == "verify_peer" and query.get("no_verify_ssl", "0") == "0",
            server_name=server_name,
        )

    @property
    def where(self) -> str:
        """`host:port`, for messages."""
        return f"{self.host}:{self.port}"

    @property
    def server_hostname(self) -> str:
        """The name TLS sends (SNI) and checks the certificate against; "" for none."""
        return self.host if self.server_name is None else self.server_name

    @property
    def masked(self) -> str:
        """The URL for logs and errors: password and key path replaced by ***."""
        return masked(self.text)

    @property
    def aiormq_url(self) -> str:
        """The URL for aiormq: everything but the query, which keeps only what aiormq must
        read itself (TLS travels as an SSLContext, the name as a client property)."""
        parts = urlsplit(self.text)
        query = {}
        if self.heartbeat is not None:
            query["heartbeat"] = str(self.heartbeat)
        if self.auth != "PLAIN":
            query["auth"] = self.auth.lower()
        return urlunsplit(parts._replace(query=urlencode(query)))

    def connection_name(self, role: str) -> str:
        """`<name> <host>:<pid> <role>`: which worker, on which machine, doing what, as
        RabbitMQ's `list_connections` and management UI show it."""
        return f"{self.name} {socket.gethostname()}:{os.getpid()} {role}"

    def client_properties(self, role: str) -> dict[str, str]:
        return {"connection_name": self.connection_name(role)}


def _number(query: dict[str, str], key: str, least: float, default: float = 0) -> float:
    if key not in query:
        return default
    try:
        value = float(query[key])
    except ValueError:
        value = least - 1
    if not math.isfinite(value) or value < least:
        raise UrlError(f"--amqp-url: {key} must be a number of at least {least:g}")
    return value


def with_files(
    url: str, ca: str | None = None, cert: str | None = None, key: str | None = None
) -> str:
    """`url` with --amqp-ca / --amqp-cert / --amqp-key in its query (replacing the URL's
    cacertfile / certfile / keyfile), so that one URL carries every setting."""
    given = {"cacertfile": ca, "certfile": cert, "keyfile": key}
    given = {name: value for name, value in given.items() if value}
    if not given:
        return url
    parts = urlsplit(url)
    replaced = {"cafile": "cacertfile"}  # aiormq's name for the same setting
    kept = [
        (name, value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if replaced.get(name, name) not in given
    ]
    return urlunsplit(parts._replace(query=urlencode([*kept, *given.items()], safe="/")))


def broker_urls(
    values: str | Sequence[str],
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> list[str]:
    """The nodes' URLs of `--amqp-url` (`split_urls`), each with --amqp-ca / --amqp-cert /
    --amqp-key folded in (`with_files`): what the worker and every tool connect with."""
    return [with_files(url, ca, cert, key) for url in split_urls(values)]


def split_urls(values: str | Sequence[str]) -> list[str]:
    """The broker URLs of `--amqp-url` (repeatable, each a URL or a comma list), in order.

    A comma starts a new URL only where a scheme follows (`,amqp://`, `,amqps://`), so a comma
    inside a password or a path stays where it is; parts without a scheme (what a blind split
    on commas, as FASTWORKER_AMQP_URL gets, makes of such a URL) are joined back onto the URL
    before them. Raises UrlError when there is none.
    """
    items = [values] if isinstance(values, str) else list(values)
    urls: list[str] = []
    for item in items:
        for part in _URL_START.split(item):
            part = part.strip()
            if not part:
                continue
            if urls and not _HAS_SCHEME.match(part):
                urls[-1] = f"{urls[-1]},{part}"
            else:
                urls.append(part)
    if not urls:
        raise UrlError("--amqp-url: no broker URL given")
    return urls


def masked(url: str) -> str:
    """`url` with its password, and the values of `keyfile=` and `password=`, replaced by ***,
    for logs and errors. Any URL (amqp, redis, ...)."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[-1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        parts = parts._replace(query=_SECRET_PARAMS.sub(r"\1\2=***", parts.query))
    return urlunsplit(parts)


__all__ = ["TLS_FLAGS", "URL_HELP", "AmqpUrl", "UrlError", "masked", "split_urls", "with_files"]
