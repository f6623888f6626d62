"""The benchmarks still run and report what they claim to (figures are not asserted: see bench/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from services import ROOT


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_e2e_quick_run_reports_a_ratio_and_exactly_once(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    result = run_bench("bench/e2e.py", "--quick", "--latency-jobs", "0", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    drain, ceiling = report["drain"], report["ceiling"]
    assert drain["exactly_once"] is True and drain["worker_exit"] == 0
    assert drain["jobs_s"] > 0 and drain["worker_cpu_us"] > 0
    assert 0 <= drain["steal_cores"] and "host steal" in result.stdout
    # The nginx + wrk reference ran in the same invocation, and PHP answered it without errors.
    assert ceiling["req_s"] > 0 and ceiling["non_2xx"] == 0
    assert "ratio to ceiling" in result.stdout


def test_e2e_rate_run_publishes_blocking_and_every_job_runs_once(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    result = run_bench(
        "bench/e2e.py", "--quick", "--rate", "300", "--seconds", "1", "--json", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    drain = json.loads(out.read_text())["drain"]
    rate_run = drain["rate_run"]
    assert rate_run["publisher"] == "blocking" and rate_run["jobs"] == 300
    assert drain["exactly_once"] is True  # 300 timed.php lines, one run per published message
    start = rate_run["start"]
    assert 0 < start["p50_ms"] <= start["p99_ms"] <= start["p999_ms"] <= start["max_ms"]
    # RabbitMQ's own floor ran at the same rate just before and just after, in the same report.
    for when in ("before", "after"):
        floor = rate_run["broker_floor"][when]
        assert 0 < floor["p50_ms"] <= floor["p99_ms"] <= floor["max_ms"], floor
        assert floor["published_rate_s"] > 0
    assert rate_run["steal_cores"] >= 0
    assert "RabbitMQ alone (before)" in result.stdout


def test_broker_latency_bench_reads_every_message() -> None:
    result = run_bench("bench/broker_latency.py", "--rate", "500", "--seconds", "1", "--rounds=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "p99.9" in result.stdout and result.stdout.splitlines()[-1].startswith("1 ")


def test_amqp_consume_bench_runs_both_consumers() -> None:
    result = run_bench("bench/amqp_consume.py", "-n", "2000", "--rounds", "1", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {row.get("consumer") for row in rows} >= {"aiormq", "fast"}, result.stdout


def test_job_path_bench_runs() -> None:
    # (It also had a coroutine path, the aiormq consumer's; both consumers now start jobs
    # through JobHandler.start.)
    result = run_bench("bench/job_path.py", "-n", "500")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "jobs/s" in result.stdout and "FPM CPU/job" in result.stdout


HELPERS = {"blocking_amqp.py"}  # imported by the benches, not run
BENCHES = sorted(
    path.name
    for path in (ROOT / "bench").glob("*.py")
    if not path.name.startswith("fuzz_") and path.name not in HELPERS
)


def test_every_bench_loads_and_shows_its_options() -> None:
    """The benches borrow e2e.py's helpers: one renamed there must not break another's start
    (bench/sidekiq.py and bench/processes.py once imported a helper e2e.py no longer had)."""
    assert {"e2e.py", "sidekiq.py", "processes.py", "web_overhead.py"} <= set(BENCHES)
    for name in BENCHES:
        result = run_bench(f"bench/{name}", "--help")
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
        assert "usage:" in result.stdout, name
