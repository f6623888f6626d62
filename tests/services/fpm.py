"""A private PHP-FPM (pm = static) per test or module, with its own config, port and logs."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers import read_records, wait_for
from services.process import (
    die_with_parent,
    free_loopback_port,
    proc_children,
    tcp_port_open,
    which,
)

FPM_BINARY = os.environ.get("FASTWORKER_TEST_FPM", "php-fpm8.2")
FPM_START_TIMEOUT = 10.0


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
        return proc_children(self.master_pid)

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

    def restart(self, timeout: float = 10.0) -> None:
        """Starts a stopped server again with its own config, so on the same address."""
        assert not self.alive()
        with open(self.output_log, "ab") as out:
            self.proc = _spawn(self.conf_path, out)
        wait_for(
            lambda: len(self.child_pids()) >= self.children and self.connect_probe(),
            timeout=timeout,
            what=f"php-fpm to come back on {self.address}",
        )

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


def pool_config(
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
    pm: str = "static",
) -> str:
    """The php-fpm.conf of a private server: one pool named fwtest (static unless `pm` says
    dynamic: then it starts with one child and grows to `children`, as Debian's stock pool)."""
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
        f"pm = {pm}",
        f"pm.max_children = {children}",
        *(
            ["pm.start_servers = 1", "pm.min_spare_servers = 1", "pm.max_spare_servers = 1"]
            if pm == "dynamic"
            else []
        ),
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


def _fpm_binary() -> str:
    fpm_binary = which(FPM_BINARY)
    if fpm_binary is None:
        pytest.fail(f"{FPM_BINARY} not found: run scripts/setup-deps.sh (installs php8.2-fpm)")
    return fpm_binary


def _spawn(conf_path: Path, out) -> subprocess.Popen[bytes]:
    """The master in the foreground, in its own session, dying with pytest."""
    return subprocess.Popen(
        [_fpm_binary(), "-F", "-R", "-y", str(conf_path)],
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
        start_new_session=True,
    )


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
    pm: str = "static",
) -> FpmServer:
    """Start a private PHP-FPM (pm = static) on a free loopback port and wait until it serves.

    ``env`` entries become ``env[NAME] = value`` lines in the pool, so scripts can be told where
    to write (record.php reads FW_RECORD_FILE) without the message choosing any param.
    FW_RECORD_FILE defaults to ``<workdir>/record.log`` (see ``FpmServer.records()``).
    With ``unix_socket=True`` the pool listens on a Unix socket and ``address`` is ``unix:PATH``.
    Failures are reported with ``pytest.fail`` (bench/e2e.py catches ``pytest.fail.Exception``).
    """
    _fpm_binary()  # fail before making any file
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
        pool_config(
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
            pm=pm,
        )
    )
    with open(output_log, "wb") as out:
        proc = _spawn(conf_path, out)
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
        ready = children if pm == "static" else 1
        if len(server.child_pids()) >= ready and server.connect_probe():
            return server
        if time.monotonic() >= deadline:
            pids = server.child_pids()
            server.stop()
            pytest.fail(
                f"php-fpm not ready within {FPM_START_TIMEOUT:.0f}s on {listen} "
                f"({len(pids)}/{children} children):\n{server.log_text()}"
            )
        time.sleep(0.02)


__all__ = ["FPM_BINARY", "FPM_START_TIMEOUT", "FpmServer", "pool_config", "start_fpm"]
