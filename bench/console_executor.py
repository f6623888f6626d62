"""`--executor cli` against the FastCGI executor: the same jobs, the same dispatch, one run.

Queues bundle-format messages (header lines + base64(serialize(OrderPlaced)), as the
deferred-event bundle publishes them) on the running RabbitMQ, then starts the worker
(`python -m fastworker`) on them twice, each time timing the drain from its `consuming` log line:

- **fastcgi**: the default executor, against a private PHP-FPM pool (`--children` static
  children) running examples/php/dispatch.php;
- **cli**: `--executor cli`, a process per job, `/usr/bin/php tests/php/console_dispatch.php
  fervo:deferred-event:dispatch DATA`, which runs that same dispatch.php, Symfony's
  EventDispatcher and the demo listener included, as the bundle's console command.

Both run at most `--concurrency` jobs at once (the FastCGI worker also pipelines, `--pipeline`
4, its default). It prints jobs/s, the worker's CPU per job, PHP's CPU per job (the FPM pool's;
for the console, the worker's reaped children, i.e. the PHP processes) and the ratios. The
FastCGI run gets more jobs (`--fastcgi-jobs`) so that it lasts long enough to time.

    python bench/console_executor.py [--jobs 500] [--fastcgi-jobs 10000] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT / "tests", ROOT / "src"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from helpers import bundle_message, order_placed_data  # noqa: E402
from services.fpm import FpmServer, start_fpm  # noqa: E402
from services.process import die_with_parent  # noqa: E402
from services.rabbitmq import amqp_delete_queues, amqp_publish, amqp_queue_count  # noqa: E402

DISPATCH = ROOT / "examples" / "php" / "dispatch.php"
CONSOLE = ROOT / "tests" / "php" / "console_dispatch.php"
PHP_BIN = "/usr/bin/php"
TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int) -> tuple[float, float]:
    """(own CPU, reaped children's CPU) of a live process, in seconds: its threads' run time
    from schedstat (nanoseconds), its waited-for children's cutime + cstime (clock ticks)."""
    own = sum(
        int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        for task in os.listdir(f"/proc/{pid}/task")
    )
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return own / 1e9, (int(fields[13]) + int(fields[14])) / TICK


def fpm_cpu(fpm: FpmServer) -> float:
    """The pool's CPU: master, its reaped children and its live children."""
    own, reaped = cpu(fpm.master_pid)
    return own + reaped + sum(sum(cpu(pid)) for pid in fpm.child_pids())


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run(
    name: str, args: argparse.Namespace, fpm: FpmServer, workdir: Path, extra: list[str]
) -> dict[str, float]:
    """Queues the jobs, drains them with one worker, and measures the drain."""
    jobs = args.jobs if name == "cli" else args.fastcgi_jobs
    queue = f"fwbench.console.{secrets.token_hex(3)}.{name}"
    done_log = workdir / "jobs.log"  # the demo listener appends a line per job
    done_log.write_bytes(b"")
    body = bundle_message(
        order_placed_data(1, "x" * 300), str(DISPATCH), "127.0.0.1", fpm.port, PHP_BIN, str(CONSOLE)
    )
    try:
        amqp_publish(args.amqp_url, queue, [body] * jobs)
        log_path = workdir / f"worker-{name}.log"
        command = [
            sys.executable, "-m", "fastworker",
            "--amqp-url", args.amqp_url,
            "--queue", queue,
            "--fpm", fpm.address,
            "--script", str(DISPATCH),
            "--concurrency", str(args.concurrency),
            "--stats-interval", "0",
            *extra,
        ]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT / "src"),
            "FASTWORKER_DEMO_LOG": str(done_log),  # the console's PHP reads it from here
        }
        with open(log_path, "wb") as log:
            worker = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent
            )
        try:
            deadline = time.monotonic() + 30
            while not re.search(rb"\bconsuming\b", log_path.read_bytes()):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{name}: the worker did not start:\n{log_path.read_text()}")
                time.sleep(0.002)
            t0, (own0, php0), fpm0 = time.monotonic(), cpu(worker.pid), fpm_cpu(fpm)
            deadline = t0 + args.timeout
            while count_lines(done_log) < jobs:
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"{name}: {count_lines(done_log)} of {jobs} jobs done:\n"
                        f"{log_path.read_text()[-3000:]}"
                    )
                time.sleep(0.005)
            seconds = time.monotonic() - t0
            (own1, php1), fpm1 = cpu(worker.pid), fpm_cpu(fpm)
        finally:
            worker.terminate()
            code = worker.wait(60)
        left = amqp_queue_count(args.amqp_url, queue)
        if code != 0 or left or count_lines(done_log) != jobs:
            raise SystemExit(f"{name}: worker exit {code}, {left} messages left, see {log_path}")
    finally:
        amqp_delete_queues(args.amqp_url, [queue, f"{queue}.failed"])
    php = (php1 - php0) if name == "cli" else (fpm1 - fpm0)
    return {
        "jobs": jobs,
        "seconds": seconds,
        "jobs_s": jobs / seconds,
        "worker_us": (own1 - own0) / jobs * 1e6,
        "php_us": php / jobs * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500, help="jobs for --executor cli")
    parser.add_argument("--fastcgi-jobs", type=int, default=10000, help="jobs for FastCGI")
    parser.add_argument("--concurrency", type=int, default=4, help="the worker's --concurrency")
    parser.add_argument("--children", type=int, default=4, help="static FPM children")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per drain, at most")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fastworker-console-bench-"))
    fpm = start_fpm(
        workdir, children=args.children, env={"FASTWORKER_DEMO_LOG": str(workdir / "jobs.log")}
    )
    try:
        fastcgi = run("fastcgi", args, fpm, workdir, [])
        console = run("cli", args, fpm, workdir, ["--executor", "cli", "--console", str(CONSOLE)])
    finally:
        fpm.stop()
    print(
        f"same dispatch (examples/php/dispatch.php), concurrency {args.concurrency}, "
        f"{args.children} FPM children, {os.cpu_count()} CPUs"
    )
    print(f"{'':20}{'fastcgi':>12}{'cli':>12}   cli against fastcgi")
    for label, key, unit, compare in (
        ("jobs", "jobs", "", ""),
        ("jobs/s", "jobs_s", "", "{:.0f}x slower"),
        ("worker CPU per job", "worker_us", " us", "{:.0f}x more"),
        ("PHP CPU per job", "php_us", " us", "{:.0f}x more"),
    ):
        a, b = fastcgi[key], console[key]
        ratio = compare.format(a / b if key == "jobs_s" else b / a)
        print(f"{label:20}{a:>9,.0f}{unit:3}{b:>9,.0f}{unit:3}   {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
