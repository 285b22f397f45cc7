"""A topic queue's bookkeeping: stored messages, consumers, acknowledgements, redelivery, dead letters.

Pure logic over a log (:class:`~hostbusd.store.segments.SegmentLog` on disk, or
:class:`MemoryLog` with the same interface) and an injected clock: no sockets, no event loop.
The broker will call it as messages arrive and as consumers ask and acknowledge.

A message is identified by its sequence number in the log. A consumer has an **ack floor**
(every seq at or below it is done), a **pending** set (delivered, not yet acknowledged: with its
delivery count and the time it is due again) and a **next** seq to hand out. The consumer's
state is small and is stored next to the log (:meth:`ConsumerState.dump`/``load``) so a
restart neither loses nor re-floods.

Per message: ``ack`` (done), ``nak(delay)`` (deliver again after ``delay``, or the backoff),
``term`` (done, never again), ``in_progress`` (push the deadline out by ``ack_wait``). A
message whose deadline passes is delivered again; one that has been delivered ``max_deliver``
times is handed to the dead-letter callback instead (with the reason and the count) and counts
as done.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Log(Protocol):
    @property
    def first_seq(self) -> int: ...

    @property
    def last_seq(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def __len__(self) -> int: ...

    def append(self, payloads: list[bytes], now_ns: int | None = None) -> list[int]: ...

    def read(self, start: int = 1, limit: int | None = None, stop: int | None = None,
             ) -> Iterator[tuple[int, int, bytes]]: ...

    def seq_at_time(self, time_ns: int) -> int: ...

    def trim(self, *, max_msgs: int | None = None, max_bytes: int | None = None, max_age_ns: int | None = None,
             below_seq: int | None = None, now_ns: int | None = None) -> int: ...

    def drop_below(self, seq: int) -> int: ...

    def next_held(self, seq: int) -> int: ...

    def sync_handle(self) -> int: ...

    def close(self) -> None: ...


class MemoryLog:
    """The in-memory log: the same interface as the segment files, nothing survives a restart."""

    def __init__(self) -> None:
        self._records: dict[int, tuple[int, bytes]] = {}
        self._first = 1
        self._next = 1
        self._bytes = 0

    @property
    def first_seq(self) -> int:
        return self._first

    @property
    def last_seq(self) -> int:
        return self._next - 1

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return self._next - self._first

    def append(self, payloads: list[bytes], now_ns: int | None = None) -> list[int]:
        t = time.time_ns() if now_ns is None else now_ns
        seqs = []
        for p in payloads:
            self._records[self._next] = (t, p)
            self._bytes += len(p)
            seqs.append(self._next)
            self._next += 1
        return seqs

    def read(self, start: int = 1, limit: int | None = None, stop: int | None = None,
             ) -> Iterator[tuple[int, int, bytes]]:
        first = max(start, self._first)
        end = self._next if stop is None else min(self._next, stop)
        if limit is not None:
            end = min(end, first + limit)
        for seq in range(first, end):
            rec = self._records.get(seq)
            if rec is None:  # removed while a reader was between records
                continue
            yield seq, rec[0], rec[1]

    def seq_at_time(self, time_ns: int) -> int:
        for seq in range(self._first, self._next):
            if self._records[seq][0] >= time_ns:
                return seq
        return self._next

    def trim(self, *, max_msgs: int | None = None, max_bytes: int | None = None, max_age_ns: int | None = None,
             below_seq: int | None = None, now_ns: int | None = None) -> int:
        """Forget the oldest records while a limit is exceeded; returns how many."""
        now = time.time_ns() if now_ns is None else now_ns
        floor = self._first
        if max_msgs is not None:
            floor = max(floor, self._next - max_msgs)
        if below_seq is not None:
            floor = max(floor, below_seq)
        if max_age_ns is not None:
            floor = max(floor, self.seq_at_time(now - max_age_ns))
        n = self.drop_below(floor)
        if max_bytes is not None:
            while self._bytes > max_bytes and self._first < self._next:
                n += self.drop_below(self._first + 1)
        return n

    def drop_below(self, seq: int) -> int:
        n = 0
        while self._first < min(seq, self._next):
            rec = self._records.pop(self._first, None)
            if rec is not None:
                self._bytes -= len(rec[1])
            self._first += 1
            n += 1
        return n

    def next_held(self, seq: int) -> int:
        return min(max(seq, self._first), self._next)

    def sync_handle(self) -> int:
        return -1  # nothing to make durable

    def close(self) -> None:
        pass


#: Records a consumer's filter may pass over in one take() (then it says ``more``).
SCAN_LIMIT = 4096


@dataclass
class ConsumerOptions:
    ack_wait: float = 30.0  # seconds a delivery may stay unacknowledged
    max_deliver: int = 5  # deliveries before the message goes to the dead letters (0: no limit)
    backoff: tuple[float, ...] = ()  # delays of the 1st, 2nd ... redelivery (then the last one)
    max_inflight: int = 1000  # unacknowledged deliveries outstanding


@dataclass
class Pending:
    count: int  # deliveries so far
    due: float  # when it is delivered again unless acknowledged


@dataclass
class ConsumerState:
    """What a restart must keep of a consumer: where it is, and what it has not acknowledged."""

    name: str
    ack_floor: int = 0
    next_seq: int = 1
    pending: dict[int, Pending] = field(default_factory=dict)
    done_above_floor: set[int] = field(default_factory=set)  # acked out of order

    def dump(self) -> dict[str, Any]:
        return {"name": self.name, "ack_floor": self.ack_floor, "next_seq": self.next_seq,
                "pending": {str(s): [p.count, p.due] for s, p in self.pending.items()},
                "done": sorted(self.done_above_floor)}

    @classmethod
    def load(cls, obj: dict[str, Any]) -> ConsumerState:
        return cls(str(obj["name"]), int(obj["ack_floor"]), int(obj["next_seq"]),
                   {int(s): Pending(int(c), float(d)) for s, (c, d) in obj.get("pending", {}).items()},
                   {int(s) for s in obj.get("done", [])})


@dataclass
class Delivery:
    seq: int
    count: int  # 1 for the first delivery
    time_ns: int  # when it was stored
    payload: bytes


DeadLetter = Callable[[int, bytes, int, str], None]  # seq, payload, deliveries, reason


class Consumer:
    def __init__(self, state: ConsumerState, options: ConsumerOptions, log: Log, dead_letter: DeadLetter,
                 clock: Callable[[], float] = time.monotonic, accept: Callable[[bytes], bool] | None = None) -> None:
        self.state = state
        self.options = options
        self.log = log
        self.dead_letter = dead_letter
        self.clock = clock
        self.accept = accept  # a filter: records it refuses are passed over (done for this consumer)
        self.redelivered = 0
        self.dead_lettered = 0
        self.more = False  # take() stopped at SCAN_LIMIT: call it again
        self.finished: list[int] = []  # pending seqs take() ended without a delivery (for the caller's books)
        # No pending delivery is due before this (a lower bound: acknowledgements only raise the
        # true minimum). Lets take() skip the scan of the pending set until something is due.
        self.due_floor = min((p.due for p in state.pending.values()), default=float("inf"))

    # ---- handing out --------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """No pending delivery is due before this (None: nothing pending)."""
        return self.due_floor if self.state.pending else None

    def due_now(self, seq: int) -> None:
        """Make the pending ``seq`` due at once (its member went away)."""
        p = self.state.pending.get(seq)
        if p is not None:
            p.due = now = self.clock()
            self.due_floor = min(self.due_floor, now)

    def take(self, n: int, upto: int | None = None) -> list[Delivery]:
        """Up to ``n`` deliveries: those due again first (oldest first), then new messages up to
        seq ``upto`` (what may be handed out yet: what is durable), never more than
        ``max_inflight`` unacknowledged at once."""
        st = self.state
        now = self.clock()
        out: list[Delivery] = []
        due: list[int] = []
        if st.pending and self.due_floor <= now:
            due = sorted(seq for seq, p in st.pending.items() if p.due <= now)
            self.due_floor = min((p.due for p in st.pending.values() if p.due > now), default=float("inf"))
        for seq in due:
            if len(out) >= n:
                self.due_floor = now  # the rest are still due: the next take looks again
                break
            p = st.pending[seq]
            stored = self._payload(seq)
            if stored is None:  # removed by retention meanwhile
                self._done(seq)
                self.finished.append(seq)
                continue
            if self.options.max_deliver and p.count >= self.options.max_deliver:
                self._done(seq)
                self.finished.append(seq)
                self.dead_lettered += 1
                self.dead_letter(seq, stored[1], p.count, "max_deliver")
                continue
            p.count += 1
            p.due = now + self._wait(p.count)
            self.due_floor = min(self.due_floor, p.due)
            self.redelivered += 1
            out.append(Delivery(seq, p.count, stored[0], stored[1]))
        room = min(n - len(out), self.options.max_inflight - len(st.pending))  # pending: all outstanding
        stop = None if upto is None else upto + 1
        accept = self.accept
        scan = SCAN_LIMIT  # records a filter may pass over in one call: the loop serves others meanwhile
        self.more = False
        deadline = now + self._wait(1)  # of every first delivery in this call
        if room > 0:
            self.due_floor = min(self.due_floor, deadline)
        while room > 0:
            start = max(st.next_seq, self.log.first_seq)
            got = 0
            if scan <= 0:
                self.more = True
                break
            for seq, t, payload in self.log.read(start, min(room, scan) if accept is not None else room, stop):
                got += 1
                scan -= 1
                st.next_seq = seq + 1
                if accept is not None and not accept(payload):
                    self._done(seq, pending=False)
                    continue
                st.pending[seq] = Pending(1, deadline)
                out.append(Delivery(seq, 1, t, payload))
                room -= 1
            if not got or accept is None:
                break
            st.next_seq = max(st.next_seq, start)
        return out

    def _wait(self, count: int) -> float:
        """How long after its ``count``-th delivery a message comes again unless answered:
        ``ack_wait``, plus the backoff of the next delivery (``backoff[count - 1]``, the last
        one repeated)."""
        backoff = self.options.backoff
        if backoff:
            return self.options.ack_wait + backoff[min(count - 1, len(backoff) - 1)]
        return self.options.ack_wait

    def _payload(self, seq: int) -> tuple[int, bytes] | None:
        for s, t, p in self.log.read(seq, 1):
            return (t, p) if s == seq else None
        return None

    # ---- answers from the consumer -------------------------------------------------------------

    def ack(self, seq: int) -> bool:
        """Done with ``seq``; False if it was not pending (already done, or never delivered)."""
        if seq not in self.state.pending:
            return False
        self._done(seq)
        return True

    def term(self, seq: int) -> bool:
        """Never deliver ``seq`` again (counts as done)."""
        return self.ack(seq)

    def nak(self, seq: int, delay: float | None = None) -> bool:
        """Deliver ``seq`` again after ``delay`` seconds (default: at once, or the backoff)."""
        p = self.state.pending.get(seq)
        if p is None:
            return False
        if delay is None:
            backoff = self.options.backoff
            delay = backoff[min(p.count - 1, len(backoff) - 1)] if backoff else 0.0
        p.due = self.clock() + delay
        self.due_floor = min(self.due_floor, p.due)
        return True

    def in_progress(self, seq: int) -> bool:
        """Still working on ``seq``: its deadline moves ``ack_wait`` from now."""
        p = self.state.pending.get(seq)
        if p is None:
            return False
        p.due = self.clock() + self.options.ack_wait
        return True

    def disconnected(self) -> None:
        """Its connection went away: every unacknowledged delivery is due again now (for
        another member of the consumer, or for it when it comes back)."""
        now = self.clock()
        for p in self.state.pending.values():
            p.due = now
        self.due_floor = now

    def _done(self, seq: int, pending: bool = True) -> None:
        st = self.state
        if pending:
            st.pending.pop(seq, None)
        st.done_above_floor.add(seq)
        self._advance_floor()

    def _advance_floor(self) -> None:
        """Move the ack floor over what is done, and over what the log no longer holds (removed
        by retention, lost in a gap a recovery left): nothing to wait for there."""
        st = self.state
        while True:
            nxt = st.ack_floor + 1
            if nxt in st.done_above_floor:
                st.ack_floor = nxt
                st.done_above_floor.discard(nxt)
                continue
            if nxt < st.next_seq and nxt not in st.pending:
                held = self.log.next_held(nxt)
                if held > nxt:
                    st.ack_floor = min(held, st.next_seq) - 1
                    st.done_above_floor = {s for s in st.done_above_floor if s > st.ack_floor}
                    continue
            return


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (a temporary file, fsync, rename,
    fsync of the directory): after a crash it holds the old bytes or the new, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save_state(path: Path, states: list[ConsumerState]) -> None:
    """Write consumer states atomically."""
    write_atomic(path, json.dumps([s.dump() for s in states], separators=(",", ":")).encode())


def load_state(path: Path) -> list[ConsumerState]:
    try:
        return [ConsumerState.load(o) for o in json.loads(path.read_bytes())]
    except FileNotFoundError:
        return []
