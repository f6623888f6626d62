"""The worker's job path without a broker: job handler + FPM pool + codec against a real pool.

Feeds N bundle-format messages straight into the job handler (no RabbitMQ), `--concurrency` at a
time, on a private PHP-FPM pool, and reports jobs/s, this process's user and system CPU per job,
and FPM's CPU per job. Compare with `bench/e2e.py`: the difference is what the broker and the
consume/ack path cost. It runs the callback path the fast consumer uses (`JobHandler.start`)
(both consumers use it).

    python bench/job_path.py [-n 30000] [--children 4] [--pipeline 4] [--script PATH]
                             [--unix-socket]

The pool is set up as the worker sets it up (`batch_writes`: pipelined requests leave in batches
on a Unix socket). The FPM writes per job count the pool's writes to FPM sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT / "tests", ROOT / "src"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import uvloop  # noqa: E402

from fastworker.codec import COMPILED  # noqa: E402
from fastworker.executor import Executor  # noqa: E402
from fastworker.formats import parser_for  # noqa: E402
from fastworker.fpm import Endpoint, FpmPools  # noqa: E402
from fastworker.handler import JobHandler  # noqa: E402
from fastworker.message import Message  # noqa: E402
from fastworker.targets import TargetPolicy  # noqa: E402
from helpers import bundle_message, order_placed_data  # noqa: E402
from services.fpm import start_fpm  # noqa: E402


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes, from /proc."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def drain(handler: JobHandler, body: bytes, jobs: int, concurrency: int) -> None:
    remaining = jobs
    done = asyncio.get_running_loop().create_future()
    in_flight = 0

    def start_one() -> None:
        nonlocal remaining, in_flight
        remaining -= 1
        in_flight += 1
        handler.start(Message(body, "bench"), None, finished)  # type: ignore[arg-type]

    def finished(rest: object) -> None:
        nonlocal in_flight
        in_flight -= 1
        if rest is not None and not done.done():
            done.set_exception(RuntimeError("a job failed; see the FPM log"))
        elif remaining > 0:
            start_one()
        elif in_flight == 0 and not done.done():
            done.set_result(None)

    for _ in range(min(concurrency, jobs)):
        start_one()
    await done


def fpm_writes(pools: FpmPools) -> int:
    """Writes to FPM sockets so far: one per request, less those that left in a batch."""
    return sum(pool.writes for pool in pools.pools())


def context_switches() -> int:
    """This process's voluntary context switches: how often it went to sleep waiting for I/O."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--jobs", type=int, default=30000)
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=0, help="default: --children")
    parser.add_argument(
        "--pipeline", type=int, default=4, help="requests per connection (worker's --pipeline)"
    )
    parser.add_argument("--script", default=str(ROOT / "examples" / "php" / "dispatch.php"))
    parser.add_argument("--unix-socket", action="store_true", help="FPM listens on a Unix socket")
    args = parser.parse_args()
    concurrency = args.concurrency or args.children
    workdir = Path(tempfile.mkdtemp(prefix="fastworker-job-path-"))
    fpm = start_fpm(
        workdir,
        children=args.children,
        env={"FASTWORKER_DEMO_LOG": str(workdir / "jobs.log")},
        unix_socket=args.unix_socket,
    )
    script = str(Path(args.script).resolve())
    # No fastcgi_host/port lines on a Unix socket: the job goes to the default endpoint.
    host, port = ("", "") if args.unix_socket else ("127.0.0.1", fpm.port)
    body = bundle_message(order_placed_data(1, "x" * 300), script, host, port)

    async def run() -> None:
        pools = FpmPools(concurrency, pipeline=args.pipeline, batch_writes=True)
        in_flight = concurrency * args.pipeline
        policy = TargetPolicy([Endpoint.parse(fpm.address)], [script])
        handler = JobHandler(
            parser_for("bundle"),
            script,
            Executor(pools, policy, 30),
            None,
            8 << 20,  # type: ignore[arg-type]
        )
        await drain(handler, body, 200, in_flight)  # warm-up
        children = fpm.child_pids()
        switches0, writes0 = context_switches(), fpm_writes(pools)
        fpm0, times0, wall0 = cpu_seconds(children), os.times(), time.perf_counter()
        await drain(handler, body, args.jobs, in_flight)
        wall, times1, fpm1 = time.perf_counter() - wall0, os.times(), cpu_seconds(children)
        switches, writes = context_switches() - switches0, fpm_writes(pools) - writes0
        await pools.close()
        per_job = 1e6 / args.jobs
        print(
            f"{args.jobs} jobs, {args.children} FPM children, concurrency {concurrency}, "
            f"pipeline {args.pipeline}, {'Unix socket' if args.unix_socket else 'TCP loopback'}, "
            f"codec {'compiled' if COMPILED else 'pure Python'}, no broker"
        )
        print(f"jobs/s              {args.jobs / wall:,.0f}")
        print(f"worker user CPU/job {(times1.user - times0.user) * per_job:.1f} us")
        print(f"worker sys CPU/job  {(times1.system - times0.system) * per_job:.1f} us")
        print(f"FPM CPU/job         {(fpm1 - fpm0) * per_job:.1f} us")
        print(f"worker sleeps/job   {switches / args.jobs:.2f}")
        print(f"FPM writes/job      {writes / args.jobs:.2f}")

    try:
        uvloop.run(run())
    finally:
        fpm.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
