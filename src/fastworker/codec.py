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

FCGI_COMPILED = False
FCGI_IMPORT_ERROR = ""
fcgi: ModuleType = fcgi_py
if not NO_EXTENSIONS:
    try:
        from fastworker import _fcgi_codec  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - exercised only without a build
        FCGI_IMPORT_ERROR = str(exc)
    else:
        fcgi = _fcgi_codec
        FCGI_COMPILED = True

AMQP_COMPILED = False
AMQP_IMPORT_ERROR = ""
amqp: ModuleType = amqp_py
if not NO_EXTENSIONS:
    try:
        from fastworker import _amqp_codec  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - exercised only without a build
        AMQP_IMPORT_ERROR = str(exc)
    else:
        amqp = _amqp_codec
        AMQP_COMPILED = True

COMPILED = FCGI_COMPILED
IMPORT_ERROR = FCGI_IMPORT_ERROR

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
    "encode_params",
    "encode_request",
    "fcgi",
]
