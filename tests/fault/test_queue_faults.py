"""Faults of topic queues: the daemon killed while publishers stream confirmed messages, consumers
killed with messages unacknowledged, damaged segment files, a full disk.

Each test checks the history: what was confirmed against what is consumed afterwards, for loss,
duplicates and order.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import hostbus
from tests.conftest import Daemon
from tests.helpers.restart import Restartable, small_fs

HIST = {"queues": [{"name": "hist", "subjects": ["hist.>"], "storage": "file", "durability": "always",
                    "max_msgs": 10_000_000, "duplicate_window": 0}],
        "store": {"segment_bytes": 256 * 1024}}  # small segments: kills land on rollovers too

# A publisher that streams confirmed messages with many in flight and prints each confirm (the
# history) until its connection is lost. Payload "round:publisher:i".
PUBLISHER = """
import sys, hostbus
sock, rnd, k = sys.argv[1], sys.argv[2], sys.argv[3]
bus = hostbus.connect(sock)
out = sys.stdout
window = []
i = 0
try:
    while True:
        window.append((i, bus.publish_async(f"hist.p{k}", f"{rnd}:{k}:{i}".encode())))
        i += 1
        if len(window) >= 256:
            n, fut = window.pop(0)
            out.write(f"{n} {fut.result(10)['hist']}\\n")
            out.flush()
except hostbus.HostbusError:
    pass
"""




def consume_all(d: Daemon, queue: str, consumer: str) -> list[hostbus.Message]:
    with d.connect() as bus:
        expected = bus.queue_info(queue)["messages"]
        c = bus.consume(queue, consumer, max_inflight=10_000)
        out = []
        for _ in range(expected):
            m = c.next(timeout=10)
            m.ack()
            out.append(m)
        with contextlib.suppress(hostbus.TimeoutError):
            extra = c.next(timeout=0.5)
            raise AssertionError(f"more messages than the queue counts: seq {extra.seq}")
        bus.flush()
    return out


def test_confirmed_messages_survive_kill_9_of_the_daemon_at_several_points(node: Restartable) -> None:
    confirmed: dict[tuple[str, str], list[tuple[int, int]]] = {}  # (round, publisher) -> [(i, seq)]
    for rnd, kill_after in enumerate((0.0, 0.3, 0.7, 1.2)):  # seconds after every publisher is streaming
        d = node.start(HIST)
        files = {str(k): node.workdir / f"confirms-{rnd}-{k}" for k in range(3)}
        pubs = {}
        for k, path in files.items():
            with path.open("w") as out:
                pubs[k] = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(d.socket), str(rnd), k], stdout=out)
        deadline = time.monotonic() + 20
        while not all(path.stat().st_size for path in files.values()):  # every publisher has a confirm
            assert time.monotonic() < deadline, "a publisher never got a confirm"
            time.sleep(0.01)
        time.sleep(kill_after)
        d.kill()  # SIGKILL: no shutdown, no last sync, no state saved
        for k, proc in pubs.items():
            proc.wait(30)
            lines = files[k].read_text().splitlines()
            assert all(len(line.split()) == 2 for line in lines), (rnd, k, [x for x in lines if len(x.split()) != 2])
            confirmed[(str(rnd), k)] = [(int(a), int(b)) for a, b in (line.split() for line in lines)]
    assert all(len(v) >= 1 for v in confirmed.values()), {k: len(v) for k, v in confirmed.items()}
    d = node.start(HIST)
    stored = consume_all(d, "hist", "audit")
    assert [m.seq for m in stored] == sorted(m.seq for m in stored)
    by_pub: dict[tuple[str, str], list[tuple[int, int]]] = {}
    payloads = [m.data.decode() for m in stored]
    assert len(payloads) == len(set(payloads)), "a message was stored twice"
    for m in stored:
        rnd, k, i = m.data.decode().split(":")
        by_pub.setdefault((rnd, k), []).append((int(i), m.seq))
    for key, confirms in confirmed.items():
        got = by_pub.get(key, [])
        idx = [i for i, _ in got]
        assert idx == list(range(len(idx))), f"{key}: stored out of order or with a hole"
        seq_of = dict(got)
        for i, seq in confirms:
            assert seq_of.get(i) == seq, (f"{key}: confirmed message {i} (seq {seq}) lost or moved: stored "
                                          f"{got[:4]}..., confirmed {confirms[:4]}...")
    total_confirmed = sum(len(v) for v in confirmed.values())
    assert len(stored) >= total_confirmed
    with d.connect() as bus:  # and the queue goes on from where it is
        assert bus.publish("hist.after", b"x", confirm=True) == {"hist": stored[-1].seq + 1}


CONSUMER = """
import sys, time, hostbus
bus = hostbus.connect(sys.argv[1])
c = bus.consume("jobs", sys.argv[2], ack_wait=60, max_deliver=2)
for _ in range(int(sys.argv[3])):
    c.next(timeout=10)  # taken, never acknowledged
print("holding", flush=True)
time.sleep(60)
"""


def test_a_killed_consumer_s_messages_come_again_then_go_to_the_dead_letters(node: Restartable) -> None:
    d = node.start({"queues": [{"name": "jobs", "subjects": ["jobs.>"]}]})
    with d.connect() as bus:
        dead = bus.subscribe("$DLQ.jobs")
        for i in range(20):
            bus.publish("jobs.x", f"{i}", confirm=True)

        def held_then_killed(n: int) -> None:
            p = subprocess.Popen([sys.executable, "-c", CONSUMER, str(d.socket), "w", str(n)],
                                 stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None and p.stdout.readline().strip() == "holding"
            p.kill()
            p.wait(10)

        held_then_killed(20)  # 1st delivery of all 20, then kill -9
        c = bus.consume("jobs", "w", max_deliver=2)
        again = [c.next(timeout=5) for _ in range(20)]
        assert sorted(m.seq for m in again) == list(range(1, 21)) and {m.delivery_count for m in again} == {2}
        for m in again[:10]:
            m.ack()
        bus.flush()
        c.unsubscribe()
        # The other 10 were delivered twice: the next try sends them to the dead letters instead.
        bus.consume("jobs", "w")
        letters = [dead.next(timeout=5) for _ in range(10)]
        assert sorted(int(m.headers["Hostbus-Seq"]) for m in letters) == sorted(m.seq for m in again[10:])
        assert {m.headers["Hostbus-Deliveries"] for m in letters} == {"2"}
        assert {m.headers["Hostbus-Dead-Reason"] for m in letters} == {"max_deliver"}
        bus.flush()
        info = bus.queue_info("jobs")["consumers"]["w"]
        assert (info["ack_floor"], info["pending"], info["dead_lettered"]) == (20, 0, 10)


def _segment(d: Daemon, queue: str) -> Path:
    segs = sorted((d.state_dir / "queues" / queue).glob("*.seg"))
    assert len(segs) == 1
    return segs[0]


def _events(d: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in (json.loads(line) for line in d.log_path.read_text().splitlines() if line.startswith("{"))
            if e.get("event") == name]


def test_a_torn_tail_is_cut_and_reported_and_the_queue_goes_on(node: Restartable) -> None:
    cfg = {"queues": [{"name": "t", "subjects": ["t"]}]}
    d = node.start(cfg)
    with d.connect() as bus:
        for i in range(100):
            bus.publish_async("t", f"{i}".encode())
        assert bus.publish("t", b"last", confirm=True) == {"t": 101}
    assert d.stop() == 0
    seg = _segment(d, "t")
    whole = seg.stat().st_size
    with seg.open("ab") as f:  # a write the crash cut short: a record head and half a body
        f.write((64).to_bytes(4, "little") + b"\x00" * 30)
    d = node.start(cfg)
    rec = _events(d, "queue_recovered")
    assert rec and rec[0]["queue"] == "t" and rec[0]["discarded_bytes"] == 34
    assert rec[0]["files"] == {seg.name: {"bytes": 34, "records": 1}}
    assert seg.stat().st_size == whole
    msgs = consume_all(d, "t", "c")
    assert [m.data for m in msgs] == [f"{i}".encode() for i in range(100)] + [b"last"]
    with d.connect() as bus:
        assert bus.publish("t", b"next", confirm=True) == {"t": 102}


def test_a_flipped_byte_is_never_delivered_and_the_daemon_keeps_running(node: Restartable) -> None:
    cfg = {"queues": [{"name": "f", "subjects": ["f"]}]}
    d = node.start(cfg)
    with d.connect() as bus:
        for i in range(100):
            bus.publish_async("f", b"%03d" % i)
        bus.publish("f", b"end", confirm=True)
    assert d.stop() == 0
    seg = _segment(d, "f")
    data = bytearray(seg.read_bytes())
    rec_size = len(data) // 101 if len(data) % 101 == 0 else None
    assert rec_size is not None  # the 101 records are all of one size
    data[50 * rec_size + rec_size - 2] ^= 0x01  # a bit of the 51st record's payload
    seg.write_bytes(bytes(data))
    d = node.start(cfg)
    rec = _events(d, "queue_recovered")
    assert rec and rec[0]["files"][seg.name] == {"bytes": 51 * rec_size, "records": 51}
    msgs = consume_all(d, "f", "c")
    assert [m.data for m in msgs] == [b"%03d" % i for i in range(50)]  # what precedes it, intact
    with d.connect() as bus:
        assert bus.publish("f", b"after", confirm=True) == {"f": 51}
        assert bus.stats()["queues"]["f"]["messages"] == 51


def test_a_full_disk_refuses_with_a_clear_error_and_loses_nothing_confirmed(node: Restartable) -> None:
    with small_fs(node, "size=320k"):
        cfg = {"queues": [{"name": "d", "subjects": ["d.>"]}], "store": {"segment_bytes": 64 * 1024}}
        d = node.start(cfg)
        confirmed: list[tuple[bytes, int]] = []
        error: hostbus.HostbusError | None = None
        with d.connect() as bus:
            sub = bus.subscribe("d.>")
            for i in range(2000):
                data = b"%05d" % i + b"x" * 1000
                try:
                    confirmed.append((data, bus.publish("d.x", data, confirm=True)["d"]))
                except hostbus.StorageError as exc:
                    error = exc
                    break
            assert error is not None, "the filesystem never filled up"
            assert "No space left on device" in str(error) and "queue 'd' could not store the message" in str(error)
            assert len(confirmed) > 100
            # The broker goes on: fan-out works, and the queue refuses clearly while the disk is full.
            assert sub.next(timeout=2).topic == "d.x"
            with pytest.raises(hostbus.StorageError):
                bus.publish("d.y", b"y" * 1000, confirm=True)
            bus.publish("plain.topic", b"fine")
            bus.flush()
            assert bus.queue_info("d")["refused"]["storage"] >= 2
        msgs = consume_all(d, "d", "c")
        assert [(m.data, m.seq) for m in msgs] == confirmed
        d = node.restart(cfg, kill=True)  # and after a crash too
        assert [(m.data, m.seq) for m in consume_all(d, "d", "c2")] == confirmed
        d.stop()
