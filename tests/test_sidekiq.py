"""The Sidekiq backend end to end: jobs pushed by the real Sidekiq client (Ruby), run through a
real PHP-FPM by `fastworker --backend sidekiq`, failures read back with Sidekiq's own API."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fastworker import sidekiq_store
from helpers import order_placed_data, read_records, wait_for
from services import PHP_DIR, SRC_DIR
from services.fpm import FpmServer
from services.sidekiq import sidekiq_api, sidekiq_push
from services.worker import Worker, Workers


@pytest.fixture
def r(sidekiq_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(sidekiq_url)
    yield client
    client.close()


def sidekiq_args(url: str, queue: str, fpm: FpmServer, script: str, *extra: str) -> list[str]:
    return [
        "--backend",
        "sidekiq",
        "--redis-url",
        url,
        "--queue",
        queue,
        "--fpm",
        fpm.address,
        "--script",
        str(PHP_DIR / script),
        "--stats-interval",
        "0",
        *extra,
    ]


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def inprogress_keys(r: redis.Redis) -> list[bytes]:
    return sorted(r.keys("fastworker:inprogress:*"))


def test_jobs_pushed_by_the_sidekiq_client_run_once_each(
    sidekiq_url: str, r: redis.Redis, fpm: FpmServer, workers: Workers
) -> None:
    fpm.clear_records()
    datas = [order_placed_data(i, f"sidekiq {i}") for i in range(300)]
    assert sidekiq_push(sidekiq_url, "orders", datas) == 300
    worker = workers.start(sidekiq_args(sidekiq_url, "orders", fpm, "record.php"))
    wait_for(lambda: len(fpm.records()) >= 300, timeout=60, what="300 jobs run")
    time.sleep(0.5)
    runs = Counter(digest for _, digest, _ in fpm.records())
    assert runs == Counter(sha1(d) for d in datas)
    # An empty list is no key in Redis: every settled job left the in-progress list.
    wait_for(lambda: inprogress_keys(r) == [], what="in-progress list emptied")
    api = sidekiq_api(sidekiq_url, "orders")
    assert api["queue_size"] == 0 and api["dead"] == [] and api["retry"] == []
    assert api["processed"] == 300
    assert "queue:orders" in worker.log()
    assert workers.close() == [0]
    # A clean stop leaves nothing of the worker behind: no list, no heartbeat.
    assert inprogress_keys(r) == [] and r.keys("fastworker:heartbeat:*") == []
    assert r.smembers(sidekiq_store.INPROGRESS_LISTS) == set()


def test_failing_jobs_retry_then_land_in_sidekiqs_dead_set(
    sidekiq_url: str, fpm: FpmServer, workers: Workers
) -> None:
    good = [order_placed_data(i, f"fine {i}") for i in range(20)]
    bad = [order_placed_data(100 + i, f"FAIL {i}") for i in range(3)]
    sidekiq_push(sidekiq_url, "q", good + bad)
    workers.start(
        sidekiq_args(
            sidekiq_url, "q", fpm, "listener.php", "--max-attempts", "3", "--retry-delay", "0.2"
        )
    )
    api = wait_for(
        lambda: (a := sidekiq_api(sidekiq_url, "q"))["dead"] and len(a["dead"]) == 3 and a,
        timeout=60,
        interval=0.5,
        what="3 dead jobs",
    )
    by_data = {job["args"][0]: job for job in api["dead"]}
    assert set(by_data) == set(bad)
    for data, job in by_data.items():
        assert job["klass"] == "DeferEvent" and job["queue"] == "q"
        assert f"listener failed for event {sha1(data)}" in job["error_message"]
        assert job["error_class"] == "RuntimeException"
        assert job["retry_count"] == 2  # 3 runs: the first failure is retry_count 0
        assert job["failed_at"] <= job["retried_at"]
    assert api["retry"] == [] and api["queue_size"] == 0
    assert api["failed"] == 9  # every failed run, as Sidekiq counts them


def test_a_jobs_own_retry_option_wins_over_max_attempts(
    sidekiq_url: str, fpm: FpmServer, workers: Workers, tmp_path: Path
) -> None:
    no_retry = order_placed_data(1, "FAIL no retry")
    three = order_placed_data(2, "FAIL three retries")
    sidekiq_push(sidekiq_url, "q", [no_retry], retry=False)
    sidekiq_push(sidekiq_url, "q", [three], retry=3)
    workers.start(
        sidekiq_args(
            sidekiq_url,
            "q",
            fpm,
            "listener.php",
            "--max-attempts",
            "2",
            "--retry-delay",
            "0.1",
            "--retry-max-delay",
            "0.1",
        )
    )
    api = wait_for(
        lambda: len((a := sidekiq_api(sidekiq_url, "q"))["dead"]) == 2 and a,
        timeout=60,
        interval=0.5,
        what="2 dead jobs",
    )
    counts = {job["args"][0]: job["retry_count"] for job in api["dead"]}
    assert counts == {no_retry: 0, three: 3}  # 1 run, and 4 runs (3 retries)


def test_malformed_jobs_are_dead_with_a_reason_sidekiq_can_read(
    sidekiq_url: str, r: redis.Redis, fpm: FpmServer, workers: Workers
) -> None:
    r.lpush("queue:q", b"this is not JSON \xff")
    r.lpush("queue:q", b'{"class": "OtherJob", "args": ["x"], "queue": "q", "jid": "j1"}')
    r.lpush("queue:q", b'{"class": "DeferEvent", "queue": "q", "jid": "j2"}')
    r.lpush("queue:q", b'{"class": "DeferEvent", "args": [{"a": 1}], "queue": "q", "jid": "j3"}')
    r.lpush("queue:q", b"[1, 2]")
    worker = workers.start(sidekiq_args(sidekiq_url, "q", fpm, "record.php"))
    api = wait_for(
        lambda: len((a := sidekiq_api(sidekiq_url, "q"))["dead"]) == 5 and a,
        timeout=30,
        interval=0.5,
        what="5 dead jobs",
    )
    messages = sorted(job["error_message"] for job in api["dead"])
    assert any("not JSON" in m for m in messages)
    assert any("class 'OtherJob' is not one this worker runs" in m for m in messages)
    assert any("has no args" in m for m in messages)
    assert any("args[0] is a JSON dict" in m for m in messages)
    assert any("JSON list, not an object" in m for m in messages)
    assert {job["error_class"] for job in api["dead"]} == {"FastWorker::BadMessage"}
    assert all(job["retry_count"] == 0 for job in api["dead"])
    malformed = [job for job in api["dead"] if job["klass"] == "FastWorker::MalformedJob"]
    assert sorted(job["args"][0] for job in malformed) == ["[1, 2]", "this is not JSON \ufffd"]
    # The worker goes on: a good job after them runs.
    fpm.clear_records()
    data = order_placed_data(7, "after the bad ones")
    sidekiq_push(sidekiq_url, "q", [data])
    wait_for(lambda: fpm.records(), timeout=20, what="the good job")
    assert worker.alive()


def test_sigterm_returns_unstarted_jobs_and_leaves_no_trace(
    sidekiq_url: str, r: redis.Redis, fpm: FpmServer, workers: Workers
) -> None:
    datas = [order_placed_data(i, "slow") for i in range(40)]
    sidekiq_push(sidekiq_url, "q", datas)
    # sleep.php runs for the data's number of ms? No: a fixed job time through --job-timeout
    # is not needed; record.php with many jobs prefetched is enough to have some unsettled.
    worker = workers.start(
        sidekiq_args(sidekiq_url, "q", fpm, "record.php", "--concurrency", "1", "--pipeline", "1")
    )
    time.sleep(0.3)
    assert worker.terminate() == 0
    ran = len(fpm.records())
    fpm.clear_records()
    assert r.llen("queue:q") + ran >= 40
    assert inprogress_keys(r) == [] and r.keys("fastworker:heartbeat:*") == []


def test_a_gone_workers_jobs_come_back(
    sidekiq_url: str, r: redis.Redis, fpm: FpmServer, workers: Workers
) -> None:
    """Jobs left in the in-progress list of a worker whose heartbeat expired run again."""
    fpm.clear_records()
    datas = [order_placed_data(i, "orphan") for i in range(5)]
    sidekiq_push(sidekiq_url, "q", datas)
    orphan = sidekiq_store.inprogress_key("elsewhere-1-abcdef", "q")
    for _ in datas:
        r.lmove("queue:q", orphan, "RIGHT", "LEFT")
    r.sadd(sidekiq_store.INPROGRESS_LISTS, orphan)
    assert r.llen("queue:q") == 0
    workers.start(sidekiq_args(sidekiq_url, "q", fpm, "record.php"))
    wait_for(lambda: len(fpm.records()) >= 5, timeout=20, what="the orphaned jobs")
    assert Counter(d for _, d, _ in fpm.records()) == Counter(sha1(d) for d in datas)
    assert r.llen(orphan) == 0


def test_2000_jobs_across_a_sigkill_and_restart(
    sidekiq_url: str, r: redis.Redis, fpm_factory, tmp_path: Path
) -> None:
    """The issue's acceptance run: 2000 jobs pushed by Sidekiq's client, 5 of them failing, the
    worker SIGKILLed mid-run and restarted: every good job runs (at most 20 twice), the 5 end
    in Sidekiq's dead set as Sidekiq reads it."""
    fpm = fpm_factory(children=4)
    good = [order_placed_data(i, f"event {i}") for i in range(1995)]
    bad = [order_placed_data(5000 + i, f"FAIL {i}") for i in range(5)]
    datas = good[:1000] + bad + good[1000:]
    assert sidekiq_push(sidekiq_url, "q", datas) == 2000
    args = sidekiq_args(
        sidekiq_url, "q", fpm, "listener.php", "--max-attempts", "2", "--retry-delay", "0.2"
    )
    first = Worker(args, tmp_path / "first.log")
    second: Worker | None = None
    try:
        first.wait_consuming()
        wait_for(lambda: len(fpm.records()) >= 400, timeout=60, what="400 jobs run")
        first.kill()
        killed_at = len(fpm.records())
        second = Worker(args, tmp_path / "second.log")
        second.wait_consuming()
        wait_for(
            lambda: {d for _, d, _ in fpm.records()} >= {sha1(d) for d in good},
            timeout=180,
            interval=0.5,
            what="every good job run",
        )
        api = wait_for(
            lambda: len((a := sidekiq_api(sidekiq_url, "q"))["dead"]) >= 5 and a,
            timeout=60,
            interval=0.5,
            what=f"5 dead jobs (dead {r.zcard('dead')}, retry {r.zcard('retry')}, "
            f"schedule {r.zcard('schedule')}, queue {r.llen('queue:q')})",
        )
        assert len(api["dead"]) == 5, [(j["args"][0][:40], j["error_message"]) for j in api["dead"]]
        time.sleep(1.0)
        runs = Counter(d for _, d, _ in fpm.records())
        duplicates = sum(n - 1 for n in runs.values())
        assert set(runs) == {sha1(d) for d in good}
        # Slots are held until Redis removed the job: at most the 16 jobs in flight run twice.
        assert duplicates <= 16, f"{duplicates} jobs ran twice"
        for job in api["dead"]:
            assert job["klass"] == "DeferEvent"
            assert job["args"][0] in bad
            assert f"listener failed for event {sha1(job['args'][0])}" in job["error_message"]
            assert job["error_class"] == "RuntimeException"
            assert job["retry_count"] == 1
        assert api["queue_size"] == 0 and api["retry"] == []
        assert "jobs of a gone worker back to their queue" in second.log()
        assert second.terminate() == 0
        assert inprogress_keys(r) == []
        print(f"killed after {killed_at} runs; {duplicates} jobs ran twice")
    finally:
        for worker in (first, second):
            if worker is not None and worker.alive():
                worker.kill()


def test_a_wrong_redis_password_ends_the_worker(
    sidekiq_url: str, fpm: FpmServer, tmp_path: Path
) -> None:
    url = sidekiq_url.replace("redis://", "redis://nobody:secret@")
    worker = Worker(sidekiq_args(url, "q", fpm, "record.php"), tmp_path / "w.log")
    assert worker.proc.wait(timeout=20) == 2
    log = worker.log()
    assert "refused the worker" in log and "secret" not in log


def test_dlq_show_replay_and_purge_on_sidekiqs_dead_set(
    sidekiq_url: str, r: redis.Redis, fpm: FpmServer, workers: Workers, tmp_path: Path
) -> None:
    bad = [order_placed_data(i, f"FAIL {i}") for i in range(3)]
    sidekiq_push(sidekiq_url, "q", bad, retry=False)
    workers.start(sidekiq_args(sidekiq_url, "q", fpm, "listener.php"))
    wait_for(lambda: r.zcard("dead") == 3, timeout=30, what="3 dead jobs")

    def dlq(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(SRC_DIR)}
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "fastworker",
                "dlq",
                *args,
                "--backend",
                "sidekiq",
                "--redis-url",
                sidekiq_url,
                "--queue",
                "q",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )

    shown = dlq("show")
    assert shown.returncode == 0, shown.stderr
    assert "php_error" in shown.stdout and "RuntimeException: " in shown.stdout
    assert "3 of 3 dead jobs of queue q shown" in shown.stdout
    assert r.zcard("dead") == 3  # showing takes nothing
    as_json = [json.loads(line) for line in dlq("show", "--json").stdout.splitlines()]
    assert sorted(job["args"][0] for job in as_json) == sorted(bad)
    assert {job["kind"] for job in as_json} == {"php_error"}
    # The listener is fixed: replayed jobs run, with their runs anew, and succeed.
    fpm.clear_records()
    (Path(fpm.record_file).parent / "fixed").touch()
    replayed = dlq("replay", "--limit", "2")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 2 dead jobs to queue:q" in replayed.stdout
    wait_for(lambda: len(fpm.records()) == 2, timeout=20, what="2 replayed jobs run")
    assert r.zcard("dead") == 1
    # A dead job another operator replayed first is not replayed again.
    entry = r.zrange("dead", 0, 0)[0]
    r.zrem("dead", entry)
    r.zadd("dead", {entry: time.time()})
    store_script = (
        "import asyncio, sys; from fastworker.sidekiq_store import SidekiqStore, connect\n"
        "async def main():\n"
        "    s = SidekiqStore(connect(sys.argv[1]))\n"
        "    e = sys.argv[2].encode('latin-1')\n"
        "    print(await s.replay(e, 'other', b'{}'), await s.replay(e, 'other', b'{}'))\n"
        "    await s.close()\n"
        "asyncio.run(main())\n"
    )
    twice = subprocess.run(
        [sys.executable, "-c", store_script, sidekiq_url, entry.decode("latin-1")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "PYTHONPATH": str(SRC_DIR)},
    )
    assert twice.stdout.split() == ["True", "False"], twice.stderr
    assert r.llen("queue:other") == 1
    purged = dlq("purge", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert "purged 0 dead jobs of queue q" in purged.stdout
    (Path(fpm.record_file).parent / "fixed").unlink()
    sidekiq_push(sidekiq_url, "q", [order_placed_data(9, "FAIL again")], retry=False)
    wait_for(lambda: r.zcard("dead") == 1, timeout=20, what="1 dead job")
    assert "purged 1 dead jobs of queue q" in dlq("purge", "--yes").stdout
    assert r.zcard("dead") == 0


def test_a_killed_worker_is_recovered_at_once_on_the_same_host(
    sidekiq_url: str, r: redis.Redis, fpm: FpmServer, workers: Workers, tmp_path: Path
) -> None:
    """A restart on the same host sees that the old pid is gone: no wait for the heartbeat."""
    fpm.clear_records()
    datas = [order_placed_data(i, "slow") for i in range(30)]
    sidekiq_push(sidekiq_url, "q", datas)
    args = sidekiq_args(sidekiq_url, "q", fpm, "record.php", "--concurrency", "1")
    first = Worker(args, tmp_path / "first.log")
    first.wait_consuming()
    os.kill(first.pid, signal.SIGSTOP)  # holds its jobs in progress, then dies
    first.kill()
    started = time.monotonic()
    workers.start(args)
    wait_for(
        lambda: {d for _, d, _ in fpm.records()} >= {sha1(d) for d in datas},
        timeout=20,
        what="every job",
    )
    assert time.monotonic() - started < sidekiq_store.HEARTBEAT_TTL
    # The dead process's list is gone from the registry too, not looked at forever.
    dead = sidekiq_store.INPROGRESS_LISTS
    wait_for(
        lambda: not any(f"-{first.pid}-".encode() in key for key in r.smembers(dead)),
        what="the killed worker's list unregistered",
    )
    assert read_records(fpm.record_file)


def test_lost_redis_connections_cost_no_job(
    sidekiq_url: str, r: redis.Redis, fpm: FpmServer, workers: Workers
) -> None:
    """Redis drops the worker's connections mid-run (CLIENT KILL): the worker reconnects, puts
    its unsettled jobs back, and every job runs."""
    fpm.clear_records()
    datas = [order_placed_data(i, f"through a cut {i}") for i in range(1500)]
    sidekiq_push(sidekiq_url, "q", datas)
    worker = workers.start(sidekiq_args(sidekiq_url, "q", fpm, "record.php"))
    wait_for(lambda: len(fpm.records()) >= 200, timeout=60, what="200 jobs run")
    own_id = r.client_id()
    for client in r.client_list():
        if int(client["id"]) != own_id:
            r.client_kill_filter(_id=int(client["id"]))
    wait_for(
        lambda: {d for _, d, _ in fpm.records()} >= {sha1(d) for d in datas},
        timeout=120,
        interval=0.5,
        what="every job run",
    )
    assert "retrying in" in worker.log()
    assert worker.alive()
    wait_for(lambda: inprogress_keys(r) == [] and r.llen("queue:q") == 0, what="nothing left")


def test_fastworker_check_tries_redis_for_the_sidekiq_backend(
    sidekiq_url: str, r: redis.Redis, fpm: FpmServer
) -> None:
    sidekiq_push(sidekiq_url, "q", [order_placed_data(1, "waiting")])
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR)}
    args = [
        sys.executable,
        "-m",
        "fastworker",
        "check",
        *sidekiq_args(sidekiq_url, "q", fpm, "record.php"),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Sidekiq queue q" in done.stdout and "queue:q, 1 jobs" in done.stdout
    down = [a if a != sidekiq_url else "redis://127.0.0.1:1/0" for a in args]
    failed = subprocess.run(down, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert failed.returncode == 1 and "FIX  Redis redis://127.0.0.1:1/0" in failed.stdout


def test_a_failure_record_and_leaving_progress_are_one_step(
    sidekiq_url: str, r: redis.Redis
) -> None:
    """A failed job enters `retry`/`dead` in the same step as it leaves the in-progress list:
    a worker killed in between leaves the job or its record, never both (which ran it twice and
    made two dead entries). If the job is no longer in progress (a worker took this one for
    gone and put it back in its queue), nothing is written: the queue's copy runs."""
    inprogress = sidekiq_store.inprogress_key("here-1-abcdef", "q")
    r.lpush(inprogress, b"job-a", b"job-b")

    async def main() -> tuple[bool, bool, bool, bool]:
        store = sidekiq_store.SidekiqStore(sidekiq_store.connect(sidekiq_url))
        try:
            killed = await store.kill(b'{"jid":"a"}', (inprogress, b"job-a"))
            retried = await store.add_failed(
                "retry", time.time() + 60, b'{"jid":"b"}', (inprogress, b"job-b")
            )
            # job-a left the list with its record: a second outcome for it (as when a recovery
            # had moved it back to its queue first) writes nothing.
            again = await store.kill(b'{"jid":"a2"}', (inprogress, b"job-a"))
            plain = await store.schedule(time.time() + 60, b'{"jid":"c"}')
            return killed, retried, again, plain
        finally:
            await store.close()

    assert asyncio.run(main()) == (True, True, False, True)
    assert r.zrange("dead", 0, -1) == [b'{"jid":"a"}']
    assert r.zrange("retry", 0, -1) == [b'{"jid":"b"}']
    assert r.zrange("schedule", 0, -1) == [b'{"jid":"c"}']
    assert r.llen(inprogress) == 0
    assert int(r.get("stat:failed")) == 2  # the dead and the retried one; not the scheduled
