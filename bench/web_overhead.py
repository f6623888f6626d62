"""What `fastworker web` costs a worker, measured where a drain's noise cannot hide it: the
worker's own CPU while it idles, with nothing reading its --metrics-port, then with the
dashboard reading it every --interval and its overview loaded as often (as an open page does),
alternating. The difference, per read, is the dashboard's whole cost to the worker; divided by a
job rate it is the cost per job. (`bench/e2e.py --compare-web` measures the same during drains,
where run-to-run noise is larger than the effect.)

    python bench/web_overhead.py --seconds 30 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from e2e import DEFAULT_URL, ROOT, cpu_seconds  # noqa: E402
from services.process import die_with_parent, free_loopback_port  # noqa: E402
from services.rabbitmq import amqp_delete_queues  # noqa: E402
from services.worker import worker_env  # noqa: E402


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fastworker", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=worker_env(),
            preexec_fn=die_with_parent,
        )


def wait_log(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text.encode() not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{log.name}: no {text!r}:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)


class Reader:
    """Loads a URL every `every` seconds in a thread (the overview's script does the same)."""

    def __init__(self, url: str, every: float) -> None:
        self.url, self.every, self.loads = url, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                    self.loads += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.loads


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--amqp-url", default=DEFAULT_URL)
    p.add_argument("--seconds", type=float, default=30.0, help="each phase (default: 30)")
    p.add_argument("--rounds", type=int, default=2, help="without/with pairs (default: 2)")
    p.add_argument("--interval", type=float, default=2.0, help="the dashboard's --interval")
    p.add_argument("--rate", type=float, default=10_000, help="jobs/s for the per-job figure")
    args = p.parse_args()
    tmp = Path(f"/tmp/fw-web-overhead-{secrets.token_hex(3)}")
    tmp.mkdir()
    queue = f"fwbench.web.{secrets.token_hex(3)}"
    metrics = free_loopback_port()
    worker = spawn(
        ["--amqp-url", args.amqp_url, "--queue", queue, "--fpm", "127.0.0.1:9",
         "--metrics-port", str(metrics), "--stats-interval", "0"],
        tmp / "worker.log",
    )  # fmt: skip
    procs = [worker]
    try:
        wait_log(tmp / "worker.log", "consuming", worker)
        time.sleep(2)  # past start-up
        without, with_web, reads = [], [], 0
        for round_ in range(args.rounds):
            c0 = cpu_seconds(worker.pid)
            time.sleep(args.seconds)
            without.append((cpu_seconds(worker.pid) - c0) / args.seconds)
            port = free_loopback_port()
            web = spawn(
                ["web", "--amqp-url", args.amqp_url, "--queue", queue,
                 "--workers", f"http://127.0.0.1:{metrics}", "--listen", f"127.0.0.1:{port}",
                 "--interval", str(args.interval)],
                tmp / f"web-{round_}.log",
            )  # fmt: skip
            procs.append(web)
            wait_log(tmp / f"web-{round_}.log", "fastworker web on", web)
            reader = Reader(f"http://127.0.0.1:{port}/", args.interval)
            c0 = cpu_seconds(worker.pid)
            time.sleep(args.seconds)
            with_web.append((cpu_seconds(worker.pid) - c0) / args.seconds)
            loads = reader.stop()
            reads += int(args.seconds / args.interval)
            web.terminate()
            web.wait(15)
            print(
                f"round {round_ + 1}: worker idle CPU {without[-1] * 1e3:.3f} ms/s without, "
                f"{with_web[-1] * 1e3:.3f} ms/s with the dashboard ({loads} overview loads)"
            )
        extra = sum(with_web) / len(with_web) - sum(without) / len(without)  # CPU s per s
        per_read = extra * args.interval
        print(
            f"\nthe dashboard reading the worker every {args.interval:g} s costs it "
            f"{extra * 1e3:.3f} ms of CPU per second, {per_read * 1e3:.3f} ms per read "
            f"(/metrics and /healthz); at {args.rate:,.0f} jobs/s that is "
            f"{extra / args.rate * 1e6:.3f} us per job"
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(15)
        with contextlib.suppress(Exception):
            amqp_delete_queues(args.amqp_url, [queue, f"{queue}.failed"] + [
                f"{queue}.retry.{ms}ms" for ms in _levels()
            ])  # fmt: skip
    return 0


def _levels() -> list[int]:
    from fastworker.failures import RetryPolicy

    return RetryPolicy().levels()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
