"""Runs: consecutive plain publishes on one topic travel as one frame (PUBN in, MSGN out), and
every delivery kind still sees each message as if it had been published alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import threading
import time
from typing import Any

import hostbus
from hostbus import wire
from tests.conftest import Daemon
from tests.helpers.raw import RawClient
from tests.helpers.subs import drain


def _messages(frames: list[wire.Frame]) -> tuple[list[bytes], list[int]]:
    """Payloads in the MSG and MSGN frames of ``frames``, and the count of each MSGN."""
    payloads: list[bytes] = []
    runs: list[int] = []
    for f in frames:
        if f.type == wire.FrameType.MSG:
            _, _, _, h1 = wire.split_block(f.body, 12)
            payloads.append(f.body[h1:])
        elif f.type == wire.FrameType.MSGN:
            _, _, count = wire.frames.MSGN_PREFIX.unpack_from(f.body, 0)
            _, _, _, items_at = wire.split_block(f.body, 16)
            items = wire.run_payloads(f.body, items_at)
            assert len(items) == count
            payloads += items
            runs.append(count)
    return payloads, runs


def _raw_subscriber(daemon: Daemon, pattern: str, features: tuple[str, ...]) -> RawClient:
    raw = RawClient(daemon.socket, features=features)
    raw.send(wire.encode_sub(1, {"pattern": pattern}))
    assert raw.read_until(wire.FrameType.OK) is not None
    return raw


def test_a_loop_of_publishes_travels_in_runs_and_arrives_whole_and_in_order(daemon: Daemon) -> None:
    n = 20_000
    takes_runs = _raw_subscriber(daemon, "r.>", (wire.FEATURE_RUNS,))
    older = _raw_subscriber(daemon, "r.>", ())  # a peer that did not say it takes runs
    with daemon.connect("sub") as sb, daemon.connect("pub") as pb:
        sub = sb.subscribe("r.>")
        for i in range(n):
            pb.publish("r.a" if i % 1000 else "r.b", b"%d" % i)  # a topic change closes a run
        pb.flush()
        got = drain(sub)
        assert [m.data for m in got] == [b"%d" % i for i in range(n)]
        assert [m.topic for m in got[:2]] == ["r.b", "r.a"] and got[1000].topic == "r.b"
        assert all(m.sender.pid == pb.identity["pid"] and m.headers == {} for m in got)
    payloads, runs = _messages(takes_runs.read_for(1.0))
    assert payloads == [b"%d" % i for i in range(n)]
    assert max(runs) > 1 and len(runs) < n // 2, runs[:20]  # they did travel as runs
    payloads, runs = _messages(older.read_for(1.0))
    assert payloads == [b"%d" % i for i in range(n)] and runs == []  # one MSG each
    takes_runs.close()
    older.close()


def test_headers_of_a_run_reach_every_message_and_each_has_its_own_dict(daemon: Daemon) -> None:
    with daemon.connect() as bus:
        sub = bus.subscribe("h")
        for i in range(300):
            bus.publish("h", b"%d" % i, headers={"k": "v" if i < 200 else "w"})
        bus.flush()
        got = drain(sub)
        assert [m.headers for m in got] == [{"k": "v"}] * 200 + [{"k": "w"}] * 100
        got[0].headers["k"] = "changed"
        assert got[1].headers == {"k": "v"}


def test_a_queue_group_shares_the_messages_of_runs_one_by_one(daemon: Daemon) -> None:
    n = 10_000
    with daemon.connect() as a, daemon.connect() as b, daemon.connect() as pb:
        sa = a.subscribe("g", group="workers")
        sb = b.subscribe("g", group="workers")
        for i in range(n):
            pb.publish("g", struct.pack("<I", i))
        pb.flush()
        got_a = [struct.unpack("<I", m.data)[0] for m in drain(sa)]
        got_b = [struct.unpack("<I", m.data)[0] for m in drain(sb)]
    assert sorted(got_a + got_b) == list(range(n))
    assert abs(len(got_a) - len(got_b)) <= 1  # taken in turn, message by message
    assert got_a == sorted(got_a) and got_b == sorted(got_b)


def test_a_topic_queue_stores_each_message_of_a_run(daemon: Daemon) -> None:
    with daemon.connect() as bus:
        bus.queue_add("runs", "q.>")
        for i in range(1000):
            bus.publish("q.x", b"%d" % i)
        bus.flush()
        assert bus.queue_info("runs")["messages"] == 1000
        sub = bus.consume("runs", "c")
        got = [sub.next(timeout=5) for _ in range(1000)]
        assert [(m.seq, m.data, m.topic) for m in got] == [(i + 1, b"%d" % i, "q.x") for i in range(1000)]
        for m in got:
            m.ack()
        bus.flush()


def test_stats_count_each_message_of_a_run(daemon: Daemon) -> None:
    with daemon.connect() as bus:
        sub = bus.subscribe("s.>")
        before = bus.stats()
        for _ in range(5000):
            bus.publish("s.t", b"12345678")
        bus.flush()
        assert len(drain(sub)) == 5000
        after = bus.stats()
    assert after["messages"]["in"] - before["messages"]["in"] == 5000
    assert after["messages"]["bytes_in"] - before["messages"]["bytes_in"] == 5000 * (8 + 3 + 8)
    assert after["messages"]["out"] - before["messages"]["out"] == 5000
    assert after["topics"]["s.t"] == 5000


def test_a_reply_published_as_a_plain_message_to_an_inbox_still_reaches_the_requester(daemon: Daemon) -> None:
    with daemon.connect() as responder, daemon.connect() as requester:
        sub = responder.subscribe("svc")

        def serve() -> None:
            m = sub.next(timeout=5)
            assert m.reply_to
            for _ in range(3):  # plain publishes to the inbox: they may form a run
                responder.publish(m.reply_to, b"answer")
            responder.flush()

        t = threading.Thread(target=serve)
        t.start()
        assert requester.request("svc", b"q", timeout=5).data == b"answer"
        t.join()


def test_a_broker_that_does_not_offer_runs_gets_single_frames() -> None:
    core = hostbus._core.ClientCore("x", lambda *a: None)
    assert not core.runs_ok
    assert core.plain("t", b"x", None) is None  # no WELCOME yet: single PUB frames
    core.runs_ok = True
    assert core.plain("t", b"x", None) == (b"t", b"", b"x")
    assert core.plain("t", b"x" * (hostbus._core.RUN_MAX_ITEM + 1), None) is None  # large: alone


def _stalled_run_subscriber(daemon: Daemon, policy: str) -> RawClient:
    raw = RawClient(daemon.socket, features=(wire.FEATURE_RUNS,))
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    raw.send(wire.encode_sub(1, {"pattern": "flood", "policy": policy, "max_msgs": 5000}))
    assert raw.read_until(wire.FrameType.OK) is not None
    return raw


def _ids_and_missed(frames: list[wire.Frame]) -> tuple[list[int], int]:
    payloads, _ = _messages(frames)
    missed = sum(wire.decode_gap(f.body)[1] for f in frames if f.type == wire.FrameType.GAP)
    return [struct.unpack("<I", p[:4])[0] for p in payloads], missed


def test_a_stalled_subscriber_s_queue_drops_whole_runs_and_counts_every_message(start_daemon: Any) -> None:
    daemon = start_daemon({"subscriptions": {"max_queued_msgs": 5000}})
    count = 200_000
    oldest = _stalled_run_subscriber(daemon, "drop-oldest")
    newest = _stalled_run_subscriber(daemon, "drop-new")
    with daemon.connect("publisher") as pub:
        for i in range(count):
            pub.publish("flood", struct.pack("<I", i) + b"\0" * 60)
        pub.flush(timeout=30)
    for raw, policy in ((oldest, "drop-oldest"), (newest, "drop-new")):
        ids, missed = _ids_and_missed(raw.read_for(2.0))
        raw.close()
        assert missed > 0, policy
        assert len(ids) + missed == count, policy  # every message delivered or counted
        assert ids == sorted(ids) and len(set(ids)) == len(ids), policy
        if policy == "drop-oldest":
            assert ids[-1] == count - 1  # the freshest survived
        else:
            assert ids[0] == 0  # what was queued first is delivered first
    with daemon.connect() as bus:
        assert bus.stats()["queued_bytes"] == 0


def test_a_fifo_sink_writes_each_message_of_a_run_once_with_overlapping_patterns(start_daemon: Any) -> None:
    """Regression: a sink whose patterns overlap wrote a run's messages twice, and one line for a
    run of empty messages (their blocks were one object, taken for one message)."""
    d = start_daemon({"fifo": {"sink": [{"path": "ev.fifo", "subjects": ["ev.>", "ev.*.temp"], "format": "json"}]}})
    fd = os.open(d.runtime_dir / "ev.fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        sent = [("ev.k.temp", b""), ("ev.k.temp", b""), ("ev.k.temp", b"21"), ("ev.k.hum", b""), ("ev.k.hum", b"")]
        with d.connect() as bus:
            for topic, data in sent:
                bus.publish(topic, data)
            bus.flush()
            time.sleep(0.3)
        got = os.read(fd, 1 << 20).decode().splitlines()
    finally:
        os.close(fd)
    assert [(json.loads(line)["topic"], json.loads(line)["data"]) for line in got] == [
        (t, p.decode()) for t, p in sent]



def test_a_large_message_reaches_every_kind_of_destination_intact(daemon: Daemon) -> None:
    """A frame of 512 KiB or more is received in place: forwarded from there to socket
    subscribers, copied for the retained store, a topic queue and a deliver ring."""
    payload = os.urandom(1 << 20)
    with daemon.connect("sub") as bus, daemon.connect("pub") as pub:
        plain = bus.subscribe("big.>", pending_limit=100)
        ring = bus.subscribe("big.r", via="shm", pending_limit=100)
        bus.queue_add("bigq", "big.q")
        for topic in ("big.x", "big.q", "big.r"):
            pub.publish(topic, payload)
        pub.publish("big.k", payload, retain=True)
        pub.publish("big.x", payload[:1000])  # small after large: the stream goes on
        pub.flush()
        got = [(m.topic, m.data == payload) for m in drain(plain, timeout=1.0)]
        assert got == [("big.x", True), ("big.q", True), ("big.r", True), ("big.k", True), ("big.x", False)]
        assert [m.data == payload for m in drain(ring, timeout=1.0)] == [True]
        consumer = bus.consume("bigq", "c")
        stored = consumer.next(timeout=5)
        assert stored.data == payload
        stored.ack()
        late = bus.subscribe("big.k")
        retained = late.next(timeout=5)
        assert retained.retained and retained.data == payload


def _wait_pending(sub: Any, n: int) -> None:
    deadline = time.monotonic() + 10
    while sub.pending < n and time.monotonic() < deadline:
        time.sleep(0.02)


def test_threads_taking_from_one_subscription_get_each_message_of_its_runs_once(daemon: Daemon) -> None:
    """A run waits as its payloads; the message being taken is handed out without a lock, so
    threads sharing a subscription must still each get different messages, none twice."""
    n = 60_000
    with daemon.connect("sub") as sb, daemon.connect("pub") as pb:
        sub = sb.subscribe("many", pending_limit=n)
        for i in range(n):
            pb.publish("many", b"%d" % i)
        pb.flush()
        _wait_pending(sub, n)
        assert sub.pending == n  # a run counts as its messages
        taken: list[list[int]] = [[] for _ in range(4)]

        def take(out: list[int]) -> None:
            with contextlib.suppress(hostbus.TimeoutError):
                while True:
                    out.append(int(sub.next(timeout=0.5).data))

        threads = [threading.Thread(target=take, args=(out,)) for out in taken]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(i for out in taken for i in out) == list(range(n))
        assert all(out == sorted(out) for out in taken)  # each thread sees them in order
        assert sum(1 for out in taken if out) > 1, [len(out) for out in taken]  # they did share
        assert sub.pending == 0


def test_a_pending_limit_cuts_a_run_and_counts_each_message_it_drops(daemon: Daemon) -> None:
    with daemon.connect("sub") as sb, daemon.connect("pub") as pb:
        sub = sb.subscribe("cut", pending_limit=1000)
        for i in range(5000):
            pb.publish("cut", b"%d" % i)
        pb.flush()
        deadline = time.monotonic() + 10
        while sub.pending + sub.missed < 5000 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (sub.pending, sub.missed) == (1000, 4000)
        first = sub.next(timeout=1)
        assert sub.pending == 999
        assert [first.data, *(m.data for m in drain(sub))] == [b"%d" % i for i in range(1000)]
        pb.publish("cut", b"later")  # room again
        pb.flush()
        assert sub.next(timeout=5).data == b"later"


def test_the_asyncio_client_takes_runs_in_order_and_counts_them(daemon: Daemon) -> None:
    from hostbus import aio

    async def main() -> tuple[list[bytes], int, int]:
        async with await aio.connect(daemon.socket) as bus, await aio.connect(daemon.socket) as pub:
            sub = await bus.subscribe("arun", pending_limit=3000)
            for i in range(5000):
                await pub.publish("arun", b"%d" % i, headers={"n": "1"} if i >= 2000 else None)
            await pub.flush()
            deadline = time.monotonic() + 10
            while sub.pending + sub.missed < 5000 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            pending, missed = sub.pending, sub.missed
            got = [await sub.next(timeout=1) for _ in range(pending)]
            assert [m.headers for m in got] == [{}] * 2000 + [{"n": "1"}] * 1000
            return [m.data for m in got], pending, missed

    got, pending, missed = asyncio.run(main())
    assert (pending, missed) == (3000, 2000)
    assert got == [b"%d" % i for i in range(3000)]
