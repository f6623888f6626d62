"""The real services the tests run against, and how to start, probe and stop them.

- `process`: process and port helpers (PR_SET_PDEATHSIG, /proc children, free ports)
- `fpm`: a private PHP-FPM per test or module (`start_fpm`, `FpmServer`, the pool config)
- `rabbitmq`: the broker (start/probe, the session's queue prefix) and synchronous AMQP helpers
- `redis`: a local Redis
- `proxy`: `TcpProxy`, a TCP proxy whose connections a test can cut
- `worker`: `Worker`, the `python -m fastworker` subprocess harness

tests/conftest.py turns these into fixtures; tests/helpers.py holds the small pure helpers.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC_DIR = ROOT / "src"
TESTS_DIR = ROOT / "tests"
PHP_DIR = TESTS_DIR / "php"

__all__ = ["PHP_DIR", "ROOT", "SRC_DIR", "TESTS_DIR"]
