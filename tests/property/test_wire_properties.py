"""Property tests (Hypothesis) of the codec, the broker's peer core and the topic index.

1. Any bytes fed to a Decoder give frames or RemoteProtocolError, nothing else; PeerCore turns any
   bytes into frames or a fatal ERR, and never raises.
2. Valid frames fed byte by byte, or in any chunks, decode exactly as when fed at once.
3. PUB and MSG message blocks round-trip with any topic, reply, headers and payload.
4. TopicIndex.match agrees with hostbus.topics.matches, the reference definition.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections import Counter
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from hostbus import topics, wire
from hostbus.errors import ErrorCode, RemoteProtocolError
from hostbus.wire import NEED_DATA, Decoder, Frame, FrameType
from hostbusd.config import Config
from hostbusd.core.hub import Hub
from hostbusd.core.index import TopicIndex
from hostbusd.core.peer import PeerCore, State

ACCEPT_SETS = {"client": wire.CLIENT_FRAMES, "server": wire.SERVER_FRAMES}
DECODER_ERRORS = {ErrorCode.PROTOCOL, ErrorCode.FRAME_TOO_LARGE, ErrorCode.UNKNOWN_FRAME}
U32_MAX = 0xFFFFFFFF

# ---- strategies ------------------------------------------------------------------------------------

# Topic tokens: printable text without '.', '*', '>' or whitespace, plus a few fixed ones.
_token_chars = st.characters(
    codec="utf-8", exclude_characters=".*>", exclude_categories=("Zs", "Zl", "Zp", "Cc", "Cs")
)
tokens = st.one_of(st.sampled_from(["a", "b", "sensors", "$SYS", "ü", "x-1"]),
                   st.text(_token_chars, min_size=1, max_size=6))
valid_topics = st.lists(tokens, min_size=1, max_size=5).map(".".join).filter(lambda t: topics.topic_problem(t) is None)
header_maps = st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=12), max_size=4)
payloads = st.binary(max_size=64)


def _header(length: int, ftype: int, flags: int) -> bytes:
    return struct.pack("<IBB", length, ftype, flags)


@st.composite
def frameish(draw: st.DrawFn) -> bytes:
    """Bytes that look like frames often enough to reach every branch of a decoder."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.binary(max_size=24))
    ftype = draw(st.one_of(st.sampled_from(sorted(wire.CLIENT_FRAMES | wire.SERVER_FRAMES)), st.integers(0, 255)))
    flags = draw(st.integers(0, 255))
    body = draw(st.binary(max_size=40))
    if kind == 1:  # consistent length
        return _header(len(body) + 2, ftype, flags) + body
    if kind == 2:  # any length, any body
        length = draw(st.one_of(st.integers(0, 64), st.integers(0, U32_MAX)))
        return _header(length, ftype, flags) + body
    if kind == 3:  # a header alone
        return _header(draw(st.integers(0, U32_MAX)), ftype, flags)
    return _header(len(body) + 2, ftype, flags) + body[: draw(st.integers(0, len(body)))]  # truncated


garbage = st.lists(frameish(), max_size=8).map(b"".join)


def drain_next_frame(dec: Decoder) -> tuple[list[Frame], int | None]:
    """Frames from next_frame() until NEED_DATA, and the error code if one was raised."""
    out: list[Frame] = []
    while True:
        try:
            f = dec.next_frame()
        except RemoteProtocolError as exc:
            return out, exc.code
        if f is NEED_DATA:
            return out, None
        assert isinstance(f, Frame)
        out.append(f)


def drain_frames(dec: Decoder) -> tuple[list[Frame], int | None]:
    out: list[Frame] = []
    while True:
        try:
            batch = dec.frames()
        except RemoteProtocolError as exc:
            return out, exc.code
        if not batch:
            return out, None
        out += batch


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# ---- (1) any input: frames or a protocol error -----------------------------------------------------


@given(data=garbage, side=st.sampled_from(sorted(ACCEPT_SETS)), max_frame=st.integers(0, 100))
def test_decoder_gives_frames_or_a_protocol_error(data: bytes, side: str, max_frame: int) -> None:
    accept = ACCEPT_SETS[side]
    one = Decoder(accept, max_frame)
    one.feed(data)
    singles, error1 = drain_next_frame(one)
    batch = Decoder(accept, max_frame)
    batch.feed(data)
    batched, error2 = drain_frames(batch)

    assert singles == batched  # the two APIs agree, error included
    assert error1 == error2
    assert error1 is None or error1 in DECODER_ERRORS
    for f in singles:
        assert f.type in accept
        assert len(f.body) + 2 <= max_frame
    if error1 is None:  # no error: what was not returned is less than one whole frame
        assert one.buffered == batch.buffered
        assert one.buffered == len(data) - sum(len(f.body) + 6 for f in singles)


@given(data=st.binary(max_size=200), side=st.sampled_from(sorted(ACCEPT_SETS)))
def test_decoder_on_raw_random_bytes(data: bytes, side: str) -> None:
    dec = Decoder(ACCEPT_SETS[side], 1 << 20)
    dec.feed(data)
    frames, error = drain_frames(dec)
    assert error is None or error in DECODER_ERRORS
    assert all(f.type in ACCEPT_SETS[side] for f in frames)


class _Egress:
    def __init__(self) -> None:
        self.closes = 0

    def wake(self, urgent: bool) -> None:
        pass

    def close(self) -> None:
        self.closes += 1


def _new_peer(hub: Hub, hello: bool) -> PeerCore:
    core = PeerCore(hub, hub.identity(1000, 1000, 4321))
    core.session.egress = _Egress()
    if hello:
        core.receive(wire.encode_hello("fuzz", "test", wire.PROTOCOL_VERSION))
    return core


def _output(core: PeerCore) -> list[Frame]:
    """Decode everything the session produced; it must be valid server frames, nothing left over."""
    dec = Decoder(wire.SERVER_FRAMES, 1 << 30)
    dec.feed(b"".join(core.session.take_output()))
    frames, error = drain_frames(dec)
    assert error is None
    assert dec.buffered == 0
    return frames


def _check_ending(core: PeerCore, frames: list[Frame]) -> None:
    fatal = [f for f in frames if f.type == FrameType.ERR and f.flags & wire.ERR_FATAL]
    egress = core.session.egress
    assert isinstance(egress, _Egress)
    if core.state is State.CLOSED:
        assert len(fatal) == 1
        assert frames[-1] is fatal[0]  # the reason is the last thing written
        code, ref, message = wire.decode_err(fatal[0].body)
        assert code in set(ErrorCode)
        assert ref == 0
        assert message
        assert egress.closes == 1
    else:
        assert fatal == []
        assert egress.closes == 0


@given(data=garbage, cuts=st.lists(st.integers(0, 400), max_size=4), handshake=st.booleans())
def test_peer_core_never_raises_on_garbage(data: bytes, cuts: list[int], handshake: bool) -> None:
    hub = Hub(Config())
    core = _new_peer(hub, handshake)
    for piece in chunked(data, cuts):
        core.receive(piece)
    _check_ending(core, _output(core))


# JSON values for SUB options, including strings that cannot be encoded (JSON "\ud800" escapes).
_odd_text = st.lists(st.sampled_from(["a", "b", ".", "*", ">", " ", "é", "\x85", "\ud800", "_INBOX", "$"]),
                     max_size=6).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | _odd_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
sub_options = st.fixed_dictionaries(
    {},
    optional={
        "pattern": st.one_of(valid_topics, st.sampled_from([">", "a.*", "*.>", "_INBOX.>"]), _odd_text, json_values),
        "group": st.one_of(st.sampled_from(["g", "h"]), _odd_text, json_values),
        "policy": st.one_of(st.sampled_from(wire.POLICIES), json_values),
        "max_msgs": st.one_of(st.integers(-2, 4), json_values),
        "max_bytes": st.one_of(st.integers(-2, 100_000), json_values),
    },
)
_utf8ish = st.one_of(valid_topics, _odd_text).map(lambda s: s.encode("utf-8", "surrogatepass"))
pub_frames = st.builds(
    wire.encode_pub,
    _utf8ish,
    payloads,
    st.one_of(header_maps.map(wire.encode_headers), st.binary(max_size=12)),
    st.one_of(st.just(b""), _utf8ish),
    st.integers(0, 255),
)
client_frames = st.one_of(
    pub_frames,
    st.builds(wire.encode_sub, st.integers(0, 4), sub_options),
    st.builds(wire.encode_u32, st.sampled_from([FrameType.UNSUB, FrameType.PING]), st.integers(0, 4)),
    st.builds(wire.encode_call, st.integers(0, U32_MAX), st.one_of(st.sampled_from(["stats", "whoami"]), _odd_text)),
    st.builds(lambda t, f, b: wire.frame(t, b, f), st.sampled_from(sorted(wire.CLIENT_FRAMES)),
              st.integers(0, 255), st.binary(max_size=30)),
    st.just(wire.encode_hello("again", "t", 1)),
    frameish(),
)


@given(frames=st.lists(client_frames, max_size=12), cuts=st.lists(st.integers(0, 2000), max_size=4))
@example(frames=[wire.frame(FrameType.PUB, b"ab")], cuts=[])  # regression: short PUB body raised struct.error
def test_peer_core_never_raises_on_plausible_frames(frames: list[bytes], cuts: list[int]) -> None:
    """Frames that are nearly right reach deeper than garbage: SUB options, PUB blocks, CALLs."""
    hub = Hub(Config())
    watcher = _new_peer(hub, True)
    watcher.receive(wire.encode_sub(1, {"pattern": ">"}))
    watcher.receive(wire.encode_sub(2, {"pattern": "$SYS.>"}))
    core = _new_peer(hub, True)
    for piece in chunked(b"".join(frames), cuts):
        core.receive(piece)
    _check_ending(core, _output(core))
    # Whatever the fuzzed peer did, the watcher's output is valid and it is still open.
    seen = _output(watcher)
    senders: set[int] = set()
    for f in seen:
        if f.type == FrameType.SENDER:
            senders.add(wire.decode_sender(f.body)[0])
        elif f.type == FrameType.MSG:
            assert struct.unpack_from("<Q", f.body, 4)[0] in senders
            view = wire.split_block(f.body, 12)
            assert topics.topic_problem(view.topic) is None
            assert not view.topic.startswith("$")  # clients cannot publish on broker topics
    assert watcher.state is State.OPEN


@given(options=st.lists(st.tuples(st.integers(1, 4), sub_options), min_size=1, max_size=6))  # sid 0: fatal
def test_peer_core_answers_every_sub(options: list[tuple[int, dict[str, Any]]]) -> None:
    """Every SUB, whatever its options, gets OK or a non-fatal ERR naming its sid; nothing raises."""
    hub = Hub(Config())
    core = _new_peer(hub, True)
    _output(core)
    for sid, opts in options:
        core.receive(wire.encode_sub(sid, opts))
        frames = _output(core)
        assert core.state is State.OPEN
        answer = frames[-1]
        if answer.type == FrameType.OK:
            assert wire.split_u32(answer.body) == (sid, b"")
            assert sid in core.session.subs
        else:
            assert answer.type == FrameType.ERR
            assert not answer.flags & wire.ERR_FATAL
            assert wire.decode_err(answer.body)[1] == sid


# ---- (2) byte by byte and any chunking equal all at once ----------------------------------------------


def _msg(sid: int, ref: int, topic: str, data: bytes, flags: int) -> bytes:
    block = wire.message_block(topic.encode(), data)
    return wire.msg_header(sid, ref, len(block), flags) + block


server_frames = st.one_of(
    st.builds(_msg, st.integers(0, U32_MAX), st.integers(0, 2**64 - 1), valid_topics, payloads, st.integers(0, 255)),
    st.builds(wire.encode_sender, st.integers(0, 2**64 - 1), st.integers(0, U32_MAX), st.integers(0, U32_MAX),
              st.integers(0, U32_MAX), st.text(max_size=10)),
    st.builds(wire.encode_err, st.integers(0, 0xFFFF), st.integers(0, U32_MAX), st.text(max_size=20), st.booleans()),
    st.builds(wire.encode_gap, st.integers(0, U32_MAX), st.integers(0, 2**64 - 1)),
    st.builds(wire.encode_u32, st.sampled_from([FrameType.OK, FrameType.PONG]), st.integers(0, U32_MAX)),
    st.builds(lambda t, f, b: wire.frame(t, b, f), st.sampled_from(sorted(wire.SERVER_FRAMES)),
              st.integers(0, 255), st.binary(max_size=50)),
)
valid_client_frames = st.one_of(
    st.builds(lambda t, d, h, r, f: wire.encode_pub(t.encode(), d, wire.encode_headers(h), r.encode(), f),
              valid_topics, payloads, header_maps, st.one_of(st.just(""), valid_topics), st.integers(0, 255)),
    st.builds(wire.encode_sub, st.integers(0, U32_MAX), st.dictionaries(st.text(max_size=5), st.text(max_size=5))),
    st.builds(wire.encode_hello, st.one_of(st.none(), st.text(max_size=10)), st.text(max_size=10),
              st.integers(0, 10)),
    st.builds(wire.encode_call, st.integers(0, U32_MAX), st.text(max_size=10)),
    st.builds(lambda t, f, b: wire.frame(t, b, f), st.sampled_from(sorted(wire.CLIENT_FRAMES)),
              st.integers(0, 255), st.binary(max_size=50)),
)
streams = st.one_of(
    st.tuples(st.just("server"), st.lists(server_frames, max_size=10)),
    st.tuples(st.just("client"), st.lists(valid_client_frames, max_size=10)),
)


@given(stream=streams, cuts=st.lists(st.integers(0, 3000), max_size=10))
def test_any_chunking_decodes_like_all_at_once(stream: tuple[str, list[bytes]], cuts: list[int]) -> None:
    side, encoded = stream
    accept = ACCEPT_SETS[side]
    data = b"".join(encoded)

    whole = Decoder(accept, 1 << 20)
    whole.feed(data)
    expected = whole.frames()
    assert [wire.frame(f.type, f.body, f.flags) for f in expected] == encoded  # and re-encodes exactly
    assert whole.buffered == 0

    byte_by_byte = Decoder(accept, 1 << 20)
    got: list[Frame] = []
    for i in range(len(data)):
        byte_by_byte.feed(data[i : i + 1])
        got += drain_next_frame(byte_by_byte)[0]
    assert got == expected

    pieces = Decoder(accept, 1 << 20)
    got = []
    for piece in chunked(data, cuts):
        pieces.feed(piece)
        got += pieces.frames()
    assert got == expected
    assert pieces.buffered == 0


# ---- (3) message blocks round-trip ------------------------------------------------------------------


@given(topic=valid_topics, reply=st.one_of(st.just(""), valid_topics), headers=header_maps, data=payloads,
       flags=st.integers(0, 255))
def test_pub_round_trip(topic: str, reply: str, headers: dict[str, str], data: bytes, flags: int) -> None:
    block_headers = wire.encode_headers(headers)
    encoded = wire.encode_pub(topic.encode(), data, block_headers, reply.encode(), flags)
    dec = Decoder(wire.CLIENT_FRAMES, 1 << 20)
    dec.feed(encoded)
    f = dec.next_frame()
    assert isinstance(f, Frame)
    assert (f.type, f.flags) == (FrameType.PUB, flags)
    view = wire.split_block(f.body)
    assert (view.topic, view.reply) == (topic, reply)
    assert wire.decode_headers(f.body[view.headers_start : view.headers_end]) == headers
    assert f.body[view.headers_end :] == data
    assert f.body == wire.message_block(topic.encode(), data, block_headers, reply.encode())


@given(sid=st.integers(0, U32_MAX), ref=st.integers(0, 2**64 - 1), topic=valid_topics,
       reply=st.one_of(st.just(""), valid_topics), headers=header_maps, data=payloads, flags=st.integers(0, 255))
def test_msg_round_trip(sid: int, ref: int, topic: str, reply: str, headers: dict[str, str], data: bytes,
                        flags: int) -> None:
    block = wire.message_block(topic.encode(), data, wire.encode_headers(headers), reply.encode())
    dec = Decoder(wire.SERVER_FRAMES, 1 << 20)
    dec.feed(wire.msg_header(sid, ref, len(block), flags) + block)
    (f,) = dec.frames()
    assert (f.type, f.flags) == (FrameType.MSG, flags)
    assert struct.unpack_from("<IQ", f.body) == (sid, ref)
    assert f.body[12:] == block
    view = wire.split_block(f.body, 12)
    assert (view.topic, view.reply) == (topic, reply)
    assert wire.decode_headers(f.body[view.headers_start : view.headers_end]) == headers
    assert f.body[view.headers_end :] == data


@given(headers=header_maps)
def test_headers_round_trip(headers: dict[str, str]) -> None:
    assert wire.decode_headers(wire.encode_headers(headers)) == headers


@given(block=st.binary(max_size=40))
def test_header_and_block_parsers_raise_only_protocol_errors(block: bytes) -> None:
    for parse in (wire.decode_headers, wire.split_block):
        with contextlib.suppress(RemoteProtocolError):
            parse(block)


@given(topic=valid_topics, data=payloads, headers=header_maps)
def test_publish_through_the_broker_delivers_the_same_block(topic: str, data: bytes,
                                                           headers: dict[str, str]) -> None:
    hub = Hub(Config())
    sub = _new_peer(hub, True)
    sub.receive(wire.encode_sub(1, {"pattern": topic}))
    pub = _new_peer(hub, True)
    _output(sub)
    _output(pub)
    encoded = wire.encode_pub(topic.encode(), data, wire.encode_headers(headers))
    pub.receive(encoded)
    out = _output(pub)
    if topic.startswith("$"):
        assert out[-1].type == FrameType.ERR
        assert wire.decode_err(out[-1].body)[0] == ErrorCode.INVALID_TOPIC
        assert _output(sub) == []
        return
    assert out == []
    msgs = [f for f in _output(sub) if f.type == FrameType.MSG]
    assert len(msgs) == 1
    assert msgs[0].body[12:] == encoded[6:]  # the PUB body is forwarded unchanged


# ---- (4) TopicIndex.match agrees with the reference ---------------------------------------------------

# A small alphabet so that patterns and topics often collide. '$' is included for the reserved-topic
# rule; '_INBOX' is not: inbox topics never reach the index (the router routes them to their owner).
_small_tokens = st.sampled_from(["a", "b", "c", "$s"])
small_topics = st.lists(_small_tokens, min_size=1, max_size=4).map(".".join)


@st.composite
def small_patterns(draw: st.DrawFn) -> str:
    toks = draw(st.lists(st.one_of(_small_tokens, st.just("*")), min_size=1, max_size=4))
    if draw(st.booleans()):
        toks[-1] = ">"
    return ".".join(toks)


@given(patterns=st.lists(small_patterns(), max_size=12), probes=st.lists(small_topics, min_size=1, max_size=8),
       removals=st.lists(st.integers(0, 11), max_size=8))
def test_index_agrees_with_the_reference(patterns: list[str], probes: list[str], removals: list[int]) -> None:
    for p in patterns:
        assert topics.pattern_problem(p) is None
    index: TopicIndex[int] = TopicIndex()
    live: dict[int, str] = {}
    for i, p in enumerate(patterns):
        index.add(p, i)
        live[i] = p

    def check() -> None:
        assert len(index) == len(live)
        for t in probes:
            expected = Counter(i for i, p in live.items() if topics.matches(p, t))
            assert Counter(index.match(t)) == expected, (t, live)
            assert Counter(index.match(t)) == expected  # again, from the cache

    check()
    for r in removals:
        if r in live:
            assert index.remove(live.pop(r), r)
        else:
            assert not index.remove(patterns[r] if r < len(patterns) else "a", r)
        check()
    for i, p in list(live.items()):
        assert index.remove(p, i)
    assert index._root.empty()


@given(topic=small_topics, pattern=small_patterns())
def test_reference_rules(topic: str, pattern: str) -> None:
    """Cross-checks of matches() itself against the rules stated in hostbus.topics."""
    result = topics.matches(pattern, topic)
    ptoks, ttoks = pattern.split("."), topic.split(".")
    if ptoks[-1] == ">":
        if len(ttoks) < len(ptoks):
            assert not result  # '>' needs at least one token
    elif len(ptoks) != len(ttoks):
        assert not result
    if topic.startswith("$") and ptoks[0] in ("*", ">"):
        assert not result
    if pattern == topic:
        assert result


# ---- (5) large frames received in place (Decoder.big) ---------------------------------------------------


@given(data=st.lists(frameish() | st.binary(min_size=20, max_size=300).map(
           lambda b: _header(len(b) + 2, FrameType.MSG, 0) + b), max_size=8).map(b"".join),
       cuts=st.lists(st.integers(0, 3000), max_size=12), big=st.integers(6, 120), use_reserve=st.booleans())
def test_receiving_large_frames_in_place_gives_the_same_frames(data: bytes, cuts: list[int], big: int,
                                                               use_reserve: bool) -> None:
    whole = Decoder(wire.SERVER_FRAMES, 1000)
    whole.feed(data)
    expected, error = drain_frames(whole)
    dec = Decoder(wire.SERVER_FRAMES, 1000, big=big)
    got: list[Frame] = []
    got_error = None
    pieces = chunked(data, cuts)
    try:
        while pieces:
            target = dec.reserve() if use_reserve else None
            piece = pieces.pop(0)
            if target is not None:  # as a reader receiving into the frame's own buffer
                n = min(len(target), len(piece))
                target[:n] = piece[:n]
                dec.filled(n)
                if n < len(piece):
                    pieces.insert(0, piece[n:])
            else:
                dec.feed(piece)
            got += [Frame(f.type, f.flags, bytes(f.body)) for f in dec.frames()]
        rest, got_error = drain_frames(dec)
        got += [Frame(f.type, f.flags, bytes(f.body)) for f in rest]
    except RemoteProtocolError as exc:
        got_error = exc.code
    assert got == expected
    assert got_error == error


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=60), st.booleans())
def test_run_payloads_gives_back_what_was_encoded_whether_or_not_the_items_are_of_one_size(
        payloads: list[bytes], same_size: bool) -> None:
    if same_size:  # the strided check of one-size runs
        payloads = [p.ljust(8, b".")[:8] for p in payloads]
    body = wire.encode_run(b"t", payloads)[6:]
    items_at = 9
    assert wire.run_payloads(body, items_at) == payloads
    assert wire.run_payloads(body, items_at, len(body), len(payloads)) == payloads
    with pytest.raises(RemoteProtocolError):
        wire.run_payloads(body, items_at, count=len(payloads) + 1)


@given(st.binary(min_size=4, max_size=64), st.integers(min_value=0, max_value=60),
       st.integers(min_value=1, max_value=8))
def test_run_payloads_of_any_bytes_either_refuses_them_or_reads_exactly_them(
        raw: bytes, length: int, repeat: int) -> None:
    # Items of one claimed size, one of whose length bytes may have been changed: the strided
    # check must not accept what the item-by-item reading refuses, nor read something else.
    body = (struct.pack("<I", length) + raw[:length].ljust(length, b"z")) * repeat
    flip = raw[0] % len(body)
    body = body[:flip] + bytes([body[flip] ^ (raw[-1] | 1)]) + body[flip + 1:]
    try:
        got = wire.run_payloads(body, 0)
    except RemoteProtocolError:
        return
    assert b"".join(struct.pack("<I", len(p)) + p for p in got) == body

