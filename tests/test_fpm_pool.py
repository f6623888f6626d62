"""Keep-alive FastCGI pools and the executor against a real PHP-FPM."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from fastworker.callbacks import awaited
from fastworker.executor import Executor
from fastworker.fpm import (
    Endpoint,
    FpmConnectionLost,
    FpmNotStarted,
    FpmPool,
    FpmPools,
    FpmTimeout,
    FpmUnavailable,
    encode_shared_params,
)
from fastworker.job import Job
from fastworker.outcome import Result
from fastworker.targets import TargetPolicy
from helpers import read_records
from services.fpm import FpmServer
from services.process import free_loopback_port

PHP = Path(__file__).parent / "php"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return uvloop.run(coro)


def params(script: str, **extra: str) -> dict[str | bytes, str | bytes]:
    base: dict[str | bytes, str | bytes] = {
        "SCRIPT_FILENAME": str(PHP / script),
        "REQUEST_METHOD": "POST",
        "CONTENT_LENGTH": "0",
    }
    base.update(extra)
    return base


def body_of(stdout: bytes) -> bytes:
    return stdout.split(b"\r\n\r\n", 1)[1]


def test_jobs_reuse_few_connections(fpm: FpmServer) -> None:
    async def main() -> tuple[set[bytes], int]:
        pool = FpmPool(Endpoint.parse(fpm.address), max_connections=2)
        pids = set()
        for _ in range(60):
            response = await awaited(pool.request, params("pid.php"), b"", 10, b"")
            pids.add(body_of(response.stdout))
        await pool.close()
        return pids, pool.opened

    pids, opened = run(main())
    assert opened == 1  # sequential jobs all rode one kept-alive connection
    assert len(pids) == 1
    assert int(next(iter(pids))) in fpm.child_pids()


def test_concurrent_jobs_never_exceed_max_connections(fpm: FpmServer) -> None:
    async def main() -> tuple[int, int, set[bytes]]:
        pool = FpmPool(Endpoint.parse(fpm.address), max_connections=3)
        peak = 0

        async def one() -> bytes:
            nonlocal peak
            task = awaited(pool.request, params("sleep.php", DEFERRED_DATA="0.01"), b"", 10, b"")
            peak = max(peak, pool.open_connections)
            return body_of((await task).stdout)

        bodies = await asyncio.gather(*(one() for _ in range(40)))
        peak = max(peak, pool.open_connections)
        await pool.close()
        return peak, pool.opened, set(bodies)

    peak, opened, bodies = run(main())
    assert bodies == {b"ok\n"}
    assert opened == 3 and peak <= 3


def test_max_requests_churn_loses_nothing_and_runs_once(fpm_factory) -> None:
    server = fpm_factory(children=4, max_requests=5)
    datas = [f"job-{i}".encode() for i in range(200)]

    async def main() -> list[Result]:
        pools = FpmPools(4)
        policy = TargetPolicy([Endpoint.parse(server.address)], [str(PHP / "*.php")])
        executor = Executor(pools, policy, 10)
        sem = asyncio.Semaphore(4)

        async def one(data: bytes) -> Result:
            async with sem:
                return await awaited(executor.start, Job(str(PHP / "record.php"), data=data))

        results = await asyncio.gather(*(one(d) for d in datas))
        await pools.close()
        return results

    results = run(main())
    assert [r.kind for r in results] == ["ok"] * 200
    records = server.records()
    assert sorted(sha for _, sha, _ in records) == sorted(
        hashlib.sha1(d).hexdigest() for d in datas
    )
    assert len({pid for pid, _, _ in records}) >= 200 // 5  # children really were recycled


def test_shared_params_reach_php_alongside_the_own_ones(fpm: FpmServer) -> None:
    shared = encode_shared_params({"SCRIPT_FILENAME": str(PHP / "dump.php"), "SHARED_X": "s"})

    async def main() -> bytes:
        pool = FpmPool(Endpoint.parse(fpm.address), max_connections=1)
        own = {"REQUEST_METHOD": "POST", "CONTENT_LENGTH": "0", "OWN_Y": "o"}
        response = await awaited(pool.request, own, b"", 10, shared)
        await pool.close()
        return body_of(response.stdout)

    server = json.loads(run(main()))["server"]
    assert (server["SHARED_X"], server["OWN_Y"]) == ("s", "o")
    with pytest.raises(ValueError, match="one PARAMS record"):
        encode_shared_params({"A": "a" * 40_000, "B": "b" * 40_000})
    assert encode_shared_params({}) == b""


def test_nothing_listening_is_unavailable() -> None:
    async def main() -> None:
        pool = FpmPool(Endpoint("127.0.0.1", free_loopback_port()), max_connections=2)
        with pytest.raises(FpmUnavailable, match="cannot connect"):
            await awaited(pool.request, params("pid.php"), b"", 5, b"")
        assert pool.open_connections == 0

    run(main())


def test_timeout_closes_the_connection(fpm: FpmServer) -> None:
    async def main() -> None:
        pool = FpmPool(Endpoint.parse(fpm.address), max_connections=1)
        with pytest.raises(FpmTimeout):
            await awaited(pool.request, params("sleep.php", DEFERRED_DATA="3"), b"", 0.3, b"")
        await asyncio.sleep(0.05)
        assert pool.open_connections == 0
        # The pool recovers on a fresh connection (the busy child is still sleeping).
        response = await awaited(pool.request, params("pid.php"), b"", 10, b"")
        assert body_of(response.stdout).isdigit()
        await pool.close()

    run(main())


def test_connection_lost_mid_response(fpm: FpmServer) -> None:
    async def main() -> None:
        pool = FpmPool(Endpoint.parse(fpm.address), max_connections=1)
        with pytest.raises(FpmConnectionLost, match="mid-response"):
            await awaited(pool.request, params("die_mid.php"), b"", 10, b"")
        await pool.close()

    run(main())


def execute(server: FpmServer, job: Job, timeout: float = 10) -> Result:
    async def main() -> Result:
        pools = FpmPools(2)
        policy = TargetPolicy([Endpoint.parse(server.address)], [str(PHP / "*.php")])
        try:
            return await awaited(Executor(pools, policy, timeout).start, job)
        finally:
            await pools.close()

    return run(main())


def test_uncaught_exception_is_php_error_with_its_text(fpm: FpmServer) -> None:
    result = execute(fpm, Job(str(PHP / "fail.php"), data=b"order 42"))
    assert result.kind == "php_error" and result.status == 500
    assert "Uncaught RuntimeException: boom" in result.message
    assert b"RuntimeException" in result.stderr


def test_missing_script_is_404(fpm: FpmServer) -> None:
    result = execute(fpm, Job(str(PHP / "no_such_script.php"), data=b"x"))
    assert (result.kind, result.status) == ("php_error", 404)
    assert "Primary script unknown" in result.message


def test_exit_code_without_status_is_success(fpm: FpmServer) -> None:
    assert execute(fpm, Job(str(PHP / "exit3.php"), data=b"x")).kind == "ok"


@pytest.mark.parametrize("code", ["404", "503"])
def test_status_header_decides(fpm: FpmServer, code: str) -> None:
    result = execute(fpm, Job(str(PHP / "status.php"), data=code.encode()))
    assert (result.kind, result.status) == ("php_error", int(code))


def test_fatal_error_fails_even_with_display_errors_on(fpm_factory) -> None:
    server = fpm_factory(children=1, display_errors=True)
    result = execute(server, Job(str(PHP / "fatal.php"), data=b"x"))
    assert (result.kind, result.status) == ("php_error", 500)
    assert "fw_this_function_does_not_exist" in result.message


def test_large_data_travels_as_post_body(fpm: FpmServer) -> None:
    fpm.clear_records()
    data = (b"QUJD+/=" * 60_000)[:400_000]
    assert execute(fpm, Job(str(PHP / "record.php"), data=data)).kind == "ok"
    assert [(sha, size) for _, sha, size in fpm.records()] == [
        (hashlib.sha1(data).hexdigest(), len(data))
    ]


def test_more_connections_than_children_warns(fpm_factory, caplog) -> None:
    server = fpm_factory(children=2)

    async def main() -> list[str]:
        pool = FpmPool(Endpoint.parse(server.address), max_connections=4, stall_warning_after=0.3)
        sem = asyncio.Semaphore(4)

        async def one() -> str:
            async with sem:
                try:
                    sleep = params("sleep.php", DEFERRED_DATA="0.02")
                    await awaited(pool.request, sleep, b"", 1.5, b"")
                    return "ok"
                except FpmTimeout:
                    return "timeout"

        async def sweeper() -> None:
            while True:
                await asyncio.sleep(0.1)
                pool.sweep()

        sweeping = asyncio.create_task(sweeper())
        outcomes = await asyncio.gather(*(one() for _ in range(60)))
        sweeping.cancel()
        await pool.close()
        return outcomes

    with caplog.at_level(logging.WARNING, logger="fastworker.fpm"):
        outcomes = run(main())
    # The requests on connections stuck in FPM's backlog ran once the pool freed a child for
    # them (they used to wait for their timeout), and the pool keeps to what FPM serves.
    assert outcomes == ["ok"] * 60
    warnings = [r.getMessage() for r in caplog.records if "backlog" in r.getMessage()]
    assert warnings and server.address in warnings[0]
    assert "--concurrency" in warnings[0]
    assert "Keeping at most 2 connections" in warnings[0]


def request_cb(pool: FpmPool, params_: dict, timeout: float) -> asyncio.Future:
    """FpmPool.request as a future, for the tests: (response, exception)."""
    future: asyncio.Future = asyncio.get_running_loop().create_future()
    pool.request(params_, b"", timeout, b"", lambda r, e: future.set_result((r, e)))
    return future


def test_callback_requests_reuse_connections_and_survive_recycled_children(fpm_factory) -> None:
    server = fpm_factory(children=2, max_requests=1)  # every child exits after one request

    async def main() -> tuple[list, int]:
        pool = FpmPool(Endpoint.parse(server.address), max_connections=2)
        outcomes = []
        for i in range(30):
            response, exc = await request_cb(pool, params("record.php", DEFERRED_DATA=f"cb{i}"), 10)
            outcomes.append(exc or body_of(response.stdout))
            if i % 2:  # sometimes the child's close arrives first, sometimes our write does
                await asyncio.sleep(0.01)
        await pool.close()
        return outcomes, pool.opened

    outcomes, opened = run(main())
    assert outcomes == [b"ok\n"] * 30  # stale connections were retried, nothing failed
    assert opened >= 30  # each child served one request: every job needed a fresh connection
    expected = sorted(hashlib.sha1(f"cb{i}".encode()).hexdigest() for i in range(30))
    assert sorted(sha for _, sha, _ in server.records()) == expected  # each ran exactly once


def test_callback_request_timeout_and_unavailable(fpm: FpmServer) -> None:
    async def main() -> None:
        pool = FpmPool(Endpoint.parse(fpm.address), max_connections=1)
        response, exc = await request_cb(pool, params("pid.php"), 10)
        assert exc is None and body_of(response.stdout).isdigit()
        # Now an idle connection exists: the next request takes the no-task path.
        response, exc = await request_cb(pool, params("sleep.php", DEFERRED_DATA="3"), 0.3)
        assert response is None and isinstance(exc, FpmTimeout)
        assert pool.open_connections == 0 or not pool._idle  # never back on the idle list
        await pool.close()

        nowhere = FpmPool(Endpoint("127.0.0.1", free_loopback_port()), max_connections=1)
        response, exc = await request_cb(nowhere, params("pid.php"), 5)
        assert response is None and isinstance(exc, FpmUnavailable)

    run(main())


def drive(pool: FpmPool, jobs: list[dict], in_flight: int, timeout: float = 10) -> asyncio.Future:
    """Keeps `in_flight` callback requests going, as the consumer does; resolves with every
    (response, exception) in job order."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future = loop.create_future()
    outcomes: list = [None] * len(jobs)
    next_job = 0
    left = len(jobs)

    def start() -> None:
        nonlocal next_job
        index = next_job
        next_job += 1

        def answered(response: Any, exc: Any) -> None:
            nonlocal left
            outcomes[index] = (response, exc)
            left -= 1
            if next_job < len(jobs):
                start()
            elif left == 0:
                finished.set_result(outcomes)

        pool.request(jobs[index], b"", timeout, b"", answered)

    for _ in range(min(in_flight, len(jobs))):
        start()
    return finished


@pytest.mark.parametrize("max_requests", [0, 3])
def test_pipelined_requests_run_once_each(fpm_factory, max_requests: int) -> None:
    # With pm.max_requests = 3 a child exits after its third request and closes the connection
    # with the next request already written to it: that one must move, not vanish or run twice.
    server = fpm_factory(children=2, max_requests=max_requests)
    datas = [f"pipelined-{i}" for i in range(300)]

    async def main() -> tuple[list, int, int]:
        pool = FpmPool(Endpoint.parse(server.address), max_connections=2, pipeline=3)
        jobs = [params("record.php", DEFERRED_DATA=data) for data in datas]
        outcomes = await drive(pool, jobs, in_flight=6)
        await pool.close()
        return outcomes, pool.pipelined, pool.opened

    outcomes, pipelined, opened = run(main())
    assert [exc for _, exc in outcomes] == [None] * 300
    assert all(body_of(response.stdout) == b"ok\n" for response, _ in outcomes)
    expected = sorted(hashlib.sha1(d.encode()).hexdigest() for d in datas)
    assert sorted(sha for _, sha, _ in server.records()) == expected  # each ran exactly once
    if max_requests:
        assert opened >= 300 // 3  # children really were recycled under pipelined requests
        assert pipelined > 10  # (only behind a connection's first request, its child's 2nd)
    else:
        assert opened == 2
        assert pipelined > 100  # most requests were written behind another


@pytest.mark.parametrize("max_requests", [0, 3])
def test_batched_pipelined_writes_on_a_unix_socket_run_once_each(
    fpm_factory, max_requests: int
) -> None:
    # The worker's pools hold pipelined requests back while the child has more than half the
    # pipeline in hand, and write them in one go (Unix sockets only): none may be lost, run
    # twice or wait for ever, also when children end under pm.max_requests with some held.
    server = fpm_factory(children=2, max_requests=max_requests, unix_socket=True)
    datas = [f"batched-{i}" for i in range(400)]

    async def main() -> tuple[list, int, int]:
        endpoint = Endpoint.parse(server.address)
        pool = FpmPool(endpoint, max_connections=2, pipeline=4, batch_writes=True)
        assert pool.refill_at == 2
        assert FpmPool(endpoint, 2, pipeline=4).refill_at == 4  # not asked: written at once
        tcp = Endpoint("127.0.0.1", 9)
        assert FpmPool(tcp, 2, pipeline=4, batch_writes=True).refill_at == 4  # Nagle on TCP
        jobs = [params("record.php", DEFERRED_DATA=data) for data in datas]
        outcomes = await drive(pool, jobs, in_flight=8)
        await pool.close()
        return outcomes, pool.pipelined, pool.held

    outcomes, pipelined, held = run(main())
    assert [exc for _, exc in outcomes] == [None] * len(datas)
    assert all(body_of(response.stdout) == b"ok\n" for response, _ in outcomes)
    expected = sorted(hashlib.sha1(d.encode()).hexdigest() for d in datas)
    assert sorted(sha for _, sha, _ in server.records()) == expected  # each ran exactly once
    if not max_requests:
        assert held > 100  # most pipelined requests left in a batch of two


def warm(pool: FpmPool) -> Any:
    """One request, so the pool has a connection that has served (pipelining needs one)."""
    return request_cb(pool, params("pid.php"), 10)


def test_pipelined_request_timeout_runs_from_its_start(fpm: FpmServer) -> None:
    async def main() -> tuple[list, int]:
        pool = FpmPool(Endpoint.parse(fpm.address), max_connections=1, pipeline=2)
        await warm(pool)
        # Both take 0.6 s; the second waits 0.6 s behind the first, so it finishes 1.2 s after
        # it was written, more than the 1 s timeout, but 0.6 s after it started.
        first = request_cb(pool, params("sleep.php", DEFERRED_DATA="0.6"), 1.0)
        second = request_cb(pool, params("sleep.php", DEFERRED_DATA="0.6"), 1.0)
        outcomes = await asyncio.gather(first, second)
        await pool.close()
        return outcomes, pool.pipelined

    outcomes, pipelined = run(main())
    assert pipelined == 1
    assert [exc for _, exc in outcomes] == [None, None]
    assert [body_of(r.stdout) for r, _ in outcomes] == [b"ok\n", b"ok\n"]


def test_nothing_is_pipelined_behind_a_long_running_request(fpm: FpmServer) -> None:
    async def main() -> tuple[list, int, float]:
        pool = FpmPool(Endpoint.parse(fpm.address), max_connections=1, pipeline=2)
        await warm(pool)
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = request_cb(pool, params("sleep.php", DEFERRED_DATA="0.4"), 10)
        await asyncio.sleep(0.1)  # the head has now run longer than PIPELINE_MAX_HEAD_AGE
        second = request_cb(pool, params("pid.php"), 10)
        outcomes = await asyncio.gather(first, second)
        await pool.close()
        return outcomes, pool.pipelined, loop.time() - started

    outcomes, pipelined, took = run(main())
    assert pipelined == 0  # the second waited for the connection instead
    assert [exc for _, exc in outcomes] == [None, None]
    assert body_of(outcomes[1][0].stdout).isdigit()


@pytest.mark.parametrize("head", ["die_mid", "timeout"])
def test_requests_pipelined_behind_a_failed_head_run_elsewhere(fpm: FpmServer, head: str) -> None:
    data = f"behind-{head}"  # the module's FPM is shared: count only this test's runs

    async def main() -> tuple[Any, Any, int]:
        pool = FpmPool(Endpoint.parse(fpm.address), max_connections=1, pipeline=2)
        await warm(pool)
        if head == "die_mid":
            first = request_cb(pool, params("die_mid.php"), 10)
        else:
            first = request_cb(pool, params("sleep.php", DEFERRED_DATA="3"), 0.5)
        second = request_cb(pool, params("record.php", DEFERRED_DATA=data), 10)
        outcomes = await asyncio.gather(first, second)
        await pool.close()
        return outcomes[0], outcomes[1], pool.pipelined

    first, second, pipelined = run(main())
    assert pipelined == 1
    expected = FpmConnectionLost if head == "die_mid" else FpmTimeout
    assert first[0] is None and isinstance(first[1], expected)
    # The pipelined request never started on the dead connection: it ran once on a new one.
    assert second[1] is None and body_of(second[0].stdout) == b"ok\n"
    runs = [sha for _, sha, _ in fpm.records() if sha == hashlib.sha1(data.encode()).hexdigest()]
    assert len(runs) == 1


def test_stop_starting_gives_back_requests_not_yet_written(fpm: FpmServer) -> None:
    async def main() -> tuple[Any, Any, Any]:
        pool = FpmPool(Endpoint.parse(fpm.address), max_connections=1, pipeline=2)
        await warm(pool)
        running = request_cb(pool, params("sleep.php", DEFERRED_DATA="0.4"), 10)
        await asyncio.sleep(0.1)
        waiting = request_cb(pool, params("record.php", DEFERRED_DATA="not-started"), 10)
        await asyncio.sleep(0.05)
        pool.stop_starting()
        later = await request_cb(pool, params("record.php", DEFERRED_DATA="not-started"), 10)
        outcomes = await asyncio.gather(running, waiting)
        await pool.close()
        return outcomes[0], outcomes[1], later

    running, waiting, later = run(main())
    assert running[1] is None and body_of(running[0].stdout) == b"ok\n"  # it finishes
    assert waiting[0] is None and isinstance(waiting[1], FpmNotStarted)
    assert later[0] is None and isinstance(later[1], FpmNotStarted)
    never = hashlib.sha1(b"not-started").hexdigest()
    assert [sha for _, sha, _ in fpm.records() if sha == never] == []


def test_a_waiting_request_is_not_overtaken(fpm: FpmServer) -> None:
    async def main() -> list[str]:
        pool = FpmPool(Endpoint.parse(fpm.address), max_connections=1, pipeline=2)
        await warm(pool)
        order: list[str] = []
        futures: list[asyncio.Future] = []

        def tracked(name: str, params_: dict) -> None:
            future = request_cb(pool, params_, 10)
            future.add_done_callback(lambda _: order.append(name))
            futures.append(future)

        tracked("head", params("sleep.php", DEFERRED_DATA="0.2"))
        tracked("pipelined", params("pid.php"))  # the one pipeline slot is taken
        tracked("waiting", params("pid.php"))  # no slot: it waits
        # The moment the head is answered, its slot frees and a new request arrives: the one
        # that was waiting gets the slot, the newcomer queues behind it.
        futures[0].add_done_callback(lambda _: tracked("newcomer", params("pid.php")))
        await futures[0]
        await asyncio.sleep(0)
        outcomes = await asyncio.gather(*futures)
        await pool.close()
        assert [exc for _, exc in outcomes] == [None] * 4
        return order

    assert run(main()) == ["head", "pipelined", "waiting", "newcomer"]


# A child that dies while it has our request must cost an attempt every time; a child that ends
# under pm.max_requests never costs one. FPM closes a connection before answering in both cases:
# the pool tells them apart by whether the child still reads after closing its side.


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
@pytest.mark.parametrize("unix_socket", [False, True], ids=["tcp", "unix"])
def test_child_dying_on_a_reused_connection_is_lost_every_time(
    fpm_factory, pipelined: bool, unix_socket: bool
) -> None:
    server = fpm_factory(children=1, unix_socket=unix_socket)
    data = "early-reused"

    async def main() -> list[Any]:
        pool = FpmPool(Endpoint.parse(server.address), max_connections=1, pipeline=2)
        outcomes = []
        for _ in range(3):
            await warm(pool)  # the crash always lands on a connection that has served
            if pipelined:
                head = request_cb(pool, params("sleep.php", DEFERRED_DATA="0.01"), 10)
                crash = request_cb(pool, params("crash.php", DEFERRED_DATA=data), 10)
                await head
            else:
                crash = request_cb(pool, params("crash.php", DEFERRED_DATA=data), 10)
            outcomes.append(await crash)
        stats = (pool.pipelined, pool.opened)
        await pool.close()
        return [outcomes, stats]

    outcomes, (pipelined_count, opened) = run(main())
    for response, exc in outcomes:
        assert response is None and isinstance(exc, FpmConnectionLost), exc
        assert "the PHP process died before answering" in str(exc)
    if pipelined:
        assert pipelined_count == 3
    # Each crash ran once and was reported once: never moved and run again unseen.
    runs = read_records(f"{server.record_file}.fail")
    assert [sha for _, sha, _ in runs] == [hashlib.sha1(data.encode()).hexdigest()] * 3
    assert opened == 3  # one connection per crash: warmed up, then ended by the crash


@pytest.mark.parametrize("pipeline", [1, 4])
def test_recycled_children_never_fail_a_request(fpm_factory, pipeline: int) -> None:
    # pm.max_requests = 2: a child ends after every second request, always on a kept-alive
    # connection with requests written (pipelined, or right after the answer) behind its last.
    server = fpm_factory(children=2, max_requests=2)
    datas = [f"recycle-{pipeline}-{i}" for i in range(120)]

    async def main() -> tuple[list, int]:
        pool = FpmPool(Endpoint.parse(server.address), max_connections=2, pipeline=pipeline)
        jobs = [params("record.php", DEFERRED_DATA=d) for d in datas]
        outcomes = await drive(pool, jobs, in_flight=2 * pipeline)
        await pool.close()
        return outcomes, pool.opened

    outcomes, opened = run(main())
    assert [exc for _, exc in outcomes] == [None] * len(datas)
    assert all(body_of(response.stdout) == b"ok\n" for response, _ in outcomes)
    assert opened >= len(datas) // 2  # every child really ended after two requests
    expected = sorted(hashlib.sha1(d.encode()).hexdigest() for d in datas)
    assert sorted(sha for _, sha, _ in server.records()) == expected  # each ran exactly once
