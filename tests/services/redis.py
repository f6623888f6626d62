"""A local Redis for the tests (127.0.0.1:6379, db 0), started without persistence if absent."""

from __future__ import annotations

import subprocess
import time

import pytest

from services.process import tcp_port_open, which

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379


def ensure_redis(host: str = REDIS_HOST, port: int = REDIS_PORT) -> str:
    """The Redis URL; starts redis-server (no persistence) if nothing answers on host:port."""
    if not tcp_port_open(host, port):
        redis_server = which("redis-server")
        if redis_server is None:
            pytest.fail(f"Redis does not answer on {host}:{port} and redis-server is not installed")
        subprocess.run(
            [
                redis_server, "--daemonize", "yes", "--bind", host, "--port", str(port),
                "--save", "", "--appendonly", "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        deadline = time.monotonic() + 15
        while not tcp_port_open(host, port):
            if time.monotonic() >= deadline:
                pytest.fail(f"redis-server did not come up on {host}:{port} within 15 s")
            time.sleep(0.1)
    return f"redis://{host}:{port}/0"


__all__ = ["ensure_redis"]
