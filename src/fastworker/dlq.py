"""`fastworker dlq`: list, replay and purge the dead letters the worker left in `<queue>.failed`.

Listing never consumes: dead letters are taken with basic.get without acking, printed, and go
back to their places in the queue when the channel closes. Replay publishes each dead letter to
its original queue (the `x-fastworker-queue` header) with publisher confirms and acks it only
after the confirm, so a crash in between may duplicate a job, never lose one. Dead letters that
do not match `--kind` are held unacked the same way and return in their order.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiormq
import orjson
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from pamqp.commands import Basic

from fastworker import broker
from fastworker.amqp_nodes import Nodes
from fastworker.amqp_url import TLS_FLAGS, URL_HELP, UrlError, broker_urls
from fastworker.broker import Publisher, PublishFailed
from fastworker.cli import positive_int, worker_parser
from fastworker.config import ConfigError, preset
from fastworker.failures import (
    ATTEMPTS,
    ERROR,
    ERROR_KIND,
    INFRA_RETRIES,
    INTERNAL_HEADERS,
    ORIGINAL_QUEUE,
)
from fastworker.job_context import body_id
from fastworker.message import PROPERTY_NAMES

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_QUEUE = "sf_deferred_events"
CONNECT_TIMEOUT = 10.0
UNKNOWN = "unknown"

# Headers RabbitMQ adds when a retry's delay queue dead-letters it back to the work queue: the
# history of fastworker's own retries, dropped on replay and left out of `headers` like ours.
_BROKER_HISTORY = ("x-death", "x-first-death-", "x-last-death-")
# Not carried over on replay: a replayed job must not expire, and RabbitMQ refuses a user_id
# that is not the replaying connection's user.
_NOT_REPLAYED = ("expiration", "user_id")


class DlqError(Exception):
    """A failure worth one line on stderr and exit status 1."""


def _is_internal(name: str) -> bool:
    return name in INTERNAL_HEADERS or name.startswith(_BROKER_HISTORY)


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _int(value: Any) -> int:
    try:
        return max(0, int(value)) if value is not None else 0
    except (TypeError, ValueError):
        return 0


@dataclass(slots=True)
class DeadLetter:
    """One dead letter as fetched, with its fastworker metadata decoded."""

    position: int  # 1-based place in the dead-letter queue
    body: bytes
    properties: Basic.Properties
    queue: str  # the queue it came from and is replayed to
    kind: str
    attempts: int
    infra_retries: int
    error: dict[str, Any]
    headers: dict[str, Any] = field(default_factory=dict)  # the message's own headers

    @classmethod
    def parse(cls, position: int, delivered: DeliveredMessage, default_queue: str) -> DeadLetter:
        """Decodes the fastworker headers; a message without them gets kind "unknown"."""
        props = delivered.header.properties
        headers = dict(props.headers or {})
        error: dict[str, Any] = {}
        raw_error = headers.get(ERROR)
        if raw_error is not None:
            try:
                decoded = orjson.loads(raw_error)
            except orjson.JSONDecodeError:
                decoded = {"message": _text(raw_error)}
            if isinstance(decoded, dict):
                error = decoded
        kind = _text(headers.get(ERROR_KIND) or error.get("kind") or UNKNOWN)
        if raw_error is None and ERROR_KIND not in headers:
            error["message"] = "no fastworker error metadata (not dead-lettered by fastworker?)"
        queue = _text(headers.get(ORIGINAL_QUEUE) or error.get("queue") or default_queue)
        attempts = _int(headers.get(ATTEMPTS, error.get("attempts")))
        error = {
            "kind": kind,
            "message": error.get("message", ""),
            "status": error.get("status"),
            **{k: v for k, v in error.items() if k not in ("kind", "message", "status")},
        }
        return cls(
            position=position,
            body=delivered.body,
            properties=props,
            queue=queue,
            kind=kind,
            attempts=attempts,
            infra_retries=_int(headers.get(INFRA_RETRIES)),
            error=error,
            headers={k: v for k, v in headers.items() if not _is_internal(k)},
        )

    def to_json(self, dead_letter_queue: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "position": self.position,
            "dead_letter_queue": dead_letter_queue,
            "queue": self.queue,
            "attempts": self.attempts,
            "infra_retries": self.infra_retries,
            "error": self.error,
            "body": self.body.decode("utf-8", "replace"),
            "body_size": len(self.body),
        }
        try:
            self.body.decode("utf-8")
        except UnicodeDecodeError:
            out["body_base64"] = base64.b64encode(self.body).decode()
        out["headers"] = self.headers
        out["properties"] = {
            name: value
            for name in PROPERTY_NAMES
            if (value := getattr(self.properties, name, None)) is not None
        }
        return out

    def replay_properties(self) -> Basic.Properties:
        """The dead letter's properties and own headers, without fastworker's bookkeeping."""
        kept = {
            name: value
            for name in PROPERTY_NAMES
            if name not in _NOT_REPLAYED
            and (value := getattr(self.properties, name, None)) is not None
        }
        if not kept.get("message_id"):  # else aiormq makes up a random one: FASTWORKER_JOB_ID
            kept["message_id"] = body_id(self.body)  # would change on replay
        return Basic.Properties(**kept, headers=dict(self.headers))


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, Decimal):
        return float(value)
    return str(value)


def _one_line(text: str, width: int) -> str:
    flat = "".join(ch if ch.isprintable() else " " for ch in text.replace("\n", " | ")).strip()
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _when(value: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(value)))
    except (TypeError, ValueError, OverflowError):
        return "-"


_COLUMNS = (("#", 4), ("KIND", 11), ("STATUS", 6), ("ATTEMPTS", 8), ("LAST FAILURE", 19))
_MESSAGE_WIDTH = 56
_BODY_WIDTH = 40


def _table_line(cells: Sequence[str]) -> str:
    fixed = [cell.ljust(width) for cell, (_, width) in zip(cells, _COLUMNS, strict=False)]
    message = cells[len(_COLUMNS)].ljust(_MESSAGE_WIDTH)
    return "  ".join([*fixed, message, cells[-1]]).rstrip()


def _preview(body: bytes) -> str:
    """The body for one table cell; for the bundle's format, its script and data, not its head."""
    head, sep, data = body.partition(b"\n\n")
    if sep and b"dispatch_path:" in head:
        lines = head.decode("utf-8", "replace").split("\n")
        fields = dict(line.partition(":")[::2] for line in lines)
        script = fields.get("dispatch_path", "").strip().rsplit("/", 1)[-1]
        return f"{script}: {data.decode('utf-8', 'replace')}"
    return body.decode("utf-8", "replace")


def _table_row(letter: DeadLetter) -> str:
    status = letter.error.get("status")
    return _table_line(
        [
            str(letter.position),
            _one_line(letter.kind, _COLUMNS[1][1]),
            str(status) if status else "-",
            str(letter.attempts),
            _when(letter.error.get("last_failure")),
            _one_line(_text(letter.error.get("message") or ""), _MESSAGE_WIDTH),
            _one_line(_preview(letter.body), _BODY_WIDTH),
        ]
    )


async def _connect(urls: Sequence[str]) -> AbstractConnection:
    """A connection named `... dlq` to the first of `urls` (a cluster's nodes) that answers,
    over TLS as each URL says; DlqError naming the cause."""
    try:
        nodes = Nodes.parse(urls)
    except UrlError as exc:
        raise DlqError(str(exc)) from None
    try:
        _, connection = await broker.connect_any(nodes, "dlq", CONNECT_TIMEOUT)
    except broker.NoBrokerAnswered as exc:
        refused = exc.refusal()  # TLS, login, vhost: say what to fix
        if refused is not None:
            raise DlqError(refused) from None
        if len(exc.errors) == 1:
            node, error = exc.errors[0]
            reason = str(error) or type(error).__name__
            raise DlqError(f"cannot connect to the broker at {node.masked}: {reason}") from None
        raise DlqError(f"cannot connect to the broker at any of its nodes: {exc}") from None
    return connection


async def _dead_letter_count(connection: AbstractConnection, name: str) -> int:
    """Ready messages in the dead-letter queue; DlqError if it does not exist."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        ok = await channel.queue_declare(name, passive=True)
        return int(ok.message_count or 0)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise DlqError(f"no dead-letter queue {name}") from None
    finally:
        if not channel.is_closed:
            await channel.close()


async def _take(
    channel: AbstractChannel, queue: str, count: int, default_queue: str
) -> list[tuple[int, DeadLetter]]:
    """Up to `count` dead letters from the head, unacked: they return when `channel` closes."""
    taken: list[tuple[int, DeadLetter]] = []
    for position in range(1, count + 1):
        delivered = await channel.basic_get(queue, no_ack=False)
        tag = delivered.delivery_tag
        if tag is None:  # Basic.GetEmpty: someone else took the rest
            break
        taken.append((tag, DeadLetter.parse(position, delivered, default_queue)))
    return taken


def _dead_letter_queue(args: argparse.Namespace) -> str:
    return str(args.dead_letter_queue.format(queue=args.queue))


def _write(line: str) -> None:
    sys.stdout.write(line + "\n")


async def show(args: argparse.Namespace) -> int:
    """Prints dead letters without consuming them."""
    name = _dead_letter_queue(args)
    connection = await _connect(args.amqp_url)
    try:
        total = await _dead_letter_count(connection, name)
        wanted = min(total, args.limit) if args.limit else total
        channel = await connection.channel(publisher_confirms=False)
        try:
            letters = await _take(channel, name, wanted, args.queue)
            if args.json:
                for _, letter in letters:
                    _write(orjson.dumps(letter.to_json(name), default=_json_default).decode())
            elif not letters:
                _write(f"no dead letters in {name}")
            else:
                _write(_table_line([title for title, _ in _COLUMNS] + ["MESSAGE", "BODY"]))
                for _, letter in letters:
                    _write(_table_row(letter))
                _write(f"{len(letters)} of {total} dead letters in {name} shown; none consumed")
            sys.stdout.flush()
        finally:
            if not channel.is_closed:
                await channel.close()  # returns every message taken, in its place
    finally:
        await connection.close()
    return 0


async def replay(args: argparse.Namespace) -> int:
    """Sends dead letters back to their queues, attempts reset; acks each after its confirm."""
    name = _dead_letter_queue(args)
    kinds = set(args.kind or ())
    connection = await _connect(args.amqp_url)
    replayed: dict[str, int] = {}
    kept = 0
    failure = ""
    try:
        # Only the messages there now: replayed jobs that fail again land behind them.
        total = await _dead_letter_count(connection, name)
        publisher = await Publisher.open(connection)
        channel = await connection.channel(publisher_confirms=False)
        try:
            for position in range(1, total + 1):
                if args.limit and sum(replayed.values()) >= args.limit:
                    break
                delivered = await channel.basic_get(name, no_ack=False)
                tag = delivered.delivery_tag
                if tag is None:
                    break
                letter = DeadLetter.parse(position, delivered, args.queue)
                if kinds and letter.kind not in kinds:
                    kept += 1  # held unacked; returns in its place when the channel closes
                    continue
                try:
                    await publisher.publish(letter.queue, letter.body, letter.replay_properties())
                except (PublishFailed, aiormq.exceptions.ChannelInvalidStateError) as exc:
                    failure = f"dead letter #{position} not replayed: {exc}"
                    break
                await channel.basic_ack(tag)
                replayed[letter.queue] = replayed.get(letter.queue, 0) + 1
        finally:
            if not channel.is_closed:
                await channel.close()
            await publisher.close()
    finally:
        await connection.close()
    count = sum(replayed.values())
    where = ", ".join(f"{n} to {queue}" for queue, n in replayed.items())
    _write(f"replayed {count} dead letters from {name}" + (f" ({where})" if where else ""))
    if failure:
        raise DlqError(failure)
    return 0


async def purge(args: argparse.Namespace) -> int:
    """Deletes every ready dead letter, after a prompt unless --yes."""
    name = _dead_letter_queue(args)
    connection = await _connect(args.amqp_url)
    try:
        total = await _dead_letter_count(connection, name)
        if not args.yes:
            if not sys.stdin.isatty():
                raise DlqError(f"{name} holds {total} dead letters; add --yes to purge them")
            prompt = f"Purge {total} dead letters from {name}? [y/N] "
            # In a thread, so the connection keeps its heartbeats while the user thinks.
            answer = await asyncio.get_running_loop().run_in_executor(None, input, prompt)
            if answer.strip().lower() not in ("y", "yes"):
                _write("nothing purged")
                return 1
        channel = await connection.channel(publisher_confirms=False)
        try:
            ok = await channel.queue_purge(name)
        finally:
            if not channel.is_closed:
                await channel.close()
    finally:
        await connection.close()
    purged = int(ok.message_count or 0) if ok is not None else 0
    _write(f"purged {purged} dead letters from {name}")
    return 0


# The worker's settings dlq reads as its defaults from $FASTWORKER_* and the --config file.
PRESET_KEYS = (
    "backend",
    "redis_url",
    "amqp_url",
    "amqp_ca",
    "amqp_cert",
    "amqp_key",
    "queue",
    "dead_letter_queue",
)


def build_parser(defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """dlq's flags; `defaults` (by dest) are the worker's settings from its environment and
    config file, which the flags override."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        help="the worker's TOML settings file, for the broker, queue and dead-letter queue "
        "(default: $FASTWORKER_CONFIG)",
    )
    common.add_argument(
        "--backend",
        choices=["amqp", "sidekiq"],
        default="amqp",
        help="amqp: the dead-letter queue in RabbitMQ; sidekiq: Sidekiq's dead set in Redis "
        "(--redis-url), the jobs of --queue (default: %(default)s)",
    )
    common.add_argument(
        "--redis-url",
        default=os.environ.get("FASTWORKER_REDIS_URL", "redis://localhost:6379/0"),
        help="--backend sidekiq: Redis URL (default: $FASTWORKER_REDIS_URL or %(default)s)",
    )
    common.add_argument(
        "--queue",
        metavar="NAME",
        help="the work queue whose dead letters to handle (default: sf_deferred_events; "
        "with --backend sidekiq: default)",
    )
    common.add_argument(
        "--dead-letter-queue",
        default="{queue}.failed",
        metavar="NAME",
        help="the dead-letter queue, {queue} is the work queue; as given to the worker "
        "(default: %(default)s)",
    )
    common.add_argument(
        "--amqp-url",
        action="append",
        metavar="URL",
        help=f"{URL_HELP} (default: $FASTWORKER_AMQP_URL, a comma list, or {DEFAULT_URL})",
    )
    for flag, dest, text in TLS_FLAGS:
        common.add_argument(flag, dest=dest, metavar="PATH", help=text)
    if defaults:
        common.set_defaults(**defaults)  # before the subcommands copy the flags
    parser = argparse.ArgumentParser(
        prog="fastworker dlq",
        description="Inspect, replay and purge the jobs the worker dead-lettered.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "show",
        parents=[common],
        help="list dead letters without consuming them",
        description="Lists dead letters without consuming them: why each failed, how often.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--limit", type=positive_int, metavar="N", help="show the first N only")
    p.set_defaults(run=show)
    p = sub.add_parser(
        "replay",
        parents=[common],
        help="send dead letters back to their queue, attempts reset",
        description="Sends dead letters back to the queue they came from with their original "
        "body and properties and the attempt count reset. The others stay, in order.",
    )
    p.add_argument("--limit", type=positive_int, metavar="N", help="replay at most N")
    p.add_argument(
        "--kind",
        action="append",
        metavar="KIND",
        help="replay only this error kind (php_error, timeout, lost, bad_message, "
        "not_allowed, unknown); repeat for several",
    )
    p.set_defaults(run=replay)
    p = sub.add_parser(
        "purge",
        parents=[common],
        help="delete all dead letters",
        description="Deletes all dead letters; asks first unless --yes.",
    )
    p.add_argument("--yes", action="store_true", help="do not ask")
    p.set_defaults(run=purge)
    return parser


def _run(command: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(command(args))
    return uvloop.run(command(args))


def main(argv: Sequence[str]) -> int:
    """Entry point of `fastworker dlq ...`; returns the exit status."""
    try:
        values = preset(worker_parser(), PRESET_KEYS, argv)
    except ConfigError as exc:
        print(f"fastworker dlq: {exc}", file=sys.stderr)
        return 2
    if isinstance(values.get("queue"), list):  # the worker's queues: dlq takes the first
        values["queue"] = values["queue"][0] if values["queue"] else None
    # Not a default of the repeatable flag (argparse would add the flag's URLs to it).
    preset_urls = values.pop("amqp_url", None)
    args = build_parser(values).parse_args(list(argv))
    try:
        args.amqp_url = broker_urls(
            args.amqp_url or preset_urls or [DEFAULT_URL],
            args.amqp_ca,
            args.amqp_cert,
            args.amqp_key,
        )
    except UrlError as exc:
        print(f"fastworker dlq: {exc}", file=sys.stderr)
        return 2
    if args.backend == "sidekiq":
        return _sidekiq(args)
    args.queue = args.queue or DEFAULT_QUEUE
    # aiormq logs connection trouble itself; the one-line error below says it already.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    try:
        return _run(args.run, args)
    except DlqError as exc:
        sys.stdout.flush()
        print(f"fastworker dlq: {exc}", file=sys.stderr)
        return 1
    except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
        print(f"fastworker dlq: broker error: {exc!r}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head`: the messages were not acked, so none is lost
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


def _sidekiq(args: argparse.Namespace) -> int:
    """The same commands on Sidekiq's dead set (see fastworker.sidekiq_dlq)."""
    import redis.exceptions

    from fastworker import sidekiq_dlq

    args.queue = args.queue or "default"
    try:
        return _run(sidekiq_dlq.COMMANDS[args.command], args)
    except sidekiq_dlq.SidekiqDlqError as exc:
        print(f"fastworker dlq: {exc}", file=sys.stderr)
        return 1
    except (redis.exceptions.RedisError, ConnectionError, OSError) as exc:
        print(f"fastworker dlq: Redis error: {exc!r}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
