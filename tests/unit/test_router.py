"""The broker core driven in-process without an event loop: router, session, hub and peer.

Each test builds a :class:`Hub` from a :class:`Config`, connects peers through
:class:`PeerCore` (bytes in, built with the ``hostbus.wire`` encoders) and decodes what each
session hands to its transport (``Session.take_output``) with a ``wire.Decoder``. The transport
itself is replaced by :class:`FakeEgress`, which records the session's wake/close calls: this
layer is pure by design and only ever calls those two methods.
"""

from __future__ import annotations

import itertools
import json
import re
import struct
from collections import Counter
from typing import Any, NamedTuple

import pytest

from hostbus import wire
from hostbus.errors import ErrorCode
from hostbus.wire import Frame, FrameType
from hostbusd import __version__
from hostbusd.config import Config, parse
from hostbusd.core import session as session_mod
from hostbusd.core.hub import Hub
from hostbusd.core.peer import PeerCore, State

_pids = itertools.count(10_000)


class FakeEgress:
    """Records what the session asks of its transport."""

    def __init__(self) -> None:
        self.wakes: list[bool] = []
        self.closes = 0

    def wake(self, urgent: bool) -> None:
        self.wakes.append(urgent)

    def close(self) -> None:
        self.closes += 1


class Msg(NamedTuple):
    sid: int
    sender: tuple[int, int, int, str]  # uid, gid, pid, origin as announced by SENDER
    topic: str
    reply: str
    headers: dict[str, str]
    payload: bytes
    flags: int


class Err(NamedTuple):
    code: int
    ref: int
    message: str
    fatal: bool


class Peer:
    """One client connection as the broker core sees it, with its output decoded."""

    def __init__(self, hub: Hub, *, uid: int = 1000, gid: int = 100, name: str = "peer", hello: bool = True) -> None:
        self.hub = hub
        self.ident = hub.identity(uid, gid, next(_pids))
        self.core = PeerCore(hub, self.ident)
        self.session = self.core.session
        self.egress = FakeEgress()
        self.session.egress = self.egress
        self.decoder = wire.Decoder(wire.SERVER_FRAMES, 1 << 30)
        self.senders: dict[int, tuple[int, int, int, str]] = {}
        self.welcome: dict[str, Any] = {}
        if hello:
            self.send(wire.encode_hello(name, "test", wire.PROTOCOL_VERSION))
            frames = self.read()
            assert [f.type for f in frames] == [FrameType.WELCOME], frames
            self.welcome = wire.decode_json_obj(frames[0].body)

    @property
    def inbox(self) -> str:
        return str(self.welcome["inbox"])

    def send(self, *frames: bytes) -> None:
        if self.core.receive(b"".join(frames)):
            while self.core.process():  # the rest of a turn-limited batch
                pass

    def read(self) -> list[Frame]:
        """Every frame the session has for its transport now. Checks the SENDER protocol."""
        self.decoder.feed(b"".join(self.session.take_output()))
        frames = self.decoder.frames()
        assert self.decoder.buffered == 0
        for f in frames:
            if f.type == FrameType.SENDER:
                ref, uid, gid, pid, origin = wire.decode_sender(f.body)
                assert ref not in self.senders, f"sender {ref} announced twice without a reset"
                self.senders[ref] = (uid, gid, pid, origin)
            elif f.type == FrameType.SENDER_RESET:
                self.senders.clear()
            elif f.type == FrameType.MSG:
                ref = struct.unpack_from("<Q", f.body, 4)[0]
                assert ref in self.senders, f"MSG names sender {ref}, never announced"
        return frames

    def msg(self, f: Frame) -> Msg:
        assert f.type == FrameType.MSG
        sid, ref = struct.unpack_from("<IQ", f.body, 0)
        view = wire.split_block(f.body, 12)
        headers = wire.decode_headers(f.body[view.headers_start : view.headers_end])
        return Msg(sid, self.senders[ref], view.topic, view.reply, headers, f.body[view.headers_end :], f.flags)

    def msgs(self) -> list[Msg]:
        """The MSG frames now waiting, decoded (other frames are dropped)."""
        return [self.msg(f) for f in self.read() if f.type == FrameType.MSG]

    def pub(self, topic: str, data: bytes = b"", *, headers: dict[str, str] | None = None, reply: str = "",
            flags: int = 0) -> None:
        self.send(wire.encode_pub(topic.encode(), data, wire.encode_headers(headers), reply.encode(), flags))

    def sub(self, sid: int, pattern: str, **options: Any) -> list[Frame]:
        """Subscribe and return the frames that answered (retained MSGs, then OK or ERR)."""
        self.send(wire.encode_sub(sid, {"pattern": pattern, **options}))
        return self.read()

    def subscribed(self, sid: int, pattern: str, **options: Any) -> None:
        frames = self.sub(sid, pattern, **options)
        assert frames[-1] == Frame(FrameType.OK, 0, struct.pack("<I", sid)), frames

    @property
    def sender(self) -> tuple[int, int, int, str]:
        return (self.ident.uid, self.ident.gid, self.ident.pid, "")


def err(f: Frame) -> Err:
    assert f.type == FrameType.ERR, f
    code, ref, message = wire.decode_err(f.body)
    return Err(code, ref, message, bool(f.flags & wire.ERR_FATAL))


def only_err(peer: Peer) -> Err:
    frames = peer.read()
    assert len(frames) == 1, frames
    return err(frames[0])


def assert_closed_with(peer: Peer, code: ErrorCode) -> Err:
    e = only_err(peer)
    assert e.code == code, e
    assert e.fatal
    assert e.ref == 0
    assert peer.core.state is State.CLOSED
    assert peer.session.closing
    assert peer.egress.closes == 1
    # Nothing more comes out, whatever the peer sends.
    peer.send(wire.encode_u32(FrameType.PING, 1), wire.encode_hello("x", "y", 1))
    assert peer.read() == []
    return e


def assert_alive(peer: Peer) -> None:
    peer.send(wire.encode_u32(FrameType.PING, 4242))
    assert peer.read() == [Frame(FrameType.PONG, 0, struct.pack("<I", 4242))]
    assert peer.core.state is State.OPEN
    assert peer.egress.closes == 0


@pytest.fixture
def hub() -> Hub:
    return Hub(Config())


def config(**sections: dict[str, Any]) -> Config:
    return parse(dict(sections))


# ---- handshake -------------------------------------------------------------------------------------


def test_welcome(hub: Hub) -> None:
    p = Peer(hub, uid=1234, gid=567, name="svc")
    w = p.welcome
    lim = hub.config.limits
    assert w["protocol"] == wire.PROTOCOL_VERSION
    assert w["server"] == f"hostbusd {__version__}"
    assert w["client_id"] == p.ident.ref
    assert w["identity"] == {"uid": 1234, "gid": 567, "pid": p.ident.pid}
    assert re.fullmatch(r"_INBOX\.[0-9a-f]{16}", w["inbox"])
    assert w["limits"] == {
        "max_frame_bytes": lim.max_frame_bytes,
        "max_subscriptions": lim.max_subscriptions_per_connection,
        "max_topic_bytes": 512,
        "max_headers_bytes": 65535,
        "max_queued_bytes_per_connection": lim.max_queued_bytes_per_connection,
    }
    assert p.core.state is State.OPEN
    assert p.session in hub.sessions
    assert p.session.name == "svc"
    assert p.core.decoder.max_frame == lim.max_frame_bytes


def test_inboxes_differ_between_peers(hub: Hub) -> None:
    a, b = Peer(hub), Peer(hub)
    assert a.inbox != b.inbox
    assert a.welcome["client_id"] != b.welcome["client_id"]


def test_long_name_is_truncated(hub: Hub) -> None:
    p = Peer(hub, name="n" * 1000)
    assert p.session.name == "n" * 128


@pytest.mark.parametrize(
    "hello",
    [
        {"protocol": 0},
        {"protocol": 2},
        {"protocol": "1"},
        {"protocol": None},
        {"name": "no version"},
    ],
)
def test_wrong_protocol_version_is_fatal(hub: Hub, hello: dict[str, Any]) -> None:
    p = Peer(hub, hello=False)
    p.send(wire.encode_json(FrameType.HELLO, hello))
    e = assert_closed_with(p, ErrorCode.HANDSHAKE)
    assert "unsupported protocol version" in e.message
    assert p.session not in hub.sessions
    assert hub.peer_errors == 1


def test_boolean_protocol_version_is_refused(hub: Hub) -> None:
    """JSON ``true`` is not the version number 1 (Python's True == 1 must not let it through)."""
    p = Peer(hub, hello=False)
    p.send(wire.encode_json(FrameType.HELLO, {"protocol": True}))
    assert_closed_with(p, ErrorCode.HANDSHAKE)


@pytest.mark.parametrize(
    "first",
    [
        wire.encode_pub(b"a", b"x"),
        wire.encode_sub(1, {"pattern": "a"}),
        wire.encode_u32(FrameType.PING, 1),
        wire.encode_u32(FrameType.UNSUB, 1),
        wire.encode_call(1, "stats"),
    ],
)
def test_frame_before_hello_is_fatal(hub: Hub, first: bytes) -> None:
    p = Peer(hub, hello=False)
    p.send(first + wire.encode_hello("late", "t", 1))
    e = assert_closed_with(p, ErrorCode.HANDSHAKE)
    assert "expected HELLO as the first frame" in e.message
    assert p.session not in hub.sessions


def test_hello_that_is_not_json_is_fatal(hub: Hub) -> None:
    p = Peer(hub, hello=False)
    p.send(wire.frame(FrameType.HELLO, b"protocol=1"))
    e = assert_closed_with(p, ErrorCode.PROTOCOL)
    assert "invalid JSON" in e.message


def test_deeply_nested_hello_ends_only_that_peer(hub: Hub) -> None:
    """A peer's fault ends that peer with an ERR frame; it must not raise out of receive().

    2000 nested arrays (4000 bytes, well under the 64 KiB handshake limit) make json.loads raise
    RecursionError, which PeerCore.receive does not turn into an ERR.
    """
    p = Peer(hub, hello=False)
    p.send(wire.frame(FrameType.HELLO, b"[" * 2000 + b"]" * 2000))
    assert_closed_with(p, ErrorCode.PROTOCOL)


def test_oversized_hello_refused_from_its_header(hub: Hub) -> None:
    p = Peer(hub, hello=False)
    p.send(struct.pack("<IBB", wire.HANDSHAKE_MAX_FRAME + 1, FrameType.HELLO, 0))
    e = assert_closed_with(p, ErrorCode.FRAME_TOO_LARGE)
    assert str(wire.HANDSHAKE_MAX_FRAME) in e.message


def test_server_frame_from_a_client_is_fatal(hub: Hub) -> None:
    p = Peer(hub, hello=False)
    p.send(wire.encode_u32(FrameType.OK, 1))
    assert_closed_with(p, ErrorCode.UNKNOWN_FRAME)


def test_second_hello_is_fatal(hub: Hub) -> None:
    p = Peer(hub)
    p.send(wire.encode_hello("again", "t", 1))
    e = assert_closed_with(p, ErrorCode.PROTOCOL)
    assert "HELLO is not allowed after the handshake" in e.message


def test_frames_pipelined_with_hello_are_handled(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "big")
    p = Peer(hub, hello=False)
    payload = b"x" * (wire.HANDSHAKE_MAX_FRAME * 2)  # over the handshake limit, under max_frame_bytes
    p.send(
        wire.encode_hello("p", "t", 1)
        + wire.encode_pub(b"big", payload)
        + wire.encode_u32(FrameType.PING, 5)
    )
    assert [f.type for f in p.read()] == [FrameType.WELCOME, FrameType.PONG]
    assert [m.payload for m in s.msgs()] == [payload]


def test_frame_over_max_frame_bytes_after_handshake(hub: Hub) -> None:
    p = Peer(hub)
    p.send(struct.pack("<IBB", hub.config.limits.max_frame_bytes + 1, FrameType.PUB, 0))
    assert_closed_with(p, ErrorCode.FRAME_TOO_LARGE)


def test_byte_by_byte_input(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "a.>")
    p = Peer(hub, hello=False)
    parts = [wire.encode_hello("p", "t", 1), wire.encode_pub(b"a.b", b"1"), wire.encode_pub(b"a.c", b"2")]
    boundaries = set(itertools.accumulate(len(x) for x in parts))
    data = b"".join(parts)
    for i in range(len(data)):
        p.send(data[i : i + 1])
        assert p.core.partial is (i + 1 not in boundaries)
    assert p.core.state is State.OPEN
    assert [(m.topic, m.payload) for m in s.msgs()] == [("a.b", b"1"), ("a.c", b"2")]


# ---- fan-out and wildcards -------------------------------------------------------------------------


def test_fan_out_to_every_subscriber(hub: Hub) -> None:
    subs = [Peer(hub) for _ in range(3)]
    for i, s in enumerate(subs):
        s.subscribed(10 + i, "a.b")
    p = Peer(hub, uid=42, gid=43)
    p.pub("a.b", b"hello", headers={"k": "v"}, reply="x.y")
    for i, s in enumerate(subs):
        assert s.msgs() == [Msg(10 + i, (42, 43, p.ident.pid, ""), "a.b", "x.y", {"k": "v"}, b"hello", 0)]
    assert p.read() == []  # the publisher is not subscribed


def test_no_subscriber_no_delivery(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "a.b")
    p = Peer(hub)
    p.pub("a.c", b"x")
    assert s.read() == []
    assert p.read() == []


def test_wildcards(hub: Hub) -> None:
    s = Peer(hub)
    patterns = {1: "a.*", 2: "a.>", 3: ">", 4: "*.b", 5: "x.>", 6: "a.b.>", 7: "*", 8: "a.b", 9: "*.*.c"}
    for sid, pattern in patterns.items():
        s.subscribed(sid, pattern)
    p = Peer(hub)
    expected = {
        "a.b": {1, 2, 3, 4, 8},
        "a.b.c": {2, 3, 6, 9},
        "a": {3, 7},
        "z.b": {3, 4},
        "x.y.z": {5, 3},
    }
    for topic, sids in expected.items():
        p.pub(topic, topic.encode())
        got = s.msgs()
        assert sorted(m.sid for m in got) == sorted(sids), topic
        assert all(m.topic == topic and m.payload == topic.encode() for m in got)


def test_one_message_per_matching_subscription_of_a_session(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "a.b")
    s.subscribed(2, "a.b")
    s.subscribed(3, "a.*")
    Peer(hub).pub("a.b", b"x")
    assert sorted(m.sid for m in s.msgs()) == [1, 2, 3]


def test_unsubscribe_stops_delivery(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "a")
    s.subscribed(2, "a")
    s.send(wire.encode_u32(FrameType.UNSUB, 1))
    s.send(wire.encode_u32(FrameType.UNSUB, 99))  # unknown sid: ignored
    assert s.read() == []
    Peer(hub).pub("a", b"x")
    assert [m.sid for m in s.msgs()] == [2]
    assert len(hub.router.index) == 1


def test_sid_can_be_reused_after_unsubscribe(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "a")
    s.send(wire.encode_u32(FrameType.UNSUB, 1))
    s.subscribed(1, "b")
    p = Peer(hub)
    p.pub("a", b"1")
    p.pub("b", b"2")
    assert [(m.sid, m.topic) for m in s.msgs()] == [(1, "b")]


def test_publisher_receives_its_own_message_when_subscribed(hub: Hub) -> None:
    p = Peer(hub)
    p.subscribed(1, "a")
    p.pub("a", b"me")
    assert [(m.sid, m.payload, m.sender) for m in p.msgs()] == [(1, b"me", p.sender)]


# ---- queue groups ----------------------------------------------------------------------------------


def test_queue_group_each_message_to_exactly_one_member_round_robin(hub: Hub) -> None:
    workers = [Peer(hub) for _ in range(3)]
    for w in workers:
        w.subscribed(7, "work.*", group="g")
    watcher = Peer(hub)
    watcher.subscribed(1, "work.*")
    p = Peer(hub)
    for i in range(9):
        p.pub("work.item", b"%d" % i)
    got = [[int(m.payload) for m in w.msgs()] for w in workers]
    assert sorted(itertools.chain(*got)) == list(range(9))  # each message exactly once
    assert got == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # in turn
    assert [int(m.payload) for m in watcher.msgs()] == list(range(9))  # plain subscribers get all
    assert len(hub.router.groups) == 1


def test_queue_group_members_on_one_session(hub: Hub) -> None:
    w = Peer(hub)
    w.subscribed(1, "q", group="g")
    w.subscribed(2, "q", group="g")
    p = Peer(hub)
    for i in range(4):
        p.pub("q", b"%d" % i)
    assert [(m.sid, m.payload) for m in w.msgs()] == [(1, b"0"), (2, b"1"), (1, b"2"), (2, b"3")]


def test_groups_are_per_name_and_pattern(hub: Hub) -> None:
    a, b, c = Peer(hub), Peer(hub), Peer(hub)
    a.subscribed(1, "q.*", group="g")
    b.subscribed(1, "q.*", group="h")  # another name: its own group
    c.subscribed(1, "q.>", group="g")  # another pattern: its own group
    Peer(hub).pub("q.x", b"m")
    assert [len(x.msgs()) for x in (a, b, c)] == [1, 1, 1]
    assert len(hub.router.groups) == 3


def test_queue_group_skips_a_paused_member(hub: Hub) -> None:
    a, b = Peer(hub), Peer(hub)
    a.subscribed(1, "q", group="g")
    b.subscribed(1, "q", group="g")
    a.session.paused = True
    p = Peer(hub)
    for i in range(4):
        p.pub("q", b"%d" % i)
    assert a.session.queued_bytes == 0
    assert [m.payload for m in b.msgs()] == [b"0", b"1", b"2", b"3"]


def test_queue_group_member_leaving(hub: Hub) -> None:
    a, b = Peer(hub), Peer(hub)
    a.subscribed(1, "q", group="g")
    b.subscribed(1, "q", group="g")
    a.send(wire.encode_u32(FrameType.UNSUB, 1))
    p = Peer(hub)
    for i in range(3):
        p.pub("q", b"%d" % i)
    assert a.msgs() == []
    assert len(b.msgs()) == 3
    b.send(wire.encode_u32(FrameType.UNSUB, 1))
    assert hub.router.groups == {}
    assert len(hub.router.index) == 0


def test_queue_group_member_closing(hub: Hub) -> None:
    a, b = Peer(hub), Peer(hub)
    a.subscribed(1, "q", group="g")
    b.subscribed(1, "q", group="g")
    hub.close(a.session)
    p = Peer(hub)
    for i in range(3):
        p.pub("q", b"%d" % i)
    assert len(b.msgs()) == 3


def test_queue_group_skips_a_member_that_failed_before_its_transport_closed(hub: Hub) -> None:
    # Regression: a failed member stayed in the group until connection_lost, taking its turn.
    a, b = Peer(hub), Peer(hub)
    a.subscribed(1, "q", group="g")
    b.subscribed(1, "q", group="g")
    a.send(wire.frame(0x7F))  # fatal for a; its transport (a no-op here) never reports the close
    assert a.session.closing
    p = Peer(hub)
    for i in range(4):
        p.pub("q", b"%d" % i)
    assert [m.payload for m in b.msgs()] == [b"0", b"1", b"2", b"3"]
    assert hub.stats()["connections"] == 2  # b and p


def test_disconnect_overflow_is_counted_as_a_peer_error(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "t", policy="disconnect", max_msgs=1)
    s.session.paused = True
    p = Peer(hub)
    for _ in range(3):
        p.pub("t", b"x")
    assert s.session.closing
    assert hub.stats()["peer_errors"] == 1
    assert hub.stats()["subscriptions"] == 0


def test_a_turn_has_a_work_budget_and_the_rest_follows(hub: Hub) -> None:
    from hostbusd.core.peer import TURN_BUDGET

    s = Peer(hub)
    s.subscribed(1, "t")
    p = Peer(hub)
    n = TURN_BUDGET  # each PUB costs 2 units here (itself and one delivery)
    more = p.core.receive(b"".join(wire.encode_pub(b"t", b"%d" % i) for i in range(n)))
    assert more
    first = len(s.msgs())
    assert first == n // 2
    while p.core.process():
        pass
    assert first + len(s.msgs()) == n


# ---- retained --------------------------------------------------------------------------------------


def test_retained_delivered_first_with_the_flag(hub: Hub) -> None:
    p = Peer(hub)
    p.pub("r.a", b"old", flags=wire.PUB_RETAIN)
    p.pub("r.a", b"new", flags=wire.PUB_RETAIN)
    p.pub("r.b", b"b", flags=wire.PUB_RETAIN)
    p.pub("r.c", b"not retained")
    p.pub("other", b"o", flags=wire.PUB_RETAIN)
    s = Peer(hub)
    frames = s.sub(1, "r.*")
    assert frames[-1].type == FrameType.OK
    retained = [s.msg(f) for f in frames if f.type == FrameType.MSG]
    assert sorted((m.topic, m.payload) for m in retained) == [("r.a", b"new"), ("r.b", b"b")]
    assert all(m.flags == wire.MSG_RETAINED and m.sid == 1 and m.sender == p.sender for m in retained)
    p.pub("r.a", b"live")
    assert [(m.payload, m.flags) for m in s.msgs()] == [(b"live", 0)]


def test_retained_precedes_live_messages_of_a_paused_subscriber(hub: Hub) -> None:
    p = Peer(hub)
    p.pub("r", b"stored", flags=wire.PUB_RETAIN)
    s = Peer(hub)
    s.send(wire.encode_sub(1, {"pattern": "r"}))
    p.pub("r", b"live")
    assert [(m.payload, m.flags) for m in s.msgs()] == [(b"stored", wire.MSG_RETAINED), (b"live", 0)]


def test_retained_deleted_by_empty_payload(hub: Hub) -> None:
    p = Peer(hub)
    p.pub("r.a", b"v", flags=wire.PUB_RETAIN, headers={"h": "x"})
    assert len(hub.router.retained) == 1
    s1 = Peer(hub)
    s1.subscribed(1, "r.a")
    p.pub("r.a", b"", flags=wire.PUB_RETAIN)
    # The deleting message is itself delivered to current subscribers...
    assert [(m.payload, m.flags) for m in s1.msgs()] == [(b"", 0)]
    # ...and nothing is left for new ones.
    assert len(hub.router.retained) == 0
    assert hub.router.retained.nbytes == 0
    s2 = Peer(hub)
    assert s2.sub(1, "r.>") == [Frame(FrameType.OK, 0, struct.pack("<I", 1))]


def test_retained_payload_length_ignores_headers(hub: Hub) -> None:
    # An empty payload with headers still deletes: the payload is what follows the headers.
    p = Peer(hub)
    p.pub("r", b"v", flags=wire.PUB_RETAIN)
    p.pub("r", b"", flags=wire.PUB_RETAIN, headers={"reason": "gone"})
    assert len(hub.router.retained) == 0


def test_queue_group_members_do_not_get_retained(hub: Hub) -> None:
    p = Peer(hub)
    p.pub("r", b"v", flags=wire.PUB_RETAIN)
    w = Peer(hub)
    assert w.sub(1, "r", group="g") == [Frame(FrameType.OK, 0, struct.pack("<I", 1))]


def test_retained_limit_is_a_non_fatal_error_and_the_message_is_delivered() -> None:
    hub = Hub(config(retained={"max_topics": 1}))
    s = Peer(hub)
    s.subscribed(1, "r.>")
    p = Peer(hub)
    p.pub("r.a", b"1", flags=wire.PUB_RETAIN)
    p.pub("r.b", b"2", flags=wire.PUB_RETAIN)
    e = only_err(p)
    assert (e.code, e.ref, e.fatal) == (ErrorCode.LIMIT, 0, False)
    assert "retained.max_topics" in e.message
    assert [m.payload for m in s.msgs()] == [b"1", b"2"]
    assert len(hub.router.retained) == 1
    p.pub("r.a", b"replace", flags=wire.PUB_RETAIN)  # replacing an existing topic is fine
    assert p.read() == []
    assert_alive(p)


# ---- inboxes and requests --------------------------------------------------------------------------


def test_inbox_routes_only_to_its_owner(hub: Hub) -> None:
    owner, other = Peer(hub), Peer(hub)
    other.subscribed(1, ">")
    other.subscribed(2, "*.>")
    responder = Peer(hub, uid=77)
    responder.pub(owner.inbox + ".1", b"reply", headers={"status": "ok"})
    assert owner.msgs() == [
        Msg(0, responder.sender, owner.inbox + ".1", "", {"status": "ok"}, b"reply", 0)
    ]
    assert other.msgs() == []
    assert responder.msgs() == []


def test_inbox_of_nobody_goes_nowhere(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, ">")
    p = Peer(hub)
    p.pub("_INBOX.0123456789abcdef.1", b"x")
    assert s.read() == []
    assert p.read() == []


def test_inbox_of_a_closed_session_goes_nowhere(hub: Hub) -> None:
    owner = Peer(hub)
    hub.close(owner.session)
    Peer(hub).pub(owner.inbox + ".1", b"x")
    assert owner.msgs() == []


def test_request_reply(hub: Hub) -> None:
    requester, responder = Peer(hub), Peer(hub)
    responder.subscribed(1, "svc.echo")
    reply = requester.inbox + ".1"
    requester.pub("svc.echo", b"ping", reply=reply, flags=wire.PUB_REQUEST)
    (req,) = responder.msgs()
    assert (req.topic, req.reply, req.payload) == ("svc.echo", reply, b"ping")
    responder.pub(req.reply, b"pong")
    assert [(m.sid, m.topic, m.payload) for m in requester.msgs()] == [(0, reply, b"pong")]


def test_noresp_for_a_request_with_no_subscriber(hub: Hub) -> None:
    requester = Peer(hub)
    reply = requester.inbox + ".9"
    requester.pub("svc.nobody", b"?", reply=reply, flags=wire.PUB_REQUEST)
    assert requester.read() == [Frame(FrameType.NORESP, 0, reply.encode())]
    assert hub.stats()["messages"]["no_responders"] == 1


def test_noresp_for_a_request_to_the_inbox_of_a_closed_connection(hub: Hub) -> None:
    gone = Peer(hub)
    hub.close(gone.session)
    p = Peer(hub)
    reply = p.inbox + ".1"
    p.pub(gone.inbox + ".3", b"?", reply=reply, flags=wire.PUB_REQUEST)
    assert p.read() == [Frame(FrameType.NORESP, 0, reply.encode())]


def test_no_noresp_without_the_request_flag(hub: Hub) -> None:
    p = Peer(hub)
    p.pub("svc.nobody", b"?", reply=p.inbox + ".1")
    assert p.read() == []
    assert hub.stats()["messages"]["no_responders"] == 0


def test_no_noresp_when_a_queue_group_answers(hub: Hub) -> None:
    w = Peer(hub)
    w.subscribed(1, "svc", group="workers")
    p = Peer(hub)
    p.pub("svc", b"?", reply=p.inbox + ".1", flags=wire.PUB_REQUEST)
    assert p.read() == []
    assert len(w.msgs()) == 1


def test_request_flag_without_reply_is_fatal(hub: Hub) -> None:
    p = Peer(hub)
    p.pub("svc", b"?", flags=wire.PUB_REQUEST)
    e = assert_closed_with(p, ErrorCode.PROTOCOL)
    assert "no reply subject" in e.message


# ---- sender identity -------------------------------------------------------------------------------


def test_sender_announced_once_per_sender_per_subscriber(hub: Hub) -> None:
    s1, s2 = Peer(hub), Peer(hub)
    s1.subscribed(1, "t.*")
    s1.subscribed(2, "t.>")
    s2.subscribed(1, "t.a")
    p1, p2 = Peer(hub, uid=1, gid=2), Peer(hub, uid=3, gid=4)
    p1.pub("t.a", b"1")
    p1.pub("t.a", b"2")
    p2.pub("t.a", b"3")
    p1.pub("t.a", b"4")

    frames = s1.read()
    kinds = [f.type for f in frames]
    assert kinds.count(FrameType.SENDER) == 2
    announced = [wire.decode_sender(f.body) for f in frames if f.type == FrameType.SENDER]
    assert [a[0] for a in announced] == [p1.welcome["client_id"], p2.welcome["client_id"]]
    assert announced == [
        (p1.ident.ref, 1, 2, p1.ident.pid, ""),
        (p2.ident.ref, 3, 4, p2.ident.pid, ""),
    ]
    # Each SENDER comes right before the first MSG that names it.
    assert kinds[0] == FrameType.SENDER
    assert kinds[:6] == [FrameType.SENDER, FrameType.MSG, FrameType.MSG, FrameType.MSG, FrameType.MSG,
                         FrameType.SENDER]
    msgs = [s1.msg(f) for f in frames if f.type == FrameType.MSG]
    assert [(m.payload, m.sender[0]) for m in msgs] == [
        (b"1", 1), (b"1", 1), (b"2", 1), (b"2", 1), (b"3", 3), (b"3", 3), (b"4", 1), (b"4", 1),
    ]

    frames = s2.read()
    assert [f.type for f in frames].count(FrameType.SENDER) == 2  # announced again on s2's connection
    assert [m.payload for m in (s2.msg(f) for f in frames if f.type == FrameType.MSG)] == [b"1", b"2", b"3", b"4"]

    p1.pub("t.a", b"5")  # already known on both connections: no SENDER
    assert [f.type for f in s1.read()] == [FrameType.MSG, FrameType.MSG]
    assert [f.type for f in s2.read()] == [FrameType.MSG]


def test_sender_reset_after_max_known_senders(hub: Hub) -> None:
    limit = session_mod.MAX_KNOWN_SENDERS
    s = Peer(hub)
    s.subscribed(1, "t")
    block = wire.message_block(b"t", b"x")
    idents = [hub.identity(5000 + i, 5000, 1 + i) for i in range(limit + 1)]
    for ident in idents[:limit]:
        hub.router.publish(ident, "t", block)
    frames = s.read()
    assert [f.type for f in frames].count(FrameType.SENDER) == limit
    assert FrameType.SENDER_RESET not in [f.type for f in frames]

    hub.router.publish(idents[limit], "t", block)  # one sender too many
    frames = s.read()
    assert [f.type for f in frames] == [FrameType.SENDER_RESET, FrameType.SENDER, FrameType.MSG]
    assert wire.decode_sender(frames[1].body)[0] == idents[limit].ref

    hub.router.publish(idents[0], "t", block)  # forgotten by the reset: announced again
    frames = s.read()
    assert [f.type for f in frames] == [FrameType.SENDER, FrameType.MSG]
    assert wire.decode_sender(frames[0].body)[:4] == (idents[0].ref, 5000, 5000, 1)

    hub.router.publish(idents[limit], "t", block)  # still known since the reset
    assert [f.type for f in s.read()] == [FrameType.MSG]


def test_origin_of_a_non_socket_sender_is_announced(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "t")
    ident = hub.identity(0, 0, 1, origin="fifo:/run/hostbus/publish.fifo")
    hub.router.publish(ident, "t", wire.message_block(b"t", b"x"))
    assert [m.sender for m in s.msgs()] == [(0, 0, 1, "fifo:/run/hostbus/publish.fifo")]


# ---- paused sessions: queueing, policies, gaps -----------------------------------------------------


def _payloads(msgs: list[Msg]) -> list[bytes]:
    return [m.payload for m in msgs]


@pytest.mark.parametrize(
    ("policy", "kept"),
    [("drop-oldest", [b"2", b"3", b"4"]), ("drop-new", [b"0", b"1", b"2"])],
)
def test_paused_session_queues_applies_policy_and_reports_the_gap(hub: Hub, policy: str, kept: list[bytes]) -> None:
    s = Peer(hub)
    s.subscribed(9, "t", policy=policy, max_msgs=3)
    p = Peer(hub)
    p.pub("t", b"first")
    assert _payloads(s.msgs()) == [b"first"]  # the sender is known from now on

    s.session.paused = True
    for i in range(5):
        p.pub("t", b"%d" % i)
    assert s.read() == []  # nothing is written while paused
    assert s.session.has_backlog
    assert s.session.queued_bytes == 3 * len(wire.message_block(b"t", b"0"))
    assert s.session.dropped == 2

    s.session.paused = False
    frames = s.read()
    assert [f.type for f in frames] == [FrameType.GAP, FrameType.MSG, FrameType.MSG, FrameType.MSG]
    assert wire.decode_gap(frames[0].body) == (9, 2)
    assert [s.msg(f).payload for f in frames[1:]] == kept
    assert s.session.queued_bytes == 0
    assert not s.session.has_backlog

    p.pub("t", b"after")  # no loss since the last GAP: no new GAP
    assert [f.type for f in s.read()] == [FrameType.MSG]
    assert hub.stats()["messages"]["dropped"] == 2


def test_gap_goes_before_the_first_message_but_after_its_sender(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "t", policy="drop-oldest", max_msgs=1)
    s.session.paused = True
    p = Peer(hub)
    for i in range(4):
        p.pub("t", b"%d" % i)
    s.session.paused = False
    frames = s.read()
    assert [f.type for f in frames] == [FrameType.SENDER, FrameType.GAP, FrameType.MSG]
    assert wire.decode_gap(frames[1].body) == (1, 3)
    assert s.msg(frames[2]).payload == b"3"


def test_gaps_are_per_subscription(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "t", policy="drop-new", max_msgs=1)
    s.subscribed(2, "t", policy="drop-new", max_msgs=10)
    p = Peer(hub)
    p.pub("t", b"known")
    s.read()
    s.session.paused = True
    for i in range(3):
        p.pub("t", b"%d" % i)
    s.session.paused = False
    gaps = [wire.decode_gap(f.body) for f in s.read() if f.type == FrameType.GAP]
    assert gaps == [(1, 2)]


def test_gap_alone_when_every_queued_message_was_dropped(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "t", policy="drop-new", max_bytes=16)
    p = Peer(hub)
    p.pub("t", b"k")
    s.read()
    s.session.paused = True
    p.pub("t", b"x" * 100)  # larger than the subscription's queue
    assert s.session.queued_bytes == 0
    s.session.paused = False
    frames = s.read()
    assert [f.type for f in frames] == [FrameType.GAP]
    assert wire.decode_gap(frames[0].body) == (1, 1)
    p.pub("t", b"y")
    assert _payloads(s.msgs()) == [b"y"]


def test_disconnect_policy_ends_the_slow_subscriber(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "t", policy="disconnect", max_msgs=2)
    other = Peer(hub)
    other.subscribed(1, "t")
    s.session.paused = True
    p = Peer(hub)
    for i in range(3):
        p.pub("t", b"%d" % i)
    assert s.egress.closes == 1
    assert s.session.closing
    frames = s.read()
    assert [f.type for f in frames] == [FrameType.ERR]  # queued messages are not written any more
    e = err(frames[0])
    assert (e.code, e.fatal) == (ErrorCode.SLOW_CONSUMER, True)
    assert "subscription 1" in e.message
    # The publisher and the other subscriber are unaffected.
    assert len(other.msgs()) == 3
    assert_alive(p)


def test_backlog_is_round_robin_across_subscriptions(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "a")
    s.subscribed(2, "b")
    p = Peer(hub)
    p.pub("a", b"k")
    s.read()
    s.session.paused = True
    for t in ("a", "a", "a", "b", "b"):
        p.pub(t, t.encode())
    s.session.paused = False
    assert [m.sid for m in s.msgs()] == [1, 2, 1, 2, 1]


def test_order_kept_when_publishing_after_resume_before_the_backlog_is_written(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "t")
    s.session.paused = True
    p = Peer(hub)
    p.pub("t", b"1")
    p.pub("t", b"2")
    s.session.paused = False
    p.pub("t", b"3")  # the queue is not empty yet: this must wait behind 1 and 2
    assert _payloads(s.msgs()) == [b"1", b"2", b"3"]


def test_connection_budget_is_shared_by_subscriptions() -> None:
    budget = 64 * 1024
    hub = Hub(config(limits={"max_queued_bytes_per_connection": budget}))
    s = Peer(hub)
    s.subscribed(1, "a", policy="drop-new")
    s.subscribed(2, "b", policy="drop-oldest")
    p = Peer(hub)
    p.pub("a", b"k")
    p.pub("b", b"k")
    s.read()
    s.session.paused = True
    big = b"x" * 20_000
    for _ in range(3):
        p.pub("a", big)  # 3 x ~20 KB fit in 64 KiB
    assert s.session.queued_bytes <= budget
    p.pub("b", big)  # b's own queue is empty: nothing of its own to drop
    assert s.session.queued_bytes <= budget
    assert s.session.dropped == 1
    s.session.paused = False
    frames = s.read()
    gaps = [wire.decode_gap(f.body) for f in frames if f.type == FrameType.GAP]
    assert gaps == [(2, 1)]
    assert [s.msg(f).sid for f in frames if f.type == FrameType.MSG] == [1, 1, 1]


def test_unsubscribe_forgets_queued_messages(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "t")
    s.session.paused = True
    p = Peer(hub)
    p.pub("t", b"1")
    assert s.session.queued_bytes > 0
    s.send(wire.encode_u32(FrameType.UNSUB, 1))
    assert s.session.queued_bytes == 0
    assert not s.session.has_backlog
    s.session.paused = False
    assert s.msgs() == []


# ---- wake and close calls --------------------------------------------------------------------------


def test_wake_is_asked_once_per_flush_and_urgently_past_a_batch() -> None:
    hub = Hub(config(limits={"write_batch_bytes": 4096}))
    s = Peer(hub)
    assert s.egress.wakes == [False]  # the WELCOME
    s.session.flush_pending = False  # what the transport does when it flushes
    s.subscribed(1, "t")
    assert s.egress.wakes == [False, False]
    p = Peer(hub)
    p.pub("t", b"a")
    p.pub("t", b"b")
    assert s.egress.wakes == [False, False]  # a flush is already pending
    p.pub("t", b"x" * 5000)
    assert s.egress.wakes[-1] is True  # a full batch is written at once
    assert s.egress.closes == 0


# ---- refused publishes -----------------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["a..b", "a.*", "a.>", "", "a b", ".a", "a.", "x" * 513])
def test_invalid_topic_in_pub_is_fatal(hub: Hub, topic: str) -> None:
    s = Peer(hub)
    s.subscribed(1, ">")
    p = Peer(hub)
    p.send(wire.encode_pub(topic.encode(), b"x"), wire.encode_u32(FrameType.PING, 1))
    e = assert_closed_with(p, ErrorCode.INVALID_TOPIC)  # and the PING after it is not answered
    assert "invalid topic" in e.message
    assert s.read() == []
    assert hub.peer_errors == 1


def test_topic_not_utf8_is_fatal(hub: Hub) -> None:
    p = Peer(hub)
    p.send(wire.encode_pub(b"a.\xff", b"x"))
    assert_closed_with(p, ErrorCode.INVALID_TOPIC)


@pytest.mark.parametrize("topic", ["$SYS.x", "$SYS", "$other.stats"])
def test_publishing_on_a_reserved_topic_is_refused(hub: Hub, topic: str) -> None:
    s = Peer(hub)
    s.subscribed(1, "$SYS.>")
    s.subscribed(2, topic)
    p = Peer(hub)
    p.pub(topic, b"forged")
    e = assert_closed_with(p, ErrorCode.INVALID_TOPIC)
    assert "reserved for the broker" in e.message
    assert s.read() == []


def test_malformed_headers_in_pub_are_fatal(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "t")
    p = Peer(hub)
    bad_headers = struct.pack("<HHH", 1, 5, 0) + b"ab"  # key runs past the block
    p.send(wire.encode_pub(b"t", b"x", bad_headers))
    assert_closed_with(p, ErrorCode.INVALID_HEADERS)
    assert s.read() == []


def test_pub_with_inconsistent_block_lengths_is_fatal(hub: Hub) -> None:
    p = Peer(hub)
    p.send(wire.frame(FrameType.PUB, struct.pack("<HHI", 50, 0, 0) + b"t"))
    assert_closed_with(p, ErrorCode.PROTOCOL)


def test_fatal_error_stops_the_rest_of_the_batch(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "t")
    p = Peer(hub)
    p.send(wire.encode_pub(b"t", b"1"), wire.encode_pub(b"bad..topic", b"2"), wire.encode_pub(b"t", b"3"))
    assert _payloads(s.msgs()) == [b"1"]
    assert_closed_with(p, ErrorCode.INVALID_TOPIC)


def test_a_failed_peer_keeps_its_subscriptions_until_the_transport_closes_it(hub: Hub) -> None:
    # The core ends the peer (fatal ERR, egress.close); the transport then calls hub.close.
    p = Peer(hub)
    p.subscribed(1, "t")
    p.pub("$SYS.x", b"")
    assert p.egress.closes == 1
    hub.close(p.session)
    assert p.session not in hub.sessions
    assert len(hub.router.index) == 0
    assert p.session.inbox_token not in hub.router.inboxes


# ---- refused subscriptions -------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["_INBOX.x", "_INBOX.>", "_INBOX.*.1", "_INBOX"])
def test_subscribing_to_an_inbox_is_refused_non_fatally(hub: Hub, pattern: str) -> None:
    p = Peer(hub)
    frames = p.sub(5, pattern)
    assert len(frames) == 1
    e = err(frames[0])
    assert (e.code, e.ref, e.fatal) == (ErrorCode.PERMISSION_DENIED, 5, False)
    assert "inbox" in e.message
    assert p.session.subs == {}
    assert_alive(p)


def test_inbox_owner_cannot_subscribe_to_its_own_inbox_pattern_either(hub: Hub) -> None:
    p = Peer(hub)
    e = err(p.sub(1, p.inbox + ".>")[0])
    assert e.code == ErrorCode.PERMISSION_DENIED


BAD_SUBS: list[tuple[dict[str, Any], ErrorCode, str]] = [
    ({}, ErrorCode.INVALID_ARGUMENT, "'pattern' must be a string"),
    ({"pattern": 5}, ErrorCode.INVALID_ARGUMENT, "'pattern' must be a string"),
    ({"pattern": None}, ErrorCode.INVALID_ARGUMENT, "'pattern' must be a string"),
    ({"pattern": "a..b"}, ErrorCode.INVALID_TOPIC, "invalid pattern"),
    ({"pattern": "a.>.b"}, ErrorCode.INVALID_TOPIC, "invalid pattern"),
    ({"pattern": ""}, ErrorCode.INVALID_TOPIC, "invalid pattern"),
    ({"pattern": "a", "group": ""}, ErrorCode.INVALID_ARGUMENT, "'group'"),
    ({"pattern": "a", "group": "a b"}, ErrorCode.INVALID_ARGUMENT, "'group'"),
    ({"pattern": "a", "group": "g" * 256}, ErrorCode.INVALID_ARGUMENT, "'group'"),
    ({"pattern": "a", "group": 7}, ErrorCode.INVALID_ARGUMENT, "'group'"),
    ({"pattern": "a", "policy": "drop-everything"}, ErrorCode.INVALID_ARGUMENT, "'policy'"),
    ({"pattern": "a", "policy": 3}, ErrorCode.INVALID_ARGUMENT, "'policy'"),
    ({"pattern": "a", "max_msgs": -1}, ErrorCode.INVALID_ARGUMENT, "'max_msgs' must be a positive integer"),
    ({"pattern": "a", "max_msgs": "5"}, ErrorCode.INVALID_ARGUMENT, "'max_msgs' must be a positive integer"),
    ({"pattern": "a", "max_msgs": 1.5}, ErrorCode.INVALID_ARGUMENT, "'max_msgs' must be a positive integer"),
    ({"pattern": "a", "max_msgs": True}, ErrorCode.INVALID_ARGUMENT, "'max_msgs' must be a positive integer"),
    ({"pattern": "a", "max_bytes": -5}, ErrorCode.INVALID_ARGUMENT, "'max_bytes' must be a positive integer"),
    ({"pattern": "a", "max_bytes": [1]}, ErrorCode.INVALID_ARGUMENT, "'max_bytes' must be a positive integer"),
]


@pytest.mark.parametrize(("options", "code", "text"), BAD_SUBS)
def test_sub_with_bad_options_is_a_non_fatal_error(hub: Hub, options: dict[str, Any], code: ErrorCode,
                                                   text: str) -> None:
    p = Peer(hub)
    p.send(wire.encode_sub(31, options))
    e = only_err(p)
    assert (e.code, e.ref, e.fatal) == (code, 31, False)
    assert text in e.message
    assert p.session.subs == {}
    assert len(hub.router.index) == 0
    assert_alive(p)
    assert hub.peer_errors == 1


@pytest.mark.parametrize("key", ["max_msgs", "max_bytes"])
def test_sub_with_zero_bound_is_refused(hub: Hub, key: str) -> None:
    """0 is not a positive integer; it must be refused like -1, not replaced by the default."""
    p = Peer(hub)
    p.send(wire.encode_sub(31, {"pattern": "a", key: 0}))
    e = only_err(p)
    assert (e.code, e.ref, e.fatal) == (ErrorCode.INVALID_ARGUMENT, 31, False)
    assert p.session.subs == {}


@pytest.mark.parametrize(
    "options", [{"pattern": "a.\ud800"}, {"pattern": "a", "group": "g\ud800"}], ids=["pattern", "group"]
)
def test_sub_with_unencodable_strings_is_a_non_fatal_error(hub: Hub, options: dict[str, Any]) -> None:
    """JSON may carry a lone surrogate ("\\ud800"); it cannot be a pattern or group name.

    The SUB must be refused with an ERR frame; instead UnicodeEncodeError escapes receive().
    """
    p = Peer(hub)
    p.send(wire.encode_sub(31, options))  # json.dumps escapes the surrogate: the bytes are ASCII
    e = only_err(p)
    assert (e.ref, e.fatal) == (31, False)
    assert p.session.subs == {}


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"\xff"])
def test_sub_with_a_body_that_is_not_a_json_object(hub: Hub, raw: bytes) -> None:
    # A SUB whose options cannot be read at all comes from a broken client: fatal, like any
    # malformed frame (valid JSON with bad values is a non-fatal INVALID_ARGUMENT instead).
    p = Peer(hub)
    p.send(wire.frame(FrameType.SUB, struct.pack("<I", 8) + raw))
    assert_closed_with(p, ErrorCode.PROTOCOL)


def test_sub_too_short_for_its_sid_is_fatal(hub: Hub) -> None:
    p = Peer(hub)
    p.send(wire.frame(FrameType.SUB, b"\x01\x00"))
    assert_closed_with(p, ErrorCode.PROTOCOL)


def test_duplicate_and_reserved_sids(hub: Hub) -> None:
    p = Peer(hub)
    p.subscribed(1, "a")
    e = err(p.sub(1, "b")[0])
    assert (e.code, e.ref, e.fatal) == (ErrorCode.DUPLICATE_ID, 1, False)
    assert "already in use" in e.message
    assert list(p.session.subs) == [1]
    assert_alive(p)
    p.send(wire.encode_sub(0, {"pattern": "b"}))  # sid 0 is the inbox: an ERR could not name it
    assert_closed_with(p, ErrorCode.PROTOCOL)


def test_subscription_limit() -> None:
    hub = Hub(config(limits={"max_subscriptions_per_connection": 2}))
    p = Peer(hub)
    p.subscribed(1, "a")
    p.subscribed(2, "b")
    e = err(p.sub(3, "c")[0])
    assert (e.code, e.ref, e.fatal) == (ErrorCode.LIMIT, 3, False)
    assert "limits.max_subscriptions_per_connection" in e.message
    p.send(wire.encode_u32(FrameType.UNSUB, 1))
    p.subscribed(3, "c")


def test_max_bytes_is_capped_by_the_connection_budget() -> None:
    budget = 64 * 1024
    hub = Hub(config(limits={"max_queued_bytes_per_connection": budget}))
    p = Peer(hub)
    p.subscribed(1, "a", max_bytes=10 * budget, max_msgs=3, policy="drop-new")
    q = p.session.subs[1].queue
    assert (q.max_bytes, q.max_msgs, q.policy) == (budget, 3, "drop-new")


def test_subscription_defaults_come_from_the_config() -> None:
    hub = Hub(config(subscriptions={"policy": "drop-new", "max_queued_msgs": 5, "max_queued_bytes": 2048}))
    p = Peer(hub)
    p.subscribed(1, "a")
    q = p.session.subs[1].queue
    assert (q.policy, q.max_msgs, q.max_bytes) == ("drop-new", 5, 2048)


# ---- PING and CALL ---------------------------------------------------------------------------------


def test_ping_pong(hub: Hub) -> None:
    p = Peer(hub)
    p.send(wire.encode_u32(FrameType.PING, 0), wire.encode_u32(FrameType.PING, 0xFFFFFFFF))
    assert [wire.split_u32(f.body)[0] for f in p.read()] == [0, 0xFFFFFFFF]


def _call(p: Peer, call_id: int, op: str) -> dict[str, Any]:
    p.send(wire.encode_call(call_id, op))
    (f,) = p.read()
    assert f.type == FrameType.RESULT
    got_id, raw = wire.split_u32(f.body)
    assert got_id == call_id
    return wire.decode_json_obj(raw)


def test_call_whoami(hub: Hub) -> None:
    p = Peer(hub, uid=11, gid=22)
    assert _call(p, 3, "whoami") == p.welcome


def test_call_unknown_op(hub: Hub) -> None:
    p = Peer(hub)
    p.send(wire.encode_call(6, "reboot"))
    e = only_err(p)
    assert (e.code, e.ref, e.fatal) == (ErrorCode.INVALID_ARGUMENT, 6, False)
    assert "reboot" in e.message
    assert_alive(p)


# ---- stats -----------------------------------------------------------------------------------------


def test_stats_counters() -> None:
    hub = Hub(config(stats={"max_topics": 2}))
    s = Peer(hub)
    s.subscribed(1, "t.*")
    s.subscribed(2, "u", group="g")
    p = Peer(hub)
    blocks = []
    for topic, data, flags in [("t.a", b"1", 0), ("t.a", b"22", 0), ("u", b"3", 0), ("t.b", b"44", wire.PUB_RETAIN),
                               ("zz", b"5", 0)]:
        p.pub(topic, data, flags=flags)
        blocks.append(wire.message_block(topic.encode(), data))
    p.pub("nobody", b"?", reply=p.inbox + ".1", flags=wire.PUB_REQUEST)
    blocks.append(wire.message_block(b"nobody", b"?", b"", (p.inbox + ".1").encode()))
    p.pub(s.inbox + ".1", b"r")
    p.pub(s.inbox + ".2", b"r")
    blocks += [wire.message_block((s.inbox + f".{i}").encode(), b"r") for i in (1, 2)]
    p.read()
    s.read()

    st = hub.stats()
    assert st["connections"] == 2
    assert st["connections_total"] == 2
    assert st["subscriptions"] == 2
    assert st["queue_groups"] == 1
    assert st["retained"] == {"topics": 1, "bytes": len(wire.message_block(b"t.b", b"44"))}
    m = st["messages"]
    assert m["in"] == 8
    assert m["bytes_in"] == sum(len(b) for b in blocks)
    assert m["out"] == 6  # t.a x2, u, t.b, and two inbox replies
    assert m["dropped"] == 0
    assert m["no_responders"] == 1
    assert st["topics"] == {"t.a": 2, "u": 1, "(other)": 5}  # only 2 topics get their own counter
    assert st["peer_errors"] == 0
    assert p.session.msgs_in == 8
    assert s.session.msgs_out == 6


def test_stats_inbox_topics_are_counted_together(hub: Hub) -> None:
    p = Peer(hub)
    for i in range(3):
        p.pub(f"_INBOX.x{i}.1", b"r")
    assert hub.stats()["topics"] == {"_INBOX": 3}


def test_stats_through_call(hub: Hub) -> None:
    p = Peer(hub)
    p.subscribed(1, "a")
    p.pub("a", b"x")
    p.read()
    st = _call(p, 1, "stats")
    assert st["connections"] == 1
    assert st["subscriptions"] == 1
    assert st["messages"]["in"] == 1
    assert st["messages"]["out"] == 1
    json.dumps(st)


def test_stats_survive_closed_sessions_and_count_peer_errors(hub: Hub) -> None:
    s = Peer(hub)
    s.subscribed(1, "t", policy="drop-new", max_msgs=1)
    p = Peer(hub)
    s.session.paused = True
    for _ in range(3):
        p.pub("t", b"x")
    s.session.paused = False
    s.read()
    hub.close(s.session)
    bad = Peer(hub)
    bad.pub("a..b")
    bad.send(wire.encode_sub(1, {"pattern": "_INBOX.>"}))
    p.send(wire.encode_sub(1, {"pattern": "_INBOX.>"}))
    st = hub.stats()
    assert st["connections"] == 1  # only p: a failed peer is detached at once, before its transport closes
    assert st["connections_total"] == 3
    assert st["subscriptions"] == 0
    assert st["messages"]["out"] == 1
    assert st["messages"]["dropped"] == 2
    assert st["peer_errors"] == 2  # bad's fatal error, p's refused SUB (bad's SUB came after its end)


def test_peer_errors_reach_the_sink() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    hub = Hub(Config(), on_peer_error=lambda kind, **fields: seen.append((kind, fields)))
    p = Peer(hub, uid=99, name="culprit")
    p.pub("$SYS.x")
    assert len(seen) == 1
    kind, fields = seen[0]
    assert kind == "peer_error"
    assert fields["code"] == "INVALID_TOPIC"
    assert (fields["uid"], fields["name"], fields["peer"]) == (99, "culprit", p.ident.ref)


def test_stats_over_many_topics() -> None:
    # msgs_in counts publishes, out counts deliveries, topics count publishes per topic.
    hub = Hub(Config())
    subs = [Peer(hub) for _ in range(4)]
    for i, s in enumerate(subs):
        s.subscribed(1, "x.>" if i % 2 else "x.*")
    p = Peer(hub)
    topics = [f"x.{i % 3}" for i in range(30)] + [f"x.{i}.deep" for i in range(10)]
    for t in topics:
        p.pub(t, b"d")
    for s in subs:
        s.read()
    st = hub.stats()
    assert st["messages"]["in"] == 40
    assert st["messages"]["out"] == 30 * 4 + 10 * 2
    expected = {f"x.{i}": 10 for i in range(3)} | {f"x.{i}.deep": 1 for i in range(10)}
    assert Counter(st["topics"]) == Counter(expected)
