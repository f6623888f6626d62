"""Runs a Job as a FastCGI request and classifies what happened.

The outcome kinds (`Result.kind`):
- ok: no Status header, or a 2xx one.
- php_error: PHP answered with a non-2xx status (uncaught exception, fatal error, 404 script).
- timeout: no complete answer within --job-timeout; the connection was closed.
- lost: the connection died after the answer started, a fresh connection closed without an
  answer (the PHP process died), or FPM broke the protocol.
- unavailable: no connection to FPM could be made (refused, timed out), or FastCGI OVERLOADED;
  the job did not run.
- bad_message / not_allowed: refused before FPM was called (bad_message also for a request that
  cannot be encoded, e.g. a json param or a script path too large for one FastCGI record).
- internal: an exception of fastworker's own while handling the job (made by the pipeline).
A job the pool no longer starts because the worker is stopping is no outcome: `NotStarted` is
raised (or passed to `start`'s callback) so the consumer returns the message to its queue.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote_from_bytes

from fastworker import __version__, cgi
from fastworker.fpm import (
    OVERLOADED,
    REQUEST_COMPLETE,
    Endpoint,
    FpmBadRequest,
    FpmConnectionLost,
    FpmError,
    FpmNotStarted,
    FpmPool,
    FpmPools,
    FpmProtocolError,
    FpmResponse,
    FpmTimeout,
    FpmUnavailable,
    encode_shared_params,
)
from fastworker.job import Job, JobRefused
from fastworker.message import NotStarted
from fastworker.targets import TargetPolicy

# Data up to this size travels as the DEFERRED_DATA param; larger data as a POST body, because
# PHP-FPM resets the connection when one param does not fit in a single PARAMS record.
INLINE_DATA_LIMIT = 32 * 1024
STDERR_EXCERPT = 8 * 1024
STDOUT_HEAD = 2 * 1024

# Kinds that mean the job did not run and the trouble is not the job's: retry without counting.
INFRASTRUCTURE = frozenset({"unavailable"})
# Kinds that can never succeed: no retries.
REFUSED = frozenset({"bad_message", "not_allowed"})


@dataclass(slots=True)
class Result:
    kind: str
    status: int = 0
    message: str = ""
    stderr: bytes = b""
    stdout_head: bytes = b""
    endpoint: str = ""
    traceback: str = ""  # internal: where fastworker failed

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


OK = Result("ok", 200)


class Executor:
    def __init__(self, pools: FpmPools, policy: TargetPolicy, job_timeout: float) -> None:
        self.pools = pools
        self.policy = policy
        self.job_timeout = job_timeout
        self._base = {
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_SOFTWARE": f"fastworker/{__version__}",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "SERVER_NAME": socket.gethostname(),
            "SERVER_ADDR": "127.0.0.1",
            "SERVER_PORT": "0",
            "REMOTE_ADDR": "127.0.0.1",
            "REMOTE_PORT": "0",
            "REQUEST_METHOD": "POST",
            "QUERY_STRING": "",
            "FASTWORKER_PID": str(os.getpid()),
            # Keeps fatal errors out of the body so they surface as a 500 even where a pool
            # has display_errors = On.
            "PHP_VALUE": "display_errors=0",
        }
        self._by_script: dict[str, dict[str, str | bytes]] = {}
        # (job endpoint, job script) -> (pool, endpoint text, shared params block), once vetted
        self._targets: dict[tuple[Endpoint | None, str], tuple[FpmPool, str, bytes]] = {}

    def _script_params(self, script: str) -> dict[str, str | bytes]:
        """The params every job for `script` shares, built once per script."""
        params = self._by_script.get(script)
        if params is None:
            params = dict(self._base)
            params["SCRIPT_FILENAME"] = script
            params["SCRIPT_NAME"] = script
            params["REQUEST_URI"] = script
            params["DOCUMENT_ROOT"] = os.path.dirname(script)
            if len(self._by_script) < 1024:
                self._by_script[script] = params
        return params

    def fastcgi_params(self, job: Job, script: str) -> tuple[dict[str, str | bytes], bytes]:
        """All CGI params and the STDIN of a job whose script was already vetted."""
        own, body = self._own_params(job)
        return {**self._script_params(script), **own}, body

    @staticmethod
    def _own_params(job: Job) -> tuple[dict[str, str | bytes], bytes]:
        """The params that differ from job to job (the shared ones travel pre-encoded)."""
        params: dict[str, str | bytes] = dict(job.params) if job.params else {}
        body, content_type = job.body, job.content_type
        if job.data is not None:
            if len(job.data) <= INLINE_DATA_LIMIT:
                params["DEFERRED_DATA"] = job.data
            else:
                body = b"DEFERRED_DATA=" + quote_from_bytes(job.data, safe="").encode()
                content_type = "application/x-www-form-urlencoded"
        params["CONTENT_LENGTH"] = str(len(body))
        params["CONTENT_TYPE"] = content_type
        return params, body

    def _target(self, job: Job) -> tuple[FpmPool, str, bytes] | Result:
        """(pool, endpoint text, shared params block) for a job, or why it may not run."""
        key = (job.endpoint, job.script)
        target = self._targets.get(key)
        if target is None:
            try:
                endpoint, script = self.policy.resolve(job)
            except JobRefused as exc:
                return Result(exc.kind, message=str(exc))
            try:
                shared = encode_shared_params(self._script_params(script))
            except ValueError as exc:  # e.g. a script path longer than a record can carry
                return Result("bad_message", message=f"cannot send to PHP-FPM: {exc}")
            target = (self.pools.get(endpoint), str(endpoint), shared)
            if len(self._targets) < 1024:
                self._targets[key] = target
        return target

    async def run(self, job: Job) -> Result:
        target = self._target(job)
        if type(target) is Result:
            return target
        pool, where, shared = target  # type: ignore[misc]
        params, body = self._own_params(job)
        try:
            response = await pool.request(params, body, self.job_timeout, shared)
        except FpmNotStarted as exc:
            raise NotStarted(str(exc)) from None
        except FpmError as exc:
            return self._failed(exc, where)
        return self._classify(response, where)

    def start(self, job: Job, done: Callable[[Result], None]) -> None:
        """`run` without a coroutine: `done(result)` is called once the job finished.

        An exception `run` would raise (NotStarted, or an unexpected one) is passed to `done`
        instead of a Result, or raised from `start` itself if it comes before the request.
        """
        target = self._target(job)
        if type(target) is Result:
            done(target)
            return
        pool, where, shared = target  # type: ignore[misc]
        params, body = self._own_params(job)

        def answered(response: FpmResponse | None, exc: Exception | None) -> None:
            if exc is None:
                done(self._classify(response, where))  # type: ignore[arg-type]
            elif isinstance(exc, FpmNotStarted):
                done(NotStarted(str(exc)))  # type: ignore[arg-type]
            elif isinstance(exc, FpmError):
                done(self._failed(exc, where))
            else:
                done(exc)  # type: ignore[arg-type]

        pool.request_cb(params, body, self.job_timeout, shared, answered)

    def _failed(self, exc: FpmError, where: str) -> Result:
        if isinstance(exc, FpmBadRequest):
            return Result("bad_message", message=f"cannot send to PHP-FPM: {exc}")
        if isinstance(exc, FpmUnavailable):
            return Result("unavailable", message=str(exc), endpoint=where)
        if isinstance(exc, FpmTimeout):
            return Result(
                "timeout", message=f"no response within {self.job_timeout:g} s", endpoint=where
            )
        if isinstance(exc, (FpmConnectionLost, FpmProtocolError)):
            return Result("lost", message=str(exc), endpoint=where)
        raise exc

    def _classify(self, response: FpmResponse, where: str) -> Result:
        stdout = response.stdout  # the head: the CGI headers are at its start
        if response.protocol_status != REQUEST_COMPLETE:
            if response.protocol_status == OVERLOADED:
                return Result("unavailable", message=f"{where}: FPM is overloaded", endpoint=where)
            return Result(
                "lost",
                message=f"{where}: FastCGI protocol status {response.protocol_status}",
                endpoint=where,
            )
        status = cgi.response_status(stdout)
        if 200 <= status < 300:
            return OK
        _, body_out = cgi.header_block(stdout)
        message = cgi.error_message(response.stderr, body_out, status)
        # The pool keeps only the head of each stream: say so when the text above may be
        # missing what PHP wrote later.
        cut = [
            f"{name} {len(head)} of {size} bytes"
            for name, head, size in (
                ("stderr", response.stderr, response.stderr_size),
                ("stdout", stdout, response.stdout_size),
            )
            if size > len(head)
        ]
        if cut:
            message = f"{message} (output cut, kept {', '.join(cut)})"
        return Result(
            "php_error",
            status=status,
            message=message,
            stderr=response.stderr[:STDERR_EXCERPT],
            stdout_head=stdout[:STDOUT_HEAD],
            endpoint=where,
        )
