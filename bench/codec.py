"""Times the compiled FastCGI codec against its pure-Python twin (and flup, if importable).

    python bench/codec.py [--json] [--quick]

Each case runs many iterations per repeat and keeps the best repeat: the machine is shared and
noisy, so read the ratio column (twin / compiled) rather than absolute numbers. `--quick` runs a
few iterations only (a smoke test); `--json` prints one JSON object per case.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fastworker import _fcgi_codec, fcgi_py  # noqa: E402

Runner = Callable[[int], None]  # runs the operation n times

PARAMS: dict[str, str] = {
    "SCRIPT_FILENAME": "/srv/app/vendor/fervo/deferred-event-bundle/Resources/bin/dispatch.php",
    "REQUEST_METHOD": "POST",
    "CONTENT_LENGTH": "0",
    "CONTENT_TYPE": "application/x-www-form-urlencoded",
    "GATEWAY_INTERFACE": "CGI/1.1",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "SERVER_SOFTWARE": "fastworker/0.1.0",
    "REMOTE_ADDR": "127.0.0.1",
    "SERVER_NAME": "localhost",
    "SERVER_PORT": "80",
    "PHP_VALUE": "display_errors=0",
    "REQUEST_URI": "/dispatch.php",
    "DEFERRED_DATA": base64.b64encode(bytes(range(256)) + bytes(44))[:400].decode(),
}
BODY = bytes(range(256)) * 800  # 200 KB (204,800 bytes)
BIG_PARAMS = {**PARAMS, "CONTENT_LENGTH": str(len(BODY))}
OK_BODY = b"Content-type: text/html\r\n\r\nok"


def _record(rtype: int, rid: int, content: bytes = b"") -> bytes:
    pad = -len(content) & 7
    return struct.pack("!BBHHBx", 1, rtype, rid, len(content), pad) + content + bytes(pad)


def _end(rid: int) -> bytes:
    return _record(3, rid, struct.pack("!IB3x", 0, 0))


SMALL_RESPONSE = _record(6, 1, OK_BODY) + _record(7, 1) + _end(1)
BIG_STDOUT = bytes(range(256)) * 4096  # 1 MiB
BIG_RESPONSE = (
    b"".join(_record(6, 1, BIG_STDOUT[o : o + 65535]) for o in range(0, len(BIG_STDOUT), 65535))
    + _record(6, 1)
    + _end(1)
)
BIG_CHUNKS = [BIG_RESPONSE[o : o + 65536] for o in range(0, len(BIG_RESPONSE), 65536)]


# --------------------------------------------------------------------------------------------
# the cases: each builds a runner for one implementation with everything bound to locals


def encode_small(m: ModuleType) -> Runner:
    def run(n: int, enc: Any = m.encode_request, p: dict[str, str] = PARAMS) -> None:
        for _ in range(n):
            enc(1, p)

    return run


def encode_200k_stdin(m: ModuleType) -> Runner:
    def run(n: int, enc: Any = m.encode_request, p: dict[str, str] = BIG_PARAMS) -> None:
        for _ in range(n):
            enc(1, p, BODY)

    return run


def parse_small(m: ModuleType) -> Runner:
    def run(n: int, data: bytes = SMALL_RESPONSE) -> None:
        feed = m.ResponseParser().feed  # one parser per connection, reused for every job
        for _ in range(n):
            feed(data)

    return run


def parse_1m_stdout(m: ModuleType) -> Runner:
    def run(n: int, chunks: list[bytes] = BIG_CHUNKS) -> None:
        feed = m.ResponseParser().feed
        for _ in range(n):
            for chunk in chunks:
                feed(chunk)

    return run


def round_trip_small(m: ModuleType) -> Runner:
    def run(n: int, enc: Any = m.encode_request, p: dict[str, str] = PARAMS) -> None:
        feed = m.ResponseParser().feed
        data = SMALL_RESPONSE
        for _ in range(n):
            enc(1, p)
            feed(data)

    return run


# A large job's data (over the executor's 32 KB inline limit): base64 text, as the bundle sends.
FORM_DATA = base64.b64encode(random.Random(1).randbytes(36 * 1024))


def form_value_48k(m: ModuleType) -> Runner:
    def run(n: int, enc: Any = m.encode_form_value, data: bytes = FORM_DATA) -> None:
        for _ in range(n):
            enc(data)

    return run


CASES: list[tuple[str, Callable[[ModuleType], Runner], int]] = [
    ("encode_small", encode_small, len(fcgi_py.encode_request(1, PARAMS))),
    ("encode_200k_stdin", encode_200k_stdin, len(fcgi_py.encode_request(1, BIG_PARAMS, BODY))),
    ("parse_small", parse_small, len(SMALL_RESPONSE)),
    ("parse_1m_stdout", parse_1m_stdout, len(BIG_RESPONSE)),
    (
        "round_trip_small",
        round_trip_small,
        len(fcgi_py.encode_request(1, PARAMS)) + len(SMALL_RESPONSE),
    ),
    ("form_value_48k", form_value_48k, len(FORM_DATA)),
]


# --------------------------------------------------------------------------------------------
# optional third column: flup, a pure-Python FastCGI implementation, if it happens to be there


def _flup_module() -> ModuleType | None:
    """Wraps flup's Record class in our API; None if flup is missing or does not behave."""
    try:
        from flup.server import fcgi_base as fb  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - optional, skipped silently
        return None

    class _Sink:
        def __init__(self) -> None:
            self.parts: list[bytes] = []

        def send(self, data: bytes) -> int:
            self.parts.append(bytes(data))
            return len(data)

        def sendall(self, data: bytes) -> None:
            self.parts.append(bytes(data))

    class _Source:
        def __init__(self, data: bytes) -> None:
            self.data = data
            self.pos = 0

        def recv(self, n: int) -> bytes:
            chunk = self.data[self.pos : self.pos + n]
            self.pos += len(chunk)
            return chunk

    def _write(sink: _Sink, rtype: int, rid: int, content: bytes) -> None:
        r = fb.Record(rtype, rid)
        r.contentData = content
        r.contentLength = len(content)
        r.write(sink)

    def encode_request(rid: int, params: dict[str, str], stdin: bytes = b"") -> bytes:
        sink = _Sink()
        _write(sink, fb.FCGI_BEGIN_REQUEST, rid, struct.pack("!HB5x", 1, 1))
        _write(
            sink,
            fb.FCGI_PARAMS,
            rid,
            b"".join(bytes(fb.encode_pair(k, v)) for k, v in params.items()),
        )
        _write(sink, fb.FCGI_PARAMS, rid, b"")
        for off in range(0, len(stdin), 0xFFF8):
            _write(sink, fb.FCGI_STDIN, rid, stdin[off : off + 0xFFF8])
        _write(sink, fb.FCGI_STDIN, rid, b"")
        return b"".join(sink.parts)

    class ResponseParser:
        """Not incremental (flup reads from a socket): buffers until END_REQUEST arrives."""

        def __init__(self) -> None:
            self.buf = b""

        def feed(self, data: bytes) -> list[tuple[int, bytes, bytes, int, int]]:
            self.buf += data
            if self.buf[-16:-15] != b"\x01" or self.buf[-15] != 3:  # wait for END_REQUEST
                return []
            src = _Source(self.buf)
            self.buf = b""
            out: list[bytes] = []
            err: list[bytes] = []
            while True:
                r = fb.Record()
                r.read(src)
                if r.type == fb.FCGI_STDOUT:
                    out.append(r.contentData)
                elif r.type == fb.FCGI_STDERR:
                    err.append(r.contentData)
                elif r.type == fb.FCGI_END_REQUEST:
                    app, proto = struct.unpack("!IB3x", r.contentData)
                    return [(r.requestId, b"".join(out), b"".join(err), app, proto)]

    mod = ModuleType("flup_adapter")
    mod.encode_request = encode_request  # type: ignore[attr-defined]
    mod.ResponseParser = ResponseParser  # type: ignore[attr-defined]
    try:
        assert ResponseParser().feed(SMALL_RESPONSE) == [(1, OK_BODY, b"", 0, 0)]
        encode_request(1, PARAMS, b"x")
    except Exception:  # noqa: BLE001 - an incompatible flup version: leave it out
        return None
    return mod


# --------------------------------------------------------------------------------------------
# timing


def best_ns_per_op(run: Runner, repeats: int, target_ns: int) -> float:
    """Calibrates the iteration count to ~target_ns per repeat, then keeps the best repeat."""
    n = 1
    while True:
        t0 = time.perf_counter_ns()
        run(n)
        elapsed = time.perf_counter_ns() - t0
        if elapsed >= target_ns // 4 or n >= 1 << 24:
            break
        n *= 4 if elapsed < target_ns // 40 else 2
    n = max(1, int(n * target_ns / max(elapsed, 1)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        run(n)
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def _mb_s(nbytes: int, ns: float) -> float:
    return nbytes / ns * 1e3  # bytes per ns = GB/s; times 1000 = MB/s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    ap.add_argument("--quick", action="store_true", help="few iterations: a smoke test")
    args = ap.parse_args(argv)
    repeats, target_ns = (2, 2_000_000) if args.quick else (7, 200_000_000)

    impls: list[tuple[str, ModuleType]] = [("compiled", _fcgi_codec), ("twin", fcgi_py)]
    flup = _flup_module()
    if flup is not None:
        impls.append(("flup", flup))

    rows = []
    for case, make, nbytes in CASES:
        row: dict[str, Any] = {"case": case, "bytes_per_op": nbytes}
        for label, mod in impls:
            try:
                ns = best_ns_per_op(make(mod), repeats, target_ns)
            except Exception:  # noqa: BLE001 - only the optional column may fail
                if label != "flup":
                    raise
                continue
            row[f"ns_per_op_{label}"] = ns
            row[f"mb_s_{label}"] = _mb_s(nbytes, ns)
        row["ratio"] = row["ns_per_op_twin"] / row["ns_per_op_compiled"]
        if "ns_per_op_flup" in row:
            row["ratio_flup"] = row["ns_per_op_flup"] / row["ns_per_op_compiled"]
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)

    if not args.json:
        labels = [label for label, _ in impls]
        head = f"{'case':<18} {'bytes':>9}"
        head += "".join(f" {'ns/op ' + lb:>16}" for lb in labels)
        head += "".join(f" {'MB/s ' + lb:>14}" for lb in labels)
        head += f" {'twin/compiled':>14}"
        print(head)
        for row in rows:
            line = f"{row['case']:<18} {row['bytes_per_op']:>9}"
            line += "".join(f" {row.get('ns_per_op_' + lb, float('nan')):>16,.0f}" for lb in labels)
            line += "".join(f" {row.get('mb_s_' + lb, float('nan')):>14,.1f}" for lb in labels)
            line += f" {row['ratio']:>13.1f}x"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
