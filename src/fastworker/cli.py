"""The `fastworker` command: run the worker, try its settings (`check`), or inspect and replay
dead letters (`dlq`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fastworker import __version__, logs, queue_types
from fastworker.amqp_url import TLS_FLAGS, URL_HELP, broker_urls, split_urls
from fastworker.broker import masked
from fastworker.config import ConfigError, render, resolve
from fastworker.formats import FORMATS
from fastworker.worker import Settings

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
# The defaults, read from an instance: on a slots dataclass, `Settings.script` is a descriptor.
DEFAULTS = Settings()
DEFAULT_QUEUES = {"amqp": "sf_deferred_events", "sidekiq": "default"}

DESCRIPTION = """\
Runs PHP background jobs from RabbitMQ through PHP-FPM.

Each message is executed as one FastCGI request to PHP-FPM over kept-alive connections.
With the default --format bundle, messages are those of the Symfony deferred-event bundle:
header lines (dispatch_path, fastcgi_host, fastcgi_port), an empty line, then the data,
which the dispatch script receives as $_SERVER['DEFERRED_DATA'].
"""

EPILOG = """\
Keep --concurrency at or below the FPM pool's pm.max_children: each kept-alive connection
pins one FPM child, and connections beyond the children wait in FPM's backlog forever.

example:
  fastworker --amqp-url amqp://guest:guest@127.0.0.1:5672/ --queue sf_deferred_events \\
      --fpm 127.0.0.1:9000 --allow-script '/srv/app/vendor/*/dispatch.php' --concurrency 4

  fastworker check --fpm 127.0.0.1:9000 --script /srv/app/bin/dispatch.php   # try first
  fastworker dlq show --queue sf_deferred_events     # what failed, and why
  fastworker dlq --help
  fastworker web --workers http://127.0.0.1:9464     # a dashboard (fastworker web --help)
"""


def positive_int(text: str) -> int:
    """A flag value of at least 1 (argparse type; dlq and web use it too)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A flag value above 0 (argparse type; web uses it too)."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _priority(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"must be 1-255 (0: off), got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (0-65535), got {value}")
    return value


def _response_head(text: str) -> int:
    value = int(text)
    if value < 1024:
        raise argparse.ArgumentTypeError(f"must be at least 1024, got {value}")
    return value


def worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastworker",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"fastworker {__version__}")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML file of settings: the long flag names with _ for - as keys, lists for "
        "repeatable flags; flags beat FASTWORKER_* environment variables (e.g. "
        "FASTWORKER_JOB_TIMEOUT=60, FASTWORKER_QUEUE=a,b), which beat the file "
        "(default: $FASTWORKER_CONFIG); `fastworker config` shows the result",
    )
    p.add_argument(
        "--amqp-url",
        action="append",
        metavar="URL",
        help=f"{URL_HELP} (default: $FASTWORKER_AMQP_URL, a comma list, or {DEFAULT_URL})",
    )
    for flag, dest, text in TLS_FLAGS:
        p.add_argument(flag, dest=dest, metavar="PATH", help=text)
    p.add_argument(
        "--queue-type",
        choices=queue_types.QUEUE_TYPES,
        default=queue_types.CLASSIC,
        help="how the worker declares the queues it finds missing (the work queue, its "
        "<queue>.retry.<ms>ms delay queues and its dead-letter queue): classic, or quorum "
        "(replicated over a RabbitMQ cluster, always durable); existing queues are used as "
        "they are (default: %(default)s)",
    )
    p.add_argument(
        "--amqp-client",
        choices=["fast", "aiormq"],
        default="fast",
        help="how deliveries are consumed and acked: fast (its own AMQP connection and "
        "compiled frame codec) or aiormq (the reference implementation); declares, retries "
        "and dead letters always use aiormq (default: %(default)s)",
    )
    p.add_argument(
        "--backend",
        choices=["amqp", "sidekiq"],
        default="amqp",
        help="where jobs come from: amqp (RabbitMQ, --amqp-url) or sidekiq (the jobs Sidekiq's "
        "client pushes to Redis, --redis-url; retries and dead jobs in Sidekiq's own retry "
        "and dead sets) (default: %(default)s)",
    )
    p.add_argument(
        "--redis-url",
        default=DEFAULTS.redis_url,
        help="--backend sidekiq: Redis URL (default: $FASTWORKER_REDIS_URL or %(default)s)",
    )
    p.add_argument(
        "--sidekiq-class",
        action="append",
        metavar="NAME",
        help="--backend sidekiq: job class to run (others are moved to the dead set); repeat "
        "for several (default: DeferEvent)",
    )
    p.add_argument(
        "--queue",
        action="append",
        dest="queues",
        metavar="NAME",
        help="queue to consume; repeat for several (default: sf_deferred_events; with "
        "--backend sidekiq: default, i.e. Redis list queue:default)",
    )
    p.add_argument(
        "--fpm",
        action="append",
        metavar="ADDR[=max:N]",
        help="PHP-FPM endpoint host:port or unix:/path a message may target; repeat "
        "for several; the first is used when a message names none; =max:N gives it its own "
        "cap on connections instead of --concurrency "
        "(default: 127.0.0.1:9000; 'localhost' in messages means 127.0.0.1)",
    )
    p.add_argument(
        "--fpm-alias",
        action="append",
        metavar="NAMED=ACTUAL",
        default=[],
        help="a message naming the endpoint NAMED runs on ACTUAL, which must be listed with "
        "--fpm; repeat for several (e.g. localhost:9000=unix:/run/php/php8.2-fpm.sock: the "
        "bundle's default endpoint, on Debian's stock pool)",
    )
    p.add_argument(
        "--route",
        choices=["message", "balance"],
        default="message",
        help="message: each job runs on the endpoint its message names (the bundle's "
        "fastcgi_host/port, else the first --fpm); balance: on whichever healthy --fpm "
        "endpoint has the fewest jobs in flight, an endpoint that refuses connections ejected "
        "and probed back with backoff (default: %(default)s)",
    )
    p.add_argument(
        "--processes",
        default="1",
        metavar="N|auto",
        help="worker processes under one supervisor, each with its own loop and broker "
        "connection; each endpoint's cap is split between them; auto: one per CPU "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--script",
        default=DEFAULTS.script,
        metavar="PATH",
        help="script for messages that name none (default: %(default)s)",
    )
    p.add_argument(
        "--allow-script",
        action="append",
        metavar="GLOB",
        default=[],
        help="glob of scripts a message may name; repeat for several; '*' also "
        "matches '/' (default: only --script)",
    )
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=4,
        metavar="N",
        help="most connections per FPM endpoint; keep it <= the pool's pm.max_children; "
        "with --executor cli, most console processes at once (default: %(default)s)",
    )
    p.add_argument(
        "--pipeline",
        type=positive_int,
        default=4,
        metavar="N",
        help="requests written to one FPM connection at once: the next one waits in the "
        "socket, so the PHP child never waits for the worker; jobs in flight = "
        "--concurrency x N; 1 turns it off (default: %(default)s)",
    )
    p.add_argument(
        "--prefetch",
        type=positive_int,
        default=0,
        metavar="N",
        help="unacked messages the broker may send ahead (default: max(64, 4 x jobs in flight))",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="bundle",
        help='message format (default: %(default)s); json: {"script", "params", '
        '"body", "fpm"}; raw: body to STDIN, AMQP properties as AMQP_* params',
    )
    p.add_argument(
        "--allow-param",
        action="append",
        metavar="GLOB",
        default=[],
        help="json format: glob of param names a message may set besides JOB_PARAM_*; "
        "repeat for several; case-sensitive; names CGI, FPM or PHP interpret (PHP_VALUE, "
        "SCRIPT_FILENAME, HTTP_*, ...) stay refused (default: only JOB_PARAM_*)",
    )
    p.add_argument(
        "--executor",
        choices=["fastcgi", "cli"],
        default="fastcgi",
        help="how a job runs: fastcgi (a request to PHP-FPM) or cli (for compatibility, "
        "several times slower: a process per job, PHP_BIN CONSOLE fervo:deferred-event:dispatch "
        "DATA, at most --concurrency at once; bundle format only) (default: %(default)s)",
    )
    p.add_argument(
        "--php-bin",
        default=DEFAULTS.php_bin,
        metavar="PATH",
        help="--executor cli: PHP binary for messages that name no php_bin (default: %(default)s)",
    )
    p.add_argument(
        "--console",
        metavar="PATH",
        help="--executor cli: the app's console for messages that name no console_path "
        "(default: none, messages must name it)",
    )
    p.add_argument(
        "--allow-php-bin",
        action="append",
        metavar="GLOB",
        default=[],
        help="--executor cli: glob of php_bin paths a message may name; repeat for several "
        "(default: only --php-bin)",
    )
    p.add_argument(
        "--allow-console",
        action="append",
        metavar="GLOB",
        default=[],
        help="--executor cli: glob of console_path paths a message may name; repeat for "
        "several (default: only --console)",
    )
    p.add_argument(
        "--job-timeout",
        type=positive_float,
        default=300.0,
        metavar="S",
        help="seconds a job may run before it fails and its connection is closed "
        "(default: %(default)g); keep it below FPM's request_terminate_timeout "
        "and RabbitMQ's consumer_timeout",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="on SIGTERM/SIGINT, seconds to let in-flight jobs finish (default: %(default)g)",
    )
    p.add_argument(
        "--connect-timeout",
        type=positive_float,
        default=5.0,
        metavar="S",
        help="seconds to open a connection to FPM (default: %(default)g)",
    )
    p.add_argument(
        "--idle-timeout",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="seconds an unused FPM connection stays open (default: %(default)g)",
    )
    p.add_argument(
        "--max-message-size",
        type=positive_int,
        default=8 * 1024 * 1024,
        metavar="BYTES",
        help="larger messages are dead-lettered as bad_message (default: %(default)s)",
    )
    p.add_argument(
        "--max-response-head",
        type=_response_head,
        default=65536,
        metavar="BYTES",
        help="head of PHP's STDOUT and of its STDERR kept per job, for the Status header and "
        "the error text; the rest is counted and discarded (default: %(default)s, "
        "at least 1024)",
    )
    p.add_argument(
        "--max-attempts",
        type=positive_int,
        default=5,
        metavar="N",
        help="runs of a failing job before it is dead-lettered (default: %(default)s)",
    )
    p.add_argument(
        "--retry-delay",
        type=positive_float,
        default=1.0,
        metavar="S",
        help="delay before the first retry, doubled each time (default: %(default)g)",
    )
    p.add_argument(
        "--retry-max-delay",
        type=positive_float,
        default=300.0,
        metavar="S",
        help="longest delay between retries (default: %(default)g)",
    )
    p.add_argument(
        "--dead-letter-queue",
        default="{queue}.failed",
        metavar="NAME",
        help="where failed jobs go, {queue} is the work queue (default: %(default)s)",
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds between progress lines in the log (jobs done, retried, dead-lettered); "
        "0 turns them off (default: %(default)g)",
    )
    p.add_argument(
        "--max-priority",
        type=_priority,
        default=0,
        metavar="N",
        help="1-255: jobs delivered but not started yet start highest priority first (the "
        "AMQP priority property, or a bundle message's 'priority:' line), and queues the "
        "worker declares get x-max-priority N (default: off)",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=0,
        metavar="PORT",
        help="serve Prometheus metrics on /metrics and a health check on /healthz (200 while "
        "consuming, 503 otherwise) on this port (default: off)",
    )
    p.add_argument(
        "--metrics-host",
        default=DEFAULTS.metrics_host,
        metavar="HOST",
        help="address the metrics port listens on (default: %(default)s)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one JSON object per line (time, level, logger, message, and a job's queue, "
        "kind, attempt, endpoint, script) (default: %(default)s)",
    )
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        backend=args.backend,
        route=args.route,
        processes=args.processes,
        amqp_url=args.amqp_url or [DEFAULT_URL],
        queue_type=args.queue_type,
        amqp_ca=args.amqp_ca,
        amqp_cert=args.amqp_cert,
        amqp_key=args.amqp_key,
        redis_url=args.redis_url,
        sidekiq_class=args.sidekiq_class or ["DeferEvent"],
        amqp_client=args.amqp_client,
        queues=args.queues or [DEFAULT_QUEUES[args.backend]],
        fpm=args.fpm or ["127.0.0.1:9000"],
        fpm_alias=args.fpm_alias,
        script=args.script,
        allow_script=args.allow_script,
        concurrency=args.concurrency,
        pipeline=args.pipeline,
        prefetch=args.prefetch,
        format=args.format,
        job_timeout=args.job_timeout,
        shutdown_timeout=args.shutdown_timeout,
        connect_timeout=args.connect_timeout,
        idle_timeout=args.idle_timeout,
        max_message_size=args.max_message_size,
        max_response_head=args.max_response_head,
        allow_param=args.allow_param,
        executor=args.executor,
        php_bin=args.php_bin,
        console=args.console,
        allow_php_bin=args.allow_php_bin,
        allow_console=args.allow_console,
        max_attempts=args.max_attempts,
        retry_delay=args.retry_delay,
        retry_max_delay=args.retry_max_delay,
        dead_letter_queue=args.dead_letter_queue,
        stats_interval=args.stats_interval,
        max_priority=args.max_priority,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dlq"]:
        from fastworker.dlq import main as dlq_main

        return dlq_main(argv[1:])
    if argv[:1] == ["web"]:
        from fastworker.web import main as web_main

        return web_main(argv[1:])
    if argv[:1] == ["check"]:
        return check_main(argv[1:])
    if argv[:1] == ["config"]:
        return config_main(argv[1:])
    if argv[:1] in (["pause"], ["resume"]):
        return control_main(argv[0], argv[1:])
    try:
        args = resolve(worker_parser(), argv).args
    except ConfigError as exc:
        print(f"fastworker: {exc}", file=sys.stderr)
        return 2
    logs.configure(args.log_level, args.log_format)
    settings = settings_from(args)
    from fastworker.consuming import BrokerRefused
    from fastworker.supervisor import Supervisor, process_count, slot
    from fastworker.worker import run

    try:
        index, count = slot()
        if count > 1:  # a child of the supervisor: its share of the caps
            settings = settings.for_process(index, count)
        elif settings.processes != "1":
            count = process_count(settings.processes, settings.endpoint_caps())
            if count > 1:
                return Supervisor(argv, count).run()
        run(settings)
    except (ValueError, BrokerRefused) as exc:  # bad --fpm address, a refused login, ...
        print(f"fastworker: {exc}", file=sys.stderr)
        return 2
    return 0


def check_main(argv: list[str]) -> int:
    """`fastworker check`: the worker's flags, tried once (see fastworker.check)."""
    parser = worker_parser()
    parser.prog = "fastworker check"
    parser.description = (
        "Tries the settings the worker would run with: the broker and its queues, one FastCGI "
        "request for --script to each --fpm endpoint, and the allow-lists against the "
        "deferred-event bundle's defaults. Exit 0 when everything works, 1 otherwise."
    )
    parser.epilog = None
    try:
        args = resolve(parser, argv).args
    except ConfigError as exc:
        print(f"fastworker check: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR)
    import asyncio

    from fastworker.check import check, report

    try:
        findings = asyncio.run(check(settings_from(args)))
    except ValueError as exc:  # a bad --fpm or --fpm-alias
        print(f"fastworker check: {exc}", file=sys.stderr)
        return 2
    print(report(findings))
    return 0 if all(finding.ok for finding in findings) else 1


def config_main(argv: list[str]) -> int:
    """`fastworker config`: the settings the worker would run with, and where each came from,
    as a TOML file one could start from."""
    parser = worker_parser()
    parser.prog = "fastworker config"
    parser.description = (
        "Prints the effective settings (flags > FASTWORKER_* environment > --config file > "
        "defaults) as TOML, each line saying where its value came from; passwords masked."
    )
    parser.epilog = None
    try:
        resolved = resolve(parser, argv)
    except ConfigError as exc:
        print(f"fastworker config: {exc}", file=sys.stderr)
        return 2
    settings = settings_from(resolved.args)
    effective = {}
    for key, option in resolved.options.items():
        value = getattr(settings, option.dest, getattr(resolved.args, option.dest, None))
        if key == "amqp_url" and value:  # one URL as a string, a cluster's as a list
            value = [masked(url) for url in split_urls(value)]
            value = value[0] if len(value) == 1 else value
        effective[key] = masked(value) if key.endswith("_url") and isinstance(value, str) else value
    if resolved.args.config:
        print(f"# settings file: {resolved.args.config}")
    print(render(resolved, effective))
    return 0


def control_main(action: str, argv: list[str]) -> int:
    """`fastworker pause|resume`: every worker of a queue, on every host, through the broker
    (see fastworker.control)."""
    import asyncio

    from fastworker.amqp_nodes import Nodes
    from fastworker.config import preset

    parser = argparse.ArgumentParser(
        prog=f"fastworker {action}",
        description=(
            "Stops every worker consuming the queue, on every host, from taking new jobs: "
            "jobs already running finish, the ones delivered and not started go back to the "
            "queue, and workers that start later stay off it until `fastworker resume`."
            if action == "pause"
            else "Lets every worker take jobs from the paused queue again."
        ),
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--queue", action="append", metavar="NAME", help="repeatable")
    target.add_argument("--all", action="store_true", help="every queue of every worker")
    parser.add_argument("--config", metavar="FILE", help="the worker's TOML settings file")
    parser.add_argument("--amqp-url", action="append", help="broker URL(s), as for the worker")
    for flag, dest, text in TLS_FLAGS:
        parser.add_argument(flag, dest=dest, metavar="PATH", help=text)
    parser.add_argument(
        "--wait",
        type=positive_float,
        default=3.0,
        metavar="S",
        help="seconds to collect the workers' answers (default: %(default)g)",
    )
    try:
        values = preset(worker_parser(), ("amqp_url", "amqp_ca", "amqp_cert", "amqp_key"), argv)
    except ConfigError as exc:
        print(f"fastworker {action}: {exc}", file=sys.stderr)
        return 2
    urls_found = values.pop("amqp_url", None)  # flags replace it, they do not add to it
    parser.set_defaults(**values)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from fastworker import control

    queues = [control.ALL] if args.all else args.queue
    try:
        urls = broker_urls(
            args.amqp_url or urls_found or [DEFAULT_URL],
            args.amqp_ca,
            args.amqp_cert,
            args.amqp_key,
        )
        answers, node = asyncio.run(control.send(Nodes.parse(urls), action, queues, args.wait))
    except Exception as exc:  # noqa: BLE001 - one line, whatever the broker said
        print(f"fastworker {action}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    what = "every queue" if args.all else ", ".join(queues)
    done = "paused" if action == "pause" else "resumed"
    workers = sorted(answer.get("worker", "?") for answer in answers if answer.get("queues"))
    print(
        f"{done} {what} (broker {node}): {len(workers)} workers acknowledged"
        + (f": {', '.join(workers)}" if workers else "")
    )
    if not workers:
        recorded = "workers that start stay off it" if action == "pause" else "nothing is paused"
        print(
            f"no worker consuming it answered within {args.wait:g} s; the state is recorded: "
            f"{recorded}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
