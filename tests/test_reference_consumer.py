"""The aiormq reference consumer's own bookkeeping, against a real RabbitMQ."""

from __future__ import annotations

import asyncio

import aiormq
import uvloop

from fastworker.consumer import _Session


def test_a_requeue_is_never_covered_by_a_later_multiple_ack(rabbitmq_url, queue_name) -> None:
    # Deliveries 1 and 3 finished, 2 is handed back. Once 2 is discarded from the ack
    # bookkeeping, the next flush acks 1..3 with one multiple=True ack: if that reached the
    # broker before the nack of 2, it would ack the message meant to be requeued (and the nack
    # would then close the channel with "unknown delivery tag").
    async def main() -> tuple[bytes, bool, bool]:
        connection = await aiormq.connect(rabbitmq_url)
        try:
            publish = await connection.channel()
            await publish.queue_declare(queue_name)
            for i in range(3):
                await publish.basic_publish(f"m{i}".encode(), routing_key=queue_name)
            channel = await connection.channel(publisher_confirms=False)
            await channel.basic_qos(prefetch_count=10)
            got: asyncio.Queue[aiormq.abc.DeliveredMessage] = asyncio.Queue()
            await channel.basic_consume(queue_name, got.put)
            deliveries = [await asyncio.wait_for(got.get(), 10) for _ in range(3)]
            tags = [d.delivery_tag for d in deliveries]
            session = _Session(channel, publisher=None)  # type: ignore[arg-type]
            for tag in tags:
                session.acks.delivered(tag)
            session.finished(tags[0])
            session.finished(tags[2])
            session._flush_soon()  # a flush is on its way, as the ack timer starts one
            session.requeue(tags[1])  # ... when the job of delivery 2 gives it back
            again = await asyncio.wait_for(got.get(), 10)
            await asyncio.sleep(0.2)
            return again.body, bool(again.redelivered), channel.is_closed
        finally:
            await connection.close()

    body, redelivered, closed = uvloop.run(main())
    assert (body, redelivered, closed) == (b"m1", True, False)


def test_a_publish_without_a_confirm_in_time_fails_instead_of_waiting(
    rabbitmq_url, queue_name
) -> None:
    # A broker short of memory or disk blocks publishers without a word (connection.blocked):
    # a failed job's retry must not hold its slot forever. Here no confirm can arrive in time.
    from fastworker.broker import Publisher, PublishFailed

    async def main() -> str:
        connection = await aiormq.connect(rabbitmq_url)
        try:
            channel = await connection.channel()
            await channel.queue_declare(queue_name)
            publisher = Publisher(await connection.channel(publisher_confirms=True), timeout=0)
            try:
                await publisher.publish(queue_name, b"x", aiormq.spec.Basic.Properties())
            except PublishFailed as exc:
                return str(exc)
            return "published"
        finally:
            await connection.close()

    assert "no confirm from the broker within 0 s" in uvloop.run(main())
