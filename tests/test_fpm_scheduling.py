"""FpmPool's scheduling against a fake FastCGI peer: no PHP, every answer and close decided by
the test.

The peer is an asyncio server on 127.0.0.1 in the test's own loop. It parses the pool's requests
(BEGIN_REQUEST, PARAMS, STDIN records) and, only when the test says so, answers the oldest one
on a connection (STDOUT + END_REQUEST, as FPM answers pipelined requests in order), half-closes
and reads on like a PHP-FPM child ending under pm.max_requests, closes fully, or resets like a
dead child. Which connection got which request, in which order, is read from the peer; what the
pool answered is read from the callbacks of `FpmPool.request`.

Every test runs on both codec twins (the `fcgi_twin` fixture). Nothing depends on how fast
anything runs: every wait is bounded by a timeout, and the pipelining age limit is either set far
out of reach or waited past.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import types
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

import fastworker.fpm as fpm
from fastworker.endpoint import Endpoint
from fastworker.fpm import (
    FpmConnectionLost,
    FpmNotStarted,
    FpmPool,
    FpmResponse,
    FpmUnavailable,
)

WAIT = 10.0  # upper bound of every wait; the tests normally pass in a fraction of it
HEADER = struct.Struct("!BBHHBx")
BEGIN_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT, GET_VALUES = 1, 3, 4, 5, 6, 9
OK_HEADERS = b"Content-type: text/plain\r\n\r\n"
YOUNG = 3600.0  # PIPELINE_MAX_HEAD_AGE for tests where every head must count as young
PROBE_WAIT = 0.2  # fpm.PROBE_WAIT in the close tests: room for the kernel's reset on a busy box


def run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return uvloop.run(main())


# --------------------------------------------------------------------------- the fake peer


def record(rtype: int, content: bytes = b"") -> bytes:
    pad = -len(content) & 7
    return HEADER.pack(1, rtype, 1, len(content), pad) + content + bytes(pad)


def decode_pairs(data: bytes) -> dict[bytes, bytes]:
    """FastCGI name-value pairs (1- or 4-byte lengths)."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        lengths = []
        for _ in range(2):
            if data[pos] & 0x80:
                lengths.append(struct.unpack_from("!I", data, pos)[0] & 0x7FFFFFFF)
                pos += 4
            else:
                lengths.append(data[pos])
                pos += 1
        name = data[pos : pos + lengths[0]]
        pos += lengths[0]
        out[name] = data[pos : pos + lengths[1]]
        pos += lengths[1]
    return out


class FakeConn:
    """One accepted connection: the requests read on it, in order, and the test's levers."""

    def __init__(self, peer: FakeFpm, index: int, writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self.index = index  # accept order
        self.writer = writer
        self.jobs: list[str] = []  # the JOB param of every complete request, in arrival order
        self.answered = 0
        self.probes = 0  # empty GET_VALUES records (the pool's probe after a close)
        self.client_closed = False  # the pool closed its side
        self.we_closed = False

    @property
    def unanswered(self) -> list[str]:
        return self.jobs[self.answered :]

    @property
    def open(self) -> bool:
        return not (self.client_closed or self.we_closed)

    def answer(self) -> str:
        """Answers the oldest unanswered request: body ``JOB@index``."""
        job = self.jobs[self.answered]
        self.answered += 1
        body = f"{job}@{self.index}".encode()
        self.writer.write(
            record(STDOUT, OK_HEADERS + body)
            + record(STDOUT)
            + record(END_REQUEST, struct.pack("!IB3x", 0, 0))
        )
        return job

    def answer_all(self) -> int:
        n = 0
        while self.unanswered:
            self.answer()
            n += 1
        return n

    def half_close(self) -> None:
        """shutdown(SHUT_WR) and read on until the pool closes: a child ending gracefully."""
        self.writer.write_eof()

    def close(self) -> None:
        """Closes the socket: data the pool sends afterwards is answered with a reset."""
        self.we_closed = True
        self.writer.close()

    def reset(self) -> None:
        """A reset right away (SO_LINGER 0), as the kernel sends for a killed process."""
        self.we_closed = True
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def serve(self, reader: asyncio.StreamReader) -> None:
        params = bytearray()
        try:
            while True:
                _, rtype, _, clen, plen = HEADER.unpack(await reader.readexactly(HEADER.size))
                content = (await reader.readexactly(clen + plen))[:clen]
                if rtype == GET_VALUES:
                    self.probes += 1
                elif rtype == BEGIN_REQUEST:
                    params.clear()
                elif rtype == PARAMS:
                    params += content
                elif rtype == STDIN and not content:  # the end of a request
                    self.jobs.append(decode_pairs(bytes(params))[b"JOB"].decode())
                    if self.peer.on_request is not None:
                        self.peer.on_request(self)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.client_closed = True
            if not self.we_closed:
                self.writer.close()


class FakeFpm:
    """A FastCGI server that does only what the test tells it (or `on_request` does)."""

    def __init__(self, on_request: Callable[[FakeConn], object] | None = None) -> None:
        self.on_request = on_request
        self.conns: list[FakeConn] = []
        self.server: asyncio.Server | None = None
        self.endpoint = Endpoint()

    async def __aenter__(self) -> FakeFpm:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.endpoint = Endpoint("127.0.0.1", self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.conns:
            if not conn.we_closed:
                conn.writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = FakeConn(self, len(self.conns), writer)
        self.conns.append(conn)
        await conn.serve(reader)

    def open_conns(self) -> list[FakeConn]:
        return [conn for conn in self.conns if conn.open]

    def jobs(self) -> list[str]:
        return [job for conn in self.conns for job in conn.jobs]

    def conn_of(self, job: str) -> FakeConn:
        """The (last) connection that received `job`."""
        return next(conn for conn in reversed(self.conns) if job in conn.jobs)

    def unanswered(self) -> int:
        return sum(len(conn.unanswered) for conn in self.conns if conn.open)


def answer_at_once(conn: FakeConn) -> None:
    conn.answer()


# --------------------------------------------------------------------------- the pool's side


class Call:
    """The callback of one `FpmPool.request`: what it got, and how many times it was called."""

    def __init__(
        self, job: str, finished: list[str], then: Callable[[Call], object] | None = None
    ) -> None:
        self.job = job
        self.finished = finished
        self.then = then  # run inside the callback, as a worker reacts to an answer
        self.calls = 0
        self.response: FpmResponse | None = None
        self.error: BaseException | None = None

    def __call__(self, response: FpmResponse | None, exc: BaseException | None) -> None:
        self.calls += 1
        self.response, self.error = response, exc
        self.finished.append(self.job)
        if self.then is not None:
            self.then(self)

    @property
    def done(self) -> bool:
        return self.calls > 0

    @property
    def body(self) -> str:
        """``JOB@index`` of the fake connection that answered."""
        assert self.error is None, f"{self.job} failed: {self.error!r}"
        assert self.response is not None
        return self.response.stdout.split(b"\r\n\r\n", 1)[1].decode()


class Client:
    """Sends requests through a pool and keeps their callbacks, in submission order."""

    def __init__(self, pool: FpmPool) -> None:
        self.pool = pool
        self.calls: dict[str, Call] = {}
        self.finished: list[str] = []  # jobs in the order their callbacks ran

    def submit(self, job: str, then: Callable[[Call], object] | None = None) -> Call:
        call = self.calls[job] = Call(job, self.finished, then)
        self.pool.request(
            {"SCRIPT_FILENAME": "/fake/job.php", "REQUEST_METHOD": "POST", "JOB": job},
            b"data of " + job.encode(),
            30.0,
            b"",
            call,
        )
        return call

    def all_done(self) -> bool:
        return all(call.done for call in self.calls.values())

    def check_called_once(self) -> None:
        assert {job: call.calls for job, call in self.calls.items() if call.calls != 1} == {}


async def until(predicate: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    """Lets the loop run until `predicate()` is true; fails after `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.002)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}") from None


async def warm(client: Client, peer: FakeFpm, job: str = "warm") -> FakeConn:
    """One request answered: its connection is idle and has `served` one request."""
    call = client.submit(job)
    await until(lambda: job in peer.jobs(), f"{job} to arrive")
    peer.conn_of(job).answer()
    await until(lambda: call.done, f"{job} to be answered")
    assert call.body == f"{job}@{peer.conn_of(job).index}"
    return peer.conn_of(job)


# --------------------------------------------------------------------------- tests


def test_idle_connections_are_reused_lifo_and_few_are_opened(fcgi_twin: types.ModuleType) -> None:
    assert fpm.ResponseParser is fcgi_twin.ResponseParser

    async def main() -> None:
        async with FakeFpm(on_request=answer_at_once) as peer:
            pool = FpmPool(peer.endpoint, max_connections=4)
            client = Client(pool)
            try:
                # One request at a time: all ride the first connection.
                for i in range(20):
                    call = client.submit(f"s{i}")
                    await until(lambda call=call: call.done, f"s{i}")
                    assert call.body == f"s{i}@0"
                assert (pool.opened, len(peer.conns)) == (1, 1)

                # Three at once: the idle one and two new ones.
                peer.on_request = None
                for job in ("x", "y", "z"):
                    client.submit(job)
                await until(lambda: len(peer.jobs()) == 23, "x, y and z to arrive")
                assert (pool.opened, len(peer.conns), pool.open_connections) == (3, 3, 3)
                first, second, third = peer.conns
                # Released in the order second, first, third: third is the most recent.
                for conn in (second, first, third):
                    (job,) = conn.unanswered
                    conn.answer()
                    await until(lambda job=job: client.calls[job].done, f"{job} answered")

                # LIFO: the next request goes to the most recently released connection...
                call = client.submit("lifo1")
                await until(lambda: "lifo1" in peer.jobs(), "lifo1")
                assert peer.conn_of("lifo1") is third
                third.answer()
                await until(lambda: call.done, "lifo1 answered")
                assert call.body == f"lifo1@{third.index}"
                # ... again, and two at once take the two on top of the stack.
                client.submit("lifo2")
                client.submit("lifo3")
                await until(lambda: {"lifo2", "lifo3"} <= set(peer.jobs()), "lifo2 and lifo3")
                assert peer.conn_of("lifo2") is third
                assert peer.conn_of("lifo3") is first
                third.answer()
                first.answer()
                await until(client.all_done, "everything answered")
                assert (pool.opened, len(peer.conns)) == (3, 3)
                client.check_called_once()
            finally:
                await pool.close()

    run(main)


@pytest.mark.parametrize("pipeline", [1, 3])
def test_never_more_than_max_connections(fcgi_twin: types.ModuleType, pipeline: int) -> None:
    async def main() -> None:
        async with FakeFpm() as peer:
            pool = FpmPool(peer.endpoint, max_connections=2, pipeline=pipeline)
            client = Client(pool)
            try:
                jobs = [f"j{i}" for i in range(30)]
                for job in jobs:
                    client.submit(job)
                await until(lambda: len(peer.jobs()) >= 2, "the first two requests")
                assert (len(peer.conns), pool.open_connections) == (2, 2)
                assert not any(call.done for call in client.calls.values())
                while not client.all_done():
                    for conn in peer.conns:
                        conn.answer_all()
                    await until(
                        lambda: client.all_done() or peer.unanswered() > 0, "the next requests"
                    )
                    assert len(peer.conns) <= 2 and pool.open_connections <= 2
                assert pool.opened == 2
                assert sorted(peer.jobs()) == sorted(jobs)  # each sent once
                assert {call.body.split("@")[0] for call in client.calls.values()} == set(jobs)
                client.check_called_once()
            finally:
                await pool.close()

    run(main)


def test_pipelined_only_behind_a_young_head_on_a_connection_that_answered(
    fcgi_twin: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fpm, "PIPELINE_MAX_HEAD_AGE", YOUNG)  # every head is young here

    async def main() -> None:
        async with FakeFpm() as peer:
            pool = FpmPool(peer.endpoint, max_connections=1, pipeline=3)
            client = Client(pool)
            try:
                a = client.submit("a")
                await until(lambda: peer.jobs() == ["a"], "a")
                (conn,) = peer.conns
                # A new connection has answered nothing (FPM's backlog may be behind it): b waits.
                b = client.submit("b")
                assert pool.pipelined == 0
                conn.answer()
                await until(lambda: conn.jobs == ["a", "b"], "b, sent once a was answered")
                assert a.body == "a@0" and not b.done

                # Now the connection has answered one and its head (b) is young: up to
                # pipeline - 1 = 2 requests are written behind it, the next one waits.
                client.submit("c")
                client.submit("d")
                assert pool.pipelined == 2
                client.submit("e")
                assert pool.pipelined == 2
                await until(lambda: conn.jobs == ["a", "b", "c", "d"], "c and d behind b")
                assert not b.done

                conn.answer()  # b: c is the head now, e goes behind d
                await until(lambda: conn.jobs == ["a", "b", "c", "d", "e"], "e behind d")
                assert pool.pipelined == 3
                conn.answer_all()
                await until(client.all_done, "everything answered")
                assert client.finished == ["a", "b", "c", "d", "e"]
                assert [client.calls[j].body for j in "abcde"] == [f"{j}@0" for j in "abcde"]
                assert (pool.opened, len(peer.conns)) == (1, 1)
                client.check_called_once()
            finally:
                await pool.close()

    run(main)


def test_nothing_is_pipelined_behind_an_old_head(fcgi_twin: types.ModuleType) -> None:
    async def main() -> None:
        async with FakeFpm() as peer:
            pool = FpmPool(peer.endpoint, max_connections=1, pipeline=3)
            client = Client(pool)
            try:
                conn = await warm(client, peer)
                h = client.submit("h")
                await until(lambda: conn.jobs == ["warm", "h"], "h")
                # Wait (on the loop's clock) until the head is older than the limit.
                loop = asyncio.get_running_loop()
                sent = loop.time()
                await until(
                    lambda: loop.time() - sent > fpm.PIPELINE_MAX_HEAD_AGE, "the head to age"
                )
                x = client.submit("x")
                assert pool.pipelined == 0  # x waits in the backlog, not behind h
                conn.answer()
                await until(lambda: conn.jobs == ["warm", "h", "x"], "x after h")
                assert h.body == "h@0" and not x.done
                conn.answer()
                await until(lambda: x.done, "x answered")
                assert x.body == "x@0"
                assert pool.pipelined == 0
                client.check_called_once()
            finally:
                await pool.close()

    run(main)


def test_the_backlog_is_fifo_and_a_new_request_never_overtakes_it(
    fcgi_twin: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fpm, "PIPELINE_MAX_HEAD_AGE", YOUNG)

    async def main() -> None:
        async with FakeFpm() as peer:
            pool = FpmPool(peer.endpoint, max_connections=1, pipeline=2)
            client = Client(pool)
            try:
                client.submit("a")
                await until(lambda: peer.jobs() == ["a"], "a")
                (conn,) = peer.conns
                for job in ("b", "c", "d"):  # a's connection has answered nothing: all wait
                    client.submit(job)
                assert pool.pipelined == 0
                order = ["a", "b", "c", "d"]
                for i, new in enumerate(("e", "f", "g", "h")):
                    conn.answer()
                    # Each answer lets the oldest waiting request in (a new head, or one
                    # pipelined behind it), never the one submitted last.
                    client.submit(new)
                    order.append(new)
                    await until(lambda i=i: len(conn.jobs) >= i + 3, "the next request")
                    assert conn.jobs == order[: len(conn.jobs)]
                while not client.all_done():
                    conn.answer_all()
                    await until(
                        lambda: client.all_done() or conn.unanswered, "the next requests"
                    )
                assert conn.jobs == order
                assert client.finished == order
                assert (pool.opened, len(peer.conns)) == (1, 1)
                client.check_called_once()
            finally:
                await pool.close()

    run(main)


def test_a_request_sent_while_moved_requests_wait_does_not_overtake_them(
    fcgi_twin: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A head fails on a reset connection; the two requests pipelined behind it wait to move.
    A request sent from the head's callback (as a worker's next delivery would be) goes behind
    them, though an idle connection could take it at that very moment."""
    monkeypatch.setattr(fpm, "PIPELINE_MAX_HEAD_AGE", YOUNG)

    async def main() -> None:
        async with FakeFpm() as peer:
            pool = FpmPool(peer.endpoint, max_connections=2, pipeline=3)
            client = Client(pool)
            try:
                r = await warm(client, peer)
                h = client.submit("h", then=lambda _: client.submit("n"))  # r, idle
                client.submit("hp")  # a new connection p
                client.submit("q1")  # p has answered nothing: both go behind h on r
                client.submit("q2")
                assert pool.pipelined == 2
                await until(lambda: r.jobs == ["warm", "h", "q1", "q2"], "h, q1, q2 on r")
                await until(lambda: "hp" in peer.jobs(), "hp")
                p = peer.conn_of("hp")
                p.answer()  # p is idle now
                await until(lambda: client.calls["hp"].done, "hp answered")

                r.reset()
                await until(lambda: h.done and "n" in client.calls, "h to fail")
                assert isinstance(h.error, FpmConnectionLost), repr(h.error)
                assert "died before answering" in str(h.error)
                # Once r's slot is free: q1 takes the idle p, q2 opens a connection, and n,
                # sent while q1 and q2 waited, comes after them (behind q1 on p).
                await until(lambda: len(p.jobs) == 3, "two more requests on p")
                assert p.jobs == ["hp", "q1", "n"]
                while not client.all_done():
                    for conn in peer.conns:
                        if conn.open:
                            conn.answer_all()
                    await until(lambda: client.all_done() or peer.unanswered(), "more requests")
                assert peer.conn_of("q2") not in (p, r)
                assert peer.jobs().count("n") == 1
                assert [job for job, call in client.calls.items() if call.error] == ["h"]
                client.check_called_once()
            finally:
                await pool.close()

    run(main)


@pytest.mark.parametrize(
    "how, answer_first",
    [
        ("half_close", False),
        ("close", False),
        ("reset", False),
        ("half_close", True),
        ("close", True),
    ],
    ids=["half-close", "close", "reset", "answer-then-half-close", "answer-then-close"],
)
def test_requests_behind_a_closed_connection_move_to_another(
    fcgi_twin: types.ModuleType, monkeypatch: pytest.MonkeyPatch, how: str, answer_first: bool
) -> None:
    """FPM closed a connection with a head and two pipelined requests on it.

    The pipelined ones were never read (FPM reads a request only after finishing the one
    before): they always move to a new connection, in order, ahead of a request that waited.
    The head moves too if FPM read on after its close (a child ending under pm.max_requests: it
    never read the head, nothing ran, no attempt); a reset or a full close means the child that
    had it died: FpmConnectionLost.
    With `answer_first`, FPM answered the head and then closed: the first pipelined request
    had become the head.
    """
    monkeypatch.setattr(fpm, "PIPELINE_MAX_HEAD_AGE", YOUNG)
    if how == "close":  # the reset that tells a dead child must arrive within the probe's wait
        monkeypatch.setattr(fpm, "PROBE_WAIT", PROBE_WAIT)
    head = "p1" if answer_first else "h"  # FPM's head when it closed
    if how == "half_close":
        lost, moved = [], [head, "p2"] if answer_first else [head, "p1", "p2"]
    else:
        lost, moved = [head], ["p2"] if answer_first else ["p1", "p2"]

    async def main() -> None:
        async with FakeFpm() as peer:
            pool = FpmPool(peer.endpoint, max_connections=1, pipeline=3)
            client = Client(pool)
            try:
                first = await warm(client, peer)
                h = client.submit("h")
                p1 = client.submit("p1")
                p2 = client.submit("p2")
                client.submit("w")  # no room left behind h: w waits in the backlog
                assert pool.pipelined == 2
                await until(lambda: first.jobs == ["warm", "h", "p1", "p2"], "h, p1, p2")
                if answer_first:
                    first.answer()
                getattr(first, how)()

                await until(lambda: len(peer.conns) == 2 and peer.conns[1].jobs, "a new connection")
                second = peer.conns[1]
                for job in lost:
                    call = client.calls[job]
                    await until(lambda call=call: call.done, f"{job} to fail")
                    assert isinstance(call.error, FpmConnectionLost), repr(call.error)
                    assert "died before answering" in str(call.error)
                while not client.all_done():
                    second.answer_all()
                    await until(lambda: client.all_done() or second.unanswered, "more requests")

                assert second.jobs == [*moved, "w"]  # what moves goes ahead of what waited
                for job in [*moved, "w"]:
                    assert client.calls[job].body == f"{job}@1"
                if answer_first:
                    assert h.body == "h@0"
                assert (pool.opened, len(peer.conns)) == (2, 2)
                assert p1.done and p2.done
                await until(lambda: not first.open, "the pool to drop the closed connection")
                if how == "half_close":
                    assert first.probes == 1  # the pool probed once, then gave up on it
                client.check_called_once()
            finally:
                await pool.close()

    run(main)


def test_a_head_moved_too_often_is_unavailable(fcgi_twin: types.ModuleType) -> None:
    """Every connection is half-closed before answering: after _STALE_RETRIES moves the
    request fails as FpmUnavailable (nothing ran), not as a lost job."""

    async def main() -> None:
        async with FakeFpm(on_request=FakeConn.half_close) as peer:
            pool = FpmPool(peer.endpoint, max_connections=2)
            client = Client(pool)
            try:
                call = client.submit("r")
                await until(lambda: call.done, "r to give up")
                assert isinstance(call.error, FpmUnavailable), repr(call.error)
                assert "kept closing before reading" in str(call.error)
                assert peer.jobs() == ["r"] * (fpm._STALE_RETRIES + 1)
                assert pool.opened == fpm._STALE_RETRIES + 1
                client.check_called_once()
            finally:
                await pool.close()

    run(main)


def test_stop_starting_fails_only_the_requests_not_yet_written(
    fcgi_twin: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fpm, "PIPELINE_MAX_HEAD_AGE", YOUNG)

    async def main() -> None:
        async with FakeFpm() as peer:
            pool = FpmPool(peer.endpoint, max_connections=1, pipeline=2)
            client = Client(pool)
            try:
                conn = await warm(client, peer)
                h = client.submit("h")
                p = client.submit("p")  # written behind h
                w1 = client.submit("w1")  # waiting in the backlog
                w2 = client.submit("w2")
                assert pool.pipelined == 1
                await until(lambda: conn.jobs == ["warm", "h", "p"], "h and p")

                pool.stop_starting()
                # At once, in order: the waiting ones, and any new one, fail as not started.
                assert client.finished == ["warm", "w1", "w2"]
                late = client.submit("late")
                for call in (w1, w2, late):
                    assert isinstance(call.error, FpmNotStarted), repr(call.error)
                # What FPM already has still completes.
                assert not h.done and not p.done
                conn.answer_all()
                await until(lambda: h.done and p.done, "h and p answered")
                assert (h.body, p.body) == ("h@0", "p@0")
                assert conn.jobs == ["warm", "h", "p"]
                client.check_called_once()
            finally:
                await pool.close()

            # A request whose connection is still being opened never starts either.
            pool = FpmPool(peer.endpoint, max_connections=1)
            client = Client(pool)
            try:
                opening = client.submit("opening")
                pool.stop_starting()
                await until(lambda: opening.done, "the opening request to be refused")
                assert isinstance(opening.error, FpmNotStarted), repr(opening.error)
                client.check_called_once()
            finally:
                await pool.close()
            assert "opening" not in peer.jobs()

    run(main)
