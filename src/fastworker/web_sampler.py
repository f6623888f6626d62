"""The dashboard's view of the workers: it reads each worker's /metrics and /healthz (the
`--metrics-port` endpoints) every few seconds and keeps a bounded history of job rates.

Why sample here and not in the browser: the chart must have a past when the page opens, and the
workers must not learn anything new (their hot path stays as it is; a scrape costs them what a
Prometheus scrape costs). Rates are differences of the workers' counters between two samples;
a counter that went down means the worker restarted, and its new value counts as the delta.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("fastworker.web")

REQUEST_TIMEOUT = 1.5  # seconds per /metrics or /healthz request
OUTCOMES = ("success", "retry", "dead_letter", "requeue")


@dataclass(slots=True)
class WorkerView:
    """What one worker said at its last sample."""

    url: str
    reachable: bool = False
    problem: str = ""  # why it could not be read
    health_status: int | None = None  # /healthz's HTTP status
    health: str = ""  # /healthz's text
    concurrency: float | None = None
    in_flight: float = 0.0
    # (queue, outcome) -> jobs, from fastworker_jobs_total
    jobs: dict[tuple[str, str], float] = field(default_factory=dict)
    fpm_connections: dict[str, float] = field(default_factory=dict)  # endpoint -> open
    fpm_errors: dict[tuple[str, str], float] = field(default_factory=dict)  # (endpoint, kind)
    reconnects: float = 0.0
    sampled_at: float = 0.0

    @property
    def healthy(self) -> bool:
        return self.reachable and self.health_status == 200

    def total(self, outcome: str) -> float:
        return sum(n for (_, o), n in self.jobs.items() if o == outcome)


def read_metrics(view: WorkerView, text: str) -> None:
    """Fills `view` from a /metrics page, parsed by prometheus-client's own parser."""
    jobs: dict[tuple[str, str], float] = {}
    connections: dict[str, float] = {}
    errors: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "fastworker_jobs_total":
                key = (labels.get("queue", ""), labels.get("outcome", ""))
                jobs[key] = jobs.get(key, 0.0) + value
            elif name == "fastworker_inflight_jobs":
                view.in_flight = value
            elif name == "fastworker_concurrency":
                view.concurrency = value
            elif name == "fastworker_fpm_connections":
                connections[labels.get("endpoint", "")] = value
            elif name == "fastworker_fpm_errors_total":
                errors[(labels.get("endpoint", ""), labels.get("kind", ""))] = value
            elif name == "fastworker_broker_reconnects_total":
                view.reconnects = value
    view.jobs, view.fpm_connections, view.fpm_errors = jobs, connections, errors


@dataclass(frozen=True, slots=True)
class Point:
    """Jobs per second over the interval that ended at `at` (unix time)."""

    at: float
    success: float
    retry: float
    dead_letter: float


class Sampler:
    """Polls `urls` every `interval` seconds; keeps the last `history` seconds of rates."""

    def __init__(self, urls: Sequence[str], interval: float = 2.0, history: float = 600.0) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.interval = interval
        self.views = {url: WorkerView(url) for url in self.urls}
        self.points: deque[Point] = deque(maxlen=max(2, int(history / interval) + 1))
        self._last: dict[str, dict[str, float]] = {}  # url -> outcome -> counter at last sample
        self._last_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.samples = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        self._session = aiohttp.ClientSession(timeout=timeout)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.sample_once()
            except Exception:  # a bug here must not stop the chart for good
                log.exception("sampling the workers failed")
            next_at += self.interval
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (a suspended machine): start afresh
                next_at, delay = loop.time(), 0
            await asyncio.sleep(delay)

    async def sample_once(self) -> None:
        """Reads every worker once, then adds one point to the history."""
        views = await asyncio.gather(*(self._read(url) for url in self.urls))
        now = time.time()
        deltas = dict.fromkeys(OUTCOMES, 0.0)
        for view in views:
            self.views[view.url] = view
            if not view.reachable:
                continue
            before = self._last.get(view.url)
            current = {outcome: view.total(outcome) for outcome in OUTCOMES}
            if before is not None:
                for outcome in OUTCOMES:
                    delta = current[outcome] - before[outcome]
                    deltas[outcome] += delta if delta >= 0 else current[outcome]  # a restart
            self._last[view.url] = current
        if self._last_at is not None:
            seconds = max(now - self._last_at, 1e-3)
            self.points.append(
                Point(
                    now,
                    deltas["success"] / seconds,
                    deltas["retry"] / seconds,
                    deltas["dead_letter"] / seconds,
                )
            )
        self._last_at = now
        self.samples += 1

    async def _read(self, url: str) -> WorkerView:
        view = WorkerView(url, sampled_at=time.time())
        session = self._session
        assert session is not None
        try:
            async with session.get(f"{url}/metrics") as response:
                text = await response.text()
                if response.status != 200:
                    raise ValueError(f"/metrics answered {response.status}")
            read_metrics(view, text)
            async with session.get(f"{url}/healthz") as response:
                view.health_status = response.status
                view.health = (await response.text()).strip()
            view.reachable = True
        except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as exc:
            view.reachable = False
            view.problem = str(exc) or type(exc).__name__
        return view

    # ---------------------------------------------------------------- sums over the workers

    def in_flight(self) -> float:
        return sum(v.in_flight for v in self.views.values() if v.reachable)

    def jobs_by_queue(self) -> dict[str, dict[str, float]]:
        """queue -> outcome -> jobs, summed over the workers reachable now."""
        out: dict[str, dict[str, float]] = {}
        for view in self.views.values():
            for (queue, outcome), n in view.jobs.items():
                per = out.setdefault(queue, dict.fromkeys(OUTCOMES, 0.0))
                per[outcome] = per.get(outcome, 0.0) + n
        return out

    def fpm(self) -> dict[str, tuple[float, dict[str, float]]]:
        """endpoint -> (open connections, {kind: errors}), summed over the workers."""
        out: dict[str, tuple[float, dict[str, float]]] = {}
        for view in self.views.values():
            for endpoint, n in view.fpm_connections.items():
                open_now, errors = out.get(endpoint, (0.0, {}))
                out[endpoint] = (open_now + n, errors)
            for (endpoint, kind), n in view.fpm_errors.items():
                open_now, errors = out.get(endpoint, (0.0, {}))
                errors[kind] = errors.get(kind, 0.0) + n
                out[endpoint] = (open_now, errors)
        return out
