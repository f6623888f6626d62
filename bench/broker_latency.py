"""RabbitMQ's own latency floor: publish -> a consumer's read, with no worker and no PHP.

`bench/e2e.py --rate` measures publish -> PHP start through the whole path. This runs the same
paced publisher (bench/blocking_amqp.py: each message written the moment it is stamped) against
a consumer that is as thin as a consumer gets, a blocking `recv` loop in a process of its own
that acks in batches of 32, so what is left is the broker, the loopback and the two wake-ups.

    python bench/broker_latency.py [--rate 3000] [--seconds 10] [--prefetch 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from blocking_amqp import ACK_EVERY, broker_floor  # noqa: E402
from e2e import DEFAULT_URL, percentile  # noqa: E402


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
        delays, took = broker_floor(args.amqp_url, args.rate, args.seconds, args.prefetch)
        figures = [percentile(delays, q) for q in (0.5, 0.9, 0.99, 0.999)] + [delays[-1]]
        kept = count / took
        behind = "" if kept >= 0.95 * args.rate else f"  (the publisher kept only {kept:,.0f}/s)"
        print(f"{round_no:<6} " + " ".join(f"{v:>8.3f}" for v in figures) + behind)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
