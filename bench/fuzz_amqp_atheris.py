"""Opt-in coverage-guided fuzz of the AMQP reader twins with atheris (not run by CI).

    pip install atheris
    python bench/fuzz_amqp_atheris.py [libFuzzer flags, e.g. -max_total_time=600 corpus/]
    python bench/fuzz_amqp_atheris.py --random 100000    # no atheris: seeded random inputs

Each input chooses frame_max, max_body_size and split points, then is fed as a byte stream to
the compiled `fastworker._amqp_codec` and the pure-Python `fastworker.amqp_py` (the compiled
module is instrumented only if atheris can see it; the differential check needs no
instrumentation). A crash is: the twins disagree (items, their types, errors), `feed` raises
anything but RemoteProtocolError, `buffered` reaches frame_max, a broken reader accepts data
again, or `decode_properties` raises anything but PropertyError. tests/test_amqp_fuzz.py runs
the same checks with hypothesis, briefly.
"""

from __future__ import annotations

import random
import struct
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fastworker import _amqp_codec, amqp_py  # noqa: E402
from fastworker.amqp_base import Delivery, PropertyError, RemoteProtocolError  # noqa: E402

TWINS = (_amqp_codec, amqp_py)
FRAME_MAX = (4096, 5000, 131072)
MAX_BODY = (0, 3, 100, 5000, amqp_py.DEFAULT_MAX_BODY_SIZE)
UNUSABLE = "reader is unusable after an earlier error: "


def run(impl: Any, data: bytes, cuts: list[int], frame_max: int, max_body: int) -> Any:
    reader = impl.FrameReader(frame_max=frame_max, max_body_size=max_body)
    items: list[Any] = []
    bounds = [0, *cuts, len(data)]
    for i in range(len(bounds) - 1):
        chunk = data[bounds[i] : bounds[i + 1]]
        view: Any = (chunk, bytearray(chunk), memoryview(chunk))[i % 3]
        try:
            items += reader.feed(view)
        except RemoteProtocolError as exc:
            try:
                reader.feed(impl.HEARTBEAT)
            except RemoteProtocolError as again:
                if str(again) != UNUSABLE + str(exc):
                    raise AssertionError(f"{impl.__name__}: {again!r} after {exc!r}") from None
            else:
                raise AssertionError(f"{impl.__name__}: a broken reader accepted data") from None
            return ("error", type(exc), str(exc))
        if not 0 <= reader.buffered < frame_max:
            raise AssertionError(f"{impl.__name__}: buffered {reader.buffered}")
    return ("ok", items, [type(item) for item in items], reader.buffered)


def check(blob: bytes) -> None:
    if len(blob) < 4:
        return
    frame_max = FRAME_MAX[blob[0] % len(FRAME_MAX)]
    max_body = MAX_BODY[blob[1] % len(MAX_BODY)]
    ncuts = blob[2] % 8
    data = blob[3 + ncuts :]
    cuts = sorted(b * len(data) // 255 for b in blob[3 : 3 + ncuts])
    results = [run(impl, data, cuts, frame_max, max_body) for impl in TWINS]
    if results[0] != results[1]:
        raise AssertionError(f"twins disagree: {results[0]!r} != {results[1]!r}")
    raws = []
    if results[0][0] == "ok":
        raws = [item.properties_raw for item in results[0][1] if type(item) is Delivery]
    for raw in [*raws, data, b"\x20\x00" + data]:
        try:
            amqp_py.decode_properties(raw)
        except PropertyError:
            pass


def random_inputs(count: int, seed: int = 8) -> None:
    """Without atheris: mutated well-formed deliveries and plain random bytes."""
    rng = random.Random(seed)

    def frame(ftype: int, payload: bytes) -> bytes:
        return struct.pack(">BHI", ftype, 1, len(payload)) + payload + b"\xce"

    props = b"\x30\x00" + struct.pack(">I", 7) + b"\x01kI\x00\x00\x00\x05" + b"\x02"
    base = (
        frame(1, b"\x00\x3c\x00\x3c\x04ctag" + struct.pack(">QB", 1, 0) + b"\x00\x01q")
        + frame(2, struct.pack(">HHQ", 60, 0, 3) + props)
        + frame(3, b"abc")
    )
    for i in range(count):
        if i % 2:
            blob = bytearray(rng.randbytes(3) + base * rng.randint(1, 4))
            for _ in range(rng.randint(0, 4)):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
        else:
            blob = bytearray(rng.randbytes(rng.randint(0, 200)))
        check(bytes(blob))
    print(f"{count} inputs: no finding")


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "--random":
        random_inputs(int(sys.argv[2]))
        return 0
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        print("atheris is not installed (pip install atheris); skipping", file=sys.stderr)
        return 0
    atheris.instrument_all()
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
