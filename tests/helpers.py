"""Small pure helpers for tests: bundle messages, records of record.php, polling.

No services here (they live in tests/services/): nothing in this module opens a connection or
starts a process.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

# --------------------------------------------------------------------------- the bundle's format


def bundle_message(
    data: str | bytes,
    dispatch_path: str,
    host: str = "127.0.0.1",
    port: int | str = 9000,
    php_bin: str = "/usr/bin/php",
    console_path: str = "/srv/app/app/console",
) -> bytes:
    """A body exactly as the deferred-event bundle's ``QueueMessage::getFormattedMessage()``.

    Header lines are ``name: value``; headers with empty values are left out, as the bundle does.
    """
    headers = [
        ("php_bin", php_bin),
        ("console_path", console_path),
        ("dispatch_path", dispatch_path),
        ("fastcgi_host", host),
        ("fastcgi_port", str(port)),
    ]
    head = "".join(f"{name}: {value}\n" for name, value in headers if value not in ("", None))
    raw = data.encode() if isinstance(data, str) else data
    return head.encode() + b"\n" + raw


def php_serialize_str(value: str | bytes) -> bytes:
    """PHP ``serialize()`` of a string (length counts bytes, as PHP does)."""
    raw = value.encode() if isinstance(value, str) else value
    return b's:%d:"%s";' % (len(raw), raw)


def order_placed_data(order_id: int, payload: str | bytes) -> str:
    """``base64(serialize(new OrderPlaced(id, payload)))`` as examples/php/publish.php makes it.

    Lets Python tests produce what the example PHP app publishes without running PHP. Only the
    public properties are written; PHP's unserialize() gives the others their defaults.
    """
    name = b"OrderPlaced"
    body = b's:2:"id";i:%d;' % order_id + b's:7:"payload";' + php_serialize_str(payload)
    serialized = b'O:%d:"%s":2:{%s}' % (len(name), name, body)
    return base64.b64encode(serialized).decode()


# --------------------------------------------------------------------------- records of record.php


def complete_lines(path: str | os.PathLike[str]) -> list[str]:
    """The whole lines of a file PHP scripts append to while a test polls it.

    A line PHP is still appending has no newline yet: it is left for the next poll, so a
    reader never parses half a record. A missing file means nothing was written yet.
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return text[: text.rfind("\n") + 1].splitlines()


def read_records(path: str | os.PathLike[str]) -> list[tuple[int, str, int]]:
    """Parse the lines record.php appended: ``(pid, sha1 of data, strlen of data)``.

    A missing file means no job ran, so it reads as no records.
    """
    out: list[tuple[int, str, int]] = []
    for line in complete_lines(path):
        if not line.strip():
            continue
        pid, digest, length = line.split()
        out.append((int(pid), digest, int(length)))
    return out


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll until ``predicate()`` is truthy; return its value or raise with ``what`` in the text."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


# The metrics examples/grafana/fastworker.json reads: test_config checks the dashboard reads
# only these, test_operations that a worker's /metrics has each of them.
DASHBOARD_METRICS = (
    "fastworker_jobs_total",
    "fastworker_job_duration_seconds",
    "fastworker_inflight_jobs",
    "fastworker_concurrency",
    "fastworker_fpm_connections",
    "fastworker_fpm_errors_total",
    "fastworker_broker_reconnects_total",
    "fastworker_dead_letters_total",
)


__all__ = [
    "DASHBOARD_METRICS",
    "bundle_message",
    "order_placed_data",
    "php_serialize_str",
    "read_records",
    "wait_for",
]
