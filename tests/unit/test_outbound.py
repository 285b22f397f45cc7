"""Unit tests of a subscription's bounded backlog: hostbusd.core.outbound.OutboundQueue."""

from __future__ import annotations

import itertools

import pytest

from hostbusd.core.outbound import DISCONNECT, DROP_NEW, DROP_OLDEST, Item, OutboundQueue, Overflow

ROOM = 1 << 40  # a connection budget that never binds


def item(tag: int, size: int) -> Item:
    """An item whose block is ``size`` bytes and says which message it is."""
    block = (b"%d:" % tag).ljust(size, b".")[:size] if size else b""
    return (None, block, tag, 0)


def tags(q: OutboundQueue) -> list[int]:
    return [flags for _, _, flags, _ in q.items]


def push(q: OutboundQueue, tag: int, size: int, room: int = ROOM) -> int:
    return q.push(item(tag, size), size, room)


def check_bytes(q: OutboundQueue) -> None:
    assert q.nbytes == sum(len(block) for _, block, _, _ in q.items)
    assert q.msgs == len(q) == sum(n or 1 for _, _, _, n in q.items)


# ---- within bounds ---------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [DROP_OLDEST, DROP_NEW, DISCONNECT])
def test_queues_within_bounds(policy: str) -> None:
    q = OutboundQueue(policy, max_msgs=3, max_bytes=30)
    assert [push(q, i, 10) for i in range(3)] == [10, 10, 10]
    assert len(q) == 3
    assert q.nbytes == 30
    assert q.missed == 0
    assert tags(q) == [0, 1, 2]


def test_pop_is_fifo_and_releases_bytes() -> None:
    q = OutboundQueue(DROP_OLDEST, 10, 100)
    for i in range(3):
        push(q, i, 5 + i)
    assert q.pop()[2] == 0
    assert q.nbytes == 6 + 7
    assert q.pop()[2] == 1
    assert q.pop()[2] == 2
    assert q.nbytes == 0
    assert len(q) == 0


def test_clear_returns_bytes_freed() -> None:
    q = OutboundQueue(DROP_OLDEST, 10, 100)
    push(q, 0, 7)
    push(q, 1, 8)
    assert q.clear() == 15
    assert len(q) == 0
    assert q.nbytes == 0
    assert q.clear() == 0


# ---- drop-oldest -----------------------------------------------------------------------------------


def test_drop_oldest_by_count() -> None:
    q = OutboundQueue(DROP_OLDEST, max_msgs=3, max_bytes=1000)
    deltas = [push(q, i, 10) for i in range(5)]
    assert deltas == [10, 10, 10, 0, 0]
    assert tags(q) == [2, 3, 4]
    assert q.missed == 2
    check_bytes(q)


def test_drop_oldest_by_bytes() -> None:
    q = OutboundQueue(DROP_OLDEST, max_msgs=100, max_bytes=10)
    assert push(q, 0, 4) == 4
    assert push(q, 1, 4) == 4
    assert push(q, 2, 4) == 0  # 12 > 10: message 0 goes
    assert tags(q) == [1, 2]
    assert q.missed == 1
    check_bytes(q)


def test_drop_oldest_drops_as_many_as_needed() -> None:
    q = OutboundQueue(DROP_OLDEST, max_msgs=100, max_bytes=10)
    for i in range(3):
        push(q, i, 3)
    assert push(q, 3, 9) == 9 - 9
    assert tags(q) == [3]
    assert q.missed == 3
    check_bytes(q)


def test_drop_oldest_with_mixed_sizes_returns_the_net_change() -> None:
    q = OutboundQueue(DROP_OLDEST, max_msgs=100, max_bytes=10)
    push(q, 0, 6)
    push(q, 1, 2)
    assert push(q, 2, 3) == 3 - 6  # dropping message 0 frees 6, the new one adds 3
    assert tags(q) == [1, 2]
    assert q.nbytes == 5
    assert q.missed == 1


# ---- drop-new --------------------------------------------------------------------------------------


def test_drop_new_by_count() -> None:
    q = OutboundQueue(DROP_NEW, max_msgs=2, max_bytes=1000)
    assert [push(q, i, 10) for i in range(5)] == [10, 10, 0, 0, 0]
    assert tags(q) == [0, 1]
    assert q.missed == 3
    check_bytes(q)


def test_drop_new_by_bytes_still_takes_what_fits() -> None:
    q = OutboundQueue(DROP_NEW, max_msgs=100, max_bytes=10)
    assert push(q, 0, 8) == 8
    assert push(q, 1, 3) == 0
    assert push(q, 2, 2) == 2
    assert tags(q) == [0, 2]
    assert q.missed == 1
    check_bytes(q)


# ---- disconnect ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "room"), [(10, ROOM), (31, ROOM), (1, 0)])
def test_disconnect_raises_overflow_and_keeps_the_queue(size: int, room: int) -> None:
    q = OutboundQueue(DISCONNECT, max_msgs=2, max_bytes=30)
    push(q, 0, 10)
    if size == 10:
        push(q, 1, 10)  # now full by count
    before = (tags(q), q.nbytes)
    with pytest.raises(Overflow):
        q.push(item(9, size), size, room)
    assert (tags(q), q.nbytes) == before
    assert q.missed == 0


# ---- an item larger than the queue -----------------------------------------------------------------


@pytest.mark.parametrize("policy", [DROP_OLDEST, DROP_NEW])
def test_item_larger_than_max_bytes_is_dropped_without_flushing_the_queue(policy: str) -> None:
    q = OutboundQueue(policy, max_msgs=100, max_bytes=10)
    push(q, 0, 4)
    push(q, 1, 4)
    assert push(q, 2, 11) == 0
    assert tags(q) == [0, 1]
    assert q.nbytes == 8
    assert q.missed == 1


@pytest.mark.parametrize("policy", [DROP_OLDEST, DROP_NEW])
def test_item_larger_than_max_bytes_into_an_empty_queue(policy: str) -> None:
    q = OutboundQueue(policy, max_msgs=100, max_bytes=10)
    assert push(q, 0, 100) == 0
    assert len(q) == 0
    assert q.nbytes == 0
    assert q.missed == 1


def test_item_exactly_max_bytes_fits() -> None:
    q = OutboundQueue(DROP_NEW, max_msgs=100, max_bytes=10)
    assert push(q, 0, 10) == 10
    assert tags(q) == [0]


# ---- the connection budget ('room') ----------------------------------------------------------------


def test_room_bounds_even_when_the_queue_has_space() -> None:
    q = OutboundQueue(DROP_NEW, max_msgs=100, max_bytes=1000)
    assert q.push(item(0, 10), 10, 10) == 10  # exactly the room left
    assert q.push(item(1, 10), 10, 9) == 0
    assert tags(q) == [0]
    assert q.missed == 1


def test_drop_oldest_frees_own_messages_to_fit_the_connection_budget() -> None:
    q = OutboundQueue(DROP_OLDEST, max_msgs=100, max_bytes=1000)
    for i in range(3):
        push(q, i, 4)
    # The connection has 2 bytes left: dropping message 0 (4 bytes) makes room for 4 more.
    assert q.push(item(3, 4), 4, 2) == 0
    assert tags(q) == [1, 2, 3]
    assert q.missed == 1
    check_bytes(q)


def test_drop_oldest_when_other_subscriptions_hold_the_budget() -> None:
    q = OutboundQueue(DROP_OLDEST, max_msgs=100, max_bytes=1000)
    push(q, 0, 2)
    # Room 0 and only 2 bytes of our own: the new 5-byte message cannot fit even after drops.
    # docs/protocol.md section 13: the queue is emptied, and if the new message still does not fit
    # (other subscriptions hold the connection budget), it is dropped too.
    delta = q.push(item(1, 5), 5, 0)
    assert delta == -2  # the dropped message's bytes were freed, nothing was added
    assert q.nbytes == 0
    assert len(q) == 0
    assert q.missed == 2  # message 0 and message 1 were both lost, and both counted


def test_drop_oldest_with_no_room_and_empty_queue() -> None:
    q = OutboundQueue(DROP_OLDEST, max_msgs=100, max_bytes=1000)
    assert q.push(item(0, 5), 5, 4) == 0
    assert q.missed == 1
    assert len(q) == 0


# ---- accounting over a long run --------------------------------------------------------------------


@pytest.mark.parametrize("policy", [DROP_OLDEST, DROP_NEW])
@pytest.mark.parametrize("budget", [ROOM, 40])
def test_accounting_over_a_long_run(policy: str, budget: int) -> None:
    """The returned deltas add up to nbytes, nbytes is the queued blocks' size, and every message
    pushed is either queued, popped, or counted in ``missed``."""
    q = OutboundQueue(policy, max_msgs=5, max_bytes=30)
    sizes = itertools.cycle([1, 7, 3, 12, 0, 5, 31, 9, 2])
    conn_total = 0  # what the connection believes this queue holds
    popped = 0
    pushed = 0
    for step in range(500):
        size = next(sizes)
        conn_total += q.push(item(step, size), size, budget - conn_total)
        pushed += 1
        assert conn_total == q.nbytes
        check_bytes(q)
        assert len(q) <= 5
        assert q.nbytes <= 30
        assert q.nbytes <= budget
        if step % 7 == 0 and len(q):
            conn_total -= len(q.pop()[1])
            popped += 1
    assert pushed == len(q) + popped + q.missed
    assert q.missed > 0


def test_order_is_preserved_among_survivors() -> None:
    q = OutboundQueue(DROP_OLDEST, max_msgs=4, max_bytes=1000)
    for i in range(20):
        push(q, i, 1 + i % 3)
    assert tags(q) == [16, 17, 18, 19]
    assert q.missed == 16


# ---- runs: one item, many messages ------------------------------------------------------------------


def run(tag: int, count: int, size: int = 10) -> Item:
    return (None, b"r" * size, tag, count)


def test_a_run_counts_as_its_messages_against_max_msgs() -> None:
    q = OutboundQueue(DROP_NEW, max_msgs=10, max_bytes=1000)
    assert q.push(run(1, 6), 10, ROOM) == 10
    assert len(q) == 6
    assert q.push(run(2, 5), 10, ROOM) == 0  # 11 > 10: refused whole
    assert q.missed == 5
    assert q.push(run(3, 4), 10, ROOM) == 10
    assert len(q) == 10 and tags(q) == [1, 3]
    check_bytes(q)
    assert q.pop()[3] == 6 and len(q) == 4


def test_drop_oldest_drops_whole_runs_and_counts_their_messages() -> None:
    q = OutboundQueue(DROP_OLDEST, max_msgs=10, max_bytes=1000)
    q.push(run(1, 4), 10, ROOM)
    q.push(item(2, 10), 10, ROOM)
    q.push(run(3, 5), 10, ROOM)  # 10 held
    assert q.push(run(4, 3), 10, ROOM) == 0  # the run of 4 goes (4 freed), then 3 fit: 10 - 4 + 3 = 9
    assert tags(q) == [2, 3, 4] and len(q) == 9 and q.missed == 4
    check_bytes(q)


def test_a_run_larger_than_the_whole_queue_is_dropped_and_counted() -> None:
    for policy in (DROP_OLDEST, DROP_NEW):
        q = OutboundQueue(policy, max_msgs=10, max_bytes=1000)
        q.push(item(1, 10), 10, ROOM)
        assert q.push(run(2, 11), 10, ROOM) == 0
        assert tags(q) == [1] and q.missed == 11
    q = OutboundQueue(DISCONNECT, max_msgs=10, max_bytes=1000)
    with pytest.raises(Overflow):
        q.push(run(2, 11), 10, ROOM)
    assert len(q) == 0
