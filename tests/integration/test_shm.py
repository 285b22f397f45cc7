"""Shared-memory rings against a real daemon: real segments, real POSIX semaphores, real users."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import hostbus
from hostbus import ring as layout
from hostbus.shm import fetch_fd
from tests.conftest import Daemon, ensure_user, run_as
from tests.helpers.subs import drain

SEQ = struct.Struct("<Q")


def shm_names() -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if "hostbus" in n)


def ring_helpers() -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                if b"hostbusd.ringhelper" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(int(pid))
    return out


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen within {timeout} s")


@pytest.fixture
def clean_shm() -> Iterator[None]:
    before = shm_names()
    yield
    wait_for(lambda: shm_names() == before, what=f"/dev/shm back to {before} (now {shm_names()})")


def test_200k_messages_through_a_publish_ring_arrive_complete_and_in_order(daemon: Daemon, clean_shm: None) -> None:
    n = 200_000
    with daemon.connect("socket-sub") as sbus, daemon.connect("ring-sub") as rbus, daemon.connect("pub") as pbus:
        # Broker-side queues that hold the whole run: the publisher may run ahead of the readers.
        ssub = sbus.subscribe("seq", pending_limit=n + 1, max_msgs=n)
        rsub = rbus.subscribe("seq", via="shm", pending_limit=n + 1, max_msgs=n, ring_slots=64,
                              ring_slot_size=64 * 1024)
        with pbus.shm_publisher(slots=64, slot_size=64 * 1024) as pub:
            assert shm_names() == []  # the names are gone once both sides hold the objects
            for i in range(n):
                pub.publish("seq", SEQ.pack(i))
            pub.flush()
            for sub in (ssub, rsub):
                got = [SEQ.unpack(sub.next(timeout=30).data)[0] for _ in range(n)]
                assert got == list(range(n))
                assert sub.missed == 0
            st = pbus.stats()
            rings = {r["direction"]: r for r in st["rings"]}
            assert rings["publish"]["messages_in"] == n and rings["deliver"]["messages_out"] == n
        msg_sender = None
        pub2 = pbus.shm_publisher(slots=4, slot_size=4096)
        pub2.publish("seq", b"x", headers={"k": "v"})
        pub2.flush()
        for sub in (ssub, rsub):
            m = sub.next(timeout=5)
            assert (m.topic, m.data, m.headers) == ("seq", b"x", {"k": "v"})
            msg_sender = m.sender
        assert msg_sender == hostbus.Sender(os.getuid(), os.getgid(), os.getpid(), "")
        pub2.close()
    wait_for(lambda: not ring_helpers(), what="ring helpers gone")


@pytest.mark.parametrize("size", [1, "one-slot", 3 * 4096 + 17, 200_000])
def test_message_sizes_one_byte_one_slot_and_many_slots(daemon: Daemon, size: int | str, clean_shm: None) -> None:
    slot_size = 4096
    topic = "sz"
    if size == "one-slot":  # a record that fills a slot's room exactly
        size = layout.slot_capacity(slot_size) - layout.PUB_RECORD.size - 8 - len(topic)
    assert isinstance(size, int)
    payload = bytes(i % 251 for i in range(size))
    with daemon.connect() as bus:
        ssub = bus.subscribe(topic)
        rsub = bus.subscribe(topic, via="shm", ring_slots=4, ring_slot_size=slot_size)
        with bus.shm_publisher(slots=4, slot_size=slot_size) as pub:
            for _ in range(3):
                pub.publish(topic, payload)
            pub.flush()
            before = pub.next
        for sub in (ssub, rsub):
            assert [m.data for m in (sub.next(timeout=10) for _ in range(3))] == [payload] * 3
        if size == layout.slot_capacity(slot_size) - layout.PUB_RECORD.size - 8 - len(topic):
            assert before == 3  # one slot per message, exactly
        elif size > slot_size:
            assert before > 3


def test_a_message_over_the_limit_is_refused_before_anything_is_written(start_daemon: Callable[..., Daemon],
                                                                        clean_shm: None) -> None:
    d = start_daemon({"shm": {"max_message_bytes": 2048}})
    with d.connect() as bus:
        sub = bus.subscribe("big")
        with bus.shm_publisher(slots=4, slot_size=1024) as pub:
            with pytest.raises(hostbus.MessageTooLargeError, match=r"shm\.max_message_bytes"):
                pub.publish("big", b"x" * 2048)
            assert pub.next == 0  # nothing was written
            pub.publish("big", b"fits")
            pub.flush()
        assert sub.next(timeout=5).data == b"fits"


def test_bad_geometry_and_the_per_uid_ring_limit_are_refused(start_daemon: Callable[..., Daemon],
                                                             clean_shm: None) -> None:
    d = start_daemon({"limits": {"max_rings_per_uid": 1}, "shm": {"max_slots": 16}})
    with d.connect() as bus:
        with pytest.raises(hostbus.HostbusError, match=r"shm\.max_slots"):
            bus.shm_publisher(slots=17, slot_size=4096)
        with pytest.raises(hostbus.HostbusError, match="slot_size"):
            bus.shm_publisher(slots=4, slot_size=16)
        pub = bus.shm_publisher(slots=4, slot_size=4096)
        with pytest.raises(hostbus.LimitExceededError, match=r"limits\.max_rings_per_uid"):
            bus.shm_publisher(slots=4, slot_size=4096)
        pub.close()
        bus.shm_publisher(slots=4, slot_size=4096).close()  # given back: room again


CHILD_PUBLISHER = """
import sys, hostbus
bus = hostbus.connect(sys.argv[1])
pub = bus.shm_publisher(slots=8, slot_size=4096)
print("ready", flush=True)
i = 0
while True:  # messages of 3 slots each, forever: killed in the middle of one
    pub.publish("torn", bytes([i % 256]) * 10000)
    i += 1
"""


def test_a_publisher_killed_mid_stream_leaves_nothing_torn_and_its_ring_is_reclaimed(
        daemon: Daemon, clean_shm: None) -> None:
    with daemon.connect() as bus:
        sub = bus.subscribe("torn", pending_limit=1_000_000)
        child = subprocess.Popen([sys.executable, "-c", CHILD_PUBLISHER, str(daemon.socket)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        child.kill()
        child.wait()
        child.stdout.close()
        msgs = drain(sub, 1.0)
        assert msgs, "nothing arrived before the kill"
        for m in msgs:  # every delivered message is whole: 10000 copies of one byte
            assert len(m.data) == 10000 and m.data == m.data[:1] * 10000
        wait_for(lambda: bus.stats()["rings"] == [], what="the ring reclaimed")
    wait_for(lambda: not ring_helpers(), what="ring helpers gone")


def test_a_client_blocked_on_a_full_ring_learns_that_the_broker_died(daemon: Daemon, clean_shm: None) -> None:
    bus = daemon.connect()
    pub = bus.shm_publisher(slots=2, slot_size=4096)
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.proc.wait()
    t0 = time.monotonic()
    with pytest.raises(hostbus.ConnectionLostError):
        for _ in range(100):  # 2 slots, nobody takes them: this blocks until the loss is seen
            pub.publish("x", b"y" * 3000)
    assert time.monotonic() - t0 < 2.0
    bus.close()
    wait_for(lambda: not ring_helpers(), what="the helpers of a killed broker exit")


@pytest.mark.needs_root
def test_another_user_cannot_open_a_ring_or_fetch_its_memory(daemon: Daemon, workdir: Path,
                                                            clean_shm: None) -> None:
    workdir.chmod(0o755)
    daemon.workdir.chmod(0o755)
    daemon.runtime_dir.chmod(0o755)
    daemon.socket.chmod(0o666)
    uid, gid = ensure_user("hostbus-test")
    with daemon.connect() as bus:
        res = bus.call("ring_attach", direction="publish", slots=4, slot_size=4096)  # offered, not yet taken
        names = [res["free"], res["filled"]]
        files = [Path("/dev/shm") / ("sem." + n[1:]) for n in names]
        assert all(f.exists() and (f.stat().st_mode & 0o777) == 0o600 for f in files)
        token, sock = res["token"], str(daemon.socket)

        def intruder() -> None:
            import posix_ipc

            for name in names:
                with pytest.raises(posix_ipc.PermissionsError):
                    posix_ipc.Semaphore(name)
            for f in files:
                with pytest.raises(PermissionError):
                    os.open(f, os.O_RDWR)
            with pytest.raises(hostbus.HostbusError, match="no ring is waiting"):
                fetch_fd(sock, token)  # the token is for the owner's uid only

        assert run_as(uid, gid, intruder) == 0
        fd = fetch_fd(sock, token)  # the owner still can
        os.close(fd)
        bus.call("ring_ready", ring=res["ring"])
        assert not any(f.exists() for f in files)  # no name left once both sides hold them


@pytest.mark.needs_root
def test_a_ring_of_another_users_client_works(daemon: Daemon, workdir: Path, clean_shm: None) -> None:
    workdir.chmod(0o755)
    daemon.workdir.chmod(0o755)
    daemon.runtime_dir.chmod(0o755)
    daemon.socket.chmod(0o666)
    uid, gid = ensure_user("hostbus-test")
    sock = str(daemon.socket)
    with daemon.connect() as bus:
        sub = bus.subscribe("other.>")

        def publish_through_a_ring() -> None:
            with hostbus.connect(sock) as b, b.shm_publisher(slots=4, slot_size=4096) as pub:
                pub.publish("other.hello", b"from another uid")
                pub.flush()

        assert run_as(uid, gid, publish_through_a_ring) == 0
        msg = sub.next(timeout=5)
        assert (msg.data, msg.sender.uid) == (b"from another uid", uid)


def test_a_ring_subscriber_that_stops_reading_gets_its_overflow_policy(daemon: Daemon, clean_shm: None) -> None:
    with daemon.connect("stalled") as stalled, daemon.connect("reader") as reader, daemon.connect("pub") as pbus:
        ok = reader.subscribe("flood", pending_limit=100_000)
        rsub = stalled.subscribe("flood", via="shm", policy="drop-new", max_msgs=10, ring_slots=2,
                                 ring_slot_size=4096)
        ring = stalled._deliver_ring
        assert ring is not None
        ring._stop = True  # the client stops reading its ring
        ring.thread.join(2)
        n = 2000
        for i in range(n):
            pbus.publish("flood", SEQ.pack(i) * 100)
        pbus.flush()
        assert len(drain(ok, 1.0)) == n  # the others are not held back
        st = pbus.stats()
        deliver = next(r for r in st["rings"] if r["direction"] == "deliver")
        assert deliver["dropped"] > 0 and deliver["filled"] == 2
        assert rsub.missed == 0  # (its GAP comes with the next message it reads)
        # It reads again: what the ring and the subscription's queue held comes first, then the
        # GAP that counts every dropped message, then new messages.
        ring._stop = False
        ring.thread = threading.Thread(target=ring._run, daemon=True)
        ring.thread.start()
        held = drain(rsub, 1.0)
        pbus.publish("flood", b"after")  # once what was held is read: it has room again
        pbus.flush()
        assert rsub.next(timeout=5).data == b"after"
        seqs = [SEQ.unpack_from(m.data)[0] for m in held]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert rsub.missed == deliver["dropped"] and len(seqs) + rsub.missed == n  # each one delivered or counted


def test_the_cli_publishes_and_subscribes_through_rings(daemon: Daemon, clean_shm: None) -> None:
    from tests.integration.test_cli import cli, start_sub, wait_subscribed

    sub = start_sub(daemon, "demo.>", "--shm", "--count", "3", "--timeout", "15")
    wait_subscribed(daemon, 1)
    assert cli(daemon, "pub", "--shm", "demo.hello", "hello, rings").returncode == 0
    r = cli(daemon, "pub", "--shm", "--lines", "demo.lines", stdin="one\ntwo\n")
    assert r.returncode == 0, r.stderr
    out, err = sub.communicate(timeout=30)
    assert sub.returncode == 0, err
    assert out.splitlines() == ["demo.hello hello, rings", "demo.lines one", "demo.lines two"]
    st = cli(daemon, "stats")
    assert st.returncode == 0 and "ring" not in st.stdout  # every ring was given back


async def _aio_rings(sock: str) -> list[bytes]:
    from hostbus import aio

    async with await aio.connect(sock) as bus:
        rsub = await bus.subscribe("a.>", via="shm", ring_slots=4, ring_slot_size=4096)
        async with await bus.shm_publisher(slots=4, slot_size=4096) as pub:
            for i in range(5000):  # 4 slots of 4 KiB: the publisher waits for the broker many times
                await pub.publish("a.x", str(i))
            await pub.publish("a.big", b"z" * 50_000)
            await pub.flush()
        return [(await rsub.next(timeout=10)).data for _ in range(5001)]


def test_asyncio_clients_publish_and_subscribe_through_rings(daemon: Daemon, clean_shm: None) -> None:
    got = asyncio.run(_aio_rings(str(daemon.socket)))
    assert got[:5000] == [str(i).encode() for i in range(5000)] and got[5000] == b"z" * 50_000


def test_start_up_removes_semaphores_a_dead_hostbusd_left(start_daemon: Callable[..., Daemon]) -> None:
    dead = next(p for p in range(4_000_000, 4_100_000) if not Path(f"/proc/{p}").exists())
    stale = Path(f"/dev/shm/sem.hostbus.{dead}.0123456789abcdef.free")
    alive = Path(f"/dev/shm/sem.hostbus.{os.getpid()}.0123456789abcdef.free")  # a live process's: kept
    for p in (stale, alive):
        p.write_bytes(b"\0" * 32)
    try:
        d = start_daemon()
        assert not stale.exists() and alive.exists()
        assert '"event": "stale_rings_removed"' in d.log()
    finally:
        for p in (stale, alive):
            p.unlink(missing_ok=True)


@pytest.mark.parametrize("slot", [
    b"\x09" + b"\0" * 7,  # an unknown slot kind
    layout.SLOT_HEAD.pack(layout.BATCH, 0, 1, 4000) + b"\0" * 10,  # a record past the end of the slot
    layout.SLOT_HEAD.pack(layout.BATCH, 0, 1, 16) + layout.PUB_RECORD.pack(11, 0) + b"\3\0\0\0\0\0\0\0a.",  # bad topic
    layout.SLOT_HEAD.pack(layout.LAST, 0, 0, 4) + b"abcd",  # the end of a message that never began
])
def test_a_broken_slot_ends_that_ring_only(daemon: Daemon, slot: bytes, clean_shm: None) -> None:
    with daemon.connect() as bus, daemon.connect() as other:
        sub = other.subscribe("ok")
        pub = bus.shm_publisher(slots=4, slot_size=4096)
        ring = pub.ring  # write the slot as a broken client would: by hand
        ring.take()
        ring.mm[:len(slot)] = slot
        ring.filled.release()
        with pytest.raises(hostbus.RingClosedError, match=f"ring {pub.id} ended"):
            pub.flush(timeout=10)
        with pytest.raises(hostbus.RingClosedError):
            pub.publish("ok", b"more")
        wait_for(lambda: bus.stats()["rings"] == [], what="the broken ring removed")
        other.publish("ok", b"the broker goes on")
        assert sub.next(timeout=5).data == b"the broker goes on"
        pub.close()


def test_ring_subscriptions_count_against_the_connections_subscription_limit(
        start_daemon: Callable[..., Daemon], clean_shm: None) -> None:
    d = start_daemon({"limits": {"max_subscriptions_per_connection": 2}})
    with d.connect() as bus:
        bus.subscribe("a")
        bus.subscribe("b", via="shm", ring_slots=2, ring_slot_size=4096)
        with pytest.raises(hostbus.LimitExceededError, match=r"limits\.max_subscriptions_per_connection"):
            bus.subscribe("c", via="shm")
        with pytest.raises(hostbus.LimitExceededError):
            bus.subscribe("d")
        assert bus.stats()["subscriptions"] == 2


async def _aio_tasks_share_a_ring_publisher(sock: str, n: int) -> tuple[dict[str, list[bytes]], object]:
    from hostbus import aio

    sub_bus = await aio.connect(sock, name="tasks-sub")
    pub_bus = await aio.connect(sock, name="tasks-pub")
    try:
        sub = await sub_bus.subscribe("tasks.>", pending_limit=10 * n)
        # Two small slots: the tasks wait for free slots all the time, each in the middle of
        # a message while the others go on.
        pub = await pub_bus.shm_publisher(slots=2, slot_size=4096)

        async def task(name: str) -> None:
            for i in range(n):
                await pub.publish(f"tasks.{name}", f"{name}:{i}".encode() + bytes(i % 300))

        await asyncio.gather(*(task(name) for name in "abcd"))
        await pub.flush()
        got: dict[str, list[bytes]] = {name: [] for name in "abcd"}
        for _ in range(4 * n):
            msg = await sub.next(timeout=10)
            got[msg.topic.removeprefix("tasks.")].append(msg.data)
        return got, pub.ring.closed
    finally:
        await pub_bus.close()
        await sub_bus.close()


def test_asyncio_tasks_sharing_a_ring_publisher_each_arrive_whole_and_in_order(daemon: Daemon,
                                                                               clean_shm: None) -> None:
    n = 3000
    got, closed = asyncio.run(_aio_tasks_share_a_ring_publisher(str(daemon.socket), n))
    assert closed is None
    for name, data in got.items():
        assert data == [f"{name}:{i}".encode() + bytes(i % 300) for i in range(n)], name
