"""The synchronous client: ``bus = hostbus.connect()``.

Two threads per connection, both owned by the :class:`Bus`: a reader that decodes what the
broker sends and hands it to subscriptions and waiters, and a writer that sends what the caller
published. ``publish`` only appends to a buffer; the writer takes the whole buffer in one
``sendall`` as soon as it is free, so a loop of publishes becomes a few large writes (batches
form by themselves while the previous one is on its way). The buffer is bounded
(``max_buffer``): a publisher faster than the socket blocks there instead of growing memory.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket as _socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from hostbus import paths
from hostbus._core import RUN_MAX_ITEM, RUN_MAX_ITEMS, ClientCore, SubscriptionState, as_hostbus_error
from hostbus._heap import large_message
from hostbus.errors import ClosedError, ConnectionLostError, HostbusError
from hostbus.errors import TimeoutError as HostbusTimeoutError
from hostbus.message import Entry, Message
from hostbus.shm import DeliverRing, ShmPublisher, attach

#: Bytes of published frames buffered before publish() blocks.
DEFAULT_MAX_BUFFER = 4 * 1024 * 1024
#: Messages a subscription holds for a caller that does not take them; past it they are dropped
#: and counted in ``Subscription.missed`` (the reader never blocks, so replies keep flowing).
DEFAULT_PENDING_LIMIT = 65536
#: Seconds to wait for the broker to answer HELLO, SUB, PING or CALL.
DEFAULT_CONTROL_TIMEOUT = 10.0
_RECV_SIZE = 256 * 1024
#: A payload at least this large is sent from where it is, not copied into the write buffer.
_GATHER_PAYLOAD = 64 * 1024
_IOV_MAX = 1024
#: A frame at least this large is received straight into a buffer of its size (one copy).
_BIG_FRAME = 512 * 1024
_pack_u32 = struct.Struct("<I").pack
_pack_u32_into = struct.Struct("<I").pack_into


def _send_all(sock: _socket.socket, chunks: list[bytes | bytearray]) -> None:
    """Write every buffer of ``chunks`` in order, with as few sendmsg calls as the kernel takes."""
    views = [memoryview(c) for c in chunks]
    try:
        while views:
            sent = sock.sendmsg(views[:_IOV_MAX])
            while sent:
                first = views[0]
                if sent >= len(first):
                    sent -= len(first)
                    views.pop(0)
                else:
                    views[0] = first[sent:]
                    sent = 0
    finally:
        for view in views:
            view.release()


def _wait(fut: concurrent.futures.Future[Any], timeout: float | None, what: str) -> Any:
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError:
        raise HostbusTimeoutError(f"{what}: no answer within {timeout} s") from None


class Subscription(SubscriptionState):
    """Messages matching ``pattern``. Iterate over it, or call :meth:`next`."""

    __slots__ = ("_cond", "_waiters", "bus")

    def __init__(self, bus: Bus, sid: int, pattern: str, group: str | None, pending_limit: int) -> None:
        super().__init__(sid, pattern, group, pending_limit)
        self.bus = bus
        # On the bus's subscription lock, made when a thread first waits in next().
        self._cond: threading.Condition | None = None
        self._waiters = 0  # threads blocked in next()

    # Sink (called by the reader thread)
    def push_many(self, entries: list[Entry]) -> None:
        with self.bus._sub_lock:
            self._admit(entries)
            if self._waiters and self._cond is not None:
                self._cond.notify(self._waiters)

    def gap(self, missed: int) -> None:
        with self.bus._sub_lock:
            self.missed += missed

    def end(self, exc: HostbusError) -> None:
        with self.bus._sub_lock:
            self._ended = exc
            if self._cond is not None:
                self._cond.notify_all()

    # API
    def next(self, timeout: float | None = None) -> Message:
        """The next message; raises TimeoutError if none came within ``timeout`` seconds.

        After :meth:`unsubscribe` or :meth:`Bus.close`, queued messages are still returned, then
        ClosedError (or ConnectionLostError if the connection broke) is raised.
        """
        # The run being taken, without a lock (SubscriptionState._take, inlined: the common case).
        it, topic, headers, sender, sid, respond = self._cur
        data = next(it, None)
        if data is not None:
            return Message(topic, data, dict(headers) if headers else {}, sender, None, sid, False, respond)
        with self.bus._sub_lock:
            msg = self._take_queued()
            if msg is not None:
                return msg
            cond = self._cond
            if cond is None:
                cond = self._cond = threading.Condition(self.bus._sub_lock)
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if self._ended is not None:
                    raise self._ended
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise HostbusTimeoutError(f"no message on {self.pattern!r} within {timeout} s")
                self._waiters += 1
                try:
                    cond.wait(left)  # a timeout is judged by the loop: a message may have come as it expired
                finally:
                    self._waiters -= 1
                msg = self._take_queued()
                if msg is not None:
                    return msg

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                yield self.next()
            except ClosedError:
                return

    def unsubscribe(self) -> None:
        """Stop receiving; messages already here can still be taken."""
        if self._ended is None:
            self.bus._unsubscribe(self)
            self.end(ClosedError(f"subscription to {self.pattern!r} was unsubscribed"))


class Consumption(Subscription):
    """Messages of a topic queue's consumer (:meth:`Bus.consume`): iterate, or call :meth:`next`.

    Each message has ``seq``, ``delivery_count`` and ``ack()``, ``nak(delay)``, ``term()``,
    ``in_progress()``. :meth:`unsubscribe` (or closing the bus) stops this member; messages it
    had not acknowledged go to the consumer's other members, or come again later.
    """

    __slots__ = ("consumer", "queue")

    def __init__(self, bus: Bus, sid: int, queue: str, consumer: str, pending_limit: int) -> None:
        super().__init__(bus, sid, f"{queue}/{consumer}", None, pending_limit)
        self.queue = queue
        self.consumer = consumer


class Bus:
    """A connection to hostbusd. Thread-safe; use as a context manager or call :meth:`close`."""

    def __init__(self, sock: _socket.socket, name: str | None, max_buffer: int = DEFAULT_MAX_BUFFER,
                 error_cb: Callable[[HostbusError], None] | None = None) -> None:
        self._sock = sock
        self._core = ClientCore(name, self._respond)
        self._core.on_error = error_cb
        self._core.answer = self._answer
        self._lock = threading.RLock()  # guards core registration tables and ids
        self._sub_lock = threading.RLock()  # guards every subscription's pending messages
        self._wlock = threading.RLock()
        self._wcond = threading.Condition(self._wlock)
        self._wbuf = bytearray()
        # Large payloads are not copied into _wbuf: what is to be written before _wbuf waits
        # here as a list of buffers (small frames gathered, then a head and a payload ...),
        # and the writer sends it with one sendmsg.
        self._chunks: list[bytes | bytearray] = []
        self._chunk_bytes = 0
        self._run = self._core.run  # the run (PUBN) being gathered at the end of _wbuf
        self._sending = False  # a sendall is in progress (the writer's, or a caller's: _send_now)
        self._max_buffer = max_buffer
        self._closing = False
        self.path = ""  # the socket's path (set by connect(); rings fetch their memory through it)
        self._deliver_ring: DeliverRing | None = None
        self._ring_sids: set[int] = set()
        self._rings: list[ShmPublisher | DeliverRing] = []
        welcome: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._core.welcome_waiter = welcome
        self._reader = threading.Thread(target=self._read_loop, name="hostbus-reader", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name="hostbus-writer", daemon=True)
        self._reader.start()
        self._writer.start()
        self._send(self._core.hello())
        try:
            self.welcome: dict[str, Any] = _wait(welcome, DEFAULT_CONTROL_TIMEOUT, "handshake")
        except BaseException:
            self.close()
            raise

    # ---- identity -------------------------------------------------------------------------------

    @property
    def client_id(self) -> int:
        return int(self.welcome["client_id"])

    @property
    def identity(self) -> dict[str, Any]:
        """Who the broker verified this connection to be: uid, gid, pid and, for the names access rules
        use, user, groups, unit and principals (see :meth:`whoami`)."""
        return dict(self.welcome["identity"])

    # ---- publishing -----------------------------------------------------------------------------

    def publish(self, topic: str, data: bytes | str = b"", headers: dict[str, str] | None = None,
                retain: bool = False, reply_to: str | None = None, confirm: bool = False,
                timeout: float | None = DEFAULT_CONTROL_TIMEOUT) -> dict[str, int] | None:
        """Queue one message for sending (returns before it is sent: see :meth:`flush`).

        Errors the broker reports later about a published message (such as a full retained
        store) go to ``error_cb`` if :func:`connect` was given one, else :meth:`flush` raises them.

        ``confirm=True``: wait until every topic queue that captures the topic has stored the
        message under its durability, and return ``{queue: seq}`` (``{}`` if no queue captures
        it); raises QueueFullError, StorageError, LimitExceededError, PermissionDeniedError.
        For many confirmed messages in flight at once use :meth:`publish_async`.
        """
        if confirm:
            if retain or reply_to:
                raise ValueError("a confirmed publish cannot be retained or carry a reply subject")
            return _wait(self.publish_async(topic, data, headers), timeout,  # type: ignore[no-any-return]
                         f"confirm of a publish on {topic!r}")
        core = self._core
        run = self._run
        tb = core._topic_bytes.get(topic)
        if (headers is None and type(data) is bytes and not (retain or reply_to or confirm) and run.at >= 0
                and tb is run.topic):
            # The common case, kept short: one more message joins the run open at the end of the
            # buffer (same topic, no headers; checked again under the lock).
            n = len(data)
            with self._wlock:
                wbuf = self._wbuf
                at = run.at
                if (at >= 0 and run.topic is tb and not run.headers and not self._closing
                        and core.lost is None and len(wbuf) + self._chunk_bytes < self._max_buffer
                        and not core.pending_acks and n <= RUN_MAX_ITEM and len(wbuf) - at + 4 + n <= run.limit
                        and run.items < RUN_MAX_ITEMS):
                    wbuf += _pack_u32(n)
                    wbuf += data
                    run.items += 1
                    _pack_u32_into(wbuf, at, len(wbuf) - at - 4)
                    return None
        core.check()
        plain = None if retain or reply_to else core.plain(topic, data, headers)
        if plain is None:
            if isinstance(data, bytes) and len(data) >= _GATHER_PAYLOAD:  # sent from where it is
                self._send(core.pub_head(topic, len(data), headers, retain, reply_to or ""), data)
            else:
                self._send(core.pub(topic, data, headers, retain, reply_to or ""))
            return None
        with self._wcond:
            if self._closing:
                raise core.lost or ClosedError("the connection is closed")
            while len(self._wbuf) + self._chunk_bytes >= self._max_buffer:
                self._wcond.wait()
                if self._closing:
                    raise core.lost or ClosedError("the connection is closed")
            was_empty = not (self._wbuf or self._chunks)
            if core.pending_acks:  # answers given before this message go before it
                self._wbuf += core.take_acks()
                self._run.at = -1
            self._run.add(self._wbuf, *plain)
            if was_empty:
                self._wcond.notify_all()
        return None

    def publish_async(self, topic: str, data: bytes | str = b"",
                      headers: dict[str, str] | None = None) -> concurrent.futures.Future[dict[str, int]]:
        """A confirmed publish that does not wait: a future of ``{queue: seq}`` (or of the error).

        Confirms are pipelined: keep many in flight (a window of a few thousand) and one fsync
        of a ``durability = always`` queue confirms every message that arrived meanwhile.
        """
        fut: concurrent.futures.Future[dict[str, int]] = concurrent.futures.Future()
        with self._lock:
            self._core.check()
            pub_id = self._core.next_id()
            frame = self._core.pub(topic, data, headers, pub_id=pub_id)
            self._core.register(self._core.confirms, pub_id, fut)
        try:
            self._send(frame)
        except BaseException:
            self._core.confirms.pop(pub_id, None)
            raise
        return fut

    def publish_batch(self, messages: Iterable[tuple[Any, ...]], timeout: float | None = DEFAULT_CONTROL_TIMEOUT,
                      ) -> list[dict[str, int]]:
        """Confirmed publishes of many messages at once: ``messages`` are ``(topic, data)`` or
        ``(topic, data, headers)``; returns the ``{queue: seq}`` of each, in order, once all are
        stored. If any was refused, raises the first error; its ``results`` attribute holds every
        answer (a dict, or that message's error). The batch is sent in one write and answered in
        few frames: the fastest way to publish confirmed from one thread."""
        return _wait(self.publish_batch_async(messages), timeout,  # type: ignore[no-any-return]
                     "confirm of a batch of publishes")

    def publish_batch_async(self, messages: Iterable[tuple[Any, ...]]) -> concurrent.futures.Future[Any]:
        """:meth:`publish_batch` without waiting: a future of the list of ``{queue: seq}``."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            self._core.check()
            frames = self._core.batch(messages, fut)
        if frames:
            self._send(frames)
        return fut

    def _answer(self, sid: int, kind: int, seq: int, delay_ms: int) -> None:
        """An ack, nak, term or in-progress: gathered with the others until the next write."""
        with self._wcond:
            if self._closing:
                raise self._core.lost or ClosedError("the connection is closed")
            acks = self._core.pending_acks
            acks.append((sid, kind, seq, delay_ms))
            if len(acks) == 1 and not (self._wbuf or self._chunks):
                self._wcond.notify_all()

    def _respond(self, reply_to: str, data: bytes | str, headers: dict[str, str] | None) -> None:
        self._core.check()
        self._send_now(self._core.pub(reply_to, data, headers))  # someone waits for it

    def flush(self, timeout: float | None = DEFAULT_CONTROL_TIMEOUT) -> None:
        """Return once everything published so far has reached the broker and been routed.

        Raises an error the broker reported about an earlier publish, if there is one (and no
        ``error_cb`` took it).
        """
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            self._core.check()
            token = next(self._core.tokens)
            self._core.register(self._core.pings, token, fut)
        self._send_now(self._u32_frame("PING", token))
        _wait(fut, timeout, "flush")
        self._core.check()
        self._core.raise_async_error()

    def request(self, topic: str, data: bytes | str = b"", timeout: float = 5.0,
                headers: dict[str, str] | None = None) -> Message:
        """Send a request and return the first reply; NoRespondersError at once if nobody listens."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            self._core.check()
            reply = self._core.next_reply_subject()
            frame = self._core.pub(topic, data, headers, reply=reply, request=True)
            self._core.register(self._core.requests, reply, fut)
        self._send_now(frame)
        try:
            return _wait(fut, timeout, f"request on {topic!r}")  # type: ignore[no-any-return]
        finally:
            self._core.requests.pop(reply, None)

    # ---- subscribing ----------------------------------------------------------------------------

    def subscribe(self, pattern: str, group: str | None = None, *, policy: str | None = None,
                  max_msgs: int | None = None, max_bytes: int | None = None,
                  pending_limit: int = DEFAULT_PENDING_LIMIT, via: str = "socket",
                  ring_slots: int = 64, ring_slot_size: int = 256 * 1024) -> Subscription:
        """Subscribe; returns once the broker confirmed (errors are raised here, at once).

        ``group``: share the messages with the other subscribers of this group and pattern.
        ``policy``/``max_msgs``/``max_bytes``: the broker-side queue of this subscription
        while this client is not reading (defaults from the broker's configuration).
        ``via="shm"``: receive through this bus's shared-memory ring (made by the first such
        subscription, with ``ring_slots`` slots of ``ring_slot_size`` bytes): payloads cross no
        socket. Messages are the same :class:`Message` objects; ``data`` is a copy (bytes).
        """
        extra: dict[str, Any] = {}
        if via == "shm":
            extra = {"via": "shm", "ring": self._ensure_deliver_ring(ring_slots, ring_slot_size).id}
        elif via != "socket":
            raise ValueError(f"via must be 'socket' or 'shm', not {via!r}")
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            self._core.check()
            sid = self._core.next_id()
            frame = self._core.sub(sid, pattern, group, policy, max_msgs, max_bytes, extra)
            if extra:
                self._ring_sids.add(sid)
            sub = Subscription(self, sid, pattern, group, pending_limit)
            self._core.sinks[sid] = sub
            self._core.register(self._core.sub_waiters, sid, fut)
        self._send(frame)
        try:
            _wait(fut, DEFAULT_CONTROL_TIMEOUT, f"subscribe to {pattern!r}")
        except BaseException as exc:
            self._core.sinks.pop(sid, None)
            self._core.sub_waiters.pop(sid, None)
            if not isinstance(exc, HostbusError) or isinstance(exc, HostbusTimeoutError):
                # The broker may have created it (no answer seen): make sure it does not live on.
                with contextlib.suppress(HostbusError):
                    self._send(self._u32_frame("UNSUB", sid))
            raise
        return sub

    def consume(self, queue: str, consumer: str, *, start: str | int | float | Any = None,
                ack_wait: float | None = None, max_deliver: int | None = None,
                backoff: list[float] | None = None, max_inflight: int | None = None,
                filter: str | None = None, pending_limit: int = DEFAULT_PENDING_LIMIT) -> Consumption:
        """Consume the topic queue ``queue`` as (a member of) the durable consumer ``consumer``.

        The consumer is created on first use with these options; later members share its
        messages. ``start``: ``"all"`` (default), ``"new"``, ``"last"``, a sequence number, or a
        time (Unix seconds as a float, or a datetime); only when the consumer is created.
        ``ack_wait`` seconds before an unacknowledged message comes again; ``max_deliver``
        deliveries before it goes to the dead-letter topic; ``backoff`` delays of the
        redeliveries; ``max_inflight`` unacknowledged messages at once; ``filter`` a pattern:
        only matching messages. Raises NotFoundError, PermissionDeniedError, LimitExceededError.
        """
        opts = self._core.consume_options(queue, consumer, {
            "start": start, "ack_wait": ack_wait, "max_deliver": max_deliver, "backoff": backoff,
            "max_inflight": max_inflight, "filter": filter})
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        from hostbus import wire  # noqa: PLC0415

        with self._lock:
            self._core.check()
            sid = self._core.next_id()
            cons = Consumption(self, sid, queue, consumer, pending_limit)
            self._core.sinks[sid] = cons
            self._core.register(self._core.sub_waiters, sid, fut)
        self._send(wire.encode_sub(sid, opts))
        try:
            _wait(fut, DEFAULT_CONTROL_TIMEOUT, f"consume {queue!r}")
        except BaseException:
            self._core.sinks.pop(sid, None)
            self._core.sub_waiters.pop(sid, None)
            raise
        return cons

    def queue_add(self, name: str, subjects: list[str] | str, **options: Any) -> dict[str, Any]:
        """Declare a topic queue (or confirm one with the same properties); returns its info.
        Options: storage, durability, sync_interval_ms, max_msgs, max_bytes, max_age,
        max_msg_size, discard, retention, dead_letter, duplicate_window (docs/queues.md)."""
        return self.call("queue_add", name=name, subjects=[subjects] if isinstance(subjects, str) else subjects,
                         **options)

    def queue_info(self, name: str) -> dict[str, Any]:
        """A queue's properties and counters (messages, bytes, consumers, pending ...)."""
        return self.call("queue_info", name=name)

    def queue_list(self) -> list[dict[str, Any]]:
        return list(self.call("queue_list")["queues"])

    def queue_delete(self, name: str) -> None:
        """Delete a queue and its stored messages; its consumers' members are ended."""
        self.call("queue_delete", name=name)

    def queue_purge(self, name: str) -> int:
        """Remove every stored message of a queue; returns how many."""
        return int(self.call("queue_purge", name=name)["purged"])

    def consumer_delete(self, queue: str, consumer: str) -> None:
        """Forget a durable consumer of ``queue`` (its position and unacknowledged messages);
        its members are ended with NotFoundError. Takes the right to manage the queue."""
        self.call("consumer_delete", name=queue, consumer=consumer)

    def _ensure_deliver_ring(self, slots: int, slot_size: int) -> DeliverRing:
        with self._lock:
            ring = self._deliver_ring
            if ring is None or ring.closed is not None:
                res, fd = attach(self, "deliver", slots, slot_size)
                ring = self._deliver_ring = DeliverRing(
                    res, fd, self._core.check, self._core.sinks, lambda sink, msgs: sink.push_many(msgs),
                    lambda sink, exc: sink.end(exc), lambda sink, n: sink.gap(n), self._respond)
                ring.sids = self._ring_sids
                ring.register(self._core)
                self.call("ring_ready", ring=ring.id)
                ring.thread.start()
                self._rings.append(ring)
            return ring

    def shm_publisher(self, slots: int = 64, slot_size: int = 256 * 1024) -> ShmPublisher:
        """A publisher through a shared-memory ring of ``slots`` slots of ``slot_size`` bytes
        (docs/shm.md): ``pub.publish(topic, data, headers=None)``, ``pub.flush()``, ``pub.close()``."""
        pub = ShmPublisher(self, slots, slot_size)
        self._rings.append(pub)
        return pub

    def _unsubscribe(self, sub: Subscription) -> None:
        self._ring_sids.discard(sub.sid)
        with self._lock:
            if self._core.sinks.pop(sub.sid, None) is None or self._core.lost is not None:
                return
        self._send(self._u32_frame("UNSUB", sub.sid))

    # ---- calls ------------------------------------------------------------------------------------

    def call(self, op: str, timeout: float | None = DEFAULT_CONTROL_TIMEOUT, **args: Any) -> dict[str, Any]:
        """A control call to the broker (``stats``, ...); returns its JSON result."""
        from hostbus import wire  # noqa: PLC0415 - keep the module's import list short

        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            self._core.check()
            call_id = self._core.next_id()
            self._core.register(self._core.calls, call_id, fut)
        self._send(wire.encode_call(call_id, op, args))
        return _wait(fut, timeout, f"call {op!r}")  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def whoami(self, topic: str | None = None) -> dict[str, Any]:
        """The identity the broker verified for this connection and, for ``topic`` (a topic or
        pattern), whether it may publish, subscribe and manage queues there, and which rule says so:
        ``{"identity": {...,"principals": [...]}, "access": {"publish": {"allowed": ..., "rule": ...}}}``.
        """
        return self.call("whoami", topic=topic) if topic is not None else self.call("whoami")

    # ---- I/O --------------------------------------------------------------------------------------

    @staticmethod
    def _u32_frame(kind: str, value: int) -> bytes:
        from hostbus import wire  # noqa: PLC0415

        return wire.encode_u32(wire.FrameType[kind], value)

    def _send(self, frame: bytes, payload: bytes | None = None) -> None:
        """Queue ``frame`` for the writer; with ``payload``, ``frame`` is the head of a frame
        whose payload follows it and is sent from where it is (a large message)."""
        with self._wcond:
            if self._closing:
                raise self._core.lost or ClosedError("the connection is closed")
            while len(self._wbuf) + self._chunk_bytes >= self._max_buffer:
                self._wcond.wait()
                if self._closing:
                    raise self._core.lost or ClosedError("the connection is closed")
            was_empty = not (self._wbuf or self._chunks)
            if self._core.pending_acks:  # answers given before this frame go before it
                self._wbuf += self._core.take_acks()
            self._wbuf += frame
            self._run.at = -1
            if payload is not None:
                self._chunks.append(self._wbuf)
                self._chunks.append(payload)
                self._chunk_bytes += len(self._wbuf) + len(payload)
                self._wbuf = bytearray()
            if was_empty:
                self._wcond.notify_all()

    def _send_now(self, frame: bytes) -> None:
        """Send a frame a caller waits on (a request, a reply, a flush) from the calling thread
        when nothing else is being written: one thread hand-over less per round trip. Otherwise
        it queues behind what is, like :meth:`_send` (the order of frames is kept)."""
        with self._wcond:
            if self._closing:
                raise self._core.lost or ClosedError("the connection is closed")
            if self._core.pending_acks:
                self._wbuf += self._core.take_acks()
            if self._wbuf or self._chunks or self._sending:
                self._wbuf += frame
                self._run.at = -1
                self._wcond.notify_all()
                return
            self._sending = True
        try:
            self._sock.sendall(frame)
        except OSError as exc:
            self._write_failed(exc)
            raise self._core.lost or ConnectionLostError(f"cannot write to the broker: {exc}") from None
        except BaseException:
            # Interrupted (Ctrl-C) in the middle of a frame: what follows would be garbage to the
            # broker. The connection is given up, the caller's exception goes on.
            self._lost(ConnectionLostError("a send was interrupted in the middle of a frame"))
            with contextlib.suppress(OSError):
                self._sock.shutdown(_socket.SHUT_RDWR)
            raise
        finally:
            with self._wcond:
                self._sending = False
                self._wcond.notify_all()  # the writer: for what was queued meanwhile, acks included

    def _write_failed(self, exc: OSError) -> None:
        # The broker may have said why it closed (a connection limit, say) just before: let the
        # reader take that in first, so the caller sees the reason, not a broken pipe.
        if threading.current_thread() is not self._reader:
            self._reader.join(1.0)
        self._lost(ConnectionLostError(f"cannot write to the broker: {exc}"))

    def _write_loop(self) -> None:
        sock = self._sock
        while True:
            with self._wcond:
                while (not (self._wbuf or self._chunks or self._core.pending_acks) or self._sending) \
                        and not self._closing:
                    self._wcond.wait()
                while self._sending:  # closing: let a caller's send finish first
                    self._wcond.wait(0.1)
                if self._core.pending_acks:
                    self._wbuf += self._core.take_acks()
                if not (self._wbuf or self._chunks):
                    return  # closing with nothing left to send
                chunks = self._chunks
                if self._wbuf:
                    chunks.append(self._wbuf)
                self._wbuf = bytearray()
                self._chunks = []
                self._chunk_bytes = 0
                self._run.at = -1
                self._sending = True
                self._wcond.notify_all()  # room for blocked publishers
            try:
                if len(chunks) == 1:
                    sock.sendall(chunks[0])
                else:
                    _send_all(sock, chunks)
            except OSError as exc:
                self._write_failed(exc)
                return
            finally:
                with self._wcond:
                    self._sending = False

    def _read_loop(self) -> None:
        sock = self._sock
        core = self._core
        decoder = core.decoder
        decoder.big = _BIG_FRAME  # large frames are received into a buffer of their own size
        try:
            while True:
                target = decoder.reserve()
                if target is not None:
                    large_message()
                    with target:
                        n = sock.recv_into(target)
                    if not n:
                        raise ConnectionLostError("the broker closed the connection")
                    decoder.filled(n)
                    core.receive(b"")
                    continue
                data = sock.recv(_RECV_SIZE)
                if not data:
                    raise ConnectionLostError("the broker closed the connection")
                core.receive(data)
                if core.lost is not None:
                    return
        except BaseException as exc:
            self._lost(ClosedError("the connection was closed") if self._closing else as_hostbus_error(exc))
        finally:
            with self._wcond:
                self._closing = True
                self._wcond.notify_all()

    def _lost(self, exc: HostbusError) -> None:
        with self._lock:
            self._core.connection_lost(exc)

    # ---- closing ----------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered, then close. Subscriptions end with ClosedError."""
        rings, self._rings = self._rings, []
        for ring in rings:  # publishers flush their last slot; the deliver ring's reader stops
            with contextlib.suppress(HostbusError):
                ring.close()
        with self._wcond:
            self._closing = True
            self._wcond.notify_all()
        if threading.current_thread() is not self._writer:
            self._writer.join(timeout)
        with contextlib.suppress(OSError):
            self._sock.shutdown(_socket.SHUT_RDWR)
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout)
        self._sock.close()
        self._lost(ClosedError("the connection was closed"))  # no-op if it was lost before

    @property
    def closed(self) -> bool:
        return self._core.lost is not None

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def connect(socket: str | os.PathLike[str] | None = None, name: str | None = None, *,
            max_buffer: int = DEFAULT_MAX_BUFFER, timeout: float = DEFAULT_CONTROL_TIMEOUT,
            error_cb: Callable[[HostbusError], None] | None = None) -> Bus:
    """Connect to hostbusd at ``socket`` (default: ``$HOSTBUS_SOCKET``, else the default path)."""
    path = Path(socket) if socket is not None else paths.default_socket()
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise ConnectionLostError(f"cannot connect to hostbusd at {path}: {exc.strerror or exc}",
                                  hint="is hostbusd running? set HOSTBUS_SOCKET or pass socket=") from None
    sock.settimeout(None)
    bus = Bus(sock, name, max_buffer, error_cb)
    bus.path = str(path)
    return bus
