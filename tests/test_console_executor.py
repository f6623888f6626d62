"""`--executor cli`: each bundle job as `php_bin console_path fervo:deferred-event:dispatch DATA`.

Real php8.2-cli runs tests/php/console.php, a stand-in for a Symfony console; the worker tests
run it end to end through real RabbitMQ. First the executor alone, then the worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop

from fastworker.callbacks import awaited
from fastworker.console_executor import (
    MAX_ARG_STRLEN,
    ConsoleExecutor,
    ConsoleTargets,
    check_programs,
)
from fastworker.formats import parse_bundle, parse_bundle_console, parser_for
from fastworker.job import BadMessage, ConsoleJob, Job
from fastworker.message import NotStarted
from fastworker.outcome import Kind, Result
from helpers import bundle_message, read_records, wait_for
from services import PHP_DIR, ROOT
from services.rabbitmq import amqp_get_all, amqp_publish, amqp_queue_count
from services.worker import Workers

PHP = "/usr/bin/php"
CONSOLE = str(PHP_DIR / "console.php")
UNUSED_FPM = "127.0.0.1:9"  # --executor cli never connects to FPM


def sha(data: bytes | str) -> str:
    return hashlib.sha1(data.encode() if isinstance(data, str) else data).hexdigest()


@pytest.fixture
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """FW_RECORD_FILE for console.php, which inherits the environment of whoever starts it."""
    path = tmp_path / "records.log"
    monkeypatch.setenv("FW_RECORD_FILE", str(path))
    return path


def executor(**options: Any) -> ConsoleExecutor:
    targets = ConsoleTargets(
        options.pop("php_bin", PHP),
        options.pop("console", CONSOLE),
        options.pop("allow_php_bin", ()),
        options.pop("allow_console", ()),
    )
    return ConsoleExecutor(
        targets,
        options.pop("job_timeout", 20.0),
        options.pop("concurrency", 2),
        options.pop("max_output_head", 65536),
    )


def job(data: str | bytes, php_bin: str | None = None, console: str | None = None) -> Job:
    raw = data.encode() if isinstance(data, str) else data
    return ConsoleJob("/unused.php", None, raw, {}, b"", "", php_bin, console)


def run_jobs(jobs: list[Job], **options: Any) -> list[Result]:
    """Runs `jobs` at once on one executor (under uvloop, as the worker does); their results."""

    async def main() -> list[Result]:
        ex = executor(**options)
        try:
            return await asyncio.gather(*(awaited(ex.start, j) for j in jobs))
        finally:
            await ex.close()

    return uvloop.run(main())


def run_one(data: str | bytes, **options: Any) -> Result:
    php_bin, console = options.pop("job_php_bin", None), options.pop("job_console", None)
    return run_jobs([job(data, php_bin, console)], **options)[0]


# --------------------------------------------------------------------------- the executor alone


def test_success_runs_the_exact_command(records: Path) -> None:
    result = run_one("ok:first")
    assert result.kind is Kind.OK
    ((_, digest, size),) = read_records(records)
    assert (digest, size) == (sha("ok:first"), len("ok:first"))  # argv[2] is the data, whole


def test_exit_status_and_stderr_make_a_php_error(records: Path) -> None:
    exited = run_one("exit:3")
    assert exited.kind is Kind.PHP_ERROR
    assert exited.message == "exit status 3: console exiting with 3"
    assert exited.stderr == b"console exiting with 3\n"
    assert exited.endpoint == f"{PHP} {CONSOLE}"
    thrown = run_one("throw:order 7")
    assert thrown.kind is Kind.PHP_ERROR
    assert thrown.message.startswith(
        "exit status 255: Uncaught RuntimeException: listener failed: order 7 in "
    )
    assert b"Stack trace" in thrown.stderr


def test_killed_by_a_signal_is_lost(records: Path) -> None:
    result = run_one("kill:9")
    assert result.kind is Kind.LOST
    assert result.message.startswith("killed by SIGKILL (9)")


def test_output_heads_are_bounded_and_the_rest_discarded(records: Path) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ok, failed = run_jobs([job("print:48:0"), job("print:48:5")], max_output_head=4096)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert ok.kind is Kind.OK
    assert failed.kind is Kind.PHP_ERROR
    assert len(failed.stderr) == 4096 and len(failed.stdout_head) <= 4096
    size = 48 << 20
    assert f"(output cut, kept stderr 4096 of {size} bytes, stdout 4096 of {size} bytes)" in (
        failed.message
    )
    assert grown_mib < 40, f"{grown_mib:.0f} MiB more for 192 MiB of output"


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_timeout_kills_the_whole_process_group(records: Path) -> None:
    started = time.monotonic()
    result = run_one("group:30", job_timeout=1.0)
    assert time.monotonic() - started < 5
    assert result.kind is Kind.TIMEOUT
    assert result.message == "no exit within 1 s; its process group was killed"
    php_pid, sleep_pid = map(int, Path(f"{records}.pids").read_text().split())
    wait_for(lambda: not pid_alive(php_pid) and not pid_alive(sleep_pid), 5, what="both dead")
    assert read_records(records) == []


def test_at_most_concurrency_processes_in_arrival_order(records: Path) -> None:
    datas = [f"sleep:0.4:{i}" for i in range(6)]
    started = time.monotonic()
    results = run_jobs([job(d) for d in datas], concurrency=2)
    elapsed = time.monotonic() - started
    assert all(r.kind is Kind.OK for r in results)
    assert elapsed >= 3 * 0.4  # three waves of two: never more than two at once
    finished = [digest for _, digest, _ in read_records(records)]
    order = {sha(d): i for i, d in enumerate(datas)}
    waves = [sorted(order[d] for d in finished[k : k + 2]) for k in (0, 2, 4)]
    assert waves == [[0, 1], [2, 3], [4, 5]]


def test_stop_starting_gives_waiting_jobs_back_and_close_kills_running_ones(
    records: Path,
) -> None:
    async def main() -> tuple[list[Any], float]:
        ex = executor(concurrency=1)
        answers: list[Any] = []
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def answer(result: Result | None, exc: BaseException | None) -> None:
            answers.append(result or exc)
            if len(answers) == 4 and not done.done():
                done.set_result(None)

        for data in ("sleep:30", "ok:a", "ok:b"):
            ex.start(job(data), answer)
        await asyncio.sleep(0.3)
        ex.stop_starting()
        ex.start(job("ok:c"), answer)  # after the stop: not started either
        started = time.monotonic()
        await ex.close()
        await asyncio.wait_for(done, 5)
        return answers, time.monotonic() - started

    answers, closing = uvloop.run(main())
    assert [type(a) for a in answers[:3]] == [NotStarted] * 3
    assert isinstance(answers[3], Result) and answers[3].kind is Kind.LOST
    assert answers[3].message == "killed: the worker stopped before the job finished"
    assert closing < 3
    assert read_records(records) == []


def test_refused_targets_never_run(records: Path, tmp_path: Path) -> None:
    outside = tmp_path / "console.php"
    outside.write_text("<?php echo 'should not run';")
    results = run_jobs(
        [
            job("ok:1", php_bin="/bin/sh"),
            job("ok:2", php_bin="php"),
            job("ok:3", console=str(outside)),
            job("ok:4", console=f"{PHP_DIR}/../../tests/php/record.php"),
            job("ok:5", console=f"{PHP_DIR}/../php/console.php"),  # normalized: allowed
        ]
    )
    assert [r.kind for r in results] == [Kind.NOT_ALLOWED] * 4 + [Kind.OK]
    assert "php_bin '/bin/sh' matches no --allow-php-bin glob (/usr/bin/php)" in results[0].message
    assert "is not an absolute path" in results[1].message
    assert "matches no --allow-console glob" in results[2].message
    assert f"'{PHP_DIR}/record.php'" in results[3].message
    assert [digest for _, digest, _ in read_records(records)] == [sha("ok:5")]


def test_a_program_that_cannot_run_is_a_counted_failure(records: Path, tmp_path: Path) -> None:
    not_executable = tmp_path / "php"
    not_executable.write_text("#!/bin/sh\n")
    results = run_jobs(
        [job("ok:1", php_bin="/usr/bin/no-such-php"), job("ok:2", php_bin=str(not_executable))],
        allow_php_bin=("/usr/bin/*", f"{tmp_path}/*"),
    )
    assert [r.kind for r in results] == [Kind.PHP_ERROR, Kind.PHP_ERROR]  # both count
    assert results[0].message == "cannot run /usr/bin/no-such-php: No such file or directory"
    assert results[1].message == f"cannot run {not_executable}: Permission denied"
    missing_console = run_one(
        "ok:3", job_console=f"{PHP_DIR}/no_such_console.php", allow_console=(f"{PHP_DIR}/*",)
    )
    assert missing_console.kind is Kind.PHP_ERROR
    assert missing_console.message.startswith("exit status 1: Could not open input file")


def test_data_a_command_line_cannot_carry_is_a_bad_message(records: Path) -> None:
    longest = "ok:" + "a" * (MAX_ARG_STRLEN - 1 - 3)
    results = run_jobs(
        [job(longest), job(longest + "a"), job("--env=prod"), job(b"ok:\0x"), job("-")]
    )
    assert [r.kind for r in results] == [Kind.OK] + [Kind.BAD_MESSAGE] * 4
    assert "too long for a command-line argument" in results[1].message
    assert [size for _, _, size in read_records(records)] == [MAX_ARG_STRLEN - 1]


@pytest.mark.parametrize(
    "data",
    [
        "ok:x; touch {marker}",
        "ok:$(touch {marker})",
        "ok:`touch {marker}`",
        "ok:x' && touch {marker} '",
    ],
)
def test_the_data_never_reaches_a_shell(records: Path, tmp_path: Path, data: str) -> None:
    marker = tmp_path / "shell-ran"
    text = data.format(marker=marker)
    assert run_one(text).kind is Kind.OK
    assert [digest for _, digest, _ in read_records(records)] == [sha(text)]
    assert not marker.exists()


def test_the_environment_is_the_workers(records: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FW_CONSOLE_TEST", "inherited")
    assert run_one("env:FW_CONSOLE_TEST").kind is Kind.OK
    assert [d for _, d, _ in read_records(records)] == [sha("FW_CONSOLE_TEST=inherited")]


def test_a_job_without_bundle_data_is_refused() -> None:
    (result,) = run_jobs([Job("/srv/a.php")])
    assert result.kind is Kind.BAD_MESSAGE


def test_console_targets_need_a_console_and_programs_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--executor cli needs --console PATH"):
        ConsoleTargets(PHP, None)
    ConsoleTargets(PHP, None, allow_console=["/srv/*/console"])  # messages name it
    with pytest.raises(BadMessage, match="names no console_path"):
        ConsoleTargets(PHP, None, allow_console=["/srv/*/console"]).resolve(job("ok"))
    check_programs(PHP, CONSOLE)
    check_programs(PHP, None)
    with pytest.raises(ValueError, match="--php-bin /usr/bin/nope: not an executable file"):
        check_programs("/usr/bin/nope", CONSOLE)
    with pytest.raises(ValueError, match="--php-bin php: not an executable file"):
        check_programs("php", CONSOLE)
    plain = tmp_path / "php"
    plain.write_text("")
    plain.chmod(stat.S_IRUSR)
    with pytest.raises(ValueError, match="not an executable file"):
        check_programs(str(plain), CONSOLE)
    with pytest.raises(ValueError, match=f"--console {tmp_path}/nope: not a readable file"):
        check_programs(PHP, f"{tmp_path}/nope")


BODIES = [
    bundle_message("ZGF0YQ==", "/srv/app/dispatch.php", "localhost", 9000),
    bundle_message("ZGF0YQ==", "/srv/app/dispatch.php", "localhost", 9000, "", ""),
    bundle_message("x", "", "", "", "/opt/php/bin/php", "/srv/app/bin/console"),
    b"php_bin: /usr/bin/php\r\nconsole_path:/c\r\n\r\nx",
    b"no blank line",
    b"php_bin /usr/bin/php\n\nx",
    b"console_path: /c\n\n  ",
    b"fastcgi_host: h\n\nx",
]


@pytest.mark.parametrize("body", BODIES)
def test_the_console_parser_reads_bodies_as_the_fastcgi_one_does(body: bytes) -> None:
    def outcome(parse: Callable[..., Job]) -> Any:
        try:
            return parse(body, "/default.php")
        except BadMessage as exc:
            return str(exc)

    fastcgi, console = outcome(parse_bundle), outcome(parse_bundle_console)
    if isinstance(fastcgi, str):
        assert console == fastcgi
        return
    assert (console.script, console.endpoint, console.data) == (
        fastcgi.script,
        fastcgi.endpoint,
        fastcgi.data,
    )
    assert type(fastcgi) is Job and (fastcgi.php_bin, fastcgi.console_path) == (None, None)
    head = body[: body.find(b"\n\n")].decode()
    names = {
        line.partition(":")[0].strip(): line.partition(":")[2].strip() for line in head.splitlines()
    }
    assert (console.php_bin, console.console_path) == (
        names.get("php_bin") or None,
        names.get("console_path") or None,
    )


def test_only_the_bundle_format_has_a_console() -> None:
    assert parser_for("bundle", console=True) is parse_bundle_console
    assert parser_for("bundle") is parse_bundle
    for name in ("json", "raw"):
        with pytest.raises(ValueError, match=f"bundle messages only, not --format {name}"):
            parser_for(name, console=True)


# --------------------------------------------------------------------------- through the worker


def cli_args(url: str, queue: str, *extra: str) -> list[str]:
    return [
        "--amqp-url", url,
        "--queue", queue,
        "--fpm", UNUSED_FPM,
        "--executor", "cli",
        "--console", CONSOLE,
        *extra,
    ]  # fmt: skip


def console_message(data: str, console: str = CONSOLE, php_bin: str = PHP) -> bytes:
    """A bundle message as the bundle sends it, all five headers, for the console to run."""
    return bundle_message(data, "/srv/app/dispatch.php", "localhost", 9000, php_bin, console)


def test_jobs_run_end_to_end_through_the_worker(
    workers: Workers, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    record_file = tmp_path / "records.log"
    datas = [f"ok:{i}" for i in range(30)]
    amqp_publish(rabbitmq_url, queue_name, [console_message(d) for d in datas])
    worker = workers.start(
        cli_args(rabbitmq_url, queue_name, "--concurrency", "3"),
        env={"FW_RECORD_FILE": str(record_file)},
    )
    wait_for(lambda: len(read_records(record_file)) >= 30, 60, what="30 console jobs")
    wait_for(lambda: amqp_queue_count(rabbitmq_url, queue_name) == 0, 10, what="drained")
    assert sorted(d for _, d, _ in read_records(record_file)) == sorted(map(sha, datas))
    assert len({pid for pid, _, _ in read_records(record_file)}) == 30  # a process per job
    assert amqp_queue_count(rabbitmq_url, f"{queue_name}.failed") == 0
    assert "--executor cli: at most 3 console processes = 3 jobs in flight" in worker.log()
    assert worker.terminate() == 0


def test_failing_job_is_retried_then_dead_lettered_with_its_stderr(
    workers: Workers, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    record_file = tmp_path / "records.log"
    bad = console_message("throw:order 7 failed")
    amqp_publish(rabbitmq_url, queue_name, [bad, console_message("ok:fine")])
    retries = ["--max-attempts", "3", "--retry-delay", "0.2", "--retry-max-delay", "0.4"]
    workers.start(
        cli_args(rabbitmq_url, queue_name, *retries), env={"FW_RECORD_FILE": str(record_file)}
    )
    failed = f"{queue_name}.failed"
    wait_for(lambda: amqp_queue_count(rabbitmq_url, failed) == 1, 60, what="the dead letter")
    (dead,) = amqp_get_all(rabbitmq_url, failed)
    assert dead.body == bad
    error = orjson.loads(dead.header.properties.headers["x-fastworker-error"])
    assert error["kind"] == "php_error" and error["attempts"] == 3
    assert error["message"].startswith(
        "exit status 255: Uncaught RuntimeException: listener failed: order 7 failed in "
    )
    assert (
        "PHP Fatal error:  Uncaught RuntimeException: listener failed: order 7" in (error["stderr"])
    )
    assert error["endpoint"] == f"{PHP} {CONSOLE}"
    assert len(read_records(f"{record_file}.fail")) == 3  # it ran three times
    assert [d for _, d, _ in read_records(record_file)] == [sha("ok:fine")]


def test_timeout_and_refused_targets_are_dead_lettered(
    workers: Workers, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    record_file = tmp_path / "records.log"
    evil = tmp_path / "evil.php"
    evil.write_text("<?php file_put_contents('" + str(tmp_path / "evil-ran") + "', 'x');")
    refused = [
        console_message("ok:evil", console=str(evil)),
        console_message("ok:sh", php_bin="/bin/sh"),
    ]
    slow = console_message("group:30")
    amqp_publish(rabbitmq_url, queue_name, [*refused, slow, console_message("ok:good")])
    workers.start(
        cli_args(rabbitmq_url, queue_name, "--job-timeout", "1", "--max-attempts", "1"),
        env={"FW_RECORD_FILE": str(record_file)},
    )
    failed = f"{queue_name}.failed"
    wait_for(lambda: amqp_queue_count(rabbitmq_url, failed) == 3, 60, what="3 dead letters")
    kinds = {
        m.body: m.header.properties.headers["x-fastworker-error-kind"]
        for m in amqp_get_all(rabbitmq_url, failed)
    }
    assert kinds == {refused[0]: "not_allowed", refused[1]: "not_allowed", slow: "timeout"}
    assert not (tmp_path / "evil-ran").exists()
    php_pid, sleep_pid = map(int, Path(f"{record_file}.pids").read_text().split())
    wait_for(lambda: not pid_alive(php_pid) and not pid_alive(sleep_pid), 5, what="killed")
    assert [d for _, d, _ in read_records(record_file)] == [sha("ok:good")]


def test_sigterm_lets_running_processes_finish_and_requeues_the_rest(
    workers: Workers, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    record_file = tmp_path / "records.log"
    amqp_publish(rabbitmq_url, queue_name, [console_message(f"group:1.5:{i}") for i in range(8)])
    worker = workers.start(
        cli_args(rabbitmq_url, queue_name, "--concurrency", "2", "--shutdown-timeout", "20"),
        env={"FW_RECORD_FILE": str(record_file)},
    )
    wait_for(lambda: count_lines(f"{record_file}.pids") == 2, 10, what="two running")
    started = time.monotonic()
    assert worker.stop(signal.SIGTERM) == 0, worker.log()
    assert time.monotonic() - started < 10
    assert len(read_records(record_file)) == 2  # the two running finished...
    assert amqp_queue_count(rabbitmq_url, queue_name) == 6  # ...and the rest went back
    assert amqp_queue_count(rabbitmq_url, f"{queue_name}.failed") == 0


def test_processes_still_running_after_the_shutdown_timeout_are_killed(
    workers: Workers, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    record_file = tmp_path / "records.log"
    amqp_publish(rabbitmq_url, queue_name, [console_message(f"group:30:{i}") for i in range(4)])
    worker = workers.start(
        cli_args(rabbitmq_url, queue_name, "--concurrency", "2", "--shutdown-timeout", "1"),
        env={"FW_RECORD_FILE": str(record_file)},
    )
    wait_for(lambda: count_lines(f"{record_file}.pids") == 2, 10, what="two running")
    started = time.monotonic()
    assert worker.stop(signal.SIGTERM) == 0, worker.log()
    assert time.monotonic() - started < 8
    pids = [int(pid) for pid in Path(f"{record_file}.pids").read_text().split()]
    wait_for(lambda: not any(map(pid_alive, pids)), 5, what="every process killed")
    # The two killed jobs and the two never started are all back, none retried or dead.
    assert amqp_queue_count(rabbitmq_url, queue_name) == 4
    assert amqp_queue_count(rabbitmq_url, f"{queue_name}.failed") == 0
    assert read_records(record_file) == []


def count_lines(path: str | Path) -> int:
    try:
        return len(Path(path).read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_shell_syntax_in_the_data_runs_no_shell_end_to_end(
    workers: Workers, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    record_file = tmp_path / "records.log"
    marker = tmp_path / "shell-ran"
    datas = [f"ok:x; touch {marker}", f"ok:$(touch {marker})", f"ok:x|touch {marker}"]
    amqp_publish(rabbitmq_url, queue_name, [console_message(d) for d in datas])
    workers.start(cli_args(rabbitmq_url, queue_name), env={"FW_RECORD_FILE": str(record_file)})
    wait_for(lambda: len(read_records(record_file)) == 3, 30, what="3 jobs")
    assert sorted(d for _, d, _ in read_records(record_file)) == sorted(map(sha, datas))
    assert not marker.exists()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fastworker",
            "--amqp-url",
            "amqp://guest:guest@127.0.0.1:1/",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--executor", "cli"], "--executor cli needs --console PATH"),
        (
            ["--executor", "cli", "--console", "/nowhere/console"],
            "--console /nowhere/console: not a readable file",
        ),
        (
            ["--executor", "cli", "--console", CONSOLE, "--php-bin", "/nowhere/php"],
            "--php-bin /nowhere/php: not an executable file",
        ),
        (
            ["--executor", "cli", "--console", CONSOLE, "--format", "json"],
            "--executor cli runs bundle messages only, not --format json",
        ),
    ],
)
def test_the_worker_refuses_to_start_with_a_bad_console_setup(args: list[str], error: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"fastworker: {error}")
