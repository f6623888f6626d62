"""Assembles pools, job handler and consumer from the settings, and runs them under uvloop."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import uvloop

from fastworker import __version__
from fastworker.consumer import AmqpConsumer
from fastworker.consuming import Consumer, ConsumerBase
from fastworker.executor import Executor
from fastworker.failures import FailureHandler, RetryPolicy
from fastworker.fast_consumer import FastAmqpConsumer
from fastworker.formats import parser_for
from fastworker.fpm import Endpoint, FpmPools
from fastworker.handler import JobHandler
from fastworker.targets import TargetPolicy, parse_alias

log = logging.getLogger("fastworker")

AMQP_CLIENTS: dict[str, type[ConsumerBase[Any]]] = {
    "fast": FastAmqpConsumer,
    "aiormq": AmqpConsumer,
}


@dataclass(slots=True)
class Settings:
    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    amqp_client: str = "fast"  # "fast": own connection + compiled codec; "aiormq": reference
    queues: list[str] = field(default_factory=lambda: ["sf_deferred_events"])
    fpm: list[str] = field(default_factory=lambda: ["127.0.0.1:9000"])
    fpm_alias: list[str] = field(default_factory=list)  # "NAMED=ACTUAL"
    script: str = "/var/www/bin/dispatch.php"
    allow_script: list[str] = field(default_factory=list)
    concurrency: int = 4  # connections per FPM endpoint, <= pm.max_children
    pipeline: int = 4  # requests per connection at once; jobs in flight = concurrency x this
    prefetch: int = 0  # 0: max(64, 4 x jobs in flight)
    format: str = "bundle"
    allow_param: list[str] = field(default_factory=list)  # json: more param names (globs)
    job_timeout: float = 300.0
    shutdown_timeout: float = 30.0
    connect_timeout: float = 5.0
    idle_timeout: float = 30.0
    max_message_size: int = 8 * 1024 * 1024
    max_response_head: int = 65536  # bytes of PHP's STDOUT/STDERR kept per job
    stats_interval: float = 60.0  # seconds between progress lines in the log; 0: none
    max_attempts: int = 5
    retry_delay: float = 1.0
    retry_max_delay: float = 300.0
    dead_letter_queue: str = "{queue}.failed"

    @property
    def jobs_in_flight(self) -> int:
        return self.concurrency * self.pipeline

    @property
    def effective_prefetch(self) -> int:
        return self.prefetch or max(64, 4 * self.jobs_in_flight)


def check_codecs() -> str:
    """Which codecs the worker runs on, for the log. Raises ValueError if a compiled codec
    failed to import and the pure-Python twins were not asked for: they cost several times
    the CPU, which nobody should find out from a slow queue."""
    from fastworker import codec

    missing = [
        f"{name} ({error})"
        for name, error in (
            ("fastworker._fcgi_codec", codec.FCGI_IMPORT_ERROR),
            ("fastworker._amqp_codec", codec.AMQP_IMPORT_ERROR),
        )
        if error
    ]
    if missing:
        raise ValueError(
            f"the compiled codecs did not load: {', '.join(missing)}. Reinstall fastworker "
            "(pip install . builds them; it needs gcc and the Python headers), or set "
            "FASTWORKER_NO_EXTENSIONS=1 to run on the slower pure-Python twins."
        )
    return ", ".join(
        f"{name} {'compiled' if compiled else 'pure-Python (FASTWORKER_NO_EXTENSIONS)'}"
        for name, compiled in (("FastCGI", codec.FCGI_COMPILED), ("AMQP", codec.AMQP_COMPILED))
    )


def build(settings: Settings) -> tuple[Consumer, FpmPools, FailureHandler]:
    """Everything the worker runs, wired together; must be called inside the event loop."""
    if settings.effective_prefetch < 2 * settings.jobs_in_flight:
        log.warning(
            "--prefetch %d is less than twice the jobs in flight (%d = --concurrency %d x "
            "--pipeline %d): FPM will wait for deliveries; the default is max(64, 4 x %d)",
            settings.effective_prefetch,
            settings.jobs_in_flight,
            settings.concurrency,
            settings.pipeline,
            settings.jobs_in_flight,
        )
    endpoints = [Endpoint.parse(text) for text in settings.fpm]
    aliases = dict(parse_alias(text) for text in settings.fpm_alias)
    policy = TargetPolicy(endpoints, settings.allow_script or [settings.script], aliases)
    pools = FpmPools(
        settings.concurrency,
        connect_timeout=settings.connect_timeout,
        idle_timeout=settings.idle_timeout,
        pipeline=settings.pipeline,
        max_response_head=settings.max_response_head,
    )
    failures = FailureHandler(
        RetryPolicy(
            max_attempts=settings.max_attempts,
            retry_delay=settings.retry_delay,
            retry_max_delay=settings.retry_max_delay,
            dead_letter_queue=settings.dead_letter_queue,
        )
    )
    handler = JobHandler(
        parser_for(settings.format, settings.allow_param),
        settings.script,
        Executor(pools, policy, settings.job_timeout),
        failures,
        settings.max_message_size,
    )
    try:
        consumer_class = AMQP_CLIENTS[settings.amqp_client]
    except KeyError:
        raise ValueError(f"unknown AMQP client {settings.amqp_client!r}") from None
    consumer = consumer_class(
        settings.amqp_url,
        settings.queues,
        handler,
        concurrency=settings.jobs_in_flight,
        prefetch=settings.effective_prefetch,
        prepare=failures.prepare,
        shutdown_timeout=settings.shutdown_timeout,
        max_message_size=settings.max_message_size,
    )
    consumer.in_flight_note = (
        f"{settings.concurrency} connections per FPM endpoint x pipeline {settings.pipeline} = "
        f"{settings.jobs_in_flight} jobs in flight"
    )
    return consumer, pools, failures


async def serve(settings: Settings) -> None:
    log.info("fastworker %s; codecs: %s", __version__, check_codecs())
    consumer, pools, failures = build(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, consumer, pools, signum)
    stats = None
    if settings.stats_interval > 0:
        stats = loop.create_task(_log_progress(consumer, failures, settings.stats_interval))
    try:
        await consumer.run()
    finally:
        if stats is not None:
            stats.cancel()
        await pools.close()
    log.info("stopped after %d jobs", consumer.processed)


async def _log_progress(consumer: Consumer, failures: FailureHandler, interval: float) -> None:
    """One log line per interval with work done, so operators see progress and failure rates."""
    done, counts = 0, dict(failures.counts)
    while True:
        await asyncio.sleep(interval)
        now_done, now_counts = consumer.processed, dict(failures.counts)
        if now_done == done and now_counts == counts:
            continue  # nothing happened: no line
        changes = ", ".join(
            f"{key} {n - counts.get(key, 0)}"
            for key, n in sorted(now_counts.items())
            if n != counts.get(key, 0)
        )
        log.info(
            "last %g s: %d jobs done (%.1f/s)%s",
            interval,
            now_done - done,
            (now_done - done) / interval,
            f"; {changes}" if changes else "",
        )
        done, counts = now_done, now_counts


def _on_signal(consumer: Consumer, pools: FpmPools, signum: int) -> None:
    log.info("%s received: finishing running jobs, then exiting", signal.Signals(signum).name)
    consumer.stop()
    # Jobs taken but not yet written to FPM (waiting for a connection) go back to the queue.
    pools.stop_starting()


def run(settings: Settings) -> None:
    uvloop.run(serve(settings))
