"""End-to-end benchmark: fastworker against the nginx -> PHP-FPM ceiling, side by side.

One invocation starts one private PHP-FPM pool (pm = static) and measures, on that pool and the
same dispatch script:

(a) the ceiling: a private nginx passes requests to the pool over kept-alive FastCGI connections
    (an ``upstream`` with ``keepalive``, ``fastcgi_keep_conn on``), driven by wrk;
(b) fastworker draining ``--jobs`` bundle-format messages queued beforehand on the running
    RabbitMQ, then a paced latency phase (publish -> end of the PHP request), or with ``--rate``
    a steady-rate run (publish -> start and end of the PHP script).

CPU figures come from /proc (utime + stime) of the processes involved. See bench/README.md.

    python bench/e2e.py --jobs 20000
    python bench/e2e.py --quick
    python bench/e2e.py --sweep --json bench/out/sweep.json
    python bench/e2e.py --profile --jobs 20000        # py-spy on the worker during the drain
    python bench/e2e.py --quick --job-ms 5 --children 8      # slow jobs: jobs/s of the maximum
    python bench/e2e.py --children 16 --rate 3000 --seconds 10 --jobs 2000   # latency run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiormq
import aiormq.exceptions
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
for _path in (ROOT / "tests", ROOT / "src", ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# start_fpm reports failures through pytest.fail.
import pytest  # noqa: E402

from blocking_amqp import broker_floor  # noqa: E402
from blocking_amqp import publish_paced as publish_paced_blocking  # noqa: E402
from fastworker.executor import Executor  # noqa: E402
from fastworker.fpm import Endpoint, FpmPools  # noqa: E402
from fastworker.job import Job  # noqa: E402
from fastworker.targets import TargetPolicy  # noqa: E402
from helpers import bundle_message, order_placed_data  # noqa: E402
from services.fpm import FpmServer, start_fpm  # noqa: E402
from services.process import die_with_parent as _die_with_parent  # noqa: E402
from services.process import free_loopback_port, tcp_port_open, which  # noqa: E402
from services.rabbitmq import (  # noqa: E402
    amqp_declare,
    amqp_delete_queues,
    amqp_host_port,
    amqp_queue_count,
)

DEFAULT_SCRIPT = ROOT / "examples" / "php" / "dispatch.php"
TIMED_SCRIPT = BENCH_DIR / "php" / "timed.php"  # latency probe: "<published> <start> <end>"
SLEEP_SCRIPT = BENCH_DIR / "php" / "sleep.php"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
QUEUE_PREFIX = "fwbench."
CLK_TCK = os.sysconf("SC_CLK_TCK")
PUBLISH_BATCH = 2000
PAYLOAD_LEN = 240  # gives ~400 bytes of base64 DEFERRED_DATA, as the realistic request
STALL_SECONDS = 60.0
_T0 = time.monotonic()


def note(message: str) -> None:
    """Progress on stderr, stamped with the seconds since the bench started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A phase could not run or produced nonsense; the message says why."""


# --------------------------------------------------------------------------- /proc


def _stat_rest(pid: int) -> list[bytes] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """CPU time of a process, all its threads; with ``reaped``, plus its waited-for children.

    Threads' run time comes from /proc/<pid>/task/*/schedstat (nanoseconds), else utime + stime
    of /proc/<pid>/stat (clock ticks). A process that is gone counts as 0: callers snapshot
    before and after a phase.
    """
    rest = _stat_rest(pid)
    if rest is None:
        return 0.0
    seconds = 0.0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                seconds += int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        seconds = (int(rest[11]) + int(rest[12])) / CLK_TCK
    if reaped:
        seconds += (int(rest[13]) + int(rest[14])) / CLK_TCK
    return seconds


def fpm_cpu(fpm: FpmServer) -> float:
    """CPU of the FPM master and its children; children that exited count through the master."""
    return cpu_seconds(fpm.master_pid, reaped=True) + sum(cpu_seconds(p) for p in fpm.child_pids())


def user_system_seconds(pid: int) -> tuple[float, float]:
    """utime and stime of a live process (clock ticks), to split its CPU into user and kernel."""
    rest = _stat_rest(pid)
    if rest is None:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(rest[11]) / tick, int(rest[12]) / tick


def io_counts(pid: int) -> tuple[int, int, int]:
    """(read syscalls, write syscalls, voluntary context switches) of a live process so far:
    where the worker's kernel time goes. Zeros if it is gone."""
    try:
        io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0, 0
    sleeps = 0
    for line in status.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            sleeps = int(line.split()[1])
    return int(io["syscr"]), int(io["syscw"]), sleeps


def vm_hwm_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process, in MiB; 0 if it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat. Busy includes
    steal: the time the hypervisor gave our vCPUs to other guests."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / CLK_TCK, steal / CLK_TCK


def listening_pid(port: int) -> int | None:
    """The PID owning the TCP socket that listens on ``port`` (e.g. RabbitMQ's beam.smp)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in targets:
                        return int(entry)
    return None


def broker_pid(url: str) -> int | None:
    """RabbitMQ's process: the listener of the URL's port, else any beam.smp."""
    pid = listening_pid(amqp_host_port(url)[1])
    if pid is not None:
        return pid
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().strip() == "beam.smp":
                return int(entry)
    return None


# --------------------------------------------------------------------------- data


def event_data(order_id: int, tag: str = "", payload_len: int = PAYLOAD_LEN) -> str:
    """base64(serialize(OrderPlaced)) of ~400 bytes (more with a longer ``payload_len``);
    ``tag`` leads the payload."""
    payload = (f"{tag} order {order_id} " if tag else f"order {order_id} ").ljust(payload_len, "x")
    return order_placed_data(order_id, payload)


def payload_len_for(data_kb: float) -> int:
    """The payload length that makes event_data() about ``data_kb`` KiB of base64 (at least
    the usual ~400 bytes)."""
    extra = round(data_kb * 1024) - len(event_data(0))
    return PAYLOAD_LEN + max(0, extra * 3 // 4)


def theoretical_max(args: argparse.Namespace) -> float | None:
    """With --job-ms: jobs/s of all FPM children sleeping --job-ms per job and nothing else."""
    return args.children * 1000 / args.job_ms if args.job_ms else None


def _pcts(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, p99.9 and max of already sorted milliseconds."""
    return {
        "p50_ms": round(percentile(values, 0.50), 2),
        "p90_ms": round(percentile(values, 0.90), 2),
        "p99_ms": round(percentile(values, 0.99), 2),
        "p999_ms": round(percentile(values, 0.999), 2),
        "max_ms": round(values[-1], 2) if values else math.nan,
    }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class LineCounter:
    """Counts lines appended to a file, reading only what was added since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines = 0

    def reset(self) -> None:
        self.path.write_bytes(b"")
        self.offset = self.lines = 0

    def count(self) -> int:
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset += len(chunk)
            self.lines += chunk.count(b"\n")
        return self.lines


# --------------------------------------------------------------------------- AMQP


async def _publish_all(url: str, queue: str, bodies: Sequence[bytes]) -> None:
    """Publish with confirms, PUBLISH_BATCH in flight at a time; returns when all are queued."""
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        last = time.monotonic()
        for start in range(0, len(bodies), PUBLISH_BATCH):
            batch = bodies[start : start + PUBLISH_BATCH]
            await asyncio.gather(
                *(channel.basic_publish(b, exchange="", routing_key=queue) for b in batch)
            )
            if time.monotonic() - last > 2:
                last = time.monotonic()
                note(f"  published {start + len(batch)}/{len(bodies)}")
    finally:
        await conn.close()


async def _publish_paced_aiormq(
    url: str, queue: str, make_body: Callable[[int, float], bytes], count: int, rate: float
) -> float:
    """Publish ``count`` messages evenly at ``rate``/s; each body is made (and stamped) just
    before it is sent. No publisher confirms: waiting for them would turn the pace into bursts.
    Returns the seconds the publishing took: count/rate on pace, more if the publisher fell
    behind (it then catches up in bursts).
    """
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel(publisher_confirms=False)
        start, sent = time.monotonic(), 0
        while sent < count:
            due = min(count, int((time.monotonic() - start) * rate) + 1)
            while sent < due:
                body = make_body(sent, time.time())
                await channel.basic_publish(body, exchange="", routing_key=queue)
                sent += 1
            await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
        return time.monotonic() - start
    finally:
        await conn.close()


def _listed_queues(prefix: str) -> list[str]:
    """Queues whose name starts with ``prefix``, via rabbitmqctl (local broker only)."""
    rabbitmqctl = which("rabbitmqctl")
    if rabbitmqctl is None:
        return []
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        out = subprocess.run(
            [rabbitmqctl, "list_queues", "-q", "--no-table-headers", "name"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
        return [n.strip() for n in out.splitlines() if n.strip().startswith(prefix)]
    return []


# --------------------------------------------------------------------------- nginx + wrk

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    fastcgi_temp_path {dir}/fastcgi;
    proxy_temp_path {dir}/proxy;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream fpm {{
        server {fpm};
        keepalive {keepalive};
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            fastcgi_pass fpm;
            fastcgi_keep_conn on;
{params}
        }}
    }}
}}
"""


def nginx_params(script: Path, data: str) -> dict[str, str]:
    """Exactly the CGI params fastworker sends for a bundle job, taken from its executor."""
    executor = Executor(FpmPools(1), TargetPolicy([Endpoint("127.0.0.1", 9000)], [str(script)]), 1)
    params, _ = executor.fastcgi_params(Job(str(script), data=data.encode()), str(script))
    return {
        str(name): value.decode() if isinstance(value, bytes) else value
        for name, value in params.items()
    }


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests, req/s, non-2xx responses and socket errors from wrk's report."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if not rps or not total:
        raise BenchError(f"cannot parse wrk output:\n{text}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    return {
        "requests": int(total.group(1)),
        "req_s": float(rps.group(1)),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0,
    }


# --------------------------------------------------------------------------- profile


# Frames every sampled stack of the worker starts with: left out of the inclusive listing.
_ENTRY_FRAMES = {
    "<module> (fastworker/__main__.py)",
    "_run_module_as_main (<frozen runpy>)",
    "_run_code (<frozen runpy>)",
    "main (fastworker/cli.py)",
    "run (fastworker/worker.py)",
    "run (uvloop/__init__.py)",
    "Runner.run (asyncio/runners.py)",
}


def summarize_pyspy(raw: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_frame_name(f) for f in stack.split(";")]
        self_counts[frames[-1]] += count
        for frame in set(frames) - _ENTRY_FRAMES:
            total_counts[frame] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": n, "pct": round(100 * n / max(samples, 1), 1)}
            for name, n in counter.most_common(top)
        ]

    return {"samples": samples, "self": share(self_counts), "inclusive": share(total_counts)}


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``, short enough for a table."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    func, path = match.groups()
    parts = Path(path).parts
    for anchor in ("site-packages", "src", "lib"):
        if anchor in parts:
            path = "/".join(parts[parts.index(anchor) + 1 :])
            break
    return f"{func} ({path})"


# --------------------------------------------------------------------------- the bench


def ack_frames(port: int) -> tuple[int, int] | None:
    """(multiple, single) ack frames the worker sent so far, from its /metrics; None if it has
    no such counter (the aiormq client) or did not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    found = {
        sample.labels["multiple"]: int(sample.value)
        for family in text_string_to_metric_families(text)
        if family.name == "fastworker_broker_acks"
        for sample in family.samples
        if sample.name == "fastworker_broker_acks_total"
    }
    return (found["true"], found["false"]) if len(found) == 2 else None


class _Scraper:
    """GETs /metrics every second in a thread while a drain runs, as a busy Prometheus would
    (its default is every 15 s); `stop()` returns how many scrapes answered 200."""

    def __init__(self, port: int, path: str = "/metrics", every: float = 1.0) -> None:
        import threading

        self.url = f"http://127.0.0.1:{port}{path}"
        self.every = every  # --compare-web: the overview page, every 2 s as its script does
        self.ok = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                    self.ok += response.status == 200
            if self._stop.wait(self.every):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.ok


class Bench:
    """Owns the private FPM, nginx, worker and queues of one run; ``close()`` stops them all."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.url: str = args.amqp_url
        self.script = Path(args.script).resolve()
        self.tmp = Path(tempfile.mkdtemp(prefix="fwbench-"))
        self.done_log = self.tmp / "done.log"
        self.latency_log = self.tmp / "latency.log"
        self.done = LineCounter(self.done_log)
        self.token = secrets.token_hex(4)
        self.queues: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.fpm: FpmServer | None = None
        self.broker = broker_pid(self.url)
        self.sample = event_data(0)  # the ceiling's data: ~400 bytes, even with --body-kb
        # --body-kb: the queued (drained) messages' data is about that size.
        self.payload_len = payload_len_for(args.body_kb) if args.body_kb else PAYLOAD_LEN

    # ---- lifecycle

    def start_fpm(self) -> FpmServer:
        env = {
            "FASTWORKER_DEMO_LOG": str(self.done_log),
            "FW_BENCH_LATENCY_FILE": str(self.latency_log),
            "FW_BENCH_SCRIPT": str(self.script),
            "FW_BENCH_JOB_MS": f"{self.args.job_ms:g}",  # bench/php/sleep.php (--job-ms)
        }
        try:
            self.fpm = start_fpm(
                self.tmp, children=self.args.children, env=env, unix_socket=self.args.unix_socket
            )
        except pytest.fail.Exception as exc:
            raise BenchError(str(exc)) from None
        note(f"php-fpm: {self.args.children} static children on {self.fpm.address}")
        return self.fpm

    def spawn(
        self, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a process in its own session that dies with the bench; output goes to ``log``."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def stop(
        self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 10
    ) -> int:
        """Signal ``proc``, wait for it, SIGKILL it if it lingers; returns its exit code."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=5)
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)
        return int(proc.returncode)

    def close(self) -> None:
        for proc in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc, wait=5)
        if self.fpm is not None:
            self.fpm.stop()
            self.fpm = None
        self.delete_queues()
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def new_queue(self) -> str:
        queue = f"{QUEUE_PREFIX}{self.token}.{len(self.queues)}"
        self.queues.append(queue)
        return queue

    def delete_queues(self) -> None:
        """This run's queues and what the worker derived from them (.failed, .retry.*)."""
        if not self.queues:
            return
        names = [f"{q}{suffix}" for q in self.queues for suffix in ("", ".failed")]
        with contextlib.suppress(Exception):
            amqp_delete_queues(self.url, names)
        leftovers = _listed_queues(f"{QUEUE_PREFIX}{self.token}.")
        if leftovers:
            with contextlib.suppress(Exception):
                amqp_delete_queues(self.url, leftovers)
        note(f"deleted queues {QUEUE_PREFIX}{self.token}.*")
        self.queues.clear()

    # ---- (a) the ceiling

    def run_ceiling(self) -> dict[str, Any]:
        """nginx -> FPM over kept-alive FastCGI connections, driven by wrk; req/s and CPU."""
        fpm = self.fpm
        assert fpm is not None
        nginx, wrk = which("nginx"), which("wrk")
        if nginx is None or wrk is None:
            raise BenchError("the ceiling needs nginx and wrk (apt install nginx-light wrk)")
        ngdir = self.tmp / "nginx"
        ngdir.mkdir(exist_ok=True)
        port = free_loopback_port()
        params = "\n".join(
            f'            fastcgi_param {name} "{value}";'
            for name, value in nginx_params(self.script, self.sample).items()
        )
        conf = ngdir / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                dir=ngdir,
                fpm=fpm.address,
                keepalive=self.args.nginx_keepalive,
                port=port,
                params=params,
            )
        )
        proc = self.spawn(
            [nginx, "-p", str(ngdir), "-c", str(conf), "-e", str(ngdir / "error.log")],
            ngdir / "nginx.out",
        )
        try:
            deadline = time.monotonic() + 10
            while not tcp_port_open("127.0.0.1", port, 0.2):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"nginx did not start:\n{_tail(ngdir / 'error.log')}")
                time.sleep(0.05)
            url = f"http://127.0.0.1:{port}/"
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
                body = response.read().decode(errors="replace").strip()
            note(f"ceiling: nginx on :{port} answers {body[:60]!r}")
            conns = self.args.wrk_connections or 2 * self.args.children
            cmd = [wrk, "-t1", f"-c{conns}", "--timeout", "10s"]
            self._wrk(cmd + ["-d1s", url])  # warm-up: connections, opcache
            self.done.reset()
            note(f"ceiling: wrk -t1 -c{conns} -d{self.args.wrk_seconds}s ...")
            ng0, fpm0, t0 = cpu_seconds(proc.pid), fpm_cpu(fpm), time.monotonic()
            text, wrk_cpu = self._wrk(cmd + [f"-d{self.args.wrk_seconds}s", url])
            ng1, fpm1, t1 = cpu_seconds(proc.pid), fpm_cpu(fpm), time.monotonic()
        finally:
            self.stop(proc, signal.SIGQUIT)
        result = parse_wrk(text)
        result["wrk_output"] = text
        result["nginx_error_lines"] = len(
            _problems(ngdir / "error.log", r"\[(?:warn|error|crit)\]")
        )
        n = max(result["requests"], 1)
        ran = self.done.count()
        result.update(
            seconds=round(t1 - t0, 2),
            connections=conns,
            nginx_keepalive=self.args.nginx_keepalive,
            jobs_run=ran,
            nginx_cpu_us=round((ng1 - ng0) / n * 1e6, 1),
            wrk_cpu_us=round(wrk_cpu / n * 1e6, 1),
            nginx_wrk_cpu_us=round(((ng1 - ng0) + wrk_cpu) / n * 1e6, 1),
            fpm_cpu_us=round((fpm1 - fpm0) / n * 1e6, 1),
        )
        if result["non_2xx"] or result["socket_errors"] or result["nginx_error_lines"]:
            note(
                f"ceiling: WARNING {result['non_2xx']} non-2xx, {result['socket_errors']} socket"
                f" errors, nginx error log:\n{_tail(ngdir / 'error.log', 10)}"
            )
        note(
            f"ceiling: {result['req_s']:,.0f} req/s, nginx+wrk {result['nginx_wrk_cpu_us']} us/req,"
            f" FPM {result['fpm_cpu_us']} us/req ({ran} runs recorded)"
        )
        return result

    @staticmethod
    def _wrk(cmd: list[str]) -> tuple[str, float]:
        """Run wrk; its output and its own CPU seconds (from wait4's rusage)."""
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        assert proc.stdout is not None
        try:
            out = proc.stdout.read().decode(errors="replace")
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise BenchError(f"wrk failed ({proc.returncode}):\n{out}")
        return out, usage.ru_utime + usage.ru_stime

    # ---- (b) fastworker

    def worker_cmd(
        self, queue: str, concurrency: int, prefetch: int, extra: Sequence[str] = ()
    ) -> list[str]:
        fpm = self.fpm
        assert fpm is not None
        return [
            sys.executable,
            "-m",
            "fastworker",
            "--amqp-url",
            self.url,
            "--queue",
            queue,
            "--fpm",
            fpm.address,
            "--script",
            str(self.script),
            "--allow-script",
            str(self.script),
            "--allow-script",
            str(TIMED_SCRIPT),
            "--concurrency",
            str(concurrency),
            "--prefetch",
            str(prefetch),
            "--pipeline",
            str(self.args.pipeline),
            *self.args.worker_arg,
            *extra,
        ]

    def body(self, data: str, script: Path) -> bytes:
        fpm = self.fpm
        assert fpm is not None
        if fpm.port is None:  # a Unix socket: no fastcgi_host/port, the worker's --fpm applies
            return bundle_message(data, str(script), host="", port="")
        return bundle_message(data, str(script), host="127.0.0.1", port=fpm.port)

    def run_drain(
        self,
        concurrency: int,
        prefetch: int,
        jobs: int,
        latency_jobs: int,
        profile: bool,
        src: Path = ROOT / "src",
        metrics: bool = False,
        web: bool | None = None,
        rate: float = 0.0,
    ) -> dict[str, Any]:
        """Queue ``jobs`` messages, start the worker, time the drain; then the latency phase
        (``latency_jobs``), or with ``rate`` the steady-rate run (--rate for --seconds).

        ``src`` is the source tree the worker runs from (its compiled codecs built in place):
        another checkout's, to compare two versions in one invocation. ``metrics``: the worker
        serves --metrics-port and a thread scrapes /metrics every second, until the worker is
        stopped. ``web`` (--compare-web): the worker serves --metrics-port, and with True
        `fastworker web` reads it (every 2 s) while a reader loads the dashboard's overview
        every 2 s, as its open page does.
        """
        fpm = self.fpm
        assert fpm is not None
        label = f"worker c={concurrency} p={prefetch}"
        if src != ROOT / "src":
            label += f" ({src.parent.name})"
        queue = self.new_queue()
        amqp_declare(self.url, queue)  # as the bundle declares it: not durable, not exclusive
        bodies = [
            self.body(event_data(i, payload_len=self.payload_len), self.script) for i in range(jobs)
        ]
        body_bytes = round(sum(map(len, bodies)) / max(len(bodies), 1))
        note(f"{label}: publishing {jobs} messages to {queue} ...")
        t = time.monotonic()
        asyncio.run(_publish_all(self.url, queue, bodies))
        note(f"{label}: published in {time.monotonic() - t:.1f}s")
        del bodies
        queued = amqp_queue_count(self.url, queue)
        if queued != jobs:
            raise BenchError(f"{queue} holds {queued} messages, expected {jobs}")

        idle_before = self._broker_idle_rate()
        self.done.reset()
        self.latency_log.write_bytes(b"")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
        log = self.tmp / f"worker-{queue}.log"
        extra: list[str] = []
        if metrics or web is not None:
            port = free_loopback_port()
            extra = ["--metrics-port", str(port)]
        dashboard = self._start_web(queue, port, env) if web else None  # polling before the drain
        worker = self.spawn(self.worker_cmd(queue, concurrency, prefetch, extra), log, env)
        t0, started_by = self._wait_consuming(worker, log)
        scraper = _Scraper(port) if metrics else None
        reader = _Scraper(dashboard[1], "/", 2.0) if dashboard else None
        d0 = cpu_seconds(dashboard[0].pid) if dashboard else 0.0
        w0, b0, f0 = cpu_seconds(worker.pid), self._broker_cpu(), fpm_cpu(fpm)
        io0, us0 = io_counts(worker.pid), user_system_seconds(worker.pid)
        m0, steal0 = machine_busy_seconds()
        me0 = time.process_time()
        spy = self._start_pyspy(worker.pid) if profile else None
        note(f"{label}: consuming (from {started_by}); draining {jobs} ...")
        done = self._wait_done(worker, log, jobs, label, t0)
        t1 = time.monotonic()
        w1, b1, f1 = cpu_seconds(worker.pid), self._broker_cpu(), fpm_cpu(fpm)
        acks: tuple[int, int] | None = None
        if scraper is not None:  # it goes on scraping through the latency phase or rate run
            scrapes = scraper.ok
            note(f"{label}: /metrics scraped {scrapes} times during the drain")
            acks = ack_frames(port)
        web_result: dict[str, Any] = {}
        if dashboard is not None and reader is not None:
            d1 = cpu_seconds(dashboard[0].pid)
            pages = reader.stop()
            if not pages:
                raise BenchError(f"{label}: the dashboard never answered on port {dashboard[1]}")
            web_result = {"web_cpu_us": round((d1 - d0) / jobs * 1e6, 1), "web_pages": pages}
            note(f"{label}: fastworker web read the worker, overview loaded {pages} times")
            self.stop(dashboard[0])
        io1, us1 = io_counts(worker.pid), user_system_seconds(worker.pid)
        m1, steal1 = machine_busy_seconds()
        me1 = time.process_time()
        profile_result = self._stop_pyspy(spy) if spy else None
        # The broker's background CPU, to subtract: other users of the shared broker add to it,
        # so the lower of the samples taken before and after the drain is used.
        broker_idle = min(idle_before, self._broker_idle_rate())
        seconds = t1 - t0
        ours = (w1 - w0) + (b1 - b0) + (f1 - f0) + (me1 - me0)
        most = theoretical_max(self.args)
        result: dict[str, Any] = {
            "concurrency": concurrency,
            "prefetch": prefetch,
            "jobs": jobs,
            "body_bytes": body_bytes,
            "seconds": round(seconds, 3),
            "jobs_s": round(jobs / seconds, 1),
            **(
                {"max_jobs_s": round(most, 1), "of_max": round(jobs / seconds / most, 3)}
                if most
                else {}
            ),
            "measured_from": started_by,
            "metrics": scraper is not None,
            "worker_cpu_us": round((w1 - w0) / jobs * 1e6, 1),
            "worker_user_cpu_us": round((us1[0] - us0[0]) / jobs * 1e6, 1),
            "worker_system_cpu_us": round((us1[1] - us0[1]) / jobs * 1e6, 1),
            "worker_reads_per_job": round((io1[0] - io0[0]) / jobs, 2),
            "worker_writes_per_job": round((io1[1] - io0[1]) / jobs, 2),
            "worker_sleeps_per_job": round((io1[2] - io0[2]) / jobs, 2),
            "broker_cpu_us": round(max(0.0, (b1 - b0) - broker_idle * seconds) / jobs * 1e6, 1),
            # Other clients of the shared broker make the subtraction a guess.
            "broker_cpu_reliable": broker_idle * seconds <= 0.25 * (b1 - b0),
            "broker_cpu_us_raw": round((b1 - b0) / jobs * 1e6, 1),
            "broker_idle_cpu_ms_s": round(broker_idle * 1e3, 1),
            "fpm_cpu_us": round((f1 - f0) / jobs * 1e6, 1),
            # worker CPU per job / FPM CPU per job: the worker's cost next to PHP's own.
            "worker_fpm_cpu_ratio": round((w1 - w0) / (f1 - f0), 3) if f1 > f0 else None,
            "machine_busy_cores": round((m1 - m0) / seconds, 2),
            "bench_busy_cores": round((me1 - me0) / seconds, 2),
            "others_busy_cores": round(max(0.0, (m1 - m0) - ours) / seconds, 2),
            # The hypervisor's share of "others": our vCPUs given to other guests.
            "steal_cores": round((steal1 - steal0) / seconds, 2),
            "overshoot_runs": done - jobs,
            **web_result,
        }
        if acks is not None:  # fastworker_broker_acks_total at the end of the drain
            result["ack_frames_per_job"] = round(sum(acks) / jobs, 3)
            result["single_ack_frames_per_job"] = round(acks[1] / jobs, 3)
        note(
            f"{label}: {result['jobs_s']:,.0f} jobs/s, worker {result['worker_cpu_us']} us/job,"
            f" RabbitMQ {result['broker_cpu_us']} us/job, FPM {result['fpm_cpu_us']} us/job"
            f" (worker/FPM {_ratio(result['worker_fpm_cpu_ratio'])})"
        )
        if profile_result is not None:
            result["profile"] = profile_result
        rate_jobs = 0
        if rate:
            result["rate_run"] = self._rate_run(queue, rate, self.args.seconds, prefetch, label)
            rate_jobs, latency_jobs = result["rate_run"]["jobs"], 0  # it replaces the phase
        elif latency_jobs:
            result["latency"] = self._latency_phase(queue, latency_jobs, result["jobs_s"], label)
        if scraper is not None:
            result["metrics_scrapes"] = scrapes
            result["metrics_scrapes_total"] = scraper.stop()
            if not result["metrics_scrapes_total"]:
                raise BenchError(f"{label}: /metrics never answered on port {port}")
        result["peak_rss_mib"] = round(vm_hwm_mib(worker.pid), 1)
        code = self.stop(worker, wait=60)
        result["worker_exit"] = code
        left = amqp_queue_count(self.url, queue)
        runs = self.done.count()
        expected = jobs + latency_jobs + rate_jobs
        result["runs"], result["published"] = runs, expected
        result["exactly_once"] = left == 0 and runs == expected
        if rate_jobs:  # and each rate-run message's probe ran once
            probes = LineCounter(self.latency_log).count()
            result["rate_run"]["probe_lines"] = probes
            result["exactly_once"] = result["exactly_once"] and probes == rate_jobs
        problems = _problems(log, r" (?:WARNING|ERROR|CRITICAL) ")
        result["worker_log_problems"] = len(problems)
        if code != 0 or left or runs != expected or problems:
            kept = Path(self.args.keep_logs) / f"worker-{queue}.log"
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, kept)
            result["worker_log"] = str(kept)
            first = "\n".join(problems[:8])
            note(
                f"{label}: WARNING worker exit {code}, {left} messages left in the queue, "
                f"{runs} runs for {expected} jobs, {len(problems)} warnings/errors logged; "
                f"whole log in {kept}; the first:\n{first}"
            )
        return result

    def _start_web(
        self, queue: str, worker_port: int, env: dict[str, str]
    ) -> tuple[subprocess.Popen[bytes], int]:
        """`fastworker web` on a free port, reading the worker's metrics every 2 s; returns
        it and its port once it serves."""
        port = free_loopback_port()
        log = self.tmp / f"web-{queue}.log"
        cmd = [
            sys.executable, "-m", "fastworker", "web", "--amqp-url", self.url, "--queue", queue,
            "--workers", f"http://127.0.0.1:{worker_port}", "--listen", f"127.0.0.1:{port}",
        ]  # fmt: skip
        proc = self.spawn(cmd, log, env)
        deadline = time.monotonic() + 30
        while b"fastworker web on" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"fastworker web did not start:\n{_tail(log)}")
            time.sleep(0.05)
        return proc, port

    def _broker_cpu(self) -> float:
        return cpu_seconds(self.broker) if self.broker else 0.0

    def _broker_idle_rate(self) -> float:
        """RabbitMQ's CPU seconds per second while none of our queues is busy."""
        b0, t0 = self._broker_cpu(), time.monotonic()
        time.sleep(self.args.baseline_seconds)
        return (self._broker_cpu() - b0) / (time.monotonic() - t0)

    def _wait_consuming(self, worker: subprocess.Popen[bytes], log: Path) -> tuple[float, str]:
        """When the worker logged that it consumes (or, failing that, ran its first job)."""
        deadline = time.monotonic() + 60
        pattern = re.compile(self.args.consuming_pattern.encode())
        while True:
            now = time.monotonic()
            if pattern.search(log.read_bytes()):
                return now, "the worker's 'consuming' log line"
            if self.done.count():
                return now, "the first finished job"
            if worker.poll() is not None:
                raise BenchError(f"the worker exited with {worker.returncode}:\n{_tail(log)}")
            if now > deadline:
                raise BenchError(f"the worker did not start consuming within 60 s:\n{_tail(log)}")
            time.sleep(0.002)

    def _wait_done(
        self, worker: subprocess.Popen[bytes], log: Path, jobs: int, label: str, t0: float
    ) -> int:
        """Poll the finished-jobs file until ``jobs`` runs are recorded; progress every 2 s."""
        last_count, last_change, last_note = 0, time.monotonic(), time.monotonic()
        while True:
            count = self.done.count()
            now = time.monotonic()
            if count >= jobs:
                return count
            if worker.poll() is not None:
                raise BenchError(f"the worker exited with {worker.returncode}:\n{_tail(log)}")
            if count != last_count:
                last_count, last_change = count, now
            elif now - last_change > STALL_SECONDS:
                raise BenchError(f"no job finished for {STALL_SECONDS:.0f} s:\n{_tail(log)}")
            if now - last_note >= 2:
                last_note = now
                note(f"  {label}: {count}/{jobs} done, {count / (now - t0):,.0f} jobs/s")
            time.sleep(0.005)

    def _publish_paced(
        self, queue: str, make: Callable[[int, float], bytes], count: int, rate: float
    ) -> float:
        """--publisher: blocking (each message written the moment it is stamped, as PHP
        publishes) or aiormq (the asyncio client, whose writer task and millisecond sleeps
        add their own delay to every figure)."""
        if self.args.publisher == "aiormq":
            return asyncio.run(_publish_paced_aiormq(self.url, queue, make, count, rate))
        return publish_paced_blocking(self.url, queue, make, count, rate)

    def _latency_phase(
        self, queue: str, count: int, drain_rate: float, label: str
    ) -> dict[str, Any]:
        """Publish at a moderate pace while the worker idles; publish -> end of PHP request."""
        rate = self.args.latency_rate or max(50.0, round(drain_rate * 0.5, -2))
        note(f"{label}: latency phase, {count} jobs at {rate:,.0f}/s ...")
        before = self.done.count()

        def make(i: int, now: float) -> bytes:
            return self.body(event_data(1_000_000 + i, f"published={now:.6f}"), TIMED_SCRIPT)

        self._publish_paced(queue, make, count, rate)
        latency = LineCounter(self.latency_log)
        deadline = time.monotonic() + 60
        while latency.count() < count or self.done.count() < before + count:
            if time.monotonic() > deadline:
                raise BenchError(f"latency phase: only {latency.lines}/{count} jobs recorded")
            time.sleep(0.01)
        values = sorted((end - published) * 1e3 for published, _, end in self._latency_rows())
        result = {
            "jobs": count,
            "rate_s": rate,
            **_pcts(values),
            "publisher": self.args.publisher,
            "how": "publish (time.time() embedded in the event just before basic_publish) -> "
            "end of the PHP request (microtime(true) in a shutdown function of "
            "bench/php/timed.php, which runs the same dispatch script); paced publishing "
            "while the worker had nothing else queued",
        }
        note(f"{label}: latency p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
        return result

    def _latency_rows(self) -> list[list[float]]:
        """The probe's lines: [published, PHP start, PHP end] as Unix times."""
        return [
            [float(x) for x in line.split()]
            for line in self.latency_log.read_text().splitlines()
            if line
        ]

    def _rate_run(
        self, queue: str, rate: float, seconds: float, prefetch: int, label: str
    ) -> dict[str, Any]:
        """--rate: publish ``rate`` jobs/s for ``seconds`` onto the idle worker; publish -> the
        first statement of the PHP script (and -> the end of the request). RabbitMQ's own floor
        (the same rate and prefetch to a blocking consumer, no worker, no PHP) is measured just
        before and just after, as the ceiling is around a drain: the reference that says what
        of the tail is the broker and the machine's scheduling on that day."""
        floor_before = self._broker_floor(rate, seconds, prefetch, "before")
        count = max(1, round(rate * seconds))
        note(f"{label}: rate run, {count} jobs at {rate:,.0f}/s for {seconds:g} s ...")
        before = self.done.count()
        self.latency_log.write_bytes(b"")

        def make(i: int, now: float) -> bytes:
            data = event_data(2_000_000 + i, f"published={now:.6f}")
            return self.body(data, TIMED_SCRIPT)

        (_, steal0), t0 = machine_busy_seconds(), time.monotonic()
        took = self._publish_paced(queue, make, count, rate)
        published_rate = count / took
        if published_rate < 0.95 * rate:
            note(f"{label}: WARNING the publisher kept up only {published_rate:,.0f}/s")
        latency = LineCounter(self.latency_log)
        last, last_change = -1, time.monotonic()
        while latency.count() < count or self.done.count() < before + count:
            if latency.lines != last:
                last, last_change = latency.lines, time.monotonic()
            elif time.monotonic() - last_change > STALL_SECONDS:
                raise BenchError(f"rate run: only {latency.lines}/{count} jobs recorded")
            time.sleep(0.01)
        steal = (machine_busy_seconds()[1] - steal0) / (time.monotonic() - t0)
        floor_after = self._broker_floor(rate, seconds, prefetch, "after")
        rows = self._latency_rows()
        to_start = sorted((start - published) * 1e3 for published, start, _ in rows)
        to_end = sorted((end - published) * 1e3 for published, _, end in rows)
        result = {
            "jobs": count,
            "rate_s": rate,
            "seconds": seconds,
            "published_rate_s": round(published_rate, 1),
            "publish_seconds": round(took, 3),
            "publisher": self.args.publisher,
            "start": _pcts(to_start),
            "end": _pcts(to_end),
            "broker_floor": {"before": floor_before, "after": floor_after},
            "steal_cores": round(steal, 3),
            "how": "publish (time.time() embedded in the event just before basic_publish, "
            "paced evenly, no publisher confirms) -> start: microtime(true) as the first "
            "statement of bench/php/timed.php; end: microtime(true) in its shutdown "
            "function, after the same dispatch script ran; onto the idle worker",
        }
        start, end = result["start"], result["end"]
        note(
            f"{label}: publish -> PHP start p50 {start['p50_ms']} ms, p99 {start['p99_ms']} ms;"
            f" -> end p50 {end['p50_ms']} ms, p99 {end['p99_ms']} ms"
        )
        return result

    def _broker_floor(self, rate: float, seconds: float, prefetch: int, when: str) -> dict:
        """RabbitMQ alone at the rate run's rate and prefetch (`blocking_amqp.broker_floor`)."""
        delays, took = broker_floor(self.url, rate, seconds, prefetch)
        floor = {**_pcts(delays), "published_rate_s": round(len(delays) / took, 1)}
        note(
            f"RabbitMQ alone ({when}): publish -> consumer read p50 {floor['p50_ms']} ms,"
            f" p99 {floor['p99_ms']} ms"
        )
        return floor

    # ---- py-spy

    def _start_pyspy(self, pid: int) -> tuple[subprocess.Popen[bytes], Path]:
        pyspy = which("py-spy")
        if pyspy is None:
            raise BenchError("--profile needs py-spy (pip install py-spy)")
        raw = self.tmp / f"pyspy-{pid}.txt"
        cmd = [
            pyspy,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--output",
            str(raw),
            "--rate",
            str(self.args.profile_rate),
        ]
        # --native must pause the worker to unwind C stacks; otherwise sample without pausing.
        cmd.append("--native" if self.args.profile_native else "--nonblocking")
        proc = self.spawn(cmd, self.tmp / "pyspy.log")
        return proc, raw

    def _stop_pyspy(self, spy: tuple[subprocess.Popen[bytes], Path]) -> dict[str, Any]:
        proc, raw = spy
        self.stop(proc, signal.SIGINT, wait=30)
        if not raw.exists():
            raise BenchError(f"py-spy wrote no profile:\n{_tail(self.tmp / 'pyspy.log')}")
        out = Path(self.args.profile_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(raw, out)
        summary = summarize_pyspy(raw)
        summary["raw"] = str(out)
        note(f"py-spy: {summary['samples']} samples, collapsed stacks in {out}")
        return summary


def _problems(path: Path, pattern: str) -> list[str]:
    """Lines of a log that match ``pattern`` (warnings, errors)."""
    with contextlib.suppress(OSError):
        regex = re.compile(pattern)
        return [
            line for line in path.read_text(errors="replace").splitlines() if regex.search(line)
        ]
    return []


def _tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return f"({path} unreadable)"


# --------------------------------------------------------------------------- reports


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from fastworker.codec import AMQP_COMPILED, FCGI_COMPILED, amqp, fcgi

    return {
        "host": socket.gethostname(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "codec": (
            f"FastCGI {'compiled' if FCGI_COMPILED else 'pure-python'} ({fcgi.__name__}), "
            f"AMQP {'compiled' if AMQP_COMPILED else 'pure-python'} ({amqp.__name__})"
        ),
    }


def combine_ceilings(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean rates and CPU figures, summed error counts, each run's req/s, and the runs."""
    out: dict[str, Any] = {k: runs[0][k] for k in ("connections", "nginx_keepalive")}
    for key in ("req_s", "nginx_cpu_us", "wrk_cpu_us", "nginx_wrk_cpu_us", "fpm_cpu_us"):
        out[key] = round(sum(r[key] for r in runs) / len(runs), 1)
    for key in ("requests", "jobs_run", "non_2xx", "socket_errors", "nginx_error_lines"):
        out[key] = sum(r[key] for r in runs)
    out["req_s_runs"] = [r["req_s"] for r in runs]
    out["runs"] = runs
    return out


def _ms5(p: dict[str, Any]) -> str:
    return f"{p['p50_ms']} / {p['p90_ms']} / {p['p99_ms']} / {p['p999_ms']} / {p['max_ms']} ms"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_report(results: dict[str, Any]) -> None:
    ceiling, drain, args = results["ceiling"], results["drain"], results["args"]
    latency = drain.get("latency")
    ratio = drain["jobs_s"] / ceiling["req_s"]
    rows = [
        (
            "ceiling: nginx -> FPM req/s",
            f"{ceiling['req_s']:,.0f}",
            "mean of "
            + " / ".join(f"{r:,.0f}" for r in ceiling["req_s_runs"])
            + f" (before / after), wrk -t1 -c{ceiling['connections']}",
        ),
        (
            "fastworker jobs/s",
            f"{drain['jobs_s']:,.0f}",
            f"{drain['jobs']} jobs queued beforehand ({drain['body_bytes']:,} B each),"
            f" {drain['seconds']} s",
        ),
        ("ratio to ceiling", f"{ratio:.2f}x", "goal >= 1.2x (Performance II)"),
    ]
    if "of_max" in drain:
        rows += [
            (
                "theoretical max jobs/s",
                f"{drain['max_jobs_s']:,.0f}",
                f"{args['children']} children / {args['job_ms']:g} ms per job",
            ),
            (
                "fastworker of max",
                f"{drain['of_max']:.2f}x",
                f"jobs/s / max (concurrency {drain['concurrency']})",
            ),
            ("ceiling of max", f"{ceiling['of_max']:.2f}x", "nginx -> FPM req/s / max"),
        ]
    rows += [
        (
            "worker CPU / job",
            f"{drain['worker_cpu_us']:.1f} us",
            f"user {drain['worker_user_cpu_us']:.1f},"
            f" system {drain['worker_system_cpu_us']:.1f} (clock ticks)",
        ),
        (
            "worker syscalls / job",
            f"{drain['worker_reads_per_job']:.2f} r {drain['worker_writes_per_job']:.2f} w",
            f"and {drain['worker_sleeps_per_job']:.2f} sleeps (voluntary context switches)",
        ),
        *(
            [
                (
                    "ack frames / job",
                    f"{drain['ack_frames_per_job']:.3f}",
                    f"single (a job acked alone) {drain['single_ack_frames_per_job']:.3f}; "
                    "fastworker_broker_acks_total at the end of the drain",
                )
            ]
            if "ack_frames_per_job" in drain
            else []
        ),
        (
            "RabbitMQ CPU / job",
            f"{drain['broker_cpu_us']:.1f} us",
            ("" if drain["broker_cpu_reliable"] else "UNRELIABLE, broker busy with others: ")
            + f"raw {drain['broker_cpu_us_raw']}, "
            f"idle {drain['broker_idle_cpu_ms_s']} ms/s x drain time subtracted",
        ),
        (
            "FPM CPU / job",
            f"{drain['fpm_cpu_us']:.1f} us",
            f"master + children; ceiling run: {ceiling['fpm_cpu_us']} us/req",
        ),
        (
            "worker CPU / FPM CPU",
            _ratio(drain["worker_fpm_cpu_ratio"]),
            "(worker CPU / job) / (FPM CPU / job), over the drain; goal <= 0.2",
        ),
        (
            "nginx + wrk CPU / request",
            f"{ceiling['nginx_wrk_cpu_us']:.1f} us",
            f"nginx {ceiling['nginx_cpu_us']}, wrk {ceiling['wrk_cpu_us']}",
        ),
    ]
    if latency:
        rows.append(
            (
                "latency p50 / p99",
                f"{latency['p50_ms']} / {latency['p99_ms']} ms",
                f"publish -> end of PHP request, "
                f"{latency['jobs']} jobs at {latency['rate_s']:,.0f}/s",
            )
        )
    rate_run = drain.get("rate_run")
    if rate_run:
        rows += [
            (
                "rate run",
                f"{rate_run['published_rate_s']:,.0f} jobs/s",
                f"{rate_run['jobs']} jobs published in {rate_run['publish_seconds']} s"
                f" (--rate {rate_run['rate_s']:,.0f} x --seconds {rate_run['seconds']:g},"
                f" --publisher {rate_run['publisher']}) onto the idle worker",
            ),
            (
                "-> PHP start p50/90/99/99.9/max",
                _ms5(rate_run["start"]),
                "publish -> first statement of the PHP script",
            ),
            (
                "-> PHP end p50/90/99/99.9/max",
                _ms5(rate_run["end"]),
                "publish -> end of the PHP request",
            ),
        ]
        floor = rate_run["broker_floor"]
        rows += [
            (
                f"RabbitMQ alone ({when})",
                _ms5(floor[when]),
                "publish -> read by a blocking consumer, no worker or PHP, same rate and prefetch",
            )
            for when in ("before", "after")
        ]
        rows.append(
            (
                "host steal during rate run",
                f"{rate_run['steal_cores']:.3f} cores",
                "CPU time the hypervisor gave to other guests (/proc/stat)",
            )
        )
    if drain.get("metrics"):
        rows.append(
            (
                "metrics",
                f"{drain['metrics_scrapes']} scrapes",
                "worker with --metrics-port, /metrics scraped every second during the drain"
                f" ({drain['metrics_scrapes_total']} until it stopped)",
            )
        )
    rows += [
        (
            "worker peak RSS",
            f"{drain['peak_rss_mib']} MiB",
            f"VmHWM at the end; prefetch {drain['prefetch']},"
            f" {drain['body_bytes']:,} B queued messages",
        ),
        (
            "machine busy during drain",
            f"{drain['machine_busy_cores']} cores",
            f"bench's polling {drain['bench_busy_cores']}, "
            f"other users {drain['others_busy_cores']} (host steal {drain['steal_cores']})",
        ),
        (
            "exactly once",
            "yes" if drain["exactly_once"] else "NO",
            f"runs {drain['runs']} == jobs published {drain['published']}, queue empty",
        ),
    ]
    extras = "".join(
        [
            f", {args['job_ms']:g} ms jobs" if args["job_ms"] else "",
            f", ~{args['body_kb']:g} KB queued data" if args["body_kb"] else "",
            ", with --metrics-port" if drain.get("metrics") else "",
        ]
    )
    print(
        f"\nfastworker e2e: {args['children']} static FPM children"
        f" ({'Unix socket' if args['unix_socket'] else 'TCP loopback'}),"
        f" {Path(args['script']).name}{extras},"
        f" concurrency {drain['concurrency']}, pipeline {args['pipeline']},"
        f" prefetch {drain['prefetch']}, codec {results['machine']['codec']}"
    )
    _print_table(("metric", "value", "note"), rows)
    if "profile" in drain:
        _print_profile(drain["profile"])


def compare(bench: Bench, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Drains with a reference source tree and with this one, alternating, ``--rounds`` each:
    before/after figures from one invocation, on the same pool and broker."""
    if args.compare_metrics or args.compare_web:  # this tree both times, read or not
        reference = ROOT / "src"
    else:
        reference = Path(args.reference_src).resolve() / "src"
    if not (reference / "fastworker").is_dir():
        raise BenchError(f"--reference-src {args.reference_src}: no src/fastworker there")
    out: dict[str, list[dict[str, Any]]] = {"reference": [], "current": []}
    for _ in range(args.rounds):
        for name, src in (("reference", reference), ("current", ROOT / "src")):
            out[name].append(
                bench.run_drain(
                    args.concurrency,
                    args.prefetch,
                    args.jobs,
                    args.latency_jobs,
                    False,
                    src,
                    metrics=args.metrics_port or (args.compare_metrics and name == "current"),
                    web=(name == "current") if args.compare_web else None,
                    rate=args.rate,
                )
            )
    return out


def print_compare(results: dict[str, Any]) -> None:
    """Reference against current, each as a ratio to the same ceiling, and current/reference."""
    ceiling = results["ceiling"]["req_s"]
    compare = results["compare"]

    def value(drain: dict[str, Any], key: str) -> float | None:
        """A drain's figure; "rate_run.start.p99_ms" reaches into the rate run's."""
        out: Any = drain
        for part in key.split("."):
            out = out.get(part) if isinstance(out, dict) else None
        return out

    def mean(name: str, key: str) -> float | None:
        values = [v for v in (value(drain, key) for drain in compare[name]) if v is not None]
        return sum(values) / len(values) if values else None

    specs: list[tuple[str, str, Callable[[float], str]]] = [
        ("jobs_s", "ratio to ceiling", lambda v: f"{v / ceiling:.2f}x"),
    ]
    if results["args"].get("job_ms"):
        specs.append(("of_max", "jobs/s of the max", lambda v: f"{v:.2f}x"))
    specs += [
        ("worker_cpu_us", "worker CPU / job", lambda v: f"{v:.1f} us"),
        ("fpm_cpu_us", "FPM CPU / job", lambda v: f"{v:.1f} us"),
        ("worker_fpm_cpu_ratio", "worker CPU / FPM CPU", lambda v: f"{v:.2f}"),
        ("broker_cpu_us", "RabbitMQ CPU / job", lambda v: f"{v:.1f} us"),
        ("ack_frames_per_job", "ack frames / job", lambda v: f"{v:.3f}"),
        ("single_ack_frames_per_job", "single acks / job", lambda v: f"{v:.3f}"),
        ("peak_rss_mib", "worker peak RSS", lambda v: f"{v:.1f} MiB"),
    ]
    if results["args"].get("rate"):
        shown = {"start": ("p50", "p90", "p99", "p999", "max"), "end": ("p50", "p99")}
        specs += [
            (f"rate_run.{end}.{p}_ms", f"-> PHP {end} {p}", lambda v: f"{v:.2f} ms")
            for end, ps in shown.items()
            for p in ps
        ]

    def show(fmt: Callable[[float], str], v: float | None) -> str:
        return "-" if v is None else fmt(v)

    rows = []
    for key, label, fmt in specs:
        before, after = mean("reference", key), mean("current", key)
        runs = " / ".join(
            f"{show(fmt, value(r, key))} -> {show(fmt, value(c, key))}"
            for r, c in zip(compare["reference"], compare["current"], strict=True)
        )
        ratio = f"{after / before:.2f}" if before and after is not None else "-"
        rows.append((label, show(fmt, before), show(fmt, after), ratio, runs))
    once = all(d["exactly_once"] for name in compare for d in compare[name])
    on = " with --metrics-port" if results["args"].get("metrics_port") else ""
    before = (
        "this tree without --metrics-port"
        if results["args"].get("compare_metrics")
        else "--metrics-port, " + ("/metrics scraped every second" if on else "nothing reading it")
        if results["args"].get("compare_web")
        else f"--reference-src {results['args']['reference_src']}{on}"
    )
    after = (
        "with --metrics-port, /metrics scraped every second"
        if results["args"].get("compare_metrics")
        else "fastworker web reading it every 2 s, its overview loaded every 2 s"
        + (", /metrics scraped every second" if on else "")
        if results["args"].get("compare_web")
        else f"this tree{on}"
    )
    print(
        f"\nbefore ({before}) and after ({after}), "
        f"{len(compare['current'])} alternating rounds, means; exactly once: "
        f"{'yes' if once else 'NO'}"
    )
    _print_table(("metric", "before", "after", "after/before", "each round"), rows)
    if results["args"].get("compare_web"):
        web = " / ".join(f"{d['web_cpu_us']:.1f} us" for d in compare["current"])
        print(f"fastworker web's own CPU per job drained: {web}")


def _print_profile(profile: dict[str, Any]) -> None:
    print(f"\npy-spy, worker during the drain: {profile['samples']} samples; top self time")
    _print_table(
        ("self %", "function"), [(f"{r['pct']:.1f}", r["function"]) for r in profile["self"]]
    )
    print("\ntop inclusive time")
    _print_table(
        ("incl %", "function"),
        [(f"{r['pct']:.1f}", r["function"]) for r in profile["inclusive"]],
    )


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print(line)
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def print_sweep(results: dict[str, Any]) -> None:
    ceiling = results["ceiling"]["req_s"]
    runs = " / ".join(f"{r:,.0f}" for r in results["ceiling"]["req_s_runs"])
    most = results["ceiling"].get("max_req_s")
    of_max = f", {results['ceiling']['of_max']:.2f}x of the max {most:,.0f}" if most else ""
    print(f"\nsweep: ceiling {ceiling:,.0f} req/s (mean of {runs}, before / after){of_max}")
    rows = [
        (
            str(r["concurrency"]),
            str(r["prefetch"]),
            f"{r['jobs_s']:,.0f}",
            f"{r['jobs_s'] / ceiling:.2f}x",
            *([f"{r['of_max']:.2f}x"] if most else []),
            f"{r['worker_cpu_us']:.1f}",
            f"{r['broker_cpu_us']:.1f}" + ("" if r["broker_cpu_reliable"] else "?"),
            f"{r['fpm_cpu_us']:.1f}",
            _ratio(r["worker_fpm_cpu_ratio"]),
            f"{r['peak_rss_mib']}",
            "yes" if r["exactly_once"] else "NO",
            f"{r['others_busy_cores']:.2f}",
        )
        for r in results["sweep"]
    ]
    _print_table(
        (
            "conc",
            "prefetch",
            "jobs/s",
            "ratio",
            *(["of max"] if most else []),
            "worker us",
            "rabbit us",
            "fpm us",
            "worker/fpm",
            "RSS MiB",
            "once",
            "others' cores",
        ),
        rows,
    )


def plot_sweep(results: dict[str, Any], path: Path) -> None:
    """jobs/s (ratio on the right axis) and worker CPU per job, against prefetch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceiling = results["ceiling"]["req_s"]
    sweep = results["sweep"]
    fig, (ax, ax_cpu) = plt.subplots(1, 2, figsize=(11, 4.5))
    for conc in sorted({r["concurrency"] for r in sweep}):
        points = sorted((r["prefetch"], r) for r in sweep if r["concurrency"] == conc)
        xs = [p for p, _ in points]
        ax.plot(xs, [r["jobs_s"] for _, r in points], marker="o", label=f"concurrency {conc}")
        ax_cpu.plot(xs, [r["worker_cpu_us"] for _, r in points], marker="o", label=f"c={conc}")
    ax.axhline(ceiling, color="black", linestyle="--", label="nginx ceiling")
    ax.axhline(0.9 * ceiling, color="grey", linestyle=":", label="0.9x target")
    prefetches = sorted({r["prefetch"] for r in sweep})
    ax.set_xscale("log", base=2)
    ax.set_xticks(prefetches, [str(p) for p in prefetches])
    ax.set_xlabel("prefetch")
    ax.set_ylabel("jobs/s")
    ax.set_ylim(bottom=0)
    ax.secondary_yaxis("right", functions=(lambda y: y / ceiling, lambda r: r * ceiling))
    ax.set_title("throughput (right axis: ratio to ceiling)")
    ax.legend(fontsize="small", loc="lower right")
    ax_cpu.axhline(35, color="grey", linestyle=":", label="35 us target")
    ax_cpu.set_xscale("log", base=2)
    ax_cpu.set_xticks(prefetches, [str(p) for p in prefetches])
    ax_cpu.set_xlabel("prefetch")
    ax_cpu.set_ylabel("worker CPU us / job")
    ax_cpu.set_ylim(bottom=0)
    ax_cpu.set_title("worker CPU per job")
    ax_cpu.legend(fontsize="small")
    fig.suptitle(
        f"fastworker e2e sweep, {results['args']['children']} FPM children, "
        f"{results['args']['sweep_jobs']} jobs per point"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--amqp-url", default=os.environ.get("FASTWORKER_AMQP_URL", DEFAULT_URL))
    p.add_argument("--children", type=int, default=4, help="static FPM children (default: 4)")
    p.add_argument(
        "--script",
        default=None,
        help="dispatch script; it must append one line per job to $FASTWORKER_DEMO_LOG "
        "(default: examples/php/dispatch.php, with --job-ms bench/php/sleep.php; "
        "bench/php/trivial.php has no framework)",
    )
    p.add_argument(
        "--job-ms",
        type=float,
        default=0,
        metavar="N",
        help="slow jobs: every job (and every ceiling request) runs bench/php/sleep.php, which "
        "sleeps N ms and then records the job as trivial.php does; jobs/s are also shown as a "
        "ratio to the maximum, --children / N ms",
    )
    p.add_argument(
        "--body-kb",
        type=float,
        default=0,
        metavar="K",
        help="the drained messages' data is about K KB each (default: ~0.4), e.g. for the "
        "worker's peak RSS with a large --prefetch; the ceiling keeps ~0.4 KB",
    )
    p.add_argument(
        "--metrics-port",
        action="store_true",
        help="every drain's worker serves --metrics-port (a free loopback port) and /metrics "
        "is scraped every second while it runs",
    )
    p.add_argument(
        "--unix-socket",
        action="store_true",
        help="FPM listens on a Unix socket (nginx and the worker both use it), not TCP",
    )
    p.add_argument("--jobs", type=int, default=20000, help="jobs to drain (default: 20000)")
    p.add_argument(
        "--compare-metrics",
        action="store_true",
        help="drain with this tree without, then with --metrics-port (scraped every second), "
        "--rounds each: what metrics cost per job",
    )
    p.add_argument(
        "--compare-web",
        action="store_true",
        help="drain with --metrics-port, then with `fastworker web` reading it (every 2 s) and "
        "its overview loaded every 2 s, --rounds each: what the dashboard costs the worker",
    )
    p.add_argument(
        "--reference-src",
        metavar="DIR",
        help="also drain with the worker of another checkout (e.g. a `git worktree` of the "
        "previous commit, its codecs built in place) and print before/after",
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="with --reference-src: alternating drains each"
    )
    p.add_argument("--wrk-seconds", type=int, default=10, help="wrk duration (default: 10)")
    p.add_argument("--wrk-connections", type=int, default=0, help="default: 2 x --children")
    p.add_argument("--nginx-keepalive", type=int, default=8, help="upstream keepalive (8)")
    p.add_argument("--concurrency", type=int, default=0, help="default: --children")
    p.add_argument("--prefetch", type=int, default=64, help="default: 64")
    p.add_argument(
        "--pipeline",
        type=int,
        default=4,
        help="the worker's --pipeline: requests per FPM connection at once (default: 4)",
    )
    p.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra worker argument, repeatable; use the = form: --worker-arg=--amqp-client=fast",
    )
    p.add_argument("--latency-jobs", type=int, default=5000, help="0 skips the phase (5000)")
    p.add_argument("--latency-rate", type=float, default=0, help="jobs/s (default: drain/2)")
    p.add_argument(
        "--rate",
        type=float,
        default=0,
        metavar="R",
        help="after the drain, publish R jobs/s for --seconds onto the idle worker and measure "
        "publish -> start (and end) of the PHP script; replaces the latency phase",
    )
    p.add_argument(
        "--publisher",
        choices=["blocking", "aiormq"],
        default="blocking",
        help="how the latency phase and --rate run publish: blocking writes each message the "
        "moment it is stamped, as a PHP app publishes (default); aiormq is the asyncio client, "
        "whose own delay (a writer task, millisecond sleeps) is then part of every figure",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        metavar="S",
        help="the --rate run's duration (default: 10; wrk's is --wrk-seconds)",
    )
    p.add_argument(
        "--baseline-seconds", type=float, default=2.0, help="each broker idle sample (2)"
    )
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--sweep", action="store_true", help="drain over a concurrency x prefetch grid")
    p.add_argument(
        "--sweep-concurrency",
        type=_int_list,
        default=None,
        help="default: 1,2,3,4,6,8 up to --children (more connections than children hang)",
    )
    p.add_argument("--sweep-prefetch", type=_int_list, default=[16, 64, 256])
    p.add_argument("--sweep-jobs", type=int, default=0, help="jobs per point (default: --jobs)")
    p.add_argument("--plot", metavar="PNG", default=str(BENCH_DIR / "out" / "e2e-sweep.png"))
    p.add_argument("--profile", action="store_true", help="py-spy the worker during the drain")
    p.add_argument("--profile-rate", type=int, default=200, help="samples/s (default: 200)")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames)")
    p.add_argument(
        "--profile-out", metavar="PATH", default=str(BENCH_DIR / "out" / "pyspy-drain.txt")
    )
    p.add_argument("--quick", action="store_true", help="small numbers for a smoke run")
    p.add_argument("--keep-tmp", action="store_true", help="keep logs and configs in /tmp")
    p.add_argument(
        "--keep-logs",
        metavar="DIR",
        default=str(BENCH_DIR / "out"),
        help="where a worker log with warnings or errors is copied (default: bench/out)",
    )
    p.add_argument(
        "--consuming-pattern",
        default=r"\bconsuming\b",
        help="regex of the worker log line that marks the start of consuming",
    )
    args = p.parse_args(argv)
    if args.seconds is not None and not args.rate:
        p.error("--seconds is the --rate run's duration; wrk's is --wrk-seconds")
    if args.rate < 0 or (args.seconds is not None and args.seconds <= 0):
        p.error("--rate and --seconds must be above 0")
    if args.rate and args.sweep:
        p.error("--sweep runs no latency phase: no --rate either")
    if args.jobs < 1 or args.job_ms < 0 or args.body_kb < 0:
        p.error("--jobs must be at least 1, --job-ms and --body-kb at least 0")
    if args.metrics_port and args.compare_metrics:
        p.error("--compare-metrics drains without, then with --metrics-port: not both")
    if args.job_ms and args.script is not None:
        p.error("--job-ms runs bench/php/sleep.php (trivial.php after the sleep): no --script")
    args.script = str(SLEEP_SCRIPT if args.job_ms else args.script or DEFAULT_SCRIPT)
    if args.rate:
        args.seconds = args.seconds or 10.0
        args.latency_jobs = 0  # the rate run replaces the latency phase
    if args.quick:
        args.jobs, args.wrk_seconds = min(args.jobs, 2000), min(args.wrk_seconds, 3)
        args.seconds = args.seconds and min(args.seconds, 3.0)
        args.latency_jobs = min(args.latency_jobs, 300)
        args.baseline_seconds = min(args.baseline_seconds, 0.5)
        args.sweep_prefetch = args.sweep_prefetch[:2]
    args.concurrency = args.concurrency or args.children
    args.sweep_jobs = args.sweep_jobs or args.jobs
    if args.sweep_concurrency is None:
        grid = [c for c in (1, 2, 3, 4, 6, 8) if c <= args.children]
        args.sweep_concurrency = grid[-2:] if args.quick else grid
    too_many = [c for c in args.sweep_concurrency if c > args.children]
    if too_many or args.concurrency > args.children:
        p.error(
            f"concurrency above --children {args.children} would pin more connections than FPM"
            " has children: the extra ones wait in the backlog forever"
        )
    return args


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def running(args: argparse.Namespace) -> Iterator[Bench]:
    bench = Bench(args)
    try:
        yield bench
    finally:
        note("stopping everything ...")
        bench.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args).copy()}
    note(f"machine: {results['machine']}")
    try:
        with running(args) as bench:
            if bench.broker is None:
                note("WARNING: RabbitMQ's process not found: its CPU will read as 0")
            bench.start_fpm()
            ceilings = [bench.run_ceiling()]
            if args.sweep:
                results["sweep"] = [
                    bench.run_drain(c, p, args.sweep_jobs, 0, False, metrics=args.metrics_port)
                    for c in args.sweep_concurrency
                    for p in args.sweep_prefetch
                ]
            elif args.reference_src or args.compare_metrics or args.compare_web:
                results["compare"] = compare(bench, args)
                results["drain"] = results["compare"]["current"][0]
            else:
                results["drain"] = bench.run_drain(
                    args.concurrency,
                    args.prefetch,
                    args.jobs,
                    args.latency_jobs,
                    args.profile,
                    metrics=args.metrics_port,
                    rate=args.rate,
                )
            # Again after the drain: other users' load comes and goes; the mean is the ceiling.
            ceilings.append(bench.run_ceiling())
            results["ceiling"] = combine_ceilings(ceilings)
            most = theoretical_max(args)
            if most:
                results["ceiling"]["max_req_s"] = round(most, 1)
                results["ceiling"]["of_max"] = round(results["ceiling"]["req_s"] / most, 3)
    except BenchError as exc:
        note(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        note("interrupted")
        return 130
    if args.sweep:
        print_sweep(results)
        plot = Path(args.plot)
        try:
            plot_sweep(results, plot)
            note(f"plot written to {plot}")
        except ImportError:
            note("no plot: matplotlib is not installed (pip install -e '.[bench]')")
        json_path = Path(args.json or plot.with_suffix(".json"))
    else:
        print_report(results)
        if "compare" in results:
            print_compare(results)
        json_path = Path(args.json) if args.json else None
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        note(f"results written to {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
