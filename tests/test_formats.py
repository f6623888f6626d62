"""Message formats, the allow-lists and the CGI params built from a job (no services needed)."""

from __future__ import annotations

import datetime
import decimal
import urllib.parse

import orjson
import pytest

from fastworker import formats
from fastworker.executor import INLINE_DATA_LIMIT, Executor
from fastworker.formats import (
    HEADER_PARAMS_MAX,
    HEADER_VALUE_MAX,
    TARGET_CACHE_BLOCK,
    TARGET_CACHE_ENTRIES,
    check_param_name,
    parse_bundle,
    parse_json,
    parse_raw,
    parser_for,
)
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


def test_bundle_header_block_cache_is_bounded_in_bytes() -> None:
    formats._TARGETS.clear()
    typical = bundle_message("ZGF0YQ==", "/srv/app/dispatch.php")
    parse_bundle(typical, "/default.php")
    assert list(formats._TARGETS) == [typical[: typical.find(b"\n\n")]]
    pad = b"x-pad: " + b"a" * 1_000_000 + b"\n"
    huge = pad + typical
    for _ in range(3):
        assert parse_bundle(huge, "/default.php").script == "/srv/app/dispatch.php"
    assert all(len(head) <= TARGET_CACHE_BLOCK for head in formats._TARGETS)
    assert len(formats._TARGETS) == 1
    for i in range(TARGET_CACHE_ENTRIES + 10):
        parse_bundle(b"dispatch_path: /s%d.php\n\nZGF0YQ==" % i, "/default.php")
    assert len(formats._TARGETS) == TARGET_CACHE_ENTRIES
    assert sum(map(len, formats._TARGETS)) <= TARGET_CACHE_ENTRIES * TARGET_CACHE_BLOCK
    assert parse_bundle(typical, "/default.php").script == "/srv/app/dispatch.php"
    assert parser_for("bundle") is parse_bundle


def test_json_envelope() -> None:
    job = parse_json(
        b'{"script": "/a.php", "params": {"JOB_PARAM_TENANT": "7"}, "body": "{}",'
        b' "fpm": "127.0.0.1:9002"}',
        "/d.php",
    )
    assert (job.script, job.params, job.body) == ("/a.php", {"JOB_PARAM_TENANT": "7"}, b"{}")
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


def _json_params(params: dict[str, str]) -> bytes:
    return orjson.dumps({"params": params})


@pytest.mark.parametrize(
    "name", ["PATH", "LD_PRELOAD", "APP_ENV", "APP_DEBUG", "DATABASE_URL", "TENANT", "job_param_x"]
)
def test_json_params_are_an_allow_list(name: str) -> None:
    """Only JOB_PARAM_* by default: no message reconfigures the app through $_SERVER."""
    with pytest.raises(BadMessage, match=f"{name}.*--allow-param"):
        parse_json(_json_params({name: "x"}), "/d.php")
    with pytest.raises(BadMessage, match="--allow-param"):
        parser_for("json")(_json_params({name: "x"}), "/d.php", {}, {})
    assert parse_json(_json_params({"JOB_PARAM_TENANT": "7"}), "/d.php").params == {
        "JOB_PARAM_TENANT": "7"
    }


def test_allow_param_globs_add_names_but_never_reserved_ones() -> None:
    parse = parser_for("json", ["TENANT", "APP_*", "*_ID"])
    job = parse(_json_params({"TENANT": "t", "APP_ENV": "prod", "ORDER_ID": "9"}), "/d.php", {}, {})
    assert job.params == {"TENANT": "t", "APP_ENV": "prod", "ORDER_ID": "9"}
    with pytest.raises(BadMessage, match="not allowed"):
        parse(_json_params({"tenant": "t"}), "/d.php", {}, {})  # globs are case-sensitive
    everything = parser_for("json", ["*"])
    assert everything(_json_params({"PATH": "/x"}), "/d.php", {}, {}).params == {"PATH": "/x"}
    for name in [
        "PHP_VALUE",
        "PHP_ADMIN_VALUE",
        "SCRIPT_FILENAME",
        "DOCUMENT_ROOT",
        "HTTP_HOST",
        "DEFERRED_DATA",
        "FASTWORKER_PID",
        "REQUEST_METHOD",
        "php_value",
    ]:
        with pytest.raises(BadMessage, match="reserved"):
            everything(_json_params({name: "x"}), "/d.php", {}, {})
        with pytest.raises(BadMessage, match="reserved"):
            check_param_name(name, [name, "*"])
        with pytest.raises(ValueError, match="reserved"):
            parser_for("json", [name])  # refused at startup, before any message
    with pytest.raises(BadMessage, match="form"):
        everything(_json_params({"has space": "x"}), "/d.php", {}, {})


@pytest.mark.parametrize("glob", ["", "PHP_VALUE", "SCRIPT_FILENAME", "has space"])
def test_allow_param_refuses_globs_that_allow_nothing(glob: str) -> None:
    with pytest.raises(ValueError, match="--allow-param"):
        parser_for("json", [glob])


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
        {"content_type": "application/x-thing", "message_id": "m1"},
        {"PHP_VALUE": "auto_prepend_file=/etc/passwd", "x-a": 1},
    )
    assert job.body == b"\x00payload" and job.content_type == "application/x-thing"
    assert job.params["AMQP_MESSAGE_ID"] == "m1"
    assert job.params["AMQP_HEADER_PHP_VALUE"] == "auto_prepend_file=/etc/passwd"
    assert job.params["AMQP_HEADER_X_A"] == "1"
    assert "PHP_VALUE" not in job.params
    assert parser_for("raw") is parse_raw


def test_raw_maps_scalar_headers_and_skips_the_rest() -> None:
    when = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
    headers = {
        "tenant-id": "t7",
        "Trace.Id": b"abc",
        "bad-bytes": b"\xff\xfe",
        "count": 3,
        "ratio": 0.5,
        "on": True,
        "off": False,
        "when": when,
        "amount": decimal.Decimal("12.50"),
        "café": "x",
        "nested": {"a": "b"},
        "list": ["a", 1],
        "void": None,
        "x-fastworker-attempts": 2,
        "X-FastWorker-Error": "{}",
        "x-fastworker-queue": "q",
    }
    params = parser_for("raw")(b"", "/d.php", {}, headers).params
    assert params == {
        "AMQP_HEADER_TENANT_ID": "t7",
        "AMQP_HEADER_TRACE_ID": "abc",
        "AMQP_HEADER_BAD_BYTES": "\ufffd\ufffd",
        "AMQP_HEADER_COUNT": "3",
        "AMQP_HEADER_RATIO": "0.5",
        "AMQP_HEADER_ON": "1",
        "AMQP_HEADER_OFF": "0",
        "AMQP_HEADER_WHEN": str(when),
        "AMQP_HEADER_AMOUNT": "12.50",
        "AMQP_HEADER_CAF_": "x",
    }


def test_raw_headers_are_capped_and_never_fail() -> None:
    many = {f"h{i}": str(i) for i in range(HEADER_PARAMS_MAX + 50)}
    params = parse_raw(b"", "/d.php", {}, many).params
    assert len(params) == HEADER_PARAMS_MAX
    assert params["AMQP_HEADER_H0"] == "0" and "AMQP_HEADER_H64" not in params

    big = parse_raw(
        b"",
        "/d.php",
        {},
        {
            "big": "x" * 1_000_000,
            "big-bytes": b"y" * 1_000_000,
            "wide": "é" * HEADER_VALUE_MAX,  # 2 bytes each: cut on a character boundary
            "surrogate": "a\udc80b",
            "huge-int": 10**5000,  # str() refuses it: skipped, not raised
            "n" * 300: "long name",
            "same": "first",
            "SAME": "second",
        },
    ).params
    assert big["AMQP_HEADER_BIG"] == "x" * HEADER_VALUE_MAX
    assert big["AMQP_HEADER_BIG_BYTES"] == "y" * HEADER_VALUE_MAX
    assert big["AMQP_HEADER_WIDE"] == "é" * (HEADER_VALUE_MAX // 2)
    assert big["AMQP_HEADER_SURROGATE"] == "a?b"
    assert "AMQP_HEADER_HUGE_INT" not in big
    assert big["AMQP_HEADER_" + "N" * 100] == "long name"
    assert big["AMQP_HEADER_SAME"] == "first"
    for value in big.values():
        assert len(value.encode()) <= HEADER_VALUE_MAX
    assert parse_raw(b"", "/d.php", {}, None).params == {}


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
    # `+` means a space in a form value and must be escaped; `/` and `=` may stay as they are.
    assert body == b"DEFERRED_DATA=" + b"A%2B/=" * (INLINE_DATA_LIMIT // 4 + 1)
    assert urllib.parse.parse_qs(body, strict_parsing=True) == {b"DEFERRED_DATA": [big]}
    assert params["CONTENT_LENGTH"] == str(len(body))
