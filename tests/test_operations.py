"""Operating the worker: a TOML config with the URL from the environment, Prometheus metrics
and the health check on one port, JSON log lines."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from helpers import DASHBOARD_METRICS, bundle_message, order_placed_data, wait_for
from services import PHP_DIR
from services.fpm import FpmServer
from services.process import free_loopback_port
from services.rabbitmq import amqp_publish
from services.worker import Workers


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, parsed by prometheus-client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_a_config_file_metrics_health_and_json_logs(
    rabbitmq_url: str, queue_name: str, fpm: FpmServer, workers: Workers, tmp_path: Path
) -> None:
    """The issue's acceptance run: settings from a TOML file and FASTWORKER_AMQP_URL; 500 jobs;
    /healthz 200; /metrics parsed by prometheus-client; every log line a JSON object."""
    port = free_loopback_port()
    config = tmp_path / "fastworker.toml"
    config.write_text(
        f'queue = ["{queue_name}"]\n'
        f'fpm = ["{fpm.address}"]\n'
        f'allow_script = ["{PHP_DIR}/*.php"]\n'
        f'script = "{PHP_DIR}/record.php"\n'
        f"metrics_port = {port}\n"
        'log_format = "json"\n'
        "concurrency = 3\n"
    )
    fpm.clear_records()
    worker = workers.start(["--config", str(config)], env={"FASTWORKER_AMQP_URL": rabbitmq_url})
    base = f"http://127.0.0.1:{port}"
    assert get(f"{base}/healthz") == (200, "consuming\n")
    bodies = [
        bundle_message(order_placed_data(i, "ops"), str(PHP_DIR / "record.php"), host="", port="")
        for i in range(500)
    ]
    amqp_publish(rabbitmq_url, queue_name, bodies)
    wait_for(lambda: len(fpm.records()) >= 500, timeout=60, what="500 jobs")

    scraped: list[str] = []

    def jobs_done() -> dict | None:
        status, text = get(f"{base}/metrics")
        scraped[:] = [text]
        found = samples(text)
        key = (
            "fastworker_jobs_total",
            (("kind", "ok"), ("outcome", "success"), ("queue", queue_name)),
        )
        return found if status == 200 and found.get(key) == 500 else None

    found = wait_for(jobs_done, timeout=10, what="500 successes in /metrics")
    assert found[("fastworker_concurrency", ())] == 3
    assert ("fastworker_inflight_jobs", ()) in found
    count = ("fastworker_job_duration_seconds_count", (("queue", queue_name),))
    assert found[count] == 500
    inf = ("fastworker_job_duration_seconds_bucket", (("le", "+Inf"), ("queue", queue_name)))
    assert found[inf] == 500
    assert found[("fastworker_fpm_connections", (("endpoint", fpm.address),))] >= 1
    assert found[("fastworker_broker_reconnects_total", ())] == 0
    # Acks leave in batches: fewer frames than jobs, most of them multiple acks.
    multiple = found[("fastworker_broker_acks_total", (("multiple", "true"),))]
    single = found[("fastworker_broker_acks_total", (("multiple", "false"),))]
    assert 1 <= multiple and multiple + single < 500, (multiple, single)
    assert get(f"{base}/nothing")[0] == 404
    assert workers.close() == [0]
    lines = [line for line in worker.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = json.loads(line)  # every line is one JSON object
        assert {"time", "level", "logger", "message"} <= set(record)
    # What an operator sees, for the record (pytest -s): the samples and the last log line.
    shown = [line for line in scraped[0].splitlines() if line.startswith("fastworker_")]
    print("\n[metrics]\n" + "\n".join(shown) + "\n[log] " + lines[-1])


def test_failures_are_counted_by_queue_kind_and_endpoint(
    rabbitmq_url: str, queue_name: str, fpm: FpmServer, workers: Workers
) -> None:
    port = free_loopback_port()
    worker = workers.start(
        [
            "--amqp-url",
            rabbitmq_url,
            "--queue",
            queue_name,
            "--fpm",
            fpm.address,
            "--script",
            str(PHP_DIR / "fail_if.php"),
            "--max-attempts",
            "2",
            "--retry-delay",
            "0.1",
            "--metrics-port",
            str(port),
            "--log-format",
            "json",
        ]
    )
    bodies = [
        bundle_message(order_placed_data(i, "FAIL"), str(PHP_DIR / "fail_if.php"), host="", port="")
        for i in range(3)
    ]
    amqp_publish(rabbitmq_url, queue_name, bodies)
    key = ("fastworker_dead_letters_total", (("kind", "php_error"), ("queue", queue_name)))

    def dead() -> dict | None:
        found = samples(get(f"http://127.0.0.1:{port}/metrics")[1])
        return found if found.get(key) == 3 else None

    found = wait_for(dead, timeout=30, what="3 dead letters in /metrics")
    retry = (
        "fastworker_jobs_total",
        (("kind", "php_error"), ("outcome", "retry"), ("queue", queue_name)),
    )
    assert found[retry] == 3
    errors = ("fastworker_fpm_errors_total", (("endpoint", fpm.address), ("kind", "php_error")))
    assert found[errors] == 6
    # Every metric the example Grafana dashboard reads is there (test_config checks the list).
    names = {name for name, _ in found}
    for metric in DASHBOARD_METRICS:
        # A histogram is there as its _bucket, _count and _sum samples.
        sample = f"{metric}_bucket" if metric.endswith("_seconds") else metric
        assert sample in names, metric
    # One JSON line per failure, with the job's fields; none per successful job.
    records = [json.loads(line) for line in worker.log().splitlines() if line.strip()]
    dead_lines = [r for r in records if "dead-lettered" in r["message"]]
    assert len(dead_lines) == 3
    for record in dead_lines:
        assert record["level"] == "ERROR" and record["queue"] == queue_name
        assert record["kind"] == "php_error" and record["status"] == 500
        assert record["attempt"] == 2 and record["endpoint"] == fpm.address


def test_health_is_503_while_the_broker_or_every_fpm_endpoint_is_down(
    rabbitmq_url: str, queue_name: str, workers: Workers, tmp_path: Path
) -> None:
    port, dead_port = free_loopback_port(), free_loopback_port()
    no_broker = workers.start(
        [
            "--amqp-url",
            f"amqp://guest:guest@127.0.0.1:{dead_port}/",
            "--queue",
            queue_name,
            "--metrics-port",
            str(port),
            "--fpm",
            f"127.0.0.1:{dead_port}",
        ],
        wait=False,
    )
    wait_for(lambda: "metrics on http" in no_broker.log(), timeout=20, what="metrics up")
    status, why = get(f"http://127.0.0.1:{port}/healthz")
    assert status == 503 and "not consuming" in why
    assert no_broker.terminate() == 0

    port = free_loopback_port()
    workers.start(
        [
            "--amqp-url",
            rabbitmq_url,
            "--queue",
            queue_name,
            "--metrics-port",
            str(port),
            "--fpm",
            f"127.0.0.1:{dead_port}",
            "--script",
            str(PHP_DIR / "record.php"),
        ]
    )
    assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    amqp_publish(
        rabbitmq_url,
        queue_name,
        [bundle_message(order_placed_data(1, "x"), str(PHP_DIR / "record.php"), host="", port="")],
    )
    status, why = wait_for(
        lambda: (r := get(f"http://127.0.0.1:{port}/healthz"))[0] == 503 and r,
        timeout=20,
        what="503",
    )
    assert f"every FPM endpoint is down (127.0.0.1:{dead_port})" in why
