"""The dashboard's HTTP side (aiohttp): routes, basic auth, the CSRF check, security headers,
and the glue between the sampler, the stores and the pages.

Why these rules: this app can re-run production jobs. So every state change is a POST that
carries the form's CSRF token (anything else is 403), every page says which scripts may run
(`script-src 'self'`: an injected tag would not run even if escaping failed), and a queue in a
URL must be one the dashboard was given (`--queue`), or the request is 404.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiormq
import redis.exceptions
from aiohttp import web

from fastworker import control
from fastworker.broker import NoBrokerAnswered
from fastworker.failures import RetryPolicy
from fastworker.web_amqp import AmqpStore, Outcome, QueueCounts
from fastworker.web_html import url
from fastworker.web_letters import Letter, ParseSettings
from fastworker.web_pages import (
    ListView,
    Overview,
    letter_page,
    letters_page,
    message_page,
    overview_page,
)
from fastworker.web_sampler import Sampler
from fastworker.web_security import Credentials, Csrf
from fastworker.web_sidekiq import SidekiqCounts, SidekiqSets

log = logging.getLogger("fastworker.web")

STATIC_DIR = Path(__file__).resolve().parent / "web_static"
MAX_FORM = 256 * 1024  # bytes of a POST: ids of a few thousand letters
NOTES_KEPT = 200  # outcome notes waiting for their redirect
CONTROL_WAIT = 2.0  # seconds a pause/resume from the page collects the workers' answers
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# What a broker or Redis that cannot be reached raises; shown on the page, not a 500.
STORE_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    ConnectionError,
    OSError,
    TimeoutError,
    redis.exceptions.RedisError,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class WebSettings:
    """Everything `fastworker web` runs with; the broker settings are the worker's."""

    backend: str = "amqp"
    amqp_urls: list[str] = field(default_factory=lambda: ["amqp://guest:guest@localhost:5672/"])
    redis_url: str = "redis://localhost:6379/0"
    queues: list[str] = field(default_factory=lambda: ["sf_deferred_events"])
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    parse: ParseSettings = field(default_factory=ParseSettings)
    workers: list[str] = field(default_factory=list)
    auth: Credentials | None = None
    interval: float = 2.0  # seconds between samples of the workers
    history: float = 600.0  # seconds of rates kept and charted
    scan_limit: int = 10_000  # most letters read per listing


class Dashboard:
    """The app's state: the sampler, one store (broker or Redis), the CSRF secret, notes."""

    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self.sampler = Sampler(settings.workers, settings.interval, settings.history)
        self.amqp: AmqpStore | None = None
        self.sidekiq: SidekiqSets | None = None
        if settings.backend == "sidekiq":
            self.sidekiq = SidekiqSets(settings.redis_url, settings.queues, settings.scan_limit)
        else:
            self.amqp = AmqpStore(
                settings.amqp_urls, settings.queues, settings.policy, settings.scan_limit
            )
        self.csrf = Csrf()
        self.notes: OrderedDict[str, str] = OrderedDict()
        self._counts: tuple[float, list[QueueCounts | SidekiqCounts], str] | None = None
        self._counts_lock = asyncio.Lock()

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._headers, self._auth, self._csrf_check], client_max_size=MAX_FORM
        )
        app.router.add_get("/", self.overview)
        app.router.add_get("/letters", self.first_queue)
        app.router.add_get("/queues/{queue}/letters", self.letters)
        app.router.add_post("/queues/{queue}/letters/act", self.act)
        app.router.add_post("/queues/{queue}/control", self.control)
        app.router.add_get("/queues/{queue}/letters/{id}", self.letter)
        app.router.add_static("/static/", STATIC_DIR, show_index=False)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self.sampler.start()

    async def _stop(self, app: web.Application) -> None:
        await self.sampler.close()
        for store in (self.amqp, self.sidekiq):
            if store is not None:
                try:
                    await store.close()
                except STORE_ERRORS:
                    pass

    # ---------------------------------------------------------------- middlewares

    @web.middleware
    async def _headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            _secure(exc, request)
            raise
        _secure(response, request)
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        auth = self.settings.auth
        if auth is None:
            request["user"] = ""
            return await handler(request)
        user = auth.check(request.headers.get("Authorization"))
        if user is None:
            raise web.HTTPUnauthorized(
                text="fastworker web: log in (HTTP basic auth)\n",
                headers={"WWW-Authenticate": 'Basic realm="fastworker", charset="UTF-8"'},
            )
        request["user"] = user
        return await handler(request)

    @web.middleware
    async def _csrf_check(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            form = await request.post()
            token = form.get("csrf")
            if not isinstance(token, str) or not self.csrf.valid(request["user"], token):
                log.warning(
                    "refused a %s to %s without a valid CSRF token",
                    request.method,
                    request.path,
                )
                page = message_page(
                    "Refused",
                    "This request carried no valid form token (CSRF), so nothing was changed. "
                    "Reload the page and try again.",
                )
                raise web.HTTPForbidden(text=page, content_type="text/html")
        return await handler(request)

    # ---------------------------------------------------------------- pages

    def _queue(self, request: web.Request) -> str:
        queue = request.match_info["queue"]
        if queue not in self.settings.queues:
            raise web.HTTPNotFound(
                text=message_page("Not found", f"This dashboard was not given queue {queue!r}."),
                content_type="text/html",
            )
        return queue

    def _store(self, request: web.Request, store: str | None = None) -> str:
        store = store or request.query.get("store") or "dead"
        if store not in ("dead", "retry") or (store == "retry" and self.sidekiq is None):
            raise web.HTTPNotFound(
                text=message_page("Not found", f"no store {store!r}"), content_type="text/html"
            )
        return store

    async def counts(self) -> tuple[list[QueueCounts | SidekiqCounts], str]:
        """The queues' counts, read at most once per sampling interval."""
        async with self._counts_lock:
            if (
                self._counts is not None
                and time.monotonic() - self._counts[0] < self.settings.interval
            ):
                return self._counts[1], self._counts[2]
            counts: list[QueueCounts | SidekiqCounts] = []
            problem = ""
            try:
                if self.amqp is not None:
                    counts = list(await self.amqp.counts())
                elif self.sidekiq is not None:
                    counts = list(await self.sidekiq.counts())
            except STORE_ERRORS as exc:
                problem = f"cannot read the queues: {_reason(exc)}"
            self._counts = (time.monotonic(), counts, problem)
            return counts, problem

    async def overview(self, request: web.Request) -> web.Response:
        counts, problem = await self.counts()
        paused: frozenset[str] = frozenset()
        if self.amqp is not None and not problem:
            try:
                connection = await self.amqp.connection()
                paused = frozenset(await control.paused_queues(connection, self.settings.queues))
            except STORE_ERRORS as exc:
                problem = f"cannot read the paused queues: {_reason(exc)}"
        view = Overview(
            self.settings.backend,
            self.settings.queues,
            counts,
            problem,
            self.settings.history,
            paused,
            self.csrf.token(request["user"]) if self.amqp is not None else "",
            self.notes.pop(request.query.get("note", ""), ""),
        )
        return _html(overview_page(self.sampler, view))

    async def control(self, request: web.Request) -> web.Response:
        """Pause or resume a queue on every worker (as `fastworker pause/resume` does)."""
        queue = self._queue(request)
        form = await request.post()
        action = str(form.get("action") or "")
        if action not in ("pause", "resume") or self.amqp is None:
            raise web.HTTPBadRequest(text="action must be pause or resume (AMQP backend)\n")
        try:
            answers, _ = await control.send(self.amqp.nodes, action, [queue], CONTROL_WAIT)
            workers = sum(1 for answer in answers if answer.get("queues"))
            done = "Paused" if action == "pause" else "Resumed"
            note = f"{done} {queue}: {workers} workers acknowledged."
            log.info("%s %s from the dashboard: %d workers acknowledged", action, queue, workers)
        except STORE_ERRORS as exc:
            note = f"Nothing done: {_reason(exc)}"
        token = secrets.token_urlsafe(12)
        self.notes[token] = note
        while len(self.notes) > NOTES_KEPT:
            self.notes.popitem(last=False)
        raise web.HTTPSeeOther(url(query={"note": token}))

    async def first_queue(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(url("queues", self.settings.queues[0], "letters"))

    async def _read(self, queue: str, store: str) -> tuple[list[Letter], int, str]:
        try:
            if self.amqp is not None:
                letters, total = await self.amqp.letters(queue)
            else:
                assert self.sidekiq is not None
                letters, total = await self.sidekiq.letters(queue, store)
        except STORE_ERRORS as exc:
            return [], 0, f"cannot read the failed jobs: {_reason(exc)}"
        return letters, total, ""

    def _where(self, queue: str, store: str) -> str:
        if self.amqp is not None:
            return self.amqp.dead_letter_queue(queue)
        return f"Sidekiq's {store} set"

    def _view(self, request: web.Request, queue: str, store: str) -> ListView:
        try:
            page = int(request.query.get("page", "1"))
        except ValueError:
            page = 1
        note = self.notes.pop(request.query.get("note", ""), "")
        return ListView(
            backend=self.settings.backend,
            queues=self.settings.queues,
            queue=queue,
            store=store,
            where=self._where(queue, store),
            letters=[],
            total=0,
            kind=request.query.get("kind", ""),
            text=request.query.get("q", ""),
            page=page,
            csrf=self.csrf.token(request["user"]),
            note=note,
        )

    async def letters(self, request: web.Request) -> web.Response:
        queue = self._queue(request)
        store = self._store(request)
        view = self._view(request, queue, store)
        view.letters, view.total, view.problem = await self._read(queue, store)
        return _html(letters_page(view))

    async def letter(self, request: web.Request) -> web.Response:
        queue = self._queue(request)
        store = self._store(request)
        view = self._view(request, queue, store)
        letters, _, problem = await self._read(queue, store)
        wanted = request.match_info["id"]
        found = next((letter for letter in letters if letter.id == wanted), None)
        if found is None:
            text = problem or (
                "This job is not there any more: it was replayed or deleted (perhaps by "
                "another operator), or it is being handled right now."
            )
            back = url("queues", queue, "letters", query={"store": store})
            raise web.HTTPNotFound(text=message_page("Gone", text, back), content_type="text/html")
        return _html(letter_page(found, view, self.settings.parse))

    async def act(self, request: web.Request) -> web.Response:
        queue = self._queue(request)
        form = await request.post()
        store = self._store(request, str(form.get("store") or "dead"))
        one = form.get("one")
        if isinstance(one, str) and ":" in one:
            action, _, letter_id = one.partition(":")
            ids = [letter_id]
        else:
            action = str(form.get("action") or "")
            ids = [str(value) for value in form.getall("id", [])]
        if action not in ("replay", "delete"):
            raise web.HTTPBadRequest(text="action must be replay or delete\n")
        if not ids:
            note = "Nothing selected: tick the jobs first."
        else:
            try:
                if self.amqp is not None:
                    outcome = await self.amqp.act(queue, ids, action)
                else:
                    assert self.sidekiq is not None
                    outcome = await self.sidekiq.act(queue, store, ids, action)
                    for letter in outcome.done:
                        done = "replayed" if action == "replay" else "deleted"
                        log.info("%s %s job %s of %s", done, store, letter.id, queue)
                note = describe(outcome, action, store, queue, self.settings.backend)
            except STORE_ERRORS as exc:
                note = f"Nothing done: {_reason(exc)}"
            self._counts = None  # the overview's counts changed
        token = secrets.token_urlsafe(12)
        self.notes[token] = note
        while len(self.notes) > NOTES_KEPT:
            self.notes.popitem(last=False)
        raise web.HTTPSeeOther(
            url("queues", queue, "letters", query={"store": store, "note": token})
        )


def describe(outcome: Outcome, action: str, store: str, queue: str, backend: str) -> str:
    """One sentence on what an action did, for the page it redirects to."""
    words = {"retry": "retrying job", "dead": "dead letter" if backend == "amqp" else "dead job"}
    word = words.get(store, "job")
    parts = []
    n = len(outcome.done)
    if n:
        plural = "s" if n != 1 else ""
        if action == "replay":
            parts.append(f"Replayed {n} {word}{plural} to queue {queue}.")
        else:
            parts.append(f"Deleted {n} {word}{plural}.")
    if outcome.gone:
        g = len(outcome.gone)
        parts.append(
            f"{g} {word}{'s were' if g != 1 else ' was'} already gone: another operator "
            "replayed or deleted it first (or it is being handled right now), so nothing was "
            "done twice."
        )
    parts += outcome.failed
    return " ".join(parts) or "Nothing done."


def _secure(response: web.StreamResponse, request: web.Request) -> None:
    response.headers.update(HEADERS)
    if not request.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-store"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NoBrokerAnswered):
        return exc.refusal() or f"no broker answered ({exc})"
    return str(exc) or type(exc).__name__


def _html(page: str) -> web.Response:
    return web.Response(text=page, content_type="text/html", charset="utf-8")
