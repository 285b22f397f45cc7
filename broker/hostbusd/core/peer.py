"""PeerCore: the broker's side of one Unix-socket connection, sans-IO.

Bytes go in through :meth:`PeerCore.receive`; every complete frame is parsed and handled before
it returns (a batch per read); output accumulates in the :class:`Session` for the transport to
write once. States:

=============  ==========================================  ==========================
state          frames accepted                              next state
=============  ==========================================  ==========================
HELLO          HELLO                                        OPEN (WELCOME sent)
OPEN           PUB, PUBN, CPUB, SUB, UNSUB, PING, CALL,     OPEN
               ACK
CLOSED         none (input ignored)                         --
=============  ==========================================  ==========================

Anything else, and any malformed frame, ends the connection with a fatal ERR frame naming the
problem: the peer's fault never reaches another peer.

Fairness: one call handles at most :data:`TURN_BUDGET` units of work (a frame is one unit, plus
one per message it hands out: fan-out deliveries, retained messages for a new subscription).
When the budget runs out, :meth:`PeerCore.process` returns True and the transport stops reading
from this peer and calls it again on the next loop iteration, so a peer that sends a flood of
expensive frames takes turns with everyone else instead of stalling the loop.
"""

from __future__ import annotations

import enum
import struct
from typing import Any

from pydantic import ValidationError

from hostbus import topics, wire
from hostbus.errors import ErrorCode, HostbusError, InvalidTopicError, PermissionDeniedError, RemoteProtocolError
from hostbus.wire import FrameType
from hostbusd.config import QueueConfig
from hostbusd.core.hub import Hub
from hostbusd.core.identity import Identity
from hostbusd.core.queues import Confirm
from hostbusd.core.router import SubscribeOptions
from hostbusd.core.session import NULL_EGRESS, Session

_MAX_GROUP_BYTES = 255
#: Units of work one peer may do before the loop serves others (see the module docstring).
TURN_BUDGET = 20_000
_PUB = int(FrameType.PUB)
_CPUB = int(FrameType.CPUB)
_PUBN = int(FrameType.PUBN)
_U32_AT = wire.frames.U32.unpack_from
_CPUB_HEAD = struct.Struct("<IHHI").unpack_from  # CPUB: pub_id, then the message block's lengths
#: A frame at least this large is received into a buffer of its own size (one copy less).
BIG_FRAME = 512 * 1024
QUEUE_OPS = ("queue_add", "queue_info", "queue_list", "queue_delete", "queue_purge", "consumer_delete")


def _valid_group(group: object) -> bool:
    if not isinstance(group, str) or not group or any(c.isspace() or not c.isprintable() for c in group):
        return False
    try:
        return len(group.encode()) <= _MAX_GROUP_BYTES
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return False


class State(enum.Enum):
    HELLO = "hello"
    OPEN = "open"
    CLOSED = "closed"


class PeerCore:
    __slots__ = ("_frames", "_next", "decoder", "frames_done", "hub", "session", "state")

    def __init__(self, hub: Hub, ident: Identity) -> None:
        self.hub = hub
        self.session: Session = hub.new_session(ident)
        self.session.on_fail = self._failed
        self.decoder = wire.Decoder(wire.CLIENT_FRAMES, wire.HANDSHAKE_MAX_FRAME)
        self.state = State.HELLO
        self.frames_done = 0  # frames handled so far (the transport's frame timer watches it)
        self._frames: list[wire.Frame] = []  # decoded, not yet handled (budget ran out)
        self._next = 0

    @property
    def partial(self) -> bool:
        """A frame has begun but not completed."""
        return self.decoder.buffered > 0

    def receive(self, data: bytes) -> bool:
        """Take bytes and handle the frames in them; True if work is left for :meth:`process`."""
        if self.state is State.CLOSED:
            return False
        self.decoder.feed(data)
        return self.process()

    def process(self) -> bool:
        """Handle buffered frames within one turn's budget; True if some are left."""
        budget = TURN_BUDGET
        session = self.session
        try:
            while budget > 0:
                frames = self._frames
                i = self._next
                if i >= len(frames):
                    frames = self._frames = self.decoder.frames()
                    i = 0
                    if not frames:
                        self._next = 0
                        return False
                n = len(frames)
                while i < n and budget > 0:
                    ftype, flags, body = frames[i]
                    i += 1
                    self._next = i
                    self.frames_done += 1
                    if ftype == _PUB and self.state is State.OPEN:
                        budget -= 1 + self._publish(flags, body)
                    elif ftype == _PUBN and self.state is State.OPEN:
                        budget -= 1 + self._publish_run(flags, body)
                    elif ftype == _CPUB and self.state is State.OPEN and len(body) >= 12:
                        if not self._cpub_fast(body):
                            pub_id = _U32_AT(body, 0)[0]
                            if pub_id == 0:
                                raise RemoteProtocolError("CPUB with id 0: ids start at 1")
                            budget -= self._publish(0, body[4:], pub_id)
                        budget -= 1
                    else:
                        budget -= 1 + self._control(ftype, body)
                    if session.closing:
                        return False
            return True
        except RemoteProtocolError as exc:
            self.fail(exc.code or ErrorCode.PROTOCOL, str(exc))
        except InvalidTopicError as exc:
            self.fail(ErrorCode.INVALID_TOPIC, str(exc))
        return False

    def _publish(self, flags: int, body: bytes, pub_id: int = 0) -> int:
        """A PUB, or (``pub_id`` > 0) the message block of a CPUB: a publish to be confirmed."""
        router = self.hub.router
        topic, reply, h1 = router.check_block(body, flags)
        session = self.session
        session.msgs_in += 1
        session.bytes_in += len(body)
        access = session.access
        if access is not None:
            decision = access.publish(topic)
            what = "publish to"
            if decision.allowed and reply and not reply.startswith(session.inbox_prefix):
                # Replies would be published there by the responder, on the requester's behalf.
                decision = access.publish(reply)
                what, topic = "ask for replies on", reply
            if not decision.allowed:
                self.hub.denied["publish"] += 1
                self.hub.peer_error("publish_denied", session, topic=topic, rule=decision.rule)
                session.send(wire.encode_err(ErrorCode.PERMISSION_DENIED, pub_id,
                                             f"may not {what} {topics.show(topic)}: {decision.rule}", fatal=False))
                return 0
        confirm = None
        if pub_id:
            if session.confirms >= self.hub.config.store.max_pending_confirms:
                session.send(wire.encode_err(ErrorCode.LIMIT, pub_id, f"{session.confirms} confirmed publishes are "
                                             "waiting for storage on this connection, the limit "
                                             "(store.max_pending_confirms)", fatal=False))
                return 0
            queues = self.hub.queues
            confirm = Confirm(session, pub_id, queues.confirm_ready if queues is not None else None)
            confirm.remaining = 1  # held until routing is done, so an answer is sent once
            session.confirms += 1
        try:
            return router.publish(session.ident, topic, body, flags, reply, len(body) - h1, session, confirm)
        except HostbusError as exc:  # a limit of the retained store: tell the publisher, go on
            self.hub.peer_error("retained_limit", session, topic=topic)
            session.send(wire.encode_err(exc.code or ErrorCode.LIMIT, 0, str(exc), fatal=False))
            return 0
        finally:
            if confirm is not None:
                confirm.stored_nowhere()

    def _publish_run(self, flags: int, body: bytes) -> int:
        """A PUBN: many messages on one topic, checked and routed as one (Router.publish_run)."""
        if flags:
            raise RemoteProtocolError(f"PUBN with flags 0x{flags:02x}: a run cannot be retained or be a request")
        router = self.hub.router
        topic, reply, items_at = router.check_block(body, 0)
        if reply:
            raise RemoteProtocolError("PUBN with a reply subject: a run carries none")
        count = wire.run_count(body, items_at)
        session = self.session
        session.msgs_in += count
        session.bytes_in += len(body)
        access = session.access
        if access is not None:
            decision = access.publish(topic)
            if not decision.allowed:
                self.hub.denied["publish"] += count
                self.hub.peer_error("publish_denied", session, topic=topic, rule=decision.rule, messages=count)
                session.send(wire.encode_err(ErrorCode.PERMISSION_DENIED, 0, f"may not publish to {topics.show(topic)}"
                                             f": {decision.rule} ({count} messages refused)", fatal=False))
                return 0
        return router.publish_run(session.ident, topic, body, count, items_at, session)

    def _cpub_fast(self, body: bytes) -> bool:
        """A confirmed publish in the common case, with every check of the general path
        (:meth:`_publish`) taken from its caches: a known valid topic, no reply subject and no
        headers, allowed, no subscriber, captured by queues that take it as it is. False: not
        that case (nothing was done; the general path handles it)."""
        pub_id, tlen, rlen, hlen = _CPUB_HEAD(body, 0)
        if rlen or hlen or not pub_id or 12 + tlen > len(body):
            return False
        hub = self.hub
        router = hub.router
        topic = router.known_topic(body[12:12 + tlen])
        queues = hub.queues
        if topic is None or queues is None or router.index.match(topic):
            return False
        session = self.session
        access = session.access
        if access is not None and not access.publish(topic).allowed:
            return False
        if session.confirms >= hub.config.store.max_pending_confirms:
            return False
        block = body[4:]
        if not queues.capture_plain(topic, session, block, pub_id):
            return False
        session.msgs_in += 1
        session.bytes_in += len(block)
        router.count(topic, len(block))
        return True

    def _control(self, ftype: int, body: bytes) -> int:
        """Handle a frame other than PUB; returns the messages it handed out (its extra work)."""
        if self.state is State.HELLO:
            if ftype != FrameType.HELLO:
                raise RemoteProtocolError(
                    f"expected HELLO as the first frame, got {FrameType(ftype).name}", code=ErrorCode.HANDSHAKE
                )
            self._hello(body)
        elif ftype == FrameType.SUB:
            return self._subscribe(body)
        elif ftype == FrameType.UNSUB:
            sid, _ = wire.split_u32(body)
            member = self.session.members.get(sid)
            if member is not None:
                self.hub.queues.leave(member)
            elif not (self.session.ring_sids and self.hub.rings.unsubscribe(self.session, sid)):
                self.hub.router.unsubscribe(self.session, sid)
        elif ftype == FrameType.CPUB:
            pub_id, _ = wire.split_u32(body)
            if pub_id == 0:
                raise RemoteProtocolError("CPUB with id 0: ids start at 1")
            return self._publish(0, body[4:], pub_id)
        elif ftype == FrameType.ACK:
            self._ack(body)
        elif ftype == FrameType.PING:
            token, _ = wire.split_u32(body)
            self.session.send(wire.encode_u32(FrameType.PONG, token))
        elif ftype == FrameType.CALL:
            self._call(body)
        else:
            raise RemoteProtocolError(f"{FrameType(ftype).name} is not allowed after the handshake",
                                      code=ErrorCode.PROTOCOL)
        return 0

    def _hello(self, body: bytes) -> None:
        hello = wire.decode_json_obj(body)
        version = hello.get("protocol")
        if type(version) is not int or version != wire.PROTOCOL_VERSION:  # not True, not 1.0
            raise RemoteProtocolError(
                f"unsupported protocol version {version!r}; this broker speaks {wire.PROTOCOL_VERSION}",
                code=ErrorCode.HANDSHAKE,
            )
        if "ring_fd" in hello:  # a connection that only fetches a ring's segment (docs/shm.md)
            self._hand_ring_fd(hello["ring_fd"])
            return
        name = hello.get("name")
        if isinstance(name, str):
            self.session.name = name[:128]
        features = hello.get("features")
        if isinstance(features, list):
            self.session.takes_runs = wire.FEATURE_RUNS in features
        inbox = self.hub.open(self.session)
        self.session.send(wire.encode_json(FrameType.WELCOME, self.hub.welcome(self.session, inbox)))
        self.decoder.max_frame = self.hub.config.limits.max_frame_bytes
        self.decoder.big = BIG_FRAME  # received in place by a transport that can (Decoder.reserve)
        self.decoder.views = False
        self.state = State.OPEN

    def _hand_ring_fd(self, token: object) -> None:
        rings = self.hub.rings
        session = self.session
        try:
            if rings is None:
                raise HostbusError("shared-memory rings are not available", code=ErrorCode.INVALID_ARGUMENT)
            fd = rings.take_fd(token, session.ident.uid)
        except HostbusError as exc:
            self.fail(exc.code or ErrorCode.INVALID_ARGUMENT, f"ring_fd: {exc}")
            return
        session.egress.send_fd(fd)  # type: ignore[attr-defined]  # UnixPeer: the only transport with HELLO
        self.end()  # nothing more on this connection: no WELCOME, no ERR
        session.egress.close()

    def _subscribe(self, body: bytes) -> int:
        sid, raw = wire.split_u32(body)
        if sid == 0:
            raise RemoteProtocolError("SUB with sid 0: sid 0 is reserved for the reply inbox")
        obj = wire.decode_json_obj(raw)  # malformed JSON is a broken client: fatal like any bad frame
        session = self.session
        try:
            if "queue" in obj:  # consuming a topic queue
                if sid in session.subs or sid in session.ring_sids or sid in session.members:
                    raise HostbusError(f"subscription id {sid} is already in use", code=ErrorCode.DUPLICATE_ID)
                if self.hub.queues is None:
                    raise HostbusError("topic queues are not available", code=ErrorCode.INVALID_ARGUMENT)
                try:
                    self.hub.queues.consume(session, sid, obj)
                except (ValueError, OverflowError, TypeError) as exc:  # a value no check foresaw
                    raise HostbusError(f"consume: {exc}"[:500], code=ErrorCode.INVALID_ARGUMENT) from None
                session.send(wire.encode_u32(FrameType.OK, sid))
                return 0
            if sid in session.members:
                raise HostbusError(f"subscription id {sid} is already in use", code=ErrorCode.DUPLICATE_ID)
            opts = self._sub_options(obj)
            via = obj.get("via", "socket")
            if via == "shm":
                if self.hub.rings is None or sid in session.subs or sid in session.ring_sids:
                    raise HostbusError(f"subscription id {sid} is already in use", code=ErrorCode.DUPLICATE_ID)
                delivered = int(self.hub.rings.subscribe(session, sid, opts, obj.get("ring")))
            elif via != "socket":
                raise HostbusError(f"SUB: 'via' must be 'socket' or 'shm', not {str(via)[:32]!r}",
                                   code=ErrorCode.INVALID_ARGUMENT)
            elif sid in session.ring_sids:
                raise HostbusError(f"subscription id {sid} is already in use", code=ErrorCode.DUPLICATE_ID)
            else:
                _, delivered = self.hub.router.subscribe(session, sid, opts)
        except HostbusError as exc:
            if exc.code == ErrorCode.PERMISSION_DENIED:
                self.hub.denied["subscribe"] += 1
            pattern = obj.get("pattern")
            self.hub.peer_error("subscribe_refused", session, sid=sid,
                                pattern=topics.show(pattern, 32) if isinstance(pattern, str) else None,
                                rule=getattr(exc, "rule", None), reason=str(exc))
            session.send(wire.encode_err(exc.code or ErrorCode.INVALID_ARGUMENT, sid, str(exc), fatal=False))
            return 0
        session.send(wire.encode_u32(FrameType.OK, sid))
        return delivered

    def _ack(self, body: bytes) -> None:
        sid, items = wire.split_u32(body)
        size = wire.frames.ACK_ITEM.size
        if not items or len(items) % size:
            raise RemoteProtocolError(f"ACK body of {len(body)} bytes is not a sid and whole {size}-byte items")
        answers = list(wire.frames.ACK_ITEM.iter_unpack(items))
        if any(kind > wire.frames.ACK_PROGRESS for kind, _, _ in answers):
            raise RemoteProtocolError("ACK item of an unknown kind (0 ack, 1 nak, 2 term, 3 in progress)")
        if self.hub.queues is not None:
            self.hub.queues.answer(self.session, sid, answers)

    def _sub_options(self, obj: dict[str, Any]) -> SubscribeOptions:
        cfg = self.hub.config
        pattern = obj.get("pattern")
        group = obj.get("group")
        policy = obj.get("policy", cfg.subscriptions.policy)
        max_msgs = obj.get("max_msgs", cfg.subscriptions.max_queued_msgs)
        max_bytes = obj.get("max_bytes", cfg.subscriptions.max_queued_bytes)

        def bad(what: str) -> HostbusError:
            return HostbusError(f"SUB: {what}", code=ErrorCode.INVALID_ARGUMENT)

        if not isinstance(pattern, str):
            raise bad("'pattern' must be a string")
        if group is not None and not _valid_group(group):
            raise bad(f"'group' must be a non-empty name of at most {_MAX_GROUP_BYTES} bytes without spaces")
        if policy not in wire.POLICIES:
            raise bad(f"'policy' {policy!r} is not one of {', '.join(wire.POLICIES)}")
        for key, value in (("max_msgs", max_msgs), ("max_bytes", max_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"'{key}' must be a positive integer")
        max_bytes = min(max_bytes, cfg.limits.max_queued_bytes_per_connection)
        return SubscribeOptions(pattern, group, policy, max_msgs, max_bytes)

    def _call(self, body: bytes) -> None:
        call_id, raw = wire.split_u32(body)
        req = wire.decode_json_obj(raw)
        op = req.get("op")
        session = self.session
        if op == "stats":
            result = self.hub.stats(session)
        elif op in ("ring_attach", "ring_ready", "ring_close"):
            rings = self.hub.rings
            if rings is None:
                session.send(wire.encode_err(ErrorCode.INVALID_ARGUMENT, call_id, "shared-memory rings are not "
                                             "available", False))
            elif op == "ring_attach":
                rings.attach(session, call_id, req)  # answers when the ring exists
            elif op == "ring_ready":
                rings.ready(session, call_id, req.get("ring"))
            else:
                rings.close(session, call_id, req.get("ring"))
            return
        elif op in QUEUE_OPS:
            try:
                result = self._queue_call(op, req)
            except HostbusError as exc:
                session.send(wire.encode_err(exc.code or ErrorCode.INVALID_ARGUMENT, call_id, str(exc), False))
                return
            except (ValueError, OverflowError, TypeError) as exc:  # a value no check foresaw: the caller's
                session.send(wire.encode_err(ErrorCode.INVALID_ARGUMENT, call_id, f"{op}: {exc}"[:500], False))
                return
        elif op == "whoami":
            result = self.hub.welcome(session, f"_INBOX.{session.inbox_token}")
            topic = req.get("topic")
            if topic is not None:
                problem = topics.pattern_problem(topic) if isinstance(topic, str) else "must be a string"
                if problem is not None:
                    message = f"whoami: 'topic' {str(topic)[:64]!r} is not a topic or pattern: {problem}"
                    session.send(wire.encode_err(ErrorCode.INVALID_TOPIC, call_id, message, False))
                    return
                result["access"] = self.hub.may(session, topic)
        else:
            message = (f"unknown CALL op {str(op)[:64]!r}; known: stats, whoami, ring_attach, ring_ready, ring_close, "
                       f"{', '.join(QUEUE_OPS)}")
            session.send(wire.encode_err(ErrorCode.INVALID_ARGUMENT, call_id, message, False))
            return
        session.send(wire.encode_json(FrameType.RESULT, result, wire.frames.U32.pack(call_id)))

    def _queue_call(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
        queues = self.hub.queues
        session = self.session
        if queues is None:
            raise HostbusError("topic queues are not available", code=ErrorCode.INVALID_ARGUMENT)
        if op == "queue_list":
            return {"queues": list(queues.stats(session).values())}
        if op == "queue_add":
            args = {k: v for k, v in req.items() if k != "op"}
            try:
                spec = QueueConfig.model_validate(args)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'queue'}: "
                                     f"{str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors())
                raise HostbusError(f"queue_add: {problems}", code=ErrorCode.INVALID_ARGUMENT) from None
            queues.check_manage(session, spec.subjects, f"declare queue {spec.name!r}")
            if spec.dead_letter is not None and session.access is not None:
                # Dead letters are published there under their senders' names: it takes the
                # declarer's right to publish there.
                decision = session.access.publish(spec.dead_letter)
                if not decision.allowed and not topics.is_reserved(spec.dead_letter):
                    raise PermissionDeniedError(f"may not declare queue {spec.name!r} with dead letters on "
                                                f"{topics.show(spec.dead_letter)}: {decision.rule}",
                                                code=ErrorCode.PERMISSION_DENIED)
            existing = queues.queues.get(spec.name)
            if existing is not None:  # changing one takes the right to manage its subjects too
                queues.check_manage(session, existing.spec.subjects, f"change queue {spec.name!r}")
            return queues.declare(spec).describe()  # type: ignore[no-any-return]
        q = queues._get(req.get("name"))
        if op == "queue_info":
            if not queues.may_see(session, q):
                raise PermissionDeniedError(f"may not see queue {q.name!r}: neither subscribe nor manage rights on "
                                            "its subjects", code=ErrorCode.PERMISSION_DENIED)
            return q.describe()  # type: ignore[no-any-return]
        what = {"queue_delete": "delete", "queue_purge": "purge", "consumer_delete": "delete a consumer of"}[op]
        queues.check_manage(session, q.spec.subjects, f"{what} queue {q.name!r}")
        if op == "queue_delete":
            queues.delete(q.name)
            return {"deleted": q.name}
        if op == "consumer_delete":
            consumer = req.get("consumer")
            queues.delete_consumer(q.name, consumer)
            return {"deleted": consumer}
        return {"purged": queues.purge(q.name)}

    def forget(self) -> None:
        """The connection is gone and released: drop the input buffers and the references that
        make the peer, its session and its transport a cycle (so reference counting frees them
        at once, not the cyclic collector some time later)."""
        self.decoder = wire.Decoder(wire.CLIENT_FRAMES, wire.HANDSHAKE_MAX_FRAME)
        self._frames = []
        session = self.session
        session.on_fail = None
        session.egress = NULL_EGRESS
        session.inbox = None
        session.subs.clear()

    def fail(self, code: int, message: str, *, peer_fault: bool = True) -> None:
        """End this peer with a fatal error; a fault of its own is logged (rate-limited)."""
        self.session.fail(code, message, peer_fault)

    def end(self) -> None:
        """The peer closed its side: forget it now (nothing more is routed to it)."""
        self._failed(0, "", peer_fault=False)
        self.session.closing = True

    def _failed(self, code: int, message: str, peer_fault: bool) -> None:
        """The session is ending: stop handling input, detach it from the router, log a fault."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._frames = []
        self._next = 0
        if peer_fault:
            self.hub.peer_error("peer_error", self.session, code=ErrorCode(code).name, error=message)
        self.hub.close(self.session)
