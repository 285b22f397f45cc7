"""Topic queues in the running broker: capture, group commit, confirms, consumers, redelivery.

A **topic queue** stores every message published on a topic its ``subjects`` match, in a log
(:class:`~hostbusd.store.segments.SegmentLog` files or :class:`~hostbusd.store.queue.MemoryLog`),
until retention removes it. **Consumers** are named and durable; each connection that consumes a
consumer is a **member**, and members share its messages (a work queue). Bookkeeping per
consumer (ack floor, pending set, redelivery, dead letters) is :class:`~hostbusd.store.queue.Consumer`.

The path of a message:

1. ``capture`` (called by the router for every routed publish whose topic a queue captures)
   checks the queue's limits and duplicate window and buffers the record; nothing is written yet.
2. Once per loop iteration, ``_commit`` appends each queue's buffered records in **one write**.
   Under ``durability = always`` the queue then starts an ``fdatasync`` on a worker thread (the
   loop never blocks on the disk); records that arrive meanwhile are written and wait for the
   next one, so one fsync confirms every message that arrived during the previous
   (**group commit**). Under ``interval`` an fsync is scheduled ``sync_interval_ms`` later;
   under ``never`` the OS writes when it likes.
3. Only then are publishers confirmed (STORED frames), and only then may consumers see the
   records: under ``always`` a consumer never gets a message a crash could take back.

A record stores the sender's identity with the message block as it was published::

    u8 version (1) | u32 uid | u32 gid | u32 pid | u8 origin_len | origin | message block

A write error (disk full, file size limit) refuses the batch it belonged to (its publishers get
STORAGE) and leaves the log as it was; a failed fsync marks the queue broken (after a failed
fsync the kernel may have dropped the pages: only a restart's recovery can say what is on disk)
and every later publish to it is refused until the daemon restarts.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from hostbus import topics, wire
from hostbus.errors import (
    ErrorCode,
    HostbusError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
)
from hostbusd.config import Config, QueueConfig
from hostbusd.core.identity import Identity
from hostbusd.core.index import TopicIndex
from hostbusd.core.session import Session
from hostbusd.store.queue import (
    Consumer,
    ConsumerOptions,
    ConsumerState,
    Delivery,
    Log,
    MemoryLog,
    write_atomic,
)
from hostbusd.store.segments import SegmentLog, StorageError, SyncError

RECORD = struct.Struct("<BIIIB")  # version, uid, gid, pid, origin length
RECORD_VERSION = 1
MSG_ID_HEADER = "Hostbus-Msg-Id"
#: Distinct stored senders whose Identity (and SENDER ref) is remembered for deliveries.
_SENDER_CACHE = 4096
#: Messages handed to each ready member of a consumer at a time (see QueueService._pump).
PUMP_CHUNK = 8
#: Most message ids one queue remembers for its duplicate window.
MAX_DUPLICATE_IDS = 100_000
_QMSG_OVERHEAD = wire.frames.QMSG_HEAD.size
_U32 = wire.frames.U32
_U32_AT = wire.frames.U32.unpack_from  # at offset 4 of a message block: the length of its headers

# Consumer options a client may give, and their checks: (type, lowest value).
_NUMBER_OPTIONS = {"ack_wait": (0.001, 86400.0 * 365), "max_deliver": (0, 1 << 31), "max_inflight": (1, 1 << 20)}


_RECORD_HEADS: dict[Identity, bytes] = {}  # the record head of each recent sender


def encode_record(ident: Identity, block: bytes) -> bytes:
    head = _RECORD_HEADS.get(ident)
    if head is None:
        origin = ident.origin.encode()[:255]
        if len(_RECORD_HEADS) >= _SENDER_CACHE:
            _RECORD_HEADS.clear()
        head = _RECORD_HEADS[ident] = RECORD.pack(RECORD_VERSION, ident.uid, ident.gid, ident.pid,
                                                  len(origin)) + origin
    return head + block


def decode_record(payload: bytes) -> tuple[int, int, int, str, bytes]:
    """(uid, gid, pid, origin, message block) of a stored record."""
    _, uid, gid, pid, olen = RECORD.unpack_from(payload, 0)
    start = RECORD.size + olen
    return uid, gid, pid, payload[RECORD.size:start].decode(errors="replace"), payload[start:]


def record_topic(payload: bytes) -> str:
    olen = payload[RECORD.size - 1]
    block = RECORD.size + olen
    tlen = int.from_bytes(payload[block:block + 2], "little")
    return payload[block + 8:block + 8 + tlen].decode(errors="replace")


def loss_window(spec: QueueConfig) -> str:
    """What a crash may take of what was confirmed, in words (for ``hostbus stats``)."""
    if spec.storage == "memory":
        return "everything at a restart (memory storage)"
    if spec.durability == "always":
        return "none once confirmed"
    if spec.durability == "interval":
        return f"up to {spec.sync_interval_ms} ms"
    return "unbounded until the OS writes (none if only hostbusd crashes)"


class Confirm:
    """A confirmed publish waiting for every queue that captured it."""

    __slots__ = ("error", "pub_id", "ready", "remaining", "seqs", "session")

    def __init__(self, session: Session, pub_id: int, ready: Callable[[Confirm], None] | None = None) -> None:
        self.session = session
        self.pub_id = pub_id
        self.remaining = 0
        self.seqs: dict[str, int] = {}
        self.error: tuple[int, str] | None = None
        self.ready = ready  # takes a stored confirm (coalesced with others into one STORED); None: sent alone

    def stored(self, queue: str, seq: int) -> None:
        self.seqs[queue] = seq
        self._one_done()

    def stored_nowhere(self) -> None:
        """Routing is over: drop the hold taken before it (answers now if no queue captured it,
        or if every queue has answered already)."""
        self._one_done()

    def failed(self, code: int, message: str) -> None:
        if self.error is None:
            self.error = (code, message)
        self._one_done()

    def _one_done(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.send()

    def send(self) -> None:
        session = self.session
        session.confirms -= 1
        if self.error is not None:
            code, message = self.error
            if self.seqs:
                message += f" (stored in {', '.join(sorted(self.seqs))})"
            session.send(wire.encode_err(code, self.pub_id, message, fatal=False))
        elif self.ready is not None and self.seqs:
            self.ready(self)
        else:
            session.send(wire.encode_stored(self.pub_id, 1, self.seqs))


def send_confirms(session: Session, confirms: list[Confirm]) -> None:
    """STORED frames for ``confirms`` (stored, in the order they completed): one frame per run
    of consecutive publish ids that got consecutive seqs in the same queues."""
    run: Confirm | None = None
    count = 0
    first_id = 0
    one: tuple[str, int] | None = None  # the run's (queue, first seq) when it names one queue
    for c in confirms:
        if run is not None and c.pub_id == first_id + count:
            seqs = c.seqs
            if one is not None:
                if len(seqs) == 1 and seqs.get(one[0]) == one[1] + count:
                    count += 1
                    continue
            elif seqs.keys() == run.seqs.keys() and all(seq == run.seqs[n] + count for n, seq in seqs.items()):
                count += 1
                continue
        if run is not None:
            session.send(wire.encode_stored(first_id, count, run.seqs))
        run, count, first_id = c, 1, c.pub_id
        one = next(iter(c.seqs.items())) if len(c.seqs) == 1 else None
    if run is not None:
        session.send(wire.encode_stored(first_id, count, run.seqs))


class Member:
    """One connection consuming a consumer, under its subscription id."""

    __slots__ = ("consumer", "outstanding", "session", "sid")

    def __init__(self, session: Session, sid: int, consumer: QueueConsumer) -> None:
        self.session = session
        self.sid = sid
        self.consumer = consumer
        self.outstanding: set[int] = set()

    @property
    def ready(self) -> bool:
        session = self.session
        return not session.paused and not session.closing


@dataclass(eq=False)  # hashed by identity: kept in sets of consumers to serve
class QueueConsumer:
    name: str
    core: Consumer
    filter: str | None
    start: str
    queue: TopicQueue
    members: list[Member] = field(default_factory=list)
    owner: dict[int, Member] = field(default_factory=dict)  # seq -> member it was last handed to
    turn: int = 0

    def describe(self) -> dict[str, Any]:
        st = self.core.state
        opts = self.core.options
        return {"pending": len(st.pending), "ack_floor": st.ack_floor, "next_seq": st.next_seq,
                "members": len(self.members), "redelivered": self.core.redelivered,
                "dead_lettered": self.core.dead_lettered, "filter": self.filter, "start": self.start,
                "ack_wait": opts.ack_wait, "max_deliver": opts.max_deliver, "backoff": list(opts.backoff),
                "max_inflight": opts.max_inflight}


class TopicQueue:
    def __init__(self, spec: QueueConfig, log: Log, directory: Path | None) -> None:
        self.plain_limit = -1  # largest block capture_plain may take for it (-1: none; set with spec)
        self.spec = spec
        self.log = log
        self.dir = directory
        self.consumers: dict[str, QueueConsumer] = {}
        self.buffer: list[bytes] = []  # records captured this loop iteration
        self.buffer_bytes = 0
        self.buffer_confirms: list[tuple[int, Confirm | None, Session | None]] = []  # (index, confirm, origin)
        self.awaiting: list[tuple[int, list[Confirm]]] = []  # written, waiting for an fsync: (last seq, confirms)
        self.syncing = False
        self.sync_timer: Any = None  # the loop's handle of the next interval fsync
        self.visible = log.last_seq  # consumers may be handed records up to here (durable enough)
        self.broken: str | None = None
        self.state_dirty = False
        self.stored = 0
        self.refused: dict[str, int] = {}
        self.duplicates = 0
        self.dedup: dict[str, tuple[int, int]] = {}  # message id -> (seq, time_ns) of a stored message
        self.dedup_buffer: dict[str, int] = {}  # message id -> index in ``buffer`` (this loop iteration)
        self.dedup_order: deque[tuple[int, str]] = deque()  # (time_ns, id), oldest first
        self.dup_waiting: list[tuple[int, Confirm]] = []  # duplicates of a record not yet durable
        self.deleted = False

    @property
    def spec(self) -> QueueConfig:
        return self._spec

    @spec.setter
    def spec(self, spec: QueueConfig) -> None:
        self._spec = spec
        # A block no larger than max_msg_size has a payload no larger; discard = new needs its check.
        self.plain_limit = spec.max_msg_size if spec.discard == "old" else -1

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def file(self) -> bool:
        return self.spec.storage == "file"

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "name": spec.name, "subjects": list(spec.subjects), "storage": spec.storage,
            "durability": spec.durability if spec.storage == "file" else "memory",
            "loss_window": loss_window(spec),
            "messages": len(self.log), "bytes": self.log.nbytes,
            "first_seq": self.log.first_seq, "last_seq": self.log.last_seq,
            "stored": self.stored, "duplicates": self.duplicates, "refused": dict(self.refused),
            "consumers": {name: c.describe() for name, c in self.consumers.items()},
            "pending": sum(len(c.core.state.pending) for c in self.consumers.values()),
            "redelivered": sum(c.core.redelivered for c in self.consumers.values()),
            "dead_lettered": sum(c.core.dead_lettered for c in self.consumers.values()),
            "broken": self.broken,
            "config": spec.model_dump(),
        }


class Scheduler(Protocol):
    """What the queues need of the event loop (the broker's loop; a test may drive it by hand)."""

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Any: ...

    def fdatasync(self, fd: int, done: Callable[[BaseException | None], None]) -> None:
        """``fdatasync(fd)`` and close ``fd`` off the loop; then ``done(error)`` on the loop."""


class QueueService:
    """Every topic queue of the daemon. Runs on the broker's loop; fsyncs off it."""

    def __init__(self, hub: Any, loop: Scheduler, state_dir: Path | None, log: Any = None) -> None:
        self.hub = hub
        self.loop = loop
        self.dir = state_dir / "queues" if state_dir is not None else None
        self.log = log
        self.queues: dict[str, TopicQueue] = {}
        self.index: TopicIndex[TopicQueue] = TopicIndex()
        self._match_cache: dict[str, tuple[TopicQueue, ...]] = {}
        self._commit_scheduled = False
        self._dirty: set[QueueConsumer] = set()
        self._pump_scheduled = False
        self._senders: dict[tuple[int, int, int, str], Identity] = {}
        self._confirmed: dict[Session, list[Confirm]] = {}  # stored this loop iteration, not yet told
        self._last_save = time.monotonic()
        self.stopped = False

    @property
    def config(self) -> Config:
        return self.hub.config  # type: ignore[no-any-return]

    def _event(self, level: str, event: str, **fields: Any) -> None:
        if self.log is not None:
            getattr(self.log, level)(event, **fields)

    # ---- start, declare, delete ---------------------------------------------------------------

    def start(self) -> None:
        """Open the queues stored under the state directory, then those of the configuration."""
        if self.dir is not None and self.dir.is_dir():
            for qdir in sorted(self.dir.iterdir()):
                if not (qdir / "queue.json").exists():
                    continue
                try:
                    spec = QueueConfig.model_validate(json.loads((qdir / "queue.json").read_bytes()))
                    self._open(spec)
                except (OSError, ValueError, ValidationError, StorageError) as exc:
                    self._event("error", "queue_unreadable", queue=qdir.name, error=str(exc)[:500])
        self.apply_config(self.config)

    def apply_config(self, config: Config) -> None:
        """Declare the queues of the configuration (new ones created, existing ones given the
        configured properties; a queue's storage cannot change)."""
        for spec in config.queues:
            try:
                self.declare(spec, replace=True)
            except HostbusError as exc:
                self._event("error", "queue_not_declared", queue=spec.name, error=str(exc))

    def declare(self, spec: QueueConfig, replace: bool = False) -> TopicQueue:
        """Create a queue, or (``replace``) give an existing one new properties."""
        q = self.queues.get(spec.name)
        if q is not None:
            if q.spec == spec:
                return q
            if not replace:
                raise HostbusError(f"queue {spec.name!r} already exists with other properties: delete it first, "
                                   "or declare it with the same ones", code=ErrorCode.DUPLICATE_ID)
            if q.spec.storage != spec.storage:
                raise HostbusError(f"queue {spec.name!r} exists with storage {q.spec.storage}; storage cannot "
                                   "change (delete the queue to change it)", code=ErrorCode.INVALID_ARGUMENT)
            self._unindex(q)
            q.spec = spec
            self._index(q)
            try:
                self._persist_spec(q)
            except OSError as exc:  # in force now; a restart would bring back the old properties
                self._event("error", "queue_spec_not_saved", queue=spec.name, error=exc.strerror)
            self._retain(q)
            return q
        if len(self.queues) >= self.config.store.max_queues:
            raise LimitExceededError(f"the daemon already holds {len(self.queues)} queues, the limit "
                                     "(store.max_queues)", code=ErrorCode.LIMIT)
        try:
            q = self._open(spec)
        except (OSError, StorageError) as exc:
            raise HostbusError(f"cannot create queue {spec.name!r}: {exc}", code=ErrorCode.STORAGE) from None
        try:
            self._persist_spec(q)
        except OSError as exc:
            self.delete(spec.name)
            raise HostbusError(f"cannot create queue {spec.name!r}: {exc.strerror or exc}",
                               code=ErrorCode.STORAGE) from None
        self._event("info", "queue_declared", queue=spec.name, subjects=spec.subjects, storage=spec.storage,
                    durability=spec.durability)
        return q

    def _open(self, spec: QueueConfig) -> TopicQueue:
        qdir = self.dir / spec.name if self.dir is not None else None
        states: list[dict[str, Any]] = []
        floor = 1
        if spec.storage == "file" and qdir is not None:
            saved = _load_json(qdir / "state.json")
            floor = int(saved.get("floor", 1)) if isinstance(saved, dict) else 1
            states = saved.get("consumers", []) if isinstance(saved, dict) else []
            log: Log = SegmentLog.open(qdir, self.config.store.segment_bytes, floor)
            rec = log.recovery  # type: ignore[attr-defined]
            if rec.files:
                self._event("warning", "queue_recovered", queue=spec.name, discarded_bytes=rec.discarded_bytes,
                            files={name: {"bytes": b, "records": n} for name, (b, n) in rec.files.items()})
        else:
            if qdir is not None:
                qdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            log = MemoryLog()
        q = TopicQueue(spec, log, qdir)
        q.visible = log.last_seq
        for obj in states:
            try:
                self._restore_consumer(q, obj)
            except (KeyError, TypeError, ValueError) as exc:
                self._event("error", "consumer_unreadable", queue=spec.name, error=str(exc)[:200])
        self._rebuild_dedup(q)
        self.queues[spec.name] = q
        self._index(q)
        self._retain(q)
        return q

    def _restore_consumer(self, q: TopicQueue, obj: dict[str, Any]) -> None:
        state = ConsumerState.load(obj["state"])
        last = q.log.last_seq
        # What the log lost in a crash (durability never/interval) was never stored: forget it.
        state.ack_floor = min(state.ack_floor, last)
        state.next_seq = min(state.next_seq, last + 1)
        state.pending = {s: p for s, p in state.pending.items() if s <= last}
        state.done_above_floor = {s for s in state.done_above_floor if s <= last}
        now = time.monotonic()
        for p in state.pending.values():  # deadlines of a past process: due again now
            p.due = now
        opts = obj.get("options", {})
        options = ConsumerOptions(float(opts.get("ack_wait", 30.0)), int(opts.get("max_deliver", 5)),
                                  tuple(float(b) for b in opts.get("backoff", ())),
                                  int(opts.get("max_inflight", 1000)))
        self._add_consumer(q, state, options, obj.get("filter"), str(obj.get("start", "all")))

    def _add_consumer(self, q: TopicQueue, state: ConsumerState, options: ConsumerOptions,
                      filter_: str | None, start: str) -> QueueConsumer:
        accept = None
        if filter_ is not None:
            flt = filter_

            def accept(payload: bytes) -> bool:
                return topics.matches(flt, record_topic(payload))

        core = Consumer(state, options, q.log, lambda seq, payload, count, reason: None, accept=accept)
        c = QueueConsumer(state.name, core, filter_, start, q)
        core.dead_letter = lambda seq, payload, count, reason: self._dead_letter(q, seq, payload, count, reason)
        q.consumers[state.name] = c
        return c

    def delete(self, name: str) -> None:
        q = self._get(name)
        for c in list(q.consumers.values()):
            for m in list(c.members):
                self._end_member(m, ErrorCode.NOT_FOUND, f"queue {name!r} was deleted")
        self._unindex(q)
        del self.queues[name]
        q.deleted = True
        for c in q.consumers.values():
            self._dirty.discard(c)
        q.consumers.clear()  # each consumer points back at its queue
        for _, confirm, _ in q.buffer_confirms:
            if confirm is not None:
                confirm.failed(ErrorCode.NOT_FOUND, f"queue {name!r} was deleted before the message was stored")
        q.buffer, q.buffer_confirms = [], []
        if q.sync_timer is not None:
            q.sync_timer.cancel()
        with contextlib.suppress(OSError, StorageError):  # being deleted: a failed last sync is moot
            q.log.close()
        if q.dir is not None:
            shutil.rmtree(q.dir, ignore_errors=True)
        self._event("info", "queue_deleted", queue=name)

    def delete_consumer(self, name: str, consumer: object) -> None:
        """Forget a consumer of a queue: its position and pending set; its members are ended
        (NOT_FOUND). Under retention = acked, what it alone still held back may go."""
        q = self._get(name)
        c = q.consumers.get(consumer) if isinstance(consumer, str) else None
        if c is None:
            raise NotFoundError(f"queue {name!r} has no consumer named {str(consumer)[:64]!r}",
                                code=ErrorCode.NOT_FOUND)
        for m in list(c.members):
            self._end_member(m, ErrorCode.NOT_FOUND, f"consumer {c.name!r} of queue {name!r} was deleted")
        del q.consumers[c.name]
        self._dirty.discard(c)
        q.state_dirty = True
        self._retain(q)
        self._save(q)

    def purge(self, name: str) -> int:
        q = self._get(name)
        self._commit_queue(q)  # what was captured before the purge is purged too
        try:
            n = q.log.drop_below(q.log.last_seq + 1)
        except SyncError as exc:
            self._broken(q, str(exc), [])
            raise HostbusError(f"cannot purge queue {name!r}: {exc}", code=ErrorCode.STORAGE) from None
        except (OSError, StorageError) as exc:
            raise HostbusError(f"cannot purge queue {name!r}: {exc}", code=ErrorCode.STORAGE) from None
        for c in q.consumers.values():
            st = c.core.state
            st.pending.clear()
            st.done_above_floor.clear()
            st.ack_floor = max(st.ack_floor, q.log.last_seq)
            st.next_seq = max(st.next_seq, q.log.last_seq + 1)
            c.owner.clear()
            for m in c.members:
                m.outstanding.clear()
        q.state_dirty = True
        self._save(q)
        return n

    def _get(self, name: object) -> TopicQueue:
        q = self.queues.get(name) if isinstance(name, str) else None
        if q is None:
            raise NotFoundError(f"no queue named {str(name)[:64]!r}", code=ErrorCode.NOT_FOUND)
        return q

    def _index(self, q: TopicQueue) -> None:
        for p in q.spec.subjects:
            self.index.add(p, q)
        self._match_cache.clear()

    def _unindex(self, q: TopicQueue) -> None:
        for p in q.spec.subjects:
            self.index.remove(p, q)
        self._match_cache.clear()

    def _persist_spec(self, q: TopicQueue) -> None:
        if q.dir is not None:
            q.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(q.dir / "queue.json", json.dumps(q.spec.model_dump(), indent=1).encode())

    # ---- capture and commit -------------------------------------------------------------------

    def confirm_ready(self, confirm: Confirm) -> None:
        """A confirmed publish is stored: told at the end of this loop iteration, with the others
        of its connection, in as few STORED frames as runs of ids allow."""
        waiting = self._confirmed.get(confirm.session)
        if waiting is None:
            if not self._confirmed:
                self.loop.call_soon(self._send_confirms)
            self._confirmed[confirm.session] = [confirm]
        else:
            waiting.append(confirm)

    def _send_confirms(self) -> None:
        confirmed, self._confirmed = self._confirmed, {}
        for session, confirms in confirmed.items():
            send_confirms(session, confirms)

    def capturing(self, topic: str) -> tuple[TopicQueue, ...]:
        got = self._match_cache.get(topic)
        if got is None:
            got = tuple(dict.fromkeys(self.index.match(topic)))  # one entry per queue
            if len(self._match_cache) >= 65536:
                self._match_cache.clear()
            self._match_cache[topic] = got
        return got

    def capture_plain(self, topic: str, session: Session, block: bytes, pub_id: int) -> bool:
        """A confirmed publish without headers that every capturing queue takes as it is (no
        limit to check before the write, not broken): buffered with its Confirm; False (and
        nothing done) otherwise. The general path is :meth:`capture`."""
        capturing = self._match_cache.get(topic)
        if capturing is None:
            capturing = self.capturing(topic)
        if not capturing:
            return False
        size = len(block)
        for q in capturing:
            if q.plain_limit < size or q.broken is not None:
                return False
        confirm = Confirm(session, pub_id, self.confirm_ready)
        confirm.remaining = len(capturing)
        session.confirms += 1
        ident = session.ident
        head = _RECORD_HEADS.get(ident)
        record = head + block if head is not None else encode_record(ident, block)
        for q in capturing:
            q.buffer_confirms.append((len(q.buffer), confirm, session))
            q.buffer.append(record)
            q.buffer_bytes += len(record)
        if not self._commit_scheduled:
            self._commit_scheduled = True
            self.loop.call_soon(self._commit)
        return True

    def capture(self, queues: tuple[TopicQueue, ...], ident: Identity, block: bytes, payload_len: int,
                origin: Session | None, confirm: Confirm | None) -> None:
        """Buffer a routed message for each queue that captures it (stored at the end of this
        loop iteration). ``confirm`` collects the answer to a confirmed publish."""
        record = b""
        buffered = False
        for q in queues:
            spec = q.spec
            refused = None if (q.broken is None and payload_len <= spec.max_msg_size and spec.discard == "old") \
                else self._refuse(q, block, payload_len)
            if refused is not None:
                code, kind, message = refused
                q.refused[kind] = q.refused.get(kind, 0) + 1
                if confirm is not None:
                    confirm.remaining += 1
                    confirm.failed(code, message)
                elif origin is not None:
                    origin.send(wire.encode_err(code, 0, message, fatal=False))
                continue
            if spec.duplicate_window and _U32_AT(block, 4)[0] and (dup := self._duplicate(q, block)) is not None:
                q.duplicates += 1
                if confirm is not None:
                    confirm.remaining += 1
                    if dup < 0:  # the first is in this very batch: answered with it
                        q.buffer_confirms.append((-dup - 1, confirm, None))
                    elif dup <= q.visible:
                        confirm.stored(q.name, dup)
                    else:  # stored, not yet durable: answered when it is
                        confirm.seqs[q.name] = dup
                        q.dup_waiting.append((dup, confirm))
                continue
            if not record:
                record = encode_record(ident, block)
            if confirm is not None:
                confirm.remaining += 1
            q.buffer_confirms.append((len(q.buffer), confirm, origin))
            q.buffer.append(record)
            q.buffer_bytes += len(record)
            buffered = True
        if buffered and not self._commit_scheduled:
            self._commit_scheduled = True
            self.loop.call_soon(self._commit)

    def _refuse(self, q: TopicQueue, block: bytes, payload_len: int) -> tuple[int, str, str] | None:
        spec = q.spec
        if q.broken is not None:
            return ErrorCode.STORAGE, "broken", f"queue {q.name!r} cannot store messages: {q.broken}"
        if payload_len > spec.max_msg_size:
            return (ErrorCode.LIMIT, "too_large", f"message of {payload_len} bytes exceeds the max_msg_size of "
                    f"queue {q.name!r} ({spec.max_msg_size})")
        if spec.discard == "new":
            n = len(q.log) + len(q.buffer)
            size = q.log.nbytes + q.buffer_bytes + len(block)
            if n >= spec.max_msgs or size > spec.max_bytes:
                return (ErrorCode.QUEUE_FULL, "full", f"queue {q.name!r} is full ({n} messages, {size - len(block)} "
                        f"bytes; max_msgs {spec.max_msgs}, max_bytes {spec.max_bytes}, discard new)")
        return None

    def _duplicate(self, q: TopicQueue, block: bytes) -> int | None:
        """The seq of an earlier message with this block's message id (``-(index + 1)`` for
        one still in this iteration's buffer), or None; a new id is remembered."""
        view = wire.split_block(block)
        if view.headers_end == view.headers_start:
            return None
        msg_id = wire.decode_headers(block[view.headers_start:view.headers_end]).get(MSG_ID_HEADER)
        if not msg_id:
            return None
        index = q.dedup_buffer.get(msg_id)
        if index is not None:
            return -index - 1
        self._expire_dedup(q)
        stored = q.dedup.get(msg_id)
        if stored is not None:
            return stored[0]
        q.dedup_buffer[msg_id] = len(q.buffer)  # the record about to be buffered
        return None

    def _remember(self, q: TopicQueue, msg_id: str, seq: int, t: int) -> None:
        if len(q.dedup) >= MAX_DUPLICATE_IDS:
            self._forget_oldest(q)
        q.dedup[msg_id] = (seq, t)
        q.dedup_order.append((t, msg_id))

    @staticmethod
    def _forget_oldest(q: TopicQueue) -> None:
        t, old = q.dedup_order.popleft()
        entry = q.dedup.get(old)
        if entry is not None and entry[1] == t:  # not an id remembered again since
            del q.dedup[old]

    def _expire_dedup(self, q: TopicQueue) -> None:
        horizon = time.time_ns() - int(q.spec.duplicate_window * 1e9)
        order = q.dedup_order
        while order and order[0][0] < horizon:
            self._forget_oldest(q)

    def _rebuild_dedup(self, q: TopicQueue) -> None:
        """After a restart: the ids of the messages stored within the window."""
        if not q.spec.duplicate_window or not len(q.log):
            return
        start = q.log.seq_at_time(time.time_ns() - int(q.spec.duplicate_window * 1e9))
        for seq, t, payload in q.log.read(start, MAX_DUPLICATE_IDS):
            block = decode_record(payload)[4]
            view = wire.split_block(block)
            if view.headers_end > view.headers_start:
                msg_id = wire.decode_headers(block[view.headers_start:view.headers_end]).get(MSG_ID_HEADER)
                if msg_id:
                    self._remember(q, msg_id, seq, t)

    def _commit(self) -> None:
        self._commit_scheduled = False
        for q in list(self.queues.values()):
            if q.buffer:
                self._commit_queue(q)

    def _commit_queue(self, q: TopicQueue) -> None:
        records, entries, ids = q.buffer, q.buffer_confirms, q.dedup_buffer
        q.buffer, q.buffer_confirms, q.buffer_bytes, q.dedup_buffer = [], [], 0, {}
        if not records and not entries:
            return
        try:
            seqs = q.log.append(records) if records else []
        except SyncError as exc:  # the log cannot be trusted any more
            self._broken(q, str(exc), [c for _, c, _ in entries if c is not None])
            return
        except StorageError as exc:
            message = f"queue {q.name!r} could not store the message: {exc}"
            q.refused["storage"] = q.refused.get("storage", 0) + len(records)
            self._event("error", "queue_write_failed", queue=q.name, error=str(exc), messages=len(records))
            told: set[int] = set()
            for _, confirm, origin in entries:
                if confirm is not None:
                    confirm.failed(ErrorCode.STORAGE, message)
                elif origin is not None and id(origin) not in told:
                    told.add(id(origin))
                    origin.send(wire.encode_err(ErrorCode.STORAGE, 0, message, fatal=False))
            return
        q.stored += len(seqs)
        if ids:
            now = time.time_ns()
            for msg_id, index in ids.items():
                self._remember(q, msg_id, seqs[index], now)
        confirms: list[Confirm] = []
        for index, confirm, _ in entries:
            if confirm is not None:
                confirm.seqs[q.name] = seqs[index]
                confirms.append(confirm)
        if q.file and q.spec.durability == "always":
            q.awaiting.append((q.log.last_seq, confirms))
            self._sync(q)
        else:
            self._durable(q, q.log.last_seq, confirms)
            if q.file and q.spec.durability == "interval" and q.sync_timer is None:
                q.sync_timer = self.loop.call_later(q.spec.sync_interval_ms / 1000, self._interval_sync, q)
        self._retain(q)

    def _durable(self, q: TopicQueue, upto: int, confirms: list[Confirm]) -> None:
        q.visible = max(q.visible, upto)
        for confirm in confirms:  # their seqs are set: one answer less to wait for (Confirm.stored)
            confirm.remaining -= 1
            if confirm.remaining == 0:
                confirm.send()
        if q.dup_waiting:
            ready = [c for seq, c in q.dup_waiting if seq <= q.visible]
            q.dup_waiting = [(seq, c) for seq, c in q.dup_waiting if seq > q.visible]
            for confirm in ready:
                confirm.stored(q.name, confirm.seqs[q.name])
        for c in q.consumers.values():
            if c.members:
                self._mark(c)

    def _sync(self, q: TopicQueue) -> None:
        """Start the next group commit of ``q`` if none is running."""
        if q.syncing or not q.awaiting:
            return
        batch, q.awaiting = q.awaiting, []
        upto = batch[-1][0]
        confirms = [c for _, cs in batch for c in cs]
        fd = q.log.sync_handle()
        if fd < 0:  # synced already (a segment was closed meanwhile)
            self._durable(q, upto, confirms)
            return
        q.syncing = True
        self.loop.fdatasync(fd, lambda exc: self._synced(q, upto, confirms, exc))

    def _synced(self, q: TopicQueue, upto: int, confirms: list[Confirm], exc: BaseException | None) -> None:
        q.syncing = False
        if exc is not None:
            self._broken(q, f"fsync failed: {exc}", confirms)
            return
        self._durable(q, upto, confirms)
        self._sync(q)

    def _interval_sync(self, q: TopicQueue) -> None:
        q.sync_timer = None
        if q.deleted or q.syncing:
            return
        fd = q.log.sync_handle()
        if fd < 0:
            return
        q.syncing = True

        def done(exc: BaseException | None) -> None:
            q.syncing = False
            if exc is not None:
                self._broken(q, f"fsync failed: {exc}", [])
            elif q.awaiting:  # became durability = always (a reload) while this fsync ran
                self._sync(q)
            elif q.log.dirty and q.sync_timer is None and not q.deleted:  # type: ignore[attr-defined]
                q.sync_timer = self.loop.call_later(q.spec.sync_interval_ms / 1000, self._interval_sync, q)

        self.loop.fdatasync(fd, done)

    def _broken(self, q: TopicQueue, why: str, confirms: list[Confirm]) -> None:
        q.broken = why
        self._event("error", "queue_broken", queue=q.name, error=why)
        waiting = [*confirms, *(c for _, cs in q.awaiting for c in cs), *(c for _, c in q.dup_waiting)]
        q.awaiting, q.dup_waiting = [], []
        for confirm in waiting:
            confirm.failed(ErrorCode.STORAGE, f"queue {q.name!r} could not store the message: {why}")

    def _retain(self, q: TopicQueue) -> None:
        """Apply the queue's limits (discard old; age) and, under retention = acked, remove what
        every consumer has acknowledged."""
        spec = q.spec
        below = None
        if spec.retention == "acked" and q.consumers:
            below = min(c.core.state.ack_floor for c in q.consumers.values()) + 1
        before = q.log.first_seq
        age = int(spec.max_age * 1e9) if spec.max_age else None
        try:
            if spec.discard == "old":
                q.log.trim(max_msgs=spec.max_msgs, max_bytes=spec.max_bytes, max_age_ns=age, below_seq=below)
            else:
                q.log.trim(max_age_ns=age, below_seq=below)
        except SyncError as exc:
            self._broken(q, str(exc), [])
        except (OSError, StorageError) as exc:  # the records stay readers' until the next pass
            self._event("error", "queue_retention_failed", queue=q.name, error=str(exc))
        if q.log.first_seq != before:
            q.state_dirty = True

    # ---- dead letters -------------------------------------------------------------------------

    def _dead_letter(self, q: TopicQueue, seq: int, payload: bytes, count: int, reason: str) -> None:
        uid, gid, pid, origin, block = decode_record(payload)
        view = wire.split_block(block)
        why = {"Hostbus-Dead-Reason": reason, "Hostbus-Deliveries": str(count), "Hostbus-Queue": q.name,
               "Hostbus-Seq": str(seq), "Hostbus-Topic": view.topic}
        headers = wire.decode_headers(block[view.headers_start:view.headers_end]) if view.headers_end > \
            view.headers_start else {}
        try:
            encoded = wire.encode_headers({**headers, **why})
        except HostbusError:  # the original headers leave no room for ours: ours win, theirs are dropped
            encoded = wire.encode_headers({**why, "Hostbus-Dead-Truncated": "headers"})
        topic = q.spec.dead_letter_topic
        new = wire.message_block(topic.encode(), block[view.headers_end:], encoded)
        try:
            self.hub.router.publish(self._sender(uid, gid, pid, origin), topic, new, 0, "",
                                    len(block) - view.headers_end)
        except HostbusError as exc:  # the message counts as done for the consumer all the same
            self._event("error", "dead_letter_failed", queue=q.name, seq=seq, error=str(exc))

    def _sender(self, uid: int, gid: int, pid: int, origin: str) -> Identity:
        key = (uid, gid, pid, origin)
        ident = self._senders.get(key)
        if ident is None:
            if len(self._senders) >= _SENDER_CACHE:
                self._senders.clear()
            ident = self._senders[key] = self.hub.identity(uid, gid, pid, origin)
        return ident

    # ---- consumers ----------------------------------------------------------------------------

    def consume(self, session: Session, sid: int, obj: dict[str, Any]) -> Member:
        """A connection starts consuming (SUB with ``queue`` and ``consumer``)."""
        q = self._get(obj.get("queue"))
        name = obj.get("consumer")
        if not isinstance(name, str) or not _valid_name(name):
            raise HostbusError("consume: 'consumer' must be a name of letters, digits, '_' and '-' (at most 64)",
                               code=ErrorCode.INVALID_ARGUMENT)
        filter_ = obj.get("filter")
        if filter_ is not None:
            problem = topics.pattern_problem(filter_) if isinstance(filter_, str) else "must be a string"
            if problem is not None:
                raise HostbusError(f"consume: 'filter' is not a pattern: {problem}", code=ErrorCode.INVALID_TOPIC)
        self._check_consume(session, q, filter_)
        account = session.account
        limit = self.config.limits.max_consumers_per_uid
        if account is not None and account.consumers >= limit:
            raise LimitExceededError(f"uid {account.uid} already consumes {account.consumers} times, the limit "
                                     "(limits.max_consumers_per_uid)", code=ErrorCode.LIMIT)
        options = _consumer_options(obj)
        c = q.consumers.get(name)
        if c is None:
            if len(q.consumers) >= self.config.store.max_consumers_per_queue:
                raise LimitExceededError(f"queue {q.name!r} already has {len(q.consumers)} consumers, the limit "
                                         "(store.max_consumers_per_queue)", code=ErrorCode.LIMIT)
            start = obj.get("start", "all")
            first = self._start_seq(q, start)
            state = ConsumerState(name, ack_floor=first - 1, next_seq=first)
            c = self._add_consumer(q, state, ConsumerOptions(**options), filter_, str(start))
            q.state_dirty = True
            self._save(q)
        else:
            if filter_ != c.filter:
                raise HostbusError(f"consumer {name!r} of queue {q.name!r} has filter {c.filter!r}; a member cannot "
                                   f"change it to {filter_!r} (use another consumer name)",
                                   code=ErrorCode.INVALID_ARGUMENT)
            if options:
                opts = c.core.options
                c.core.options = ConsumerOptions(**{"ack_wait": opts.ack_wait, "max_deliver": opts.max_deliver,
                                                    "backoff": opts.backoff, "max_inflight": opts.max_inflight,
                                                    **options})
                q.state_dirty = True
        member = Member(session, sid, c)
        c.members.append(member)
        session.members[sid] = member
        if account is not None:
            account.consumers += 1
        self._mark(c)
        return member

    def _check_consume(self, session: Session, q: TopicQueue, filter_: str | None) -> None:
        access = session.access
        if access is None:
            return
        for pattern in [filter_] if filter_ is not None else q.spec.subjects:
            verdict, decision = access.subscribe(pattern)
            if verdict != "allow":
                raise PermissionDeniedError(
                    f"may not consume queue {q.name!r}: subscribing to {topics.show(pattern)} is "
                    f"{'refused' if verdict == 'deny' else 'allowed only for some of its topics'} "
                    f"({decision.rule})", code=ErrorCode.PERMISSION_DENIED)

    def check_manage(self, session: Session, subjects: list[str], what: str) -> None:
        access = session.access
        if access is None:
            return
        for pattern in subjects:
            verdict, decision = access.policy.decide_pattern(access.names, "manage", pattern)
            if verdict != "allow":
                raise PermissionDeniedError(f"may not {what}: managing queues on {topics.show(pattern)} is "
                                            f"not allowed ({decision.rule})", code=ErrorCode.PERMISSION_DENIED)

    def may_see(self, session: Session, q: TopicQueue) -> bool:
        access = session.access
        if access is None:
            return True
        subjects = q.spec.subjects  # what it may consume, or manage: the same test as doing it
        return (all(access.subscribe(p)[0] == "allow" for p in subjects)
                or all(access.policy.decide_pattern(access.names, "manage", p)[0] == "allow" for p in subjects))

    @staticmethod
    def _start_seq(q: TopicQueue, start: object) -> int:
        log = q.log
        if start == "all":
            return log.first_seq
        if start == "new":
            return log.last_seq + 1
        if start == "last":
            return max(log.first_seq, log.last_seq)
        if isinstance(start, int) and not isinstance(start, bool) and start >= 1:
            return max(start, log.first_seq)
        when = start.get("time") if isinstance(start, dict) else None
        if isinstance(when, (int, float)) and not isinstance(when, bool) and math.isfinite(when) and \
                0 <= when < 1e11:  # Unix seconds, up to the year 5138
            return log.seq_at_time(int(when * 1e9))
        raise HostbusError("consume: 'start' must be 'all', 'new', 'last', a sequence number (>= 1) or "
                           "{\"time\": unix seconds}", code=ErrorCode.INVALID_ARGUMENT)

    def leave(self, member: Member) -> None:
        """A member stops (UNSUB, its connection closed): what it held is due again now."""
        c = member.consumer
        if member not in c.members:
            return
        c.members.remove(member)
        member.session.members.pop(member.sid, None)
        if member.session.account is not None:
            member.session.account.consumers -= 1
        for seq in member.outstanding:
            if c.owner.get(seq) is member:
                c.core.due_now(seq)
                del c.owner[seq]
        member.outstanding.clear()
        self._mark(c)

    def _end_member(self, member: Member, code: int, message: str) -> None:
        self.leave(member)
        member.session.send(wire.encode_err(code, member.sid, message, fatal=False))

    def resumed(self, session: Session) -> None:
        """The session's connection takes output again: its consumers may hand it more."""
        for member in session.members.values():
            self._mark(member.consumer)

    def session_closed(self, session: Session) -> None:
        for member in list(session.members.values()):
            self.leave(member)

    def recheck(self, session: Session) -> None:
        """New access rules: members that may no longer consume are ended."""
        for member in list(session.members.values()):
            c = member.consumer
            try:
                self._check_consume(session, c.queue, c.filter)
            except PermissionDeniedError as exc:
                self._end_member(member, ErrorCode.PERMISSION_DENIED, f"consumer ended by new access rules: {exc}")

    def answer(self, session: Session, sid: int, items: list[tuple[int, int, int]]) -> None:
        """ACK frame items (kind, seq, delay_ms) for the member ``sid`` of ``session``."""
        member = session.members.get(sid)
        if member is None:
            return  # ended meanwhile (unsubscribed, queue deleted): the answer has nowhere to go
        c = member.consumer
        core = c.core
        for kind, seq, delay_ms in items:
            if kind in (wire.frames.ACK_ACK, wire.frames.ACK_TERM):
                if core.ack(seq):
                    self._release(c, seq)
            elif kind == wire.frames.ACK_NAK:
                if core.nak(seq, delay_ms / 1000 if delay_ms != 0xFFFFFFFF else None):
                    self._release(c, seq)
            elif kind == wire.frames.ACK_PROGRESS:
                core.in_progress(seq)
        if c.queue.spec.retention == "acked":
            self._retain(c.queue)
        self._mark(c)

    @staticmethod
    def _release(c: QueueConsumer, seq: int) -> None:
        m = c.owner.pop(seq, None)
        if m is not None:
            m.outstanding.discard(seq)

    # ---- delivery ---------------------------------------------------------------------------

    def _mark(self, c: QueueConsumer) -> None:
        self._dirty.add(c)
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self.loop.call_soon(self._pump_all)

    def _pump_all(self) -> None:
        self._pump_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for c in dirty:
            if self._pump(c):
                self._mark(c)  # more to hand out: next iteration, after other peers had their turn

    def _pump(self, c: QueueConsumer) -> bool:
        """Hand out what the consumer may, in small chunks to the members that can take more;
        True if there may be more to hand out (after other peers had their turn).

        A chunk is at most PUMP_CHUNK messages per ready member, and a turn at most
        ``store.deliver_batch`` messages and four write batches of bytes, so a member whose
        connection fills up (pauses) is given little more than its transport holds."""
        q = c.queue
        if q.deleted:
            return False
        cfg = self.config
        limit = cfg.store.deliver_batch
        byte_budget = 4 * cfg.limits.write_batch_bytes
        handed = nbytes = 0
        while handed < limit and nbytes < byte_budget:
            ready = [m for m in c.members if m.ready]
            if not ready:
                return False
            try:
                got = c.core.take(min(limit - handed, PUMP_CHUNK * len(ready)), upto=q.visible)
            except (OSError, StorageError) as exc:  # the file changed under us, or the disk fails
                if q.broken is None:
                    self._broken(q, f"cannot read: {exc}", [])
                return False
            for seq in c.core.finished:  # dead-lettered or removed: no member holds them any more
                self._release(c, seq)
            c.core.finished.clear()
            if not got:
                return c.core.more
            q.state_dirty = True
            n = len(ready)
            for i, d in enumerate(got):
                self._deliver(ready[(c.turn + i) % n], d)
                nbytes += len(d.payload)
            c.turn = (c.turn + len(got)) % n
            handed += len(got)
        return True

    def _deliver(self, m: Member, d: Delivery) -> None:
        c = m.consumer
        old = c.owner.get(d.seq)
        if old is not None:
            old.outstanding.discard(d.seq)
        c.owner[d.seq] = m
        m.outstanding.add(d.seq)
        uid, gid, pid, origin, block = decode_record(d.payload)
        m.session.deliver_stored(m.sid, self._sender(uid, gid, pid, origin), d.seq, d.count, d.time_ns, block)

    # ---- housekeeping -------------------------------------------------------------------------

    def tick(self) -> None:
        """Every housekeeping pass: redeliveries that came due, members that can take more again,
        age retention, and consumer positions saved every ``store.state_interval``."""
        now = time.monotonic()
        for q in self.queues.values():
            if q.spec.max_age:
                self._retain(q)
            for c in q.consumers.values():
                if not c.members:
                    continue
                due = c.core.next_due()
                if c.core.state.next_seq <= q.visible or (due is not None and due <= now):
                    self._mark(c)
        if now - self._last_save >= self.config.store.state_interval:
            self._last_save = now
            for q in self.queues.values():
                if q.state_dirty:
                    self._save(q)

    def _save(self, q: TopicQueue) -> None:
        q.state_dirty = False
        if q.dir is None or not q.file:
            return
        obj = {"floor": q.log.first_seq, "consumers": [
            {"state": c.core.state.dump(), "filter": c.filter, "start": c.start,
             "options": {"ack_wait": c.core.options.ack_wait, "max_deliver": c.core.options.max_deliver,
                         "backoff": list(c.core.options.backoff), "max_inflight": c.core.options.max_inflight}}
            for c in q.consumers.values()]}
        try:
            write_atomic(q.dir / "state.json", json.dumps(obj, separators=(",", ":")).encode())
        except OSError as exc:
            q.state_dirty = True
            self._event("error", "queue_state_not_saved", queue=q.name, error=exc.strerror)

    def commit_now(self) -> None:
        """Store what was captured so far (at shutdown, before the connections are closed, so
        the publishers still get their confirms)."""
        self._commit()

    @property
    def busy(self) -> bool:
        """Records are captured but not stored, or stored and waiting for an fsync."""
        return any(q.buffer or q.awaiting or q.syncing for q in self.queues.values())

    def stop(self) -> None:
        """Store what was captured, make it durable, save every consumer's position, close."""
        if self.stopped:
            return
        self.stopped = True
        for q in list(self.queues.values()):
            try:
                self._commit_queue(q)
                if q.file and q.broken is None:
                    q.log.sync()  # type: ignore[attr-defined]
                    for _, confirms in q.awaiting:
                        self._durable(q, q.log.last_seq, confirms)
                    q.awaiting = []
            except StorageError as exc:
                self._event("error", "queue_not_synced", queue=q.name, error=str(exc))
            if q.sync_timer is not None:
                q.sync_timer.cancel()
            self._save(q)
            try:
                q.log.close()
            except (OSError, StorageError) as exc:  # the others are still closed and saved
                self._event("error", "queue_not_closed", queue=q.name, error=str(exc))

    def stats(self, viewer: Session | None = None) -> dict[str, Any]:
        return {name: q.describe() for name, q in sorted(self.queues.items())
                if viewer is None or self.may_see(viewer, q)}


def _consumer_options(obj: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (lo, hi) in _NUMBER_OPTIONS.items():
        if key in obj:
            v = obj[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi or (
                    key != "ack_wait" and not isinstance(v, int)):
                raise HostbusError(f"consume: {key!r} must be a number from {lo} to {hi}",
                                   code=ErrorCode.INVALID_ARGUMENT)
            out[key] = v
    if "backoff" in obj:
        b = obj["backoff"]
        if not isinstance(b, list) or len(b) > 64 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 86400 for x in b):
            raise HostbusError("consume: 'backoff' must be a list of at most 64 delays in seconds (0 to 86400)",
                               code=ErrorCode.INVALID_ARGUMENT)
        out["backoff"] = tuple(float(x) for x in b)
    return out


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= 64 and all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in name)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}


__all__ = ["Confirm", "Member", "QueueService", "TopicQueue", "decode_record", "encode_record", "loss_window"]
