"""`fastworker web`: the dashboard, a process of its own beside the workers.

Why a separate process: the worker's hot path stays free of it, and the dashboard reads only what
the workers already publish (`--metrics-port`) plus the broker's (or Redis's) queues. It takes
the worker's broker, queue and retry settings from the same places the worker does (its
`--config` file and FASTWORKER_* variables, then these flags), and its own from flags or
FASTWORKER_WEB_LISTEN, FASTWORKER_WEB_WORKERS and FASTWORKER_WEB_AUTH (kept out of the worker's
config file, whose unknown keys the worker refuses).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fastworker import logs
from fastworker.amqp_nodes import Nodes
from fastworker.amqp_url import TLS_FLAGS, URL_HELP, UrlError, broker_urls
from fastworker.cli import positive_float, positive_int
from fastworker.failures import RetryPolicy
from fastworker.formats import FORMATS
from fastworker.web_letters import ParseSettings
from fastworker.web_security import (
    DEFAULT_LISTEN,
    Credentials,
    SecurityError,
    check_exposure,
    parse_listen,
)

if TYPE_CHECKING:
    from fastworker.web_app import WebSettings

log = logging.getLogger("fastworker.web")

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_QUEUES = {"amqp": "sf_deferred_events", "sidekiq": "default"}
# The worker's settings the dashboard reads as its defaults (from $FASTWORKER_* and --config).
PRESET_KEYS = (
    "backend",
    "amqp_url",
    "amqp_ca",
    "amqp_cert",
    "amqp_key",
    "redis_url",
    "queue",
    "dead_letter_queue",
    "retry_delay",
    "retry_max_delay",
    "format",
    "script",
    "allow_param",
    "metrics_port",
    "metrics_host",
)
# The dashboard's own variables, by dest.
WEB_ENV = {
    "listen": "FASTWORKER_WEB_LISTEN",
    "workers": "FASTWORKER_WEB_WORKERS",
    "auth": "FASTWORKER_WEB_AUTH",
}

EPILOG = """\
examples:
  fastworker web --config /etc/fastworker/fastworker.toml --workers http://127.0.0.1:9464
  FASTWORKER_WEB_AUTH=ops:s3cret fastworker web --listen 0.0.0.0:8090 \\
      --amqp-url amqp://guest:guest@127.0.0.1:5672/ --queue orders --queue mail \\
      --workers http://10.0.0.5:9464 --workers http://10.0.0.6:9464

Listening on anything but a loopback address needs --auth; put a reverse proxy with TLS in
front of it, since basic auth sends the password with every request.
"""


def build_parser(defaults: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastworker web",
        description="A web dashboard: live job rates, queues, workers' health, and the failed "
        "jobs with their errors, replayed or deleted from the browser.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="the worker's TOML settings file: broker, queues, dead-letter queue, retry delays "
        "(default: $FASTWORKER_CONFIG)",
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help="address to serve on; anything but loopback needs --auth "
        "(default: $FASTWORKER_WEB_LISTEN or %(default)s)",
    )
    p.add_argument(
        "--workers",
        action="append",
        metavar="URL",
        help="a worker's metrics endpoint, http://HOST:PORT as its --metrics-port serves it; "
        "repeat for several (default: $FASTWORKER_WEB_WORKERS, a comma-separated list, or "
        "the config's metrics_port on metrics_host)",
    )
    p.add_argument(
        "--auth",
        metavar="USER:PASSWORD",
        help="HTTP basic auth for every page (default: $FASTWORKER_WEB_AUTH, which keeps the "
        "password out of the process list)",
    )
    p.add_argument("--backend", choices=["amqp", "sidekiq"], default="amqp")
    p.add_argument(
        "--amqp-url",
        action="append",
        metavar="URL",
        help=f"{URL_HELP}; repeat for a cluster's nodes (default: $FASTWORKER_AMQP_URL, a comma "
        f"list, or {DEFAULT_URL})",
    )
    for flag, dest, text in TLS_FLAGS:
        p.add_argument(flag, dest=dest, metavar="PATH", help=text)
    p.add_argument("--redis-url", default="redis://localhost:6379/0", help="--backend sidekiq")
    p.add_argument(
        "--queue",
        action="append",
        dest="queues",
        metavar="NAME",
        help="a queue to show, as the worker consumes it; repeat for several; nothing else is "
        "read or changed (default: sf_deferred_events; with --backend sidekiq: default)",
    )
    p.add_argument("--dead-letter-queue", default="{queue}.failed", metavar="NAME")
    p.add_argument(
        "--retry-delay",
        type=positive_float,
        default=1.0,
        metavar="S",
        help="as the worker's: names its delay queues (default: %(default)g)",
    )
    p.add_argument("--retry-max-delay", type=positive_float, default=300.0, metavar="S")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="bundle",
        help="as the worker's: to show the params a failed job was sent (default: %(default)s)",
    )
    p.add_argument("--script", default="/var/www/bin/dispatch.php", metavar="PATH")
    p.add_argument("--allow-param", action="append", default=[], metavar="GLOB")
    p.add_argument(
        "--interval",
        type=positive_float,
        default=2.0,
        metavar="S",
        help="seconds between reads of the workers' metrics (default: %(default)g)",
    )
    p.add_argument(
        "--history",
        type=positive_float,
        default=600.0,
        metavar="S",
        help="seconds of job rates kept and charted (default: %(default)g)",
    )
    p.add_argument(
        "--scan-limit",
        type=positive_int,
        default=10_000,
        metavar="N",
        help="most failed jobs read per listing (default: %(default)s)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    if defaults:
        p.set_defaults(**defaults)
    return p


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Flags > FASTWORKER_WEB_* (the dashboard's own) and FASTWORKER_* (the worker's) >
    the --config file > defaults. Raises ConfigError or SecurityError."""
    from fastworker.cli import worker_parser
    from fastworker.config import preset

    environ = os.environ if environ is None else environ
    values = preset(worker_parser(), PRESET_KEYS, argv, environ)
    # Not defaults of the repeatable flags (argparse would add the flags' values to them).
    # The metrics address only names the default worker.
    skipped = ("queue", "amqp_url", "metrics_port", "metrics_host")
    defaults: dict[str, Any] = {k: v for k, v in values.items() if k not in skipped}
    if values.get("queue"):
        defaults["queues"] = list(values["queue"])
    for dest, name in WEB_ENV.items():
        if environ.get(name):
            text = environ[name]
            defaults[dest] = (
                [u.strip() for u in text.split(",") if u.strip()] if dest == "workers" else text
            )
    args = build_parser(defaults).parse_args(list(argv))
    args.queues = args.queues or [DEFAULT_QUEUES[args.backend]]
    if not args.workers and values.get("metrics_port"):
        host = values.get("metrics_host") or "127.0.0.1"
        args.workers = [f"http://{host}:{values['metrics_port']}"]
    args.workers = args.workers or []
    for worker in args.workers:
        if not worker.startswith(("http://", "https://")):
            raise SecurityError(f"--workers takes http://HOST:PORT, got {worker!r}")
    urls = args.amqp_url or values.get("amqp_url") or [DEFAULT_URL]
    args.amqp_url = broker_urls(urls, args.amqp_ca, args.amqp_cert, args.amqp_key)
    return args


def settings_from(args: argparse.Namespace) -> WebSettings:
    from fastworker.web_app import WebSettings

    return WebSettings(
        backend=args.backend,
        amqp_urls=list(args.amqp_url),
        redis_url=args.redis_url,
        queues=list(args.queues),
        policy=RetryPolicy(
            retry_delay=args.retry_delay,
            retry_max_delay=args.retry_max_delay,
            dead_letter_queue=args.dead_letter_queue,
        ),
        parse=ParseSettings(args.format, args.script, tuple(args.allow_param)),
        workers=list(args.workers),
        auth=Credentials.parse(args.auth) if args.auth else None,
        interval=args.interval,
        history=args.history,
        scan_limit=args.scan_limit,
    )


async def serve(args: argparse.Namespace, host: str, port: int) -> None:
    from aiohttp import web

    from fastworker.web_app import Dashboard

    dashboard = Dashboard(settings_from(args))
    runner = web.AppRunner(dashboard.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ValueError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (--listen)"
        ) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "fastworker web on http://%s:%d/ (%s, queues %s; workers %s; auth %s)",
        shown,
        port,
        args.backend,
        ", ".join(args.queues),
        ", ".join(args.workers) or "none",
        "on" if args.auth else "off",
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    log.info("fastworker web stopped")


def main(argv: Sequence[str]) -> int:
    """Entry point of `fastworker web ...`; returns the exit status."""
    from fastworker.config import ConfigError

    try:
        args = parse(argv)
        host, port = parse_listen(args.listen)
        check_exposure(host, port, Credentials.parse(args.auth) if args.auth else None)
        settings = settings_from(args)  # a bad --auth ends here, before listening
        if settings.backend == "amqp":
            Nodes.parse(settings.amqp_urls)  # so does a bad --amqp-url or TLS file
    except (ConfigError, SecurityError, UrlError, ValueError) as exc:
        print(f"fastworker web: {exc}", file=sys.stderr)
        return 2
    logs.configure(args.log_level)
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)  # the page says what went wrong
    import uvloop

    try:
        uvloop.run(serve(args, host, port))
    except ValueError as exc:
        print(f"fastworker web: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
