"""`--processes 1` against `--processes 2`: the same jobs, the same FPM pool, one run.

Starts one private PHP-FPM pool (pm = static, `--children`) running examples/php/dispatch.php,
then for each round drains `--jobs` bundle messages queued beforehand on the running RabbitMQ,
once with one worker process and once with two under the supervisor (the pool's connections
split between them: `--concurrency` is the total), timing from the last `consuming` log line to
the last job's run. Prints jobs/s and the worker processes' CPU per job, with the ratio of
two processes to one.

    python bench/processes.py [--jobs 30000] [--rounds 2] [--children 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from e2e import (  # noqa: E402
    DEFAULT_SCRIPT,
    DEFAULT_URL,
    ROOT,
    BenchError,
    LineCounter,
    _die_with_parent,
    _publish_all,
    cpu_seconds,
    event_data,
    note,
)
from helpers import bundle_message  # noqa: E402
from services.fpm import start_fpm  # noqa: E402
from services.process import proc_children  # noqa: E402
from services.rabbitmq import amqp_declare, amqp_delete_queues  # noqa: E402


def drain(
    processes: int, args: argparse.Namespace, fpm_address: str, done: LineCounter, tmp: Path
) -> dict[str, float]:
    queue = f"fwbench.processes.{uuid.uuid4().hex[:8]}"
    amqp_declare(args.amqp_url, queue)  # as the bundle declares it
    bodies = [
        bundle_message(event_data(i), str(DEFAULT_SCRIPT), host="", port="")
        for i in range(args.jobs)
    ]
    asyncio.run(_publish_all(args.amqp_url, queue, bodies))
    done.reset()
    log = tmp / f"worker-{processes}.log"
    cmd = [
        sys.executable, "-m", "fastworker", "--amqp-url", args.amqp_url, "--queue", queue,
        "--fpm", fpm_address, "--script", str(DEFAULT_SCRIPT), "--stats-interval", "0",
        "--concurrency", str(args.children), "--processes", str(processes),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        )
    try:
        deadline = time.monotonic() + 60
        while log.read_bytes().count(b"consuming ") < processes:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the worker did not start:\n{log.read_text()}")
            time.sleep(0.002)
        pids = proc_children(worker.pid) if processes > 1 else [worker.pid]
        t0, c0 = time.monotonic(), sum(cpu_seconds(p) for p in pids)
        while done.count() < args.jobs:
            if worker.poll() is not None or time.monotonic() - t0 > 300:
                raise BenchError(f"{done.count()} of {args.jobs} ran:\n{log.read_text()}")
            time.sleep(0.005)
        t1, c1 = time.monotonic(), sum(cpu_seconds(p) for p in pids)
    finally:
        worker.terminate()
        worker.wait(60)
        amqp_delete_queues(args.amqp_url, [queue, f"{queue}.failed"])
    result = {"jobs_s": args.jobs / (t1 - t0), "worker_cpu_us": (c1 - c0) / args.jobs * 1e6}
    note(
        f"--processes {processes}: {result['jobs_s']:,.0f} jobs/s, "
        f"worker {result['worker_cpu_us']:.1f} us/job"
    )
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=30000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--children", type=int, default=4)
    p.add_argument("--amqp-url", default=DEFAULT_URL)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fwbench-processes-"))
    done = LineCounter(tmp / "done.log")
    fpm = start_fpm(tmp, children=args.children, env={"FASTWORKER_DEMO_LOG": str(done.path)})
    rows = []
    try:
        for n in range(args.rounds):
            one = drain(1, args, fpm.address, done, tmp)
            two = drain(2, args, fpm.address, done, tmp)
            rows.append((n + 1, one, two))
    finally:
        fpm.stop()
    print(
        f"\n{args.jobs} jobs per run, {args.children} FPM children, --concurrency "
        f"{args.children} in total, examples/php/dispatch.php"
    )
    print(
        f"{'round':<6}{'1 process jobs/s':>18}{'2 processes jobs/s':>20}{'ratio':>8}"
        f"{'CPU us/job 1 / 2':>20}"
    )
    for n, one, two in rows:
        print(
            f"{n:<6}{one['jobs_s']:>18,.0f}{two['jobs_s']:>20,.0f}"
            f"{two['jobs_s'] / one['jobs_s']:>8.2f}"
            f"{one['worker_cpu_us']:>11.1f} / {two['worker_cpu_us']:.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
