"""Session: one connected peer as the core sees it -- identity, subscriptions and output.

The router hands messages to :meth:`Session.deliver`; the session turns them into MSG frames in
``out``, a list of byte strings that its transport writes in one call at the end of the loop
iteration (or as soon as ``out`` holds ``batch_bytes``). While the transport has asked us to pause
writing, messages wait in each subscription's bounded :class:`OutboundQueue` instead, and are
moved to ``out`` round-robin across subscriptions when writing resumes. So a subscriber that stops
reading costs at most its queue bounds plus one write batch, and never slows a publisher.

The session never touches a transport: it calls its :class:`Egress` to say "there is output"
and "close me".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from hostbus import wire
from hostbus.errors import ErrorCode
from hostbusd.core.acl import Access, Principals
from hostbusd.core.identity import Identity
from hostbusd.core.outbound import OutboundQueue, Overflow

#: Distinct senders a subscriber's connection remembers before the broker sends SENDER_RESET.
MAX_KNOWN_SENDERS = 4096

_msg_header = wire.msg_header
_MSG_OVERHEAD = wire.HEADER_SIZE + wire.frames.MSG_PREFIX.size  # MSG frame bytes before the block
_msgn_header = wire.msgn_header
_MSGN_OVERHEAD = wire.frames.MSGN_HEAD.size  # MSGN frame bytes before the run
_SENDER_RESET = wire.frame(wire.FrameType.SENDER_RESET)
_qmsg_head = wire.frames.QMSG_HEAD.pack
_QMSG = int(wire.FrameType.QMSG)
_QMSG_OVERHEAD = wire.frames.QMSG_HEAD.size
_QMSG_LEN = 2 + wire.frames.QMSG_PREFIX.size  # the length field: type, flags, prefix, then the block


class Egress(Protocol):
    """What a session needs from its transport."""

    def wake(self, urgent: bool) -> None:
        """Output is waiting: write it at the end of this loop iteration, or now if ``urgent``."""

    def close(self) -> None:
        """Write what is in ``out`` (it ends with the reason) and close the connection."""


class _NullEgress:
    def wake(self, urgent: bool) -> None:
        pass

    def close(self) -> None:
        pass


NULL_EGRESS = _NullEgress()  # for a session whose transport is gone


class Account:
    """What one uid holds across its connections, and its limits (``limits.*_per_uid``)."""

    __slots__ = ("connections", "consumers", "queued_bytes", "rings", "subscriptions", "uid", "written_bytes")

    def __init__(self, uid: int) -> None:
        self.uid = uid
        self.connections = 0
        self.subscriptions = 0
        self.queued_bytes = 0  # in subscription queues
        self.written_bytes = 0  # handed to transports that have not sent them yet
        self.rings = 0  # shared-memory rings
        self.consumers = 0  # topic-queue consumers attached (one per consuming subscription)

    @property
    def idle(self) -> bool:
        return not (self.connections or self.subscriptions or self.queued_bytes or self.written_bytes or self.rings
                    or self.consumers)


class Subscription:
    """A pattern subscribed by one session under a subscription id (``sid``).

    ``acl`` is set when the peer may receive only some of the pattern's topics: each message
    is then checked (:meth:`Access.may_receive`) before it is handed over.
    """

    __slots__ = ("acl", "group", "in_backlog", "pattern", "queue", "session", "sid")

    def __init__(
        self, session: Session, sid: int, pattern: str, group: str | None, queue: OutboundQueue
    ) -> None:
        self.session = session
        self.sid = sid
        self.pattern = pattern
        self.group = group
        self.queue = queue
        self.in_backlog = False
        self.acl: Access | None = None

    def __repr__(self) -> str:
        return f"<Subscription {self.sid} {self.pattern!r} group={self.group!r} of {self.session.ident.ref}>"


class Session:
    __slots__ = (
        "access",
        "account",
        "account_max_queued",
        "backlog",
        "batch_bytes",
        "bytes_in",
        "bytes_out",
        "closing",
        "confirms",
        "dropped",
        "egress",
        "flush_pending",
        "ident",
        "inbox",
        "inbox_prefix",
        "inbox_token",
        "known",
        "max_queued_bytes",
        "members",
        "msgs_in",
        "msgs_out",
        "name",
        "on_fail",
        "out",
        "out_bytes",
        "paused",
        "principals",
        "queued_bytes",
        "ring_sids",
        "rings",
        "subs",
        "takes_runs",
    )

    def __init__(self, ident: Identity, *, batch_bytes: int, max_queued_bytes: int) -> None:
        self.ident = ident
        self.name = ""
        self.access: Access | None = None  # None: every action is allowed (no rules apply)
        self.principals: Principals | None = None
        self.account: Account | None = None  # None for the daemon's own subscribers
        self.account_max_queued = 0
        self.rings: dict[int, Any] = {}  # ring id -> the connection's shared-memory rings (net.ring.Ring)
        self.ring_sids: dict[int, Any] = {}  # sid -> the deliver ring a subscription delivers through
        self.members: dict[int, Any] = {}  # sid -> the topic-queue consumer it consumes (core.queues.Member)
        self.confirms = 0  # confirmed publishes waiting for storage
        self.egress: Egress = _NullEgress()
        # Called once when the session fails (code, message, peer_fault), before the egress closes:
        # the owner detaches it from the router at once, so nothing is routed to a dying peer.
        self.on_fail: Callable[[int, str, bool], None] | None = None
        self.subs: dict[int, Subscription] = {}
        self.inbox: Subscription | None = None
        self.inbox_token = ""
        self.inbox_prefix = "\0"  # "_INBOX.<token>." once attached; matches no topic before
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.flush_pending = False
        self.paused = False
        self.closing = False
        self.backlog: deque[Subscription] = deque()
        self.queued_bytes = 0
        self.max_queued_bytes = max_queued_bytes
        self.batch_bytes = batch_bytes
        self.known: set[int] = set()
        self.msgs_in = 0
        self.bytes_in = 0
        self.msgs_out = 0
        self.bytes_out = 0
        self.dropped = 0
        # The peer said it takes runs (MSGN frames); others are given a run's messages one by one.
        self.takes_runs = False

    # ---- output ------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue a control frame (OK, ERR, PONG, RESULT, NORESP ...) for the next write."""
        if self.closing:
            return
        self._append(data)
        self._poke()

    def deliver(self, sub: Subscription, ident: Identity, block: bytes, flags: int = 0, count: int = 0) -> None:
        """Hand one message to this subscriber: written soon, or queued under its policy.
        ``count`` > 0: ``block`` is a run of that many messages (a PUBN body), written as one MSGN
        frame and queued as one item (only for a session that :attr:`takes_runs`)."""
        if self.closing:
            return
        q = sub.queue
        account = self.account
        # What the uid holds (queued, and written but not yet sent) is checked before each message.
        if not self.paused and not q.items and (
                account is None or account.queued_bytes + account.written_bytes < self.account_max_queued):
            if count:
                self._write_run(sub, ident, block, count)
            else:
                self._write_msg(sub, ident, block, flags)
            self._poke()
            return
        self._queue(sub, (ident, block, flags, count), len(block))

    def _queue(self, sub: Subscription, item: tuple[Identity, bytes, int, int], size: int) -> None:
        """Queue a message or run under the subscription's policy, within the connection's and
        the uid's bounds."""
        q = sub.queue
        account = self.account
        room = self.max_queued_bytes - self.queued_bytes
        if account is not None:
            room = min(room, self.account_max_queued - account.queued_bytes - account.written_bytes)
        missed = q.missed
        try:
            delta = q.push(item, size, room)
        except Overflow:
            self.fail(
                ErrorCode.SLOW_CONSUMER,
                f"subscription {sub.sid} ({sub.pattern}) overflowed its queue of {q.max_msgs} messages / "
                f"{q.max_bytes} bytes while the connection was not reading",
            )
            return
        self.queued_bytes += delta
        if account is not None:
            account.queued_bytes += delta
        self.dropped += q.missed - missed
        if not sub.in_backlog:
            sub.in_backlog = True
            self.backlog.append(sub)
        if not self.paused and q.items:  # queued because the uid's bound is reached: write it when there is room
            self._poke()

    def _write_msg(self, sub: Subscription, ident: Identity, block: bytes, flags: int) -> None:
        self._before_message(sub, ident)
        self._append_message(_msg_header(sub.sid, ident.ref, len(block), flags), block, _MSG_OVERHEAD)

    def _write_run(self, sub: Subscription, ident: Identity, run: bytes, count: int) -> None:
        self._before_message(sub, ident)
        self._append_message(_msgn_header(sub.sid, ident.ref, count, len(run)), run, _MSGN_OVERHEAD, count)

    def _before_message(self, sub: Subscription, ident: Identity) -> None:
        """What goes before a subscription's next message: the sender's SENDER frame if this
        connection does not know it, and a GAP if the subscription dropped messages."""
        if ident.ref not in self.known:
            self._announce(ident)
        q = sub.queue
        if q.missed:
            self._append(wire.encode_gap(sub.sid, q.missed))
            q.missed = 0

    def _announce(self, ident: Identity) -> None:
        """A SENDER frame for a sender this connection does not know yet (SENDER_RESET first
        when it knows MAX_KNOWN_SENDERS)."""
        if len(self.known) >= MAX_KNOWN_SENDERS:
            self.known.clear()
            self._append(_SENDER_RESET)
        self.known.add(ident.ref)
        self._append(ident.frame())

    def _append_message(self, head: bytes, block: bytes, overhead: int, count: int = 1) -> None:
        """A message frame (its head, then the block or run as published) into ``out``, counted."""
        out = self.out
        out.append(head)
        out.append(block)
        n = len(block) + overhead
        self.out_bytes += n
        self.msgs_out += count
        if self.account is not None:
            self.account.written_bytes += n

    def deliver_stored(self, sid: int, ident: Identity, seq: int, count: int, time_ns: int, block: bytes) -> None:
        """Hand one stored message of a topic-queue consumer to this member (a QMSG frame).

        Not queued per subscription: what a consumer may have outstanding is bounded by its
        ``max_inflight``, and members whose connection is paused are given nothing."""
        if self.closing:
            return
        if ident.ref not in self.known:
            self._announce(ident)
        self._append_message(_qmsg_head(len(block) + _QMSG_LEN, _QMSG, 0, sid, ident.ref, seq, count, time_ns),
                             block, _QMSG_OVERHEAD)
        self._poke()

    def _emit_gap(self, sub: Subscription) -> None:
        """Tell the subscriber how many messages its subscription missed (a GAP frame)."""
        q = sub.queue
        self._append(wire.encode_gap(sub.sid, q.missed))
        q.missed = 0

    def _append(self, frame: bytes) -> None:
        self.out.append(frame)
        self.out_bytes += len(frame)
        if self.account is not None:
            self.account.written_bytes += len(frame)

    def _poke(self) -> None:
        if self.out_bytes >= self.batch_bytes:
            self.egress.wake(True)
        elif not self.flush_pending:
            self.flush_pending = True
            self.egress.wake(False)

    def take_output(self) -> list[bytes]:
        """The frames to write now (and forget); refills from the backlog while not paused."""
        if not self.paused and self.backlog and self.out_bytes < self.batch_bytes and not self.closing:
            self._fill_from_backlog()
        out = self.out
        self.bytes_out += self.out_bytes
        if self.account is not None:  # now the transport's (charged by it while it holds them)
            self.account.written_bytes -= self.out_bytes
        self.out = []
        self.out_bytes = 0
        return out

    @property
    def has_backlog(self) -> bool:
        return bool(self.backlog)

    def _fill_from_backlog(self) -> None:
        """Move queued messages to ``out``, one per subscription in turn, up to a write batch."""
        backlog = self.backlog
        while backlog and self.out_bytes < self.batch_bytes:
            sub = backlog[0]
            q = sub.queue
            if q.items:
                ident, block, flags, count = q.pop()
                self._unqueue(len(block))
                if count:
                    self._write_run(sub, ident, block, count)
                else:
                    self._write_msg(sub, ident, block, flags)
            elif q.missed:
                self._emit_gap(sub)
            if q.items or q.missed:
                backlog.rotate(-1)
            else:
                backlog.popleft()
                sub.in_backlog = False

    def drop_subscription(self, sub: Subscription) -> None:
        """Forget a subscription's queued messages (it was unsubscribed or ended)."""
        self._unqueue(sub.queue.clear())
        self._leave_backlog(sub)

    def _unqueue(self, nbytes: int) -> None:
        self.queued_bytes -= nbytes
        if self.account is not None:
            self.account.queued_bytes -= nbytes

    def release(self) -> None:
        """The session is gone: give back what its queues held to its uid's account."""
        self.backlog.clear()
        if self.inbox is not None:
            self.inbox.queue.clear()
        self._unqueue(self.queued_bytes)
        if self.account is not None:
            self.account.written_bytes -= self.out_bytes
        self.out = []
        self.out_bytes = 0

    def _leave_backlog(self, sub: Subscription) -> None:
        if sub.in_backlog:
            self.backlog.remove(sub)
            sub.in_backlog = False

    # ---- ending --------------------------------------------------------------------------------

    def fail(self, code: int, message: str, peer_fault: bool = True) -> None:
        """End this peer: a fatal ERR frame, then close. Later deliveries are ignored."""
        if self.closing:
            return
        self._append(wire.encode_err(code, 0, message, fatal=True))
        self.closing = True
        if self.on_fail is not None:
            self.on_fail(code, message, peer_fault)
        self.egress.close()

    @property
    def pending_output(self) -> bool:
        return bool(self.out) or bool(self.backlog)
