"""Review of the performance commits (fast confirmed path, confirmed batches, sends from the
calling thread, frozen GC): each test pins one bug against a real daemon."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from typing import Any

import hostbus
from hostbus import wire
from tests.conftest import Daemon
from tests.helpers.raw import RawClient


class _AckDuringSend:
    """A socket whose sendall, once armed, runs ``during`` right after the bytes went out, while
    the Bus still counts the send as in progress (``_sending``): what another thread does when it
    acknowledges a message while this one sends a request, a reply or a flush."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.during: Any = None

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)
        during, self.during = self.during, None
        if during is not None:
            during()
            time.sleep(0.05)  # the send goes on a while (a large reply): the writer thread looks meanwhile

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_ack_given_while_a_caller_thread_sends_is_stranded(daemon: Daemon) -> None:
    """An ack given while a request/reply/flush is written from the calling thread (_send_now)
    stays in ``pending_acks``: _answer notifies the writer, which sees ``_sending`` and waits
    again, and _send_now's end notifies only when ``_wbuf`` holds something. The ack is written
    with whatever frame comes next; until then the broker redelivers after ack_wait."""
    with daemon.connect() as admin:
        admin.queue_add("orders", "orders.>", storage="memory")
        admin.publish("orders.a", b"one", confirm=True)
    bus = daemon.connect()
    try:
        c = bus.consume("orders", "w", ack_wait=1.0, max_deliver=0)
        msg = c.next(timeout=5)
        assert msg.delivery_count == 1
        proxy = _AckDuringSend(bus._sock)
        bus._sock = proxy  # type: ignore[assignment]  # the writer thread keeps the real socket
        proxy.during = msg.ack  # another thread's ack, while this thread's PING is being sent
        bus.flush()
        # Nothing else is written now: the ack should have reached the broker all the same.
        again = None
        with contextlib.suppress(hostbus.TimeoutError):
            again = c.next(timeout=2.5)
        stuck = list(bus._core.pending_acks)
        assert again is None and not stuck, (
            f"the ack never left the client (pending_acks={stuck}); seq {msg.seq} was delivered again "
            f"(delivery {again.delivery_count if again else None})")
    finally:
        bus.close()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_connections_closed_mid_frame_keep_their_buffers_until_a_rare_gc(daemon: Daemon) -> None:
    """A closed connection is a reference cycle (Session.on_fail -> PeerCore._failed -> PeerCore
    -> Session; Session.egress -> UnixPeer -> PeerCore) that holds its decoder's buffer: a
    frame that was coming when the peer went away (a publisher killed while writing a large
    message). Only the cyclic collector frees it, and with gc.set_threshold(100_000, ...) after
    gc.freeze() it runs only once 100,000 net new containers exist: with little traffic that
    is never, so every such connection leaves its partial frame in the daemon."""
    body = 4 * 1024 * 1024
    head = wire.frames.MSG_BLOCK.pack(len(b"big.topic"), 0, 0) + b"big.topic"
    partial = wire.frames.HEADER.pack(2 + len(head) + body, int(wire.FrameType.PUB), 0) + head + \
        b"x" * (2 * 1024 * 1024)
    warm = RawClient(daemon.socket)  # what a first connection and a first large read allocate anyway
    warm.send(partial)
    time.sleep(0.3)
    warm.close()
    time.sleep(0.5)
    before = _rss_kb(daemon.pid)
    n = 60
    for _ in range(n):
        raw = RawClient(daemon.socket)
        raw.send(partial)  # 2 MiB of a 4 MiB PUB, then the publisher is gone
        time.sleep(0.05)
        raw.close()
    time.sleep(1.0)  # every connection is closed on the daemon's side
    grown_mib = (_rss_kb(daemon.pid) - before) / 1024
    assert grown_mib < 50, (f"{n} connections closed in the middle of a 4 MiB frame left the daemon "
                            f"{grown_mib:.0f} MiB larger (their decoder buffers wait for the cyclic GC)")


def test_confirmed_batches_past_the_u32_id_space_fail_with_struct_error(daemon: Daemon) -> None:
    """Ids (sids, call ids, pub ids) come from an unbounded itertools.count and go on the wire as
    u32. A confirmed batch takes one id per message, so a publisher at the measured ~238k msg/s
    uses up the id space in about five hours; from then on every batch raises struct.error (not
    a HostbusError), after having moved the counter on. Ids should wrap to 1 (skipping ids
    still waiting)."""
    with daemon.connect() as admin:
        admin.queue_add("orders", "orders.>", storage="memory")
    with daemon.connect() as bus:
        bus._core._next_id = (1 << 32) - 3  # where 4,294,967,292 earlier ids leave it
        try:
            got = bus.publish_batch([("orders.a", b"x")] * 5)
        except struct.error as exc:
            raise AssertionError(f"a confirmed batch past id 2**32 - 1 fails: struct.error: {exc}") from None
        assert [r["orders"] for r in got] == [1, 2, 3, 4, 5]
        assert bus._core._next_id == 6  # the run did not cross the end: it began again at 1
        sub = bus.subscribe("x")  # and the ids go on from there, past any still in use
        assert sub.sid == 6
