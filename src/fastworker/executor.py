"""Runs a Job as a FastCGI request and classifies what happened (the kinds: see outcome.py).

A job the pool no longer starts because the worker is stopping is no outcome: `NotStarted` is
passed to the callback, so the consumer returns the message to its queue.
"""

from __future__ import annotations

import os
import socket
from typing import NamedTuple

from fastworker import __version__, cgi
from fastworker.balance import Balancer
from fastworker.callbacks import Answer
from fastworker.codec import encode_form_value
from fastworker.endpoint import Endpoint
from fastworker.fcgi_base import OVERLOADED, REQUEST_COMPLETE
from fastworker.fpm import (
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
from fastworker.outcome import OK, Kind, Result
from fastworker.targets import TargetPolicy

# Data up to this size travels as the DEFERRED_DATA param; larger data as a POST body, because
# PHP-FPM resets the connection when one param does not fit in a single PARAMS record.
INLINE_DATA_LIMIT = 32 * 1024
STDERR_EXCERPT = 8 * 1024
STDOUT_HEAD = 2 * 1024


class _Target(NamedTuple):
    """Where a vetted (endpoint, script) runs: its pool, its name, its shared params block."""

    pool: FpmPool | Balancer  # the endpoint's pool, or every endpoint's (--route balance)
    where: str  # the endpoint, for errors; "" when balanced (the answer says)
    shared: bytes


class Executor:
    def __init__(
        self,
        pools: FpmPools,
        policy: TargetPolicy,
        job_timeout: float,
        balancer: Balancer | None = None,
    ) -> None:
        self.pools = pools
        self.balancer = balancer  # --route balance: every job to the least busy endpoint
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
        self._targets: dict[tuple[Endpoint | None, str], _Target] = {}  # once vetted
        # Jobs that did not succeed, by (endpoint, kind), for the metrics.
        self.errors: dict[tuple[str, str], int] = {}

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
        """The params that differ from job to job (the shared ones travel pre-encoded): the
        job's own dict (application params and job context), completed here, not copied."""
        params = job.params
        body, content_type = job.body, job.content_type
        if job.data is not None:
            if len(job.data) <= INLINE_DATA_LIMIT:
                params["DEFERRED_DATA"] = job.data
            else:
                body = b"DEFERRED_DATA=" + encode_form_value(job.data)
                content_type = "application/x-www-form-urlencoded"
        params["CONTENT_LENGTH"] = str(len(body))
        params["CONTENT_TYPE"] = content_type
        return params, body

    def _target(self, job: Job) -> _Target | Result:
        """Where a job runs, or why it may not."""
        balancer = self.balancer
        # Balanced: whatever endpoint the message names, only its script is vetted.
        key = (job.endpoint if balancer is None else None, job.script)
        target = self._targets.get(key)
        if target is None:
            try:
                endpoint, script = self.policy.resolve(job if balancer is None else Job(job.script))
            except JobRefused as exc:
                return Result(exc.kind, message=str(exc))
            try:
                shared = encode_shared_params(self._script_params(script))
            except ValueError as exc:  # e.g. a script path longer than a record can carry
                return Result(Kind.BAD_MESSAGE, message=f"cannot send to PHP-FPM: {exc}")
            if balancer is None:
                target = _Target(self.pools.get(endpoint), str(endpoint), shared)
            else:
                target = _Target(balancer, "", shared)
            if len(self._targets) < 1024:
                self._targets[key] = target
        return target

    def stop_starting(self) -> None:
        """Jobs not yet written to FPM answer NotStarted from now on (the worker is stopping),
        so their messages go back to the queue instead of running late."""
        self.pools.stop_starting()

    async def close(self) -> None:
        """Closes every FPM connection; jobs still running are aborted."""
        await self.pools.close()

    def start(self, job: Job, answer: Answer[Result]) -> None:
        """Runs `job`: `answer(result, None)` once it finished, or `answer(None, exc)` with
        NotStarted (the worker is stopping) or an unexpected exception."""
        target = self._target(job)
        if isinstance(target, Result):
            answer(target, None)
            return
        where = target.where
        params, body = self._own_params(job)

        def answered(response: FpmResponse | None, exc: BaseException | None) -> None:
            # Balanced targets have no fixed endpoint: the balancer says which one answered.
            place = where or self._answering()
            if response is not None:
                result = self._classify(response, place)
                if result is not OK:
                    self._count_error(place, result.kind)
                answer(result, None)
            elif isinstance(exc, FpmNotStarted):
                answer(None, NotStarted(str(exc)))
            elif isinstance(exc, FpmError):
                result = self._failed(exc, place)
                self._count_error(place, result.kind)
                answer(result, None)
            else:
                answer(None, exc)

        target.pool.request(params, body, self.job_timeout, target.shared, answered)

    def _answering(self) -> str:
        answering = self.balancer.answering if self.balancer is not None else None
        return str(answering) if answering is not None else "every endpoint"

    def _count_error(self, where: str, kind: str) -> None:
        key = (where, str(kind))
        self.errors[key] = self.errors.get(key, 0) + 1

    def _failed(self, exc: FpmError, where: str) -> Result:
        if isinstance(exc, FpmBadRequest):
            return Result(Kind.BAD_MESSAGE, message=f"cannot send to PHP-FPM: {exc}")
        if isinstance(exc, FpmUnavailable):
            return Result(Kind.UNAVAILABLE, message=str(exc), endpoint=where)
        if isinstance(exc, FpmTimeout):
            return Result(
                Kind.TIMEOUT, message=f"no response within {self.job_timeout:g} s", endpoint=where
            )
        if isinstance(exc, (FpmConnectionLost, FpmProtocolError)):
            return Result(Kind.LOST, message=str(exc), endpoint=where)
        return Result(Kind.INTERNAL, message=f"unexpected {type(exc).__name__}: {exc}")

    def _classify(self, response: FpmResponse, where: str) -> Result:
        stdout = response.stdout  # the head: the CGI headers are at its start
        if response.protocol_status != REQUEST_COMPLETE:
            if response.protocol_status == OVERLOADED:
                return Result(
                    Kind.UNAVAILABLE, message=f"{where}: FPM is overloaded", endpoint=where
                )
            return Result(
                Kind.LOST,
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
            Kind.PHP_ERROR,
            status=status,
            message=message,
            stderr=response.stderr[:STDERR_EXCERPT],
            stdout_head=stdout[:STDOUT_HEAD],
            endpoint=where,
        )
