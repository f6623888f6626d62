"""Production brokers: amqps:// with a private CA and client certificates, named connections,
and which broker failures end the worker (permanent) or are retried (transient).

The broker is a private RabbitMQ node whose TLS listener requires a client certificate signed
by a CA this session made (`tls_rabbitmq`, services/rabbitmq_tls.py). The test publishes and
inspects over the node's plain loopback listener; the worker, `check` and `dlq` use TLS only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fastworker.amqp_tls import TlsSettingsError, client_context
from fastworker.amqp_url import AmqpUrl, UrlError, masked, with_files
from helpers import bundle_message, wait_for
from services import PHP_DIR
from services.fpm import FpmServer
from services.process import free_loopback_port
from services.proxy import TcpProxy
from services.rabbitmq import QUEUE_PREFIX, amqp_get_all, amqp_publish, amqp_queue_count
from services.rabbitmq_tls import TlsRabbit
from services.worker import Worker, worker_args, worker_env

RECORD = str(PHP_DIR / "record.php")
FAIL = str(PHP_DIR / "fail.php")
CLIENTS = ["fast", "aiormq"]
QUICK_RETRIES = ["--max-attempts", "2", "--retry-delay", "0.2", "--stats-interval", "0"]


def sha(data: str) -> str:
    return hashlib.sha1(data.encode()).hexdigest()


def new_queue() -> str:
    return f"{QUEUE_PREFIX}tls.{secrets.token_hex(4)}"


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def ended_within(worker: Worker, seconds: float) -> tuple[int, float]:
    started = time.monotonic()
    try:
        code = worker.proc.wait(seconds)
    except subprocess.TimeoutExpired:
        worker.kill()
        raise AssertionError(f"still running after {seconds} s:\n{worker.log()}") from None
    return code, time.monotonic() - started


# --------------------------------------------------------------------------- the URL


def test_the_url_takes_rabbitmq_s_tls_parameters_and_aiormq_s() -> None:
    url = AmqpUrl.parse(
        "amqps://u:p%40ss@broker.example:5671/prod?cacertfile=/ca.pem&certfile=/c.pem"
        "&keyfile=/k.pem&verify=verify_peer&server_name_indication=mq.example&heartbeat=10"
        "&connection_timeout=2500&frame_max=65536&name=billing"
    )
    assert (url.host, url.port, url.username, url.password, url.vhost) == (
        "broker.example",
        5671,
        "u",
        "p@ss",
        "prod",
    )
    assert (url.cacertfile, url.certfile, url.keyfile, url.verify) == (
        "/ca.pem",
        "/c.pem",
        "/k.pem",
        True,
    )
    assert (url.server_hostname, url.heartbeat, url.connect_timeout, url.frame_max) == (
        "mq.example",
        10,
        2.5,
        65536,
    )
    assert url.connection_name("consume").startswith("billing ")
    assert url.connection_name("consume").endswith(f":{os.getpid()} consume")
    # What aiormq always read still works: cafile, no_verify_ssl, auth, timeout.
    old = AmqpUrl.parse("amqps://h/?cafile=/ca.pem&no_verify_ssl=1&auth=external&timeout=3")
    assert (old.cacertfile, old.verify, old.auth, old.connect_timeout) == (
        "/ca.pem",
        False,
        "EXTERNAL",
        3.0,
    )
    assert AmqpUrl.parse("amqps://h").port == 5671
    assert AmqpUrl.parse("amqps://h/?server_name_indication=disable").server_hostname == ""
    # aiormq gets no TLS parameter (they travel as an SSLContext), nor the key path.
    assert "keyfile" not in url.aiormq_url and "heartbeat=10" in url.aiormq_url


@pytest.mark.parametrize(
    "url, says",
    [
        ("amqps://h/?cacertfle=/ca.pem", "unknown query parameter 'cacertfle'"),
        ("amqp://h/?cacertfile=/ca.pem", "are TLS settings, but the URL is amqp://"),
        ("amqps://h/?verify=yes", "verify must be verify_peer or verify_none"),
        ("amqps://h/?fail_if_no_peer_cert=true", "is a broker setting"),
        ("amqps://h/?heartbeat=often", "heartbeat must be a number"),
        ("amqps://h/?auth_mechanism=amqplain", "must be plain or external"),
        ("http://h/", "must start with amqp:// or amqps://"),
    ],
)
def test_a_url_that_cannot_work_as_written_is_refused(url: str, says: str) -> None:
    with pytest.raises(UrlError, match=says):
        AmqpUrl.parse(url)


def test_passwords_and_key_paths_are_masked() -> None:
    text = "amqps://u:secret@h:5671/v?cacertfile=/ca.pem&keyfile=/keys/k.pem&password=kpw"
    shown = masked(text)
    assert "secret" not in shown and "/keys/k.pem" not in shown and "kpw" not in shown
    assert "u:***@h:5671" in shown and "cacertfile=/ca.pem" in shown
    assert masked("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"


def test_the_flags_set_the_url_s_tls_files() -> None:
    url = with_files("amqps://h/?cafile=/old.pem&heartbeat=5", "/ca.pem", "/c.pem", "/k.pem")
    parsed = AmqpUrl.parse(url)
    assert (parsed.cacertfile, parsed.certfile, parsed.keyfile, parsed.heartbeat) == (
        "/ca.pem",
        "/c.pem",
        "/k.pem",
        5,
    )
    assert with_files("amqps://h/") == "amqps://h/"


def test_an_unknown_url_parameter_ends_the_worker(tmp_path: Path) -> None:
    worker = Worker(
        [
            "--amqp-url",
            "amqps://u:secret@127.0.0.1:1/?cacertfile=/ca.pem&verfy=verify_none",
            "--fpm",
            "127.0.0.1:9000",
        ],
        tmp_path / "worker.log",
    )
    code, _ = ended_within(worker, 15)
    assert code == 2, worker.log()
    assert "unknown query parameter 'verfy'" in last_line(worker.log())
    assert "secret" not in worker.log()


def test_a_missing_ca_or_key_file_ends_the_worker_naming_it(tmp_path: Path) -> None:
    worker = Worker(
        [
            "--amqp-url",
            "amqps://u:secret@127.0.0.1:1/",
            "--amqp-ca",
            str(tmp_path / "no-ca.pem"),
            "--fpm",
            "127.0.0.1:9000",
        ],
        tmp_path / "worker.log",
    )
    code, _ = ended_within(worker, 15)
    assert code == 2, worker.log()
    assert f"cannot read the CA file (cacertfile=, --amqp-ca) {tmp_path}/no-ca.pem" in last_line(
        worker.log()
    )


def test_certificate_files_that_cannot_work_are_named_but_key_paths_are_not(
    tls_rabbitmq: TlsRabbit, tmp_path: Path
) -> None:
    pki = tls_rabbitmq.pki
    locked = tmp_path / "locked.key"
    subprocess.run(
        [
            "openssl",
            "pkey",
            "-in",
            str(pki.client_key),
            "-out",
            str(locked),
            "-aes256",
            "-passout",
            "pass:kpw",
        ],
        check=True,
        capture_output=True,
    )

    def context(**query: str) -> object:
        return client_context(
            AmqpUrl.parse(
                "amqps://h/?" + "&".join(f"{key}={value}" for key, value in query.items())
            )
        )

    cases = {
        "does not belong to the client certificate": {
            "certfile": pki.client_cert,
            "keyfile": pki.rogue_client_key,
        },
        "keyfile= (--amqp-key) needs certfile= (--amqp-cert) too": {"keyfile": pki.client_key},
        "cannot load the CA certificates": {"cacertfile": pki.client_cert.with_suffix(".csr")},
        "is encrypted: give its password with password=": {
            "certfile": pki.client_cert,
            "keyfile": locked,
        },
        "the key's password= must be right": {
            "certfile": pki.client_cert,
            "keyfile": locked,
            "password": "nope",
        },
        "cannot read the client key (keyfile=, --amqp-key): No such file": {
            "certfile": pki.client_cert,
            "keyfile": tmp_path / "gone.key",
        },
    }
    for says, query in cases.items():
        with pytest.raises(TlsSettingsError, match=re.escape(says)) as caught:
            context(**{key: str(value) for key, value in query.items()})
        assert str(query.get("keyfile")) not in str(caught.value)
    assert context(certfile=str(pki.client_cert), keyfile=str(locked), password="kpw")
    assert context() is not None  # the system's CAs


# --------------------------------------------------------------------------- over TLS


@pytest.mark.parametrize("client", CLIENTS)
def test_jobs_run_retry_and_dead_letter_over_mutual_tls_on_named_connections(
    tls_rabbitmq: TlsRabbit, fpm: FpmServer, tmp_path: Path, client: str
) -> None:
    fpm.clear_records()
    queue = new_queue()
    datas = [f"tls-{client}-{i}" for i in range(499)]  # and one that fails: 500 jobs
    bodies = [bundle_message(d, RECORD, "127.0.0.1", fpm.port) for d in datas]
    bodies.insert(150, bundle_message("doomed", FAIL, "127.0.0.1", fpm.port))
    amqp_publish(tls_rabbitmq.plain_url, queue, bodies)
    worker = Worker(
        worker_args(
            tls_rabbitmq.tls_url(), queue, fpm.address, "--amqp-client", client, *QUICK_RETRIES
        ),
        tmp_path / "worker.log",
    )
    try:
        worker.wait_consuming(30)
        wait_for(lambda: len(fpm.records()) >= len(datas), 60, what="every job run")
        wait_for(
            lambda: amqp_queue_count(tls_rabbitmq.plain_url, f"{queue}.failed") == 1,
            30,
            what="the dead letter",
        )
        connections = tls_rabbitmq.rabbitmqctl(
            "list_connections", "ssl", "peer_cert_subject", "client_properties"
        )
    finally:
        code = worker.stop()
    assert code == 0, worker.log()
    assert Counter(s for _, s, _ in fpm.records()) == Counter(sha(d) for d in datas)
    (letter,) = amqp_get_all(tls_rabbitmq.plain_url, f"{queue}.failed")
    error = json.loads(letter.header.properties.headers["x-fastworker-error"])
    assert error["kind"] == "php_error" and error["attempts"] == 2
    assert "boom: doomed" in error["message"]
    # Named connections, over TLS with the client certificate.
    name = f"fastworker {socket.gethostname()}:{worker.pid}"
    # "control": the pause/resume listener's (fastworker.control).
    roles = {"fast": ["consume", "publish", "control"], "aiormq": ["consume", "control"]}[client]
    for role in roles:
        assert f"{name} {role}" in connections, connections
    mine = [line for line in connections.splitlines() if name in line]
    assert len(mine) == len(roles), connections
    assert all(line.startswith("true") and "CN=fwtls" in line for line in mine), mine
    assert tls_rabbitmq.password not in worker.log()


PERMANENT: dict[str, tuple[Callable[[TlsRabbit], str], str]] = {
    "no-client-cert": (
        lambda node: node.tls_url(client_cert=False),
        "refused the TLS handshake (tlsv13 alert certificate required): it requires a client "
        "certificate",
    ),
    "untrusted-ca": (
        lambda node: node.tls_url(cacertfile=str(node.pki.rogue_ca)),
        "its TLS certificate does not verify (self-signed certificate in certificate chain",
    ),
    "untrusted-client-cert": (
        lambda node: node.tls_url(
            certfile=str(node.pki.rogue_client_cert), keyfile=str(node.pki.rogue_client_key)
        ),
        "refused the client certificate",
    ),
    "wrong-name": (
        lambda node: node.tls_url(server_name_indication="mq.example"),
        "its TLS certificate is not valid for the name 'mq.example'",
    ),
    "password": (
        lambda node: node.tls_url().replace(f":{node.password}@", ":wrong@"),
        "refused the login of user 'fwtls'",
    ),
    "vhost": (
        lambda node: node.tls_url().replace("/?", "/nowhere?"),
        "asked for vhost 'nowhere'",
    ),
}


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("case", PERMANENT)
def test_a_permanent_broker_error_ends_the_worker_at_once_naming_it(
    tls_rabbitmq: TlsRabbit, tmp_path: Path, client: str, case: str
) -> None:
    make_url, says = PERMANENT[case]
    worker = Worker(
        ["--amqp-url", make_url(tls_rabbitmq), "--amqp-client", client, "--fpm", "127.0.0.1:9000"],
        tmp_path / "worker.log",
    )
    code, _ = ended_within(worker, 15)  # the issue: non-zero within 15 s, not retried
    log = worker.log()
    assert code == 2, log
    assert says in last_line(log), log
    assert "retrying" not in log
    assert tls_rabbitmq.password not in log
    assert str(tls_rabbitmq.pki.client_key) not in log


@pytest.mark.parametrize("client", CLIENTS)
def test_a_client_certificate_can_be_the_login(
    tls_rabbitmq: TlsRabbit, fpm: FpmServer, tmp_path: Path, client: str
) -> None:
    fpm.clear_records()
    queue = new_queue()
    amqp_publish(
        tls_rabbitmq.plain_url,
        queue,
        [bundle_message(f"ext-{i}", RECORD, "127.0.0.1", fpm.port) for i in range(20)],
    )
    url = tls_rabbitmq.tls_url(auth_mechanism="external").replace(
        f"{tls_rabbitmq.user}:{tls_rabbitmq.password}@", ""
    )
    worker = Worker(
        worker_args(url, queue, fpm.address, "--amqp-client", client), tmp_path / "worker.log"
    )
    try:
        wait_for(lambda: len(fpm.records()) >= 20, 30, what="the jobs, logged in as the CN")
    finally:
        assert worker.stop() == 0, worker.log()


def test_verify_none_connects_to_any_certificate_with_a_loud_warning(
    tls_rabbitmq: TlsRabbit, tmp_path: Path
) -> None:
    url = tls_rabbitmq.tls_url(cacertfile=str(tls_rabbitmq.pki.rogue_ca), verify="verify_none")
    worker = Worker(
        ["--amqp-url", url, "--queue", new_queue(), "--fpm", "127.0.0.1:9000"],
        tmp_path / "worker.log",
    )
    try:
        worker.wait_consuming(30)
    finally:
        assert worker.stop() == 0, worker.log()
    assert "WARNING fastworker.broker: TLS certificate verification is OFF" in worker.log()


class _Rude(socketserver.BaseRequestHandler):
    """Accepts and resets at once (a broker restarting, a load balancer without backend)."""

    def handle(self) -> None:
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.request.close()


class _Silent(socketserver.BaseRequestHandler):
    """Accepts and says nothing (a broker too busy to answer)."""

    def handle(self) -> None:
        time.sleep(5)


@pytest.fixture(params=["nothing-listens", "reset", "silent"])
def flaky_broker(request: pytest.FixtureRequest) -> Iterator[int]:
    """A port where a TLS connection fails for a reason that may pass."""
    if request.param == "nothing-listens":
        yield free_loopback_port()
        return
    handler = _Rude if request.param == "reset" else _Silent
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_transient_failure_is_retried_with_backoff(
    tls_rabbitmq: TlsRabbit, flaky_broker: int, tmp_path: Path, client: str
) -> None:
    url = tls_rabbitmq.tls_url(host="127.0.0.1", connection_timeout="1000").replace(
        f":{tls_rabbitmq.tls_port}/", f":{flaky_broker}/"
    )
    worker = Worker(
        ["--amqp-url", url, "--amqp-client", client, "--fpm", "127.0.0.1:9000"],
        tmp_path / "worker.log",
    )
    try:
        wait_for(lambda: worker.log().count("retrying in") >= 2, 20, what="two retries")
        assert worker.alive()
    finally:
        assert worker.stop() == 0, worker.log()
    assert "Traceback" not in worker.log()


def test_a_tls_session_lost_while_consuming_is_resumed(
    tls_rabbitmq: TlsRabbit, fpm: FpmServer, tmp_path: Path
) -> None:
    fpm.clear_records()
    queue = new_queue()
    proxy = TcpProxy(("127.0.0.1", tls_rabbitmq.tls_port))
    url = tls_rabbitmq.tls_url(host="127.0.0.1").replace(
        f":{tls_rabbitmq.tls_port}/", f":{proxy.port}/"
    )
    datas = [f"cut-{i}" for i in range(1500)]
    amqp_publish(
        tls_rabbitmq.plain_url,
        queue,
        [bundle_message(d, RECORD, "127.0.0.1", fpm.port) for d in datas],
    )
    worker = Worker(worker_args(url, queue, fpm.address), tmp_path / "worker.log")
    try:
        wait_for(lambda: len(fpm.records()) >= 100, 30, what="some jobs")
        proxy.cut()
        wait_for(lambda: "retrying in" in worker.log(), 15, what="the reconnect attempt")
        wait_for(
            lambda: {s for _, s, _ in fpm.records()} >= {sha(d) for d in datas},
            60,
            what="every job run",
        )
    finally:
        code = worker.stop()
        proxy.close()
    assert code == 0, worker.log()
    assert worker.log().count("consuming ") >= 2


# --------------------------------------------------------------------------- the tools


def _command(*args: str) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "fastworker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=worker_env(),
    )
    return result.returncode, result.stdout + result.stderr


def test_check_and_dlq_use_tls_with_the_flags(tls_rabbitmq: TlsRabbit, fpm: FpmServer) -> None:
    pki = tls_rabbitmq.pki
    queue = new_queue()
    amqp_publish(tls_rabbitmq.plain_url, f"{queue}.failed", [b"a dead letter"])
    bare = tls_rabbitmq.tls_url(client_cert=False).split("?")[0]  # no CA, no certificate
    flags = [
        "--amqp-ca",
        str(pki.ca),
        "--amqp-cert",
        str(pki.client_cert),
        "--amqp-key",
        str(pki.client_key),
    ]
    code, out = _command(
        "check",
        "--amqp-url",
        bare,
        *flags,
        "--queue",
        queue,
        "--fpm",
        fpm.address,
        "--script",
        RECORD,
    )
    assert "connected over TLS (broker certificate verified, with the client certificate)" in out
    assert str(pki.client_key) not in out and tls_rabbitmq.password not in out
    code, out = _command("dlq", "show", "--amqp-url", bare, *flags, "--queue", queue)
    assert code == 0, out
    assert "1 of 1 dead letters" in out
    code, out = _command(
        "dlq", "show", "--amqp-url", bare, "--amqp-ca", str(pki.ca), "--queue", queue
    )
    assert code == 1
    assert "requires a client certificate" in last_line(out), out
    code, out = _command(
        "check", "--amqp-url", bare, "--queue", queue, "--fpm", fpm.address, "--script", RECORD
    )
    assert code == 1
    assert "its TLS certificate does not verify" in out, out  # the system's CAs did not sign it
