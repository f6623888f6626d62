"""Picks the FastCGI codec: the compiled `fastworker._fcgi_codec`, or the pure-Python twin.

`fcgi` is the chosen module; its functions and the names both twins share (from
`fastworker.fcgi_base`: the exceptions and the `Response` result) are re-exported here, and the
rest of fastworker imports them from here only.

`FASTWORKER_NO_EXTENSIONS=1` forces the twin (like aiohttp's AIOHTTP_NO_EXTENSIONS). Without it a
missing compiled module falls back to the twin, so the module still imports (for tools and
tests); `COMPILED` says which one is in use and `IMPORT_ERROR` why the compiled one did not
load. The worker refuses to start on the twin unless it was asked for (worker.check_codecs).
"""

from __future__ import annotations

import os
from types import ModuleType

from fastworker import fcgi_py
from fastworker.fcgi_base import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    Response,
)

COMPILED = False
IMPORT_ERROR = ""
fcgi: ModuleType = fcgi_py
if not os.environ.get("FASTWORKER_NO_EXTENSIONS"):
    try:
        from fastworker import _fcgi_codec  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - exercised only without a build
        IMPORT_ERROR = str(exc)
    else:
        fcgi = _fcgi_codec
        COMPILED = True

encode_params = fcgi.encode_params
encode_request = fcgi.encode_request
ResponseParser = fcgi.ResponseParser

__all__ = [
    "COMPILED",
    "IMPORT_ERROR",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "Response",
    "ResponseParser",
    "encode_params",
    "encode_request",
    "fcgi",
]
