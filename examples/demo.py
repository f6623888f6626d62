"""End-to-end demo: a PHP app publishes OrderPlaced events, fastworker runs them through PHP-FPM.

Starts a private PHP-FPM pool (4 static children, loopback, stopped at the end) running
examples/php/dispatch.php, publishes events with examples/php/publish.php (php-amqplib, the
deferred-event bundle's exact format), runs `fastworker` on them, and shows what happened,
including the dead letters of the events whose listener throws. Run it through scripts/demo.sh.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import wait_for  # noqa: E402
from services.fpm import start_fpm  # noqa: E402 - the test suite's private-FPM launcher
from services.rabbitmq import amqp_delete_queues, amqp_queue_count  # noqa: E402

URL = os.environ.get("FASTWORKER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
QUEUE = "fastworker_demo"
PHP = ROOT / "examples" / "php"
SMALL, LARGE, FAIL_EVERY = 200, 5, 50


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def publish(port: int, count: int, size: int, start_id: int, fail_every: int = 0) -> None:
    command = [
        "php", str(PHP / "publish.php"), "--queue", QUEUE, "--count", str(count),
        "--size", str(size), "--fpm-port", str(port), "--start-id", str(start_id),
        "--dispatch", str(PHP / "dispatch.php"),
    ]
    if fail_every:
        command += ["--fail-every", str(fail_every)]
    subprocess.run(command, check=True)


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="fastworker-demo-"))
    demo_log = workdir / "orders.log"
    queues = [QUEUE, f"{QUEUE}.failed"] + [f"{QUEUE}.retry.{ms}ms" for ms in (200, 400, 800)]
    amqp_delete_queues(URL, queues)
    say("starting a private PHP-FPM pool: 4 static children on a free loopback port")
    fpm = start_fpm(workdir, children=4, env={"FASTWORKER_DEMO_LOG": str(demo_log)})
    worker = None
    try:
        print(f"PHP-FPM listening on {fpm.address}, children {fpm.child_pids()}")
        say(f"the PHP app publishes {SMALL} small and {LARGE} large (200 KB) OrderPlaced events "
            f"with php-amqplib; every {FAIL_EVERY}th one makes its listener throw")
        publish(fpm.port, SMALL, 300, 1, FAIL_EVERY)
        publish(fpm.port, LARGE, 200_000, 1001)
        total = SMALL + LARGE
        failing = SMALL // FAIL_EVERY
        print(f"queue {QUEUE}: {amqp_queue_count(URL, QUEUE)} messages waiting")

        command = [
            str(Path(sys.executable).parent / "fastworker"),
            "--amqp-url", URL, "--queue", QUEUE, "--fpm", fpm.address,
            "--script", str(PHP / "dispatch.php"), "--allow-script", f"{PHP}/*.php",
            "--concurrency", "4", "--max-attempts", "2", "--retry-delay", "0.2",
        ]
        say("running: " + " ".join(command[1:]))
        started = time.monotonic()
        worker = subprocess.Popen(command)
        wait_for(
            lambda: len(demo_log.read_text().splitlines()) >= total - failing
            if demo_log.exists() else False,
            60, what="the good events",
        )
        wait_for(lambda: amqp_queue_count(URL, f"{QUEUE}.failed") >= failing, 60,
                 what="the failing events' dead letters")
        elapsed = time.monotonic() - started
        time.sleep(0.5)
        say("SIGTERM: the worker finishes in-flight jobs and exits")
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(30)
        print(f"worker exit code: {code}")

        lines = demo_log.read_text().splitlines()
        pids = Counter(line.split()[-1] for line in lines)
        say("result")
        print(f"events dispatched by the PHP listener: {len(lines)} of {total - failing} good ones "
              f"({len(lines) / elapsed:.0f}/s including start-up)")
        print(f"large events (200000-byte payloads): "
              f"{sum(1 for line in lines if line.split()[1] == '200000')}")
        print(f"FPM children that served them (kept-alive connections): {dict(pids)}")
        print(f"left in {QUEUE}: {amqp_queue_count(URL, QUEUE)}; "
              f"dead letters in {QUEUE}.failed: {amqp_queue_count(URL, f'{QUEUE}.failed')}")
        say(f"fastworker dlq show --queue {QUEUE}")
        subprocess.run([command[0], "dlq", "show", "--amqp-url", URL, "--queue", QUEUE], check=False)
        ok = code == 0 and len(lines) == total - failing
        say("demo " + ("succeeded" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        fpm.stop()
        amqp_delete_queues(URL, queues)


if __name__ == "__main__":
    raise SystemExit(main())
