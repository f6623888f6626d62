"""The `fastworker` command: run the worker, try its settings (`check`), or inspect and replay
dead letters (`dlq`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from fastworker import __version__
from fastworker.formats import FORMATS
from fastworker.worker import Settings

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"

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
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
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
        "--amqp-url",
        default=os.environ.get("FASTWORKER_AMQP_URL", DEFAULT_URL),
        help="broker URL (default: $FASTWORKER_AMQP_URL or %(default)s)",
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
        "--queue",
        action="append",
        dest="queues",
        metavar="NAME",
        help="queue to consume; repeat for several (default: sf_deferred_events)",
    )
    p.add_argument(
        "--fpm",
        action="append",
        metavar="ADDR",
        help="PHP-FPM endpoint host:port or unix:/path a message may target; repeat "
        "for several; the first is used when a message names none "
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
        "--script",
        default=Settings.script,
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
        type=_positive_int,
        default=4,
        metavar="N",
        help="most connections per FPM endpoint; keep it <= the pool's pm.max_children "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--pipeline",
        type=_positive_int,
        default=4,
        metavar="N",
        help="requests written to one FPM connection at once: the next one waits in the "
        "socket, so the PHP child never waits for the worker; jobs in flight = "
        "--concurrency x N; 1 turns it off (default: %(default)s)",
    )
    p.add_argument(
        "--prefetch",
        type=_positive_int,
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
        "--job-timeout",
        type=_positive_float,
        default=300.0,
        metavar="S",
        help="seconds a job may run before it fails and its connection is closed "
        "(default: %(default)g); keep it below FPM's request_terminate_timeout "
        "and RabbitMQ's consumer_timeout",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="on SIGTERM/SIGINT, seconds to let in-flight jobs finish (default: %(default)g)",
    )
    p.add_argument(
        "--connect-timeout",
        type=_positive_float,
        default=5.0,
        metavar="S",
        help="seconds to open a connection to FPM (default: %(default)g)",
    )
    p.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="seconds an unused FPM connection stays open (default: %(default)g)",
    )
    p.add_argument(
        "--max-message-size",
        type=_positive_int,
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
        type=_positive_int,
        default=5,
        metavar="N",
        help="runs of a failing job before it is dead-lettered (default: %(default)s)",
    )
    p.add_argument(
        "--retry-delay",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="delay before the first retry, doubled each time (default: %(default)g)",
    )
    p.add_argument(
        "--retry-max-delay",
        type=_positive_float,
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
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        amqp_url=args.amqp_url,
        amqp_client=args.amqp_client,
        queues=args.queues or ["sf_deferred_events"],
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
        max_attempts=args.max_attempts,
        retry_delay=args.retry_delay,
        retry_max_delay=args.retry_max_delay,
        dead_letter_queue=args.dead_letter_queue,
        stats_interval=args.stats_interval,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dlq"]:
        from fastworker.dlq import main as dlq_main

        return dlq_main(argv[1:])
    if argv[:1] == ["check"]:
        return check_main(argv[1:])
    args = worker_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = settings_from(args)
    from fastworker.consuming import BrokerRefused
    from fastworker.worker import run

    try:
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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
