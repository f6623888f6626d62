"""`fastworker check`: tries the worker's settings before jobs depend on them.

With the same flags as the worker, it connects to the broker, looks for the queues, sends one
FastCGI request for `--script` to each `--fpm` endpoint, and checks the allow-lists against what
the deferred-event bundle sends by default. It prints one line per check, saying what works and
what to fix. Exit status: 0 when everything works, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiormq
from aiormq.abc import AbstractConnection

from fastworker import broker, cgi, queue_types
from fastworker.amqp_nodes import Node, Nodes
from fastworker.amqp_url import UrlError
from fastworker.callbacks import awaited
from fastworker.endpoint import Endpoint
from fastworker.executor import Executor
from fastworker.fcgi_base import REQUEST_COMPLETE
from fastworker.fpm import FpmError, FpmPool, FpmPools
from fastworker.job import Job, JobRefused
from fastworker.targets import TargetPolicy, parse_alias
from fastworker.worker import Settings

# What the deferred-event bundle puts in a message unless the app configures otherwise.
BUNDLE_ENDPOINT = "localhost:9000"


@dataclass(slots=True)
class Finding:
    what: str
    ok: bool
    detail: str


async def check(settings: Settings, timeout: float = 10.0) -> list[Finding]:
    if settings.backend == "sidekiq":
        findings = await _redis(settings, timeout)
    else:
        findings = await _broker(settings, timeout)
    allow = _allow_lists(settings)
    if settings.backend == "sidekiq":  # Sidekiq jobs carry data only: they run on the first --fpm
        allow = [f for f in allow if not f.what.startswith("bundle default endpoint")]
    findings += allow
    findings += await _endpoints(settings, timeout)
    return findings


async def _redis(settings: Settings, timeout: float) -> list[Finding]:
    """--backend sidekiq: Redis answers, and how many jobs wait in each queue's list and in
    Sidekiq's retry and dead sets."""
    from fastworker.sidekiq_store import connect

    where = f"Redis {broker.masked(settings.redis_url)}"
    client = connect(settings.redis_url)
    try:
        async with asyncio.timeout(timeout):
            await client.ping()
            findings = [Finding(where, True, "connected")]
            for queue in settings.queues:
                waiting = await client.llen(f"queue:{queue}")
                findings.append(
                    Finding(f"Sidekiq queue {queue}", True, f"list queue:{queue}, {waiting} jobs")
                )
            retry, dead = await client.zcard("retry"), await client.zcard("dead")
            findings.append(
                Finding("Sidekiq sets", True, f"{retry} jobs to retry, {dead} dead (all queues)")
            )
            return findings
    except Exception as exc:  # noqa: BLE001 - every failure is a finding
        return [Finding(where, False, f"{type(exc).__name__}: {exc} (check --redis-url)")]
    finally:
        await client.aclose()


async def _broker(settings: Settings, timeout: float) -> list[Finding]:
    """One line per --amqp-url (a cluster's nodes): each is tried; the queues are looked for
    on the first that answers. A node that does not answer is to fix only when none does (the
    worker uses the others); a refusal (TLS, login, vhost, access) always is."""
    urls = settings.effective_amqp_urls
    try:
        nodes = Nodes.parse(urls)
    except UrlError as exc:  # a bad URL or an unreadable CA/cert/key file
        return [Finding(f"broker {', '.join(map(broker.masked, urls))}", False, str(exc))]
    tried = [(node, *await _node(node, timeout)) for node in nodes.nodes]
    connections = [connection for *_, connection in tried if connection is not None]
    findings = []
    for node, detail, refused, connection in tried:
        ok = connection is not None or (bool(connections) and not refused)
        if connection is None and ok:
            detail += " (the worker uses the nodes that answer)"
        findings.append(Finding(f"broker {node.masked}", ok, detail))
    if not connections:
        return findings
    try:
        findings += await _queues(connections[0], settings)
    finally:
        for connection in connections:
            await connection.close()
    return findings


async def _node(node: Node, timeout: float) -> tuple[str, bool, AbstractConnection | None]:
    """Connects to one node: what happened, whether the broker refused (a configuration to
    fix), and the connection if it was made."""
    url, parsed = node.url.text, node.url
    try:
        connection = await asyncio.wait_for(broker.connect(parsed, node.tls, "check"), timeout)
    except Exception as exc:  # noqa: BLE001 - every failure is a finding
        refused = broker.refusal(url, exc)
        if refused is not None:
            return refused, True, None
        return broker.unreachable(url, exc) or repr(exc), False, None
    how = "connected and logged in"
    if node.tls is not None:
        verified = "verified" if parsed.verify else "NOT verified (verify_none)"
        client = ", with the client certificate" if parsed.certfile else ""
        how = f"connected over TLS (broker certificate {verified}{client}) and logged in"
    return how, False, connection


async def _queues(connection: AbstractConnection, settings: Settings) -> list[Finding]:
    findings = []
    declared = (
        "as a quorum queue (--queue-type quorum)"
        if settings.queue_type == queue_types.QUORUM
        else "as the bundle does (durable=false)"
    )
    for queue in settings.queues:
        channel = await connection.channel()
        try:
            ok = await channel.queue_declare(queue, passive=True)
            findings.append(Finding(f"queue {queue}", True, f"exists, {ok.message_count} ready"))
        except aiormq.exceptions.ChannelNotFoundEntity:
            findings.append(
                Finding(f"queue {queue}", True, f"missing: the worker declares it {declared}")
            )
        except aiormq.exceptions.AMQPError as exc:
            findings.append(Finding(f"queue {queue}", False, repr(exc)))
        finally:
            if not channel.is_closed:
                await channel.close()
    return findings


def _policy(settings: Settings) -> TargetPolicy:
    endpoints = [Endpoint.parse(text) for text in settings.fpm]
    aliases = dict(parse_alias(text) for text in settings.fpm_alias)
    return TargetPolicy(endpoints, settings.allow_script or [settings.script], aliases)


def _allow_lists(settings: Settings) -> list[Finding]:
    policy = _policy(settings)
    findings = []
    bundle = Endpoint.parse(BUNDLE_ENDPOINT)
    try:
        endpoint, _ = policy.resolve(Job(settings.script, endpoint=bundle))
        findings.append(
            Finding(
                f"bundle default endpoint {BUNDLE_ENDPOINT}",
                True,
                f"messages naming it run on {endpoint}",
            )
        )
    except JobRefused:
        findings.append(
            Finding(
                f"bundle default endpoint {BUNDLE_ENDPOINT}",
                False,
                "messages naming it would be dead-lettered as not_allowed: add "
                f"--fpm-alias {BUNDLE_ENDPOINT}={policy.default_endpoint} (or list it with "
                "--fpm) unless your app sets fastcgi_host/fastcgi_port",
            )
        )
    try:
        policy.resolve(Job(settings.script))
        findings.append(Finding(f"script {settings.script}", True, "allowed"))
    except JobRefused as exc:
        findings.append(Finding(f"script {settings.script}", False, str(exc)))
    return findings


async def _endpoints(settings: Settings, timeout: float) -> list[Finding]:
    policy = _policy(settings)
    pools = FpmPools(1, connect_timeout=min(timeout, settings.connect_timeout))
    executor = Executor(pools, policy, timeout)
    findings = []
    try:
        for endpoint in policy.endpoints:
            findings.append(await _one_request(executor, pools.get(endpoint), settings.script))
    finally:
        await pools.close()
    return findings


async def _one_request(executor: Executor, pool: FpmPool, script: str) -> Finding:
    """One request for `script`, with no job data: a script that needs data answers 4xx,
    which still proves that PHP-FPM runs it there."""
    what = f"PHP-FPM {pool.endpoint}"
    params, body = executor.fastcgi_params(Job(script), script)
    params["FASTWORKER_CHECK"] = "1"
    started = time.monotonic()
    try:
        response = await awaited(pool.request, params, body, executor.job_timeout, b"")
    except FpmError as exc:
        return Finding(what, False, f"{exc} (is PHP-FPM listening there?)")
    ms = (time.monotonic() - started) * 1000
    if response.protocol_status != REQUEST_COMPLETE:
        return Finding(what, False, f"FastCGI protocol status {response.protocol_status}")
    status = cgi.response_status(response.stdout)
    _, body_out = cgi.header_block(response.stdout)
    text = cgi.error_message(response.stderr, body_out, status)
    if status == 404 or "Primary script unknown" in text:
        return Finding(
            what,
            False,
            f"{script} does not exist where PHP-FPM runs (404: {text}): check --script and "
            "the dispatch_path your app sends",
        )
    if 200 <= status < 300:
        return Finding(what, True, f"ran {script}: status {status}, {ms:.0f} ms")
    return Finding(
        what,
        True,
        f"ran {script}: status {status} without job data ({text}), {ms:.0f} ms",
    )


def report(findings: list[Finding]) -> str:
    width = max(len(f.what) for f in findings)
    lines = [f"{'ok  ' if f.ok else 'FIX '} {f.what.ljust(width)}  {f.detail}" for f in findings]
    bad = sum(not f.ok for f in findings)
    lines.append(f"{len(findings) - bad} of {len(findings)} checks passed")
    return "\n".join(lines)
