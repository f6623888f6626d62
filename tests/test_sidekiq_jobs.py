"""Sidekiq's job format both ways, without Redis: what a job becomes, what a failure writes."""

from __future__ import annotations

import orjson
import pytest

from fastworker import sidekiq_jobs as jobs
from fastworker.formats import parse_event_data
from fastworker.job import BadMessage
from fastworker.outcome import Kind, Result


def job(**fields: object) -> bytes:
    base = {"class": "DeferEvent", "args": ["ZGF0YQ=="], "queue": "q", "jid": "abc", "retry": True}
    base.update(fields)
    return orjson.dumps(base)


def test_a_bundle_job_becomes_its_data_with_the_job_as_headers() -> None:
    message = jobs.message_of(job(), "q")
    assert message.body == b"ZGF0YQ==" and message.problem == ""
    assert message.headers["jid"] == "abc" and message.properties == {"message_id": "abc"}


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"{not json", "not JSON"),
        (b'"text"', "JSON str, not an object"),
        (job(**{"class": "Other"}), "class 'Other' is not one this worker runs"),
        (job(args=[]), "has no args"),
        (job(args=None), "has no args"),
        (job(args=[42]), "args[0] is a JSON int"),
    ],
)
def test_what_is_wrong_with_a_job_is_its_problem(raw: bytes, problem: str) -> None:
    message = jobs.message_of(raw, "q")
    assert problem in message.problem
    assert message.body == b""
    # Still a job object Sidekiq can read, whatever came in.
    assert isinstance(message.headers, dict) and message.headers.get("queue", "q") == "q"


def test_text_that_is_no_json_keeps_its_bytes() -> None:
    message = jobs.message_of(b"\xff\xfe raw", "q")
    assert message.headers["class"] == jobs.MALFORMED_CLASS
    assert message.headers["fastworker_raw_base64"] == "//4gcmF3"


def test_other_classes_may_be_allowed() -> None:
    assert jobs.message_of(job(**{"class": "Mine"}), "q", ("Mine",)).problem == ""


@pytest.mark.parametrize(
    ("retry", "runs"), [(True, 5), (False, 1), (0, 1), (3, 4), ("yes", 5), (-2, 1)]
)
def test_the_jobs_own_retry_option_sets_its_runs(retry: object, runs: int) -> None:
    assert jobs.max_runs({"retry": retry}, 5) == runs


def test_failures_carry_sidekiqs_fields() -> None:
    result = Result(
        Kind.PHP_ERROR, 500, message="Uncaught App\\Error\\Boom: no stock in /srv/a.php:3"
    )
    first = jobs.failed({"jid": "x"}, result, {"kind": "php_error"}, 100.0)
    assert first["retry_count"] == 0 and first["failed_at"] == 100.0
    assert "retried_at" not in first
    assert first["error_class"] == "App\\Error\\Boom"
    assert first["error_message"].startswith("Uncaught App\\Error\\Boom: no stock")
    second = jobs.failed(first, result, {}, 200.0)
    assert second["retry_count"] == 1 and second["failed_at"] == 100.0
    assert second["retried_at"] == 200.0
    assert jobs.failed_attempts(second) == 2


def test_error_class_names_the_kind_when_php_names_no_exception() -> None:
    assert jobs.error_class(Result(Kind.TIMEOUT, message="no response")) == "FastWorker::Timeout"
    assert jobs.error_class(Result(Kind.BAD_MESSAGE)) == "FastWorker::BadMessage"


def test_replay_drops_the_failure_fields() -> None:
    result = Result(Kind.PHP_ERROR, 500, message="boom")
    dead = jobs.failed(orjson.loads(job()), result, {"kind": "php_error"}, 1.0)
    fresh = jobs.replayable(dead)
    assert not set(fresh) & {*jobs.FAILURE_FIELDS, jobs.ERROR}
    assert fresh["args"] == ["ZGF0YQ=="] and fresh["enqueued_at"] > 1.0


def test_event_data_runs_with_the_default_script() -> None:
    parsed = parse_event_data(b"ZGF0YQ==", "/srv/dispatch.php")
    assert parsed.script == "/srv/dispatch.php" and parsed.data == b"ZGF0YQ=="


def test_a_whole_bundle_message_as_args0_is_read_as_one() -> None:
    body = b"dispatch_path: /srv/other.php\nfastcgi_host: localhost\nfastcgi_port: 9000\n\nZGF0YQ=="
    parsed = parse_event_data(body, "/srv/dispatch.php")
    assert parsed.script == "/srv/other.php" and parsed.data == b"ZGF0YQ=="
    assert str(parsed.endpoint) == "127.0.0.1:9000"


@pytest.mark.parametrize("body", [b"", b"  \n", b"caf\xc3"])
def test_event_data_that_cannot_run_is_refused(body: bytes) -> None:
    with pytest.raises(BadMessage):
        parse_event_data(body, "/srv/dispatch.php")
