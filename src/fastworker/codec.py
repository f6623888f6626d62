"""Picks the FastCGI codec: the compiled `fcgi_codec`, or the pure-Python twin.

`FASTWORKER_NO_EXTENSIONS=1` forces the twin (like aiohttp's AIOHTTP_NO_EXTENSIONS). Without it a
missing compiled module falls back to the twin, so the module still imports (for tools and
tests); `COMPILED` says which one is in use and `IMPORT_ERROR` why the compiled one did not
load. The worker refuses to start on the twin unless it was asked for (worker.check_codecs).
"""

from __future__ import annotations

import os

from fastworker import fcgi_py

COMPILED = False
IMPORT_ERROR = ""
if not os.environ.get("FASTWORKER_NO_EXTENSIONS"):
    try:
        import fcgi_codec as _impl  # type: ignore[import-not-found]

        COMPILED = True
    except ImportError as exc:  # pragma: no cover - exercised only without a build
        IMPORT_ERROR = str(exc)
        _impl = fcgi_py
else:
    _impl = fcgi_py

encode_params = _impl.encode_params
encode_request = _impl.encode_request
ResponseParser = _impl.ResponseParser
ProtocolError = _impl.ProtocolError

__all__ = [
    "COMPILED",
    "IMPORT_ERROR",
    "ProtocolError",
    "ResponseParser",
    "encode_params",
    "encode_request",
]
