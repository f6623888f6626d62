"""Sidekiq's data in Redis, as the Sidekiq backend reads and writes it: every change a job goes
through is one atomic step (a Lua script or a MULTI), so a crash between two steps can leave a
job in two places (it runs twice), never in none.

The keys, Sidekiq's own: list `queue:<name>` (the client LPUSHes, workers take from the right),
set `queues`, sorted sets `retry`, `schedule` and `dead` (scored by unix time), counters
`stat:processed` and `stat:failed` (and their per-day keys, which Sidekiq's dashboard charts).
fastworker's own, for reliable fetch: list `fastworker:inprogress:<process>:<queue>` holds what a
process took and has not settled, key `fastworker:heartbeat:<process>` expires when the process
is gone, and set `fastworker:inprogress` names every in-progress list, so that any worker can
push a gone process's jobs back to their queue.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions

from fastworker.broker import PublishFailed

INPROGRESS_LISTS = "fastworker:inprogress"
HEARTBEAT_TTL = 30  # seconds a process's heartbeat lives unless renewed
DEAD_MAX_JOBS = 10_000  # Sidekiq's defaults for its dead set: the newest 10,000 ...
DEAD_TIMEOUT = 180 * 24 * 3600  # ... of the last 6 months
STATS_TTL = 5 * 365 * 24 * 3600  # Sidekiq keeps its per-day counters 5 years

# Errors of the connection to Redis, worth a reconnect; anything else is a bug or a refusal.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
    OSError,
)

# Up to ARGV[1] jobs from the queue's right end to the in-progress list's left end.
_FETCH = """
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local job = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not job then break end
  out[i] = job
end
return out
"""

# Settled jobs leave the in-progress list; Sidekiq's processed counters count them.
_SETTLED = """
local n = 0
for i = 1, #ARGV do
  n = n + redis.call('LREM', KEYS[1], -1, ARGV[i])
end
redis.call('INCRBY', KEYS[2], #ARGV)
redis.call('INCRBY', KEYS[3], #ARGV)
redis.call('EXPIRE', KEYS[3], tonumber(ARGV_TTL))
return n
""".replace("ARGV_TTL", str(STATS_TTL))

# A job goes back to its queue's right end (it is taken next), if it is still ours.
_REQUEUE = """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) > 0 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

# An in-progress list back to its queue, oldest job taken first again; with ARGV[1] == '0'
# only while its process's heartbeat is gone, checked in the same step; with ARGV[3] == '1'
# the list is also dropped from the registry (its process is gone for good).
_RECOVER = """
if ARGV[1] == '0' and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do n = n + 1 end
if ARGV[3] == '1' then redis.call('SREM', KEYS[4], KEYS[1]) end
if n > 0 then redis.call('SADD', 'queues', ARGV[2]) end
return n
"""

# A job into sorted set KEYS[1] (`retry`, `schedule`, `dead`) at score ARGV[1] as ARGV[2], and
# out of the in-progress list KEYS[2] (its text ARGV[3]) in the same step; nothing at all if it
# is no longer there (its process was taken for gone and the job went back to its queue, where
# it runs again). ARGV[4] == '1': counted as failed (KEYS[3], KEYS[4] the stats); ARGV[5], if
# set: entries scored up to it are dropped, and all but the newest ARGV[6].
_PARK = """
if KEYS[2] ~= '' and redis.call('LREM', KEYS[2], -1, ARGV[3]) == 0 then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
if ARGV[5] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[5])
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[6]) - 1)
end
if ARGV[4] == '1' then
  redis.call('INCR', KEYS[3])
  redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV_TTL))
end
return 1
""".replace("ARGV_TTL", str(STATS_TTL))

# Due jobs from `retry`/`schedule` to their queues: each moves only if this step removed it
# from the set, so two pollers never enqueue one job twice. ARGV: (entry, new text, queue)*.
_ENQUEUE_DUE = """
local n = 0
for i = 1, #ARGV, 3 do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('LPUSH', 'queue:' .. ARGV[i + 2], ARGV[i + 1])
    redis.call('SADD', 'queues', ARGV[i + 2])
    n = n + 1
  end
end
return n
"""

# A job from a sorted set (`dead`, `retry`) to its queue now, once: only the caller that
# removed it from the set pushes it.
_REPLAY = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  redis.call('SADD', 'queues', ARGV[3])
  return 1
end
return 0
"""


def inprogress_key(process: str, queue: str) -> str:
    return f"fastworker:inprogress:{process}:{queue}"


def heartbeat_key(process: str) -> str:
    return f"fastworker:heartbeat:{process}"


def owner_of(inprogress: str) -> tuple[str, str] | None:
    """(process, queue) of an in-progress list's key; None for a key of another shape."""
    parts = inprogress.split(":", 3)
    if len(parts) != 4 or parts[:2] != ["fastworker", "inprogress"]:
        return None
    return parts[2], parts[3]


def process_id() -> str:
    """A worker process's name in Redis: host, pid and a random part (pids are reused)."""
    return f"{_host()}-{os.getpid()}-{secrets.token_hex(3)}"


def _host() -> str:
    return socket.gethostname().replace(":", "_").replace("-", "_") or "host"


def _died_on_this_host(process: str) -> bool:
    host, _, rest = process.partition("-")
    pid_text = rest.partition("-")[0]
    if host != _host() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (EPERM: another user's)
        return False
    return False


_days: dict[int, str] = {}


def _day() -> str:
    """Today (UTC) as Sidekiq's per-day stat keys name it; formatted once a day."""
    day = int(time.time()) // 86400
    text = _days.get(day)
    if text is None:
        _days.clear()
        text = _days[day] = time.strftime("%Y-%m-%d", time.gmtime(day * 86400))
    return text


def connect(url: str) -> aioredis.Redis:
    """A client for `url` (redis:// or rediss://), raw bytes in and out; uses hiredis when
    installed. Connecting happens at the first command."""
    return aioredis.Redis.from_url(url, decode_responses=False, socket_connect_timeout=5.0)


class SidekiqStore:
    """One Redis client and the scripts above, as the backend's operations."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        register = client.register_script
        self._fetch = register(_FETCH)
        self._settled = register(_SETTLED)
        self._requeue = register(_REQUEUE)
        self._recover = register(_RECOVER)
        self._enqueue_due = register(_ENQUEUE_DUE)
        self._replay = register(_REPLAY)
        self._park = register(_PARK)

    # ---------------------------------------------------------------- reliable fetch

    async def fetch(self, queue: str, inprogress: str, count: int) -> list[bytes]:
        """Up to `count` jobs, oldest first, each moved to `inprogress` in the same step."""
        return list(await self._fetch(keys=[f"queue:{queue}", inprogress], args=[count]))

    async def wait_fetch(self, queue: str, inprogress: str, timeout: float) -> bytes | None:
        """One job, waiting up to `timeout` seconds for one to arrive."""
        job = await self.client.blmove(f"queue:{queue}", inprogress, timeout, "RIGHT", "LEFT")
        return job if job is None else bytes(job)

    async def settled(self, inprogress: str, jobs: Sequence[bytes]) -> int:
        day = _day()
        keys = [inprogress, "stat:processed", f"stat:processed:{day}"]
        return int(await self._settled(keys=keys, args=list(jobs)))

    async def requeue(self, inprogress: str, queue: str, job: bytes) -> bool:
        return bool(await self._requeue(keys=[inprogress, f"queue:{queue}"], args=[job]))

    async def beat(self, process: str, lists: Sequence[str]) -> None:
        """Says this process is alive for HEARTBEAT_TTL more seconds, and where its jobs are."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(heartbeat_key(process), str(time.time()), ex=HEARTBEAT_TTL)
            if lists:
                pipe.sadd(INPROGRESS_LISTS, *lists)
            await pipe.execute()

    async def recover(self, inprogress: str, own: bool, forget: bool | None = None) -> int:
        """Pushes `inprogress` back to its queue: always when `own`, else only if its process
        is gone (its heartbeat expired); `forget` (default: not `own`) also drops the list from
        the registry. Returns the jobs moved, -1 if the process lives."""
        owner = owner_of(inprogress)
        if owner is None:
            await self.client.srem(INPROGRESS_LISTS, inprogress)
            return 0
        process, queue = owner
        keys = [inprogress, f"queue:{queue}", heartbeat_key(process), INPROGRESS_LISTS]
        forget = not own if forget is None else forget
        args = ["1" if own else "0", queue, "1" if forget else "0"]
        return int(await self._recover(keys=keys, args=args))

    async def recover_gone(self, own_process: str) -> dict[str, int]:
        """Every gone process's in-progress list back to its queue: {list: jobs moved}.

        Gone: its heartbeat expired, or it ran on this host (`process_id`'s host-pid-random
        form) under a pid that no longer exists, which a restart finds at once."""
        moved = {}
        for raw in await self.client.smembers(INPROGRESS_LISTS):
            key = raw.decode("utf-8", "replace")
            owner = owner_of(key)
            if owner is not None and owner[0] == own_process:
                continue
            dead_here = owner is not None and _died_on_this_host(owner[0])
            n = await self.recover(key, own=dead_here, forget=True)
            if n > 0:
                moved[key] = n
        return moved

    async def leave(self, process: str, lists: Sequence[str]) -> None:
        """A clean exit: the process's lists pushed back (anything still in them was not
        settled) and its traces removed."""
        for key in lists:
            await self.recover(key, own=True)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(heartbeat_key(process))
            if lists:
                pipe.srem(INPROGRESS_LISTS, *lists)
            await pipe.execute()

    # ---------------------------------------------------------------- retries and the dead

    async def enqueue_due(self, sorted_set: str, limit: int = 100) -> int:
        """Moves jobs of `retry` or `schedule` whose time has come to their queues."""
        due = await self.client.zrangebyscore(sorted_set, "-inf", time.time(), 0, limit)
        if not due:
            return 0
        args: list[Any] = []
        now = time.time()
        for entry in due:
            try:
                job = orjson.loads(entry)
            except orjson.JSONDecodeError:
                job = None
            if not isinstance(job, dict) or not isinstance(job.get("queue"), str):
                # Nothing we could run or return: Sidekiq's own poller would choke on it too.
                continue
            job["enqueued_at"] = now
            args += [entry, orjson.dumps(job), job["queue"]]
        if not args:
            return 0
        return int(await self._enqueue_due(keys=[sorted_set], args=args))

    # `taken` below is the job's (in-progress list, text) as fetched (`Message.receipt`): the
    # job leaves that list in the same step as it enters the set, and nothing is written if it
    # is no longer there. None: only the set is written.

    async def add_failed(
        self, sorted_set: str, at: float, job: bytes, taken: tuple[str, bytes] | None = None
    ) -> bool:
        """A failed job into `retry` or `schedule` (runs again at `at`), counted as failed by
        Sidekiq's stats. False if `taken` was no longer in progress here (nothing written);
        raises PublishFailed if Redis did not take it."""
        return await self._zadd(sorted_set, at, job, taken, failed=sorted_set == "retry")

    async def schedule(self, at: float, job: bytes, taken: tuple[str, bytes] | None = None) -> bool:
        """A job that asked to wait into `schedule` (runs at `at`), not counted as failed;
        False and PublishFailed as `add_failed`."""
        return await self._zadd("schedule", at, job, taken, failed=False)

    async def kill(self, job: bytes, taken: tuple[str, bytes] | None = None) -> bool:
        """A job into `dead`, which keeps Sidekiq's bounds (the newest 10,000 of 6 months);
        False and PublishFailed as `add_failed`."""
        now = time.time()
        return await self._zadd("dead", now, job, taken, failed=True, trim=now - DEAD_TIMEOUT)

    async def _zadd(
        self,
        sorted_set: str,
        at: float,
        job: bytes,
        taken: tuple[str, bytes] | None,
        failed: bool,
        trim: float | None = None,
    ) -> bool:
        inprogress, raw = taken if taken is not None else ("", b"")
        keys = [sorted_set, inprogress, "stat:failed", f"stat:failed:{_day()}"]
        args = [
            repr(at),
            job,
            raw,
            "1" if failed else "0",
            "" if trim is None else repr(trim),
            DEAD_MAX_JOBS,
        ]
        try:
            return bool(await self._park(keys=keys, args=args))
        except redis.exceptions.RedisError as exc:
            raise PublishFailed(f"Redis did not take the job into {sorted_set}: {exc!r}") from exc

    async def replay(self, entry: bytes, queue: str, job: bytes, sorted_set: str = "dead") -> bool:
        """An entry of `sorted_set` back to `queue` as `job`; False if it was no longer there
        (someone else replayed or deleted it)."""
        keys = [sorted_set, f"queue:{queue}"]
        return bool(await self._replay(keys=keys, args=[entry, job, queue]))

    async def close(self) -> None:
        await self.client.aclose()
