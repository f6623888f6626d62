"""RabbitMQ's own latency floor: publish -> a consumer's read, with no worker and no PHP.

`bench/e2e.py --rate` measures publish -> PHP start through the whole path. This runs the same
paced publisher (bench/blocking_amqp.py: each message written the moment it is stamped) against
a consumer that is as thin as a consumer gets, a blocking `recv` loop in a process of its own
that acks in batches of 32, so what is left is the broker, the loopback and the two wake-ups.

    python bench/broker_latency.py [--rate 3000] [--seconds 10] [--prefetch 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import sys
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from pamqp import commands

sys.path.insert(0, str(Path(__file__).resolve().parent))

from blocking_amqp import BlockingConnection, publish_paced  # noqa: E402
from e2e import DEFAULT_URL, percentile  # noqa: E402

ACK_EVERY = 32


def consume(url: str, queue: str, count: int, prefetch: int, ready: Event, out: Any) -> None:
    """Consumes `count` messages; puts the sorted publish -> read times (ms) on `out`."""
    conn = BlockingConnection(url, "fastworker bench consumer")
    try:
        conn.call(commands.Queue.Declare(queue=queue, auto_delete=True), commands.Queue.DeclareOk)
        conn.call(commands.Basic.Qos(prefetch_count=prefetch), commands.Basic.QosOk)
        conn.call(commands.Basic.Consume(queue=queue), commands.Basic.ConsumeOk)
        ready.set()
        delays: list[float] = []
        for read_at, tag, body in conn.deliveries():
            delays.append((read_at - float(body)) * 1e3)
            if tag % ACK_EVERY == 0 or len(delays) == count:
                conn.ack(tag)
            if len(delays) == count:
                break
        out.put(sorted(delays))
    finally:
        conn.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--amqp-url", default=os.environ.get("FASTWORKER_AMQP_URL", DEFAULT_URL))
    p.add_argument("--rate", type=float, default=3000, help="messages/s (default: 3000)")
    p.add_argument("--seconds", type=float, default=10, help="per round (default: 10)")
    p.add_argument("--prefetch", type=int, default=256, help="the consumer's (default: 256)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    count = max(1, round(args.rate * args.seconds))
    print(
        f"publish -> consumer read, {count} messages at {args.rate:,.0f}/s per round, "
        f"blocking publisher and consumer (acks every {ACK_EVERY}), prefetch {args.prefetch}"
    )
    print(f"{'round':<6} {'p50':>8} {'p90':>8} {'p99':>8} {'p99.9':>8} {'max':>8}  (ms)")
    for round_no in range(1, args.rounds + 1):
        queue = f"fwbench.latency.{secrets.token_hex(4)}"
        ready, out = multiprocessing.Event(), multiprocessing.Queue()
        consumer = multiprocessing.Process(
            target=consume, args=(args.amqp_url, queue, count, args.prefetch, ready, out)
        )
        consumer.start()
        try:
            if not ready.wait(30):
                raise SystemExit("the consumer did not start consuming within 30 s")
            time.sleep(0.2)
            took = publish_paced(
                args.amqp_url, queue, lambda _i, now: repr(now).encode(), count, args.rate
            )
            delays = out.get(timeout=60)
        finally:
            consumer.join(10)
            if consumer.is_alive():
                consumer.kill()
        figures = [percentile(delays, q) for q in (0.5, 0.9, 0.99, 0.999)] + [delays[-1]]
        kept = count / took
        behind = "" if kept >= 0.95 * args.rate else f"  (the publisher kept only {kept:,.0f}/s)"
        print(f"{round_no:<6} " + " ".join(f"{v:>8.3f}" for v in figures) + behind)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
