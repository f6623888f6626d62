"""`--processes N|auto`: one supervisor, N worker processes, each with its own event loop and
broker connection, sharing the FPM endpoints without ever opening more connections than an
endpoint's cap.

The supervisor runs no jobs. It starts each child as `python -m fastworker` with the same
command line (less --processes) and FASTWORKER_PROCESS_SLOT=i/N in its environment; the child
then takes its share of every endpoint's cap (`share`): the caps are split, not repeated, so N
processes together keep each pool's connections within its children. A child that dies is
replaced, after a pause that doubles while children keep dying young (RESTART_FIRST up to
RESTART_MAX); if they die RESTART_LIMIT times within RESTART_WINDOW, or a child exits 2 (its
settings are wrong, which restarting cannot fix), the supervisor stops the others and exits
non-zero. SIGTERM and SIGINT go to every child, and the supervisor waits for each one's graceful
drain. Children get SIGTERM if the supervisor itself dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence

log = logging.getLogger("fastworker.supervisor")

SLOT_ENV = "FASTWORKER_PROCESS_SLOT"
RESTART_FIRST = 1.0  # seconds before replacing a child that died young; doubled each time
RESTART_MAX = 30.0
YOUNG = 10.0  # a child that ran less than this long "died young"
RESTART_LIMIT = 5  # this many deaths within RESTART_WINDOW seconds: give up
RESTART_WINDOW = 60.0
CONFIG_ERROR = 2  # a child's exit status for settings that cannot work


def process_count(text: str, caps: Sequence[int]) -> int:
    """--processes: a number, or "auto" (one per CPU, no more than the smallest cap allows).
    ValueError when some endpoint's cap is too small to give each process a connection."""
    smallest = min(caps) if caps else 1
    if text == "auto":
        return max(1, min(os.cpu_count() or 1, smallest))
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"--processes must be a number or auto, got {text!r}") from None
    if count < 1:
        raise ValueError(f"--processes must be at least 1, got {count}")
    if count > smallest:
        raise ValueError(
            f"--processes {count} would leave a process without a connection to an endpoint "
            f"whose cap is {smallest} (--concurrency or --fpm ADDR=max:N): the caps are split "
            "between the processes, so give each endpoint at least one connection per process"
        )
    return count


def share(cap: int, index: int, count: int) -> int:
    """Process `index`'s part of an endpoint's `cap` of connections (parts differ by 1 at most,
    and add up to `cap`)."""
    return cap // count + (1 if index < cap % count else 0)


def slot() -> tuple[int, int]:
    """(index, count) of this process among the supervisor's children; (0, 1) when alone."""
    text = os.environ.get(SLOT_ENV, "")
    index, sep, count = text.partition("/")
    if sep and index.isdigit() and count.isdigit() and int(index) < int(count):
        return int(index), int(count)
    return 0, 1


def without_processes_flag(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, so no worker is orphaned."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Child:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.started = 0.0
        self.restart_at = 0.0  # monotonic time to start again, while it is down
        self.pause = 0.0


class Supervisor:
    def __init__(self, argv: Sequence[str], count: int) -> None:
        self.argv = without_processes_flag(argv)
        self.count = count
        self.children = [_Child(i) for i in range(count)]
        self.deaths: deque[float] = deque()
        self.stopping = False
        self.failure = 0  # the exit status when the supervisor gives up

    def _start(self, child: _Child) -> None:
        env = {**os.environ, SLOT_ENV: f"{child.index}/{self.count}", "FASTWORKER_PROCESSES": "1"}
        child.proc = subprocess.Popen(
            [sys.executable, "-m", "fastworker", *self.argv],
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        child.started = time.monotonic()
        child.pid = child.proc.pid
        log.info("worker process %d of %d started (pid %d)", child.index + 1, self.count, child.pid)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            log.info(
                "%s received: stopping %d worker processes gracefully",
                signal.Signals(signum).name,
                self.count,
            )
        self._stop_all()

    def _stop_all(self) -> None:
        self.stopping = True
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Keeps the children running until a signal or a give-up; returns the exit status."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for child in self.children:
            self._start(child)
        while True:
            alive = False
            now = time.monotonic()
            for child in self.children:
                proc = child.proc
                if proc is not None:
                    code = proc.poll()
                    if code is None:
                        alive = True
                        continue
                    child.proc = None
                    self._died(child, code, now)
                elif not self.stopping and now >= child.restart_at:
                    self._start(child)
                    alive = True
                else:
                    alive = alive or not self.stopping
            if self.stopping and not alive:
                return self.failure
            time.sleep(0.1)

    def _died(self, child: _Child, code: int, now: float) -> None:
        if self.stopping:
            if code != 0:
                log.warning("worker process %d exited %d while stopping", child.index + 1, code)
                self.failure = self.failure or 1
            return
        lived = now - child.started
        log.error(
            "worker process %d (pid %d) exited %s after %.1f s",
            child.index + 1,
            child.pid,
            _status(code),
            lived,
        )
        if code == CONFIG_ERROR:
            self._give_up(CONFIG_ERROR, "its settings cannot work (exit 2): see its message above")
            return
        self.deaths.append(now)
        while self.deaths and now - self.deaths[0] > RESTART_WINDOW:
            self.deaths.popleft()
        if len(self.deaths) >= RESTART_LIMIT:
            self._give_up(
                1, f"{len(self.deaths)} worker processes died within {RESTART_WINDOW:g} s"
            )
            return
        child.pause = min(RESTART_MAX, child.pause * 2 or RESTART_FIRST) if lived < YOUNG else 0.0
        child.restart_at = now + child.pause
        if child.pause:
            log.warning("replacing worker process %d in %.0f s", child.index + 1, child.pause)

    def _give_up(self, code: int, why: str) -> None:
        log.error("giving up: %s; stopping the other worker processes", why)
        self.failure = code
        self._stop_all()


def _status(code: int) -> str:
    return f"by signal {signal.Signals(-code).name}" if code < 0 else f"with status {code}"
