"""Opt-in coverage-guided fuzz of the FastCGI response parser twins with atheris (not run by CI).

    pip install atheris
    python bench/fuzz_fcgi_atheris.py [libFuzzer flags, e.g. -max_total_time=600 corpus/]
    python bench/fuzz_fcgi_atheris.py --random 100000    # no atheris: seeded random inputs

Each input chooses max_head, the request ids the client uses and split points, then is fed as a
byte stream to the compiled `fastworker._fcgi_codec` and the pure-Python `fastworker.fcgi_py`.
A crash is: the twins disagree (results, or the RemoteProtocolError message), `feed` raises
anything but RemoteProtocolError, `buffered` passes 2 x max_head per request id, or a broken
parser accepts data again. tests/test_fcgi_fuzz.py runs the same checks with hypothesis, briefly.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fastworker import _fcgi_codec, fcgi_py  # noqa: E402
from fastworker.fcgi_base import RemoteProtocolError  # noqa: E402

TWINS = (_fcgi_codec, fcgi_py)
MAX_HEAD = (0, 1, 7, 100, 65536)
IDS = ((1,), (1, 2), (1, 2, 3, 65535))


def run(impl: Any, data: bytes, cuts: list[int], max_head: int, ids: tuple[int, ...]) -> Any:
    parser = impl.ResponseParser(max_head, ids)
    done: list[Any] = []
    bounds = [0, *cuts, len(data)]
    for i in range(len(bounds) - 1):
        chunk = data[bounds[i] : bounds[i + 1]]
        view: Any = (chunk, bytearray(chunk), memoryview(chunk))[i % 3]
        try:
            done += parser.feed(view)
        except RemoteProtocolError as exc:
            try:
                parser.feed(b"\x01\x06\x00\x01\x00\x00\x00\x00")
            except RemoteProtocolError:
                pass
            else:
                raise AssertionError(f"{impl.__name__}: a broken parser accepted data") from None
            return ("error", str(exc))
        if parser.buffered > 2 * max_head * len(ids):
            raise AssertionError(f"{impl.__name__}: buffered {parser.buffered}")
    return ("ok", [tuple(r) for r in done], parser.bytes_received)


def check(blob: bytes) -> None:
    if len(blob) < 3:
        return
    max_head = MAX_HEAD[blob[0] % len(MAX_HEAD)]
    ids = IDS[blob[1] % len(IDS)]
    cut_count = blob[2] % 8
    data = blob[3:]
    rng = random.Random(blob[:16])
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(cut_count))
    results = [run(impl, data, cuts, max_head, ids) for impl in TWINS]
    if results[0] != results[1]:
        raise AssertionError(f"twins disagree on {blob!r}: {results[0]!r} != {results[1]!r}")


def random_inputs(count: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    for n in range(count):
        size = rng.randrange(3, 400)
        blob = bytearray(rng.randbytes(size))
        # Mostly valid-looking record headers, so the search gets past the version byte.
        for offset in range(3, size - 8, rng.randrange(8, 40)):
            blob[offset] = 1
            blob[offset + 1] = rng.choice((3, 6, 7, 6, 7, 10, 11, 200))
            blob[offset + 2] = 0
            blob[offset + 3] = rng.choice((0, 1, 2, 3))
        check(bytes(blob))
        if n and n % 10000 == 0:
            print(f"{n} inputs, no finding", file=sys.stderr)


def main() -> None:
    if sys.argv[1:2] == ["--random"]:
        count = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
        random_inputs(count)
        print(f"{count} random inputs, no finding")
        return
    import atheris  # type: ignore[import-not-found]

    atheris.instrument_all()  # the pure-Python twin's bytecode: coverage guides the search
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
