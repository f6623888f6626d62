"""A hostile FastCGI peer, driven through the real Executor and pools.

The peer is an asyncio server on 127.0.0.1 inside the test. It reads the worker's request and
answers with something no PHP-FPM sends: truncated records, lying content lengths, an
END_REQUEST for another request id, unknown record types, an answer nobody asked for, endless
STDOUT, or nothing at all. Each case must end as a Result of a clear kind with a clear message,
the worker must drop the connection, memory must stay bounded, and a real PHP-FPM next to it
must keep serving jobs during and after. Every case runs with both codec twins (the `fcgi_twin`
fixture of conftest).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import tracemalloc
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

import fastworker.fpm as fpm_module
from fastworker.callbacks import awaited
from fastworker.executor import Executor
from fastworker.fpm import Endpoint, FpmPools
from fastworker.job import Job
from fastworker.outcome import Result
from fastworker.targets import TargetPolicy
from services.fpm import FpmServer

PHP = Path(__file__).parent / "php"
SCRIPT = str(PHP / "pid.php")
HEADER = struct.Struct("!BBHHBx")
STDIN, STDOUT, STDERR, END = 5, 6, 7, 3
OK_HEADERS = b"Content-type: text/html; charset=UTF-8\r\n\r\n"
HEAD = 65536  # the pools' default max_response_head
MEMORY_LIMIT = 2 << 20  # bytes traced while hundreds of MB go by (about 330 KiB seen)


def rec(rtype: int, content: bytes = b"", rid: int = 1, clen: int | None = None) -> bytes:
    """A record; `clen` may lie about the content's length."""
    pad = -len(content) & 7
    n = len(content) if clen is None else clen
    return HEADER.pack(1, rtype, rid, n, pad) + content + bytes(pad)


def end(rid: int = 1, protocol_status: int = 0) -> bytes:
    return rec(END, struct.pack("!IB3x", 0, protocol_status), rid)


def stdout_block(size: int) -> bytes:
    """`size` bytes of STDOUT (a multiple of 65528) as full 64 KiB records without padding."""
    assert size % 65528 == 0
    return rec(STDOUT, b"o" * 65528) * (size // 65528)


BLOCK = stdout_block(16 * 65528)  # ~1 MiB of STDOUT records, written again and again


# --------------------------------------------------------------------------------------------
# the hostile peer


Behaviour = Callable[["HostilePeer", asyncio.StreamWriter], Awaitable[None]]


class HostilePeer:
    """Accepts connections, reads one request on each, then runs `behaviour` on it."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests = 0
        self.sent = 0  # STDOUT bytes written by the flooding behaviours
        self.worker_hung_up = asyncio.Event()  # the worker closed a connection we kept open
        self.hung_up_itself = False  # the behaviour closed the connection
        self.server: asyncio.Server | None = None
        self.endpoint = Endpoint()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.endpoint = Endpoint("127.0.0.1", port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
            self.requests += 1
            await self.behaviour(self, writer)
            if writer.is_closing():
                self.hung_up_itself = True
            else:  # we keep it open: the worker has to hang up
                while await reader.read(65536):
                    pass
                self.worker_hung_up.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.worker_hung_up.set()
        finally:
            writer.close()

    async def flood(self, writer: asyncio.StreamWriter, total: float) -> None:
        """STDOUT in ~1 MiB blocks until `total` bytes (or until the worker hangs up)."""
        writer.write(rec(STDOUT, OK_HEADERS))
        while self.sent < total:
            writer.write(BLOCK)
            self.sent += 16 * 65528
            await writer.drain()  # raises once the worker has aborted the connection


async def read_request(reader: asyncio.StreamReader) -> None:
    """Reads one FastCGI request, up to and including its empty STDIN record."""
    while True:
        _, rtype, _, clen, plen = HEADER.unpack(await reader.readexactly(8))
        await reader.readexactly(clen + plen)
        if rtype == STDIN and clen == 0:
            return


# --------------------------------------------------------------------------------------------
# the harness: one hostile peer, one real FPM, one executor for both


async def serve_meanwhile(executor: Executor, fpm: Endpoint, stop: asyncio.Event) -> list[str]:
    """Jobs against the well-behaved FPM, one after the other, until `stop`."""
    kinds = []
    while not stop.is_set():
        result = await awaited(executor.start, Job(SCRIPT, endpoint=fpm))
        kinds.append(result.kind)
        await asyncio.sleep(0.01)
    return kinds


def against_hostile(
    fpm: FpmServer,
    behaviour: Behaviour,
    job_timeout: float = 5.0,
    check: Callable[[HostilePeer, Executor], Awaitable[None]] | None = None,
    measure: bool = False,
) -> tuple[Result, HostilePeer, dict[str, Any]]:
    """Runs one job against a hostile peer while a real FPM serves other jobs."""

    async def main() -> tuple[Result, HostilePeer, dict[str, Any]]:
        peer = HostilePeer(behaviour)
        await peer.start()
        good = Endpoint.parse(fpm.address)
        pools = FpmPools(2)
        policy = TargetPolicy([good, peer.endpoint], [str(PHP / "*.php")])
        executor = Executor(pools, policy, job_timeout)
        info: dict[str, Any] = {}
        stop = asyncio.Event()
        meanwhile = asyncio.create_task(serve_meanwhile(executor, good, stop))
        try:
            await asyncio.sleep(0.05)
            if measure:
                tracemalloc.start()
            try:
                result = await awaited(executor.start, Job(SCRIPT, endpoint=peer.endpoint))
                if measure:
                    info["peak"] = tracemalloc.get_traced_memory()[1]
            finally:
                if measure:
                    tracemalloc.stop()
            stop.set()
            info["meanwhile"] = await meanwhile
            pool = pools.get(peer.endpoint)
            if result.kind in ("lost", "timeout"):  # the connection must go, on both sides
                for _ in range(100):
                    if pool.open_connections == 0 and (
                        peer.worker_hung_up.is_set() or peer.hung_up_itself
                    ):
                        break
                    await asyncio.sleep(0.02)
            info["open_after"] = pool.open_connections
            info["after"] = (await awaited(executor.start, Job(SCRIPT, endpoint=good))).kind
            if check is not None:
                await check(peer, executor)
            return result, peer, info
        finally:
            stop.set()
            with contextlib.suppress(BaseException):
                await meanwhile
            await pools.close()
            await peer.close()

    return uvloop.run(main())


def assert_dropped(result: Result, peer: HostilePeer, info: dict[str, Any]) -> None:
    """The worker closed the hostile connection; the good FPM served during and after."""
    assert info["open_after"] == 0
    assert peer.requests == 1
    assert peer.worker_hung_up.is_set() or peer.hung_up_itself
    assert info["meanwhile"] and set(info["meanwhile"]) == {"ok"}, info["meanwhile"]
    assert info["after"] == "ok"
    assert str(peer.endpoint) in result.message


# --------------------------------------------------------------------------------------------
# protocol errors and truncation: `lost`


async def truncated_header_then_close(peer: HostilePeer, writer: asyncio.StreamWriter) -> None:
    writer.write(rec(STDOUT, OK_HEADERS) + rec(STDOUT, b"partial")[:5])
    await writer.drain()
    writer.close()


async def short_record_then_close(peer: HostilePeer, writer: asyncio.StreamWriter) -> None:
    writer.write(rec(STDOUT, OK_HEADERS[:10], clen=65535))  # promises 65535 bytes, sends 10
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("behaviour", [truncated_header_then_close, short_record_then_close])
def test_truncated_answer_then_close_is_lost(
    fpm: FpmServer, fcgi_twin: types.ModuleType, behaviour: Behaviour
) -> None:
    result, peer, info = against_hostile(fpm, behaviour)
    assert result.kind == "lost", result
    assert "mid-response" in result.message
    assert_dropped(result, peer, info)


def _sends(data: bytes) -> Behaviour:
    async def behaviour(peer: HostilePeer, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()  # and keeps the connection open: the worker must hang up

    return behaviour


@pytest.mark.parametrize(
    "data, message",
    [
        (
            rec(STDOUT, OK_HEADERS) + rec(END, bytes(16)),
            "END_REQUEST record with content length 16 (expected 8)",
        ),
        (
            rec(STDOUT, OK_HEADERS) + end(rid=2),
            "END_REQUEST record for request id 2, which this client did not send",
        ),
        (rec(STDOUT, b"x", rid=7), "STDOUT record for request id 7, which this client did not"),
        (rec(STDOUT, OK_HEADERS) + rec(200, b"??"), "unknown FastCGI record type 200"),
        (rec(11, bytes(8), rid=1), "management record UNKNOWN_TYPE with request id 1"),
        (rec(STDIN, b"echo"), r"request-side record type 5 (STDIN) received from the server"),
        (b"HTTP/1.1 200 OK\r\n\r\n", "unsupported FastCGI version 72"),
    ],
    ids=["end-length", "end-other-id", "stdout-other-id", "type-200", "mgmt-id", "stdin", "http"],
)
def test_protocol_errors_are_lost_and_drop_the_connection(
    fpm: FpmServer, fcgi_twin: types.ModuleType, data: bytes, message: str
) -> None:
    result, peer, info = against_hostile(fpm, _sends(data))
    assert result.kind == "lost", result
    assert message in result.message
    assert_dropped(result, peer, info)


def test_an_answer_to_no_request_drops_an_idle_connection(
    fpm: FpmServer, fcgi_twin: types.ModuleType
) -> None:
    async def answer_twice(peer: HostilePeer, writer: asyncio.StreamWriter) -> None:
        writer.write(rec(STDOUT, OK_HEADERS + b"fine") + end())
        await writer.drain()
        await asyncio.sleep(0.1)  # the job is answered, the connection idle
        writer.write(rec(STDOUT, OK_HEADERS + b"again") + end())
        await writer.drain()

    async def check(peer: HostilePeer, executor: Executor) -> None:
        await asyncio.wait_for(peer.worker_hung_up.wait(), 5)
        for _ in range(100):
            if executor.pools.get(peer.endpoint).open_connections == 0:
                break
            await asyncio.sleep(0.02)
        assert executor.pools.get(peer.endpoint).open_connections == 0

    result, peer, info = against_hostile(fpm, answer_twice, check=check)
    assert result.kind == "ok"  # the first answer was fine
    assert info["after"] == "ok" and set(info["meanwhile"]) == {"ok"}


# --------------------------------------------------------------------------------------------
# silence and endless output: `timeout`, or `ok` once it ends


def test_silence_is_a_timeout(fpm: FpmServer, fcgi_twin: types.ModuleType) -> None:
    async def silence(peer: HostilePeer, writer: asyncio.StreamWriter) -> None:
        return None  # reads the request and never answers

    result, peer, info = against_hostile(fpm, silence, job_timeout=0.5)
    assert result.kind == "timeout", result
    assert result.message == "no response within 0.5 s"
    assert info["open_after"] == 0 and peer.worker_hung_up.is_set()
    assert set(info["meanwhile"]) == {"ok"} and info["after"] == "ok"


def test_endless_stdout_times_out_in_bounded_memory(
    fpm: FpmServer, fcgi_twin: types.ModuleType
) -> None:
    async def endless(peer: HostilePeer, writer: asyncio.StreamWriter) -> None:
        await peer.flood(writer, float("inf"))

    result, peer, info = against_hostile(fpm, endless, job_timeout=1.5, measure=True)
    assert result.kind == "timeout", result
    assert peer.sent > 50 << 20  # it really was flooding
    assert info["peak"] < MEMORY_LIMIT, info["peak"]
    assert info["open_after"] == 0 and peer.worker_hung_up.is_set()
    assert set(info["meanwhile"]) == {"ok"} and info["after"] == "ok"


def test_hundreds_of_mb_of_stdout_then_end_is_ok_in_bounded_memory(
    fpm: FpmServer, fcgi_twin: types.ModuleType
) -> None:
    async def flood_then_end(peer: HostilePeer, writer: asyncio.StreamWriter) -> None:
        await peer.flood(writer, 300 << 20)
        writer.write(rec(STDERR, b"PHP Notice: chatty") + rec(STDOUT) + end())
        await writer.drain()

    result, peer, info = against_hostile(fpm, flood_then_end, job_timeout=60, measure=True)
    assert result.kind == "ok", result
    assert peer.sent >= 300 << 20
    assert info["peak"] < MEMORY_LIMIT, info["peak"]
    assert info["open_after"] == 1  # a good answer: the connection stays for the next job
    assert set(info["meanwhile"]) == {"ok"} and info["after"] == "ok"


def test_pool_reports_heads_and_sizes(fcgi_twin: types.ModuleType) -> None:
    """FpmResponse carries the heads and the full sizes; max_response_head is honoured."""

    async def main() -> tuple[Any, Any, int]:
        async def flood(peer: HostilePeer, writer: asyncio.StreamWriter) -> None:
            await peer.flood(writer, 8 << 20)
            writer.write(rec(STDERR, b"e" * 5000) + end())
            await writer.drain()

        peer = HostilePeer(flood)
        await peer.start()
        pools = FpmPools(1, max_response_head=4096)
        try:
            pool = pools.get(peer.endpoint)
            response = await awaited(pool.request, {"SCRIPT_FILENAME": SCRIPT}, b"", 30, b"")
            with pytest.raises(ValueError, match="max_head must be in"):
                fpm_module.FpmPool(peer.endpoint, 1, max_response_head=-1)
            return response, pool, peer.sent
        finally:
            await pools.close()
            await peer.close()

    response, pool, sent = uvloop.run(main())
    assert response.stdout_size == len(OK_HEADERS) + sent
    assert response.stdout == (OK_HEADERS + b"o" * 4096)[:4096]
    assert (response.stderr, response.stderr_size) == (b"e" * 4096, 5000)
    assert pool.max_response_head == 4096


def test_php_error_with_huge_stderr_says_it_was_cut(
    fpm: FpmServer, fcgi_twin: types.ModuleType
) -> None:
    stderr = b"PHP Fatal error:  Uncaught RuntimeException: first words\n" + b"x" * (1 << 20)

    async def fail_loudly(peer: HostilePeer, writer: asyncio.StreamWriter) -> None:
        writer.write(rec(STDOUT, b"Status: 500 Internal Server Error\r\n\r\n"))
        for off in range(0, len(stderr), 65535):
            writer.write(rec(STDERR, stderr[off : off + 65535]))
        writer.write(end())
        await writer.drain()

    result, peer, info = against_hostile(fpm, fail_loudly)
    assert (result.kind, result.status) == ("php_error", 500)
    assert result.message.startswith("Uncaught RuntimeException: first words")
    assert f"output cut, kept stderr {HEAD} of {len(stderr)} bytes" in result.message
    assert len(result.stderr) <= HEAD
    assert set(info["meanwhile"]) == {"ok"} and info["after"] == "ok"
