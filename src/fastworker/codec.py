"""Picks the FastCGI codec: the compiled `fcgi_codec`, or the pure-Python twin.

`FASTWORKER_NO_EXTENSIONS=1` forces the twin (like aiohttp's AIOHTTP_NO_EXTENSIONS). Without it a
missing compiled module falls back to the twin so a source checkout still runs; `COMPILED` says
which one is in use and the test suite fails if the extension did not load.
"""

from __future__ import annotations

import os

from fastworker import fcgi_py

COMPILED = False
if not os.environ.get("FASTWORKER_NO_EXTENSIONS"):
    try:
        import fcgi_codec as _impl  # type: ignore[import-not-found]

        COMPILED = True
    except ImportError:  # pragma: no cover - exercised only without a build
        _impl = fcgi_py
else:
    _impl = fcgi_py

encode_params = _impl.encode_params
encode_request = _impl.encode_request
ResponseParser = _impl.ResponseParser
ProtocolError = _impl.ProtocolError

__all__ = ["COMPILED", "ProtocolError", "ResponseParser", "encode_params", "encode_request"]
