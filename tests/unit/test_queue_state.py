"""Topic-queue bookkeeping: acknowledgements, redelivery, backoff, dead letters, in-flight bounds, restarts."""

from __future__ import annotations

from pathlib import Path

from hostbusd.store.queue import (
    Consumer,
    ConsumerOptions,
    ConsumerState,
    MemoryLog,
    load_state,
    save_state,
)
from hostbusd.store.segments import SegmentLog


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def consumer(log: MemoryLog | SegmentLog, clock: Clock, dead: list[tuple[int, bytes, int, str]] | None = None,
             **opts: object) -> Consumer:
    sink = dead if dead is not None else []
    return Consumer(ConsumerState("c"), ConsumerOptions(**opts),  # type: ignore[arg-type]
                    log, lambda seq, p, n, why: sink.append((seq, p, n, why)), clock)


def test_messages_come_in_order_and_acks_move_the_floor_even_out_of_order() -> None:
    log, clock = MemoryLog(), Clock()
    log.append([b"a", b"b", b"c", b"d"])
    c = consumer(log, clock)
    got = c.take(10)
    assert [(d.seq, d.count, d.payload) for d in got] == [(1, 1, b"a"), (2, 1, b"b"), (3, 1, b"c"), (4, 1, b"d")]
    assert c.ack(2) and c.ack(3)
    assert c.state.ack_floor == 0  # 1 is still out
    assert c.ack(1)
    assert c.state.ack_floor == 3
    assert not c.ack(1)  # twice: already done
    assert c.take(10) == []  # nothing new, nothing due
    log.append([b"e"])
    assert [d.payload for d in c.take(10)] == [b"e"]


def test_an_unacknowledged_message_comes_again_after_ack_wait_with_backoff() -> None:
    """backoff[k] delays the (k + 2)-th delivery, on top of ack_wait: the 2nd comes ack_wait +
    backoff[0] after the 1st, the 3rd ack_wait + backoff[1] after the 2nd, then the last again."""
    log, clock = MemoryLog(), Clock()
    log.append([b"a"])
    c = consumer(log, clock, ack_wait=10.0, backoff=(5.0, 20.0), max_deliver=0)
    assert [d.count for d in c.take(1)] == [1]
    for count, wait in ((2, 15.0), (3, 30.0), (4, 30.0)):
        start = clock.t
        clock.t = start + wait - 0.1
        assert c.take(1) == [], count
        clock.t = start + wait
        assert [(d.seq, d.count) for d in c.take(1)] == [(1, count)]
    assert c.redelivered == 3


def test_max_deliver_sends_the_message_to_the_dead_letters_with_why_and_how_often() -> None:
    log, clock = MemoryLog(), Clock()
    log.append([b"poison", b"fine"])
    dead: list[tuple[int, bytes, int, str]] = []
    c = consumer(log, clock, dead, ack_wait=1.0, max_deliver=3)
    for _ in range(3):
        got = c.take(10)
        for d in got:
            if d.payload == b"fine":
                c.ack(d.seq)
        clock.t += 1.5
    assert c.take(10) == []
    assert dead == [(1, b"poison", 3, "max_deliver")]
    assert c.dead_lettered == 1 and c.state.ack_floor == 2 and c.state.pending == {}


def test_max_inflight_bounds_what_is_outstanding() -> None:
    log, clock = MemoryLog(), Clock()
    log.append([bytes([i]) for i in range(10)])
    c = consumer(log, clock, max_inflight=3)
    assert [d.seq for d in c.take(10)] == [1, 2, 3]
    assert c.take(10) == []
    c.ack(2)
    assert [d.seq for d in c.take(10)] == [4]


def test_nak_term_in_progress_and_disconnect() -> None:
    log, clock = MemoryLog(), Clock()
    log.append([b"a", b"b", b"c"])
    c = consumer(log, clock, ack_wait=30.0)
    c.take(3)
    assert c.nak(1, delay=5.0) and c.term(2) and c.in_progress(3)
    clock.t += 4.0
    assert c.take(3) == []
    clock.t += 1.5
    assert [(d.seq, d.count) for d in c.take(3)] == [(1, 2)]
    assert not c.nak(2)  # terminated: done
    clock.t += 20.0
    c.disconnected()  # its connection went: everything unacknowledged is due now
    assert sorted(d.seq for d in c.take(3)) == [1, 3]


def test_state_survives_a_restart_without_loss_or_reflood(tmp_path: Path) -> None:
    clock = Clock()
    log = SegmentLog.open(tmp_path / "q")
    log.append([f"m{i}".encode() for i in range(1, 11)])
    log.sync()
    c = consumer(log, clock, ack_wait=5.0)
    got = c.take(6)
    for d in got[:4]:
        c.ack(d.seq)  # 1-4 done, 5-6 delivered and not acknowledged, 7-10 never delivered
    save_state(tmp_path / "q" / "consumers.json", [c.state])
    log.close()

    log = SegmentLog.open(tmp_path / "q")
    (state,) = load_state(tmp_path / "q" / "consumers.json")
    assert (state.ack_floor, state.next_seq, sorted(state.pending)) == (4, 7, [5, 6])
    c = Consumer(state, ConsumerOptions(ack_wait=5.0), log, lambda *a: None, clock)
    c.disconnected()  # after a restart the pending ones are due again
    assert [(d.seq, d.count) for d in c.take(10)] == [(5, 2), (6, 2), (7, 1), (8, 1), (9, 1), (10, 1)]
    assert not (tmp_path / "q" / "consumers.json.tmp").exists()
    log.close()


def test_the_memory_log_has_the_same_interface_and_trims_what_is_acknowledged() -> None:
    log = MemoryLog()
    assert log.append([b"a", b"b", b"c"]) == [1, 2, 3]
    assert log.trim(below_seq=3) == 2
    assert (log.first_seq, log.last_seq, len(log)) == (3, 3, 1)
    assert [(s, p) for s, _, p in log.read()] == [(3, b"c")]
