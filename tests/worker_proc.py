"""Runs the real `fastworker` command as a subprocess, the way a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHP_DIR = ROOT / "tests" / "php"


class WorkerProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        environ = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastworker", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environ,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_consuming(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "consuming " in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"worker did not start consuming:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signals the worker and returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"worker did not exit within {timeout} s:\n{self.log()}") from None
        finally:
            self._log.close()
        return code


def worker_args(url: str, queue: str, fpm_address: str, *extra: str) -> list[str]:
    """The usual command line: one queue, one pool, scripts under tests/php allowed."""
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
