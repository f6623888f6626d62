"""Prometheus metrics and a health check on one port (`--metrics-port`), served on the worker's
own event loop.

Nothing here runs per job. The consumer, the failure handler, the executor and the pools count
in plain integers as they work (`stats.py`); `WorkerCollector` turns those into metric families
only when Prometheus scrapes. `/healthz` answers 200 while the worker is connected to its broker
and consuming and at least one FPM endpoint is reachable, 503 with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("fastworker.metrics")

REQUEST_TIMEOUT = 10.0  # seconds a scraper may take to send its request
MAX_REQUEST = 16 * 1024  # bytes of request head read; a scrape's is a few hundred


class WorkerCollector:
    """Reads the worker's counters at scrape time. `consumer` is a ConsumerBase, `failures`
    a failure handler with `outcomes`, `executor` one with `errors` (and `pools` for FastCGI)."""

    def __init__(self, consumer: Any, failures: Any, executor: Any, concurrency: int) -> None:
        self.consumer = consumer
        self.failures = failures
        self.executor = executor
        self.concurrency = concurrency

    def describe(self) -> list[Metric]:
        return []  # no describe at registration: collect() runs only when scraped

    def collect(self) -> Iterator[Metric]:
        consumer, failures = self.consumer, self.failures
        jobs = CounterMetricFamily(
            "fastworker_jobs",
            "Jobs settled, by queue and outcome (success, retry, dead_letter, requeue: not run "
            "for infrastructure trouble) and the outcome's kind",
            labels=["queue", "outcome", "kind"],
        )
        dead = CounterMetricFamily(
            "fastworker_dead_letters",
            "Jobs dead-lettered, by queue and kind",
            labels=["queue", "kind"],
        )
        for queue, n in sorted(consumer.succeeded.items()):
            jobs.add_metric([queue, "success", "ok"], n)
        for (queue, outcome, kind), n in sorted(failures.outcomes.items()):
            jobs.add_metric([queue, outcome, kind], n)
            if outcome == "dead_letter":
                dead.add_metric([queue, kind], n)
        yield jobs
        yield dead
        durations = HistogramMetricFamily(
            "fastworker_job_duration_seconds",
            "Time from a job's start to its settling (ack, retry or dead letter), by queue",
            labels=["queue"],
        )
        histogram = consumer.durations
        for queue, counts in sorted(histogram.counts.items()):
            buckets, total = [], 0
            for bound, n in zip((*histogram.bounds, float("inf")), counts, strict=True):
                total += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
            durations.add_metric([queue], buckets, histogram.sums[queue])
        yield durations
        yield GaugeMetricFamily(
            "fastworker_inflight_jobs", "Jobs started and not settled", value=consumer.in_flight
        )
        yield GaugeMetricFamily(
            "fastworker_concurrency",
            "Most connections per FPM endpoint (--concurrency)",
            value=self.concurrency,
        )
        connections = GaugeMetricFamily(
            "fastworker_fpm_connections", "Open FPM connections, by endpoint", labels=["endpoint"]
        )
        for pool in _pools(self.executor):
            connections.add_metric([str(pool.endpoint)], pool.open_connections)
        yield connections
        errors = CounterMetricFamily(
            "fastworker_fpm_errors",
            "Jobs that did not succeed, by FPM endpoint and kind (php_error, timeout, lost, "
            "unavailable, ...)",
            labels=["endpoint", "kind"],
        )
        for (endpoint, kind), n in sorted(getattr(self.executor, "errors", {}).items()):
            errors.add_metric([endpoint, kind], n)
        yield errors
        paused = GaugeMetricFamily(
            "fastworker_paused", "1 while the queue is paused (fastworker pause)", labels=["queue"]
        )
        for queue in consumer.queues:
            paused.add_metric([queue], 1.0 if queue in getattr(consumer, "paused", ()) else 0.0)
        yield paused
        yield CounterMetricFamily(
            "fastworker_broker_reconnects",
            "Broker sessions opened after the first",
            value=consumer.reconnects,
        )
        acks = CounterMetricFamily(
            "fastworker_broker_acks",
            "Ack frames sent to the broker: one multiple ack covers a run of finished jobs, a "
            "single one a job that finished behind a running one (AMQP)",
            labels=["multiple"],
        )
        for kind, n in getattr(consumer, "ack_frames", {}).items():
            acks.add_metric(["true" if kind == "multiple" else "false"], n)
        yield acks


def _pools(executor: Any) -> list[Any]:
    pools = getattr(executor, "pools", None)
    return pools.pools() if pools is not None else []


def health(consumer: Any, executor: Any) -> tuple[bool, str]:
    """(healthy, why): consuming, and not every FPM endpoint failing to connect."""
    if not consumer.connected.is_set():
        return False, "not consuming: the broker connection is lost or not yet made"
    pools = _pools(executor)
    down = [p for p in pools if p.connect_failures and not p.open_connections]
    if pools and len(down) == len(pools):
        names = ", ".join(str(p.endpoint) for p in down)
        return False, f"every FPM endpoint is down ({names})"
    paused = getattr(consumer, "paused", None)
    if paused:
        return True, f"consuming; paused: {', '.join(sorted(paused))}"
    return True, "consuming"


class MetricsServer:
    """A minimal HTTP/1.1 server for GET /metrics and GET /healthz, one request per
    connection; on the loop, so what it reads is never changing under it."""

    def __init__(self, collector: WorkerCollector, healthy: Callable[[], tuple[bool, str]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)  # type: ignore[arg-type]
        self.healthy = healthy
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> str:
        """Listens; returns "host:port" (port 0 picks a free one). ValueError if it cannot."""
        try:
            self.server = await asyncio.start_server(self._serve, host, port)
        except OSError as exc:
            raise ValueError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} "
                "(--metrics-host, --metrics-port)"
            ) from None
        bound = self.server.sockets[0].getsockname()
        return f"{bound[0]}:{bound[1]}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path = _request_line(head)
            if method not in ("GET", "HEAD"):
                status, content_type, body = 405, "text/plain", b"GET only\n"
            elif path == "/metrics":
                status, content_type = 200, CONTENT_TYPE_LATEST
                body = generate_latest(self.registry)
            elif path == "/healthz":
                ok, why = self.healthy()
                status, content_type, body = (200 if ok else 503), "text/plain", f"{why}\n".encode()
            else:
                status, content_type, body = 404, "text/plain", b"try /metrics or /healthz\n"
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(
                status, "Service Unavailable"
            )
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that sends no proper request gets nothing
        except ConnectionError:
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()


def _request_line(head: bytes) -> tuple[str, str]:
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) < 2:
        return "", ""
    path = parts[1].split(b"?", 1)[0]
    return parts[0].decode("latin-1"), path.decode("latin-1")
