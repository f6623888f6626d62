"""Message formats, the allow-lists and the CGI params built from a job (no services needed)."""

from __future__ import annotations

import pytest

from fastworker.executor import INLINE_DATA_LIMIT, Executor
from fastworker.formats import check_param_name, parse_bundle, parse_json, parse_raw, parser_for
from fastworker.fpm import Endpoint, FpmPools
from fastworker.job import BadMessage, Job, NotAllowed
from fastworker.targets import TargetPolicy
from helpers import bundle_message


def test_bundle_message_as_the_bundle_writes_it() -> None:
    body = bundle_message("Tzo4OiJPcmRlciI6MDp7fQ==", "/srv/app/dispatch.php", "localhost", 9001)
    job = parse_bundle(body, "/default.php")
    assert job.script == "/srv/app/dispatch.php"
    assert job.endpoint == Endpoint("127.0.0.1", 9001)
    assert job.data == b"Tzo4OiJPcmRlciI6MDp7fQ=="


def test_bundle_without_target_headers_uses_defaults() -> None:
    job = parse_bundle(b"php_bin: /usr/bin/php\n\nZGF0YQ==", "/default.php")
    assert job.script == "/default.php" and job.endpoint is None and job.data == b"ZGF0YQ=="


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"dispatch_path: /x.php\nZGF0YQ==", "no empty line"),
        (b"dispatch_path /x.php\n\nZGF0YQ==", "has no 'name: value' form"),
        (b"dispatch_path: /x.php\n\n\xff\xfe", "not valid UTF-8"),
        (b"dispatch_path: /\xc3(.php\n\nZGF0YQ==", "not valid UTF-8"),
        (b"dispatch_path: /x.php\n\n   ", "no data"),
        (b"fastcgi_host: h\n\nZGF0YQ==", "must be given together"),
        (b"fastcgi_host: h\nfastcgi_port: nine\n\nZGF0YQ==", "not a number"),
        (b"a: b\n\n" + bytes(range(128, 256)), "not valid UTF-8"),
        (bytes(range(256)), "no empty line"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bundle_rejects_malformed(body: bytes, reason: str) -> None:
    with pytest.raises(BadMessage, match=reason):
        parse_bundle(body, "/default.php")


def test_json_envelope() -> None:
    job = parse_json(
        b'{"script": "/a.php", "params": {"TENANT": "7"}, "body": "{}", "fpm": "127.0.0.1:9002"}',
        "/d.php",
    )
    assert (job.script, job.params, job.body) == ("/a.php", {"TENANT": "7"}, b"{}")
    assert job.endpoint == Endpoint("127.0.0.1", 9002)


@pytest.mark.parametrize(
    "name",
    [
        "PHP_VALUE",
        "php_admin_value",
        "SCRIPT_FILENAME",
        "DOCUMENT_ROOT",
        "HTTP_PROXY",
        "DEFERRED_DATA",
        "REQUEST_METHOD",
        "has space",
        "",
        "1X",
    ],
)
def test_message_cannot_choose_interpreted_param_names(name: str) -> None:
    with pytest.raises(BadMessage):
        check_param_name(name)
    with pytest.raises(BadMessage):
        parse_json(b'{"params": {"%s": "x"}}' % name.encode(), "/d.php")


@pytest.mark.parametrize(
    "body", [b"not json", b"[1]", b'{"script": 3}', b'{"params": {"A": 1}}', b'{"other": 1}']
)
def test_json_rejects_malformed(body: bytes) -> None:
    with pytest.raises(BadMessage):
        parse_json(body, "/d.php")


def test_raw_properties_become_prefixed_params() -> None:
    job = parse_raw(
        b"\x00payload",
        "/d.php",
        {
            "content_type": "application/x-thing",
            "message_id": "m1",
            "headers": {"PHP_VALUE": "auto_prepend_file=/etc/passwd", "x-a": 1},
        },
    )
    assert job.body == b"\x00payload" and job.content_type == "application/x-thing"
    assert job.params["AMQP_MESSAGE_ID"] == "m1"
    assert job.params["AMQP_HEADER_PHP_VALUE"] == "auto_prepend_file=/etc/passwd"
    assert "PHP_VALUE" not in job.params
    assert parser_for("raw") is parse_raw


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        parser_for("xml")


def test_endpoint_parsing() -> None:
    assert str(Endpoint.parse("LOCALHOST:9000")) == "127.0.0.1:9000"
    assert str(Endpoint.parse("unix:/run/php/fpm.sock")) == "unix:/run/php/fpm.sock"
    assert str(Endpoint.parse("[::1]:9000")) == "[::1]:9000"
    for bad in ["9000", "host:", "host:99999", "unix:", ":9000"]:
        with pytest.raises(ValueError):
            Endpoint.parse(bad)


def test_policy_allows_only_listed_endpoints_and_globbed_scripts() -> None:
    policy = TargetPolicy([Endpoint.parse("127.0.0.1:9000")], ["/srv/app/bin/*.php"])
    assert policy.resolve(Job("/srv/app/bin/dispatch.php")) == (
        Endpoint("127.0.0.1", 9000),
        "/srv/app/bin/dispatch.php",
    )
    refused = [
        Job("/srv/app/bin/dispatch.php", endpoint=Endpoint("127.0.0.1", 9001)),
        Job("/srv/app/bin/../../../etc/evil.php"),
        Job("relative/dispatch.php"),
        Job("/srv/other/dispatch.php"),
        Job("/srv/app/bin/x.php\0.txt"),
    ]
    for job in refused:
        with pytest.raises(NotAllowed):
            policy.resolve(job)


def test_cgi_params_small_and_large_data() -> None:
    policy = TargetPolicy([Endpoint.parse("127.0.0.1:9000")], ["/a.php"])
    executor = Executor(FpmPools(1), policy, 5.0)
    params, body = executor.fastcgi_params(Job("/a.php", data=b"abc+/="), "/a.php")
    assert params["DEFERRED_DATA"] == b"abc+/=" and body == b""
    assert params["REQUEST_METHOD"] == "POST" and params["CONTENT_LENGTH"] == "0"
    assert params["SCRIPT_FILENAME"] == "/a.php"
    assert params["PHP_VALUE"] == "display_errors=0"
    big = b"A+/=" * (INLINE_DATA_LIMIT // 4 + 1)
    params, body = executor.fastcgi_params(Job("/a.php", data=big), "/a.php")
    assert "DEFERRED_DATA" not in params
    assert params["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert body == b"DEFERRED_DATA=" + b"A%2B%2F%3D" * (INLINE_DATA_LIMIT // 4 + 1)
    assert params["CONTENT_LENGTH"] == str(len(body))
