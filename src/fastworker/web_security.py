"""What keeps the dashboard from being a remote "run this job again" button for anyone: basic
auth, a CSRF token on every state change, and no listening beyond loopback without auth.

Why a token and not only auth: a browser sends basic-auth credentials with any request to the
site, also one a hostile page makes it send (a form posted cross-site). The token is an HMAC of
the user name under a secret made at start, so it is the same on every page of one process (no
session to keep) and useless to anyone who cannot read the pages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field

DEFAULT_LISTEN = "127.0.0.1:8090"


class SecurityError(ValueError):
    """A setting that would expose the dashboard; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> Credentials:
        user, colon, password = text.partition(":")
        if not colon or not user or not password:
            raise SecurityError("--auth takes USER:PASSWORD, both not empty")
        return cls(user, password)

    def check(self, header: str | None) -> str | None:
        """The user name if `header` (an Authorization header) carries these credentials."""
        if not header or not header[:6].lower() == "basic ":
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, _, password = decoded.partition(":")
        # Both compared, always: the time taken says nothing about which one was wrong.
        ok_user = hmac.compare_digest(user.encode(), self.user.encode())
        ok_password = hmac.compare_digest(password.encode(), self.password.encode())
        return user if ok_user and ok_password else None


class Csrf:
    """Tokens for the forms of one process: HMAC-SHA256(secret, user)."""

    def __init__(self, secret: bytes | None = None) -> None:
        self.secret = secret or secrets.token_bytes(32)

    def token(self, user: str) -> str:
        return hmac.new(self.secret, user.encode(), hashlib.sha256).hexdigest()

    def valid(self, user: str, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(self.token(user), str(given))


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) -> (host, port)."""
    host, colon, port_text = text.rpartition(":")
    if not colon or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise SecurityError(f"--listen takes HOST:PORT, got {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise SecurityError(f"--listen needs a host (127.0.0.1, or 0.0.0.0 for all), got {text!r}")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_exposure(host: str, port: int, auth: Credentials | None) -> None:
    """Refuses a non-loopback address without auth: anyone reaching it could replay and
    delete jobs."""
    if auth is None and not is_loopback(host):
        raise SecurityError(
            f"refusing to listen on {host}:{port} without --auth: anyone who can reach that "
            "address could replay and delete jobs. Give --auth USER:PASSWORD (or set "
            "FASTWORKER_WEB_AUTH), or listen on 127.0.0.1 (the default) and reach it through "
            "an SSH tunnel or a reverse proxy with TLS"
        )
