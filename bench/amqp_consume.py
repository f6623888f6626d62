"""Consume + ack cost of the AMQP consumers, no PHP: aiormq's AmqpConsumer vs FastAmqpConsumer.

    python bench/amqp_consume.py [-n 50000] [--rounds 3] [--prefetch 64] [--concurrency 4]
                                 [--consumers aiormq,fast,fast-py] [--json]

For each round and consumer: N messages (bundle-sized, 500 bytes) are published to a fresh
queue first (not measured), then the consumer drains them with a no-op handler under uvloop.
Measured from `run()` to the N-th handler call: messages/s, this process's CPU per message
(`time.process_time()`, all threads) and RabbitMQ's (beam.smp utime + stime from /proc) per
message. The machine is shared and noisy: compare the ratio columns, not absolute numbers; the
median of the rounds is printed. "fast-py" is the fast consumer on the pure-Python codec.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiormq
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fastworker import amqp_py, fast_consumer  # noqa: E402
from fastworker import codec as selector  # noqa: E402
from fastworker.consumer import AmqpConsumer  # noqa: E402
from fastworker.fast_consumer import FastAmqpConsumer  # noqa: E402
from fastworker.message import Message  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
SELECTED_CODEC = selector.amqp  # the compiled one unless FASTWORKER_NO_EXTENSIONS is set
PUBLISH_WINDOW = 1000  # unconfirmed publishes in flight while filling the queue


def beam_pids() -> list[int]:
    """RabbitMQ's Erlang VM processes (beam.smp), found in /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == "beam.smp":
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            continue
    return total / CLK_TCK


async def fill(url: str, queue: str, n: int, body: bytes) -> None:
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        await channel.queue_declare(queue, auto_delete=False)
        await channel.queue_purge(queue)
        for start in range(0, n, PUBLISH_WINDOW):
            await asyncio.gather(
                *(
                    channel.basic_publish(body, routing_key=queue)
                    for _ in range(min(PUBLISH_WINDOW, n - start))
                )
            )
    finally:
        await connection.close()


async def delete(url: str, queue: str) -> None:
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(queue)
    finally:
        await connection.close()


async def drain(kind: str, url: str, queue: str, n: int, args: argparse.Namespace) -> dict:
    count = 0
    done = asyncio.get_running_loop().create_future()

    async def handler(message: Message, publisher: object) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set_result((time.perf_counter(), time.process_time(), cpu_seconds(beams)))

    cls = AmqpConsumer if kind == "aiormq" else FastAmqpConsumer
    consumer = cls(url, [queue], handler, concurrency=args.concurrency, prefetch=args.prefetch)
    beams = beam_pids()
    wall0, cpu0, beam0 = time.perf_counter(), time.process_time(), cpu_seconds(beams)
    task = asyncio.create_task(consumer.run())
    wall1, cpu1, beam1 = await asyncio.wait_for(done, 600)
    consumer.stop()
    await asyncio.wait_for(task, 60)
    wall = wall1 - wall0
    return {
        "consumer": kind,
        "messages": n,
        "seconds": wall,
        "msgs_per_s": n / wall,
        "client_cpu_us": (cpu1 - cpu0) / n * 1e6,
        "broker_cpu_us": (beam1 - beam0) / n * 1e6,
    }


def run(kind: str, args: argparse.Namespace) -> dict:
    queue = f"fwbench.amqp_consume.{secrets.token_hex(4)}"
    if kind == "fast-py":
        fast_consumer.codec = amqp_py
    elif kind == "fast":
        fast_consumer.codec = SELECTED_CODEC

    async def main() -> dict:
        await fill(args.url, queue, args.n, b"x" * args.body_size)
        try:
            return await drain(kind, args.url, queue, args.n, args)
        finally:
            await delete(args.url, queue)

    return uvloop.run(main())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--url",
        default=os.environ.get("FASTWORKER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    )
    p.add_argument("-n", type=int, default=50_000, help="messages per run (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="runs per consumer; median shown")
    p.add_argument("--prefetch", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--body-size", type=int, default=500)
    p.add_argument("--consumers", default="aiormq,fast,fast-py")
    p.add_argument("--json", action="store_true", help="one JSON object per run on stdout")
    args = p.parse_args()
    kinds = [k.strip() for k in args.consumers.split(",") if k.strip()]
    if "fast" in kinds and not selector.AMQP_COMPILED:
        print(
            f"fastworker._amqp_codec did not load ({selector.AMQP_IMPORT_ERROR or 'forced off'}):"
            " python setup.py build_ext --inplace",
            file=sys.stderr,
        )
        return 2
    if not beam_pids():
        print("note: no beam.smp process visible; broker CPU will read 0", file=sys.stderr)
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for round_no in range(args.rounds):
        order = kinds if round_no % 2 == 0 else kinds[::-1]  # drift hits all alike
        for kind in order:
            r = run(kind, args)
            results[kind].append(r)
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                print(
                    f"  round {round_no + 1} {kind:8s} {r['msgs_per_s']:9.0f} msg/s "
                    f"client {r['client_cpu_us']:6.1f} us/msg  broker {r['broker_cpu_us']:6.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    if args.json:
        return 0
    med = {
        k: {f: statistics.median(r[f] for r in rs) for f in rs[0] if f not in ("consumer",)}
        for k, rs in results.items()
    }
    base = med.get("aiormq")
    print(
        f"\n{args.n} messages x {args.rounds} rounds, {args.body_size}-byte bodies, prefetch "
        f"{args.prefetch}, concurrency {args.concurrency}, no-op handler; medians\n"
    )
    header = f"{'consumer':10s} {'msg/s':>9s} {'client us/msg':>14s} {'broker us/msg':>14s}"
    if base:
        header += f" {'client vs aiormq':>17s} {'msg/s vs aiormq':>16s}"
    print(header)
    for k, m in med.items():
        line = (
            f"{k:10s} {m['msgs_per_s']:9.0f} {m['client_cpu_us']:14.1f} {m['broker_cpu_us']:14.1f}"
        )
        if base:
            line += (
                f" {m['client_cpu_us'] / base['client_cpu_us']:16.2f}x"
                f" {m['msgs_per_s'] / base['msgs_per_s']:15.2f}x"
            )
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
