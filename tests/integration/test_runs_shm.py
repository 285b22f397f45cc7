"""Runs through shared-memory rings: a publisher gathers plain messages on one topic into one
run record of its slot, the broker routes the record as one unit and forwards it to deliver
rings as a run record; every subscriber still sees each message, in order."""

from __future__ import annotations

from typing import Any

import pytest

import hostbus
from hostbus import ring as layout
from hostbus import wire
from tests.conftest import Daemon
from tests.helpers.subs import drain
from tests.integration.test_runs import _messages, _raw_subscriber
from tests.integration.test_shm_review import alive, put_raw


def _expected(n: int) -> list[tuple[str, bytes, dict[str, str]]]:
    return [("t.b" if i % 1000 == 0 else "t.a", b"%d" % i, {"h": "1"} if 3000 <= i < 3100 else {}) for i in range(n)]


def test_a_ring_publisher_s_runs_reach_socket_ring_and_older_subscribers_whole_and_in_order(daemon: Daemon) -> None:
    n = 50_000
    want = _expected(n)
    older = _raw_subscriber(daemon, "t.>", ())
    with daemon.connect("sub") as sb, daemon.connect("pub") as pb:
        by_socket = sb.subscribe("t.>", pending_limit=n)
        by_ring = sb.subscribe("t.>", via="shm", pending_limit=n)
        before = pb.stats()["messages"]["in"]
        with pb.shm_publisher(slots=8, slot_size=64 * 1024) as pub:
            for topic, data, headers in want:
                pub.publish(topic, data, headers=headers or None)
            pub.flush()
            assert pub.next < n // 100  # slots: many messages each
        pb.flush()
        for sub in (by_socket, by_ring):
            got = drain(sub, timeout=1.0)
            assert [(m.topic, m.data, m.headers) for m in got] == want
            assert all(m.sender.pid == pb.identity["pid"] for m in got)
        assert pb.stats()["messages"]["in"] - before == n
    payloads, runs = _messages(older.read_for(1.0))
    older.close()
    assert payloads == [w[1] for w in want] and runs == []


def test_a_run_record_the_layout_refuses_ends_that_ring_only(daemon: Daemon) -> None:
    run = wire.encode_run(b"t", [b"x", b"y"])[6:]
    bad = {
        "run with retain": layout.PUB_RECORD.pack(len(run), layout.RUN_FLAG | wire.PUB_RETAIN) + run,
        "item past the end": layout.PUB_RECORD.pack(len(run) - 1, layout.RUN_FLAG) + run[:-1] + b"",
        "no item": layout.PUB_RECORD.pack(9, layout.RUN_FLAG) + run[:9],
    }
    with daemon.connect("bystander") as bystander:
        alive_sub = bystander.subscribe("t")
        for why, record in bad.items():
            with daemon.connect("hostile") as bus:
                pub = bus.shm_publisher(slots=4, slot_size=4096)
                put_raw(pub, 0, layout.SLOT_HEAD.pack(layout.BATCH, 0, 1, len(record)) + record)
                with pytest.raises(hostbus.RingClosedError, match="run"):
                    pub.flush(timeout=2)
                assert not [r for r in bus.stats()["rings"] if r["client"] == bus.client_id], why
            bystander.publish("t", b"still served")
            assert [m.data for m in drain(alive_sub)] == [b"still served"], why
    alive(daemon)


def test_a_message_after_another_record_in_the_slot_does_not_join_an_earlier_run(daemon: Daemon) -> None:
    """Regression: a run, then a retained or a large record in the same slot, then the run's topic
    again once wrote past the slot's last record and the broker ended the ring."""
    with daemon.connect() as bus:
        sub = bus.subscribe("t.>")
        with bus.shm_publisher(slots=4, slot_size=256 * 1024) as pub:
            pub.publish("t.a", b"1")
            pub.publish("t.r", b"kept", retain=True)
            pub.publish("t.a", b"2")
            pub.publish("t.big", b"x" * 20_000)  # past the size a run takes
            pub.publish("t.a", b"3")
            pub.flush()
        got = [(m.topic, m.data[:4]) for m in drain(sub)]
    assert got == [("t.a", b"1"), ("t.r", b"kept"), ("t.a", b"2"), ("t.big", b"xxxx"), ("t.a", b"3")]


def test_runs_stay_within_a_small_frame_limit_on_every_path(start_daemon: Any) -> None:
    """Regression: runs once grew to 128 KiB whatever the broker's max_frame_bytes (64 KiB here):
    the broker ended the publisher's connection, or a deliver ring got a record over its limit."""
    d = start_daemon({"limits": {"max_frame_bytes": 65536}, "shm": {"max_message_bytes": 4096}})
    n = 5000
    want = [b"%05d" % i + b"." * 95 for i in range(n)]
    with d.connect("sub") as sb, d.connect("pub") as pb:
        by_socket = sb.subscribe("t", pending_limit=2 * n)
        by_ring = sb.subscribe("t", via="shm", pending_limit=2 * n)
        for data in want:  # socket: runs of up to 64 KiB; to the ring, records of at most 4 KiB
            pb.publish("t", data)
        pb.flush()
        with pb.shm_publisher(slots=4, slot_size=256 * 1024) as pub:  # run records of at most 4 KiB
            for data in want:
                pub.publish("t", data)
            pub.flush()
        for sub in (by_socket, by_ring):
            assert [m.data for m in drain(sub, timeout=1.0)] == want + want


def test_a_ring_message_at_the_size_limit_is_delivered_not_refused(start_daemon: Any) -> None:
    """Regression: a message within 4 bytes of shm.max_message_bytes opened a run record 4 bytes
    over the limit, and the broker ended the ring instead of the message being delivered."""
    d = start_daemon({"shm": {"max_message_bytes": 4096}})
    with d.connect() as bus:
        sub = bus.subscribe("t")
        with bus.shm_publisher(slots=4, slot_size=64 * 1024) as pub:
            pub.publish("t", b"x" * 4087)  # 8 + 1 + 4087 = 4096: exactly the limit
            pub.publish("t", b"y" * 10)
            with pytest.raises(hostbus.MessageTooLargeError):
                pub.publish("t", b"z" * 4088)
            pub.flush()
        assert [len(m.data) for m in drain(sub)] == [4087, 10]
