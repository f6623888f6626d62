"""The fixtures themselves, checked against the real services with hand-built FastCGI bytes.

These tests do not use the worker's codec on purpose: if they pass and a worker test fails, the
fault is in the worker, not in the test rig.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from helpers import bundle_message, order_placed_data, wait_for
from services.rabbitmq import (
    amqp_delete_queues,
    amqp_get_all,
    amqp_host_port,
    amqp_publish,
    amqp_queue_count,
    amqp_queue_exists,
)

FCGI_BEGIN_REQUEST, FCGI_END_REQUEST, FCGI_PARAMS, FCGI_STDIN, FCGI_STDOUT, FCGI_STDERR = (
    1, 3, 4, 5, 6, 7,
)
FCGI_RESPONDER = 1
FCGI_KEEP_CONN = 1


def _record(rtype: int, content: bytes, request_id: int = 1) -> bytes:
    padding = -len(content) % 8
    header = struct.pack(">BBHHBx", 1, rtype, request_id, len(content), padding)
    return header + content + b"\0" * padding


def _pair(name: bytes, value: bytes) -> bytes:
    def length(n: int) -> bytes:
        return struct.pack(">B", n) if n < 128 else struct.pack(">I", n | 0x80000000)

    return length(len(name)) + length(len(value)) + name + value


def _request(params: dict[str, str], stdin: bytes = b"", keep_conn: bool = False) -> bytes:
    """A minimal RESPONDER request: BEGIN_REQUEST, one PARAMS record, STDIN, the empty ends."""
    begin = struct.pack(">HB5x", FCGI_RESPONDER, FCGI_KEEP_CONN if keep_conn else 0)
    pairs = b"".join(_pair(k.encode(), v.encode()) for k, v in params.items())
    assert len(pairs) < 65536
    out = _record(FCGI_BEGIN_REQUEST, begin) + _record(FCGI_PARAMS, pairs)
    out += _record(FCGI_PARAMS, b"")
    if stdin:
        out += _record(FCGI_STDIN, stdin)
    return out + _record(FCGI_STDIN, b"")


def _read_response(sock: socket.socket) -> tuple[bytes, bytes, int]:
    """(stdout, stderr, app_status) of one request; reads until END_REQUEST."""
    buf = b""
    stdout, stderr = [], []

    def need(n: int) -> None:
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("FPM closed the connection before END_REQUEST")
            buf += chunk

    while True:
        need(8)
        _, rtype, _, clen, plen = struct.unpack(">BBHHBx", buf[:8])
        need(8 + clen + plen)
        content = buf[8 : 8 + clen]
        buf = buf[8 + clen + plen :]
        if rtype == FCGI_STDOUT:
            stdout.append(content)
        elif rtype == FCGI_STDERR:
            stderr.append(content)
        elif rtype == FCGI_END_REQUEST:
            app_status = struct.unpack(">I", content[:4])[0]
            return b"".join(stdout), b"".join(stderr), app_status


def _connect(address: str) -> socket.socket:
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address[5:])
    else:
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
    sock.settimeout(10)
    return sock


def fcgi_call(
    address: str,
    script: Path,
    data: str | None = None,
    extra: dict[str, str] | None = None,
    post: bool = False,
) -> tuple[dict[str, str], bytes, bytes, int]:
    """Run one script over a fresh connection: (CGI headers, body, stderr, app_status).

    The data goes in the DEFERRED_DATA param, or with ``post`` as an urlencoded POST body.
    """
    body = b""
    params = {
        "SCRIPT_FILENAME": str(script),
        "REQUEST_METHOD": "POST",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "GATEWAY_INTERFACE": "CGI/1.1",
    }
    if data is not None and post:
        body = b"DEFERRED_DATA=" + quote(data, safe="").encode()
        params["CONTENT_TYPE"] = "application/x-www-form-urlencoded"
    elif data is not None:
        params["DEFERRED_DATA"] = data
    params["CONTENT_LENGTH"] = str(len(body))
    params.update(extra or {})
    raw = _request(params)[:-8]  # without the empty STDIN record
    raw += b"".join(_record(FCGI_STDIN, body[i : i + 0xFFF8]) for i in range(0, len(body), 0xFFF8))
    raw += _record(FCGI_STDIN, b"")
    with _connect(address) as sock:
        sock.sendall(raw)
        stdout, stderr, app_status = _read_response(sock)
    head, _, body = stdout.partition(b"\r\n\r\n")
    headers = {}
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers, body, stderr, app_status


# --------------------------------------------------------------------------- PHP-FPM


def test_fpm_answers_raw_fastcgi(fpm, php_dir):
    headers, body, stderr, app_status = fcgi_call(fpm.address, php_dir / "pid.php")
    assert app_status == 0 and "status" not in headers, (headers, stderr)
    assert int(body) in fpm.child_pids()
    assert len(fpm.child_pids()) == 4
    assert fpm.address == f"127.0.0.1:{fpm.port}" and fpm.host == "127.0.0.1"
    assert fpm.conf_path.exists() and fpm.error_log.exists()


def test_keep_alive_connection_stays_on_one_child(fpm, php_dir):
    params = {"SCRIPT_FILENAME": str(php_dir / "pid.php"), "REQUEST_METHOD": "GET"}
    with _connect(fpm.address) as sock:
        pids = set()
        for _ in range(5):
            sock.sendall(_request(params, keep_conn=True))
            stdout, _, _ = _read_response(sock)
            pids.add(int(stdout.partition(b"\r\n\r\n")[2]))
    assert len(pids) == 1


def test_record_php_writes_to_pool_env_file(fpm_factory, php_dir, tmp_path):
    target = tmp_path / "custom-records.log"
    server = fpm_factory(children=2, env={"FW_RECORD_FILE": str(target), "FW_OTHER": "x y"})
    assert 'env[FW_OTHER] = "x y"' in server.conf_path.read_text()
    data = base64.b64encode(os.urandom(300)).decode()
    headers, body, stderr, _ = fcgi_call(server.address, php_dir / "record.php", data)
    assert "status" not in headers and body == b"ok\n", (headers, body, stderr)
    # A param of the same name must not redirect the record (getenv local_only).
    fcgi_call(server.address, php_dir / "record.php", data, {"FW_RECORD_FILE": "/tmp/nope"})
    records = server.records()
    digest = hashlib.sha1(data.encode()).hexdigest()
    assert [(d, n) for _, d, n in records] == [(digest, len(data))] * 2
    assert all(pid in server.child_pids() for pid, _, _ in records)


def test_record_php_reads_post_body(fpm, php_dir):
    """Large data travels as an urlencoded POST body; record.php must read it from $_POST."""
    fpm.clear_records()
    data = "a+b/c=" * 20000
    headers, body, stderr, _ = fcgi_call(fpm.address, php_dir / "record.php", data, post=True)
    assert "status" not in headers and body == b"ok\n", (headers, body, stderr)
    assert fpm.records()[-1][1:] == (hashlib.sha1(data.encode()).hexdigest(), len(data))


def test_failure_scripts_show_in_status_not_app_status(fpm, php_dir):
    headers, body, stderr, app_status = fcgi_call(fpm.address, php_dir / "fail.php", "xyz")
    assert app_status == 0
    assert headers["status"].startswith("500")
    assert b"Uncaught RuntimeException: boom: xyz" in stderr

    headers, body, stderr, app_status = fcgi_call(fpm.address, php_dir / "fatal.php", "x")
    assert headers["status"].startswith("500") and b"undefined function" in stderr

    headers, body, _, app_status = fcgi_call(fpm.address, php_dir / "exit3.php", "x")
    assert "status" not in headers and app_status == 0 and body == b"exiting\n"

    headers, body, _, _ = fcgi_call(fpm.address, php_dir / "status.php", "503")
    assert headers["status"].startswith("503")

    headers, _, stderr, _ = fcgi_call(fpm.address, php_dir / "missing.php", "x")
    assert headers["status"].startswith("404") and b"Primary script unknown" in stderr

    headers, body, stderr, _ = fcgi_call(fpm.address, php_dir / "record.php")
    assert headers["status"].startswith("400") and b"no DEFERRED_DATA" in stderr


def test_fail_if_and_sleep_and_output(fpm, php_dir):
    fpm.clear_records()
    ok = base64.b64encode(b"fine").decode()
    bad = base64.b64encode(b"please FAIL now").decode()
    assert "status" not in fcgi_call(fpm.address, php_dir / "fail_if.php", ok)[0]
    headers, _, stderr, _ = fcgi_call(fpm.address, php_dir / "fail_if.php", bad)
    assert headers["status"].startswith("500") and b"boom: please FAIL" in stderr
    assert len(fpm.records()) == 1

    started = time.monotonic()
    headers, body, _, _ = fcgi_call(fpm.address, php_dir / "sleep.php", "0.3")
    assert body == b"ok\n" and time.monotonic() - started >= 0.3

    headers, body, stderr, _ = fcgi_call(fpm.address, php_dir / "output.php", "70000,100")
    assert body == b"x" * 70000 and b"e" * 100 in stderr


def test_display_errors_is_php_value_so_request_can_override(fpm_factory, php_dir):
    server = fpm_factory(children=1, display_errors=True)
    headers, body, _, _ = fcgi_call(server.address, php_dir / "fatal.php", "x")
    assert "status" not in headers and b"undefined function" in body  # a 200 with the error
    headers, body, _, _ = fcgi_call(
        server.address, php_dir / "fatal.php", "x", {"PHP_VALUE": "display_errors=0"}
    )
    assert headers["status"].startswith("500")


def test_max_requests_recycles_children(fpm_factory, php_dir):
    server = fpm_factory(children=1, max_requests=2)
    pids = [int(fcgi_call(server.address, php_dir / "pid.php")[1]) for _ in range(3)]
    assert pids[0] == pids[1] != pids[2]
    assert "pm.max_requests = 2" in server.conf_path.read_text()


def test_request_terminate_timeout_kills_child(fpm_factory, php_dir):
    server = fpm_factory(children=1, request_terminate_timeout=1)
    with _connect(server.address) as sock:
        sock.sendall(_request({
            "SCRIPT_FILENAME": str(php_dir / "sleep.php"), "REQUEST_METHOD": "GET",
            "DEFERRED_DATA": "5",
        }))
        with pytest.raises(ConnectionError):
            _read_response(sock)
    wait_for(lambda: len(server.child_pids()) == 1, what="a replacement child")


def test_unix_socket_pool_and_stop(fpm_factory, php_dir):
    server = fpm_factory(children=2, unix_socket=True)
    assert server.address.startswith("unix:")
    _, body, _, _ = fcgi_call(server.address, php_dir / "pid.php")
    children = server.child_pids()
    assert int(body) in children and len(children) == 2
    server.stop()
    assert not server.alive()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or b"Z" in Path(f"/proc/{pid}/stat").read_bytes()


def test_listen_backlog_and_children_in_config(fpm_factory):
    server = fpm_factory(children=3, listen_backlog=7)
    text = server.conf_path.read_text()
    assert "listen.backlog = 7" in text and "pm.max_children = 3" in text
    assert "php_value[display_errors] = Off" in text
    assert len(server.child_pids()) == 3


# --------------------------------------------------------------------------- AMQP and Redis


def test_publish_count_get(rabbitmq_url, queue_name):
    assert not amqp_queue_exists(rabbitmq_url, queue_name)
    bodies = [bundle_message(f"job-{i}", "/srv/dispatch.php") for i in range(1200)]
    amqp_publish(rabbitmq_url, queue_name, bodies)
    assert amqp_queue_count(rabbitmq_url, queue_name) == 1200
    got = amqp_get_all(rabbitmq_url, queue_name, limit=3)
    assert [m.body for m in got] == bodies[:3]
    assert got[0].header.properties.delivery_mode in (None, 1)  # not persistent, like the bundle
    assert amqp_queue_count(rabbitmq_url, queue_name) == 1197


def test_publish_uses_existing_durable_queue(rabbitmq_url, queue_name):
    amqp_publish(rabbitmq_url, queue_name, [], durable=True)
    # A second publisher that would declare it non-durable must use it as it is.
    amqp_publish(rabbitmq_url, queue_name, [b"x"], durable=False)
    assert amqp_queue_count(rabbitmq_url, queue_name) == 1
    amqp_delete_queues(rabbitmq_url, [queue_name])
    assert not amqp_queue_exists(rabbitmq_url, queue_name)


def test_queue_name_is_unique_and_prefixed(queue_name, request):
    from services.rabbitmq import QUEUE_PREFIX

    assert QUEUE_PREFIX.startswith("fwtest.") and QUEUE_PREFIX != "fwtest."
    assert queue_name.startswith(f"{QUEUE_PREFIX}test_queue_name_is_unique_and_prefixed.")


def test_bundle_message_format():
    body = bundle_message("DATA==", "/app/dispatch.php", "127.0.0.1", 9001)
    assert body == (
        b"php_bin: /usr/bin/php\n"
        b"console_path: /srv/app/app/console\n"
        b"dispatch_path: /app/dispatch.php\n"
        b"fastcgi_host: 127.0.0.1\n"
        b"fastcgi_port: 9001\n"
        b"\n"
        b"DATA=="
    )
    assert bundle_message("d", "/x.php", console_path="").startswith(b"php_bin: /usr/bin/php\ndis")


def test_order_placed_data_unserializes_in_php():
    data = order_placed_data(42, "héllo")
    code = (
        "class OrderPlaced { public $id; public $payload; }"
        "$e = unserialize(base64_decode($argv[1]));"
        "echo get_class($e), ' ', $e->id, ' ', strlen($e->payload);"
    )
    out = subprocess.run(["php", "-r", code, data], capture_output=True, text=True, check=True)
    assert out.stdout == "OrderPlaced 42 6"


def test_redis_url(redis_url):
    assert redis_url == "redis://127.0.0.1:6379/0"
    with socket.create_connection(("127.0.0.1", 6379), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(64).startswith(b"+PONG")


# --------------------------------------------------------------------------- the example PHP app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "php"


def test_example_publish_and_dispatch(rabbitmq_url, queue_name, fpm_factory, tmp_path):
    """publish.php writes the bundle's format; dispatch.php runs it through Symfony's dispatcher."""
    log = tmp_path / "demo.log"
    server = fpm_factory(children=2, env={"FASTWORKER_DEMO_LOG": str(log)})
    run = subprocess.run(
        [
            "php", str(EXAMPLES / "publish.php"), "--queue", queue_name, "--count", "6",
            "--size", "300", "--fail-every", "3", "--fpm-port", str(server.port),
            "--port", str(amqp_host_port(rabbitmq_url)[1]),
        ],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    run = subprocess.run(
        [
            "php", str(EXAMPLES / "publish.php"), "--queue", queue_name, "--count", "1",
            "--size", "200000", "--start-id", "100", "--fpm-port", str(server.port),
            "--port", str(amqp_host_port(rabbitmq_url)[1]),
        ],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    messages = amqp_get_all(rabbitmq_url, queue_name)
    assert len(messages) == 7
    failed = []
    for message in messages:
        assert message.header.properties.delivery_mode in (None, 1)
        head, _, data = message.body.partition(b"\n\n")
        fields = dict(line.split(": ", 1) for line in head.decode().split("\n"))
        assert list(fields) == [
            "php_bin", "console_path", "dispatch_path", "fastcgi_host", "fastcgi_port"
        ]
        assert fields["dispatch_path"] == str(EXAMPLES / "dispatch.php")
        assert fields["fastcgi_port"] == str(server.port)
        big = len(data) > 60000
        headers, body, stderr, _ = fcgi_call(
            server.address, Path(fields["dispatch_path"]), data.decode(), post=big
        )
        if "status" in headers:
            assert headers["status"].startswith("500")
            assert b"RuntimeException: order" in stderr and b"failed" in stderr
            failed.append(stderr)
        else:
            assert body == b"dispatched order.placed\n", (headers, body, stderr)
    assert len(failed) == 2
    lines = [line.split() for line in log.read_text().splitlines()]
    assert sorted((int(i), int(n)) for i, n, _ in lines) == [
        (1, 300), (2, 300), (4, 300), (5, 300), (100, 200000)
    ]
    assert all(int(pid) in server.child_pids() for _, _, pid in lines)


def test_example_dispatch_accepts_python_built_events(fpm_factory, tmp_path):
    log = tmp_path / "demo.log"
    server = fpm_factory(children=1, env={"FASTWORKER_DEMO_LOG": str(log)})
    headers, body, stderr, _ = fcgi_call(
        server.address, EXAMPLES / "dispatch.php", order_placed_data(7, "x" * 10)
    )
    assert "status" not in headers, stderr
    assert log.read_text().split()[:2] == ["7", "10"]


@pytest.mark.parametrize(
    "data",
    [None, "", "%%% not base64", base64.b64encode(b"not serialized").decode(),
     base64.b64encode(b'O:8:"stdClass":0:{}').decode()],
)
def test_example_dispatch_rejects_bad_data(fpm, data):
    headers, body, stderr, _ = fcgi_call(fpm.address, EXAMPLES / "dispatch.php", data)
    assert headers["status"].startswith("400"), (headers, body)
    assert b"dispatch.php:" in stderr
