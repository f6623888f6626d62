"""`fastworker web` in a real browser (headless Chromium via selenium) against a real worker,
RabbitMQ (or Redis for the Sidekiq backend) and PHP-FPM: what the overview counts matches what
ran, the failed jobs are listed with PHP's error, Replay runs a job once and Delete removes one,
even when two operators act on one letter; PHP's error text is shown as text, never as markup;
a POST without the form's token changes nothing; and the process will not listen beyond
loopback without auth.

Set FASTWORKER_WEB_SCREENSHOTS=docs/screenshots to refresh the README's screenshots.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fastworker.web_html import Html, render, url
from fastworker.web_letters import mask
from fastworker.web_sampler import Sampler, WorkerView, read_metrics
from fastworker.web_security import SecurityError, check_exposure, parse_listen
from helpers import bundle_message, order_placed_data, read_records, wait_for
from services import PHP_DIR, ROOT
from services.browser import basic_auth, screenshot, start_chromium, wait_until
from services.fpm import FpmServer
from services.process import free_loopback_port
from services.rabbitmq import QUEUE_PREFIX, amqp_delete_queues, amqp_publish, amqp_queue_count
from services.sidekiq import sidekiq_push
from services.web import WebProcess, run_web
from services.worker import Workers

USER, PASSWORD = "ops", "s3cret-pass"
HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)">'
FAILING = (3, 50, 97, 150, 201, 260)  # listener.php throws for these; hostile.php for 299


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def shots_dir() -> Path | None:
    """Where screenshots are copied: $FASTWORKER_WEB_SCREENSHOTS, relative to the repository."""
    where = os.environ.get("FASTWORKER_WEB_SCREENSHOTS")
    return ROOT / where if where else None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    driver = start_chromium(tmp_path / "chromium")
    yield driver
    driver.quit()


@pytest.fixture
def orders_queue(rabbitmq_url: str) -> Iterator[str]:
    """A short queue name, for screenshots: the session's prefix and "orders"."""
    name = f"{QUEUE_PREFIX}orders"
    yield name
    amqp_delete_queues(rabbitmq_url, [name, f"{name}.failed"])


def by_css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def cell(driver: Any, selector: str) -> str:
    """The first match's text. The overview swaps in a fresh copy of its live section every
    --interval, so an element found a moment ago may be gone by the time it is read: find it
    again (an assertion on the text must not race the refresh)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(20):
        found = by_css(driver, selector)
        try:
            return found[0].text.strip() if found else ""
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"{selector}: replaced by the page's refresh on every read")


def rows(driver: Any) -> list[Any]:
    return by_css(driver, "table.letters tbody tr[data-id]")


def row_with(driver: Any, text: str) -> Any:
    for row in rows(driver):
        if text in row.text:
            return row
    raise AssertionError(f"no row with {text!r}")


def no_alert(driver: Any) -> None:
    """No dialog opened, no injected element exists, and the only script is ours."""
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert  # noqa: B018
    assert by_css(driver, 'img[src="x"]') == []
    sources = [s.get_attribute("src") or "inline" for s in by_css(driver, "script")]
    assert len(sources) == 1 and sources[0].endswith("/static/dashboard.js"), sources


def click_and_confirm(driver: Any, button: Any) -> None:
    button.click()
    wait_until(lambda: driver.switch_to.alert, 5, "the confirm dialog").accept()


def note(driver: Any) -> str:
    return cell(driver, "p.note")


# --------------------------------------------------------------------------- the done-when run


def test_the_dashboard_shows_runs_replays_and_deletes_failed_jobs(
    rabbitmq_url: str,
    orders_queue: str,
    fpm: FpmServer,
    workers: Workers,
    browser: Any,
    tmp_path: Path,
) -> None:
    queue_name = orders_queue
    fpm.clear_records()
    fixed = fpm.record_file.parent / "fixed"  # listener.php's "the bug is fixed" flag
    fixed.unlink(missing_ok=True)
    failed_file = Path(f"{fpm.record_file}.fail")
    failed_file.unlink(missing_ok=True)
    metrics_port = free_loopback_port()
    workers.start(
        [
            "--amqp-url", rabbitmq_url, "--queue", queue_name, "--fpm", fpm.address,
            "--script", str(PHP_DIR / "listener.php"), "--allow-script", f"{PHP_DIR}/*.php",
            "--max-attempts", "2", "--retry-delay", "0.1", "--retry-max-delay", "0.2",
            "--metrics-port", str(metrics_port), "--stats-interval", "0",
        ]
    )  # fmt: skip
    web = WebProcess(
        [
            "--amqp-url", rabbitmq_url, "--queue", queue_name,
            "--workers", f"http://127.0.0.1:{metrics_port}",
            "--retry-delay", "0.1", "--retry-max-delay", "0.2",
            "--script", str(PHP_DIR / "listener.php"), "--interval", "0.5", "--history", "120",
        ],
        tmp_path / "web.log",
        auth=(USER, PASSWORD),
    )  # fmt: skip
    try:
        _done_when(web, rabbitmq_url, queue_name, fpm, fixed, failed_file, browser, tmp_path)
    finally:
        assert web.stop() == 0, web.log()


def _done_when(
    web: WebProcess,
    url: str,
    queue: str,
    fpm: FpmServer,
    fixed: Path,
    failed_file: Path,
    browser: Any,
    tmp_path: Path,
) -> None:
    datas = {i: order_placed_data(i, "FAIL" if i in FAILING else f"order {i}") for i in range(300)}
    bodies = [
        bundle_message(
            data, str(PHP_DIR / ("hostile.php" if i == 299 else "listener.php")), host="", port=""
        )
        for i, data in datas.items()
    ]
    for start in range(0, 300, 50):  # a few seconds of traffic, for the chart
        amqp_publish(url, queue, bodies[start : start + 50])
        time.sleep(0.4)
    wait_for(lambda: len(fpm.records()) >= 293, timeout=60, what="293 jobs run")
    wait_for(lambda: amqp_queue_count(url, f"{queue}.failed") == 7, timeout=30, what="7 dead")
    shots = tmp_path / "screenshots"

    # Without credentials: nothing.
    assert web.request("/", auth=None)[0] == 401
    assert web.request("/", auth=(USER, "wrong"))[0] == 401

    # The overview: 293 successes, 7 dead letters, the worker healthy; live with JS on.
    basic_auth(browser, USER, PASSWORD)
    browser.get(web.base + "/")
    row = f'tr[data-queue="{queue}"]'
    wait_until(lambda: cell(browser, f'{row} td[data-col="succeeded"]') == "293", 20, "293 ok")
    wait_until(lambda: cell(browser, f'{row} td[data-col="dead"]') == "7", 20, "7 dead letters")
    # The totals come from the workers' metrics, sampled apart from the queue counts above:
    # the page catches up within a sampling interval.
    wait_until(lambda: cell(browser, "#total-success") == "293", 20, "293 in the totals")
    wait_until(lambda: cell(browser, "#total-dead") == "7", 20, "7 dead in the totals")
    assert cell(browser, f'{row} td[data-col="dead-lettered"]') == "7"
    assert cell(browser, 'td[data-col="health"]') == "200 consuming"
    assert cell(browser, 'td[data-col="concurrency"]') == "4"
    assert cell(browser, f'tr[data-endpoint="{fpm.address}"] td[data-col="errors"]') == "14"
    stamp = cell(browser, "p.meta")
    wait_until(lambda: cell(browser, "p.meta") != stamp, 10, "the script to refresh the page")
    assert by_css(browser, "svg.chart polyline.success")
    screenshot(browser, shots / "overview.png", shots_dir())

    # The dead letters: 7, each with PHP's error text; the hostile one as text.
    by_css(browser, 'a[href="/letters"]')[0].click()
    wait_until(lambda: len(rows(browser)) == 7, 20, "7 rows")
    for i in FAILING:
        text = row_with(browser, f"listener failed for event {sha1(datas[i])}").text
        assert "Uncaught RuntimeException" in text and "php_error" in text and "500" in text
    hostile = row_with(browser, HOSTILE)
    assert 'onerror="alert(2)"' in hostile.find_element("css selector", "td.error").text
    no_alert(browser)
    screenshot(browser, shots / "dead-letters.png", shots_dir())

    # One letter in detail: the whole error, the params sent, the decoded body.
    x, z, w = FAILING[0], FAILING[1], FAILING[2]
    row_with(browser, sha1(datas[x])).find_element("css selector", "td a").click()
    wait_until(lambda: by_css(browser, 'pre[data-field="stderr"]'), 10, "the detail page")
    assert f"listener failed for event {sha1(datas[x])}" in cell(
        browser, 'pre[data-field="message"]'
    )
    assert "Stack trace" in cell(browser, 'pre[data-field="stderr"]')
    params = cell(browser, "table.params")
    assert f"DEFERRED_DATA {datas[x]}" in params and "FASTWORKER_ATTEMPT 2" in params
    assert f'"id";i:{x};' in cell(browser, 'pre[data-field="decoded"]')
    screenshot(browser, shots / "dead-letter.png", shots_dir())
    browser.back()
    wait_until(lambda: len(rows(browser)) == 7, 10, "the list again")
    row_with(browser, HOSTILE).find_element("css selector", "td a").click()
    wait_until(lambda: HOSTILE in cell(browser, 'pre[data-field="message"]'), 10, "hostile text")
    assert HOSTILE in cell(browser, 'pre[data-field="stderr"]')
    no_alert(browser)
    browser.back()

    # The cause fixed, Replay on one runs it once: 6 left.
    fixed.touch()
    failures_before = read_records(failed_file)
    wait_until(lambda: len(rows(browser)) == 7, 10, "the list")
    row_with(browser, sha1(datas[x])).find_element(
        "css selector", 'button[value^="replay:"]'
    ).click()
    wait_until(lambda: "Replayed 1 dead letter" in note(browser), 15, "the replay's note")
    assert len(rows(browser)) == 6
    wait_for(
        lambda: any(r[1] == sha1(datas[x]) for r in fpm.records()), 20, what="the replayed job"
    )
    # Delete on another: 5 left; it never runs.
    delete = row_with(browser, sha1(datas[z])).find_element(
        "css selector", 'button[value^="delete:"]'
    )
    click_and_confirm(browser, delete)
    wait_until(lambda: "Deleted 1 dead letter" in note(browser), 15, "the delete's note")
    assert len(rows(browser)) == 5
    browser.get(web.base + "/")
    wait_until(lambda: cell(browser, f'{row} td[data-col="dead"]') == "5", 20, "5 dead letters")
    wait_until(lambda: cell(browser, f'{row} td[data-col="succeeded"]') == "294", 20, "294 ok")

    # Two operators, one letter: another one replays w while this page is open; this
    # operator's Replay then says so, and w runs once.
    browser.get(web.base + f"/queues/{queue}/letters")
    wait_until(lambda: len(rows(browser)) == 5, 10, "5 rows")
    w_id = row_with(browser, sha1(datas[w])).get_attribute("data-id")
    token = web.csrf(f"/queues/{queue}/letters")
    status, _ = web.request(
        f"/queues/{queue}/letters/act", {"csrf": token, "one": f"replay:{w_id}"}
    )
    assert status == 303
    row_with(browser, sha1(datas[w])).find_element(
        "css selector", 'button[value^="replay:"]'
    ).click()
    wait_until(lambda: "already gone" in note(browser), 15, "the note that it was gone")
    assert "Replayed" not in note(browser)
    assert len(rows(browser)) == 4
    wait_for(lambda: any(r[1] == sha1(datas[w]) for r in fpm.records()), timeout=20, what="w")
    time.sleep(1.0)  # time for a second run, if one were coming
    runs = [r[1] for r in fpm.records()]
    assert runs.count(sha1(datas[x])) == 1 and runs.count(sha1(datas[w])) == 1
    assert sha1(datas[z]) not in runs  # deleted: never ran again
    assert read_records(failed_file) == failures_before  # nothing failed again

    # Search by kind and text.
    search = by_css(browser, 'input[name="q"]')[0]
    search.send_keys(sha1(datas[FAILING[3]]))
    search.submit()
    wait_until(lambda: "1 match" in cell(browser, "#summary"), 10, "the search")
    assert len(rows(browser)) == 1
    browser.get(web.base + f"/queues/{queue}/letters?kind=timeout")
    wait_until(lambda: "0 match" in cell(browser, "#summary"), 10, "no timeouts")

    # A selection: the hostile one and another, deleted at once; 2 left.
    browser.get(web.base + f"/queues/{queue}/letters")
    wait_until(lambda: len(rows(browser)) == 4, 10, "4 rows")
    for text in (HOSTILE, sha1(datas[FAILING[4]])):
        row_with(browser, text).find_element("css selector", 'input[name="id"]').click()
    click_and_confirm(browser, by_css(browser, 'button[name="action"][value="delete"]')[0])
    wait_until(lambda: "Deleted 2 dead letters" in note(browser), 15, "the selection's note")
    assert len(rows(browser)) == 2
    assert amqp_queue_count(url, f"{queue}.failed") == 2

    # A POST without the token (or with a wrong one) changes nothing.
    last = rows(browser)[0].get_attribute("data-id")
    act = f"/queues/{queue}/letters/act"
    assert web.request(act, {"one": f"delete:{last}"})[0] == 403
    assert web.request(act, {"csrf": "0" * 64, "one": f"delete:{last}"})[0] == 403
    browser.execute_script(
        "var f = document.createElement('form'); f.method = 'post'; f.action = arguments[0];"
        "var i = document.createElement('input'); i.name = 'one'; i.value = arguments[1];"
        "f.appendChild(i); document.body.appendChild(f); f.submit();",
        act,
        f"delete:{last}",
    )
    wait_until(lambda: "no valid form token" in browser.page_source, 10, "the refusal page")
    assert amqp_queue_count(url, f"{queue}.failed") == 2
    # Queues it was not given are not there.
    assert web.request("/queues/other/letters")[0] == 404
    assert (
        web.request("/queues/other/letters/act", {"csrf": token, "one": f"delete:{last}"})[0] == 404
    )

    # With JavaScript off, the pages read the same.
    plain = start_chromium(tmp_path / "chromium-nojs", javascript=False)
    try:
        basic_auth(plain, USER, PASSWORD)
        plain.get(web.base + "/")
        assert cell(plain, f'{row} td[data-col="dead"]') == "2"
        assert cell(plain, "#total-success") == "295"
        assert by_css(plain, "svg.chart")
        plain.get(web.base + f"/queues/{queue}/letters")
        assert len(rows(plain)) == 2
    finally:
        plain.quit()


# --------------------------------------------------------------------------- exposure


def test_it_refuses_to_listen_beyond_loopback_without_auth() -> None:
    done = run_web(["--listen", "0.0.0.0:8090"], env={"FASTWORKER_WEB_AUTH": ""})
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0:8090 without --auth" in done.stderr
    assert "FASTWORKER_WEB_AUTH" in done.stderr
    for listen in ("[::]:8090", "10.1.2.3:8090", "example.com:8090"):
        assert run_web(["--listen", listen], env={"FASTWORKER_WEB_AUTH": ""}).returncode == 2
    assert run_web(["--auth", "nopassword"]).returncode == 2
    with pytest.raises(SecurityError):
        check_exposure(*parse_listen("0.0.0.0:1"), None)
    check_exposure(*parse_listen("[::1]:8090"), None)
    check_exposure(*parse_listen("localhost:8090"), None)


def test_with_auth_it_listens_on_every_address(rabbitmq_url: str, tmp_path: Path) -> None:
    web = WebProcess(
        ["--amqp-url", rabbitmq_url],
        tmp_path / "web.log",
        auth=(USER, PASSWORD),
        host="0.0.0.0",
        auth_in_env=True,
    )
    try:
        assert web.request("/", auth=None)[0] == 401
        status, page = web.request("/")
        assert status == 200 and "Overview" in page
    finally:
        assert web.stop() == 0, web.log()


# --------------------------------------------------------------------------- Sidekiq


def test_sidekiqs_retry_and_dead_sets_on_the_same_pages(
    sidekiq_url: str, fpm: FpmServer, workers: Workers, browser: Any, tmp_path: Path
) -> None:
    fpm.clear_records()
    fixed = fpm.record_file.parent / "fixed"
    fixed.unlink(missing_ok=True)
    metrics_port = free_loopback_port()
    queue = "orders"
    retrying = [order_placed_data(1000 + i, "FAIL") for i in range(2)]
    dying = [order_placed_data(2000 + i, "FAIL") for i in range(2)]
    fine = [order_placed_data(3000 + i, "fine") for i in range(16)]
    assert sidekiq_push(sidekiq_url, queue, fine + retrying) == 18
    assert sidekiq_push(sidekiq_url, queue, dying, retry=False) == 2
    workers.start(
        [
            "--backend", "sidekiq", "--redis-url", sidekiq_url, "--queue", queue,
            "--fpm", fpm.address, "--script", str(PHP_DIR / "listener.php"),
            "--max-attempts", "3", "--retry-delay", "3600", "--retry-max-delay", "3600",
            "--metrics-port", str(metrics_port), "--stats-interval", "0",
        ]
    )  # fmt: skip
    r = redis.Redis.from_url(sidekiq_url)
    wait_for(lambda: r.zcard("retry") == 2 and r.zcard("dead") == 2, timeout=30, what="sets")
    web = WebProcess(
        [
            "--backend", "sidekiq", "--redis-url", sidekiq_url, "--queue", queue,
            "--workers", f"http://127.0.0.1:{metrics_port}", "--interval", "0.5",
            "--script", str(PHP_DIR / "listener.php"),
        ],
        tmp_path / "web.log",
    )  # fmt: skip
    try:
        browser.get(web.base + "/")
        row = f'tr[data-queue="{queue}"]'
        wait_until(lambda: cell(browser, f'{row} td[data-col="succeeded"]') == "16", 20, "16 ok")
        assert cell(browser, f'{row} td[data-col="retrying"]') == "2"
        assert cell(browser, f'{row} td[data-col="dead"]') == "2"
        browser.get(web.base + f"/queues/{queue}/letters")
        wait_until(lambda: len(rows(browser)) == 2, 10, "2 dead jobs")
        for data in dying:
            assert f"listener failed for event {sha1(data)}" in row_with(browser, sha1(data)).text
        browser.get(web.base + f"/queues/{queue}/letters?store=retry")
        wait_until(lambda: len(rows(browser)) == 2, 10, "2 retrying jobs")
        assert "Retry set of queue orders" in browser.title
        screenshot(browser, tmp_path / "screenshots" / "sidekiq-retry.png", shots_dir())
        row_with(browser, sha1(retrying[1])).find_element("css selector", "td a").click()
        wait_until(lambda: by_css(browser, 'pre[data-field="message"]'), 10, "a job's detail")
        assert sha1(retrying[1]) in cell(browser, 'pre[data-field="message"]')
        params = cell(browser, "table.params")
        assert f"DEFERRED_DATA {retrying[1]}" in params and "FASTWORKER_ATTEMPT 1" in params
        assert "RuntimeException" in cell(browser, "main")  # Sidekiq's error_class
        browser.back()

        fixed.touch()
        # Run now, on a retrying job; Replay, on a dead one: each runs once.
        target = row_with(browser, sha1(retrying[0]))
        target.find_element("css selector", 'button[value^="replay:"]').click()
        wait_until(lambda: "Replayed 1 retrying job" in note(browser), 15, "run now")
        browser.get(web.base + f"/queues/{queue}/letters?store=dead")
        wait_until(lambda: len(rows(browser)) == 2, 10, "the dead set")
        stale = row_with(browser, sha1(dying[0])).find_element(
            "css selector", 'button[value^="replay:"]'
        )
        dead_id = row_with(browser, sha1(dying[0])).get_attribute("data-id")
        token = web.csrf(f"/queues/{queue}/letters")
        form = {"csrf": token, "store": "dead", "one": f"replay:{dead_id}"}
        assert web.request(f"/queues/{queue}/letters/act", form)[0] == 303
        stale.click()  # a second operator, on the page as it was
        wait_until(lambda: "already gone" in note(browser), 15, "gone")
        delete = row_with(browser, sha1(dying[1])).find_element(
            "css selector", 'button[value^="delete:"]'
        )
        click_and_confirm(browser, delete)
        wait_until(lambda: "Deleted 1 dead job" in note(browser), 15, "deleted")
        assert rows(browser) == []
        for data in (retrying[0], dying[0]):
            wait_for(
                lambda d=data: any(rec[1] == sha1(d) for rec in fpm.records()), 20, what="a run"
            )
        time.sleep(1.0)
        runs = [rec[1] for rec in fpm.records()]
        assert runs.count(sha1(retrying[0])) == 1 and runs.count(sha1(dying[0])) == 1
        assert sha1(dying[1]) not in runs and sha1(retrying[1]) not in runs
        assert r.zcard("dead") == 0 and r.zcard("retry") == 1
    finally:
        r.close()
        assert web.stop() == 0, web.log()


# --------------------------------------------------------------------------- small parts


def test_metrics_are_read_with_prometheus_clients_parser() -> None:
    text = (
        "# TYPE fastworker_jobs_total counter\n"
        'fastworker_jobs_total{kind="ok",outcome="success",queue="a"} 5.0\n'
        'fastworker_jobs_total{kind="php_error",outcome="retry",queue="a"} 2.0\n'
        'fastworker_jobs_total{kind="timeout",outcome="retry",queue="a"} 1.0\n'
        "# TYPE fastworker_inflight_jobs gauge\nfastworker_inflight_jobs 3.0\n"
        "# TYPE fastworker_fpm_errors_total counter\n"
        'fastworker_fpm_errors_total{endpoint="unix:/x",kind="lost"} 4.0\n'
    )
    view = WorkerView("http://w")
    read_metrics(view, text)
    assert view.total("success") == 5 and view.total("retry") == 3
    assert view.in_flight == 3 and view.fpm_errors == {("unix:/x", "lost"): 4.0}


def test_secrets_in_params_are_masked() -> None:
    assert mask("JOB_PARAM_API_KEY", "abc") == "***"
    assert mask("DATABASE_PASSWORD", "abc") == "***"
    assert mask("DSN", "mysql://app:hunter2@db/app") == "mysql://app:***@db/app"
    assert mask("HEADER", "Bearer abcdefghijklmnop") == "Bearer ***"
    assert mask("FASTWORKER_QUEUE", "orders") == "orders"


def test_every_value_is_escaped_and_every_url_quoted() -> None:
    page = render('<a href="{h}" title="{t}">{b}</a>', h="/x", t='" onmouseover="x()', b="<b>&")
    assert page == '<a href="/x" title="&quot; onmouseover=&quot;x()">&lt;b&gt;&amp;</a>'
    assert render("{v}", v=Html("<i>ours</i>")) == "<i>ours</i>"
    assert url("queues", "a/b?c#d", "letters", query={"q": "<x>", "kind": ""}) == (
        "/queues/a%2Fb%3Fc%23d/letters?q=%3Cx%3E"
    )


def test_rates_come_from_counter_differences_and_survive_a_restart() -> None:
    class Fake(Sampler):
        def __init__(self) -> None:
            super().__init__(["http://w"], interval=1.0)
            self.totals = [10.0, 30.0, 5.0]  # the worker restarted before the third sample

        async def _read(self, url: str) -> WorkerView:
            view = WorkerView(url, reachable=True, health_status=200)
            view.jobs = {("q", "success"): self.totals.pop(0)}
            return view

    import asyncio

    sampler = Fake()

    async def three() -> None:
        for _ in range(3):
            await sampler.sample_once()
            await asyncio.sleep(0.05)

    asyncio.run(three())
    first, second = sampler.points
    assert first.success > 0 and second.success > 0
    assert first.success / second.success == pytest.approx(20 / 5, rel=0.5)


def test_pause_and_resume_from_the_overview(
    rabbitmq_url: str,
    queue_name: str,
    fpm: FpmServer,
    workers: Workers,
    browser: Any,
    tmp_path: Path,
) -> None:
    """The overview's Pause reaches every worker of the queue (as `fastworker pause`), the row
    says paused, Resume lifts it."""
    worker = workers.start(
        [
            "--amqp-url", rabbitmq_url, "--queue", queue_name, "--fpm", fpm.address,
            "--script", str(PHP_DIR / "record.php"), "--stats-interval", "0",
        ]
    )  # fmt: skip
    web = WebProcess(
        ["--amqp-url", rabbitmq_url, "--queue", queue_name],
        tmp_path / "web.log",
        auth=(USER, PASSWORD),
    )
    try:
        basic_auth(browser, USER, PASSWORD)
        browser.get(web.base + "/")
        row = f'tr[data-queue="{queue_name}"]'
        by_css(browser, f'{row} td[data-col="control"] button')[0].click()
        wait_until(lambda: "workers acknowledged" in note(browser), 20, "the pause note")
        assert note(browser) == f"Paused {queue_name}: 1 workers acknowledged."
        assert cell(browser, f'{row} td[data-col="control"] .paused') == "paused"
        wait_for(lambda: f"paused {queue_name}" in worker.log(), what="the worker paused")
        by_css(browser, f'{row} td[data-col="control"] button')[0].click()
        wait_until(lambda: note(browser).startswith("Resumed"), 20, "the resume note")
        assert by_css(browser, f'{row} td[data-col="control"] .paused') == []
        wait_for(lambda: f"resumed {queue_name}" in worker.log(), what="the worker resumed")
    finally:
        assert web.stop() == 0, web.log()
