"""Batched acks: every tag acked exactly once, multiple=True only over a finished prefix."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from fastworker.acks import AckTracker


def acked_tags(acks: list[tuple[int, bool]], outstanding: list[int]) -> list[int]:
    """What RabbitMQ would ack for these frames; fails like RabbitMQ on an unknown tag."""
    done: list[int] = []
    for tag, multiple in acks:
        assert tag in outstanding, f"unknown delivery tag {tag}"
        if multiple:
            covered = [t for t in outstanding if t <= tag]
        else:
            covered = [tag]
        for t in covered:
            outstanding.remove(t)
        done.extend(covered)
    return done


def test_in_order_completion_is_one_multiple_ack() -> None:
    tracker = AckTracker()
    for tag in range(1, 11):
        tracker.delivered(tag)
    for tag in range(1, 11):
        tracker.finished(tag)
    assert tracker.take() == [(10, True)]
    assert tracker.take() == []


def test_finished_behind_a_slow_delivery_is_acked_alone() -> None:
    tracker = AckTracker()
    for tag in (1, 2, 3, 4):
        tracker.delivered(tag)
    tracker.finished(1)
    tracker.finished(3)
    assert tracker.take() == [(1, True), (3, False)]
    tracker.finished(2)
    tracker.finished(4)
    assert tracker.take() == [(4, True)]


@given(st.integers(1, 60), st.randoms(use_true_random=False), st.sampled_from([0.0, 1.0, 3.0]))
def test_random_completion_acks_each_tag_once(count: int, rnd: random.Random, hold: float) -> None:
    tracker = AckTracker()
    outstanding = list(range(1, count + 1))
    for tag in outstanding:
        tracker.delivered(tag)
    order = outstanding[:]
    rnd.shuffle(order)
    broker = outstanding[:]
    acked: list[int] = []
    now = 0.0
    for tag in order:
        tracker.finished(tag)
        if rnd.random() < 0.3:
            now += rnd.random()
            acked += acked_tags(tracker.take(now, hold), broker)
    acked += acked_tags(tracker.take(now, hold), broker)
    acked += acked_tags(tracker.take(now + hold, hold), broker)  # held ones are due by then
    assert sorted(acked) == list(range(1, count + 1))
    assert broker == []


def test_discard_keeps_a_rejected_tag_out_of_multiple_acks() -> None:
    tracker = AckTracker()
    for tag in (1, 2, 3):
        tracker.delivered(tag)
    tracker.discard(2)
    tracker.finished(1)
    tracker.finished(3)
    broker = [1, 3]  # 2 was nacked
    assert sorted(acked_tags(tracker.take(), broker)) == [1, 3]


def test_hold_waits_before_acking_behind_a_gap() -> None:
    tracker = AckTracker()
    for tag in range(1, 7):
        tracker.delivered(tag)
    for tag in (1, 3, 4):
        tracker.finished(tag)
    assert tracker.take(0.0, 0.01) == [(1, True)]  # 3 and 4 wait: the gap at 2 may close
    assert tracker.pending == 0 and tracker.unacked == 2
    tracker.finished(2)
    tracker.finished(6)
    assert tracker.take(0.004, 0.01) == [(4, True)]  # it did: one multiple ack; 6 now waits
    assert tracker.take(0.012, 0.01) == []  # 6 has waited 8 ms of 10
    assert tracker.take(0.02, 0.01) == [(6, False)]  # still behind 5 after 10 ms: alone
    tracker.finished(5)
    assert tracker.take(0.021, 0.01) == [(5, True)]
    assert tracker.unacked == 0
