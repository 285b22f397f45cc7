"""The asyncio client: ``bus = await hostbus.aio.connect()``, the same names as the sync client.

Works on plain asyncio and on uvloop. ``publish`` appends to an output list and the frames are
written once at the end of the loop iteration, so a burst of publishes is one write. While the
transport asks to pause, ``publish`` waits (backpressure reaches the caller instead of memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from hostbus import paths, wire
from hostbus._core import ClientCore, SubscriptionState, as_hostbus_error
from hostbus.client import DEFAULT_CONTROL_TIMEOUT, DEFAULT_PENDING_LIMIT
from hostbus.errors import ClosedError, ConnectionLostError, HostbusError, RingClosedError
from hostbus.errors import TimeoutError as HostbusTimeoutError
from hostbus.message import Entry, Message
from hostbus.shm import DeliverRing, RingWriter, fetch_fd

__all__ = ["Bus", "Consumption", "ShmPublisher", "Subscription", "connect"]

#: Batches of messages a deliver ring's reader may hand to the event loop before it waits.
_RING_BATCHES = 64
#: Bytes of frames gathered by publish() before they are handed to the transport at once.
_WRITE_BATCH = 256 * 1024


async def _wait(fut: asyncio.Future[Any], timeout: float | None, what: str) -> Any:
    try:
        return await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        raise HostbusTimeoutError(f"{what}: no answer within {timeout} s") from None


class Subscription(SubscriptionState):
    """Messages matching ``pattern``: ``async for msg in sub`` or ``await sub.next()``."""

    __slots__ = ("_waiters", "bus")

    def __init__(self, bus: Bus, sid: int, pattern: str, group: str | None, pending_limit: int) -> None:
        super().__init__(sid, pattern, group, pending_limit)
        self.bus = bus
        self._waiters: list[asyncio.Future[None]] = []  # tasks blocked in next()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:  # each re-checks the queue; those that find it empty wait again
            if not w.done():
                w.set_result(None)

    def push_many(self, entries: list[Entry]) -> None:
        self._admit(entries)
        self._wake()

    def gap(self, missed: int) -> None:
        self.missed += missed

    def end(self, exc: HostbusError) -> None:
        self._ended = exc
        self._wake()

    async def next(self, timeout: float | None = None) -> Message:
        loop = self.bus._loop
        deadline = None if timeout is None else loop.time() + timeout
        while (msg := self._take_queued()) is None:
            if self._ended is not None:
                raise self._ended
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, None if deadline is None else max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise HostbusTimeoutError(f"no message on {self.pattern!r} within {timeout} s") from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return msg

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.next()
        except ClosedError:
            raise StopAsyncIteration from None

    async def unsubscribe(self) -> None:
        if self._ended is None:
            self.bus._unsubscribe(self)
            self.end(ClosedError(f"subscription to {self.pattern!r} was unsubscribed"))


class _Protocol(asyncio.Protocol):
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def data_received(self, data: bytes) -> None:
        try:
            self.bus._core.receive(data)
        except HostbusError as exc:
            self.bus._core.connection_lost(exc)
            if self.bus._transport is not None:
                self.bus._transport.abort()

    def pause_writing(self) -> None:
        self.bus._paused = True

    def resume_writing(self) -> None:
        self.bus._paused = False
        for w in self.bus._drain_waiters:
            if not w.done():
                w.set_result(None)
        self.bus._drain_waiters.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        bus = self.bus
        lost = ClosedError("the connection was closed") if bus._closing else (
            as_hostbus_error(exc) if exc else ConnectionLostError("the broker closed the connection"))
        bus._core.connection_lost(lost)
        for w in bus._drain_waiters:
            if not w.done():
                w.set_exception(lost)
        bus._drain_waiters.clear()
        bus._closed.set()


class Consumption(Subscription):
    """See :class:`hostbus.Consumption`: ``async for msg in c`` or ``await c.next()``; the
    answers ``msg.ack()`` ... are plain calls (they are written with the next batch)."""

    __slots__ = ("consumer", "queue")

    def __init__(self, bus: Bus, sid: int, queue: str, consumer: str, pending_limit: int) -> None:
        super().__init__(bus, sid, f"{queue}/{consumer}", None, pending_limit)
        self.queue = queue
        self.consumer = consumer


class Bus:
    """An asyncio connection to hostbusd. Use ``async with`` or ``await bus.close()``."""

    def __init__(self, name: str | None, error_cb: Callable[[HostbusError], None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._core = ClientCore(name, self._respond)
        self._core.on_error = error_cb
        self._core.answer = self._answer
        self._transport: asyncio.Transport | None = None
        self._out = bytearray()  # frames for the next write, a run (PUBN) possibly open at its end
        self._run = self._core.run
        self._flush_scheduled = False
        self._paused = False
        self._closing = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed = asyncio.Event()
        self.welcome: dict[str, Any] = {}
        self.path = ""  # the socket's path: rings fetch their memory through it
        self._deliver_ring: DeliverRing | None = None
        self._ring_sids: set[int] = set()
        self._rings: list[ShmPublisher | DeliverRing] = []

    async def _start(self, path: Path, timeout: float) -> None:
        loop = self._loop
        self.path = str(path)
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_unix_connection(lambda: _Protocol(self), str(path)), timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectionLostError(f"cannot connect to hostbusd at {path}: {exc}",
                                      hint="is hostbusd running? set HOSTBUS_SOCKET or pass socket=") from None
        self._transport = transport
        fut: asyncio.Future[Any] = loop.create_future()
        self._core.welcome_waiter = fut
        self._send(self._core.hello())
        try:
            self.welcome = await _wait(fut, timeout, "handshake")
        except BaseException:
            await self.close()
            raise

    @property
    def client_id(self) -> int:
        return int(self.welcome["client_id"])

    @property
    def identity(self) -> dict[str, Any]:
        return dict(self.welcome["identity"])

    # ---- output --------------------------------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        if self._transport is None or self._closing:
            raise self._core.lost or ClosedError("the connection is closed")
        if self._core.pending_acks:  # answers given before this frame go before it
            self._out += self._core.take_acks()
        self._out += frame
        self._run.at = -1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._write)

    def _write(self) -> None:
        self._flush_scheduled = False
        if self._core.pending_acks:
            self._out += self._core.take_acks()
        out, self._out = self._out, bytearray()
        self._run.at = -1
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(out)

    async def publish(self, topic: str, data: bytes | str = b"", headers: dict[str, str] | None = None,
                      retain: bool = False, reply_to: str | None = None, confirm: bool = False,
                      timeout: float | None = DEFAULT_CONTROL_TIMEOUT) -> dict[str, int] | None:
        """Queue one message; waits only while the connection is congested.

        Frames are written at the end of the loop iteration, or at once when a write batch has
        gathered, so a loop that never yields still hands the transport its data and sees its
        backpressure. Errors the broker reports later about a published message go to
        ``error_cb``, else :meth:`flush` raises them. ``confirm=True``: see
        :meth:`hostbus.Bus.publish` (returns ``{queue: seq}``); many at once with
        :meth:`publish_async` or ``asyncio.gather``.
        """
        if confirm:
            if retain or reply_to:
                raise ValueError("a confirmed publish cannot be retained or carry a reply subject")
            fut = await self.publish_async(topic, data, headers)
            return await _wait(fut, timeout, f"confirm of a publish on {topic!r}")  # type: ignore[no-any-return]
        core = self._core
        core.check()
        plain = None if retain or reply_to else core.plain(topic, data, headers)
        if plain is None:
            self._send(core.pub(topic, data, headers, retain, reply_to or ""))
        else:
            if self._transport is None or self._closing:
                raise core.lost or ClosedError("the connection is closed")
            if core.pending_acks:  # answers given before this message go before it
                self._out += core.take_acks()
                self._run.at = -1
            self._run.add(self._out, *plain)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._write)
        await self._after_send()
        return None

    async def _after_send(self) -> None:
        if len(self._out) >= _WRITE_BATCH:
            self._write()
        if self._paused:
            w: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(w)
            await w

    async def publish_async(self, topic: str, data: bytes | str = b"",
                            headers: dict[str, str] | None = None) -> asyncio.Future[dict[str, int]]:
        """Send a confirmed publish and return a future of its ``{queue: seq}`` without waiting
        for it (waits only while the connection is congested)."""
        self._core.check()
        pub_id = self._core.next_id()
        frame = self._core.pub(topic, data, headers, pub_id=pub_id)
        fut: asyncio.Future[dict[str, int]] = self._loop.create_future()
        self._core.register(self._core.confirms, pub_id, fut)
        self._send(frame)
        await self._after_send()
        return fut

    async def publish_batch(self, messages: Iterable[tuple[Any, ...]],
                            timeout: float | None = DEFAULT_CONTROL_TIMEOUT) -> list[dict[str, int]]:
        """See :meth:`hostbus.Bus.publish_batch`."""
        self._core.check()
        fut: asyncio.Future[Any] = self._loop.create_future()
        frames = self._core.batch(messages, fut)
        if frames:
            self._send(frames)
            await self._after_send()
        return await _wait(fut, timeout, "confirm of a batch of publishes")  # type: ignore[no-any-return]

    def _answer(self, sid: int, kind: int, seq: int, delay_ms: int) -> None:
        """An ack, nak, term or in-progress: gathered with the others until the next write."""
        if self._transport is None or self._closing:
            raise self._core.lost or ClosedError("the connection is closed")
        self._core.pending_acks.append((sid, kind, seq, delay_ms))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._write)

    async def _respond(self, reply_to: str, data: bytes | str, headers: dict[str, str] | None) -> None:
        await self.publish(reply_to, data, headers)

    async def flush(self, timeout: float | None = DEFAULT_CONTROL_TIMEOUT) -> None:
        self._core.check()
        token = next(self._core.tokens)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._core.register(self._core.pings, token, fut)
        self._send(wire.encode_u32(wire.FrameType.PING, token))
        await _wait(fut, timeout, "flush")
        self._core.check()
        self._core.raise_async_error()

    async def request(self, topic: str, data: bytes | str = b"", timeout: float = 5.0,
                      headers: dict[str, str] | None = None) -> Message:
        self._core.check()
        reply = self._core.next_reply_subject()
        frame = self._core.pub(topic, data, headers, reply=reply, request=True)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._core.register(self._core.requests, reply, fut)
        try:
            self._send(frame)
            return await _wait(fut, timeout, f"request on {topic!r}")  # type: ignore[no-any-return]
        finally:
            self._core.requests.pop(reply, None)

    async def subscribe(self, pattern: str, group: str | None = None, *, policy: str | None = None,
                        max_msgs: int | None = None, max_bytes: int | None = None,
                        pending_limit: int = DEFAULT_PENDING_LIMIT, via: str = "socket",
                        ring_slots: int = 64, ring_slot_size: int = 256 * 1024) -> Subscription:
        """See :meth:`hostbus.Bus.subscribe` (``via="shm"``: through this bus's deliver ring)."""
        extra: dict[str, Any] = {}
        if via == "shm":
            extra = {"via": "shm", "ring": (await self._ensure_deliver_ring(ring_slots, ring_slot_size)).id}
        elif via != "socket":
            raise ValueError(f"via must be 'socket' or 'shm', not {via!r}")
        self._core.check()
        sid = self._core.next_id()
        frame = self._core.sub(sid, pattern, group, policy, max_msgs, max_bytes, extra)
        if extra:
            self._ring_sids.add(sid)
        sub = Subscription(self, sid, pattern, group, pending_limit)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._core.sinks[sid] = sub
        self._core.register(self._core.sub_waiters, sid, fut)
        try:
            self._send(frame)
            await _wait(fut, DEFAULT_CONTROL_TIMEOUT, f"subscribe to {pattern!r}")
        except BaseException as exc:
            self._core.sinks.pop(sid, None)
            self._core.sub_waiters.pop(sid, None)
            if not isinstance(exc, HostbusError) or isinstance(exc, HostbusTimeoutError):
                # Cancelled or timed out: the broker may have created it; it must not live on.
                with contextlib.suppress(HostbusError):
                    self._send(wire.encode_u32(wire.FrameType.UNSUB, sid))
            raise
        return sub

    async def consume(self, queue: str, consumer: str, *, start: str | int | float | Any = None,
                      ack_wait: float | None = None, max_deliver: int | None = None,
                      backoff: list[float] | None = None, max_inflight: int | None = None,
                      filter: str | None = None, pending_limit: int = DEFAULT_PENDING_LIMIT,
                      ) -> Consumption:
        """See :meth:`hostbus.Bus.consume`."""
        opts = self._core.consume_options(queue, consumer, {
            "start": start, "ack_wait": ack_wait, "max_deliver": max_deliver, "backoff": backoff,
            "max_inflight": max_inflight, "filter": filter})
        self._core.check()
        sid = self._core.next_id()
        cons = Consumption(self, sid, queue, consumer, pending_limit)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._core.sinks[sid] = cons
        self._core.register(self._core.sub_waiters, sid, fut)
        try:
            self._send(wire.encode_sub(sid, opts))
            await _wait(fut, DEFAULT_CONTROL_TIMEOUT, f"consume {queue!r}")
        except BaseException:
            self._core.sinks.pop(sid, None)
            self._core.sub_waiters.pop(sid, None)
            raise
        return cons

    async def queue_add(self, name: str, subjects: list[str] | str, **options: Any) -> dict[str, Any]:
        """See :meth:`hostbus.Bus.queue_add`."""
        return await self.call("queue_add", name=name,
                               subjects=[subjects] if isinstance(subjects, str) else subjects, **options)

    async def queue_info(self, name: str) -> dict[str, Any]:
        return await self.call("queue_info", name=name)

    async def queue_list(self) -> list[dict[str, Any]]:
        return list((await self.call("queue_list"))["queues"])

    async def queue_delete(self, name: str) -> None:
        await self.call("queue_delete", name=name)

    async def queue_purge(self, name: str) -> int:
        return int((await self.call("queue_purge", name=name))["purged"])

    async def consumer_delete(self, queue: str, consumer: str) -> None:
        """See :meth:`hostbus.Bus.consumer_delete`."""
        await self.call("consumer_delete", name=queue, consumer=consumer)

    async def _attach(self, direction: str, slots: int, slot_size: int) -> tuple[dict[str, Any], int]:
        res = await self.call("ring_attach", direction=direction, slots=slots, slot_size=slot_size)
        fd = await self._loop.run_in_executor(None, fetch_fd, self.path, str(res["token"]))
        return res, fd

    async def _ensure_deliver_ring(self, slots: int, slot_size: int) -> DeliverRing:
        ring = self._deliver_ring
        if ring is None or ring.closed is not None:
            loop = self._loop
            # The reader thread hands batches to the loop; at most _RING_BATCHES wait there, so a
            # busy loop makes the reader stop taking slots, and the broker's policy applies.
            window = threading.BoundedSemaphore(_RING_BATCHES)

            def handed(sink: Subscription, msgs: list[Entry]) -> None:
                window.release()
                sink.push_many(msgs)

            def push(sink: Subscription, msgs: list[Entry]) -> None:
                while not window.acquire(timeout=0.1):
                    self._core.check()
                loop.call_soon_threadsafe(handed, sink, msgs)

            res, fd = await self._attach("deliver", slots, slot_size)
            ring = self._deliver_ring = DeliverRing(
                res, fd, self._core.check, self._core.sinks, push,
                lambda sink, exc: loop.call_soon_threadsafe(sink.end, exc),
                lambda sink, n: loop.call_soon_threadsafe(sink.gap, n), self._respond)
            ring.sids = self._ring_sids
            ring.register(self._core)
            await self.call("ring_ready", ring=ring.id)
            ring.thread.start()
            self._rings.append(ring)
        return ring

    async def shm_publisher(self, slots: int = 64, slot_size: int = 256 * 1024) -> ShmPublisher:
        """See :meth:`hostbus.Bus.shm_publisher`; its methods are coroutines."""
        res, fd = await self._attach("publish", slots, slot_size)
        pub = ShmPublisher(self, RingWriter(res, fd, self._core.check))
        pub.ring.register(self._core)
        await self.call("ring_ready", ring=pub.id)
        self._rings.append(pub)
        return pub

    def _unsubscribe(self, sub: Subscription) -> None:
        self._ring_sids.discard(sub.sid)
        if self._core.sinks.pop(sub.sid, None) is not None and self._core.lost is None:
            self._send(wire.encode_u32(wire.FrameType.UNSUB, sub.sid))

    async def call(self, op: str, timeout: float | None = DEFAULT_CONTROL_TIMEOUT, **args: Any) -> dict[str, Any]:
        self._core.check()
        call_id = self._core.next_id()
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._core.register(self._core.calls, call_id, fut)
        self._send(wire.encode_call(call_id, op, args))
        return await _wait(fut, timeout, f"call {op!r}")  # type: ignore[no-any-return]

    async def stats(self) -> dict[str, Any]:
        return await self.call("stats")

    async def whoami(self, topic: str | None = None) -> dict[str, Any]:
        """See :meth:`hostbus.Bus.whoami`."""
        return await (self.call("whoami", topic=topic) if topic is not None else self.call("whoami"))

    async def close(self) -> None:
        """Write what is buffered, then close. Subscriptions end with ClosedError."""
        if self._transport is None:
            return
        rings, self._rings = self._rings, []
        for ring in rings:  # publishers flush their last slot; the deliver ring's reader stops
            with contextlib.suppress(HostbusError):
                if isinstance(ring, ShmPublisher):
                    await ring.close()
                else:
                    await self._loop.run_in_executor(None, ring.close)
        if not self._closing:
            self._write()
            self._closing = True
            self._transport.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), 5.0)
        self._core.connection_lost(ClosedError("the connection was closed"))

    @property
    def closed(self) -> bool:
        return self._core.lost is not None

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class ShmPublisher:
    """Publishes through a shared-memory ring (see :class:`hostbus.shm.ShmPublisher`). A full
    ring is waited for in a worker thread, so the event loop never blocks on a semaphore. Tasks
    may share one: a message that waits for a free slot holds the ring until it is written, and
    the other tasks' messages follow it in the order they came."""

    def __init__(self, bus: Bus, ring: RingWriter) -> None:
        self.bus = bus
        self.ring = ring
        self.id = ring.id
        self._writing = asyncio.Lock()  # held by a task whose message waits for free slots

    async def _take(self) -> None:
        if self.ring.try_take():
            return
        fut = self.bus._loop.run_in_executor(None, self.ring.take)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:  # the slot the worker takes is not ours any more: give it back
            fut.add_done_callback(lambda f: self.ring.free.release() if not f.exception() else None)
            raise

    async def publish(self, topic: str, data: bytes | bytearray | memoryview | str = b"",
                      headers: dict[str, str] | None = None, retain: bool = False) -> None:
        ring = self.ring
        if not retain and not self._writing.locked() and ring.join(topic, data, headers):
            return  # joined the open run without waiting: no other task can be in the middle
        async with self._writing:
            if not retain and ring.join(topic, data, headers):
                return
            for _ in ring.steps(ring.record(topic, data, headers, retain)):
                await self._take()

    async def flush(self, timeout: float | None = DEFAULT_CONTROL_TIMEOUT) -> None:
        ring = self.ring
        async with self._writing:  # after a message another task is writing
            ring.hand_over()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ring.routed(deadline):
            await asyncio.sleep(0.0005)
        await self.bus.flush(timeout)

    async def close(self) -> None:
        ring = self.ring
        if ring.closed is not None:
            return
        try:
            if self.bus._core.lost is None:
                await self.flush()
                await self.bus.call("ring_close", ring=ring.id)
        finally:
            ring.closed = RingClosedError(f"ring {ring.id} was closed")
            ring._release_local()

    async def __aenter__(self) -> ShmPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(socket: str | os.PathLike[str] | None = None, name: str | None = None, *,
                  timeout: float = DEFAULT_CONTROL_TIMEOUT,
                  error_cb: Callable[[HostbusError], None] | None = None) -> Bus:
    """Connect to hostbusd at ``socket`` (default: ``$HOSTBUS_SOCKET``, else the default path)."""
    path = Path(socket) if socket is not None else paths.default_socket()
    bus = Bus(name, error_cb)
    await bus._start(path, timeout)
    return bus
