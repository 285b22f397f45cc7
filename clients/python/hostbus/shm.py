"""Shared-memory rings, the client's side: ``bus.shm_publisher()`` and ``subscribe(..., via="shm")``.

A ring is asked for on the bus's connection; its segment comes as a file descriptor over a
second, short connection (nothing of it has a name), its two semaphores are opened by the names
the broker gave, which it removes as soon as both sides hold them. See docs/shm.md.

Needs the ``posix_ipc`` package (installed with hostbus); the rest of the library does not.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from hostbus import ring as layout
from hostbus import topics, wire
from hostbus._heap import LARGE as _LARGE
from hostbus._heap import large_message
from hostbus.errors import (
    ConnectionLostError,
    MessageTooLargeError,
    RemoteProtocolError,
    RingClosedError,
    error_from_code,
)
from hostbus.errors import TimeoutError as HostbusTimeoutError
from hostbus.message import Entry, Message, Sender

if TYPE_CHECKING:
    from hostbus.client import Bus

#: Seconds between two checks of the connection while waiting on a full (or empty) ring: a
#: broker that died is noticed within this time (plus the connection's own detection).
POLL_INTERVAL = 0.1


def _posix_ipc() -> Any:
    try:
        import posix_ipc  # noqa: PLC0415 - only rings need it
    except ImportError:  # pragma: no cover - a dependency of the package
        raise RingClosedError("shared-memory rings need the posix_ipc package (pip install posix_ipc)") from None
    return posix_ipc


def fetch_fd(path: str, token: str, timeout: float = 10.0) -> int:
    """The ring segment's descriptor, sent by the broker on a connection of its own."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            s.sendall(wire.encode_json(wire.FrameType.HELLO, {"protocol": wire.PROTOCOL_VERSION, "ring_fd": token}))
            data, fds, _, _ = socket.recv_fds(s, 65536, 1)
        except OSError as exc:
            raise ConnectionLostError(f"cannot fetch the ring's memory from {path}: {exc}") from None
        if fds:
            for extra in fds[1:]:
                os.close(extra)
            return fds[0]
        dec = wire.Decoder(wire.SERVER_FRAMES, 1 << 16)
        dec.feed(data)
        for ftype, _, body in dec.frames():
            if ftype == wire.FrameType.ERR:
                code, _, message = wire.decode_err(body)
                raise error_from_code(code, message)
        raise RingClosedError("the broker closed the connection without sending the ring's memory")


_MSG_BLOCK = wire.frames.MSG_BLOCK
#: A publish record's fixed part and the message block's, packed at once.
_RECORD_HEAD = struct.Struct("<IBHHI")
_U32 = struct.Struct("<I")
_pack_u32_into = _U32.pack_into
_RUN_MAX_ITEMS = wire.frames.RUN_MAX_ITEMS
_RUN_ITEM_MAX = 16 * 1024  # larger payloads go as records of their own


class _Ring:
    """What both kinds of ring share: the mapping, the semaphores, waiting while watching the
    connection (``check`` raises once it is lost), closing."""

    def __init__(self, res: dict[str, Any], fd: int, check: Callable[[], None]) -> None:
        ipc = _posix_ipc()
        self._busy = ipc.BusyError
        self.check = check
        self.id = int(res["ring"])
        self.slots = int(res["slots"])
        self.slot_size = int(res["slot_size"])
        self.max_message_bytes = int(res["max_message_bytes"])
        self.closed: BaseException | None = None
        try:
            self.mm = mmap.mmap(fd, self.slots * self.slot_size)
        finally:
            os.close(fd)
        self.free = ipc.Semaphore(res["free"])
        self.filled = ipc.Semaphore(res["filled"])
        self.next = 0

    def closed_error(self) -> RingClosedError:
        """The error to raise for a closed ring: the broker's own (saying why), else a new one."""
        if isinstance(self.closed, RingClosedError):
            return self.closed
        return RingClosedError(f"ring {self.id} is closed: {self.closed}")

    def register(self, core: Any) -> None:
        """Let the connection mark this ring closed when the broker ends it (RING_ENDED)."""
        core.rings[self.id] = self

    def _wait(self, sem: Any, closing: Callable[[], bool] | None = None) -> bool:
        """Take one post of ``sem``; False if ``closing()`` became true meanwhile. Raises if the
        ring or the connection ended."""
        while True:
            if self.closed is not None:
                raise self.closed_error()
            try:
                sem.acquire(POLL_INTERVAL)
                return True
            except self._busy:
                self.check()  # ConnectionLostError once the broker is gone
                if closing is not None and closing():
                    return False

    def _release_local(self) -> None:
        for sem in (self.free, self.filled):
            with contextlib.suppress(Exception):  # closing twice, or after the broker removed it
                sem.close()
        with contextlib.suppress(BufferError):  # a memoryview still refers to it: it goes with the last one
            self.mm.close()


def attach(bus: Bus, direction: str, slots: int, slot_size: int) -> tuple[dict[str, Any], int]:
    """Ask ``bus``'s broker for a ring; its answer and the segment's descriptor."""
    res = bus.call("ring_attach", direction=direction, slots=slots, slot_size=slot_size)
    return res, fetch_fd(bus.path, str(res["token"]))


class RingWriter(_Ring):
    """The producer side of a publish ring (no I/O on the connection): records into slots."""

    def __init__(self, res: dict[str, Any], fd: int, check: Callable[[], None]) -> None:
        super().__init__(res, fd, check)
        self.writer = layout.SlotWriter(self.mm, self.slots, self.slot_size)
        self._topics: dict[str, bytes] = {}
        # The run record open in the current slot (-1: none), its topic (as sent and as given) and headers.
        self.run_at = -1
        self.run_topic = b""
        self.run_topic_str: str | None = None
        self.opening_topic = ""
        self.run_headers = b""
        self.run_item_max = 0  # the largest payload that may join it
        self.run_end = 0  # where it must end: its slot's end, or the ring's message limit
        self.run_items = 0

    @property
    def written(self) -> int:
        """Slots written and handed over so far."""
        return self.writer.next

    def record(self, topic: str, data: bytes | bytearray | memoryview | str, headers: dict[str, str] | None,
               retain: bool) -> tuple[bytes, bytes | bytearray | memoryview]:
        """A publish record as (head, payload), checked: MessageTooLargeError before anything is
        written. The payload is written into the slot from where it is. A plain message that
        fits a slot opens a run record, which the next ones on its topic may join (:meth:`join`)."""
        if self.closed is not None:
            raise self.closed_error()
        if isinstance(data, str):
            data = data.encode()
        tb = self._topics.get(topic)
        if tb is None:  # checked once per topic (a bounded cache)
            topics.check_topic(topic)
            if len(self._topics) >= 4096:
                self._topics.clear()
            tb = self._topics[topic] = topic.encode()
        hb = wire.encode_headers(headers) if headers else b""
        size = 8 + len(tb) + len(hb) + len(data)
        if size > self.max_message_bytes:
            raise MessageTooLargeError(f"message of {size} bytes exceeds the ring's limit of "
                                       f"{self.max_message_bytes} (shm.max_message_bytes); nothing was written")
        self._seal_run()  # whatever this record is, no later message may join an earlier run
        if not retain and len(data) <= _RUN_ITEM_MAX and size + 9 <= self.writer.cap \
                and size + 4 <= self.max_message_bytes:  # a run record's block is 4 bytes longer
            self.run_topic = tb
            self.opening_topic = topic
            self.run_headers = hb
            self.run_item_max = min(_RUN_ITEM_MAX, self.max_message_bytes - (size - len(data)))
            return _RECORD_HEAD.pack(size + 4, layout.RUN_FLAG, len(tb), 0, len(hb)) + tb + hb + _U32.pack(
                len(data)), data
        return _RECORD_HEAD.pack(size, wire.PUB_RETAIN if retain else 0, len(tb), 0, len(hb)) + tb + hb, data

    def join(self, topic: str, data: bytes | bytearray | memoryview | str, headers: dict[str, str] | None) -> bool:
        """Add a plain message to the run record open in the current slot if it is on the same
        topic with the same headers and fits; False (nothing written) if not. The run's length
        in its head is written once, when it closes (:meth:`_seal_run`)."""
        if self.run_at < 0 or self.closed is not None:  # an open run is always in the open slot
            return False
        if topic is not self.run_topic_str and self._topics.get(topic) is not self.run_topic:
            return False
        if (wire.encode_headers(headers) if headers else b"") != self.run_headers:
            return False
        if type(data) is not bytes:
            data = data.encode() if isinstance(data, str) else bytes(data)
        n = len(data)
        w = self.writer
        pos = w.pos
        end = pos + 4 + n
        if n > self.run_item_max or end > self.run_end or self.run_items >= _RUN_MAX_ITEMS:
            return False
        mm = w.mm
        _pack_u32_into(mm, pos, n)
        mm[pos + 4:end] = data
        w.pos = end
        self.run_items += 1
        return True

    def _seal_run(self) -> None:
        """Close the open run record: its head gets its block's length (the slot's end is
        written by SlotWriter.finish). Called before anything else is written or handed over."""
        if self.run_at >= 0:
            _pack_u32_into(self.writer.mm, self.run_at, self.writer.pos - self.run_at - _RECORD_HEAD.size + 8)
            self.run_at = -1
            self.run_topic_str = None

    def slots_to_take(self, record: tuple[bytes, Any]) -> int:
        """Before writing ``record``: hand over the open slot if the record does not fit in it;
        how many free slots to take (0, 1, or the pieces of a record larger than a slot)."""
        w = self.writer
        n = len(record[0]) + len(record[1])
        if w.fits(n):
            return 0
        if w.finish():
            self.filled.release()
        if n <= w.cap:
            return 1
        w.start_span(record)
        return -(-(n + layout.TOTAL.size) // w.cap)

    def steps(self, record: tuple[bytes, Any]) -> Iterator[None]:
        """Write ``record``, yielding once before each free slot it needs: the caller takes one
        (waiting as its client waits) each time, and the record is written as slots come."""
        need = self.slots_to_take(record)
        if self.writer.span is None:
            for _ in range(need):
                yield
            self.write(record, need)
        else:
            for _ in range(need):  # a record larger than a slot: one piece per free slot
                yield
                self.write(record, 1)

    def write(self, record: tuple[bytes, Any], taken: int) -> None:
        """Write ``record`` once :meth:`slots_to_take` free slots are in hand (a large record's
        pieces may be written one taken slot at a time: call with ``taken=1`` per slot)."""
        w = self.writer
        if w.span is not None:
            for _ in range(w.write_span(taken)):
                self.filled.release()
        else:
            w.add(record)
            if record[0][4] == layout.RUN_FLAG:  # a run record opened: later messages may join it
                self.run_at = w.pos - len(record[0]) - len(record[1])
                self.run_topic_str = self.opening_topic
                self.run_items = 1
                # The run ends with its slot, and its block stays within the ring's message limit.
                self.run_end = min(w.start + layout.SLOT_HEAD.size + w.cap,
                                   self.run_at + layout.PUB_RECORD.size + self.max_message_bytes)

    def take(self) -> None:
        """Take a free slot, waiting (ConnectionLostError if the broker goes meanwhile)."""
        self._wait(self.free)

    def try_take(self) -> bool:
        try:
            self.free.acquire(0)
        except self._busy:
            return False
        return True

    def hand_over(self) -> None:
        """Post the open slot, full or not."""
        self._seal_run()
        if self.writer.finish():
            self.filled.release()

    def routed(self, deadline: float | None) -> bool:
        """True once every slot is back (the broker has routed all that was posted); raises if
        the ring or the connection ended, or ``deadline`` (time.monotonic) passed first."""
        if self.free.value >= self.slots:
            return True
        self.check()
        if self.closed is not None:
            raise self.closed_error()
        if deadline is not None and time.monotonic() > deadline:
            raise HostbusTimeoutError(f"flush of ring {self.id}: what was posted was not routed in time")
        return False


class ShmPublisher:
    """Publishes through a ring: ``publish`` packs messages into the current slot, a full slot
    is handed to the broker (one semaphore post for many messages), ``flush`` hands over the
    last one. A message larger than a slot spans several. Not thread-safe: one per thread."""

    def __init__(self, bus: Bus, slots: int, slot_size: int) -> None:
        self.bus = bus
        res, fd = attach(bus, "publish", slots, slot_size)
        self.ring = RingWriter(res, fd, bus._core.check)
        self.ring.register(bus._core)
        bus.call("ring_ready", ring=self.ring.id)  # the broker removes the names now
        self.id = self.ring.id

    @property
    def next(self) -> int:
        """Slots written and handed to the broker so far."""
        return self.ring.written

    @property
    def closed(self) -> BaseException | None:
        return self.ring.closed

    def publish(self, topic: str, data: bytes | bytearray | memoryview | str = b"",
                headers: dict[str, str] | None = None, retain: bool = False) -> None:
        """Put one message in the ring (returns once it is in shared memory, maybe not yet posted)."""
        ring = self.ring
        # RingWriter.join, inlined for the common case: a plain message without headers that
        # joins the open run.
        if topic is ring.run_topic_str and headers is None and type(data) is bytes and not retain \
                and not ring.run_headers and ring.closed is None:
            w = ring.writer
            pos = w.pos
            n = len(data)
            end = pos + 4 + n
            if n <= ring.run_item_max and end <= ring.run_end and ring.run_items < _RUN_MAX_ITEMS:
                mm = w.mm
                _pack_u32_into(mm, pos, n)
                mm[pos + 4:end] = data
                w.pos = end
                ring.run_items += 1
                return
        if not retain and ring.join(topic, data, headers):
            return
        for _ in ring.steps(ring.record(topic, data, headers, retain)):
            ring.take()

    def flush(self, timeout: float | None = 10.0) -> None:
        """Hand the current slot to the broker, wait until it has routed every slot, and raise
        an error it reported about them (like :meth:`Bus.flush`)."""
        ring = self.ring
        ring.hand_over()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ring.routed(deadline):  # the broker gives every slot back once it routed it
            time.sleep(0.0005)
        self.bus.flush(timeout)

    def close(self) -> None:
        """Flush, then give the ring back (idempotent)."""
        ring = self.ring
        if ring.closed is not None:
            return
        try:
            if self.bus._core.lost is None:
                self.flush()
                self.bus.call("ring_close", ring=ring.id)
        finally:
            ring.closed = RingClosedError(f"ring {ring.id} was closed")
            ring._release_local()

    def __enter__(self) -> ShmPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DeliverRing(_Ring):
    """The ring a bus's ``via="shm"`` subscriptions receive through, read by a thread of its own.

    ``sinks`` maps a subscription id to its subscription; ``push(sink, messages)`` and
    ``end(sink, error)`` hand them over (the asyncio client passes them through its loop).
    """

    def __init__(self, res: dict[str, Any], fd: int, check: Callable[[], None], sinks: dict[int, Any],
                 push: Callable[[Any, list[Entry]], object], end: Callable[[Any, BaseException], object],
                 gap: Callable[[Any, int], object], respond: Callable[..., Any] | None = None) -> None:
        super().__init__(res, fd, check)
        self.respond = respond
        self.sinks = sinks
        self.push = push
        self.end = end
        self.gap = gap
        self.sids: set[int] = set()
        self._topics: dict[bytes, str] = {}
        self._senders: dict[tuple[int, int, int, bytes], Sender] = {}
        self._reader = layout.SlotReader(self.slot_size, self.max_message_bytes + 64)
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="hostbus-ring-reader", daemon=True)

    def _run(self) -> None:
        try:
            while self._wait(self.filled, lambda: self._stop):
                off = (self.next % self.slots) * self.slot_size
                self.next += 1
                batches: dict[int, list[Entry]] = {}
                for rec, start, end in self._records(off):  # read before the slot is given back
                    self._message(rec, start, end, batches)
                self.free.release()
                for sid, msgs in batches.items():
                    sink = self.sinks.get(sid)
                    if sink is not None:
                        self.push(sink, msgs)
        except Exception as exc:
            self.closed = exc
            error = exc if isinstance(exc, ConnectionLostError) else RingClosedError(f"ring {self.id} ended: {exc}")
            for sid in list(self.sids):
                sink = self.sinks.pop(sid, None)
                if sink is not None:
                    self.end(sink, error)

    def _records(self, off: int) -> Iterator[tuple[Any, int, int]]:
        """(buffer, start, end) of each record the slot at ``off`` completes: a batch slot is
        read in place (each message's bytes are copied out once), pieces of a larger message
        are gathered by the SlotReader."""
        mm = self.mm
        head = layout.SLOT_HEAD
        kind, _, count, used = head.unpack_from(mm, off)
        if used > self.slot_size - head.size:
            raise layout.RingFormatError(f"slot declares {used} bytes, more than it holds")
        if kind != layout.BATCH or self._reader.part is not None:
            for rec in self._reader.feed(mm[off:off + head.size + used], layout.DELIVER_RECORD):
                yield rec, 0, len(rec)
            return
        pos = off + head.size
        end = pos + used
        fixed = layout.DELIVER_RECORD
        for _ in range(count):
            if pos + fixed.size > end:
                raise layout.RingFormatError("record head past the end of the slot")
            blen, *_, olen = fixed.unpack_from(mm, pos)
            rec_end = pos + fixed.size + olen + blen
            if rec_end > end:
                raise layout.RingFormatError("record past the end of the slot")
            yield mm, pos, rec_end
            pos = rec_end

    def _message(self, buf: Any, start: int, end: int, batches: dict[int, list[Entry]]) -> None:
        fixed = layout.DELIVER_RECORD
        _, flags, sid, uid, gid, pid, olen = fixed.unpack_from(buf, start)
        if flags & layout.GAP_FLAG:
            sink = self.sinks.get(sid)
            if sink is not None:
                earlier = batches.pop(sid, None)
                if earlier:  # the messages before the gap go first, in order
                    self.push(sink, earlier)
                self.gap(sink, uid)
            return
        if end - start >= _LARGE:
            large_message()
        o0 = start + fixed.size
        b0 = o0 + olen
        tlen, rlen, hlen = _MSG_BLOCK.unpack_from(buf, b0)
        t0 = b0 + 8
        r0 = t0 + tlen
        h0 = r0 + rlen
        h1 = h0 + hlen
        if h1 > end:
            raise layout.RingFormatError("message block longer than its record")
        if flags & layout.RUN_FLAG and rlen:
            raise layout.RingFormatError("a run record with a reply subject")
        raw_topic = buf[t0:r0]
        topics_seen = self._topics
        topic = topics_seen.get(raw_topic)
        if topic is None:  # the broker checked it; remember its text (bounded)
            if len(topics_seen) >= 65536:
                topics_seen.clear()
            topic = topics_seen[raw_topic] = raw_topic.decode()
        key = (uid, gid, pid, buf[o0:b0] if olen else b"")
        sender = self._senders.get(key)
        if sender is None:
            if len(self._senders) >= 4096:
                self._senders.clear()
            sender = self._senders[key] = Sender(uid, gid, pid, key[3].decode(errors="replace"))
        batch = batches.get(sid)
        if batch is None:
            batch = batches[sid] = []
        if flags & layout.RUN_FLAG:  # a run: u32 length + payload, up to the end of the record
            try:
                payloads = wire.run_payloads(buf, h1, end)
            except RemoteProtocolError as exc:
                raise layout.RingFormatError(f"a run record: {exc}") from None
            batch.append((payloads, topic, wire.decode_headers(buf[h0:h1]) if hlen else None, sender, sid,
                          self.respond))
            return
        batch.append(Message(topic, buf[h1:end], wire.decode_headers(buf[h0:h1]) if hlen else {}, sender,
                             buf[r0:h0].decode(errors="replace") if rlen else None, sid,
                             bool(flags & wire.MSG_RETAINED), self.respond))

    def close(self) -> None:
        self._stop = True
        if self.thread is not threading.current_thread():
            self.thread.join(2 * POLL_INTERVAL + 1)
        if self.closed is None:
            self.closed = RingClosedError(f"ring {self.id} was closed")
        self._release_local()


__all__ = ["DeliverRing", "RingWriter", "ShmPublisher", "attach", "fetch_fd"]
