"""Topic queues against a real daemon: confirms, consumers, redelivery, dead letters, retention,
replay, duplicates, restarts, the asyncio client and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
from collections.abc import Callable

import pytest

import hostbus
import hostbus.aio
from hostbus import cli, wire
from tests.conftest import Daemon
from tests.helpers.raw import RawClient
from tests.helpers.restart import Restartable

ORDERS = {"queues": [{"name": "orders", "subjects": ["orders.>"]}]}


def take(c: hostbus.Consumption, n: int, timeout: float = 5.0, ack: bool = True) -> list[hostbus.Message]:
    out = []
    for _ in range(n):
        m = c.next(timeout=timeout)
        if ack:
            m.ack()
        out.append(m)
    return out


def nothing_more(c: hostbus.Consumption, wait: float = 0.5) -> bool:
    try:
        m = c.next(timeout=wait)
    except hostbus.TimeoutError:
        return True
    raise AssertionError(f"unexpected message seq {m.seq} {m.data!r}")


# ---- confirms --------------------------------------------------------------------------------


def test_confirms_give_the_stored_seq_and_many_can_be_in_flight(node: Restartable) -> None:
    d = node.start(ORDERS)
    with d.connect() as bus:
        assert bus.publish("orders.a", b"first", confirm=True) == {"orders": 1}
        futs = [bus.publish_async("orders.b", str(i).encode()) for i in range(20_000)]
        seqs = [f.result(30)["orders"] for f in futs]
        assert seqs == list(range(2, 20_002))  # in order, none lost, none twice
        assert bus.publish("not.captured", b"x", confirm=True) == {}  # routed, stored nowhere
        info = bus.queue_info("orders")
        assert info["messages"] == 20_001 and info["last_seq"] == 20_001
        assert info["durability"] == "always" and info["loss_window"] == "none once confirmed"
        # A plain publish is captured too (no confirm).
        bus.publish("orders.c", b"plain")
        bus.flush()
        assert bus.queue_info("orders")["messages"] == 20_002


def test_a_batch_of_confirmed_publishes_is_answered_in_order(node: Restartable) -> None:
    d = node.start({"queues": [{"name": "orders", "subjects": ["orders.>"]},
                               {"name": "small", "subjects": ["small"], "max_msgs": 2, "discard": "new"}]})
    with d.connect() as bus:
        got = bus.publish_batch([("orders.a", b"x")] * 5000 + [("orders.b", b"y", {"k": "v"}), ("free", b"z")])
        assert got[:5000] == [{"orders": i} for i in range(1, 5001)]
        assert got[5000:] == [{"orders": 5001}, {}]
        futs = [bus.publish_batch_async([("orders.c", b"%d" % i)] * 100) for i in range(20)]  # pipelined
        seqs = [r["orders"] for f in futs for r in f.result(10)]
        assert seqs == list(range(5002, 7002))
        with pytest.raises(hostbus.QueueFullError) as info:
            bus.publish_batch([("small", b"1"), ("small", b"2"), ("small", b"3"), ("orders.d", b"4")])
        results = info.value.results  # type: ignore[attr-defined]
        assert results[:2] == [{"small": 1}, {"small": 2}] and isinstance(results[2], hostbus.QueueFullError)
        assert results[3] == {"orders": 7002}
        assert bus.publish_batch([]) == []
        c = bus.consume("orders", "w", max_inflight=10_000)
        assert [m.seq for m in take(c, 7002)] == list(range(1, 7003))


def test_a_message_captured_by_two_queues_is_confirmed_with_both_seqs(node: Restartable) -> None:
    d = node.start({"queues": [{"name": "all", "subjects": [">"]},
                               {"name": "eu", "subjects": ["orders.eu.*"], "storage": "memory"}]})
    with d.connect() as bus:
        assert bus.publish("orders.us.1", b"x", confirm=True) == {"all": 1}
        assert bus.publish("orders.eu.1", b"y", confirm=True) == {"all": 2, "eu": 1}


def test_refusals_are_clear_errors_to_the_publisher_only(node: Restartable) -> None:
    d = node.start({"queues": [
        {"name": "small", "subjects": ["small.>"], "max_msgs": 3, "discard": "new", "max_msg_size": 100}]})
    with d.connect() as bus, d.connect() as other:
        for i in range(3):
            bus.publish("small.x", f"m{i}", confirm=True)
        with pytest.raises(hostbus.QueueFullError, match=r"queue 'small' is full \(3 messages"):
            bus.publish("small.x", b"one too many", confirm=True)
        with pytest.raises(hostbus.LimitExceededError, match=r"exceeds the max_msg_size of queue 'small' \(100\)"):
            bus.publish("small.y", b"x" * 101, confirm=True)
        other.publish("small.z", b"not confirmed")  # a plain publish that is refused: told, not fatal
        with pytest.raises(hostbus.QueueFullError):
            other.flush()
        assert bus.publish("elsewhere", b"fine", confirm=True) == {}
        info = bus.queue_info("small")
        assert info["messages"] == 3 and info["refused"] == {"full": 2, "too_large": 1}
        # discard new + acknowledged retention: room again once consumed.
    with d.connect() as bus:
        c = bus.consume("small", "w")
        assert [m.data for m in take(c, 3)] == [b"m0", b"m1", b"m2"]


def test_confirm_of_a_publish_the_rules_refuse_fails_with_the_rule(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"access": {"default": "deny"}, "acl": [{"topic": "orders.>", "publish": ["uid:0"],
                                                              "subscribe": ["uid:0"], "manage": ["uid:0"]}],
                      **ORDERS})
    with d.connect() as bus:
        assert bus.publish("orders.a", b"ok", confirm=True) == {"orders": 1}
        with pytest.raises(hostbus.PermissionDeniedError, match=r"may not publish to 'secret\.x'"):
            bus.publish("secret.x", b"no", confirm=True)


# ---- consumers -------------------------------------------------------------------------------


def test_members_of_a_consumer_share_its_messages(node: Restartable) -> None:
    d = node.start(ORDERS)
    with d.connect() as pub, d.connect() as a, d.connect() as b:
        ca = a.consume("orders", "workers")
        cb = b.consume("orders", "workers")
        for f in [pub.publish_async("orders.x", str(i).encode()) for i in range(400)]:
            f.result(10)
        got: dict[str, list[int]] = {"a": [], "b": []}

        def run(name: str, c: hostbus.Consumption) -> None:
            with contextlib.suppress(hostbus.TimeoutError):
                while True:
                    m = c.next(timeout=1.0)
                    got[name].append(m.seq)
                    m.ack()

        threads = [threading.Thread(target=run, args=(n, c)) for n, c in (("a", ca), ("b", cb))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got["a"] + got["b"]) == list(range(1, 401))  # each exactly once
        assert len(got["a"]) > 50 and len(got["b"]) > 50  # both took a share
        a.flush()
        b.flush()
        cons = pub.queue_info("orders")["consumers"]["workers"]
        assert cons["members"] == 2 and cons["pending"] == 0 and cons["ack_floor"] == 400


def test_unacknowledged_messages_come_again_nak_term_in_progress_and_backoff(node: Restartable) -> None:
    d = node.start(ORDERS)
    with d.connect() as bus:
        for i in range(4):
            bus.publish("orders.x", f"m{i}", confirm=True)
        c = bus.consume("orders", "w", ack_wait=0.6, max_deliver=0, backoff=[0.2])
        m1, m2, m3, m4 = take(c, 4, ack=False)
        assert [m.delivery_count for m in (m1, m2, m3, m4)] == [1, 1, 1, 1]
        m1.ack()
        m2.nak(delay=0)  # at once
        m3.term()  # never again
        again = c.next(timeout=1)
        assert (again.seq, again.delivery_count) == (2, 2)
        again.ack()
        t0 = time.monotonic()
        m4.in_progress()
        time.sleep(0.4)
        m4.in_progress()  # pushed out again: 0.6 s from now
        late = c.next(timeout=3)
        waited = time.monotonic() - t0
        assert (late.seq, late.delivery_count) == (4, 2)
        assert waited >= 0.9, waited  # 0.4 + 0.6 (+ the backoff of 0.2 for a second delivery)
        late.nak()  # no delay given: the backoff (0.2 s)
        t1 = time.monotonic()
        third = c.next(timeout=3)
        assert (third.seq, third.delivery_count) == (4, 3) and time.monotonic() - t1 >= 0.15
        third.ack()
        assert nothing_more(c)
        bus.flush()
        assert bus.queue_info("orders")["consumers"]["w"]["redelivered"] == 3


def test_max_deliver_sends_the_message_to_the_dead_letter_topic(node: Restartable) -> None:
    d = node.start({"queues": [{"name": "orders", "subjects": ["orders.>"]},
                               {"name": "dead", "subjects": ["$DLQ.>"]}]})
    with d.connect() as bus:
        dlq = bus.subscribe("$DLQ.orders")
        bus.publish("orders.poison", b"bad", headers={"id": "7"}, confirm=True)
        bus.publish("orders.good", b"fine", confirm=True)
        c = bus.consume("orders", "w", max_deliver=3, ack_wait=5)
        counts = []
        for _ in range(3):
            m = c.next(timeout=3)
            if m.topic == "orders.good":
                m.ack()
                m = c.next(timeout=3)
            counts.append(m.delivery_count)
            m.nak(delay=0)
        assert counts == [1, 2, 3]
        dead = dlq.next(timeout=3)
        assert dead.data == b"bad"
        assert dead.headers == {"id": "7", "Hostbus-Dead-Reason": "max_deliver", "Hostbus-Deliveries": "3",
                                "Hostbus-Queue": "orders", "Hostbus-Seq": "1", "Hostbus-Topic": "orders.poison"}
        assert dead.sender.pid == bus.identity["pid"]  # the original publisher
        assert nothing_more(c)
        # The dead-letter topic was captured by a queue of its own.
        d2 = bus.consume("dead", "inspect")
        kept = d2.next(timeout=3)
        assert kept.topic == "$DLQ.orders" and kept.headers["Hostbus-Seq"] == "1"
        info = bus.queue_info("orders")
        assert info["dead_lettered"] == 1 and info["consumers"]["w"]["ack_floor"] == 2


def test_a_member_that_goes_away_leaves_its_messages_to_another(node: Restartable) -> None:
    d = node.start(ORDERS)
    with d.connect() as pub, d.connect() as stays:
        for i in range(10):
            pub.publish("orders.x", f"m{i}", confirm=True)
        goes = d.connect()
        cg = goes.consume("orders", "w", ack_wait=60)
        held = take(cg, 10, ack=False)  # all ten, none acknowledged
        assert [m.seq for m in held] == list(range(1, 11))
        cs = stays.consume("orders", "w")
        assert nothing_more(cs, 0.3)  # the other member holds them (ack_wait is a minute)
        goes.close()
        again = take(cs, 10)
        assert sorted(m.seq for m in again) == list(range(1, 11))
        assert all(m.delivery_count == 2 for m in again)


def test_max_inflight_bounds_what_a_consumer_has_outstanding(node: Restartable) -> None:
    d = node.start(ORDERS)
    with d.connect() as bus:
        for f in [bus.publish_async("orders.x", b"m") for _ in range(50)]:
            f.result(5)
        c = bus.consume("orders", "w", max_inflight=5)
        first = take(c, 5, ack=False)
        assert nothing_more(c, 0.3)
        assert c.pending == 0
        for m in first:
            m.ack()
        assert [m.seq for m in take(c, 5)] == [6, 7, 8, 9, 10]


# ---- retention and replay ----------------------------------------------------------------------


def test_retention_by_count_bytes_and_age(node: Restartable) -> None:
    d = node.start({"queues": [
        {"name": "count", "subjects": ["c.>"], "max_msgs": 10},
        {"name": "bytes", "subjects": ["b.>"], "max_bytes": 2000},
        {"name": "age", "subjects": ["a.>"], "max_age": 0.5}]})
    with d.connect() as bus:
        for i in range(25):
            bus.publish_async("c.x", f"{i}".encode())
            bus.publish_async("b.x", b"x" * 90)  # a record is 90 + 8 + 3 + 17 (+ 24 of framing) bytes
        bus.publish("a.x", b"old", confirm=True)
        bus.flush()
        count = bus.queue_info("count")
        assert (count["messages"], count["first_seq"], count["last_seq"]) == (10, 16, 25)
        assert [m.data for m in take(bus.consume("count", "w"), 10)] == [str(i).encode() for i in range(15, 25)]
        b = bus.queue_info("bytes")
        assert b["bytes"] <= 2000 and b["messages"] == b["bytes"] // (b["bytes"] // b["messages"])
        assert b["last_seq"] == 25 and b["messages"] >= 2000 // 160
        time.sleep(0.8)  # older than max_age: removed by the housekeeping pass
        bus.publish("a.x", b"new", confirm=True)
        age = bus.queue_info("age")
        assert (age["messages"], age["first_seq"]) == (1, 2)


def test_acked_retention_removes_what_every_consumer_acknowledged(node: Restartable) -> None:
    d = node.start({"queues": [{"name": "work", "subjects": ["w.>"], "retention": "acked"}]})
    with d.connect() as bus:
        c1 = bus.consume("work", "one")
        c2 = bus.consume("work", "two")
        for i in range(6):
            bus.publish("w.x", f"{i}", confirm=True)
        take(c1, 6)
        take(c2, 3)
        bus.flush()
        info = bus.queue_info("work")
        assert (info["messages"], info["first_seq"]) == (3, 4)  # "two" still needs 4..6
        take(c2, 3)
        bus.flush()
        assert bus.queue_info("work")["messages"] == 0


def test_replay_from_all_new_last_a_sequence_and_a_time(node: Restartable) -> None:
    d = node.start(ORDERS)
    with d.connect() as bus:
        for i in range(1, 6):
            bus.publish("orders.x", f"{i}", confirm=True)
        time.sleep(0.05)
        middle = time.time()
        time.sleep(0.05)
        for i in range(6, 11):
            bus.publish("orders.x", f"{i}", confirm=True)
        assert [m.seq for m in take(bus.consume("orders", "all"), 10)] == list(range(1, 11))
        assert [m.seq for m in take(bus.consume("orders", "seq", start=7), 4)] == [7, 8, 9, 10]
        assert [m.seq for m in take(bus.consume("orders", "time", start=middle), 5)] == [6, 7, 8, 9, 10]
        assert [m.seq for m in take(bus.consume("orders", "last", start="last"), 1)] == [10]
        new = bus.consume("orders", "new", start="new")
        assert nothing_more(new, 0.3)
        bus.publish("orders.x", b"11", confirm=True)
        assert new.next(timeout=3).seq == 11
        filtered = bus.consume("orders", "filtered", filter="orders.eu")
        bus.publish("orders.us", b"no", confirm=True)
        bus.publish("orders.eu", b"yes", confirm=True)
        assert [m.data for m in take(filtered, 1)] == [b"yes"] and nothing_more(filtered, 0.3)


def test_a_repeated_message_id_is_stored_once(node: Restartable) -> None:
    d = node.start(ORDERS)
    with d.connect() as bus:
        h = {"Hostbus-Msg-Id": "order-42"}
        assert bus.publish("orders.x", b"a", headers=h, confirm=True) == {"orders": 1}
        assert bus.publish("orders.x", b"a again", headers=h, confirm=True) == {"orders": 1}
        f1 = bus.publish_async("orders.x", b"b", headers={"Hostbus-Msg-Id": "b"})
        f2 = bus.publish_async("orders.x", b"b", headers={"Hostbus-Msg-Id": "b"})  # in the same batch
        assert f1.result(5) == f2.result(5) == {"orders": 2}
        info = bus.queue_info("orders")
        assert info["messages"] == 2 and info["duplicates"] == 2
    d = node.restart(ORDERS)  # the window is rebuilt from the stored messages
    with d.connect() as bus:
        assert bus.publish("orders.x", b"a", headers={"Hostbus-Msg-Id": "order-42"}, confirm=True) == {"orders": 1}
        assert bus.publish("orders.x", b"c", headers={"Hostbus-Msg-Id": "c"}, confirm=True) == {"orders": 3}


# ---- restarts -------------------------------------------------------------------------------------


def test_queues_messages_and_consumer_positions_survive_a_restart(node: Restartable) -> None:
    d = node.start()
    with d.connect() as bus:
        bus.queue_add("jobs", ["jobs.>"], max_msgs=1000)
        bus.queue_add("scratch", "tmp.>", storage="memory")
        for i in range(10):
            bus.publish("jobs.x", f"{i}", confirm=True)
            bus.publish("tmp.x", f"{i}", confirm=True)
        c = bus.consume("jobs", "w", ack_wait=30, max_inflight=6)
        take(c, 4)  # acknowledged
        held = take(c, 2, ack=False)  # delivered, not acknowledged
        assert [m.seq for m in held] == [5, 6]
        bus.flush()
    d = node.restart()
    with d.connect() as bus:
        names = {q["name"]: q for q in bus.queue_list()}
        assert set(names) == {"jobs", "scratch"}
        assert names["jobs"]["messages"] == 10 and names["jobs"]["config"]["max_msgs"] == 1000
        assert names["scratch"]["messages"] == 0  # memory storage: nothing survives
        c = bus.consume("jobs", "w")
        again = take(c, 6)
        # 1-4 were acknowledged: never again. 5 and 6 were delivered and not acknowledged: again,
        # counted. (7-10 may have been handed to the first connection as room freed up.)
        assert [m.seq for m in again] == [5, 6, 7, 8, 9, 10]
        assert [m.delivery_count for m in again[:2]] == [2, 2]
        assert nothing_more(c)  # no re-flood of what was acknowledged
        assert bus.publish("jobs.x", b"next", confirm=True) == {"jobs": 11}


def test_purge_and_delete(node: Restartable) -> None:
    d = node.start(ORDERS)
    with d.connect() as bus:
        for i in range(5):
            bus.publish("orders.x", f"{i}", confirm=True)
        c = bus.consume("orders", "w")
        take(c, 2, ack=False)
        assert bus.queue_purge("orders") == 5
        info = bus.queue_info("orders")
        assert info["messages"] == 0 and info["consumers"]["w"]["pending"] == 0
        assert bus.publish("orders.x", b"after", confirm=True) == {"orders": 6}
        # What was handed to this member before the purge may still be on its way; then "after".
        late = [m for m in take(c, 4) if m.seq > 5]
        assert [(m.seq, m.data) for m in late] == [(6, b"after")]
        bus.queue_delete("orders")
        with pytest.raises(hostbus.NotFoundError, match="queue 'orders' was deleted"):
            c.next(timeout=3)
        with pytest.raises(hostbus.NotFoundError):
            bus.queue_info("orders")
        assert bus.publish("orders.x", b"gone", confirm=True) == {}
    assert not (d.state_dir / "queues" / "orders").exists()
    d = node.restart()  # a queue of the file comes back at start; one deleted at runtime is gone
    with d.connect() as bus:
        assert bus.queue_list() == []


# ---- bad input -------------------------------------------------------------------------------------


def test_bad_queue_requests_get_clear_errors(node: Restartable) -> None:
    d = node.start(ORDERS)
    with d.connect() as bus:
        for kwargs, match in [
            ({"name": "bad name", "subjects": ["x"]}, "name: String should match pattern"),
            ({"name": "q", "subjects": ["a..b"]}, "is not a pattern"),
            ({"name": "q", "subjects": ["x"], "durability": "sometimes"}, "durability: Input should be"),
            ({"name": "q", "subjects": ["x"], "max_msgs": 0}, "max_msgs: Input should be greater than or equal"),
            ({"name": "q", "subjects": ["x"], "colour": "red"}, "colour: Extra inputs are not permitted"),
        ]:
            with pytest.raises(hostbus.BrokerError, match=match):
                bus.call("queue_add", **kwargs)
        with pytest.raises(hostbus.BrokerError, match="already exists with other properties"):
            bus.queue_add("orders", ["orders.>"], max_msgs=5)
        assert bus.queue_add("orders", ["orders.>"])["name"] == "orders"  # the same: fine
        with pytest.raises(hostbus.NotFoundError):
            bus.consume("nope", "w")
        with pytest.raises(hostbus.BrokerError, match="'consumer' must be a name"):
            bus.consume("orders", "no spaces")
        with pytest.raises(hostbus.BrokerError, match="'max_inflight' must be a number"):
            bus.consume("orders", "w", max_inflight=0)
        with pytest.raises(hostbus.BrokerError, match="'start' must be"):
            bus.consume("orders", "w", start="yesterday")
        bus.consume("orders", "f", filter="orders.a")
        with pytest.raises(hostbus.BrokerError, match=r"has filter 'orders\.a'"):
            bus.consume("orders", "f", filter="orders.b")
        with pytest.raises(ValueError, match="not from a topic queue"):
            hostbus.Message("t", b"", {}, hostbus.Sender(0, 0, 0), None, 1, False).ack()
        assert bus.publish("orders.ok", b"still serving", confirm=True) == {"orders": 1}


@pytest.mark.parametrize("frame", [
    wire.frame(wire.FrameType.ACK, b"\x01\x00"),  # shorter than its sid
    wire.frame(wire.FrameType.ACK, b"\x01\x00\x00\x00" + b"\x00" * 12),  # not a whole item
    wire.frame(wire.FrameType.ACK, b"\x01\x00\x00\x00" + wire.frames.ACK_ITEM.pack(9, 1, 0)),  # unknown kind
    wire.frame(wire.FrameType.CPUB, b"\x00\x00\x00\x00" + wire.message_block(b"orders.x", b"d")),  # id 0
    wire.frame(wire.FrameType.CPUB, b"\x01\x00"),  # no block
])
def test_a_malformed_queue_frame_ends_only_its_sender(node: Restartable, frame: bytes) -> None:
    d = node.start(ORDERS)
    with d.connect() as bus:
        raw = RawClient(d.socket)
        raw.send(frame)
        err = raw.read_until(wire.FrameType.ERR)
        assert err is not None and err.flags & wire.ERR_FATAL
        assert raw.read_until(None, timeout=2) is None  # closed
        assert bus.publish("orders.x", b"fine", confirm=True) == {"orders": 1}


def test_answers_about_unknown_messages_are_ignored(node: Restartable) -> None:
    d = node.start(ORDERS)
    with d.connect() as bus:
        c = bus.consume("orders", "w")
        bus.publish("orders.x", b"1", confirm=True)
        m = c.next(timeout=3)
        m.ack()
        m.ack()  # twice
        m.nak()  # after the ack
        bus._answer(c.sid, 0, 999, 0)  # never delivered
        bus._answer(4242, 0, 1, 0)  # no such member
        bus.flush()
        assert nothing_more(c)
        assert bus.queue_info("orders")["consumers"]["w"]["ack_floor"] == 1


# ---- stats, asyncio, CLI ------------------------------------------------------------------------


def test_stats_show_each_queue_with_its_loss_window_in_words(node: Restartable) -> None:
    d = node.start({"queues": [
        {"name": "a", "subjects": ["a"]}, {"name": "i", "subjects": ["i"], "durability": "interval"},
        {"name": "n", "subjects": ["n"], "durability": "never"},
        {"name": "m", "subjects": ["m"], "storage": "memory"}]})
    with d.connect() as bus:
        bus.publish("i", b"x", confirm=True)
        st = bus.stats()
    q = st["queues"]
    assert {k: v["loss_window"] for k, v in q.items()} == {
        "a": "none once confirmed", "i": "up to 100 ms",
        "n": "unbounded until the OS writes (none if only hostbusd crashes)",
        "m": "everything at a restart (memory storage)"}
    assert q["i"]["messages"] == 1 and set(q["i"]) >= {"messages", "bytes", "consumers", "pending", "redelivered",
                                                        "dead_lettered", "durability"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["--socket", str(d.socket), "stats"]) == 0
    assert "queue i: i -- 1 messages" in out.getvalue() and "loss window: up to 100 ms" in out.getvalue()


def test_the_asyncio_client_confirms_and_consumes(node: Restartable) -> None:
    d = node.start(ORDERS)

    async def main() -> None:
        bus = await hostbus.aio.connect(d.socket)
        try:
            assert await bus.publish("orders.a", b"1", confirm=True) == {"orders": 1}
            futs = [await bus.publish_async("orders.b", str(i).encode()) for i in range(400)]
            assert [f["orders"] for f in await asyncio.gather(*futs)] == list(range(2, 402))
            batch = await bus.publish_batch([("orders.c", b"%d" % i) for i in range(100)])
            assert [r["orders"] for r in batch] == list(range(402, 502))
            c = await bus.consume("orders", "aio", max_inflight=100)
            seqs = []
            async for m in c:
                seqs.append(m.seq)
                m.ack()
                if len(seqs) == 501:
                    break
            assert seqs == list(range(1, 502))
            await bus.flush()
            assert (await bus.queue_info("orders"))["consumers"]["aio"]["ack_floor"] == 501
            await bus.queue_add("more", ["more.>"], storage="memory")
            assert [q["name"] for q in await bus.queue_list()] == ["more", "orders"]
            assert await bus.queue_purge("orders") == 501
            await bus.queue_delete("more")
        finally:
            await bus.close()

    asyncio.run(main())


def run_cli(args: list[str], stdin: bytes = b"") -> tuple[int, str, str]:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "hostbus.cli", *args], input=stdin, capture_output=True, timeout=30)
    return r.returncode, r.stdout.decode(), r.stderr.decode()


def test_the_cli_manages_queues_publishes_confirmed_and_consumes(node: Restartable) -> None:
    d = node.start()
    s = ["--socket", str(d.socket)]
    rc, out, err = run_cli([*s, "queue", "add", "jobs", "--subjects", "jobs.>", "--max-msgs", "100",
                            "--durability", "interval", "--sync-interval-ms", "50"])
    assert rc == 0, err
    assert out.startswith("jobs: jobs.> -- 0 messages") and "loss window: up to 50 ms" in out
    rc, out, err = run_cli([*s, "pub", "jobs.a", "--lines", "--confirm"], b"one\ntwo\nthree\n")
    assert (rc, out.split()) == (0, ["jobs=1", "jobs=2", "jobs=3"]), err
    rc, out, err = run_cli([*s, "pub", "other", "x", "--confirm"])
    assert rc == 0 and out.strip() == "-" and "stored in no queue" in err
    rc, out, _ = run_cli([*s, "queue", "ls"])
    assert "jobs: jobs.> -- 3 messages" in out
    rc, out, err = run_cli([*s, "consume", "jobs", "--consumer", "w", "--count", "2", "--json"])
    assert rc == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert [(x["seq"], x["data"], x["delivery_count"]) for x in lines] == [(1, "one", 1), (2, "two", 1)]
    rc, out, _ = run_cli([*s, "consume", "jobs", "--consumer", "peek", "--count", "1", "--no-ack",
                          "--max-inflight", "1"])
    assert (rc, out) == (0, "jobs.a one\n")
    rc, out, _ = run_cli([*s, "queue", "info", "jobs", "--json"])
    info = json.loads(out)
    assert info["consumers"]["w"]["ack_floor"] == 2
    assert (info["consumers"]["peek"]["pending"], info["consumers"]["peek"]["ack_floor"]) == (1, 0)
    rc, out, _ = run_cli([*s, "consume", "jobs", "--consumer", "peek", "--count", "1", "--json"])
    assert (json.loads(out)["seq"], json.loads(out)["delivery_count"]) == (1, 2)  # not acknowledged: again
    rc, out, err = run_cli([*s, "consume", "jobs", "--consumer", "w", "--count", "5", "--timeout", "0.5"])
    assert rc == 1 and out == "jobs.a three\n" and "timed out after 0.5 s with 1 of 5 messages" in err
    rc, out, _ = run_cli([*s, "queue", "purge", "jobs"])
    assert (rc, out) == (0, "purged 3 messages\n")
    assert run_cli([*s, "queue", "rm", "jobs"])[0] == 0
    rc, _, err = run_cli([*s, "queue", "info", "jobs"])
    assert rc == 1 and "no queue named 'jobs'" in err
    rc, _, err = run_cli([*s, "queue", "add", "bad", "--subjects", "x", "--discard", "maybe"])
    assert rc == 1 and "discard: Input should be 'old' or 'new'" in err


def test_confirms_of_one_write_come_back_as_one_run(node: Restartable) -> None:
    d = node.start(ORDERS)
    raw = RawClient(d.socket)
    frames = b"".join(wire.encode_pub(b"orders.x", b"%d" % i, pub_id=10 + i) for i in range(50))
    raw.send(frames + wire.encode_pub(b"free", b"x", pub_id=99))
    stored = [raw.read_until(wire.FrameType.STORED) for _ in range(2)]
    runs = sorted(wire.decode_stored(f.body) for f in stored if f is not None)
    assert runs == [(10, 50, {"orders": 1}), (99, 1, {})]  # 50 publishes: one frame


def test_stored_frames_round_trip_and_reject_garbage() -> None:
    f = wire.Decoder(wire.SERVER_FRAMES, 1 << 20)
    f.feed(wire.encode_stored(7, 3, {"a": 1, "bé": 9}))
    (frame,) = f.frames()
    assert wire.decode_stored(frame.body) == (7, 3, {"a": 1, "bé": 9})
    for body in (b"\x01\x00", frame.body[:-1], frame.body[:12]):
        with pytest.raises(hostbus.RemoteProtocolError):
            wire.decode_stored(body)


def test_a_deleted_consumer_ends_its_members_and_lets_acked_retention_go_on(node: Restartable) -> None:
    d = node.start({"queues": [{"name": "work", "subjects": ["w.>"], "retention": "acked"}]})
    with d.connect() as bus:
        done = bus.consume("work", "done")
        stuck = bus.consume("work", "stuck")  # never acknowledges: holds every message back
        for i in range(5):
            bus.publish("w.x", b"%d" % i, confirm=True)
        take(done, 5)
        bus.flush()
        assert bus.queue_info("work")["messages"] == 5
        bus.consumer_delete("work", "stuck")
        with pytest.raises(hostbus.NotFoundError, match="consumer 'stuck' of queue 'work' was deleted"):
            for _ in range(6):
                stuck.next(timeout=3)  # what it had received, then the end
        info = bus.queue_info("work")
        assert set(info["consumers"]) == {"done"} and info["messages"] == 0
        with pytest.raises(hostbus.NotFoundError, match="has no consumer named 'stuck'"):
            bus.consumer_delete("work", "stuck")
    d = node.restart({"queues": [{"name": "work", "subjects": ["w.>"], "retention": "acked"}]})
    with d.connect() as bus:
        assert set(bus.queue_info("work")["consumers"]) == {"done"}  # gone for good
    rc, _, err = run_cli(["--socket", str(d.socket), "queue", "rm-consumer", "work", "done"])
    assert rc == 0, err
    rc, _, err = run_cli(["--socket", str(d.socket), "queue", "rm-consumer", "work", "done"])
    assert rc == 1 and "has no consumer named 'done'" in err
