"""Assembles pools, job handler and consumer from the settings, and runs them under uvloop."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import uvloop

from fastworker import __version__, queue_types, sidekiq_jobs
from fastworker.amqp_url import broker_urls
from fastworker.balance import Balancer
from fastworker.console_executor import ConsoleExecutor, ConsoleTargets, check_programs
from fastworker.consumer import AmqpConsumer
from fastworker.consuming import Consumer, ConsumerBase
from fastworker.executor import Executor
from fastworker.failures import FailureHandler, RetryPolicy
from fastworker.fast_consumer import FastAmqpConsumer
from fastworker.formats import parse_event_data, parser_for
from fastworker.fpm import FpmPools
from fastworker.handler import Failures, JobHandler
from fastworker.job_context import amqp_context
from fastworker.supervisor import share
from fastworker.targets import TargetPolicy, parse_alias, parse_fpm

if TYPE_CHECKING:  # imported where used: a worker without them never loads redis-py or prometheus
    from fastworker.metrics import MetricsServer

log = logging.getLogger("fastworker")

BACKENDS = ("amqp", "sidekiq")
AMQP_CLIENTS: dict[str, type[ConsumerBase[Any]]] = {
    "fast": FastAmqpConsumer,
    "aiormq": AmqpConsumer,
}


@dataclass(slots=True)
class Settings:
    backend: str = "amqp"  # "amqp": RabbitMQ queues; "sidekiq": Sidekiq's queues in Redis
    route: str = "message"  # "message": the endpoint a job names; "balance": the least busy
    processes: str = "1"  # worker processes under a supervisor: a number, or "auto"
    # --amqp-url, repeatable: a cluster's nodes, tried in order (amqp_nodes); a str is one URL
    # or a comma list
    amqp_url: list[str] = field(default_factory=lambda: ["amqp://guest:guest@localhost:5672/"])
    queue_type: str = "classic"  # how queues the worker declares are declared: classic|quorum
    # --amqp-ca / --amqp-cert / --amqp-key: the URL's cacertfile= / certfile= / keyfile=
    amqp_ca: str | None = None
    amqp_cert: str | None = None
    amqp_key: str | None = None
    redis_url: str = "redis://localhost:6379/0"  # --backend sidekiq
    sidekiq_class: list[str] = field(default_factory=lambda: ["DeferEvent"])
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
    executor: str = "fastcgi"  # "fastcgi": PHP-FPM requests; "cli": a console process per job
    php_bin: str = "/usr/bin/php"  # --executor cli: for messages that name no php_bin
    console: str | None = None  # --executor cli: for messages that name no console_path
    allow_php_bin: list[str] = field(default_factory=list)  # globs; default: only php_bin
    allow_console: list[str] = field(default_factory=list)  # globs; default: only console
    job_timeout: float = 300.0
    shutdown_timeout: float = 30.0
    connect_timeout: float = 5.0
    idle_timeout: float = 30.0
    max_message_size: int = 8 * 1024 * 1024
    max_response_head: int = 65536  # bytes of PHP's STDOUT/STDERR kept per job
    stats_interval: float = 60.0  # seconds between progress lines in the log; 0: none
    max_priority: int = 0  # >0: start waiting jobs highest AMQP priority first; queues declared so
    metrics_port: int = 0  # Prometheus /metrics and /healthz on this port; 0: off
    metrics_host: str = "127.0.0.1"
    max_attempts: int = 5
    retry_delay: float = 1.0
    retry_max_delay: float = 300.0
    dead_letter_queue: str = "{queue}.failed"

    @property
    def effective_amqp_urls(self) -> list[str]:
        """Each --amqp-url with --amqp-ca/--amqp-cert/--amqp-key in its query: one URL says it
        all, for every node."""
        return broker_urls(self.amqp_url, self.amqp_ca, self.amqp_cert, self.amqp_key)

    @property
    def effective_amqp_url(self) -> str:
        """The first of `effective_amqp_urls`."""
        return self.effective_amqp_urls[0]

    @property
    def jobs_in_flight(self) -> int:
        if self.executor == "cli":
            return self.concurrency  # one process per job: nothing to pipeline
        if self.route == "balance":  # every endpoint at once: the sum of their caps
            return sum(self.endpoint_caps()) * self.pipeline
        return self.concurrency * self.pipeline

    def endpoint_caps(self) -> list[int]:
        """Each --fpm endpoint's cap on connections (its =max:N, else --concurrency)."""
        return [parse_fpm(text)[1] or self.concurrency for text in dict.fromkeys(self.fpm)]

    def for_process(self, index: int, count: int) -> Settings:
        """These settings for worker process `index` of `count` under the supervisor: its share
        of every endpoint's cap (the shares add up to the cap) and its own metrics port."""
        if count == 1:
            return self
        fpm = []
        for text in self.fpm:
            _, cap = parse_fpm(text)
            address = text.rpartition("=max:")[0] if cap else text
            fpm.append(f"{address}=max:{share(cap or self.concurrency, index, count)}")
        return replace(
            self,
            fpm=fpm,
            concurrency=max(1, share(self.concurrency, index, count)),
            metrics_port=self.metrics_port + index if self.metrics_port else 0,
            processes="1",
        )

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


def build(settings: Settings) -> tuple[Consumer, Executor | ConsoleExecutor, Failures]:
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
    executor = build_executor(settings)
    retry_policy = RetryPolicy(
        max_attempts=settings.max_attempts,
        retry_delay=settings.retry_delay,
        retry_max_delay=settings.retry_max_delay,
        dead_letter_queue=settings.dead_letter_queue,
    )
    sidekiq = settings.backend == "sidekiq"
    if settings.backend not in BACKENDS:
        raise ValueError(f"unknown backend {settings.backend!r}; choose amqp or sidekiq")
    failures: Failures
    if sidekiq:
        from fastworker.sidekiq_failures import SidekiqFailures

        failures = SidekiqFailures(retry_policy)
    else:
        failures = amqp_failures = FailureHandler(retry_policy)
    handler = JobHandler(
        parse_event_data
        if sidekiq
        else parser_for(settings.format, settings.allow_param, settings.executor == "cli"),
        settings.script,
        executor,
        failures,
        settings.max_message_size,
        sidekiq_jobs.context if sidekiq else amqp_context,  # FASTWORKER_* params, delays
    )
    consumer: ConsumerBase[Any]
    # What every consumer takes, whichever broker it reads.
    common: dict[str, Any] = {
        "concurrency": settings.jobs_in_flight,
        "prefetch": settings.effective_prefetch,
        "shutdown_timeout": settings.shutdown_timeout,
        "max_message_size": settings.max_message_size,
    }
    if sidekiq:
        from fastworker.sidekiq_consumer import SidekiqConsumer

        consumer = SidekiqConsumer(settings.redis_url, settings.queues, handler, **common)
        consumer.classes = tuple(settings.sidekiq_class)
        # Due retries are looked for at least twice per --retry-delay, at most 10 times a second.
        consumer.poll_interval = min(1.0, max(0.1, settings.retry_delay / 2))
    else:
        try:
            consumer_class = AMQP_CLIENTS[settings.amqp_client]
        except KeyError:
            raise ValueError(f"unknown AMQP client {settings.amqp_client!r}") from None
        consumer = consumer_class(
            settings.effective_amqp_urls,
            settings.queues,
            handler,
            prepare=amqp_failures.prepare,
            **common,
        )
        # Queues it declares because they are missing: the work queue, its delay and
        # dead-letter queues.
        consumer.queue_type = amqp_failures.queue_type = queue_types.check(settings.queue_type)
        consumer.max_priority = settings.max_priority
        if len(settings.effective_amqp_urls) > 1 and settings.queue_type == queue_types.CLASSIC:
            log.warning(
                "several --amqp-url (a cluster) with --queue-type classic: a queue this worker "
                "declares (the work queue if missing, the delay and dead-letter queues) lives "
                "on one node, and while that node is down no worker can consume from it or "
                "retry into it; --queue-type quorum replicates them"
            )
    consumer.prioritize(settings.max_priority)
    consumer.in_flight_note = (
        f"{settings.concurrency} connections per FPM endpoint x pipeline {settings.pipeline} = "
        f"{settings.jobs_in_flight} jobs in flight"
    )
    if settings.route == "balance" and not isinstance(executor, ConsoleExecutor):
        caps = settings.endpoint_caps()
        consumer.in_flight_note = (
            f"balanced over {len(caps)} FPM endpoints with {'+'.join(map(str, caps))} "
            f"connections x pipeline {settings.pipeline} = {settings.jobs_in_flight} jobs in flight"
        )
    if isinstance(executor, ConsoleExecutor):
        consumer.in_flight_note = (
            f"--executor cli: at most {settings.concurrency} console processes = "
            f"{settings.jobs_in_flight} jobs in flight, --pipeline does not apply"
        )
    return consumer, executor, failures


def build_executor(settings: Settings) -> Executor | ConsoleExecutor:
    """The FastCGI executor and its pools, or the console one (--executor cli)."""
    if settings.executor == "cli":
        check_programs(settings.php_bin, settings.console)
        targets = ConsoleTargets(
            settings.php_bin, settings.console, settings.allow_php_bin, settings.allow_console
        )
        return ConsoleExecutor(
            targets, settings.job_timeout, settings.concurrency, settings.max_response_head
        )
    if settings.executor != "fastcgi":
        raise ValueError(f"unknown executor {settings.executor!r}; choose fastcgi or cli")
    specs = [parse_fpm(text) for text in settings.fpm]
    endpoints = [endpoint for endpoint, _ in specs]
    aliases = dict(parse_alias(text) for text in settings.fpm_alias)
    policy = TargetPolicy(endpoints, settings.allow_script or [settings.script], aliases)
    pools = FpmPools(
        settings.concurrency,
        {endpoint: cap for endpoint, cap in specs if cap is not None},
        connect_timeout=settings.connect_timeout,
        idle_timeout=settings.idle_timeout,
        pipeline=settings.pipeline,
        batch_writes=True,
        max_response_head=settings.max_response_head,
    )
    if settings.route == "balance":
        balancer = Balancer([pools.get(endpoint) for endpoint in dict.fromkeys(endpoints)])
        return Executor(pools, policy, settings.job_timeout, balancer)
    if settings.route != "message":
        raise ValueError(f"unknown route {settings.route!r}; choose message or balance")
    return Executor(pools, policy, settings.job_timeout)


async def serve(settings: Settings) -> None:
    log.info("fastworker %s; codecs: %s", __version__, check_codecs())
    consumer, executor, failures = build(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, consumer, executor, signum)
    metrics: MetricsServer | None = None
    if settings.metrics_port:
        from fastworker.metrics import MetricsServer, WorkerCollector, health

        collector = WorkerCollector(consumer, failures, executor, settings.concurrency)
        metrics = MetricsServer(collector, partial(health, consumer, executor))
        where = await metrics.start(settings.metrics_host, settings.metrics_port)
        log.info("metrics on http://%s/metrics, health on http://%s/healthz", where, where)
    stats = None
    if settings.stats_interval > 0:
        stats = loop.create_task(_log_progress(consumer, failures, settings.stats_interval))
    control = await _control(consumer) if settings.backend == "amqp" else None
    settled = loop.create_task(_settle_heap_once_consuming(consumer))
    try:
        await consumer.run()
    finally:
        settled.cancel()
        if control is not None:
            control.cancel()
        if stats is not None:
            stats.cancel()
        if metrics is not None:
            await metrics.close()
        await executor.close()
    log.info("stopped after %d jobs", consumer.processed)


def settle_heap() -> int:
    """Collects once, then moves every object that exists now out of the cyclic GC's sight
    (`gc.freeze`), and returns how many. Start-up leaves some 30,000 long-lived objects
    (modules, settings, connections); each full collection would scan them all, 7-10 ms with
    the event loop stalled and every job waiting to be read or written. Frozen, a full
    collection scans only what jobs made since."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def _settle_heap_once_consuming(consumer: Consumer) -> None:
    """`settle_heap` when the first session consumes: what connecting made is frozen too."""
    await consumer.connected.wait()
    log.debug("%d start-up objects frozen out of the cyclic GC", settle_heap())


async def _control(consumer: Any) -> asyncio.Task[None] | None:
    """The pause/resume listener (control.py), after applying the paused state the broker
    holds, so the first session already leaves paused queues alone."""
    from fastworker import broker, control

    nodes = consumer.nodes
    try:
        _, connection = await broker.connect_any(nodes, "control")
        try:
            consumer.paused.update(await control.paused_queues(connection, consumer.queues))
        finally:
            await connection.close()
    except Exception as exc:  # noqa: BLE001 - the consumer's own connect says what is wrong
        log.debug("paused state not read at start: %r", exc)
    if consumer.paused:
        log.warning(
            "paused at start (fastworker resume to go on): %s", ", ".join(sorted(consumer.paused))
        )
    return asyncio.get_running_loop().create_task(control.ControlListener(nodes, consumer).run())


async def _log_progress(consumer: Consumer, failures: Failures, interval: float) -> None:
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


def _on_signal(consumer: Consumer, executor: Executor | ConsoleExecutor, signum: int) -> None:
    log.info("%s received: finishing running jobs, then exiting", signal.Signals(signum).name)
    consumer.stop()
    # Jobs taken but not started yet (waiting for an FPM connection or a process slot) go
    # back to the queue.
    executor.stop_starting()


def run(settings: Settings) -> None:
    uvloop.run(serve(settings))
