"""Runs a bundle job as the app's console command, `php_bin console_path
fervo:deferred-event:dispatch DATA` (`--executor cli`), and classifies what happened.

It exists for apps that ran the bundle's console command before: one process per job pays PHP's
start and the app's boot every time, many times what a FastCGI request costs (README: "The
console executor"). Everything else is the FastCGI executor's: the same callback API, the same
outcome kinds, the job timeout, the output heads kept, and allow-lists for what a message may
name. The command is an argv list handed to execve: no shell ever reads the message's data.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import logging
import os
import posixpath
import re
import signal
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

from fastworker.callbacks import Answer
from fastworker.executor import STDERR_EXCERPT, STDOUT_HEAD
from fastworker.job import BadMessage, Job, JobRefused, NotAllowed
from fastworker.message import NotStarted
from fastworker.outcome import OK, Kind, Result
from fastworker.targets import PATH_MAX

log = logging.getLogger("fastworker.console")

# The bundle's command (Command/DispatchEventCommand.php): one required argument, event_data.
COMMAND = "fervo:deferred-event:dispatch"
# Linux refuses an argv element of this many bytes or more, NUL included (MAX_ARG_STRLEN):
# the FastCGI path sends such data as a POST body, a command line cannot.
MAX_ARG_STRLEN = 32 * 4096
# Seconds the output pipes may stay open after the process exited: a child it left behind (in
# the background, say) may hold them, and the job must not wait for it.
EXIT_GRACE = 1.0
# Spawn errors that say the machine is short of processes or memory, not that the job is bad:
# retried through the delay queues without counting an attempt, like an unreachable FPM.
_TRANSIENT = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE})
_PHP_MESSAGE = re.compile(r"PHP (?:Fatal error|Parse error|Warning|Error|Notice):\s+(.*)")
_ERROR_TEXT = 500  # characters of error text in a Result's message


def check_programs(php_bin: str, console: str | None) -> None:
    """ValueError naming the flag unless --php-bin is an executable file and --console (when
    given) a readable one: a typo should stop the worker at start, not fail every job."""
    if not (os.path.isabs(php_bin) and os.path.isfile(php_bin) and os.access(php_bin, os.X_OK)):
        raise ValueError(f"--php-bin {php_bin}: not an executable file (give its absolute path)")
    if console is not None and not (
        os.path.isabs(console) and os.path.isfile(console) and os.access(console, os.R_OK)
    ):
        raise ValueError(f"--console {console}: not a readable file (give its absolute path)")


class ConsoleTargets:
    """What a message may run: a php_bin matching an --allow-php-bin glob and a console_path
    matching an --allow-console glob (by default exactly --php-bin and --console). A message
    that names neither runs --php-bin and --console."""

    def __init__(
        self,
        php_bin: str,
        console: str | None,
        allow_php_bin: Sequence[str] = (),
        allow_console: Sequence[str] = (),
    ) -> None:
        self.php_bin = php_bin
        self.console = console
        self.php_bin_globs = tuple(allow_php_bin) or (php_bin,)
        self.console_globs = tuple(allow_console) or ((console,) if console else ())
        if not self.console_globs:
            raise ValueError(
                "--executor cli needs --console PATH (the app's console, e.g. "
                "/srv/app/bin/console), or --allow-console GLOB for messages naming console_path"
            )

    def resolve(self, job: Job) -> tuple[str, str]:
        """(php_bin, console_path) normalized, or NotAllowed / BadMessage."""
        php_bin = _allowed(job.php_bin or self.php_bin, self.php_bin_globs, "php_bin")
        console = job.console_path or self.console
        if console is None:
            raise BadMessage("the message names no console_path and the worker has no --console")
        return php_bin, _allowed(console, self.console_globs, "console_path")


def _allowed(path: str, globs: tuple[str, ...], what: str) -> str:
    flag = "--allow-php-bin" if what == "php_bin" else "--allow-console"
    if not path.startswith("/") or "\0" in path:
        raise NotAllowed(f"{what} {path[:200]!r} is not an absolute path")
    normalized = posixpath.normpath(path)  # what is checked is what runs: `..` cannot escape
    if len(normalized.encode("utf-8", "surrogatepass")) >= PATH_MAX:
        raise BadMessage(f"{what} is longer than any file path: {normalized[:100]!r}...")
    if not any(fnmatch.fnmatchcase(normalized, glob) for glob in globs):
        raise NotAllowed(f"{what} {normalized[:200]!r} matches no {flag} glob ({' '.join(globs)})")
    return normalized


class _Command(NamedTuple):
    """A vetted program and console, and how results name them."""

    argv: tuple[str, str, str]  # php_bin, console_path, COMMAND; the data goes last
    where: str


class _Run(asyncio.SubprocessProtocol):
    """One console process: keeps the head of its stdout and stderr, counts the rest, and
    resolves `finished` once it exited and its pipes closed (or EXIT_GRACE after it exited)."""

    def __init__(self, max_head: int, finished: asyncio.Future[None]) -> None:
        self.max_head = max_head
        self.finished = finished
        self.transport: asyncio.SubprocessTransport | None = None
        self.out = bytearray()
        self.err = bytearray()
        self.out_size = 0
        self.err_size = 0
        self.killed_for = ""  # why the executor killed its process group: "timeout", "close"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        raw = data if isinstance(data, bytes) else data.encode()
        if fd == 1:
            self.out_size += len(raw)
            room = self.max_head - len(self.out)
            if room > 0:
                self.out += raw[:room]
        else:
            self.err_size += len(raw)
            room = self.max_head - len(self.err)
            if room > 0:
                self.err += raw[:room]

    def process_exited(self) -> None:
        # connection_lost follows once the pipes are closed too; if something else holds them,
        # closing the transport after the grace ends the wait (an exited process is not killed).
        asyncio.get_running_loop().call_later(EXIT_GRACE, self._close)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    @property
    def returncode(self) -> int | None:
        return None if self.transport is None else self.transport.get_returncode()

    def kill(self, why: str) -> None:
        """SIGKILL to the process group (its own session): PHP and whatever it started."""
        if self.transport is None or self.transport.get_returncode() is not None:
            return  # exited (and reaped): its pid may not be ours any more
        self.killed_for = self.killed_for or why
        try:
            os.killpg(self.transport.get_pid(), signal.SIGKILL)
        except ProcessLookupError:
            pass


class ConsoleExecutor:
    """`Executor`'s API for console processes: at most `concurrency` at once; jobs beyond wait
    in arrival order, and answer NotStarted once the worker stops starting jobs."""

    def __init__(
        self,
        targets: ConsoleTargets,
        job_timeout: float,
        concurrency: int,
        max_output_head: int = 65536,
    ) -> None:
        self.targets = targets
        self.job_timeout = job_timeout
        self.concurrency = concurrency
        self.max_output_head = max_output_head
        self._commands: dict[tuple[str | None, str | None], _Command] = {}  # once vetted
        self._waiting: deque[tuple[tuple[str | bytes, ...], str, Answer[Result]]] = deque()
        self._running = 0
        self._runs: set[_Run] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    # ---------------------------------------------------------------- the executor API

    def start(self, job: Job, answer: Answer[Result]) -> None:
        """Runs `job`: `answer(result, None)` once it finished, or `answer(None, exc)` with
        NotStarted (the worker is stopping) or an unexpected exception."""
        command = self._command(job)
        if isinstance(command, Result):
            answer(command, None)
            return
        argv, where = command
        if self._stopping:
            answer(None, NotStarted("the worker is stopping"))
        elif self._waiting or self._running >= self.concurrency:
            self._waiting.append((argv, where, answer))
        else:
            self._launch(argv, where, answer)

    def stop_starting(self) -> None:
        """Jobs not started yet answer NotStarted from now on (the worker is stopping), so
        their messages go back to the queue; running processes go on."""
        self._stopping = True
        waiting, self._waiting = self._waiting, deque()
        for _, _, answer in waiting:
            answer(None, NotStarted("the worker is stopping"))

    async def close(self) -> None:
        """Kills the process groups still running (their messages go back to the queue: a
        process left running would run its job a second time beside the redelivery)."""
        self.stop_starting()
        for run in list(self._runs):
            run.kill("close")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=EXIT_GRACE + 4)

    # ---------------------------------------------------------------- one job

    def _command(self, job: Job) -> tuple[tuple[str | bytes, ...], str] | Result:
        """The argv and its name for results, or why the job may not run."""
        data = job.data
        if data is None:
            return Result(Kind.BAD_MESSAGE, message="--executor cli runs bundle messages only")
        key = (job.php_bin, job.console_path)
        command = self._commands.get(key)
        if command is None:
            try:
                php_bin, console = self.targets.resolve(job)
            except JobRefused as exc:
                return Result(exc.kind, message=str(exc))
            command = _Command((php_bin, console, COMMAND), f"{php_bin} {console}")
            if len(self._commands) < 1024:
                self._commands[key] = command
        if len(data) >= MAX_ARG_STRLEN:
            return Result(
                Kind.BAD_MESSAGE,
                message=f"data of {len(data)} bytes is too long for a command-line argument "
                f"(Linux takes at most {MAX_ARG_STRLEN - 1}); the FastCGI executor takes it",
            )
        if data[:1] == b"-" or b"\0" in data:
            # The console would read a leading '-' as an option, and execve cannot pass a NUL;
            # the bundle's base64 data has neither.
            return Result(
                Kind.BAD_MESSAGE,
                message="data starting with '-' or holding a NUL byte cannot be a console argument",
            )
        return (*command.argv, data), command.where

    def _launch(self, argv: tuple[str | bytes, ...], where: str, answer: Answer[Result]) -> None:
        self._running += 1
        task = asyncio.get_running_loop().create_task(self._run(argv, where, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, argv: tuple[str | bytes, ...], where: str, answer: Answer[Result]) -> None:
        """One process, from spawn to answer; the slot is freed (and the next job started)
        before the answer, so a job the answer starts in turn finds it."""
        result: Result | None = None
        error: BaseException | None = None
        try:
            result = await self._spawn_and_wait(argv, where)
        except Exception as exc:  # a bug of ours, not the job's: the handler says `internal`
            error = exc
        finally:
            self._running -= 1
            self._start_waiting()
        try:
            answer(result, error)
        except Exception:
            log.exception("answering a console job failed")

    async def _spawn_and_wait(self, argv: tuple[str | bytes, ...], where: str) -> Result:
        loop = asyncio.get_running_loop()
        run = _Run(self.max_output_head, loop.create_future())
        try:
            await loop.subprocess_exec(
                lambda: run,
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group: a timeout kills all of it
            )
        except OSError as exc:
            return _spawn_failed(exc, str(argv[0]), where)
        self._runs.add(run)
        timer = loop.call_later(self.job_timeout, run.kill, "timeout")
        try:
            await run.finished
        finally:
            timer.cancel()
            self._runs.discard(run)
            if run.transport is not None:
                run.transport.close()
        return self._classify(run, where)

    def _start_waiting(self) -> None:
        while self._waiting and self._running < self.concurrency and not self._stopping:
            self._launch(*self._waiting.popleft())

    def _classify(self, run: _Run, where: str) -> Result:
        code = run.returncode
        if code == 0 and not run.killed_for:
            return OK
        err, out = bytes(run.err), bytes(run.out)
        text = error_text(err, out)
        cut = [
            f"{name} {len(head)} of {size} bytes"
            for name, head, size in (("stderr", err, run.err_size), ("stdout", out, run.out_size))
            if size > len(head)
        ]
        if cut:
            text = f"{text} (output cut, kept {', '.join(cut)})"
        if run.killed_for == "timeout":
            kind = Kind.TIMEOUT
            message = f"no exit within {self.job_timeout:g} s; its process group was killed"
        elif run.killed_for == "close":
            kind, message = Kind.LOST, "killed: the worker stopped before the job finished"
        elif code is None or code < 0:
            kind, message = Kind.LOST, f"killed by {_signal_name(-(code or 0))}: {text}"
        else:
            kind, message = Kind.PHP_ERROR, f"exit status {code}: {text}"
        return Result(
            kind,
            message=message,
            stderr=err[:STDERR_EXCERPT],
            stdout_head=out[:STDOUT_HEAD],
            endpoint=where,
        )


def _spawn_failed(exc: OSError, program: str, where: str) -> Result:
    """A process that could not start: the machine's trouble (not counted) or the setup's."""
    reason = exc.strerror or str(exc)
    if exc.errno in _TRANSIENT:
        return Result(Kind.UNAVAILABLE, message=f"cannot start {program} now: {reason}")
    if exc.errno == errno.E2BIG:
        return Result(Kind.BAD_MESSAGE, message=f"command line too long for {program}: {reason}")
    return Result(Kind.PHP_ERROR, message=f"cannot run {program}: {reason}", endpoint=where)


def _signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} ({number})"
    except ValueError:
        return f"signal {number}"


def error_text(stderr: bytes, stdout: bytes) -> str:
    """A one-line reason: PHP's own error line when it wrote one, else the first lines of
    stderr (a Symfony console's exception block), else of stdout."""
    for stream in (stderr, stdout):
        lines = [
            line.strip()
            for line in stream[:STDERR_EXCERPT].decode("utf-8", "replace").splitlines()
            if line.strip()
        ]
        for line in lines:
            match = _PHP_MESSAGE.search(line)
            if match:
                return match.group(1).strip()[:_ERROR_TEXT]
        if lines:
            return " ".join(lines)[:_ERROR_TEXT]
    return "no output"
