"""Picks the codecs: the compiled `fastworker._fcgi_codec` and `fastworker._amqp_codec`, or their
pure-Python twins `fastworker.fcgi_py` and `fastworker.amqp_py`. The one place that chooses.

`fcgi` and `amqp` are the chosen modules. The FastCGI codec's functions and the names both of its
twins share (from `fastworker.fcgi_base`: the exceptions and the `Response` result) are
re-exported here, and the rest of fastworker imports them from here only. The AMQP codec is used
through `amqp` (the fast consumer reads it per connection as `fast_consumer.codec`, which tests
and benches swap); what its twins share lives in `fastworker.amqp_base`.

`FASTWORKER_NO_EXTENSIONS=1` forces the twins (like aiohttp's AIOHTTP_NO_EXTENSIONS). Without it
a missing compiled module falls back to its twin, so this module still imports (for tools and
tests); `FCGI_COMPILED` and `AMQP_COMPILED` say which one is in use, `FCGI_IMPORT_ERROR` and
`AMQP_IMPORT_ERROR` why the compiled one did not load ("" if it did or was not tried).
`COMPILED` and `IMPORT_ERROR` are the FastCGI codec's, the names this module had first. The
worker refuses to start on a twin unless it was asked for (worker.check_codecs).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from fastworker import amqp_py, fcgi_py
from fastworker.fcgi_base import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    Response,
)

NO_EXTENSIONS = bool(os.environ.get("FASTWORKER_NO_EXTENSIONS"))


def _pick(compiled: str, twin: ModuleType) -> tuple[ModuleType, bool, str]:
    """(module, compiled?, why the compiled one did not load) for one codec."""
    if NO_EXTENSIONS:
        return twin, False, ""
    try:
        return importlib.import_module(compiled), True, ""
    except ImportError as exc:  # pragma: no cover - exercised only without a build
        return twin, False, str(exc)


fcgi, FCGI_COMPILED, FCGI_IMPORT_ERROR = _pick("fastworker._fcgi_codec", fcgi_py)
amqp, AMQP_COMPILED, AMQP_IMPORT_ERROR = _pick("fastworker._amqp_codec", amqp_py)

COMPILED = FCGI_COMPILED
IMPORT_ERROR = FCGI_IMPORT_ERROR

encode_form_value = fcgi.encode_form_value
encode_params = fcgi.encode_params
encode_request = fcgi.encode_request
ResponseParser = fcgi.ResponseParser

__all__ = [
    "AMQP_COMPILED",
    "AMQP_IMPORT_ERROR",
    "COMPILED",
    "FCGI_COMPILED",
    "FCGI_IMPORT_ERROR",
    "IMPORT_ERROR",
    "LocalProtocolError",
    "NO_EXTENSIONS",
    "ProtocolError",
    "RemoteProtocolError",
    "Response",
    "ResponseParser",
    "amqp",
    "encode_form_value",
    "encode_params",
    "encode_request",
    "fcgi",
]
