"""The dashboard's pages as HTML: the layout, the overview, the dead-letter list and a letter's
detail. Pure functions of what the app read, built with `web_html.render`, so every value from
the broker, Redis or PHP is escaped."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from fastworker.web_amqp import QueueCounts
from fastworker.web_chart import SERIES, chart
from fastworker.web_html import Html, join, render, url
from fastworker.web_letters import Letter, ParseSettings, group_kinds, json_view, params_sent
from fastworker.web_sampler import OUTCOMES, Sampler, WorkerView
from fastworker.web_sidekiq import SidekiqCounts

PAGE_SIZE = 50
STORE_TITLES = {"dead": "Dead letters", "retry": "Retry set"}
CURRENT = Html(' aria-current="page"')
NAV = (("/", "Overview", "overview"), ("/letters", "Dead letters", "letters"))


def when(at: float | None) -> str:
    if not at:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def layout(title: str, body: Html, active: str = "", refresh_ms: int = 0) -> Html:
    """The page around `body`; `refresh_ms`: the script swaps in a fresh #live that often."""
    nav = join(
        render(
            '<a href="{href}"{current}>{text}</a>',
            href=href,
            text=text,
            current=CURRENT if key == active else "",
        )
        for href, text, key in NAV
    )
    return render(
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>{title} - fastworker</title>"
        '<link rel="stylesheet" href="/static/dashboard.css">'
        '<script src="/static/dashboard.js" defer></script></head>'
        '<body{refresh}><header><a class="brand" href="/">fastworker</a><nav>{nav}</nav></header>'
        "<main>{body}</main></body></html>\n",
        title=title,
        nav=nav,
        body=body,
        refresh=render(' data-live="live" data-interval="{ms}"', ms=refresh_ms)
        if refresh_ms
        else "",
    )


def message_page(title: str, text: str, back: str = "/") -> Html:
    body = render(
        '<h1>{title}</h1><p class="note">{text}</p><p><a href="{back}">Back</a></p>',
        title=title,
        text=text,
        back=back,
    )
    return layout(title, body)


# ---------------------------------------------------------------- overview


@dataclass(slots=True)
class Overview:
    """What the overview shows besides the sampler: the broker's or Redis's counts."""

    backend: str
    queues: Sequence[str]
    counts: Sequence[QueueCounts | SidekiqCounts]
    counts_problem: str  # why the counts could not be read, or ""
    span: float  # seconds of history charted
    paused: frozenset[str] = frozenset()  # queues paused (fastworker pause), AMQP only
    csrf: str = ""  # the token the pause/resume forms carry; "" shows no buttons
    note: str = ""  # what the last pause/resume did


def overview_page(sampler: Sampler, view: Overview) -> Html:
    now = time.time()
    latest = sampler.points[-1] if sampler.points else None
    by_queue = sampler.jobs_by_queue()
    totals = {o: sum(per.get(o, 0.0) for per in by_queue.values()) for o in OUTCOMES}
    cards = join(
        render(
            '<div class="card {cls}"><span class="label">{label}</span>'
            '<span class="value" id="{id}">{value}</span></div>',
            cls=cls,
            label=label,
            id=ident,
            value=value,
        )
        for cls, label, ident, value in (
            ("success", "succeeded/s", "rate-success", number(latest.success if latest else 0)),
            ("retry", "retried/s", "rate-retry", number(latest.retry if latest else 0)),
            (
                "dead-letter",
                "dead-lettered/s",
                "rate-dead",
                number(latest.dead_letter if latest else 0),
            ),
            ("", "in flight", "in-flight", number(sampler.in_flight())),
            ("success", "succeeded", "total-success", number(totals["success"])),
            ("retry", "retried", "total-retry", number(totals["retry"])),
            ("dead-letter", "dead-lettered", "total-dead", number(totals["dead_letter"])),
        )
    )
    legend = join(
        render('<span class="key {cls}">{label}</span>', cls=attr.replace("_", "-"), label=label)
        for attr, label in SERIES
    )
    reachable = sum(1 for v in sampler.views.values() if v.reachable)
    meta = (
        f"{reachable} of {len(sampler.views)} workers answered; sampled every "
        f"{sampler.interval:g} s; as of {when(now)}"
        if sampler.views
        else "no workers given (--workers URL): no rates, no worker health"
    )
    body = render(
        '<section id="live"><h1>Overview</h1>{note}<p class="meta">{meta}</p>'
        '<div class="cards">{cards}</div>'
        '<h2>Jobs per second</h2>{chart}<p class="legend">{legend}</p>'
        "<h2>Queues</h2>{queues}<h2>Workers</h2>{workers}<h2>PHP-FPM endpoints</h2>{fpm}"
        '<noscript><p class="meta">JavaScript is off: reload the page for newer figures.</p>'
        "</noscript></section>",
        note=render('<p class="note">{n}</p>', n=view.note) if view.note else "",
        meta=meta,
        cards=cards,
        chart=chart(sampler.points, view.span, now),
        legend=legend,
        queues=_queues_table(view, by_queue),
        workers=_workers_table(list(sampler.views.values())),
        fpm=_fpm_table(sampler),
    )
    return layout("Overview", body, "overview", refresh_ms=int(sampler.interval * 1000))


def _control_cell(view: Overview, queue: str) -> Html:
    """Pause or Resume for a given queue: reaches every worker of it (fastworker pause)."""
    if queue not in view.queues or not view.csrf:
        return render("<td></td>")
    paused = queue in view.paused
    return render(
        '<td data-col="control">{state}<form method="post" action="{action}" class="inline">'
        '<input type="hidden" name="csrf" value="{csrf}">'
        '<button name="action" value="{value}">{label}</button></form></td>',
        state=render('<span class="paused">paused</span> ') if paused else "",
        action=url("queues", queue, "control"),
        csrf=view.csrf,
        value="resume" if paused else "pause",
        label="Resume" if paused else "Pause",
    )


def _queues_table(view: Overview, by_queue: Mapping[str, Mapping[str, float]]) -> Html:
    counts = {c.queue: c for c in view.counts}
    names = list(view.queues) + sorted(q for q in by_queue if q not in view.queues)
    sidekiq = view.backend == "sidekiq"
    rows = []
    for queue in names:
        c = counts.get(queue)
        jobs = by_queue.get(queue, {})
        if isinstance(c, SidekiqCounts):
            ready, retry, dead = c.ready, c.retry, c.dead
            retry_title = "jobs of this queue in Sidekiq's retry set"
        elif isinstance(c, QueueCounts):
            ready, retry, dead = c.ready, c.retrying, c.dead
            retry_title = ", ".join(f"{name}: {number(n)}" for name, n in c.retry.items())
        else:
            ready = retry = dead = None
            retry_title = ""
        given = queue in view.queues
        link = render(
            '<a href="{href}">{n}</a>', href=url("queues", queue, "letters"), n=number(dead)
        )
        retry_cell: Html | str = number(retry)
        if sidekiq and given and retry is not None:  # Sidekiq's retry set is browsable too
            href = url("queues", queue, "letters", query={"store": "retry"})
            retry_cell = render('<a href="{href}">{n}</a>', href=href, n=number(retry))
        rows.append(
            render(
                '<tr data-queue="{queue}"><th scope="row">{queue}</th>'
                '<td data-col="ready">{ready}</td><td data-col="retrying" title="{rt}">{retry}</td>'
                '<td data-col="dead">{dead}</td><td data-col="succeeded">{ok}</td>'
                '<td data-col="retried">{retried}</td><td data-col="dead-lettered">{dl}</td>'
                '<td data-col="requeued">{rq}</td>{control}</tr>',
                control=_control_cell(view, queue) if not sidekiq else "",
                queue=queue,
                ready=number(ready),
                rt=retry_title,
                retry=retry_cell,
                dead=link if given and dead is not None else number(dead),
                ok=number(jobs.get("success")),
                retried=number(jobs.get("retry")),
                dl=number(jobs.get("dead_letter")),
                rq=number(jobs.get("requeue")),
            )
        )
    problem = (
        render('<p class="problem">{p}</p>', p=view.counts_problem) if view.counts_problem else ""
    )
    retry_head = "in the retry set" if sidekiq else "waiting to retry"
    dead_head = "in the dead set" if sidekiq else "dead letters"
    return render(
        "{problem}<table><thead><tr><th>queue</th><th>ready</th><th>{rh}</th><th>{dh}</th>"
        "<th>succeeded</th><th>retried</th><th>dead-lettered</th><th>requeued</th>{ch}</tr>"
        "</thead>"
        "<tbody>{rows}</tbody></table>"
        '<p class="meta">ready, retrying and dead: now, from {src}; the rest: counted by the '
        "workers since they started</p>",
        problem=problem,
        rh=retry_head,
        dh=dead_head,
        ch=render("<th>workers</th>") if not sidekiq and view.csrf else "",
        rows=join(rows),
        src="Redis" if sidekiq else "RabbitMQ",
    )


def _workers_table(views: Sequence[WorkerView]) -> Html:
    if not views:
        return Html('<p class="meta">none given</p>')
    rows = []
    for v in views:
        if not v.reachable:
            health, cls = f"unreachable: {v.problem}", "bad"
        else:
            health, cls = f"{v.health_status} {v.health}", "good" if v.healthy else "bad"
        rows.append(
            render(
                '<tr data-worker="{url}"><th scope="row">{url}</th>'
                '<td class="{cls}" data-col="health">{health}</td>'
                '<td data-col="concurrency">{conc}</td><td data-col="in-flight">{fl}</td>'
                '<td data-col="succeeded">{ok}</td><td data-col="reconnects">{rc}</td></tr>',
                url=v.url,
                cls=cls,
                health=health,
                conc=number(v.concurrency),
                fl=number(v.in_flight if v.reachable else None),
                ok=number(v.total("success") if v.reachable else None),
                rc=number(v.reconnects if v.reachable else None),
            )
        )
    return render(
        "<table><thead><tr><th>worker</th><th>health</th><th>concurrency</th><th>in flight</th>"
        "<th>succeeded</th><th>broker reconnects</th></tr></thead><tbody>{rows}</tbody></table>",
        rows=join(rows),
    )


def _fpm_table(sampler: Sampler) -> Html:
    endpoints = sampler.fpm()
    if not endpoints:
        return Html('<p class="meta">no endpoint reported yet</p>')
    rows = []
    for endpoint, (connections, errors) in sorted(endpoints.items()):
        detail = ", ".join(f"{kind} {number(n)}" for kind, n in sorted(errors.items()))
        rows.append(
            render(
                '<tr data-endpoint="{ep}"><th scope="row">{ep}</th>'
                '<td data-col="connections">{conn}</td><td data-col="errors">{total}</td>'
                "<td>{detail}</td></tr>",
                ep=endpoint,
                conn=number(connections),
                total=number(sum(errors.values())),
                detail=detail or "-",
            )
        )
    return render(
        "<table><thead><tr><th>endpoint</th><th>open connections</th><th>jobs failed</th>"
        "<th>by kind</th></tr></thead><tbody>{rows}</tbody></table>",
        rows=join(rows),
    )


# ---------------------------------------------------------------- the list


@dataclass(slots=True)
class ListView:
    backend: str
    queues: Sequence[str]
    queue: str
    store: str  # "dead" or "retry"
    where: str  # the dead-letter queue's name, or Sidekiq's set
    letters: Sequence[Letter]  # all read, newest first
    total: int  # in the store (more than read when over the scan limit)
    kind: str
    text: str
    page: int
    csrf: str
    note: str = ""
    problem: str = ""


def store_title(view: ListView) -> str:
    if view.store == "dead" and view.backend == "sidekiq":
        return "Dead set"
    return STORE_TITLES[view.store]


def _tabs(view: ListView) -> Html:
    tabs = []
    if len(view.queues) > 1:
        tabs.append(
            join(
                render(
                    '<a href="{href}"{cur}>{q}</a>',
                    href=url("queues", q, "letters", query={"store": view.store}),
                    q=q,
                    cur=CURRENT if q == view.queue else "",
                )
                for q in view.queues
            )
        )
    if view.backend == "sidekiq":
        tabs.append(
            join(
                render(
                    '<a href="{href}"{cur}>{title}</a>',
                    href=url("queues", view.queue, "letters", query={"store": s}),
                    title=f"{'Dead set' if s == 'dead' else 'Retry set'}",
                    cur=CURRENT if s == view.store else "",
                )
                for s in ("dead", "retry")
            )
        )
    return join(render('<nav class="tabs">{t}</nav>', t=t) for t in tabs)


def letters_page(view: ListView) -> Html:
    matching = [letter for letter in view.letters if letter.matches(view.kind, view.text)]
    pages = max(1, -(-len(matching) // PAGE_SIZE))
    page = min(max(1, view.page), pages)
    shown = matching[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    action = url("queues", view.queue, "letters", "act")
    word = "retrying jobs" if view.store == "retry" else "dead letters"
    title = f"{store_title(view)} of queue {view.queue}"
    kinds = group_kinds(view.letters)
    options = join(
        render(
            '<option value="{k}"{sel}>{k} ({n})</option>',
            k=k,
            n=n,
            sel=Html(" selected") if k == view.kind else "",
        )
        for k, n in kinds.items()
    )
    search = render(
        '<form class="search" method="get" action="{action}">'
        '<input type="hidden" name="store" value="{store}">'
        '<label>kind <select name="kind"><option value="">any</option>{options}</select></label> '
        '<label>text <input type="search" name="q" value="{q}" '
        'placeholder="error, event, data"></label> '
        '<button type="submit">Search</button></form>',
        action=url("queues", view.queue, "letters"),
        store=view.store,
        options=options,
        q=view.text,
    )
    summary = f"{view.total} {word} in {view.where}"
    if len(view.letters) < view.total:
        summary += f" (the {len(view.letters)} newest read)"
    if view.kind or view.text:
        summary += f"; {len(matching)} match"
    if pages > 1:
        summary += f"; page {page} of {pages}"
    rows = join(_row(letter, view) for letter in shown)
    empty = (
        render('<tr><td colspan="9" class="meta">{t}</td></tr>', t=f"no {word}")
        if not shown
        else ""
    )
    replay_word = "Run now" if view.store == "retry" else "Replay"
    table = render(
        '<form method="post" action="{action}" id="letters">'
        '<input type="hidden" name="csrf" value="{csrf}">'
        '<input type="hidden" name="store" value="{store}">'
        '<div class="bulk">'
        '<button type="submit" name="action" value="replay">{rw} selected</button> '
        '<button type="submit" name="action" value="delete" class="danger" '
        'data-confirm="Delete the selected jobs for good?">Delete selected</button></div>'
        '<table class="letters"><thead><tr>'
        '<th><input type="checkbox" class="select-all" aria-label="select all" hidden></th>'
        "<th>event / script</th><th>kind</th><th>status</th><th>attempts</th>"
        "<th>{first}</th><th>last failure</th><th>error</th><th></th></tr></thead>"
        "<tbody>{rows}{empty}</tbody></table></form>",
        action=action,
        csrf=view.csrf,
        store=view.store,
        rw=replay_word,
        rows=rows,
        empty=empty,
        first="runs again" if view.store == "retry" else "first failure",
    )
    nav = []
    query = {"store": view.store, "kind": view.kind, "q": view.text}
    if page > 1:
        nav.append(
            render(
                '<a href="{h}" rel="prev">newer</a>',
                h=url("queues", view.queue, "letters", query={**query, "page": page - 1}),
            )
        )
    if page < pages:
        nav.append(
            render(
                '<a href="{h}" rel="next">older</a>',
                h=url("queues", view.queue, "letters", query={**query, "page": page + 1}),
            )
        )
    body = render(
        '<h1>{title}</h1>{tabs}{note}{problem}{search}<p class="meta" id="summary">{summary}</p>'
        '{table}<p class="pager">{nav}</p>',
        title=title,
        tabs=_tabs(view),
        note=render('<p class="note" role="status">{n}</p>', n=view.note) if view.note else "",
        problem=render('<p class="problem">{p}</p>', p=view.problem) if view.problem else "",
        search=search,
        summary=summary,
        table=table,
        nav=join(nav, " "),
    )
    return layout(title, body, "letters")


def _row(letter: Letter, view: ListView) -> Html:
    detail = url("queues", view.queue, "letters", letter.id, query={"store": view.store})
    script = letter.script.rsplit("/", 1)[-1]
    replay_word = "Run now" if view.store == "retry" else "Replay"
    return render(
        '<tr data-id="{id}">'
        '<td><input type="checkbox" name="id" value="{id}" aria-label="select"></td>'
        '<td><a href="{detail}">{event}</a><br><small title="{script_full}">{script}</small></td>'
        '<td data-col="kind">{kind}</td><td data-col="status">{status}</td>'
        '<td data-col="attempts">{attempts}</td><td>{first}</td><td>{last}</td>'
        '<td class="error" data-col="error">{error}</td>'
        '<td class="actions"><button type="submit" name="one" value="replay:{id}">{rw}</button> '
        '<button type="submit" name="one" value="delete:{id}" class="danger" '
        'data-confirm="Delete this job for good?">Delete</button></td></tr>',
        id=letter.id,
        detail=detail,
        event=letter.event or script or letter.id[:12],
        script=script if letter.event else "",
        script_full=letter.script,
        kind=letter.kind,
        status=letter.status or "-",
        attempts=letter.attempts,
        first=when(letter.next_run if view.store == "retry" else letter.first_failure),
        last=when(letter.last_failure),
        error=letter.first_line,
        rw=replay_word,
    )


# ---------------------------------------------------------------- one letter


def letter_page(letter: Letter, view: ListView, parse: ParseSettings) -> Html:
    error = json_view(letter)
    facts = [
        ("queue", letter.queue),
        ("in", view.where),
        ("kind", letter.kind),
        ("HTTP status", letter.status or "-"),
        ("attempts", letter.attempts),
        ("first failure", when(letter.first_failure)),
        ("last failure", when(letter.last_failure)),
    ]
    if letter.next_run:
        facts.append(("runs again", when(letter.next_run)))
    if error.get("endpoint"):
        facts.append(("FPM endpoint", error["endpoint"]))
    worker = error.get("worker")
    if isinstance(worker, dict):
        facts.append(("worker", " ".join(f"{k}={v}" for k, v in worker.items())))
    facts.append(("id", letter.id))
    dl = join(render("<dt>{k}</dt><dd>{v}</dd>", k=k, v=v) for k, v in facts)
    texts = []
    for key, label in (
        ("message", "Error"),
        ("stderr", "PHP's stderr"),
        ("stdout_head", "PHP's output (head)"),
        ("traceback", "fastworker's traceback"),
    ):
        if error.get(key):
            texts.append(
                render(
                    '<h2>{l}</h2><pre class="text" data-field="{k}">{t}</pre>',
                    l=label,
                    k=key,
                    t=error[key],
                )
            )
    if letter.job is not None and letter.job.get("error_class"):
        texts.insert(0, render("<h2>Error class</h2><pre>{t}</pre>", t=letter.job["error_class"]))
    params, why = params_sent(letter, parse)
    params_html = (
        render(
            '<table class="params"><tbody>{rows}</tbody></table>',
            rows=join(
                render("<tr><th>{n}</th><td><code>{v}</code></td></tr>", n=n, v=v)
                for n, v in params
            ),
        )
        if params
        else render('<p class="meta">{w}</p>', w=why)
    )
    actions = render(
        '<form method="post" action="{action}" class="bulk">'
        '<input type="hidden" name="csrf" value="{csrf}">'
        '<input type="hidden" name="store" value="{store}">'
        '<button type="submit" name="one" value="replay:{id}">{rw}</button> '
        '<button type="submit" name="one" value="delete:{id}" class="danger" '
        'data-confirm="Delete this job for good?">Delete</button></form>',
        action=url("queues", view.queue, "letters", "act"),
        csrf=view.csrf,
        store=view.store,
        id=letter.id,
        rw="Run now" if view.store == "retry" else "Replay",
    )
    title = f"{letter.event or letter.script or 'Job'}: {letter.kind}"
    body = render(
        '<p><a href="{back}">{back_text}</a></p><h1>{title}</h1>{actions}'
        '<dl class="facts">{dl}</dl>'
        "{texts}<h2>Params sent to PHP (last run)</h2>{params}{body}{extra}",
        back=url("queues", view.queue, "letters", query={"store": view.store}),
        back_text=f"{store_title(view)} of queue {view.queue}",
        title=title,
        actions=actions,
        dl=dl,
        texts=join(texts),
        params=params_html,
        body=_body(letter),
        extra=_extra(letter),
    )
    return layout(title, body, "letters")


def _body(letter: Letter) -> Html:
    bundle = letter.bundle
    if bundle is None:
        return render(
            '<h2>Body ({n} bytes)</h2><pre class="text">{b}</pre>',
            n=len(letter.body),
            b=letter.body,
        )
    lines = join(
        render("<tr><th>{k}</th><td><code>{v}</code></td></tr>", k=k, v=v)
        for k, v in bundle.fields.items()
    )
    decoded = (
        render(
            "<h3>Data, base64-decoded (PHP's serialize() of the event)</h3>"
            '<pre class="text" data-field="decoded">{d}</pre>',
            d=bundle.decoded,
        )
        if bundle.decoded is not None
        else ""
    )
    return render(
        "<h2>Body: the deferred-event bundle's format</h2><h3>Header lines</h3>"
        '<table class="params"><tbody>{lines}</tbody></table>{decoded}'
        '<h3>Data as sent ({n} bytes)</h3><pre class="text">{data}</pre>',
        lines=lines,
        decoded=decoded,
        n=len(bundle.data),
        data=bundle.data,
    )


def _extra(letter: Letter) -> Html:
    parts = []
    if letter.headers:
        parts.append(("AMQP headers", letter.headers))
    if letter.properties:
        parts.append(("AMQP properties", letter.properties))
    if letter.job is not None:
        job = {k: v for k, v in letter.job.items() if k != "fastworker_error"}
        parts.append(("Sidekiq job", job))
    return join(
        render('<h2>{t}</h2><pre class="text">{j}</pre>', t=t, j=_json(v)) for t, v in parts
    )


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2).decode()


__all__ = [
    "ListView",
    "Overview",
    "layout",
    "letter_page",
    "letters_page",
    "message_page",
    "overview_page",
]
