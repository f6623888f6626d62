"""Where a job runs: a PHP-FPM address. Shared vocabulary: it imports no machinery, so message
formats and allow-lists can name an endpoint without loading the pool or the codec."""

from __future__ import annotations

from typing import NamedTuple


class Endpoint(NamedTuple):
    """An FPM address: TCP `host:port` or `unix:/path` (a tuple: hashed in C on the hot path)."""

    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        text = text.strip()
        if text.startswith("unix:"):
            path = text[5:]
            if not path:
                raise ValueError(f"FPM address {text!r}: unix: needs a socket path")
            return cls(path=path)
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"FPM address {text!r}: expected host:port or unix:/path")
        host = host.strip("[]")
        try:
            number = int(port)
        except ValueError:
            raise ValueError(f"FPM address {text!r}: port {port!r} is not a number") from None
        if not 0 < number < 65536:
            raise ValueError(f"FPM address {text!r}: port {number} out of range")
        return cls(host=normalize_host(host), port=number)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def normalize_host(host: str) -> str:
    """`localhost` is the deferred-event bundle's default; treat it as the loopback address."""
    host = host.lower()
    return "127.0.0.1" if host == "localhost" else host
