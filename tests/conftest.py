"""Shared fixtures: a private PHP-FPM per test or module, RabbitMQ, Redis, unique queues.

The services are real: the worker's job is to talk to PHP-FPM and RabbitMQ, and the facts it
depends on (one param per PARAMS record, failure only in the Status header, a kept-alive
connection pins one child) only show with the real thing.

No pytest-asyncio: fixtures and helpers are synchronous; async code under test runs with
``asyncio.run`` inside the test.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    # Lets test files do `from helpers import ...` whatever pytest's import mode.
    sys.path.insert(0, str(TESTS_DIR))

from helpers import (  # noqa: E402
    amqp_delete_queues,
    amqp_host_port,
    read_records,
    tcp_port_open,
)

FPM_BINARY = os.environ.get("FASTWORKER_TEST_FPM", "php-fpm8.2")
FPM_START_TIMEOUT = 10.0
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# One token per test session, so a session sweeps only its own leftover queues.
QUEUE_PREFIX = f"fwtest.{secrets.token_hex(3)}."
PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------- process helpers


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when pytest dies, so no FPM outlives a crashed run."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _proc_children(ppid: int) -> list[int]:
    """PIDs whose parent is ``ppid``, read from /proc (no pgrep needed)."""
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the last ')' (the command name may hold spaces or parentheses).
        rest = stat[stat.rfind(b")") + 2 :].split()
        if len(rest) > 1 and int(rest[1]) == ppid and rest[0] != b"Z":
            out.append(int(entry))
    return sorted(out)


def which(name: str) -> str | None:
    """shutil.which, also searching the sbin folders (where php-fpm8.2 and rabbitmq-server live)."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- PHP-FPM


class FpmServer:
    """A private PHP-FPM master with one static pool, run in the foreground by the tests."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        workdir: Path,
        conf_path: Path,
        error_log: Path,
        output_log: Path,
        host: str | None,
        port: int | None,
        socket_path: Path | None,
        children: int,
        record_file: Path,
        socket_dir: Path | None = None,
    ) -> None:
        self.proc = proc
        self.workdir = workdir
        self.conf_path = conf_path
        self.error_log = error_log
        self.output_log = output_log
        self.host = host
        self.port = port
        self.socket_path = socket_path
        self.children = children
        self.record_file = record_file
        self._socket_dir = socket_dir

    @property
    def master_pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, or ``unix:/path`` for a Unix-socket pool (the --fpm syntax)."""
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def child_pids(self) -> list[int]:
        """PIDs of the pool's worker processes right now (they change as children recycle)."""
        if not self.alive():
            return []
        return _proc_children(self.master_pid)

    def records(self) -> list[tuple[int, str, int]]:
        """Lines record.php / fail_if.php wrote for this pool: (pid, sha1(data), strlen(data))."""
        return read_records(self.record_file)

    def clear_records(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.record_file.unlink()

    def log_text(self) -> str:
        """FPM's error log plus anything the master printed; for failure messages."""
        parts = []
        for path in (self.error_log, self.output_log):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                if text:
                    parts.append(f"--- {path.name} ---\n{text}")
        return "\n".join(parts) or "(no FPM log output)"

    def connect_probe(self, timeout: float = 0.5) -> bool:
        """True if the listen socket accepts a connection."""
        if self.socket_path is not None:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(timeout)
                    s.connect(str(self.socket_path))
                return True
            except OSError:
                return False
        assert self.host is not None and self.port is not None
        return tcp_port_open(self.host, self.port, timeout)

    def stop(self, graceful: bool = False, timeout: float = 5.0) -> None:
        """Stop the master (SIGQUIT if graceful, else SIGTERM), then SIGKILL what is left.

        The master runs in its own session, so its process group holds exactly it and its
        children: killpg on it reaches nothing else.
        """
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGQUIT if graceful else signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.master_pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __repr__(self) -> str:
        return f"<FpmServer {self.address} pid={self.master_pid} children={self.children}>"


def _pool_config(
    *,
    listen: str,
    children: int,
    max_requests: int,
    display_errors: bool,
    request_terminate_timeout: float,
    listen_backlog: int,
    env: dict[str, str],
    pid_file: Path,
    error_log: Path,
    log_limit: int = 0,
) -> str:
    lines = [
        "[global]",
        f"pid = {pid_file}",
        f"error_log = {error_log}",
        "log_level = notice",
        "daemonize = no",
        *([f"log_limit = {int(log_limit)}"] if log_limit else []),
        "",
        "[fwtest]",
        "user = root",
        "group = root",
        f"listen = {listen}",
        f"listen.backlog = {listen_backlog}",
        "pm = static",
        f"pm.max_children = {children}",
        "catch_workers_output = yes",
        "decorate_workers_output = no",
        "clear_env = no",
        # php_value (not php_admin_value): a per-request PHP_VALUE may still override it.
        f"php_value[display_errors] = {'On' if display_errors else 'Off'}",
    ]
    if max_requests:
        lines.append(f"pm.max_requests = {int(max_requests)}")
    if request_terminate_timeout:
        if request_terminate_timeout != int(request_terminate_timeout):
            raise ValueError("FPM takes whole seconds for request_terminate_timeout")
        lines.append(f"request_terminate_timeout = {int(request_terminate_timeout)}s")
    for name, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"bad env name for the FPM pool: {name!r}")
        lines.append(f'env[{name}] = "{value}"')
    return "\n".join(lines) + "\n"


def start_fpm(
    tmp_path: Path,
    children: int = 4,
    max_requests: int = 0,
    display_errors: bool = False,
    request_terminate_timeout: float = 0,
    listen_backlog: int = 511,
    env: dict[str, str] | None = None,
    unix_socket: bool = False,
    log_limit: int = 0,
) -> FpmServer:
    """Start a private PHP-FPM (pm = static) on a free loopback port and wait until it serves.

    ``env`` entries become ``env[NAME] = value`` lines in the pool, so scripts can be told where
    to write (record.php reads FW_RECORD_FILE) without the message choosing any param.
    FW_RECORD_FILE defaults to ``<workdir>/record.log`` (see ``FpmServer.records()``).
    With ``unix_socket=True`` the pool listens on a Unix socket and ``address`` is ``unix:PATH``.
    """
    fpm_binary = which(FPM_BINARY)
    if fpm_binary is None:
        pytest.fail(f"{FPM_BINARY} not found: run scripts/setup-deps.sh (installs php8.2-fpm)")
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fpm-", dir=tmp_path))
    conf_path = workdir / "php-fpm.conf"
    error_log = workdir / "php-fpm.log"
    output_log = workdir / "php-fpm.out"
    record_file = workdir / "record.log"
    pool_env = {"FW_RECORD_FILE": str(record_file)}
    pool_env.update(env or {})
    record_file = Path(pool_env["FW_RECORD_FILE"])

    socket_dir: Path | None = None
    socket_path: Path | None = None
    host: str | None = None
    port: int | None = None
    if unix_socket:
        # sun_path is limited to 108 bytes: pytest's tmp paths can be longer.
        socket_dir = Path(tempfile.mkdtemp(prefix="fwfpm-"))
        socket_path = socket_dir / "fpm.sock"
        listen = str(socket_path)
    else:
        host, port = "127.0.0.1", free_loopback_port()
        listen = f"{host}:{port}"

    conf_path.write_text(
        _pool_config(
            listen=listen,
            children=children,
            max_requests=max_requests,
            display_errors=display_errors,
            request_terminate_timeout=request_terminate_timeout,
            listen_backlog=listen_backlog,
            env=pool_env,
            pid_file=workdir / "php-fpm.pid",
            error_log=error_log,
            log_limit=log_limit,
        )
    )
    with open(output_log, "wb") as out:
        proc = subprocess.Popen(
            [fpm_binary, "-F", "-R", "-y", str(conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
    server = FpmServer(
        proc, workdir, conf_path, error_log, output_log, host, port, socket_path, children,
        record_file, socket_dir,
    )

    deadline = time.monotonic() + FPM_START_TIMEOUT
    while True:
        if not server.alive():
            server.stop()
            pytest.fail(
                f"php-fpm exited with {proc.returncode} while starting ({conf_path}):\n"
                f"{server.log_text()}"
            )
        if len(server.child_pids()) >= children and server.connect_probe():
            return server
        if time.monotonic() >= deadline:
            pids = server.child_pids()
            server.stop()
            pytest.fail(
                f"php-fpm not ready within {FPM_START_TIMEOUT:.0f}s on {listen} "
                f"({len(pids)}/{children} children):\n{server.log_text()}"
            )
        time.sleep(0.02)


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


# --------------------------------------------------------------------------- PHP scripts


@pytest.fixture(scope="session")
def php_dir() -> Path:
    """tests/php/: the scripts the worker's tests send jobs to."""
    return TESTS_DIR / "php"


# --------------------------------------------------------------------------- RabbitMQ


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _rabbitmq_ready(url: str) -> bool:
    """True once an AMQP handshake succeeds (the port opens a little before the broker is up)."""
    import asyncio

    import aiormq

    async def probe() -> None:
        conn = await asyncio.wait_for(aiormq.connect(url), 5)
        await conn.close()

    try:
        asyncio.run(probe())
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """The broker's URL (FASTWORKER_TEST_AMQP_URL or local guest); starts a local one if absent.

    At the end of the session, queues named ``fwtest.*`` that tests left (e.g. retry queues)
    are swept.
    """
    url = os.environ.get("FASTWORKER_TEST_AMQP_URL", DEFAULT_AMQP_URL)
    host, port = amqp_host_port(url)
    if not tcp_port_open(host, port):
        if not _loopback(host):
            pytest.fail(f"RabbitMQ at {host}:{port} does not answer ({url})")
        rabbitmq_server = which("rabbitmq-server")
        if rabbitmq_server is None:
            pytest.fail(
                f"RabbitMQ at {host}:{port} does not answer and rabbitmq-server is not installed:"
                " run scripts/setup-deps.sh"
            )
        env = dict(os.environ, RABBITMQ_NODE_IP_ADDRESS="127.0.0.1")
        subprocess.run(
            [rabbitmq_server, "-detached"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    deadline = time.monotonic() + 60
    while not (tcp_port_open(host, port) and _rabbitmq_ready(url)):
        if time.monotonic() >= deadline:
            pytest.fail(
                f"RabbitMQ at {host}:{port} not reachable within 60 s ({url}); "
                "see /var/log/rabbitmq/ or run scripts/setup-deps.sh"
            )
        time.sleep(0.5)
    yield url
    _sweep_test_queues(url)


def _sweep_test_queues(url: str) -> None:
    """Deletes this session's leftover ``fwtest.<token>.*`` queues (needs rabbitmqctl)."""
    rabbitmqctl = which("rabbitmqctl")
    if rabbitmqctl is None:
        return
    try:
        listing = subprocess.run(
            [rabbitmqctl, "list_queues", "-q", "--no-table-headers", "name"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return
    names = [n.strip() for n in listing.stdout.splitlines() if n.strip().startswith(QUEUE_PREFIX)]
    if names:
        with contextlib.suppress(Exception):
            amqp_delete_queues(url, names)


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


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Local Redis on 6379 (db 0); started with no persistence if it does not answer."""
    host, port = "127.0.0.1", 6379
    if not tcp_port_open(host, port):
        redis_server = which("redis-server")
        if redis_server is None:
            pytest.fail("Redis does not answer on 127.0.0.1:6379 and redis-server is not installed")
        subprocess.run(
            [
                redis_server, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port),
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
                pytest.fail("redis-server did not come up on 127.0.0.1:6379 within 15 s")
            time.sleep(0.1)
    return f"redis://{host}:{port}/0"
