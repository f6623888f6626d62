"""Fixtures only: a private PHP-FPM per test or module, RabbitMQ, Redis, unique queues, worker
subprocesses, and the FastCGI codec twins. How each service is started, probed and stopped
lives in tests/services/.

The services are real: the worker's job is to talk to PHP-FPM and RabbitMQ, and the facts it
depends on (one param per PARAMS record, failure only in the Status header, a kept-alive
connection pins one child) only show with the real thing.

No pytest-asyncio: fixtures and helpers are synchronous; async code under test runs with
``asyncio.run`` inside the test.
"""

from __future__ import annotations

import re
import secrets
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
for _path in (TESTS_DIR, TESTS_DIR.parent / "src"):
    # Lets test files do `from services.fpm import ...` / `from helpers import ...` whatever
    # pytest's import mode, and a source checkout be tested without being installed.
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from services import PHP_DIR  # noqa: E402
from services.fpm import FpmServer, start_fpm  # noqa: E402
from services.rabbitmq import (  # noqa: E402
    QUEUE_PREFIX,
    amqp_delete_queues,
    amqp_url,
    ensure_rabbitmq,
    sweep_test_queues,
)
from services.rabbitmq_cluster import RabbitCluster, start_rabbitmq_cluster  # noqa: E402
from services.rabbitmq_tls import TlsRabbit, start_tls_rabbitmq  # noqa: E402
from services.redis import ensure_redis  # noqa: E402
from services.worker import Workers  # noqa: E402

# --------------------------------------------------------------------------- PHP-FPM


@pytest.fixture
def fpm_factory(tmp_path: Path) -> Iterator[Callable[..., FpmServer]]:
    """``fpm_factory(children=2, max_requests=5, ...)`` starts a private FPM; all stop after."""
    servers: list[FpmServer] = []

    def factory(**kwargs) -> FpmServer:
        server = start_fpm(tmp_path, **kwargs)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def fpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FpmServer]:
    """One FPM per test module: 4 static children, display_errors Off, no max_requests."""
    server = start_fpm(tmp_path_factory.mktemp("fpm"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def php_dir() -> Path:
    """tests/php/: the scripts the worker's tests send jobs to."""
    return PHP_DIR


# --------------------------------------------------------------------------- FastCGI codec twins


@pytest.fixture(params=["compiled", "py"])
def fcgi_twin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The FastCGI codec under test: the compiled `fastworker._fcgi_codec`, then the pure-Python
    `fastworker.fcgi_py`.

    For the test's duration `fastworker.fpm` encodes and parses with it (its names bound from
    `fastworker.codec` are replaced), whatever `fastworker.codec` picked at import. The
    exceptions and the Response type are the same objects in both (`fastworker.fcgi_base`), so
    only the functions and the parser are swapped. A missing build fails the "compiled" run: it
    is never silently the twin.
    """
    import fastworker.fpm as fpm_module

    if request.param == "compiled":
        try:
            from fastworker import _fcgi_codec as impl  # type: ignore[attr-defined]
        except ImportError as exc:
            pytest.fail(
                f"the compiled codec `fastworker._fcgi_codec` cannot be imported ({exc}): build "
                "it with `.venv/bin/python -m pip install -e .` (scripts/setup-deps.sh does)"
            )
    else:
        from fastworker import fcgi_py as impl
    for name in ("ResponseParser", "encode_request", "encode_params"):
        # raising=True: if fpm.py stops binding one of these names, say so instead of testing
        # the wrong codec.
        monkeypatch.setattr(fpm_module, name, getattr(impl, name))
    return impl


# --------------------------------------------------------------------------- RabbitMQ


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """The broker's URL (FASTWORKER_TEST_AMQP_URL or local guest); starts a local one if absent.

    At the end of the session, queues named ``fwtest.<session token>.*`` that tests left (e.g.
    retry queues) are swept.
    """
    url = ensure_rabbitmq(amqp_url())
    yield url
    sweep_test_queues(url)


@pytest.fixture
def queue_name(request: pytest.FixtureRequest, rabbitmq_url: str) -> Iterator[str]:
    """A unique queue name ``fwtest.<test>.<random>``; the queue and its .failed are deleted after.

    Other queues derived from it (``<name>.retry.*``) go in the session-end sweep of ``fwtest.*``.
    """
    test = re.sub(r"[^A-Za-z0-9_-]+", "_", request.node.name)[:60]
    name = f"{QUEUE_PREFIX}{test}.{secrets.token_hex(4)}"
    yield name
    try:
        amqp_delete_queues(rabbitmq_url, [name, f"{name}.failed"])
    except Exception as exc:  # the broker may be down on purpose in some tests
        warnings.warn(f"could not delete test queue {name}: {exc!r}", stacklevel=1)


@pytest.fixture(scope="session")
def tls_rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRabbit]:
    """A private RabbitMQ node whose TLS listener requires a client certificate signed by a CA
    the test made (services/rabbitmq_tls.py); one per session, stopped at its end. Skips only
    when rabbitmq-server (or openssl) is not installed."""
    try:
        node = start_tls_rabbitmq(tmp_path_factory.mktemp("rabbitmq-tls"))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    yield node
    node.stop()


@pytest.fixture(scope="session")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """A private three-node RabbitMQ cluster on loopback (services/rabbitmq_cluster.py); one
    per session, all nodes stopped at its end. Skips only when rabbitmq-server is not
    installed."""
    try:
        cluster = start_rabbitmq_cluster(tmp_path_factory.mktemp("rabbitmq-cluster"))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    yield cluster
    cluster.stop()


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Local Redis on 6379 (db 0); started with no persistence if it does not answer."""
    return ensure_redis()


@pytest.fixture
def sidekiq_url(redis_url: str) -> Iterator[str]:
    """The tests' own Redis database, empty before and after (Sidekiq's sets are per db)."""
    import redis

    from services.sidekiq import SIDEKIQ_DB

    url = redis_url.rsplit("/", 1)[0] + f"/{SIDEKIQ_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


# --------------------------------------------------------------------------- the worker


@pytest.fixture
def workers(rabbitmq_url: str, tmp_path: Path) -> Iterator[Workers]:
    """``workers.start(args)``: a `python -m fastworker ARGS` subprocess, consuming on return.

    Workers still running at the end get SIGTERM and must exit 0; the retry queues their
    command lines imply are deleted.
    """
    started = Workers(tmp_path, rabbitmq_url)
    yield started
    codes = started.close()
    assert all(code == 0 for code in codes), f"SIGTERM must end a worker with 0, got {codes}"
