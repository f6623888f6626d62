"""Settings from a TOML file, FASTWORKER_* variables and flags: precedence and errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fastworker.cli import settings_from, worker_parser
from fastworker.config import ConfigError, resolve
from helpers import DASHBOARD_METRICS
from services import SRC_DIR


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fastworker.toml"
    path.write_text(text)
    return path


def test_flags_beat_the_environment_which_beats_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'concurrency = 3\npipeline = 2\nscript = "/srv/file.php"\n')
    env = {"FASTWORKER_PIPELINE": "3", "FASTWORKER_SCRIPT": "/srv/env.php"}
    resolved = resolve(worker_parser(), ["--config", str(path), "--script", "/srv/flag.php"], env)
    settings = settings_from(resolved.args)
    assert (settings.concurrency, settings.pipeline, settings.script) == (3, 3, "/srv/flag.php")
    assert resolved.sources["concurrency"] == f"file {path}"
    assert resolved.sources["pipeline"] == "environment FASTWORKER_PIPELINE"
    assert resolved.sources["script"] == "flag --script"
    assert resolved.sources["job_timeout"] == "default"
    assert settings.job_timeout == 300.0


def test_lists_for_repeatable_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'queue = ["a", "b"]\nfpm = ["127.0.0.1:9000", "unix:/run/php.sock"]\n'
        'allow_script = "/srv/*.php"\n',
    )
    settings = settings_from(resolve(worker_parser(), ["--config", str(path)], {}).args)
    assert settings.queues == ["a", "b"]
    assert settings.fpm == ["127.0.0.1:9000", "unix:/run/php.sock"]
    assert settings.allow_script == ["/srv/*.php"]
    env = {"FASTWORKER_QUEUE": "x, y"}
    assert settings_from(resolve(worker_parser(), [], env).args).queues == ["x", "y"]
    # A flag replaces the list from below, it does not add to it.
    args = resolve(worker_parser(), ["--config", str(path), "--queue", "c"], env).args
    assert settings_from(args).queues == ["c"]


def test_the_config_file_may_come_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "max_attempts = 9\n")
    args = resolve(worker_parser(), [], {"FASTWORKER_CONFIG": str(path)}).args
    assert settings_from(args).max_attempts == 9


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("concurency = 3\n", "unknown key 'concurency'; did you mean 'concurrency'?"),
        ('concurrency = "many"\n', "key 'concurrency': invalid value 'many'"),
        ("concurrency = 0\n", "key 'concurrency': must be at least 1, got 0"),
        ("concurrency = [1, 2]\n", "key 'concurrency' takes one value"),
        ('backend = "kafka"\n', "key 'backend': 'kafka' is not one of amqp, sidekiq"),
        ("queue = [1, true]\n", "key 'queue': True is not a value --queue takes"),
        ("concurrency = \n", "is not valid TOML"),
    ],
)
def test_a_wrong_key_type_or_value_names_it_and_the_file(
    tmp_path: Path, text: str, error: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        resolve(worker_parser(), ["--config", str(path)], {})
    assert error in str(caught.value) and str(path) in str(caught.value)


def test_a_wrong_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="FASTWORKER_JOB_TIMEOUT: must be above 0, got -1"):
        resolve(worker_parser(), [], {"FASTWORKER_JOB_TIMEOUT": "-1"})


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        resolve(worker_parser(), ["--config", str(tmp_path / "nope.toml")], {})


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "fastworker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC_DIR), **(env or {})},
        check=False,
    )


def test_fastworker_config_prints_the_effective_settings_and_their_sources(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, 'concurrency = 3\nqueue = ["jobs"]\n')
    done = run_cli(
        "config",
        "--config",
        str(path),
        "--pipeline",
        "2",
        env={"FASTWORKER_AMQP_URL": "amqp://u:secret@broker:5672/"},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"concurrency = 3  # file {path}" in lines
    assert 'queue = ["jobs"]  # file ' + str(path) in lines
    assert "pipeline = 2  # flag --pipeline" in lines
    assert 'amqp_url = "amqp://u:***@broker:5672/"  # environment FASTWORKER_AMQP_URL' in lines
    assert "job_timeout = 300.0  # default" in lines
    assert "secret" not in done.stdout


def test_a_misspelt_key_stops_the_worker_before_it_connects(tmp_path: Path) -> None:
    path = write(tmp_path, 'queue = ["q"]\nalow_script = ["/srv/*.php"]\n')
    done = run_cli("--config", str(path), "--amqp-url", "amqp://guest:guest@127.0.0.1:1/")
    assert done.returncode == 2
    assert f"{path}: unknown key 'alow_script'; did you mean 'allow_script'?" in done.stderr


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_example_deployment_is_consistent() -> None:
    """examples/fastworker.toml is valid, systemd waits longer than the worker's drain, and the
    FPM pool has the children the config's --concurrency pins and a hard timeout above
    --job-timeout."""
    config = EXAMPLES / "fastworker.toml"
    settings = settings_from(resolve(worker_parser(), ["--config", str(config)], {}).args)
    unit = (EXAMPLES / "systemd" / "fastworker.service").read_text()
    stop = int(
        next(line for line in unit.splitlines() if line.startswith("TimeoutStopSec=")).split("=")[1]
    )
    assert stop > settings.shutdown_timeout >= settings.job_timeout
    pool = dict(
        line.split(" = ", 1)
        for line in (EXAMPLES / "php-fpm" / "jobs.conf").read_text().splitlines()
        if " = " in line and not line.startswith(";")
    )
    assert pool["pm"] == "static" and int(pool["pm.max_children"]) == settings.concurrency
    assert int(pool["request_terminate_timeout"].rstrip("s")) > settings.job_timeout
    assert pool["php_admin_value[display_errors]"] == "Off"


def test_the_grafana_dashboard_reads_metrics_the_worker_exports() -> None:
    import json
    import re

    text = (EXAMPLES / "grafana" / "fastworker.json").read_text()
    json.loads(text)
    used = {
        re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"fastworker_\w+", text)
    }
    exported = set(DASHBOARD_METRICS)
    assert used <= exported and len(used) == len(exported)


def test_dlq_reads_the_workers_config_file_and_environment(
    tmp_path: Path, rabbitmq_url: str
) -> None:
    path = write(tmp_path, 'queue = ["orders", "mail"]\ndead_letter_queue = "{queue}.dead"\n')
    done = run_cli("dlq", "show", "--config", str(path), env={"FASTWORKER_AMQP_URL": rabbitmq_url})
    assert done.returncode == 1
    assert "no dead-letter queue orders.dead" in done.stderr  # the file's first queue
    flagged = run_cli(
        "dlq",
        "show",
        "--config",
        str(path),
        "--queue",
        "other",
        env={"FASTWORKER_AMQP_URL": rabbitmq_url},
    )
    assert "no dead-letter queue other.dead" in flagged.stderr
    bad = write(tmp_path, "queue_name = 1\n")
    wrong = run_cli("dlq", "show", "--config", str(bad))
    assert wrong.returncode == 2 and "unknown key 'queue_name'" in wrong.stderr


def test_help_shows_the_defaults() -> None:
    done = run_cli("--help")
    assert done.returncode == 0, done.stderr
    assert "--config FILE" in done.stdout and "(default: 300)" in done.stdout
    assert run_cli("config", "--help").returncode == 0
