"""Flow control: a subscriber that stops reading costs bounded memory and never slows the others."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

import pytest

from hostbus import wire
from hostbus.errors import ErrorCode
from tests.conftest import Daemon
from tests.helpers.raw import RawClient
from tests.helpers.subs import drain

MiB = 1024 * 1024
QUEUE_LIMIT = 8 * MiB


def stalled_subscriber(daemon: Daemon, pattern: str, policy: str) -> RawClient:
    """A connection that subscribes and then does not read (small receive buffer)."""
    raw = RawClient(daemon.socket)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    raw.send(wire.encode_sub(1, {"pattern": pattern, "policy": policy}))
    ok = raw.read_until(wire.FrameType.OK)
    assert ok is not None
    return raw


def read_deliveries(raw: RawClient, timeout: float = 1.0) -> tuple[int, int, list[int]]:
    """Read until the broker goes quiet: (messages, total missed from GAP frames, message payload ids)."""
    raw.sock.settimeout(timeout)
    msgs = missed = 0
    ids: list[int] = []
    while True:
        try:
            data = raw.sock.recv(1 << 20)
        except TimeoutError:
            break
        if not data:
            break
        raw.decoder.feed(data)
        for f in raw.decoder.frames():
            if f.type == wire.FrameType.MSG:
                msgs += 1
                view = wire.split_block(f.body, 12)
                ids.append(int.from_bytes(f.body[view.headers_end:view.headers_end + 4], "little"))
            elif f.type == wire.FrameType.GAP:
                missed += wire.decode_gap(f.body)[1]
    return msgs, missed, ids


@pytest.fixture
def limited(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon({
        "limits": {"max_queued_bytes_per_connection": QUEUE_LIMIT},
        "subscriptions": {"max_queued_bytes": QUEUE_LIMIT, "max_queued_msgs": 1_000_000},
    })


def test_stalled_subscriber_while_publishing_1_gib(limited: Daemon) -> None:
    size = 256 * 1024
    count = 4096  # 1 GiB
    baseline_kb = limited.status()["VmRSS"]
    stalled = stalled_subscriber(limited, "bulk", "drop-oldest")
    healthy_bus = limited.connect("healthy")
    healthy = healthy_bus.subscribe("bulk", pending_limit=count)
    received = {"n": 0, "bytes": 0, "in_order": True}
    progress = threading.Condition()

    def consume() -> None:
        for i in range(count):
            msg = healthy.next(timeout=30)
            if int.from_bytes(msg.data[:4], "little") != i:
                received["in_order"] = False
            with progress:
                received["n"] += 1
                received["bytes"] += len(msg.data)
                progress.notify()

    reader = threading.Thread(target=consume)
    reader.start()
    body = b"\0" * (size - 4)
    with limited.connect("publisher") as pub:
        for i in range(count):
            pub.publish("bulk", i.to_bytes(4, "little") + body)
            if i % 8 == 7:  # keep the healthy reader within 4 MiB (half its queue: it must not drop)
                with progress:
                    progress.wait_for(lambda i=i: received["n"] >= i - 8, timeout=30)
        pub.flush(timeout=30)
    reader.join(60)
    healthy_bus.close()
    assert received == {"n": count, "bytes": count * size, "in_order": True}
    assert healthy.missed == 0

    mem = limited.status()
    peak_growth_mib = (mem["VmHWM"] - baseline_kb) / 1024
    # 1 GiB went through; the broker held at most the stalled queue (8 MiB) plus buffers.
    print(f"broker peak RSS growth: {peak_growth_mib:.1f} MiB")
    assert peak_growth_mib < 64, f"broker peak RSS grew by {peak_growth_mib:.1f} MiB"

    msgs, missed, ids = read_deliveries(stalled)
    stalled.close()
    assert missed > 0
    assert msgs + missed == count  # every message is either delivered or counted as missed
    assert ids == sorted(ids)
    assert ids[-1] == count - 1  # drop-oldest: the freshest message survived
    with limited.connect() as bus:
        st = bus.stats()
    assert st["messages"]["dropped"] == missed
    assert st["queued_bytes"] == 0


def test_drop_new_keeps_the_oldest(limited: Daemon) -> None:
    stalled = stalled_subscriber(limited, "bulk", "drop-new")
    count = 400
    with limited.connect("publisher") as pub:
        for i in range(count):
            pub.publish("bulk", i.to_bytes(4, "little") + b"\0" * (64 * 1024))
        pub.flush(timeout=30)
    msgs, missed, ids = read_deliveries(stalled)
    stalled.close()
    assert missed > 0 and msgs + missed == count
    assert ids == list(range(msgs))  # a prefix: the new ones were dropped


def test_disconnect_policy_ends_the_slow_consumer_only(limited: Daemon) -> None:
    stalled = stalled_subscriber(limited, "bulk", "disconnect")
    with limited.connect("other") as other:
        ok_sub = other.subscribe("bulk", pending_limit=1000)
        with limited.connect("publisher") as pub:
            for i in range(400):
                pub.publish("bulk", i.to_bytes(4, "little") + b"\0" * (64 * 1024))
                if i % 50 == 0:
                    pub.flush()
            pub.flush(timeout=30)
        code, message = stalled.fatal_error(timeout=10)
        stalled.close()
        assert code == ErrorCode.SLOW_CONSUMER
        assert "overflowed" in message
        assert other.stats()["peer_errors"] == 1  # counted, and logged:
        assert '"code": "SLOW_CONSUMER"' in limited.log()
        got = len(drain(ok_sub, timeout=1))
        assert got + ok_sub.missed == 400


def test_gap_reaches_the_library_subscriber(limited: Daemon) -> None:
    sub_bus = limited.connect("slow")
    sub = sub_bus.subscribe("g", max_bytes=1024 * 1024, pending_limit=1_000_000)
    # The library's reader never blocks, so overflow the small broker-side queue (1 MiB) with a
    # burst the reader cannot keep up with; the GAP counts must add up exactly.
    with limited.connect("publisher") as pub:
        for i in range(2000):
            pub.publish("g", i.to_bytes(4, "little") + b"\0" * (32 * 1024))
        pub.flush(timeout=30)
    got = len(drain(sub, timeout=1))
    sub_bus.close()
    assert sub.missed > 0
    assert got + sub.missed == 2000


def test_a_peer_that_asks_but_never_reads_is_closed(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"limits": {"max_queued_bytes_per_connection": 64 * 1024, "max_frame_bytes": 64 * 1024,
                                 "write_batch_bytes": 4096, "close_timeout": 0.5}})
    raw = RawClient(d.socket)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    pings = b"".join(wire.encode_u32(wire.FrameType.PING, i) for i in range(1, 200_001))
    raw.sock.settimeout(20)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed while still sending: fine
        raw.sock.sendall(pings)  # 2 MB of PINGs, answers never read
    with d.connect() as bus:
        for _ in range(100):
            if bus.stats()["connections"] == 1:
                break
            threading.Event().wait(0.05)
        st = bus.stats()
    raw.close()
    assert st["connections"] == 1  # only this one: the non-reader was closed
    assert st["peer_errors"] == 1
    assert "stopped reading" in d.log()


def test_half_closed_non_reader_is_dropped_not_kept(start_daemon: Callable[..., Daemon]) -> None:
    # Regression: a subscriber that stopped reading and then shut down its write side stayed
    # connected forever while its unsent output grew without bound.
    d = start_daemon({"limits": {"close_timeout": 0.5}})
    raw = stalled_subscriber(d, "t.>", "drop-oldest")
    with d.connect("pub") as pub:
        for _ in range(2000):
            pub.publish("t.x", b"\0" * 1024)  # fill its socket buffer and some of ours
        pub.flush()
        raw.sock.shutdown(socket.SHUT_WR)
        for _ in range(200):
            if pub.stats()["connections"] == 1:
                break
            threading.Event().wait(0.02)
        assert pub.stats()["connections"] == 1
        for _ in range(20_000):
            pub.publish("t.x", b"\0" * 1024)
        pub.flush()
        st = pub.stats()
    raw.close()
    assert st["connections"] == 1
    assert st["subscriptions"] == 0
    assert d.status()["VmRSS"] < 200 * 1024  # 20 MB more went out; none of it was kept for the dead peer


def test_queue_group_skips_a_member_that_failed(start_daemon: Callable[..., Daemon]) -> None:
    # Regression: a member that had failed kept receiving its share until its transport closed.
    d = start_daemon({"limits": {"close_timeout": 5}})
    with d.connect("healthy") as healthy_bus, d.connect("pub") as pub:
        healthy = healthy_bus.subscribe("jobs", group="workers", pending_limit=10_000)
        raw = RawClient(d.socket)
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        raw.send(wire.encode_sub(1, {"pattern": "jobs", "group": "workers"}))
        assert raw.read_until(wire.FrameType.OK) is not None
        for i in range(200):  # fill the raw member's buffers so its close will linger
            pub.publish("jobs", i.to_bytes(4, "little") + b"\0" * 4096)
        pub.flush()
        got_before = len(drain(healthy, timeout=0.5))
        raw.send(wire.frame(0x7F))  # fatal for the raw member
        pub.flush()
        for _ in range(1000):
            pub.publish("jobs", b"after")
        pub.flush()
        after = 0
        while after < 1000:
            assert healthy.next(timeout=5).data == b"after"
            after += 1
        raw.close()
        assert got_before > 0


def test_slowly_arriving_frames_are_not_a_stall(start_daemon: Callable[..., Daemon]) -> None:
    # Regression: the frame timer ran from the first partial read and was only reset when a read
    # ended on a frame boundary, so a peer whose frames all completed promptly was cut off.
    d = start_daemon({"limits": {"frame_timeout": 1.0}})
    with d.connect("sub") as sub_bus:
        sub = sub_bus.subscribe("slow")
        raw = RawClient(d.socket)
        frame = wire.encode_pub(b"slow", b"x" * 20)
        half = len(frame) // 2
        raw.send(frame[:half])
        for _ in range(8):  # 2.4 s in all, each frame completed 0.3 s after it began
            threading.Event().wait(0.3)
            raw.send(frame[half:] + frame[:half])
        raw.send(frame[half:] + wire.encode_u32(wire.FrameType.PING, 9))
        pong = raw.read_until(wire.FrameType.PONG)
        assert pong is not None, "the broker closed a peer whose frames were all progressing"
        raw.close()
        assert len(drain(sub, timeout=1)) == 9


def test_one_message_larger_than_the_queue_budget_reaches_a_reading_subscriber(
        start_daemon: Callable[..., Daemon]) -> None:
    # Regression: the bound meant for unread replies counted message bytes too.
    d = start_daemon({"limits": {"max_queued_bytes_per_connection": 1024 * 1024, "max_frame_bytes": 4 * MiB}})
    with d.connect("sub") as sub_bus, d.connect("pub") as pub:
        sub = sub_bus.subscribe("big", max_bytes=1024 * 1024)
        payload = b"\1" * (3 * MiB)
        pub.publish("big", payload)
        assert sub.next(timeout=10).data == payload
        sub_bus.flush()
        assert pub.stats()["peer_errors"] == 0
