"""`fastworker web` as a subprocess, the way an operator runs it, with HTTP helpers for the
requests a browser would not make (a POST without the form's token)."""

from __future__ import annotations

import base64
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from services.process import die_with_parent, free_loopback_port, tcp_port_open
from services.worker import worker_env

START_TIMEOUT = 20.0


class WebProcess:
    """A running `python -m fastworker web ARGS --listen HOST:PORT` (a free port), reached on
    127.0.0.1. `auth` goes in --auth, or in FASTWORKER_WEB_AUTH with `auth_in_env`."""

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        auth: tuple[str, str] | None = None,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        auth_in_env: bool = False,
    ) -> None:
        self.port = free_loopback_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.auth = auth
        self.log_path = log_path
        command = [sys.executable, "-m", "fastworker", "web", *args]
        command += ["--listen", f"{host}:{self.port}"]
        env = {"FASTWORKER_WEB_AUTH": "", **(env or {})}
        if auth is not None and auth_in_env:
            env["FASTWORKER_WEB_AUTH"] = f"{auth[0]}:{auth[1]}"
        elif auth is not None:
            command += ["--auth", f"{auth[0]}:{auth[1]}"]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=worker_env(env),
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not (tcp_port_open("127.0.0.1", self.port) and "fastworker web on" in self.log()):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"fastworker web exited with {self.proc.returncode}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"fastworker web did not start:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"fastworker web did not stop on SIGTERM:\n{self.log()}") from None

    def request(
        self,
        path: str,
        form: dict[str, str] | list[tuple[str, str]] | None = None,
        auth: tuple[str, str] | None | bool = True,
    ) -> tuple[int, str]:
        """GET (or POST `form`) `path`; `auth` True: the process's credentials, None/False:
        none. Redirects are not followed: (status, body) as the server answered."""
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        request = urllib.request.Request(self.base + path, data=data)
        credentials = self.auth if auth is True else auth or None
        if credentials:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(request, timeout=15) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def csrf(self, page: str) -> str:
        """The form token on `page` (any page with a form)."""
        status, text = self.request(page)
        match = re.search(r'name="csrf" value="([0-9a-f]+)"', text)
        assert status == 200 and match, f"no form token on {page} ({status})"
        return match.group(1)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


def run_web(
    args: Sequence[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`fastworker web ARGS` to its end (for the ones that must refuse to start)."""
    return subprocess.run(
        [sys.executable, "-m", "fastworker", "web", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=worker_env(env),
        check=False,
    )


__all__ = ["WebProcess", "run_web"]
