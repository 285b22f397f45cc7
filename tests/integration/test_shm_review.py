"""Review of the shared-memory rings (git log 8834e8f..944fb23): one test per defect found.

Each test is marked xfail(strict=True) with the bug it shows: it fails today, and the mark is to
be removed with the fix. Several tests speak the ring protocol themselves (:class:`RawRing`), as a
hostile client would; a few stop the daemon (SIGSTOP) for a moment to order two events.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import mmap
import os
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

import hostbus
from hostbus import ring as layout
from hostbus import wire
from hostbus.shm import fetch_fd
from tests.conftest import Daemon, ensure_user, run_as, toml_dump
from tests.helpers.raw import RawClient
from tests.helpers.subs import drain
from tests.integration.test_shm import shm_names, wait_for

_ids = itertools.count(1_000_000)


# ---- a client that speaks the ring protocol itself --------------------------------------------------------


def call(raw: RawClient, op: str, **args: Any) -> dict[str, Any]:
    """A CALL on a raw connection: its RESULT, or the ERR for it raised as HostbusError."""
    cid = next(_ids)
    raw.send(wire.encode_call(cid, op, args))
    raw.sock.settimeout(10)
    while True:
        for i, (ftype, _, body) in enumerate(raw.frames):
            if ftype == wire.FrameType.RESULT and wire.split_u32(body)[0] == cid:
                del raw.frames[i]
                return wire.decode_json_obj(wire.split_u32(body)[1])
            if ftype == wire.FrameType.ERR:
                code, ref, message = wire.decode_err(body)
                if ref == cid:
                    del raw.frames[i]
                    raise hostbus.HostbusError(f"{code}: {message}", code=code)
        data = raw.sock.recv(1 << 20)
        if not data:
            raise AssertionError(f"the broker closed the connection during {op}: {raw.frames}")
        raw.decoder.feed(data)
        raw.frames += raw.decoder.frames()


def sub(raw: RawClient, sid: int, **opts: Any) -> None:
    """SUB on a raw connection; waits for its OK (AssertionError on an ERR)."""
    raw.send(wire.encode_sub(sid, opts))
    raw.sock.settimeout(10)
    while True:
        for i, (ftype, _, body) in enumerate(raw.frames):
            if ftype == wire.FrameType.OK and wire.split_u32(body)[0] == sid:
                del raw.frames[i]
                return
            if ftype == wire.FrameType.ERR and wire.decode_err(body)[1] == sid:
                raise AssertionError(f"SUB {sid} refused: {wire.decode_err(body)}")
        data = raw.sock.recv(1 << 20)
        assert data, "the broker closed the connection"
        raw.decoder.feed(data)
        raw.frames += raw.decoder.frames()


class RawRing:
    """A ring attached by hand: the memory mapped, both semaphores open, ``ring_ready`` sent
    unless ``ready=False``."""

    def __init__(self, raw: RawClient, sock: Path, direction: str, slots: int, slot_size: int,
                 ready: bool = True) -> None:
        self.raw = raw
        self.res = call(raw, "ring_attach", direction=direction, slots=slots, slot_size=slot_size)
        self.id = int(self.res["ring"])
        self.slots, self.slot_size = slots, slot_size
        fd = fetch_fd(str(sock), self.res["token"])
        try:
            self.mm = mmap.mmap(fd, slots * slot_size)
        finally:
            os.close(fd)
        self.free = posix_ipc.Semaphore(self.res["free"])
        self.filled = posix_ipc.Semaphore(self.res["filled"])
        if ready:
            self.ready()

    def ready(self) -> None:
        call(self.raw, "ring_ready", ring=self.id)

    def write(self, index: int, slot: bytes) -> None:
        off = (index % self.slots) * self.slot_size
        self.mm[off:off + len(slot)] = slot


def pub_record(topic: str, data: bytes = b"", reply: str = "", flags: int = 0) -> bytes:
    block = wire.message_block(topic.encode(), data, b"", reply.encode())
    return layout.PUB_RECORD.pack(len(block), flags) + block


def batch(records: list[bytes]) -> bytes:
    body = b"".join(records)
    return layout.SLOT_HEAD.pack(layout.BATCH, 0, len(records), len(body)) + body


def put_raw(pub: Any, index: int, slot: bytes) -> None:
    """Write ``slot`` as slot ``index`` of a ShmPublisher's ring by hand and post it (as a broken
    or hostile client would; the publisher's own writer is bypassed)."""
    ring = pub.ring
    ring.take()
    off = index * ring.slot_size
    ring.mm[off:off + len(slot)] = slot
    ring.filled.release()


def helpers_of(daemon: Daemon) -> list[int]:
    """Pids of the ring helpers the daemon started (its children running hostbusd.ringhelper)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == daemon.pid and b"hostbusd.ringhelper" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(int(pid))
    return out


@contextlib.contextmanager
def stopped(daemon: Daemon) -> Iterator[None]:
    """The daemon stopped (SIGSTOP) inside the block: what happens meanwhile waits for one turn."""
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: Path(f"/proc/{daemon.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T",
                 what="the daemon stopped")
        yield
    finally:
        os.kill(daemon.pid, signal.SIGCONT)


def alive(d: Daemon) -> None:
    """The daemon still serves (a crash shows as exit status 70 in the message)."""
    try:
        with d.connect("probe") as bus:
            bus.stats()
    except hostbus.HostbusError as exc:
        code = d.proc.poll()
        why = [line for line in d.log().splitlines() if "internal_error" in line or "Error" in line][-3:]
        raise AssertionError(f"the daemon is gone (exit status {code}): {exc}; log: {why}") from None


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---- 0. a record cut across slots that is shorter than a record's head ----------------------------------


def test_a_message_cut_across_slots_shorter_than_a_record_head_does_not_kill_the_daemon(daemon: Daemon) -> None:
    with daemon.connect() as bus:
        pub = bus.shm_publisher(slots=4, slot_size=4096)
        put_raw(pub, 0, layout.SLOT_HEAD.pack(layout.FIRST, 0, 0, 4) + layout.TOTAL.pack(2))  # a 2-byte record
        put_raw(pub, 1, layout.SLOT_HEAD.pack(layout.LAST, 0, 0, 2) + b"ab")  # whole: then its 5-byte head is read
        with contextlib.suppress(hostbus.HostbusError):
            pub.flush(timeout=2)
    alive(daemon)


# ---- 1. ring_ready after the helper died: a closed ring is revived --------------------------------------


def test_ring_ready_after_the_helper_died_does_not_revive_a_closed_ring(daemon: Daemon) -> None:
    raw = RawClient(daemon.socket)
    ring = RawRing(raw, daemon.socket, "deliver", 2, 4096, ready=False)
    (helper,) = helpers_of(daemon)
    with stopped(daemon):  # the broker reads ring_ready before it notices its helper is gone
        raw.send(wire.encode_call(next(_ids), "ring_ready", {"ring": ring.id}))
        time.sleep(0.2)
        os.kill(helper, signal.SIGKILL)
        time.sleep(0.2)
    time.sleep(0.3)
    with contextlib.suppress(AssertionError):
        sub(raw, 7, pattern="t", via="shm", ring=ring.id)  # refused, as for any closed ring
    with daemon.connect() as bus:
        bus.publish("t", b"x")
        with contextlib.suppress(hostbus.HostbusError):
            bus.flush(timeout=2)
    time.sleep(0.3)
    alive(daemon)


# ---- 2. the ring's owner fails while its slots are routed ------------------------------------------------


def test_an_owner_failing_in_the_middle_of_a_slot_does_not_kill_the_daemon(daemon: Daemon) -> None:
    raw = RawClient(daemon.socket)  # reads nothing from here on: its queue overflows
    sub(raw, 1, pattern="t", policy="disconnect", max_msgs=1)
    ring = RawRing(raw, daemon.socket, "publish", 2, 1 << 20)
    ring.write(0, batch([pub_record("t", b"m" * 4000)] * 250))  # 1 MB of messages to its own subscription
    ring.filled.release()  # one slot, as any publisher posts it
    time.sleep(0.5)
    alive(daemon)


# ---- 3. access rules -------------------------------------------------------------------------------------


@pytest.mark.needs_root
def test_a_ring_cannot_aim_a_reply_at_a_topic_its_owner_may_not_publish(
        start_daemon: Callable[..., Daemon], workdir: Path) -> None:
    workdir.chmod(0o755)
    d = start_daemon({"socket": {"dir_mode": 0o755, "mode": 0o666}, "access": {"default": "allow"},
                      "acl": [{"topic": "secret.>", "publish": ["uid:0"]}]})  # only root publishes secrets
    d.workdir.chmod(0o755)
    uid, gid = ensure_user("hostbus-test")
    sock = str(d.socket)

    def requester() -> None:  # may publish svc, not secret.x: a socket request is refused
        with hostbus.connect(sock) as bus:
            bus.publish("svc", b"", reply_to="secret.x")
            with pytest.raises(hostbus.PermissionDeniedError, match="may not ask for replies on"):
                bus.flush()
            pub = bus.shm_publisher(slots=4, slot_size=4096)
            put_raw(pub, 0, batch([pub_record("svc", b"through the ring", reply="secret.x")]))
            with contextlib.suppress(hostbus.HostbusError):
                pub.flush(timeout=5)

    with d.connect("responder") as responder, d.connect("watcher") as watcher:
        secrets = watcher.subscribe("secret.>")
        svc = responder.subscribe("svc")
        assert run_as(uid, gid, requester) == 0
        for msg in drain(svc, 0.5):  # a responder answers every request it gets
            msg.respond(b"the answer, where the requester may not publish")
        responder.flush()
        assert drain(secrets, 0.5) == []


# ---- 4. deliver rings: what a subscription receives ------------------------------------------------------


def test_two_overlapping_ring_subscriptions_each_get_the_message(daemon: Daemon) -> None:
    with daemon.connect() as bus, daemon.connect() as pbus:
        wide = bus.subscribe("a.>", via="shm", ring_slots=4, ring_slot_size=4096)
        narrow = bus.subscribe("a.b", via="shm")
        pbus.publish("a.b", b"one")
        pbus.flush()
        assert [m.data for m in drain(wide, 0.5)] == [b"one"]
        assert [m.data for m in drain(narrow, 0.5)] == [b"one"]  # as over the socket: one MSG per subscription


def test_a_second_ring_subscription_gets_the_retained_message(daemon: Daemon) -> None:
    with daemon.connect() as bus, daemon.connect() as pbus:
        first = bus.subscribe("r", via="shm", ring_slots=4, ring_slot_size=4096)
        pbus.publish("r", b"kept", retain=True)
        pbus.flush()
        assert [m.data for m in drain(first, 0.5)] == [b"kept"]
        second = bus.subscribe("r", via="shm")  # the retained block is the one just handed to the ring
        assert [(m.data, m.retained) for m in drain(second, 0.5)] == [(b"kept", True)]


def test_a_request_received_through_a_ring_can_be_answered(daemon: Daemon) -> None:
    with daemon.connect("responder") as responder, daemon.connect("requester") as requester:
        svc = responder.subscribe("svc", via="shm", ring_slots=4, ring_slot_size=4096)

        def serve() -> None:
            with contextlib.suppress(hostbus.HostbusError, ValueError):
                svc.next(timeout=5).respond(b"pong")
                responder.flush()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        assert requester.request("svc", b"ping", timeout=3).data == b"pong"
        t.join(5)


def test_a_message_dropped_while_the_ring_is_full_is_reported_as_a_gap_not_garbage(daemon: Daemon) -> None:
    with daemon.connect("ring") as bus, daemon.connect("pub") as pbus:
        rsub = bus.subscribe("g", via="shm", policy="drop-new", max_bytes=2000, ring_slots=2, ring_slot_size=4096)
        ring = bus._deliver_ring
        assert ring is not None
        ring._stop = True  # the client stops reading for a while
        ring.thread.join(2)
        for data in (b"1", b"2"):  # one slot each: the ring is full
            pbus.publish("g", data)
            pbus.flush()
            time.sleep(0.2)
        pbus.publish("g", b"3" * 3000)  # larger than the subscription's queue: dropped, counted
        pbus.flush()
        time.sleep(0.2)
        ring._stop = False  # it reads again
        ring.thread = threading.Thread(target=ring._run, daemon=True)
        ring.thread.start()
        time.sleep(0.3)  # the two slots are read and given back: the broker writes what it owes
        with contextlib.suppress(hostbus.HostbusError):
            pbus.publish("g", b"4")
            pbus.flush()
        alive(daemon)
        got = [m.data for m in drain(rsub, 0.5)]
        assert got == [b"1", b"2", b"4"] and rsub.missed == 1


def test_a_ring_subscription_that_overflows_under_disconnect_is_not_ended_silently(daemon: Daemon) -> None:
    with daemon.connect("ring") as bus, daemon.connect("pub") as pbus:
        bus.subscribe("d", via="shm", policy="disconnect", max_msgs=1, ring_slots=2, ring_slot_size=4096)
        ring = bus._deliver_ring
        assert ring is not None
        ring._stop = True  # the client stops reading its ring
        ring.thread.join(2)
        for i in range(50):
            pbus.publish("d", b"x" * 3000 + bytes([i]))
        pbus.flush()
        wait_for(lambda: pbus.stats()["rings"] == [], what="the overflowing ring ended by the broker")
        # The broker ended the ring: the client must be told (RING_ENDED, as for any ring it ends),
        # else its subscriptions wait forever on a ring nobody writes any more.
        wait_for(lambda: ring.closed is not None, timeout=3, what="RING_ENDED")


def test_a_subscription_on_an_ended_ring_is_refused_and_leaves_nothing_behind(daemon: Daemon) -> None:
    raw = RawClient(daemon.socket)
    ring = RawRing(raw, daemon.socket, "deliver", 2, 4096)
    (helper,) = helpers_of(daemon)
    os.kill(helper, signal.SIGKILL)  # as a client that truncates its semaphore makes it die (SIGBUS)
    with daemon.connect() as bus:
        wait_for(lambda: bus.stats()["rings"] == [], what="the ring ended")
        with contextlib.suppress(AssertionError):  # refused, as for a ring that does not exist
            sub(raw, 5, pattern="ghost", via="shm", ring=ring.id)
        raw.close()
        wait_for(lambda: bus.stats()["connections"] == 1, what="the raw connection gone")
        with pytest.raises(hostbus.NoRespondersError):  # nobody is subscribed any more
            bus.request("ghost", b"?", timeout=2)


# ---- 5. per-uid accounting -------------------------------------------------------------------------------


def test_ring_subscriptions_count_against_the_uids_subscription_limit(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"limits": {"max_subscriptions_per_uid": 2}})
    with d.connect() as bus:
        bus.subscribe("a")
        bus.subscribe("b")
        with pytest.raises(hostbus.LimitExceededError):
            bus.subscribe("c")  # the socket: refused
        with pytest.raises(hostbus.LimitExceededError):
            for pattern in ("c", "d", "e"):  # a ring: no limit at all
                bus.subscribe(pattern, via="shm", ring_slots=2, ring_slot_size=4096)


def test_a_stalled_ring_subscription_is_held_to_the_uids_queued_bytes_bound(
        start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"limits": {"max_queued_bytes_per_uid": 65536}})
    with d.connect("ring") as bus, d.connect("pub") as pbus:
        bus.subscribe("q", via="shm", policy="drop-new", ring_slots=2, ring_slot_size=4096)
        ring = bus._deliver_ring
        assert ring is not None
        ring._stop = True  # stalls: every further message waits in the broker
        ring.thread.join(2)
        for _ in range(200):
            pbus.publish("q", b"x" * 4000)
        pbus.flush()
        time.sleep(0.3)
        (deliver,) = pbus.stats()["rings"]
        # 800 kB for a uid allowed 64 KiB of queued messages: most must have been dropped
        assert deliver["dropped"] > 100, deliver


def test_new_access_rules_end_a_ring_subscription_they_no_longer_allow(start_daemon: Callable[..., Daemon]) -> None:
    me = f"uid:{os.getuid()}"
    config: dict[str, Any] = {"access": {"default": "allow"}, "acl": [{"topic": "secret.>", "subscribe": [me]}]}
    d = start_daemon(config)
    with d.connect("sub") as bus, d.connect("pub") as pbus:
        by_socket = bus.subscribe("secret.>")
        by_ring = bus.subscribe("secret.>", via="shm", ring_slots=4, ring_slot_size=4096)
        before = d.log().count('"event": "reloaded"')
        d.config_path.write_text(toml_dump({**config, "acl": [{"topic": "secret.>", "subscribe": []}]}))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: d.log().count('"event": "reloaded"') > before, what="the reload")
        with pytest.raises(hostbus.PermissionDeniedError):
            by_socket.next(timeout=5)  # ended by the new rules
        with pytest.raises(hostbus.PermissionDeniedError, match="ended by new access rules"):
            by_ring.next(timeout=5)  # ended the same way, told on the connection
        pbus.publish("secret.plans", b"nobody may read this now")
        pbus.flush()
        assert bus.stats()["subscriptions"] == 0


# ---- 6. what is left behind ------------------------------------------------------------------------------


def test_a_helper_that_dies_before_ring_ready_leaves_no_names_in_dev_shm(daemon: Daemon) -> None:
    with daemon.connect() as bus:
        res = bus.call("ring_attach", direction="publish", slots=2, slot_size=4096)  # offered: names exist
        names = ["sem." + res[k][1:] for k in ("free", "filled")]
        assert set(names) <= set(shm_names())
        (helper,) = helpers_of(daemon)
        os.kill(helper, signal.SIGKILL)  # OOM killer, or SIGBUS from a semaphore the client truncated
        try:
            wait_for(lambda: bus.stats()["rings"] == [], what="the ring ended")
            time.sleep(0.2)
            assert set(names) & set(shm_names()) == set()
        finally:
            for name in names:
                Path("/dev/shm", name).unlink(missing_ok=True)


@pytest.mark.needs_root
def test_links_another_uid_made_to_a_rings_semaphore_files_are_removed_with_the_ring(
        start_daemon: Callable[..., Daemon], workdir: Path) -> None:
    # The ACL gives the client read-write on the semaphore files, so it may hard-link them under
    # names of its own (docs/shm.md, "Links to the semaphore files"); the broker removes such
    # links when the ring ends: here one in /dev/shm and one in a directory of the client's.
    workdir.chmod(0o755)
    d = start_daemon({"socket": {"dir_mode": 0o755, "mode": 0o666}})
    d.workdir.chmod(0o755)
    uid, gid = ensure_user("hostbus-test")
    sock = str(d.socket)
    link = Path(f"/dev/shm/hostbus-review-{os.getpid()}")
    own_dir = Path(f"/dev/shm/hostbus-review-dir-{os.getpid()}")
    deep = own_dir / "kept"

    def client() -> None:
        with hostbus.connect(sock) as bus:
            res = bus.call("ring_attach", direction="publish", slots=2, slot_size=4096)
            os.link(f"/dev/shm/sem.{res['free'][1:]}", link)
            own_dir.mkdir(mode=0o700)
            os.link(f"/dev/shm/sem.{res['filled'][1:]}", deep)
            os.close(fetch_fd(sock, res["token"]))
            bus.call("ring_ready", ring=res["ring"])
            assert link.exists() and deep.exists()  # the ring's own names are gone, the links not
            bus.call("ring_close", ring=res["ring"])

    try:
        assert run_as(uid, gid, client) == 0
        with d.connect() as bus:
            wait_for(lambda: bus.stats()["rings"] == [], what="the ring gone")
        assert not link.exists() and not deep.exists()
        assert own_dir.exists()  # the client's own directory is the client's business
        events = [json.loads(x) for x in d.log().splitlines() if '"ring_semaphore_linked"' in x]
        assert [(e["removed"], e["left"], e["uid"]) for e in events] == [(2, 0, uid)], events
    finally:
        link.unlink(missing_ok=True)
        deep.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            own_dir.rmdir()


def test_a_ring_that_cannot_be_started_leaks_no_descriptor(daemon: Daemon) -> None:
    with daemon.connect() as bus:
        bus.stats()
        before = open_fds(daemon.pid)
        soft, hard = resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE)
        used = sorted(int(n) for n in os.listdir(f"/proc/{daemon.pid}/fd"))
        free = [n for n in range(used[-1] + 4) if n not in used]
        # Room for two more descriptors: the memfd and its mapping's are made, the helper's pipes not.
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (free[2], hard))
        try:
            with pytest.raises(hostbus.HostbusError, match="cannot create the ring"):
                bus.call("ring_attach", direction="publish", slots=2, slot_size=4096)
        finally:
            resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert open_fds(daemon.pid) == before


def test_helper_processes_are_bounded_like_the_rings_they_serve(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"limits": {"max_rings_per_uid": 2}})
    raw = RawClient(d.socket)
    first = call(raw, "ring_attach", direction="publish", slots=2, slot_size=4096)["ring"]
    call(raw, "ring_close", ring=first)
    frames = b""
    for ring_id in range(first + 1, first + 31):  # ids are given in order: attach, and close at once
        frames += wire.encode_call(next(_ids), "ring_attach", {"direction": "publish", "slots": 2, "slot_size": 4096})
        frames += wire.encode_call(next(_ids), "ring_close", {"ring": ring_id})
    raw.send(frames)
    peak = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        peak = max(peak, len(helpers_of(d)))
        time.sleep(0.01)
    assert peak <= 2  # the uid may hold 2 rings; each started helper is a Python process


# ---- 7. messages larger than a frame ---------------------------------------------------------------------


def test_a_ring_message_reaches_socket_subscribers_only_within_the_frame_limit(
        start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"limits": {"max_frame_bytes": 65536}})  # shm.max_message_bytes stays 8 MiB
    raw = RawClient(d.socket)  # the protocol: a client must accept frames of max_frame_bytes + 12
    sub(raw, 1, pattern="big")
    with d.connect() as bus, bus.shm_publisher(slots=4, slot_size=4096) as pub:
        with pytest.raises(hostbus.MessageTooLargeError):
            pub.publish("big", b"x" * 200_000)
        pub.publish("big", b"x" * 60_000)
        pub.flush(timeout=5)
    frame = raw.read_until(wire.FrameType.MSG, timeout=2)
    size = len(frame.body) if frame is not None else 0
    assert 60_000 < size <= 65536 + 12, f"a MSG frame of {size} bytes"


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of the processes whose parent is ``pid``: state Z is a zombie."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append((int(p), fields[0]))
    return out


def test_a_closed_rings_helper_is_reaped(daemon: Daemon) -> None:
    with daemon.connect() as bus:
        bus.shm_publisher(slots=2, slot_size=4096).close()
        time.sleep(1.0)  # the helper has long exited
        assert children(daemon.pid) == []


def test_messages_delivered_through_a_ring_are_counted_in_the_brokers_totals(daemon: Daemon) -> None:
    with daemon.connect() as bus, daemon.connect() as pbus:
        rsub = bus.subscribe("n", via="shm", ring_slots=4, ring_slot_size=4096)
        before = pbus.stats()["messages"]["out"]
        for _ in range(10):
            pbus.publish("n", b"x")
        pbus.flush()
        assert len(drain(rsub, 0.5)) == 10
        assert pbus.stats()["messages"]["out"] - before == 10


async def _stalled_aio_ring_reader(sock: str) -> int:
    import asyncio

    from hostbus import aio

    async with await aio.connect(sock) as bus:
        await bus.subscribe("flood", via="shm", pending_limit=10, policy="drop-new", max_msgs=10,
                            ring_slots=4, ring_slot_size=4096)
        loop = asyncio.get_running_loop()

        def publish() -> None:
            with hostbus.connect(sock) as pbus:
                for i in range(3000):  # at a rate the ring's reader thread keeps up with
                    pbus.publish("flood", b"x" * 1000)
                    if i % 10 == 9:
                        pbus.flush(timeout=30)
                        time.sleep(0.002)

        t = threading.Thread(target=publish)
        t.start()
        t.join(30)  # the application's loop is busy meanwhile (blocked here)
        waiting = len(loop._ready)  # type: ignore[attr-defined]  # callbacks handed in from the ring's thread
        return waiting


def test_a_busy_asyncio_client_does_not_take_in_an_unbounded_backlog_from_its_ring(daemon: Daemon) -> None:
    import asyncio

    waiting = asyncio.run(_stalled_aio_ring_reader(str(daemon.socket)))
    # 3 MB were published; the subscription keeps 10 and the broker's queue 10 more. What the
    # ring's reader thread takes while the loop is busy must be bounded too (it waits, the broker
    # applies the policy): not one callback per slot for everything published.
    assert waiting < 100, f"{waiting} push callbacks queued on the loop"


async def _cancelled_publish(daemon: Daemon) -> None:
    import asyncio

    from hostbus import aio

    async with await aio.connect(str(daemon.socket)) as bus:
        pub = await bus.shm_publisher(slots=2, slot_size=4096)
        with stopped(daemon):  # nothing is given back meanwhile: the third message waits for a slot
            await pub.publish("c", b"1" * 3000)
            await pub.publish("c", b"2" * 3000)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(pub.publish("c", b"3" * 3000), 0.3)  # the caller gives up on it
        await asyncio.sleep(0.5)
        bus._rings.remove(pub)  # (closing the bus would wait for the same flush for 10 s)
        await pub.flush(timeout=2)  # every slot comes back once the broker has routed them


def test_a_cancelled_asyncio_publish_does_not_keep_a_slot_of_the_ring(daemon: Daemon) -> None:
    import asyncio

    asyncio.run(_cancelled_publish(daemon))
