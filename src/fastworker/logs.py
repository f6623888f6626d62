"""The log's two forms: text for a terminal, or JSON lines (`--log-format json`) for a log
shipper: one orjson object per line with time, level, logger and message, and the job's
fields when the line is about a job (queue, kind, attempt, endpoint, script, job_id)."""

from __future__ import annotations

import logging
import sys
import time

import orjson

# Fields a log call may attach with `extra=`; the JSON form carries those that are set.
JOB_FIELDS = ("queue", "kind", "status", "attempt", "endpoint", "script", "job_id", "trace_id")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; a traceback goes in "exception", never on lines of its own."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = record.created
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        line: dict[str, object] = {
            "time": f"{stamp}.{int(seconds % 1 * 1000):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = record.__dict__
        for name in JOB_FIELDS:
            value = fields.get(name)
            if value is not None and value != "":
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure(level: str, form: str = "text") -> None:
    """The root logger: to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if form == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
