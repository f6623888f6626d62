"""The `fastworker` command as a subprocess, the way a user runs it.

`Worker` starts ``python -m fastworker ARGS`` with PYTHONPATH=src, its output (stdout and stderr)
in a log file, and PR_SET_PDEATHSIG so it never outlives pytest. `Workers` starts several for one
test and cleans up after them (the `workers` fixture in conftest).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fastworker.failures import RetryPolicy, delay_queue
from services import PHP_DIR, SRC_DIR
from services.process import die_with_parent
from services.rabbitmq import amqp_delete_queues

START_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ with src/ first on PYTHONPATH (a source checkout needs no install), + extra."""
    pythonpath = os.pathsep.join(p for p in (str(SRC_DIR), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, **(extra or {})}


class Worker:
    """A running ``python -m fastworker ARGS``; its output goes to ``log_path``."""

    def __init__(
        self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.args = list(args)
        self.log_path = Path(log_path)
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fastworker", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=worker_env(env),
                preexec_fn=die_with_parent,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_consuming(self, timeout: float = START_TIMEOUT) -> None:
        """Until the log says ``consuming QUEUE``; AssertionError if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "consuming " in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"worker did not start consuming:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Signals the worker (if still running) and returns its exit code.

        One that does not exit within ``timeout`` is killed and fails the test.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"worker did not exit within {timeout} s:\n{self.log()}") from None

    def terminate(self) -> int:
        """SIGTERM, the graceful stop; returns the exit code."""
        return self.stop(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the worker gets no chance to ack, publish or clean up."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def retry_queues(self) -> set[str]:
        """The retry delay queues its command line implies (the worker declares them)."""
        options = dict(zip(self.args, self.args[1:], strict=False))  # option -> value; last wins
        queues = {value for option, value in zip(self.args, self.args[1:], strict=False)
                  if option == "--queue"}
        defaults = RetryPolicy()
        policy = RetryPolicy(
            retry_delay=float(options.get("--retry-delay", defaults.retry_delay)),
            retry_max_delay=float(options.get("--retry-max-delay", defaults.retry_max_delay)),
        )
        return {delay_queue(queue, ms) for queue in queues for ms in policy.levels()}

    def __repr__(self) -> str:
        return f"<Worker pid={self.proc.pid} alive={self.alive()} log={self.log_path}>"


def worker_args(url: str, queue: str, fpm_address: str, *extra: str) -> list[str]:
    """The usual command line: one queue, one pool, record.php as the script, tests/php allowed."""
    return [
        "--amqp-url",
        url,
        "--queue",
        queue,
        "--fpm",
        fpm_address,
        "--script",
        str(PHP_DIR / "record.php"),
        "--allow-script",
        f"{PHP_DIR}/*.php",
        *extra,
    ]


class Workers:
    """Workers started for one test, each consuming before `start` returns. `close()` stops the
    ones still running with SIGTERM (returning their exit codes) and deletes the retry queues
    their command lines imply."""

    def __init__(self, tmp_path: Path, amqp_url: str) -> None:
        self.tmp_path = Path(tmp_path)
        self.amqp_url = amqp_url
        self.started: list[Worker] = []

    def start(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        timeout: float = START_TIMEOUT,
        wait: bool = True,
    ) -> Worker:
        worker = Worker(args, self.tmp_path / f"worker-{len(self.started)}.log", env)
        self.started.append(worker)
        if wait:
            worker.wait_consuming(timeout)
        return worker

    def close(self) -> list[int]:
        codes = [worker.terminate() for worker in self.started if worker.alive()]
        retry_queues = set().union(*(worker.retry_queues() for worker in self.started))
        if retry_queues:
            amqp_delete_queues(self.amqp_url, sorted(retry_queues))
        return codes


__all__ = ["Worker", "Workers", "worker_args", "worker_env"]
