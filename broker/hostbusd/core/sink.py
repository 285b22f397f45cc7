"""LineSession: a subscriber that receives text lines instead of frames (the FIFO sinks).

It reuses the session's bounded queues and overflow policy; only the encoding differs. A line is
``TOPIC SP PAYLOAD \\n`` (newlines and carriage returns inside the payload written as ``\\n`` and
``\\r``, so one message stays one line) or one JSON object per line with ``topic``, ``data``
(text), ``headers`` and ``sender``.
"""

from __future__ import annotations

import json

from hostbus import wire
from hostbusd.core.identity import Identity
from hostbusd.core.session import Session, Subscription


def format_line(fmt: str, ident: Identity, block: bytes) -> bytes:
    topic, _, h0, h1 = wire.split_block(block)
    payload = block[h1:]
    if fmt == "lines":
        return topic.encode() + b" " + payload.replace(b"\r", b"\\r").replace(b"\n", b"\\n") + b"\n"
    sender: dict[str, object] = {"uid": ident.uid, "gid": ident.gid, "pid": ident.pid}
    if ident.origin:
        sender["origin"] = ident.origin
    obj = {
        "topic": topic,
        "data": payload.decode(errors="replace"),
        "headers": wire.decode_headers(block[h0:h1]) if h1 > h0 else {},
        "sender": sender,
    }
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class RecordSession(Session):
    """A subscriber inside the daemon whose transport takes one record per message, not frames.

    It reuses the session's bounded queues and overflow policy; a subclass says what a record is.
    It may subscribe overlapping patterns and still gets each message once: the router hands one
    message to every matching subscription within one publish, and every publish routes a new
    block object, so a block that is the one handed to this session just before is a repeat.
    Drops are counted in ``dropped`` (there is no GAP frame for a file or a ZeroMQ peer).
    """

    __slots__ = ("_last", "_last_sub")

    def __init__(self, ident: Identity, *, batch_bytes: int, max_queued_bytes: int) -> None:
        super().__init__(ident, batch_bytes=batch_bytes, max_queued_bytes=max_queued_bytes)
        self._last: bytes | None = None
        self._last_sub: Subscription | None = None

    def record(self, ident: Identity, block: bytes) -> bytes:
        raise NotImplementedError

    def deliver(self, sub: Subscription, ident: Identity, block: bytes, flags: int = 0, count: int = 0) -> None:
        # One record per message however many of this session's patterns match it: the router
        # hands a message to each matching subscription in a row, so the same block for another
        # subscription right after is the same message (the same block for the same
        # subscription is a new one: the empty messages of a run share one block object).
        if block is self._last and sub is not self._last_sub:
            return
        self._last = block
        self._last_sub = sub
        super().deliver(sub, ident, block, flags, count)

    def _emit_gap(self, sub: Subscription) -> None:
        sub.queue.missed = 0  # no GAP frame in a file or to ZeroMQ: the drops are counted in ``dropped``

    def _write_msg(self, sub: Subscription, ident: Identity, block: bytes, flags: int) -> None:
        sub.queue.missed = 0
        rec = self.record(ident, block)
        self.out.append(rec)
        self.out_bytes += len(rec)
        self.msgs_out += 1

    def discard_output(self) -> int:
        """Drop everything written or queued for the reader; returns the messages dropped."""
        n = len(self.out)
        self.out = []
        self.out_bytes = 0
        for sub in self.subs.values():
            n += len(sub.queue)
            self.drop_subscription(sub)
        return n


class LineSession(RecordSession):
    """A FIFO sink: one text line per message."""

    __slots__ = ("format",)

    def __init__(self, ident: Identity, fmt: str, *, batch_bytes: int, max_queued_bytes: int) -> None:
        super().__init__(ident, batch_bytes=batch_bytes, max_queued_bytes=max_queued_bytes)
        self.format = fmt

    def record(self, ident: Identity, block: bytes) -> bytes:
        return format_line(self.format, ident, block)


class BlockSession(RecordSession):
    """The ZeroMQ gateway: the message block itself (the gateway makes the ZeroMQ frames).

    All its subscriptions share one queue (one order for all patterns): dropping one pattern
    keeps the queue for the others, and only the last one clears it.
    """

    __slots__ = ()

    def drop_subscription(self, sub: Subscription) -> None:
        others = len(self.subs) - (sub.sid in self.subs)
        if others:
            self._leave_backlog(sub)
        else:
            super().drop_subscription(sub)

    def record(self, ident: Identity, block: bytes) -> bytes:
        return block
