"""A new user's first contact: pointing fastworker at an existing PHP-FPM and broker.

Real RabbitMQ, a real PHP-FPM started by the test, the worker as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from fastworker.endpoint import Endpoint
from fastworker.job import Job, NotAllowed
from fastworker.targets import TargetPolicy, parse_alias
from helpers import bundle_message, wait_for
from services import PHP_DIR
from services.fpm import FpmServer
from services.rabbitmq import amqp_get_all, amqp_publish, amqp_queue_count
from services.worker import Worker, worker_args

RECORD = str(PHP_DIR / "record.php")
SOCK = Endpoint(path="/run/php/php8.2-fpm.sock")


def run_aliased_bundle_jobs(
    fpm: FpmServer, url: str, queue: str, tmp_path: Path, concurrency: str, wait: float
) -> str:
    """200 bundle messages naming localhost:9000, run by a worker told that this means `fpm`:
    each runs exactly once, none is dead-lettered. Returns the worker's log."""
    datas = [f"aliased-{i}" for i in range(200)]
    amqp_publish(url, queue, [bundle_message(d, RECORD, "localhost", 9000) for d in datas])
    worker = Worker(
        worker_args(
            url, queue, fpm.address, "--fpm-alias", f"localhost:9000={fpm.address}",
            "--concurrency", concurrency,
        ),
        tmp_path / "worker.log",
    )
    try:
        wait_for(lambda: len(fpm.records()) >= len(datas), wait, what=f"200 jobs in {wait} s")
    finally:
        code = worker.stop()
    assert code == 0, worker.log()
    runs = Counter(sha for _, sha, _ in fpm.records())
    assert runs == Counter(hashlib.sha1(d.encode()).hexdigest() for d in datas)
    assert amqp_queue_count(url, f"{queue}.failed") == 0
    return worker.log()


def test_an_alias_maps_the_endpoint_a_message_names_onto_a_listed_one() -> None:
    named, actual = parse_alias("localhost:9000=unix:/run/php/php8.2-fpm.sock")
    assert (named, actual) == (Endpoint("127.0.0.1", 9000), SOCK)
    policy = TargetPolicy([SOCK], ["/srv/*.php"], {named: actual})
    assert policy.resolve(Job("/srv/a.php", endpoint=Endpoint("127.0.0.1", 9000))) == (
        SOCK,
        "/srv/a.php",
    )
    with pytest.raises(NotAllowed, match="--fpm-alias 127.0.0.1:9001=ADDR"):
        policy.resolve(Job("/srv/a.php", endpoint=Endpoint("127.0.0.1", 9001)))
    with pytest.raises(ValueError, match="is not listed with --fpm"):
        TargetPolicy([SOCK], ["/srv/*.php"], {named: Endpoint("127.0.0.1", 9002)})
    for bad in ("localhost:9000", "=unix:/x", "localhost:9000=", "localhost:x=unix:/s"):
        with pytest.raises(ValueError):
            parse_alias(bad)


def test_bundle_messages_naming_localhost_9000_run_on_a_unix_socket_pool(
    fpm_factory, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    # The bundle's defaults name localhost:9000; Debian's stock pool listens on a Unix socket.
    fpm = fpm_factory(children=2, unix_socket=True)
    run_aliased_bundle_jobs(fpm, rabbitmq_url, queue_name, tmp_path, "2", wait=60)


def test_without_the_alias_the_dead_letter_says_how_to_map_it(
    fpm_factory, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    fpm = fpm_factory(children=1, unix_socket=True)
    amqp_publish(rabbitmq_url, queue_name, [bundle_message("unmapped", RECORD, "localhost", 9000)])
    worker = Worker(worker_args(rabbitmq_url, queue_name, fpm.address), tmp_path / "worker.log")
    dead_letters = f"{queue_name}.failed"
    try:
        worker.wait_consuming()
        wait_for(lambda: amqp_queue_count(rabbitmq_url, dead_letters) == 1, 30, what="dead letter")
    finally:
        code = worker.stop()
    assert code == 0, worker.log()
    (letter,) = amqp_get_all(rabbitmq_url, dead_letters)
    error = json.loads(letter.header.properties.headers["x-fastworker-error"])
    assert error["kind"] == "not_allowed"
    assert "--fpm-alias 127.0.0.1:9000=ADDR" in error["message"]


def test_an_alias_to_an_unlisted_endpoint_stops_the_worker_at_start(tmp_path: Path) -> None:
    worker = Worker(
        ["--amqp-url", "amqp://guest:guest@127.0.0.1:1/", "--fpm", "127.0.0.1:9000",
         "--fpm-alias", "localhost:9001=unix:/nowhere.sock"],
        tmp_path / "worker.log",
    )
    code = worker.proc.wait(30)
    assert code == 2, worker.log()
    assert "unix:/nowhere.sock is not listed with --fpm" in worker.log()


def test_concurrency_above_a_dynamic_pool_s_children_costs_no_job_its_timeout(
    fpm_factory, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    # The run: a dynamic pool of at most 2 children on a Unix socket, 200 bundle
    # messages naming the bundle's default localhost:9000, and --concurrency 4. Two of the
    # four connections wait in FPM's backlog; the pool frees children for them and keeps to
    # two connections, so no job waits for --job-timeout (300 s by default).
    fpm = fpm_factory(children=2, unix_socket=True, pm="dynamic")
    log = run_aliased_bundle_jobs(fpm, rabbitmq_url, queue_name, tmp_path, "4", wait=30)
    assert "timeout" not in log
    assert "waits in its backlog" in log  # the case did arise, and was named


@pytest.mark.parametrize("client", ["fast", "aiormq"])
@pytest.mark.parametrize(
    "url, says",
    [
        ("amqp://guest:wrong@127.0.0.1:5672/", "refused the login of user 'guest'"),
        ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "asked for vhost 'no-such-vhost'"),
    ],
    ids=["password", "vhost"],
)
def test_a_refused_login_or_vhost_ends_the_worker_at_once(
    rabbitmq_url: str, tmp_path: Path, client: str, url: str, says: str
) -> None:
    worker = Worker(
        ["--amqp-url", url, "--amqp-client", client, "--fpm", "127.0.0.1:9000"],
        tmp_path / "worker.log",
    )
    code = worker.proc.wait(10)  # the issue: non-zero within 10 s, not retried forever
    log = worker.log()
    assert code == 2, log
    assert says in log and "--amqp-url" in log
    assert "wrong" not in log.replace("guest:wrong", "")  # the password is never shown
    assert ":***@" in log or "vhost" in says
    assert "retrying" not in log


def test_nothing_listening_is_retried_with_a_hint(tmp_path: Path) -> None:
    from services.process import free_loopback_port

    port = free_loopback_port()
    worker = Worker(
        ["--amqp-url", f"amqp://guest:secret@127.0.0.1:{port}/", "--fpm", "127.0.0.1:9000"],
        tmp_path / "worker.log",
    )
    try:
        wait_for(lambda: "retrying in" in worker.log(), 15, what="a retry")
        assert worker.alive()  # systemd-friendly: the broker may be starting
    finally:
        worker.stop()
    assert f"is RabbitMQ running at 127.0.0.1:{port}?" in worker.log()
    assert "secret" not in worker.log()


def _check(*args: str) -> tuple[int, str]:
    import subprocess
    import sys

    from services.worker import worker_env

    result = subprocess.run(
        [sys.executable, "-m", "fastworker", "check", *args],
        capture_output=True, text=True, timeout=60, env=worker_env(),
    )
    return result.returncode, result.stdout + result.stderr


def test_check_says_what_works_and_what_to_fix(fpm_factory, rabbitmq_url: str) -> None:
    fpm = fpm_factory(children=1, unix_socket=True)
    common = ["--fpm", fpm.address, "--script", RECORD, "--allow-script", f"{PHP_DIR}/*.php"]
    code, out = _check("--amqp-url", rabbitmq_url, *common,
                       "--fpm-alias", f"localhost:9000={fpm.address}")
    assert code == 0, out
    assert "5 of 5 checks passed" in out and f"ok   PHP-FPM {fpm.address}" in out
    assert "messages naming it run on" in out

    code, out = _check("--amqp-url", rabbitmq_url.replace("guest:guest", "guest:wrong"),
                       "--fpm", fpm.address, "--script", f"{PHP_DIR}/missing.php",
                       "--allow-script", f"{PHP_DIR}/*.php")
    assert code == 1, out
    assert "refused the login of user 'guest'" in out and "wrong" not in out
    assert "--fpm-alias localhost:9000=" in out  # the bundle's default endpoint is not mapped
    assert "missing.php does not exist where PHP-FPM runs" in out
