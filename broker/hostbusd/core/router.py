"""Router: topic -> subscribers. Pure and synchronous: it never awaits and never touches a transport.

``publish`` matches the topic in the :class:`TopicIndex`, hands the message block to every
matching plain subscription and to one member of every matching queue group, stores it when
retained, and tells a requester at once when nobody was there to answer. Inbox topics
(``_INBOX.<token>.…``) bypass the index and go only to the connection that owns ``<token>``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from hostbus import topics, wire
from hostbus.errors import (
    ErrorCode,
    HostbusError,
    InvalidTopicError,
    LimitExceededError,
    PermissionDeniedError,
    RemoteProtocolError,
)
from hostbus.wire.frames import MAX_HEADERS_BYTES
from hostbusd.core.acl import Access
from hostbusd.core.identity import Identity
from hostbusd.core.index import TopicIndex
from hostbusd.core.outbound import OutboundQueue
from hostbusd.core.retained import RetainedStore
from hostbusd.core.session import Session, Subscription

#: How many distinct valid topics the router remembers as already checked.
_VALID_TOPIC_CACHE = 65536
_unpack_block = wire.frames.MSG_BLOCK.unpack_from


class RuleRefusal(PermissionDeniedError):
    """A subscription the access rules refuse; ``rule`` says which decided."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message, code=ErrorCode.PERMISSION_DENIED)
        self.rule = rule


class QueueGroup:
    """Subscribers sharing a group name on one pattern; each message goes to one of them.

    Members are taken in turn, skipping those whose connection is paused (congested) when an
    uncongested one exists, so a slow worker does not collect a share it cannot handle.
    """

    __slots__ = ("members", "name", "next", "pattern")

    def __init__(self, name: str, pattern: str) -> None:
        self.name = name
        self.pattern = pattern
        self.members: list[Subscription] = []
        self.next = 0

    def pick(self) -> Subscription:
        members = self.members
        n = len(members)
        start = self.next
        for k in range(n):
            sub = members[(start + k) % n]
            if not sub.session.paused and not sub.session.closing:
                self.next = (start + k + 1) % n
                return sub
        self.next = (start + 1) % n
        return members[start % n]


@dataclass(slots=True)
class SubscribeOptions:
    pattern: str
    group: str | None = None
    policy: str = "drop-oldest"
    max_msgs: int = 65536
    max_bytes: int = 16 * 1024 * 1024
    retained: bool = True  # deliver matching retained messages first (not for a gateway's patterns)
    queue: OutboundQueue | None = None  # share this queue (a gateway keeps one order for all patterns)


@dataclass(slots=True)
class RouterStats:
    msgs_in: int = 0
    bytes_in: int = 0
    deliveries: int = 0
    no_responders: int = 0
    topics: dict[str, int] = field(default_factory=dict)
    topics_other: int = 0


class Router:
    def __init__(
        self,
        *,
        max_subscriptions: int,
        max_subscriptions_per_uid: int = 1 << 62,
        retained_max_topics: int,
        retained_max_bytes: int,
        stats_max_topics: int,
    ) -> None:
        self.index: TopicIndex[Subscription | QueueGroup] = TopicIndex()
        self.groups: dict[tuple[str, str], QueueGroup] = {}
        self.retained = RetainedStore(retained_max_topics, retained_max_bytes)  # per-uid shares: Hub
        self.inboxes: dict[str, Session] = {}
        self.max_subscriptions = max_subscriptions
        self.max_subscriptions_per_uid = max_subscriptions_per_uid
        self.stats = RouterStats()
        self.stats_max_topics = stats_max_topics
        self._valid_topics: dict[bytes, str] = {}  # UTF-8 form -> checked topic
        self.queues: Any = None  # core.queues.QueueService once the broker runs: topic queues capture messages

    # ---- sessions -----------------------------------------------------------------------------

    def attach(self, session: Session, inbox_queue: OutboundQueue) -> str:
        """Register a new session and give it its reply inbox; returns the inbox prefix."""
        token = secrets.token_hex(8)
        session.inbox_token = token
        session.inbox_prefix = f"{topics.INBOX_PREFIX}{token}."
        session.inbox = Subscription(session, 0, f"{topics.INBOX_PREFIX}{token}.>", None, inbox_queue)
        self.inboxes[token] = session
        return f"{topics.INBOX_PREFIX}{token}"

    def detach(self, session: Session) -> None:
        """Forget a session and everything it subscribed."""
        for sub in list(session.subs.values()):
            self._remove(sub)
        session.subs.clear()
        self.inboxes.pop(session.inbox_token, None)

    # ---- subscriptions ------------------------------------------------------------------------

    def subscribe(self, session: Session, sid: int, opts: SubscribeOptions,
                  rules_of: Session | None = None) -> tuple[Subscription, int]:
        """Add a subscription and deliver matching retained messages to it first.

        ``rules_of``: the session whose access rules decide (a deliver ring's owner), if not
        ``session`` itself. Returns the subscription and how many retained messages it was
        handed (the work done).
        """
        pattern = opts.pattern
        problem = topics.pattern_problem(pattern)
        if problem is not None:
            raise InvalidTopicError(f"invalid pattern: {problem}", code=ErrorCode.INVALID_TOPIC)
        if pattern.startswith(topics.INBOX_PREFIX) or pattern == "_INBOX":
            raise PermissionDeniedError(
                f"cannot subscribe to {pattern!r}: inbox topics are delivered only to the connection "
                "that owns them (use request() for replies)",
                code=ErrorCode.PERMISSION_DENIED,
            )
        if sid == 0 or sid in session.subs:
            raise HostbusError(f"subscription id {sid} is {'reserved' if sid == 0 else 'already in use'}",
                               code=ErrorCode.DUPLICATE_ID)
        held = len(session.subs) + len(session.ring_sids)  # its ring subscriptions count too
        if held >= self.max_subscriptions:
            raise LimitExceededError(
                f"connection already has {held} subscriptions, the limit "
                "(limits.max_subscriptions_per_connection)",
                code=ErrorCode.LIMIT,
            )
        account = session.account
        if account is not None and account.subscriptions >= self.max_subscriptions_per_uid:
            raise LimitExceededError(
                f"uid {account.uid} already holds {account.subscriptions} subscriptions across its connections, "
                "the limit (limits.max_subscriptions_per_uid)",
                code=ErrorCode.LIMIT,
            )
        acl = self.subscribe_filter(rules_of or session, pattern, opts.group)
        sub = Subscription(session, sid, pattern, opts.group,
                           opts.queue if opts.queue is not None else OutboundQueue(opts.policy, opts.max_msgs,
                                                                                   opts.max_bytes))
        sub.acl = acl
        delivered = 0
        session.subs[sid] = sub
        if account is not None:
            account.subscriptions += 1
        if opts.group:
            key = (opts.group, pattern)
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = QueueGroup(opts.group, pattern)
                self.index.add(pattern, group)
            group.members.append(sub)
        else:
            self.index.add(pattern, sub)
            if opts.retained:
                for ident, block in self.retained.matching(pattern):
                    if acl is not None and not acl.may_receive(wire.split_block(block)[0]):
                        continue
                    session.deliver(sub, ident, block, wire.MSG_RETAINED)
                    delivered += 1
        return sub, delivered

    def subscribe_filter(self, session: Session, pattern: str, group: str | None) -> Access | None:
        """Decide a subscription under the session's rules: None (all its topics allowed), the
        per-message filter to apply, or PermissionDeniedError naming the rule that refused.
        """
        access = session.access
        if access is None:
            return None
        verdict, decision = access.subscribe(pattern)
        if verdict == "allow":
            return None
        if verdict == "deny" and session.account is not None:  # the daemon's own subscribers just filter
            raise RuleRefusal(f"may not subscribe to {topics.show(pattern)}: {decision.rule}", decision.rule)
        if group is not None:
            raise RuleRefusal(
                f"may subscribe to only some topics of {topics.show(pattern)} (the rules differ inside it; for the "
                f"pattern as a whole: {decision.rule}), and a queue group member must be able to take every message "
                "of its group: subscribe to a narrower pattern", decision.rule)
        return access

    def unsubscribe(self, session: Session, sid: int) -> bool:
        sub = session.subs.pop(sid, None)
        if sub is None:
            return False
        self._remove(sub)
        return True

    def _remove(self, sub: Subscription) -> None:
        sub.session.drop_subscription(sub)
        if sub.session.account is not None:
            sub.session.account.subscriptions -= 1
        if sub.group:
            key = (sub.group, sub.pattern)
            group = self.groups.get(key)
            if group is not None:
                group.members.remove(sub)
                if not group.members:
                    del self.groups[key]
                    self.index.remove(sub.pattern, group)
                elif group.next >= len(group.members):
                    group.next = 0
        else:
            self.index.remove(sub.pattern, sub)

    # ---- publishing ---------------------------------------------------------------------------

    def check_block(self, body: bytes, flags: int) -> tuple[str, str, int]:
        """Check a PUB message block as a client sent it: (topic, reply subject, payload start).

        The hot path: the lengths are parsed inline and the topic's check is cached by its bytes.
        Raises RemoteProtocolError or InvalidTopicError saying what is wrong.
        """
        if len(body) < 8:
            wire.split_block(body)  # raises: the block's 8-byte header is missing
        tlen, rlen, hlen = _unpack_block(body, 0)
        t1 = 8 + tlen
        h0 = t1 + rlen
        h1 = h0 + hlen
        if h1 > len(body):
            wire.split_block(body)  # raises the error that says which length is wrong
        topic = self.topic_from_wire(body[8:t1])
        reply = ""
        if rlen:
            try:
                reply = body[t1:h0].decode()
            except UnicodeDecodeError:
                raise InvalidTopicError("reply subject is not valid UTF-8", code=ErrorCode.INVALID_TOPIC) from None
            problem = topics.topic_problem(reply)
            if problem is None and topics.is_reserved(reply):
                problem = "reply subjects starting with '$' are reserved for the broker"
            if problem is not None:
                raise InvalidTopicError(f"invalid reply subject: {problem}", code=ErrorCode.INVALID_TOPIC)
        elif flags & wire.PUB_REQUEST:
            raise RemoteProtocolError("PUB with the REQUEST flag has no reply subject")
        if h1 > h0:
            if hlen > MAX_HEADERS_BYTES:
                raise RemoteProtocolError(f"headers block of {hlen} bytes exceeds the limit of "
                                          f"{MAX_HEADERS_BYTES}", code=ErrorCode.INVALID_HEADERS)
            wire.decode_headers(memoryview(body)[h0:h1])
        return topic, reply, h1

    def known_topic(self, raw: bytes) -> str | None:
        """The topic whose UTF-8 form is ``raw`` if it was checked already (else None)."""
        return self._valid_topics.get(raw)

    def count(self, topic: str, nbytes: int, n: int = 1) -> None:
        """Count ``n`` messages of ``nbytes`` in all routed on ``topic`` (by :meth:`publish`,
        :meth:`publish_run`, or by a fast path that found no subscriber: PeerCore._cpub_fast)."""
        stats = self.stats
        stats.msgs_in += n
        stats.bytes_in += nbytes
        counts = stats.topics
        if topic in counts:
            counts[topic] += n
        elif len(counts) < self.stats_max_topics:
            counts[topic] = n
        else:
            stats.topics_other += n

    def topic_from_wire(self, raw: bytes) -> str:
        """The topic whose UTF-8 form is ``raw``, checked with :meth:`check_topic` (cached)."""
        topic = self._valid_topics.get(raw)
        if topic is not None:
            return topic
        try:
            topic = raw.decode()
        except UnicodeDecodeError:
            raise InvalidTopicError("topic is not valid UTF-8", code=ErrorCode.INVALID_TOPIC) from None
        self.check_topic(topic)
        if len(self._valid_topics) >= _VALID_TOPIC_CACHE:
            self._valid_topics.clear()
        self._valid_topics[raw] = topic
        return topic

    def check_topic(self, topic: str) -> None:
        """Raise if ``topic`` may not be published on by a client."""
        problem = topics.topic_problem(topic)
        if problem is not None:
            raise InvalidTopicError(f"invalid topic: {problem}", code=ErrorCode.INVALID_TOPIC)
        if topic.startswith("$"):
            raise InvalidTopicError(
                f"invalid topic {topic!r}: topics starting with '$' are reserved for the broker",
                code=ErrorCode.INVALID_TOPIC,
            )

    def publish(self, ident: Identity, topic: str, block: bytes, flags: int = 0,
                reply: str = "", payload_len: int = 1, origin: Session | None = None, confirm: Any = None) -> int:
        """Route one message block; returns the number of subscriptions it was handed to.

        ``topic`` must have passed :meth:`check_topic`. ``origin`` is the publishing session,
        told at once (NORESP) when a request finds nobody. Topic queues whose subjects match
        store the message too; ``confirm`` (a confirmed publish) collects their answers.
        """
        stats = self.stats
        inbox = topic.startswith(topics.INBOX_PREFIX)
        self.count("_INBOX" if inbox else topic, len(block))  # inbox topics, one per request: together

        n = 0
        if inbox:
            owner = self.inboxes.get(topic[len(topics.INBOX_PREFIX):].split(".", 1)[0])
            if owner is not None and owner.inbox is not None:
                owner.deliver(owner.inbox, ident, block)
                n = 1
        else:
            for entry in self.index.match(topic):
                if type(entry) is Subscription:
                    if entry.acl is not None and not entry.acl.may_receive(topic):
                        continue
                    entry.session.deliver(entry, ident, block)
                else:
                    sub = entry.pick()  # type: ignore[union-attr]  # members never filter (subscribe_filter)
                    sub.session.deliver(sub, ident, block)
                n += 1
        stats.deliveries += n
        queues = self.queues
        if queues is not None and queues.queues:
            capturing = queues.capturing(topic)
            if capturing:
                queues.capture(capturing, ident, block, payload_len, origin, confirm)
                n += len(capturing)
        if n == 0 and flags & wire.PUB_REQUEST and origin is not None:
            stats.no_responders += 1
            origin.send(wire.frame(wire.FrameType.NORESP, reply.encode()))
        if flags & wire.PUB_RETAIN and not inbox:  # replies are not kept
            self.retained.put(topic, ident, block, payload_len)  # after delivery: may raise a limit
        return n

    def publish_run(self, ident: Identity, topic: str, run: bytes, count: int, items_at: int,
                    origin: Session | None = None) -> int:
        """Route a run: ``count`` messages on one ``topic`` (a checked PUBN body whose first item
        is at ``run[items_at]``); returns the messages handed out. ``origin``, the publishing
        session, is told what a topic queue refuses (as for :meth:`publish`).

        The topic is matched, and a subscription's access filter applied, once for the run. A
        plain subscription whose peer takes runs gets the run as it came (one MSGN frame); a
        queue group, a peer that does not take runs, an inbox and the topic queues get its
        messages one by one, each the message block ``head + payload`` (a run's head is a block's
        head with no reply subject), so every delivery kind keeps its per-message rules.
        """
        stats = self.stats
        inbox = topic.startswith(topics.INBOX_PREFIX)
        self.count("_INBOX" if inbox else topic, len(run) - items_at + count * (items_at - 4), count)
        blocks: list[bytes] | None = None
        n = 0
        if inbox:
            owner = self.inboxes.get(topic[len(topics.INBOX_PREFIX):].split(".", 1)[0])
            if owner is not None and owner.inbox is not None:
                blocks = self._split_run(run, items_at)
                for block in blocks:
                    owner.deliver(owner.inbox, ident, block)
                n = count
        else:
            one_by_one: list[Subscription | QueueGroup] = []
            for entry in self.index.match(topic):
                if type(entry) is Subscription:
                    if entry.acl is not None and not entry.acl.may_receive(topic):
                        continue
                    if entry.session.takes_runs:
                        entry.session.deliver(entry, ident, run, 0, count)
                    else:
                        one_by_one.append(entry)
                else:
                    one_by_one.append(entry)
                n += count
            if one_by_one:
                # Message by message, each to every such entry before the next message, as
                # single publishes would be: a session holding several of them (a FIFO sink or
                # gateway with overlapping patterns) sees one message at a time (RecordSession).
                blocks = self._split_run(run, items_at)
                for block in blocks:
                    for entry in one_by_one:
                        if type(entry) is Subscription:
                            entry.session.deliver(entry, ident, block)
                        else:
                            sub = entry.pick()  # type: ignore[union-attr]
                            sub.session.deliver(sub, ident, block)
        stats.deliveries += n
        queues = self.queues
        if queues is not None and queues.queues:
            capturing = queues.capturing(topic)
            if capturing:
                if blocks is None:
                    blocks = self._split_run(run, items_at)
                for block in blocks:
                    queues.capture(capturing, ident, block, len(block) - items_at, origin, None)
                n += count * len(capturing)
        return n

    @staticmethod
    def _split_run(run: bytes, items_at: int) -> list[bytes]:
        """The message block of each message of a run (its head, then the payload)."""
        head = run[:items_at]
        return [head + payload for payload in wire.run_payloads(run, items_at)]
