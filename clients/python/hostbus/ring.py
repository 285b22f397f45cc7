"""Shared-memory rings: the slot layout both ends use (no I/O here).

A ring is one segment of ``slots`` slots of ``slot_size`` bytes, taken in order 0, 1, 2, ...
and around; the producer and the consumer each count slots on their own, and the two POSIX
semaphores ``free`` and ``filled`` are the only thing they share besides the bytes: the
producer waits on ``free``, writes slot ``n % slots``, posts ``filled``; the consumer waits on
``filled``, reads that slot, posts ``free``.

Slot: an 8-byte head ``u8 kind, u8 reserved, u16 records, u32 used`` then ``used`` bytes.

* ``BATCH``: ``records`` whole records, one after the other (many small messages, one post);
* ``FIRST``, ``MIDDLE``, ``LAST``: one record larger than a slot, cut in consecutive slots;
  ``FIRST`` starts with the record's ``u32`` total length. A record whose ``LAST`` slot never
  comes (its producer died) is dropped, never delivered in part.

Record in a publish ring (client -> broker): ``u32 block_len, u8 flags`` (PUB flags: retain),
then a message block as in a PUB frame. Record in a deliver ring (broker -> client):
``u32 block_len, u8 flags, u32 sid, u32 uid, u32 gid, u32 pid, u16 origin_len``, the origin,
then the message block as in a MSG frame. A deliver record with flag ``GAP_FLAG`` carries no
message: its ``uid`` field is the number of messages the subscription missed (as a GAP frame).

A record with flag ``RUN_FLAG`` (and no other) carries a run instead of a message block: many
messages on one topic, laid out as the body of a PUBN frame (docs/protocol.md, section 22).
A publisher gathers consecutive plain messages on one topic into one run record of its open
slot; the broker forwards runs to deliver rings as run records too.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any

SLOT_HEAD = struct.Struct("<BBHI")
BATCH, FIRST, MIDDLE, LAST = 1, 2, 3, 4
TOTAL = struct.Struct("<I")
PUB_RECORD = struct.Struct("<IB")
DELIVER_RECORD = struct.Struct("<IBIIIIH")
#: Flag of a deliver record that is a GAP: no message, ``uid`` holds how many were dropped.
GAP_FLAG = 0x80
#: Flag of a record whose block is a run (a PUBN body) rather than one message block.
RUN_FLAG = 0x40

#: Smallest slot: room for the head and a small message.
MIN_SLOT_SIZE = 256


class RingFormatError(ValueError):
    """A slot or record that does not follow the layout (a broken or hostile producer)."""


def slot_capacity(slot_size: int) -> int:
    return slot_size - SLOT_HEAD.size


class SlotReader:
    """Turns slots, in ring order, back into records; checks every length it is given."""

    __slots__ = ("cap", "max_record", "part", "total")

    def __init__(self, slot_size: int, max_record: int) -> None:
        self.cap = slot_capacity(slot_size)
        self.max_record = max_record
        self.part: bytearray | None = None
        self.total = 0

    def feed(self, slot: bytes, fixed: struct.Struct) -> Iterator[bytes]:
        """Records completed by ``slot`` (a copy of the slot's bytes, head included).

        ``fixed`` is the record's fixed part, whose first field is the block length.
        Raises RingFormatError on anything inconsistent.
        """
        if len(slot) < SLOT_HEAD.size:
            raise RingFormatError("slot shorter than its head")
        kind, _, count, used = SLOT_HEAD.unpack_from(slot, 0)
        if used > self.cap or SLOT_HEAD.size + used > len(slot):
            raise RingFormatError(f"slot declares {used} bytes, more than its {self.cap}")
        body = slot[SLOT_HEAD.size:SLOT_HEAD.size + used]
        if kind == BATCH:
            if self.part is not None:
                raise RingFormatError("a batch slot came inside a message cut across slots")
            pos = 0
            for _ in range(count):
                if pos + fixed.size > used:
                    raise RingFormatError("record head past the end of the slot")
                end = pos + fixed.size + fixed.unpack_from(body, pos)[0] + self._extra(body, pos, fixed)
                if end > used:
                    raise RingFormatError("record past the end of the slot")
                yield body[pos:end]
                pos = end
            if pos != used:
                raise RingFormatError(f"slot holds {used - pos} bytes after its {count} records")
        elif kind == FIRST:
            if self.part is not None or used < TOTAL.size:
                raise RingFormatError("misplaced or empty first slot of a message")
            total = TOTAL.unpack_from(body, 0)[0]
            if total > self.max_record:
                raise RingFormatError(f"message of {total} bytes exceeds the limit of {self.max_record}")
            self.total = total
            self.part = bytearray(body[TOTAL.size:])
        elif kind in (MIDDLE, LAST):
            part = self.part
            if part is None:
                raise RingFormatError("continuation slot without a first slot")
            part += body
            if len(part) > self.total:
                raise RingFormatError("message longer than its first slot said")
            if kind == LAST:
                self.part = None
                if len(part) != self.total:
                    raise RingFormatError("message shorter than its first slot said")
                if len(part) < fixed.size:
                    raise RingFormatError("message shorter than a record's head")
                end = fixed.size + fixed.unpack_from(part, 0)[0] + self._extra(part, 0, fixed)
                if end != len(part):
                    raise RingFormatError("record length does not match the message")
                yield bytes(part)
        else:
            raise RingFormatError(f"unknown slot kind {kind}")

    @staticmethod
    def _extra(buf: bytes | bytearray, pos: int, fixed: struct.Struct) -> int:
        """Bytes between the fixed part and the block (a deliver record's origin)."""
        if fixed is DELIVER_RECORD:
            return int(DELIVER_RECORD.unpack_from(buf, pos)[6])
        return 0


class SlotWriter:
    """Writes records straight into the slots of a ring's mapping (no intermediate buffer).

    Small records go into the open slot one after the other; a record that does not fit opens
    the next slot. A record larger than a slot is cut into FIRST/MIDDLE/LAST slots, written as
    free slots come (:meth:`start_span`, then :meth:`write_span`), so it may be larger than the
    whole ring. The caller owns the semaphores: a slot is opened or written only with a free
    one in hand, and every finished slot is posted on ``filled``.
    """

    __slots__ = ("cap", "count", "mm", "next", "opened", "pos", "size", "slots", "span", "span_pos", "start")

    def __init__(self, mm: Any, slots: int, slot_size: int) -> None:
        self.mm = mm
        self.slots = slots
        self.size = slot_size
        self.cap = slot_capacity(slot_size)
        self.next = 0  # slots finished so far
        self.opened = False
        self.start = 0  # offset of the open slot
        self.pos = 0  # where the next record goes in it
        self.count = 0
        self.span: memoryview | None = None  # a large record being cut into slots
        self.span_pos = 0

    def fits(self, n: int) -> bool:
        """A record of ``n`` bytes fits in the open slot."""
        return self.opened and self.pos + n <= self.start + SLOT_HEAD.size + self.cap and self.count < 0xFFFF

    def add(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write one record of at most a slot's capacity: into the open slot if it fits (see
        :meth:`fits`), else into a new slot (the caller finished the open one and holds a free
        slot for this one)."""
        if not self.fits(sum(len(p) for p in parts)):
            self._open()
        mm = self.mm
        pos = self.pos
        for p in parts:
            mm[pos:pos + len(p)] = p
            pos += len(p)
        self.pos = pos
        self.count += 1

    def finish(self) -> bool:
        """Close the open slot (write its head); True if there was one (the caller posts it)."""
        if not self.opened:
            return False
        SLOT_HEAD.pack_into(self.mm, self.start, BATCH, 0, self.count, self.pos - self.start - SLOT_HEAD.size)
        self.opened = False
        self.next += 1
        return True

    def start_span(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Begin a record larger than a slot (the open slot must be finished first)."""
        data = b"".join((TOTAL.pack(sum(len(p) for p in parts)), *parts))
        self.span = memoryview(data)
        self.span_pos = 0

    def write_span(self, free: int) -> int:
        """Write up to ``free`` slots of the record being cut; returns how many (to post)."""
        span = self.span
        if span is None:
            return 0
        written = 0
        cap = self.cap
        mm = self.mm
        while written < free and self.span_pos < len(span):
            chunk = span[self.span_pos:self.span_pos + cap]
            kind = FIRST if self.span_pos == 0 else LAST if self.span_pos + cap >= len(span) else MIDDLE
            off = (self.next % self.slots) * self.size
            SLOT_HEAD.pack_into(mm, off, kind, 0, 0, len(chunk))
            mm[off + SLOT_HEAD.size:off + SLOT_HEAD.size + len(chunk)] = chunk
            self.span_pos += len(chunk)
            self.next += 1
            written += 1
        if self.span_pos >= len(span):
            self.span = None
        return written

    def _open(self) -> None:
        self.start = (self.next % self.slots) * self.size
        self.pos = self.start + SLOT_HEAD.size
        self.count = 0
        self.opened = True
