"""ClientCore: the client's protocol state, sans-IO, shared by the sync and asyncio clients.

It encodes what the client sends and dispatches what the broker sends: messages to subscription
sinks, replies and errors to waiters. Waiters are future-like objects (``set_result``,
``set_exception``, ``done``): ``concurrent.futures.Future`` in the sync client, ``asyncio.Future``
in the asyncio one. The shells own the socket and the threads or tasks.
"""

from __future__ import annotations

import itertools
import operator
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol, cast

from hostbus import topics, wire
from hostbus._heap import LARGE as _LARGE
from hostbus._heap import large_message
from hostbus.errors import (
    ConnectionLostError,
    ErrorCode,
    HostbusError,
    MessageTooLargeError,
    NoRespondersError,
    RemoteProtocolError,
    error_from_code,
)
from hostbus.message import Entry, Message, QueueMessage, Sender
from hostbus.wire import FrameType

CLIENT_NAME = "hostbus-py/0.1"
#: Largest frame this client accepts from a broker (a MSG is the publish frame plus 12 bytes).
_MAX_INBOUND_FRAME = (1 << 30) + 1024
#: Distinct topics whose validated UTF-8 form is kept (publishing to a topic again skips checks).
_TOPIC_CACHE = 4096

_U32 = wire.frames.U32
_MSG_FIXED = struct.Struct("<IQHHI")  # MSG prefix (sid, sender ref) + message block header
_QMSG_PREFIX = wire.frames.QMSG_PREFIX  # sid, sender ref, seq, deliveries, time_ns
_CPUB_HEAD = struct.Struct("<IBBIHHI").pack  # frame head, pub_id and the message block's lengths
_CPUB = int(FrameType.CPUB)
_MSGN_FIXED = struct.Struct("<IQIHHI")  # MSGN prefix (sid, sender ref, count) + run head
_RUN_START = struct.Struct("<IBBHHI").pack  # PUBN frame head + run head (length patched later)
_pack_u32 = _U32.pack
_pack_u32_into = _U32.pack_into
_PUBN = int(FrameType.PUBN)
#: A run (PUBN frame) is closed at this size; larger payloads are published on their own. A run
#: shares one frame head, one topic check and one routing decision among its messages.
RUN_MAX_BYTES = 128 * 1024
RUN_MAX_ITEM = 16 * 1024
RUN_MAX_ITEMS = wire.frames.RUN_MAX_ITEMS


class RunWriter:
    """Gathers consecutive plain publishes on one topic with the same headers into one PUBN
    frame at the end of a bytearray; any other frame appended after it closes the run."""

    __slots__ = ("at", "headers", "items", "limit", "topic")

    def __init__(self) -> None:
        self.at = -1  # where the open run's frame starts in the buffer, -1: none
        self.topic = b""
        self.headers = b""
        self.items = 0
        self.limit = RUN_MAX_BYTES  # bytes of the whole frame (ClientCore lowers it to the broker's max_frame)

    def add(self, buf: bytearray, tb: bytes, hb: bytes, data: bytes) -> None:
        at = self.at
        if (at < 0 or self.topic is not tb or self.headers != hb or len(buf) - at + 4 + len(data) > self.limit
                or self.items >= RUN_MAX_ITEMS):
            self.at = at = len(buf)
            self.topic = tb
            self.headers = hb
            self.items = 0
            buf += _RUN_START(0, _PUBN, 0, len(tb), 0, len(hb))
            buf += tb
            if hb:
                buf += hb
        buf += _pack_u32(len(data))
        buf += data
        self.items += 1
        _pack_u32_into(buf, at, len(buf) - at - 4)


class Waiter(Protocol):
    def done(self) -> bool: ...
    def set_result(self, result: Any, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...


class Sink(Protocol):
    """Where a subscription's messages go."""

    def push_many(self, entries: list[Entry]) -> None: ...
    def gap(self, missed: int) -> None: ...
    def end(self, exc: HostbusError) -> None: ...


#: The cursor of a subscription with no run being taken: (payload iterator, topic, headers,
#: sender, sid, respond), as made from a Run when its first message is taken.
_NO_RUN: tuple[Iterator[bytes], str, dict[str, str] | None, Sender, int, Callable[..., Any] | None] = (
    iter(()), "", None, Sender(0, 0, 0), 0, None)


class SubscriptionState:
    """What a subscription keeps in either client: its id and pattern, pending messages, losses.

    Few objects per subscription (slots; the sync client's condition made only when a thread
    waits): a process holding many subscriptions gives the garbage collector little to walk.
    Pending messages are single messages and runs (``Run``: a list of payloads); the run being
    taken is the cursor ``_cur``, whose messages any thread takes without a lock (a list
    iterator hands each payload out once), and which the owner replaces under its lock."""

    __slots__ = ("_cur", "_ended", "_items", "_queued", "group", "missed", "pattern", "pending_limit", "sid")

    def __init__(self, sid: int, pattern: str, group: str | None, pending_limit: int) -> None:
        self.sid = sid
        self.pattern = pattern
        self.group = group
        self.pending_limit = pending_limit
        self.missed = 0  # messages lost: dropped by the broker (GAP) or here past pending_limit
        self._items: deque[Entry] = deque()
        self._queued = 0  # messages in _items
        self._cur = _NO_RUN
        self._ended: HostbusError | None = None

    def _admit(self, entries: list[Entry]) -> None:
        """Queue ``entries`` up to ``pending_limit`` messages; the rest are dropped and counted in
        ``missed`` (a run that does not fit is cut)."""
        room = self.pending_limit - self.pending
        items = self._items
        for entry in entries:
            n = len(entry[0]) if isinstance(entry, tuple) else 1
            if n > room:
                self.missed += n - max(room, 0)
                if room <= 0 or not isinstance(entry, tuple):
                    continue
                payloads, topic, headers, sender, sid, respond = entry
                cut: Entry = (payloads[:room], topic, headers, sender, sid, respond)
                n = room
            else:
                cut = entry
            if n:
                # Counted before it is queued: a reader of ``pending`` without the lock may see
                # a run early, never miss one (_take_queued moves the cursor first for the same).
                self._queued += n
                items.append(cut)
                room -= n

    def _take(self) -> Message | None:
        """The next message of the run being taken, or None; safe without a lock."""
        it, topic, headers, sender, sid, respond = self._cur
        data = next(it, None)
        if data is None:
            return None
        return Message(topic, data, dict(headers) if headers else {}, sender, None, sid, False, respond)

    def _take_queued(self) -> Message | None:
        """The next pending message, or None; the sync client calls it under its lock."""
        msg = self._take()
        items = self._items
        while msg is None and items:
            entry = items.popleft()
            if not isinstance(entry, tuple):
                self._queued -= 1
                return entry
            payloads = entry[0]
            self._cur = (iter(payloads), *entry[1:])  # before the count drops (see _admit)
            self._queued -= len(payloads)
            msg = self._take()
        return msg

    @property
    def pending(self) -> int:
        """Messages received and not yet taken."""
        return self._queued + operator.length_hint(self._cur[0])


class BatchConfirms:
    """The answers to a batch of confirmed publishes, gathered into one waiter: its result is
    the list of ``{queue: seq}``, or (if any was refused) the first error, whose ``results``
    holds every answer (a dict, or the error of that message)."""

    def __init__(self, n: int, waiter: Waiter) -> None:
        self.results: list[Any] = [None] * n
        self.left = n
        self.waiter = waiter

    def part(self, k: int) -> _BatchPart:
        return _BatchPart(self, k)

    def _answer(self, k: int, value: Any) -> None:
        self.results[k] = value
        self.left -= 1
        if self.left == 0:
            errors = [r for r in self.results if isinstance(r, BaseException)]
            if errors:
                first = errors[0]
                first.results = self.results  # type: ignore[attr-defined]
                _settle(self.waiter, exc=first)
            else:
                _settle(self.waiter, self.results)


class _BatchPart:
    __slots__ = ("batch", "k", "settled")

    def __init__(self, batch: BatchConfirms, k: int) -> None:
        self.batch = batch
        self.k = k
        self.settled = False

    def done(self) -> bool:
        return self.settled

    def set_result(self, result: Any, /) -> None:
        self.settled = True
        self.batch._answer(self.k, result)

    def set_exception(self, exception: BaseException, /) -> None:
        self.settled = True
        self.batch._answer(self.k, exception)


def _settle(waiter: Waiter, result: Any = None, exc: BaseException | None = None) -> None:
    if waiter.done():
        return
    if exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(result)


class ClientCore:
    def __init__(self, name: str | None, respond: Callable[..., Any]) -> None:
        self.name = name if name is not None else f"pid{os.getpid()}"
        self.decoder = wire.Decoder(wire.SERVER_FRAMES, _MAX_INBOUND_FRAME)
        self.respond = respond  # publish function handed to messages for msg.respond()
        self.welcome: dict[str, Any] | None = None
        self.welcome_waiter: Waiter | None = None
        self.inbox = ""
        self.max_frame = wire.HANDSHAKE_MAX_FRAME
        self.runs_ok = False  # the broker takes runs (PUBN): its WELCOME says so
        self.run = RunWriter()  # the run being gathered in the client's write buffer
        self.senders: dict[int, Sender] = {}
        self.sinks: dict[int, Sink] = {}
        self.rings: dict[int, Any] = {}  # ring id -> the shared-memory rings of this connection (hostbus.shm)
        self.sub_waiters: dict[int, Waiter] = {}
        self.pings: dict[int, Waiter] = {}
        self.calls: dict[int, Waiter] = {}
        self.requests: dict[str, Waiter] = {}
        self.confirms: dict[int, Waiter] = {}  # confirmed publishes by id (ids shared with sids and calls)
        self.answer: Callable[[int, int, int, int], None] | None = None  # sends an ACK: (sid, kind, seq, delay_ms)
        # Answers not yet written (sid, kind, seq, delay_ms): gathered into as few ACK frames as the
        # order of sids allows, ahead of the next frame the client writes (see take_acks).
        self.pending_acks: list[tuple[int, int, int, int]] = []
        # Subscription ids and call ids share one counter: an ERR's ref then names exactly one.
        self._next_id = 1  # see next_id
        self._wrapped = False
        self.tokens = itertools.count(1)  # PING tokens
        self.req_ids = itertools.count(1)
        self.lost: HostbusError | None = None  # set once the connection is gone
        self.async_error: HostbusError | None = None  # a non-fatal error not tied to a call
        self.on_error: Callable[[HostbusError], None] | None = None
        self._topic_bytes: dict[str, bytes] = {}
        self._topic_str: dict[bytes, str] = {}  # received topics, decoded once

    # ---- encoding ------------------------------------------------------------------------------

    def next_id(self, n: int = 1) -> int:
        """The first of ``n`` consecutive ids for subscriptions, calls and confirmed publishes
        (one space, so an ERR's ``ref`` names one of them). Ids are u32 on the wire: after
        4,294,967,295 they start again at 1, passing over any still in use. Call with the client's
        registration lock held."""
        first = self._next_id
        if not self._wrapped and first + n <= 0xFFFFFFFF:  # never used before: nothing to pass over
            self._next_id = first + n
            return first
        busy = (self.sinks, self.sub_waiters, self.calls, self.confirms)
        while True:
            first = self._next_id
            if first + n > 0xFFFFFFFF:  # a run never crosses the end of the id space
                first = 1
                self._wrapped = True
            if not any(first + k in table for table in busy for k in range(n) if table):
                self._next_id = first + n
                return first
            self._next_id = first + n  # some are in use: try the next run

    def hello(self) -> bytes:
        return wire.encode_hello(self.name, CLIENT_NAME, wire.PROTOCOL_VERSION, (wire.FEATURE_RUNS,))

    def plain(self, topic: str, data: bytes | bytearray | memoryview | str,
              headers: dict[str, str] | None) -> tuple[bytes, bytes, bytes] | None:
        """(topic, headers block, payload) of a publish that may join a run, or None if it goes
        in a PUB frame of its own (a large payload, or a broker without runs)."""
        if isinstance(data, str):
            data = data.encode()
        elif not isinstance(data, bytes):
            data = bytes(data)
        if len(data) > RUN_MAX_ITEM or not self.runs_ok:
            return None
        tb = self.topic_bytes(topic)
        hb = wire.encode_headers(headers) if headers else b""
        if 14 + len(tb) + len(hb) + len(data) > self.max_frame:  # not even alone: PUB says why
            return None
        return tb, hb, data

    def topic_bytes(self, topic: str) -> bytes:
        b = self._topic_bytes.get(topic)
        if b is None:
            topics.check_topic(topic)
            if len(self._topic_bytes) >= _TOPIC_CACHE:
                self._topic_bytes.clear()
            b = self._topic_bytes[topic] = topic.encode()
        return b

    def pub(self, topic: str, data: bytes | bytearray | memoryview | str,
            headers: dict[str, str] | None = None, retain: bool = False, reply: str = "",
            request: bool = False, pub_id: int = 0) -> bytes:
        if isinstance(data, str):
            data = data.encode()
        elif not isinstance(data, bytes):
            data = bytes(data)
        flags = (wire.PUB_RETAIN if retain else 0) | (wire.PUB_REQUEST if request else 0)
        return wire.encode_pub(self.topic_bytes(topic), data, wire.encode_headers(headers) if headers else b"",
                               reply.encode() if reply else b"", flags, self.max_frame, pub_id)

    def pub_head(self, topic: str, size: int, headers: dict[str, str] | None = None, retain: bool = False,
                 reply: str = "", request: bool = False) -> bytes:
        """A PUB frame up to its payload of ``size`` bytes (which the caller sends after it)."""
        flags = (wire.PUB_RETAIN if retain else 0) | (wire.PUB_REQUEST if request else 0)
        return wire.encode_pub_head(self.topic_bytes(topic), size, wire.encode_headers(headers) if headers else b"",
                                    reply.encode() if reply else b"", flags, self.max_frame)

    def batch(self, messages: Any, waiter: Waiter) -> bytes:
        """CPUB frames for ``messages`` ((topic, data) or (topic, data, headers) items), their
        answers gathered into ``waiter`` (see :class:`BatchConfirms`). The ids are taken from the
        shared counter; call with the client's registration lock held."""
        items = list(messages)
        n = len(items)
        if not n:
            _settle(waiter, [])
            return b""
        first = self.next_id(n)  # n consecutive ids: the broker confirms them as one run
        gather = BatchConfirms(n, waiter)
        parts: list[bytes] = []
        max_frame = self.max_frame
        for k, item in enumerate(items):
            topic, data = item[0], item[1]
            headers = wire.encode_headers(item[2]) if len(item) > 2 and item[2] else b""
            if isinstance(data, str):
                data = data.encode()
            elif not isinstance(data, bytes):
                data = bytes(data)
            tb = self.topic_bytes(topic)
            length = 14 + len(tb) + len(headers) + len(data)
            if max_frame and length > max_frame:
                raise MessageTooLargeError(f"message {k} of the batch: {length} bytes framed exceed the broker's "
                                           f"limit of {max_frame}")
            parts.append(_CPUB_HEAD(length, _CPUB, 0, first + k, len(tb), 0, len(headers)))
            parts.append(tb)
            if headers:
                parts.append(headers)
            parts.append(data)
        confirms = self.confirms
        waiting = [_BatchPart(gather, k) for k in range(n)]
        for k, part in enumerate(waiting):
            confirms[first + k] = part
        lost = self.lost
        if lost is not None:  # lost meanwhile (emptied or not by connection_lost): every part fails
            for k, part in enumerate(waiting):
                confirms.pop(first + k, None)
                if not part.settled:
                    part.set_exception(lost)
        return b"".join(parts)

    def take_acks(self) -> bytes:
        """The pending answers as ACK frames (one per run of answers to the same consumer), and
        forget them. Written before any later frame, so a flush still follows them."""
        acks, self.pending_acks = self.pending_acks, []
        frames = []
        start = 0
        for i in range(1, len(acks) + 1):
            if i == len(acks) or acks[i][0] != acks[start][0]:
                frames.append(wire.encode_ack(acks[start][0], [a[1:] for a in acks[start:i]]))
                start = i
        return b"".join(frames)

    @staticmethod
    def consume_options(queue: str, consumer: str, options: dict[str, Any]) -> dict[str, Any]:
        """The SUB options of a consumer of a topic queue (``None`` values left out)."""
        if not isinstance(queue, str) or not isinstance(consumer, str):
            raise TypeError("queue and consumer must be names (str)")
        out: dict[str, Any] = {"queue": queue, "consumer": consumer}
        for key, given in options.items():
            value = given
            if value is None:
                continue
            if key == "backoff":
                value = [float(v) for v in given]
            elif key == "start" and hasattr(given, "timestamp"):  # a datetime
                value = {"time": given.timestamp()}
            elif key == "start" and isinstance(given, float):
                value = {"time": given}
            out[key] = value
        return out

    def sub(self, sid: int, pattern: str, group: str | None, policy: str | None,
            max_msgs: int | None, max_bytes: int | None, extra: dict[str, Any] | None = None) -> bytes:
        topics.check_pattern(pattern)
        opts: dict[str, Any] = {"pattern": pattern, **(extra or {})}
        if group:
            opts["group"] = group
        if policy:
            if policy not in wire.POLICIES:
                raise ValueError(f"policy must be one of {', '.join(wire.POLICIES)}, not {policy!r}")
            opts["policy"] = policy
        if max_msgs:
            opts["max_msgs"] = max_msgs
        if max_bytes:
            opts["max_bytes"] = max_bytes
        return wire.encode_sub(sid, opts)

    def next_reply_subject(self) -> str:
        return f"{self.inbox}.{next(self.req_ids)}"

    def check(self) -> None:
        """Raise the connection's loss, if it is lost."""
        if self.lost is not None:
            raise self.lost

    def raise_async_error(self) -> None:
        """Raise (once) an error the broker reported about an earlier message, if any.

        Such errors (ERR with ref 0, e.g. the retained store is full) name no call: they go to
        ``error_cb`` if the client has one, else they are raised by the next ``flush()``.
        """
        if self.async_error is not None:
            exc, self.async_error = self.async_error, None
            raise exc

    def register(self, table: dict[Any, Waiter], key: Any, waiter: Waiter) -> None:
        """Add a waiter; if the connection was lost meanwhile, fail it at once.

        ``connection_lost`` sets ``lost`` before it empties the tables, so a waiter added in a
        race either is emptied out with the rest or sees ``lost`` here: none waits forever.
        """
        table[key] = waiter
        if self.lost is not None:
            table.pop(key, None)
            _settle(waiter, exc=self.lost)

    # ---- decoding --------------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Dispatch every complete frame in ``data``. Raises RemoteProtocolError on garbage."""
        self.decoder.feed(data)
        batches: dict[int, list[Entry]] = {}
        try:
            while True:
                frames = self.decoder.frames()
                if not frames:
                    break
                for ftype, flags, got in frames:
                    body = got
                    if type(got) is not bytes:  # a large frame received in place (Decoder.big)
                        if ftype == FrameType.MSG:
                            self._msg_view(flags, cast(memoryview, got), batches)
                            continue
                        body = bytes(got)
                    if ftype == FrameType.MSG:
                        self._msg(flags, body, batches)
                    elif ftype == FrameType.MSGN:
                        self._msgn(body, batches)
                    elif ftype == FrameType.QMSG:
                        self._qmsg(body, batches)
                    else:
                        if batches:
                            self._push(batches)
                        self._control(ftype, flags, body)
        finally:
            if batches:
                self._push(batches)

    def _push(self, batches: dict[int, list[Entry]]) -> None:
        for sid, msgs in batches.items():
            sink = self.sinks.get(sid)
            if sink is not None:
                sink.push_many(msgs)
        batches.clear()

    def _msg_view(self, flags: int, body: memoryview, batches: dict[int, list[Entry]]) -> None:
        """A MSG whose body is a view of the buffer it was received into: its payload is copied
        out once; the rest is read as for any MSG."""
        if len(body) < 20:
            raise RemoteProtocolError("MSG frame too short for its 12-byte prefix and 8-byte block header")
        _, _, tlen, rlen, hlen = _MSG_FIXED.unpack_from(body, 0)
        h1 = 20 + tlen + rlen + hlen
        if h1 > len(body):
            wire.split_block(bytes(body[:20]), 12)  # raises the error that says which length is wrong
        self._msg(flags, bytes(body[:h1]), batches, body[h1:].tobytes())

    def _msg(self, flags: int, body: bytes, batches: dict[int, list[Entry]], payload: bytes | None = None) -> None:
        if len(body) < 20:
            raise RemoteProtocolError("MSG frame too short for its 12-byte prefix and 8-byte block header")
        sid, ref, tlen, rlen, hlen = _MSG_FIXED.unpack_from(body, 0)
        t1 = 20 + tlen
        h0 = t1 + rlen
        h1 = h0 + hlen
        if h1 > len(body):
            wire.split_block(body, 12)  # raises the error that says which length is wrong
        topic = self._topic(body[20:t1], body, 12)
        reply = body[t1:h0].decode(errors="replace") if rlen else ""
        sender = self.senders.get(ref)
        if sender is None:
            raise RemoteProtocolError(f"MSG names sender {ref}, which was never announced")
        headers = wire.decode_headers(body[h0:h1]) if h1 > h0 else {}
        if len(body) >= _LARGE:
            large_message()
        self._hand(sid, [Message(topic, body[h1:] if payload is None else payload, headers, sender, reply or None,
                                 sid, bool(flags & wire.MSG_RETAINED), self.respond)], batches)

    def _hand(self, sid: int, msgs: list[Entry], batches: dict[int, list[Entry]]) -> None:
        """Messages for subscription ``sid`` into this read's batches; sid 0: replies, each to
        the request waiting on its inbox topic."""
        if sid == 0:
            for msg in msgs:
                for reply in _messages(msg):
                    waiter = self.requests.pop(reply.topic, None)
                    if waiter is not None:
                        _settle(waiter, reply)
            return
        batch = batches.get(sid)
        if batch is None:
            batches[sid] = msgs
        else:
            batch += msgs

    def _topic(self, raw: bytes, body: bytes, block_at: int) -> str:
        """The topic whose UTF-8 form is ``raw``, from the message block at ``body[block_at]``:
        decoded and checked once, then remembered (a bounded cache)."""
        topic = self._topic_str.get(raw)
        if topic is None:
            topic = wire.split_block(body, block_at)[0]  # decodes and checks UTF-8
            if len(self._topic_str) >= _TOPIC_CACHE:
                self._topic_str.clear()
            self._topic_str[raw] = topic
        return topic

    def _msgn(self, body: bytes, batches: dict[int, list[Entry]]) -> None:
        """A run: ``count`` messages on one topic from one sender, with the same headers."""
        if len(body) < 24:
            raise RemoteProtocolError("MSGN frame too short for its 16-byte prefix and 8-byte run head")
        sid, ref, count, tlen, rlen, hlen = _MSGN_FIXED.unpack_from(body, 0)
        t1 = 24 + tlen
        pos = t1 + hlen
        end = len(body)
        if rlen or pos > end:
            raise RemoteProtocolError("MSGN run head declares a reply subject, or more bytes than follow")
        topic = self._topic(body[24:t1], body, 16)
        sender = self.senders.get(ref)
        if sender is None:
            raise RemoteProtocolError(f"MSGN names sender {ref}, which was never announced")
        headers = wire.decode_headers(body[t1:pos]) if hlen else None
        payloads = wire.run_payloads(body, pos, end, count)
        self._hand(sid, [(payloads, topic, headers, sender, sid, self.respond)], batches)

    def _qmsg(self, body: bytes, batches: dict[int, list[Entry]]) -> None:
        """A message of a topic-queue consumer: a MSG with its seq, delivery count and time."""
        n = _QMSG_PREFIX.size
        if len(body) < n + 8:
            raise RemoteProtocolError(f"QMSG frame too short for its {n}-byte prefix and 8-byte block header")
        sid, ref, seq, count, time_ns = _QMSG_PREFIX.unpack_from(body, 0)
        topic, reply, h0, h1 = wire.split_block(body, n)
        sender = self.senders.get(ref)
        if sender is None:
            raise RemoteProtocolError(f"QMSG names sender {ref}, which was never announced")
        headers = wire.decode_headers(body[h0:h1]) if h1 > h0 else {}
        msg = QueueMessage(topic, body[h1:], headers, sender, reply or None, sid, seq, count, time_ns, self.answer,
                           self.respond)
        batch = batches.get(sid)
        if batch is None:
            batches[sid] = [msg]
        else:
            batch.append(msg)

    def _control(self, ftype: int, flags: int, body: bytes) -> None:
        if ftype == FrameType.SENDER:
            ref, uid, gid, pid, origin = wire.decode_sender(body)
            self.senders[ref] = Sender(uid, gid, pid, origin)
        elif ftype == FrameType.SENDER_RESET:
            self.senders.clear()
        elif ftype == FrameType.GAP:
            sid, missed = wire.decode_gap(body)
            sink = self.sinks.get(sid)
            if sink is not None:
                sink.gap(missed)
        elif ftype == FrameType.PONG:
            token, _ = wire.split_u32(body)
            waiter = self.pings.pop(token, None)
            if waiter is not None:
                _settle(waiter, None)
        elif ftype == FrameType.OK:
            sid, _ = wire.split_u32(body)
            waiter = self.sub_waiters.pop(sid, None)
            if waiter is not None:
                _settle(waiter, None)
        elif ftype == FrameType.NORESP:
            reply = body.decode(errors="replace")
            waiter = self.requests.pop(reply, None)
            if waiter is not None:
                _settle(waiter, exc=NoRespondersError("no responders: nobody is subscribed to the request topic"))
        elif ftype == FrameType.RESULT:
            call_id, raw = wire.split_u32(body)
            waiter = self.calls.pop(call_id, None)
            if waiter is not None:
                _settle(waiter, wire.decode_json_obj(raw))
        elif ftype == FrameType.STORED:
            first, count, seqs = wire.decode_stored(body)
            confirms = self.confirms
            items = list(seqs.items())
            for k in range(count):
                waiter = confirms.pop(first + k, None)
                if waiter is not None:
                    result = {name: seq + k for name, seq in items} if k else seqs
                    if type(waiter) is _BatchPart:
                        waiter.settled = True
                        waiter.batch._answer(waiter.k, result)
                    else:
                        _settle(waiter, result)
        elif ftype == FrameType.ERR:
            self._error(flags, body)
        elif ftype == FrameType.WELCOME:
            self.welcome = welcome = wire.decode_json_obj(body)
            self.inbox = str(welcome.get("inbox", ""))
            self.max_frame = int(welcome.get("limits", {}).get("max_frame_bytes", self.max_frame))
            features = welcome.get("features")
            self.runs_ok = isinstance(features, list) and wire.FEATURE_RUNS in features
            self.run.limit = min(RUN_MAX_BYTES, self.max_frame + 4)  # a run's frame within the broker's limit
            if self.welcome_waiter is not None:
                _settle(self.welcome_waiter, welcome)

    def _error(self, flags: int, body: bytes) -> None:
        code, ref, message = wire.decode_err(body)
        exc = error_from_code(code, message)
        if flags & wire.ERR_FATAL:
            if code == ErrorCode.SHUTTING_DOWN or isinstance(exc, ConnectionLostError):
                self.connection_lost(exc)
            else:
                lost = ConnectionLostError(f"the broker closed the connection: {message}", code=code)
                lost.__cause__ = exc
                self.connection_lost(lost)
            return
        if code == ErrorCode.RING_ENDED:  # ref is the ring's id: its next wait raises RingClosedError
            ring = self.rings.pop(ref, None)
            if ring is not None:
                ring.closed = exc
        elif ref:
            waiter = self.sub_waiters.pop(ref, None)
            if waiter is not None:
                self.sinks.pop(ref, None)
                _settle(waiter, exc=exc)
                return
            sink = self.sinks.pop(ref, None)
            if sink is not None:  # the broker ended a live subscription
                sink.end(exc)
                return
            waiter = self.calls.pop(ref, None) or self.confirms.pop(ref, None)
            if waiter is not None:
                _settle(waiter, exc=exc)
                return
        if self.on_error is not None:
            self.on_error(exc)
        else:
            self.async_error = exc

    # ---- ending ----------------------------------------------------------------------------------

    def connection_lost(self, exc: HostbusError) -> None:
        """Fail every waiter and end every subscription with ``exc`` (first call wins)."""
        if self.lost is not None:
            return
        self.lost = exc
        waiters: list[Waiter] = [*self.sub_waiters.values(), *self.pings.values(), *self.calls.values(),
                                 *self.requests.values(), *self.confirms.values()]
        if self.welcome_waiter is not None:
            waiters.append(self.welcome_waiter)
        for w in waiters:
            _settle(w, exc=exc)
        self.sub_waiters.clear()
        self.pings.clear()
        self.calls.clear()
        self.requests.clear()
        self.confirms.clear()
        sinks = list(self.sinks.values())
        self.sinks.clear()
        for sink in sinks:
            sink.end(exc)


def _messages(entry: Entry) -> list[Message]:
    """The messages of a queue entry (a run's made now)."""
    if not isinstance(entry, tuple):
        return [entry]
    payloads, topic, headers, sender, sid, respond = entry
    return [Message(topic, data, dict(headers) if headers else {}, sender, None, sid, False, respond)
            for data in payloads]


def as_hostbus_error(exc: BaseException) -> HostbusError:
    if isinstance(exc, HostbusError):
        return exc
    return ConnectionLostError(f"connection to the broker lost: {exc}")


__all__ = ["ClientCore", "HostbusError", "Sink", "SubscriptionState", "Waiter", "as_hostbus_error"]
