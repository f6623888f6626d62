"""`fastworker dlq ... --backend sidekiq`: Sidekiq's dead set, for one queue, from the terminal.

The dead set is Sidekiq's sorted set `dead` (shared by all queues, newest last); the commands
act on the jobs whose `queue` is --queue. Showing takes nothing. Replaying moves each job back
to the left end of its queue list in one atomic step that first removes it from the set, so two
operators replaying at once run it once; its failure fields are dropped, so it gets its runs
anew. Purging removes the queue's dead jobs (Sidekiq's web UI offers the same).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.exceptions

from fastworker import sidekiq_jobs
from fastworker.broker import masked
from fastworker.sidekiq_store import SidekiqStore, connect


class SidekiqDlqError(Exception):
    """A failure worth one line on stderr and exit status 1."""


@dataclass(slots=True)
class DeadJob:
    position: int  # 1-based, newest first
    entry: bytes  # the member of `dead` as stored: what removing it needs
    job: dict[str, Any]
    died_at: float

    @property
    def error(self) -> dict[str, Any]:
        error = self.job.get(sidekiq_jobs.ERROR)
        return error if isinstance(error, dict) else {}

    @property
    def kind(self) -> str:
        return str(self.error.get("kind") or "unknown")

    @property
    def attempts(self) -> int:
        return sidekiq_jobs.failed_attempts(self.job)

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "queue": self.job.get("queue"),
            "jid": self.job.get("jid"),
            "class": self.job.get("class"),
            "kind": self.kind,
            "attempts": self.attempts,
            "died_at": self.died_at,
            "error_class": self.job.get("error_class"),
            "error_message": self.job.get("error_message"),
            "error": self.error,
            "args": self.job.get("args"),
        }


async def _dead_jobs(store: SidekiqStore, queue: str) -> list[DeadJob]:
    """The queue's dead jobs, newest first (as Sidekiq's web UI lists them)."""
    try:
        entries = await store.client.zrevrange("dead", 0, -1, withscores=True)
    except redis.exceptions.RedisError as exc:
        raise SidekiqDlqError(f"cannot read Redis at {masked(_url(store))}: {exc}") from None
    found = []
    for entry, score in entries:
        try:
            job = orjson.loads(entry)
        except orjson.JSONDecodeError:
            continue  # not a job anybody could run; Sidekiq's API skips it too
        if isinstance(job, dict) and job.get("queue") == queue:
            found.append(DeadJob(len(found) + 1, bytes(entry), job, float(score)))
    return found


def _url(store: SidekiqStore) -> str:
    kwargs = store.client.connection_pool.connection_kwargs
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


def _one_line(text: str, width: int) -> str:
    flat = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _when(value: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


async def show(args: argparse.Namespace) -> int:
    store = SidekiqStore(connect(args.redis_url))
    try:
        dead = await _dead_jobs(store, args.queue)
    finally:
        await store.close()
    shown = dead[: args.limit] if args.limit else dead
    out = sys.stdout
    if args.json:
        for job in shown:
            out.write(orjson.dumps(job.to_json()).decode() + "\n")
        return 0
    if not dead:
        out.write(f"no dead jobs of queue {args.queue} in Sidekiq's dead set\n")
        return 0
    out.write(f"{'#':<4}  {'KIND':<11}  {'ATTEMPTS':<8}  {'DIED':<19}  {'ERROR':<56}  DATA\n")
    for job in shown:
        message = f"{job.job.get('error_class', '')}: {job.job.get('error_message', '')}"
        job_args = job.job.get("args")
        data = str(job_args[0]) if isinstance(job_args, list) and job_args else ""
        out.write(
            f"{job.position:<4}  {job.kind:<11}  {job.attempts:<8}  {_when(job.died_at):<19}  "
            f"{_one_line(message, 56):<56}  {_one_line(data, 40)}\n"
        )
    out.write(
        f"{len(shown)} of {len(dead)} dead jobs of queue {args.queue} shown; none taken\n"
    )
    return 0


async def replay(args: argparse.Namespace) -> int:
    kinds = set(args.kind or ())
    store = SidekiqStore(connect(args.redis_url))
    replayed = gone = 0
    try:
        # Oldest first, so they run in the order they died.
        for job in reversed(await _dead_jobs(store, args.queue)):
            if args.limit and replayed >= args.limit:
                break
            if kinds and job.kind not in kinds:
                continue
            fresh = sidekiq_jobs.encode(sidekiq_jobs.replayable(job.job))
            if await store.replay(job.entry, args.queue, fresh):
                replayed += 1
            else:
                gone += 1
    finally:
        await store.close()
    note = f" ({gone} were already replayed or deleted by someone else)" if gone else ""
    sys.stdout.write(f"replayed {replayed} dead jobs to queue:{args.queue}{note}\n")
    return 0


async def purge(args: argparse.Namespace) -> int:
    store = SidekiqStore(connect(args.redis_url))
    try:
        dead = await _dead_jobs(store, args.queue)
        if not args.yes:
            if not sys.stdin.isatty():
                raise SidekiqDlqError(
                    f"Sidekiq's dead set holds {len(dead)} jobs of queue {args.queue}; add "
                    "--yes to purge them"
                )
            answer = input(f"Purge {len(dead)} dead jobs of queue {args.queue}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                sys.stdout.write("nothing purged\n")
                return 1
        purged = 0
        for start in range(0, len(dead), 500):
            chunk = [job.entry for job in dead[start : start + 500]]
            purged += int(await store.client.zrem("dead", *chunk))
    finally:
        await store.close()
    sys.stdout.write(f"purged {purged} dead jobs of queue {args.queue}\n")
    return 0


COMMANDS = {"show": show, "replay": replay, "purge": purge}
