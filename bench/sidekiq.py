"""The Sidekiq backend against the AMQP backend: the same jobs, the same FPM pool, one run.

Starts one private PHP-FPM pool (pm = static, `--children`) running examples/php/dispatch.php,
then, for each round, drains `--jobs` jobs three ways, each time starting `python -m fastworker`
on jobs queued beforehand and timing from its `consuming` log line to the last job's run:

- **amqp**: bundle-format messages on the running RabbitMQ (the default, compiled consume path);
- **sidekiq**: the same event data as Sidekiq jobs (`{"class": "DeferEvent", "args": [data],
  ...}`, what `Sidekiq::Client.push` writes) on list `queue:<name>` of Redis database `--redis-db`,
  `--backend sidekiq`, with batched fetch (up to FETCH_BATCH jobs per Lua call);
- **sidekiq-unbatched**: the same with FETCH_BATCH = 1, one LMOVE per job: what batching buys.

It prints jobs/s and the worker's CPU per job (its threads' run time from /proc), each with its
ratio to the amqp run of the same round. Redis's own CPU per job is printed for the Sidekiq runs.

    python bench/sidekiq.py [--jobs 20000] [--rounds 2] [--children 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import orjson  # noqa: E402
import redis  # noqa: E402

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
    listening_pid,
    note,
)
from helpers import bundle_message  # noqa: E402
from services.fpm import start_fpm  # noqa: E402
from services.rabbitmq import amqp_declare, amqp_delete_queues  # noqa: E402

UNBATCHED = (
    "import sys, fastworker.sidekiq_consumer as c; c.FETCH_BATCH = 1; "
    "from fastworker.cli import main; sys.exit(main(sys.argv[1:]))"
)


def sidekiq_job(data: str, queue: str) -> bytes:
    """A job as Sidekiq::Client.push writes it."""
    now = time.time()
    return orjson.dumps(
        {
            "retry": True,
            "queue": queue,
            "class": "DeferEvent",
            "args": [data],
            "jid": uuid.uuid4().hex[:24],
            "created_at": now,
            "enqueued_at": now,
        }
    )


def drain(
    mode: str, args: argparse.Namespace, fpm_address: str, done: LineCounter, tmp: Path
) -> dict[str, Any]:
    queue = f"fwbench.sidekiq.{uuid.uuid4().hex[:8]}"
    datas = [event_data(i) for i in range(args.jobs)]
    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    common = ["--fpm", fpm_address, "--script", str(DEFAULT_SCRIPT), "--queue", queue]
    common += ["--stats-interval", "0", "--concurrency", str(args.children)]
    if mode == "amqp":
        amqp_declare(args.amqp_url, queue)  # as the bundle declares it
        bodies = [bundle_message(d, str(DEFAULT_SCRIPT), host="", port="") for d in datas]
        asyncio.run(_publish_all(args.amqp_url, queue, bodies))
        cmd = [sys.executable, "-m", "fastworker", "--amqp-url", args.amqp_url, *common]
    else:
        client = redis.Redis.from_url(redis_url)
        client.flushdb()
        for start in range(0, len(datas), 1000):
            client.lpush(f"queue:{queue}", *(sidekiq_job(d, queue) for d in datas[start:][:1000]))
        client.sadd("queues", queue)
        runner = ["-c", UNBATCHED] if mode == "sidekiq-unbatched" else ["-m", "fastworker"]
        cmd = [sys.executable, *runner, "--backend", "sidekiq", "--redis-url", redis_url, *common]
    done.reset()
    log = tmp / f"worker-{mode}.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"}
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        )
    try:
        deadline = time.monotonic() + 60
        while b"consuming " not in log.read_bytes():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{mode}: the worker did not start:\n{log.read_text()}")
            time.sleep(0.002)
        redis_pid = listening_pid(6379)
        t0, w0 = time.monotonic(), cpu_seconds(worker.pid)
        r0 = cpu_seconds(redis_pid) if redis_pid else 0.0
        while done.count() < args.jobs:
            if worker.poll() is not None or time.monotonic() - t0 > 300:
                raise BenchError(f"{mode}: {done.count()} of {args.jobs} ran:\n{log.read_text()}")
            time.sleep(0.005)
        t1, w1 = time.monotonic(), cpu_seconds(worker.pid)
        r1 = cpu_seconds(redis_pid) if redis_pid else 0.0
    finally:
        worker.terminate()
        worker.wait(30)
    if mode == "amqp":
        amqp_delete_queues(args.amqp_url, [queue, f"{queue}.failed"])
    seconds = t1 - t0
    result = {
        "mode": mode,
        "jobs_s": args.jobs / seconds,
        "worker_cpu_us": (w1 - w0) / args.jobs * 1e6,
        "redis_cpu_us": (r1 - r0) / args.jobs * 1e6 if mode != "amqp" else None,
        "runs": done.count(),
    }
    note(
        f"{mode}: {result['jobs_s']:,.0f} jobs/s, worker {result['worker_cpu_us']:.1f} us/job"
        + (f", Redis {result['redis_cpu_us']:.1f} us/job" if mode != "amqp" else "")
    )
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--children", type=int, default=4)
    p.add_argument("--amqp-url", default=DEFAULT_URL)
    p.add_argument("--redis-db", type=int, default=14)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="fwbench-sidekiq-"))
    done = LineCounter(tmp / "done.log")
    fpm = start_fpm(tmp, children=args.children, env={"FASTWORKER_DEMO_LOG": str(done.path)})
    rounds = []
    try:
        for n in range(args.rounds):
            note(f"round {n + 1} of {args.rounds}")
            rounds.append(
                [
                    drain(mode, args, fpm.address, done, tmp)
                    for mode in ("amqp", "sidekiq", "sidekiq-unbatched")
                ]
            )
    finally:
        fpm.stop()
        redis.Redis.from_url(f"redis://127.0.0.1:6379/{args.redis_db}").flushdb()
    print(f"\n{args.jobs} jobs per run, {args.children} FPM children, examples/php/dispatch.php")
    print(
        f"{'round':<6}{'backend':<20}{'jobs/s':>10}{'x amqp':>9}{'worker us/job':>15}"
        f"{'x amqp':>9}{'Redis us/job':>14}"
    )
    for n, results in enumerate(rounds, 1):
        amqp = results[0]
        for r in results:
            redis_cpu = f"{r['redis_cpu_us']:.1f}" if r["redis_cpu_us"] is not None else "-"
            print(
                f"{n:<6}{r['mode']:<20}{r['jobs_s']:>10,.0f}{r['jobs_s'] / amqp['jobs_s']:>9.2f}"
                f"{r['worker_cpu_us']:>15.1f}{r['worker_cpu_us'] / amqp['worker_cpu_us']:>9.2f}"
                f"{redis_cpu:>14}"
            )
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
