"""Topic queues, review: each test pins a bug found in a review of the feature and fails until
that bug is fixed (docs/queues.md and protocol section 21 say what should happen)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import hostbus
from hostbus import wire
from tests.conftest import Daemon
from tests.helpers.raw import RawClient
from tests.helpers.restart import Restartable, small_fs


def _why(d: Daemon) -> str:
    """The last lines of the traceback that stopped the daemon (from its JSON log or stderr)."""
    out = []
    for line in d.log().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                exc = json.loads(line).get("exception")
                if exc:
                    out += exc.splitlines()[-3:]
        elif line.strip():
            out.append(line)
    return "\n".join(out[-6:])


def assert_alive(d: Daemon, settle: float = 0.5) -> None:
    """The daemon is still running and answering (an uncaught exception on its loop stops it)."""
    time.sleep(settle)
    assert d.proc.poll() is None, f"hostbusd exited with {d.proc.returncode}:\n{_why(d)}"
    with d.connect() as bus:
        bus.call("stats")


def call_raw(raw: RawClient, call_id: int, op: str, args: dict[str, Any]) -> wire.Frame | None:
    raw.send(wire.encode_call(call_id, op, args))
    return raw.read_until(wire.FrameType.RESULT, timeout=3)


# ---- a client's numbers stop the daemon (OverflowError escapes to the loop) -----------------------


def test_queue_add_with_a_huge_max_age_stops_the_daemon(node: Restartable) -> None:
    # 1e300 is a valid JSON number and passes QueueConfig (ge=0); int(1e300 * 1e9) overflows.
    d = node.start()
    with contextlib.suppress(Exception):
        call_raw(RawClient(d.socket), 1, "queue_add", {"name": "q", "subjects": ["q.>"], "max_age": 1e300})
    assert_alive(d)


def test_queue_add_with_a_huge_duplicate_window_stops_the_daemon_at_the_next_publish(node: Restartable) -> None:
    d = node.start()
    with d.connect() as bus:
        with pytest.raises(hostbus.BrokerError, match="duplicate_window: Input should be less than or equal"):
            bus.queue_add("q", ["q.>"], duplicate_window=1e300)
        bus.queue_add("q", ["q.>"], duplicate_window=7 * 86400)  # the largest window
        bus.publish("q.a", b"x", headers={"Hostbus-Msg-Id": "1"}, confirm=True, timeout=3)
    assert_alive(d)


def test_consume_with_a_huge_start_time_stops_the_daemon(node: Restartable) -> None:
    d = node.start({"queues": [{"name": "q", "subjects": ["q.>"]}]})
    with d.connect() as bus, contextlib.suppress(hostbus.HostbusError):
        bus.consume("q", "c", start=1e300)
    assert_alive(d)


# ---- dead letters --------------------------------------------------------------------------------


def test_dead_lettering_a_message_with_large_headers_stops_the_daemon(node: Restartable) -> None:
    # A valid message whose headers block is near MAX_HEADERS_BYTES: the dead-letter headers added
    # to it do not fit, encode_headers raises InvalidHeadersError inside Consumer.take (_pump_all).
    d = node.start({"queues": [{"name": "q", "subjects": ["q.>"]}]})
    with d.connect() as bus:
        big = {"k": "v" * (wire.frames.MAX_HEADERS_BYTES - 2 - 4 - 1)}  # exactly the largest headers block
        assert bus.publish("q.a", b"payload", headers=big, confirm=True) == {"q": 1}
        c = bus.consume("q", "c", max_deliver=1, ack_wait=0.05)
        assert c.next(timeout=5).seq == 1  # not acknowledged: dead-lettered on a later tick
        time.sleep(1.0)
    assert_alive(d, settle=0)


@pytest.mark.needs_root
def test_dead_letter_topic_lets_a_manager_publish_where_it_may_not(start_daemon: Callable[..., Daemon],
                                                                    workdir: Path) -> None:
    from tests.integration.test_acl import People, open_daemon

    people = People()
    rules = [{"topic": "jobs.>", "publish": ["*"], "subscribe": ["user:hb-alice"], "manage": ["user:hb-alice"]},
             {"topic": "admin.>", "subscribe": ["*"]}]  # nobody may publish on admin.>
    d = open_daemon(start_daemon, workdir, {"access": {"default": "deny"}, "acl": rules})
    with d.connect("admin") as root:
        sub = root.subscribe("admin.>")

        def alice() -> None:
            with hostbus.connect(d.socket) as bus:
                with pytest.raises(hostbus.PermissionDeniedError):
                    bus.publish("admin.shutdown", b"direct", confirm=True)
                with pytest.raises(hostbus.PermissionDeniedError, match=r"with dead letters on 'admin\.shutdown'"):
                    bus.queue_add("alices", ["jobs.alice.>"], dead_letter="admin.shutdown")
                with pytest.raises(hostbus.BrokerError, match=r"must be '\$DLQ\.alices' or under it"):
                    bus.queue_add("alices", ["jobs.alice.>"], dead_letter="$DLQ.someone-else")
                bus.queue_add("alices", ["jobs.alice.>"], dead_letter="$DLQ.alices.mine")  # her own: fine
                bus.publish("jobs.alice.x", b"forged command", confirm=True)
                c = bus.consume("alices", "w", max_deliver=1, ack_wait=0.05)
                c.next(timeout=5)  # never acknowledged: dead-lettered onto $DLQ.alices.mine
                time.sleep(1.0)

        assert people.as_alice(alice) == 0
        with contextlib.suppress(hostbus.TimeoutError):
            m = sub.next(timeout=1.0)
            pytest.fail(f"a message reached {m.topic} from uid {m.sender.uid}, who may not publish there: "
                        f"{m.data!r} headers {sorted(m.headers)}")


@pytest.mark.needs_root
def test_queue_list_shows_a_queue_the_caller_may_neither_consume_nor_manage(start_daemon: Callable[..., Daemon],
                                                                             workdir: Path) -> None:
    # docs/queues.md: "queue_list, queue_info and hostbus stats show a caller only the queues it may
    # consume or manage". may_see() accepts a right on *any* subject, even a partial one.
    from tests.integration.test_acl import People, open_daemon

    people = People()
    rules = [{"topic": "jobs.>", "publish": ["*"], "subscribe": ["user:hb-alice"]},
             {"topic": "open.>", "publish": ["*"], "subscribe": ["*"]}]
    d = open_daemon(start_daemon, workdir, {"access": {"default": "deny"}, "acl": rules,
                                            "queues": [{"name": "mixed", "subjects": ["open.>", "jobs.>"]}]})
    def bob() -> None:
        with hostbus.connect(d.socket) as bus:
            with pytest.raises(hostbus.PermissionDeniedError):
                bus.consume("mixed", "b")  # bob may not consume it (no right on jobs.>), nor manage it
            names = [q["name"] for q in bus.queue_list()]
            os.write(1, f"bob sees: queue_list {names}, stats {sorted(bus.stats()['queues'])}\n".encode())
            assert "mixed" not in names, names

    assert people.as_bob(bob) == 0


# ---- consumers -----------------------------------------------------------------------------------


def test_a_consumer_of_large_messages_is_disconnected_as_a_slow_consumer(node: Restartable) -> None:
    # Defaults: max_msg_size 1 MiB, deliver_batch 256. One pump writes 100 MB of QMSGs into the
    # transport at once, past limits.max_queued_bytes_per_connection + max_frame_bytes +
    # write_batch_bytes (72.25 MiB), and UnixPeer.flush ends the member with SLOW_CONSUMER.
    d = node.start({"queues": [{"name": "big", "subjects": ["big"]}]})
    payload = b"x" * 1_000_000
    with d.connect() as bus:
        for _ in range(10):
            bus.publish_batch([("big", payload)] * 10, timeout=60)
        assert bus.queue_info("big")["messages"] == 100
    with d.connect() as bus:
        c = bus.consume("big", "reader")
        seqs = []
        for _ in range(100):
            m = c.next(timeout=10)
            m.ack()
            seqs.append(m.seq)
        assert seqs == list(range(1, 101))


def test_backoff_is_not_applied_before_the_second_delivery_after_a_timeout(node: Restartable) -> None:
    # docs/queues.md: backoff = "delays before the 2nd, 3rd ... delivery, on top of ack_wait for a
    # timeout". Consumer._wait(count) indexes backoff[count - 2] with the count *after* the delivery,
    # so the 2nd delivery after a timeout comes after ack_wait alone (backoff[0] waits for the 3rd).
    d = node.start({"queues": [{"name": "b", "subjects": ["b"]}]})
    with d.connect() as bus:
        bus.publish("b", b"x", confirm=True)
        c = bus.consume("b", "w", ack_wait=0.3, backoff=[2.0], max_deliver=0)
        assert c.next(timeout=5).delivery_count == 1  # not acknowledged
        t0 = time.monotonic()
        again = c.next(timeout=5)
        waited = time.monotonic() - t0
        assert again.delivery_count == 2
        assert waited >= 2.2, f"2nd delivery after {waited:.2f} s: ack_wait 0.3 + backoff 2.0 expected"


def test_a_gap_left_by_recovery_stops_the_ack_floor_and_acked_retention(node: Restartable) -> None:
    cfg = {"store": {"segment_bytes": 64 * 1024},
           "queues": [{"name": "g", "subjects": ["g"], "retention": "acked"}]}
    d = node.start(cfg)
    with d.connect() as bus:
        bus.publish_batch([("g", b"%04d" % i + b"." * 996) for i in range(200)])
    d = node.restart(cfg)  # a clean stop; now a byte of the second segment goes bad
    segs = sorted((d.state_dir / "queues" / "g").glob("*.seg"))
    assert len(segs) >= 3
    assert d.stop() == 0
    data = bytearray(segs[1].read_bytes())
    data[len(data) // 2] ^= 0x01
    segs[1].write_bytes(bytes(data))
    d = node.start(cfg)
    with d.connect() as bus:
        info = bus.queue_info("g")
        c = bus.consume("g", "c", max_inflight=10_000)
        got = []
        with contextlib.suppress(hostbus.TimeoutError):
            while True:
                m = c.next(timeout=1.0)
                m.ack()
                got.append(m.seq)
        bus.flush()
        time.sleep(0.3)
        after = bus.queue_info("g")
    assert got and got[-1] == info["last_seq"]
    # Every message that exists was acknowledged: acked retention should have removed them all.
    assert after["consumers"]["c"]["ack_floor"] == info["last_seq"], after["consumers"]["c"]
    assert after["messages"] == 0, after


# ---- confirms --------------------------------------------------------------------------------------


def _stored_ids(frames: list[wire.Frame]) -> list[int]:
    out = []
    for f in frames:
        if f.type == wire.FrameType.STORED:
            first, count, _ = wire.decode_stored(f.body)
            out += range(first, first + count)
    return out


def test_a_duplicate_is_confirmed_before_its_original_is_on_disk(node: Restartable) -> None:
    # durability = always: a confirm is sent only after the fdatasync of the record. A duplicate
    # (same Hostbus-Msg-Id) of a message whose fsync is still running is confirmed at once with the
    # original's seq (QueueService.capture: dup > 0), ahead of the original: against "answers for one
    # queue come in the order of the CPUBs", and before the seq it names is durable.
    d = node.start({"queues": [{"name": "d", "subjects": ["d.>"]}]})
    raw = RawClient(d.socket)
    orders = []
    for k in range(3):
        base = 1000 * k
        mid = wire.encode_headers({"Hostbus-Msg-Id": f"X{k}"})
        bulk = b"".join(wire.encode_pub(b"d.bulk", b"c" * 1_000_000, pub_id=base + 500 + j) for j in range(6))
        filler = wire.encode_pub(b"not.captured", b"f" * 1_000_000)  # the duplicate comes in a later read
        raw.send(bulk + wire.encode_pub(b"d.x", b"original", mid, pub_id=base + 1) + filler
                 + wire.encode_pub(b"d.x", b"retry", mid, pub_id=base + 2))
        order: list[int] = []
        while not {base + 1, base + 2} <= set(order):
            frame = raw.read_until(wire.FrameType.STORED)
            assert frame is not None, "connection closed"
            order += _stored_ids([frame])
        orders.append([i - base for i in order if i - base in (1, 2)])
    raw.close()
    assert orders == [[1, 2]] * 3, f"order of the confirms of (original, duplicate) per round: {orders}"


# ---- storage errors (a small tmpfs whose inodes run out) -----------------------------------------


def fill_inodes(state: Path) -> list[Path]:
    """Create empty files until the filesystem has no inode left; returns them."""
    made = []
    for i in range(10_000):
        p = state / f"filler{i}"
        try:
            p.touch()
        except OSError:
            break
        made.append(p)
    return made


def test_a_failed_purge_leaves_the_queue_refusing_every_publish(node: Restartable) -> None:
    with small_fs(node, "size=8m,nr_inodes=64") as state:
        d = node.start({"queues": [{"name": "p", "subjects": ["p"]}]})
        with d.connect() as bus:
            for i in range(5):
                bus.publish("p", b"%d" % i, confirm=True)
            fillers = fill_inodes(state)
            with pytest.raises(hostbus.HostbusError):  # no inode for the new segment: refused, fine
                bus.queue_purge("p")
            for f in fillers:
                f.unlink()
            # The disk has room again: the next publish should be stored.
            assert bus.publish("p", b"after", confirm=True)["p"] >= 6


def test_a_batch_refused_at_segment_rollover_is_partly_stored_and_delivered(node: Restartable) -> None:
    # SegmentLog.append writes the part of a batch that fits the current segment, then fails to
    # begin the next one: every publisher of the batch is told STORAGE ("the message was not
    # stored"), yet the first part stays in the log and is delivered once something later is synced.
    with small_fs(node, "size=8m,nr_inodes=64") as state:
        d = node.start({"store": {"segment_bytes": 64 * 1024}, "queues": [{"name": "r", "subjects": ["r"]}]})
        with d.connect() as bus:
            confirmed = [bus.publish("r", b"%02d" % i + b"." * 998, confirm=True)["r"] for i in range(58)]
            fillers = fill_inodes(state)
            with pytest.raises(hostbus.StorageError) as info:
                bus.publish_batch([("r", b"b%02d" % i + b"." * 997) for i in range(20)])
            results = info.value.results  # type: ignore[attr-defined]
            accepted = [r["r"] for r in results if isinstance(r, dict)]
            for f in fillers:
                f.unlink()
            confirmed += accepted
            confirmed.append(bus.publish("r", b"after", confirm=True)["r"])
            c = bus.consume("r", "c", max_inflight=1000)
            got = []
            with contextlib.suppress(hostbus.TimeoutError):
                while True:
                    m = c.next(timeout=1.0)
                    got.append((m.seq, m.data[:3]))
        # What was delivered is exactly what was confirmed: a publish refused with STORAGE was not stored.
        assert [seq for seq, _ in got] == confirmed, f"delivered beyond the confirmed: {got[len(confirmed) - 1:]}"
