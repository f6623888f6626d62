"""What running a job came to: the outcome kinds and the Result every layer passes up.

Shared vocabulary at the bottom of the import graph (it imports no machinery): the executor makes
Results, the job handler and the failure handler read them, `dlq` shows them.

The kinds:
- ok: no Status header, or a 2xx one.
- php_error: PHP answered with a non-2xx status (uncaught exception, fatal error, 404 script).
- timeout: no complete answer within --job-timeout; the connection was closed.
- lost: the connection died after the answer started, the PHP child died before answering
  (crash, OOM kill, request_terminate_timeout), or FPM broke the protocol.
- unavailable: no connection to FPM could be made (refused, timed out), FastCGI OVERLOADED, or
  FPM kept closing connections without reading the request; the job did not run.
- bad_message / not_allowed: refused before FPM was called (bad_message also for a request that
  cannot be encoded, e.g. a json param too large for one FastCGI record).
- internal: an exception of fastworker's own while handling the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    OK = "ok"
    PHP_ERROR = "php_error"
    TIMEOUT = "timeout"
    LOST = "lost"
    UNAVAILABLE = "unavailable"
    BAD_MESSAGE = "bad_message"
    NOT_ALLOWED = "not_allowed"
    INTERNAL = "internal"


# The job did not run and the trouble is not the job's: retried without counting an attempt.
INFRASTRUCTURE = frozenset({Kind.UNAVAILABLE})
# The job can never succeed: dead-lettered at once, no retries.
REFUSED = frozenset({Kind.BAD_MESSAGE, Kind.NOT_ALLOWED})


@dataclass(slots=True)
class Result:
    kind: Kind
    status: int = 0
    message: str = ""
    stderr: bytes = b""  # the head of PHP's STDERR
    stdout_head: bytes = b""
    endpoint: str = ""
    traceback: str = ""  # internal: where fastworker failed

    @property
    def ok(self) -> bool:
        return self.kind is Kind.OK


OK = Result(Kind.OK, 200)
