"""Unit tests of the sans-IO codec: hostbus.wire (codec.py, frames.py)."""

from __future__ import annotations

import json
import struct

import pytest

from hostbus import wire
from hostbus.errors import (
    ErrorCode,
    InvalidHeadersError,
    MessageTooLargeError,
    RemoteProtocolError,
)
from hostbus.wire import NEED_DATA, Decoder, Frame, FrameType
from hostbus.wire.frames import HEADER, MAX_HEADERS_BYTES, MSG_BLOCK, U32

BIG = 1 << 30


def decode_all(data: bytes, accept: frozenset[int] = wire.SERVER_FRAMES, max_frame: int = BIG) -> list[Frame]:
    dec = Decoder(accept, max_frame)
    dec.feed(data)
    frames = dec.frames()
    assert dec.buffered == 0, "bytes left over after a whole number of frames"
    return frames


def only(data: bytes, accept: frozenset[int] = wire.SERVER_FRAMES) -> Frame:
    frames = decode_all(data, accept)
    assert len(frames) == 1
    return frames[0]


# ---- frame layout -------------------------------------------------------------------------------


def test_frame_layout_is_length_type_flags_body() -> None:
    data = wire.frame(0x42, b"abc", flags=0x07)
    assert data == struct.pack("<IBB", 5, 0x42, 0x07) + b"abc"
    assert wire.HEADER_SIZE == 6


def test_frame_types_split_by_direction() -> None:
    assert set(wire.CLIENT_FRAMES) == {1, 2, 3, 4, 5, 6, 7, 8, 9}
    assert set(wire.SERVER_FRAMES) == set(range(0x81, 0x8E))
    assert not wire.CLIENT_FRAMES & wire.SERVER_FRAMES


# ---- encode/decode of every frame type ------------------------------------------------------------


def test_hello_round_trip() -> None:
    f = only(wire.encode_hello("svc", "hostbus-py/0.1", wire.PROTOCOL_VERSION), wire.CLIENT_FRAMES)
    assert f.type == FrameType.HELLO
    assert f.flags == 0
    assert wire.decode_json_obj(f.body) == {"protocol": 1, "name": "svc", "client": "hostbus-py/0.1"}


def test_hello_without_name() -> None:
    f = only(wire.encode_hello(None, "c", 7), wire.CLIENT_FRAMES)
    assert wire.decode_json_obj(f.body) == {"protocol": 7, "name": None, "client": "c"}


def test_pub_round_trip_with_every_part() -> None:
    headers = wire.encode_headers({"k": "v", "ünï": "cödé"})
    data = wire.encode_pub(b"a.b.c", b"payload\x00\xff", headers, b"_INBOX.x.1", flags=wire.PUB_REQUEST)
    f = only(data, wire.CLIENT_FRAMES)
    assert f.type == FrameType.PUB
    assert f.flags == wire.PUB_REQUEST
    view = wire.split_block(f.body)
    assert view.topic == "a.b.c"
    assert view.reply == "_INBOX.x.1"
    assert wire.decode_headers(f.body[view.headers_start : view.headers_end]) == {"k": "v", "ünï": "cödé"}
    assert f.body[view.headers_end :] == b"payload\x00\xff"
    # The PUB body is exactly the message block, so the broker can forward it unchanged.
    assert f.body == wire.message_block(b"a.b.c", b"payload\x00\xff", headers, b"_INBOX.x.1")


def test_pub_minimal() -> None:
    f = only(wire.encode_pub(b"t", b""), wire.CLIENT_FRAMES)
    assert f.body == MSG_BLOCK.pack(1, 0, 0) + b"t"
    view = wire.split_block(f.body)
    assert view == wire.BlockView("t", "", 9, 9)


def test_pub_retain_flag() -> None:
    f = only(wire.encode_pub(b"t", b"x", flags=wire.PUB_RETAIN), wire.CLIENT_FRAMES)
    assert f.flags == wire.PUB_RETAIN


def test_pub_max_frame_is_the_length_field_limit() -> None:
    # length field = 2 (type, flags) + 8 (block header) + topic + payload
    topic, payload = b"t", b"x" * 89
    length = 10 + len(topic) + len(payload)
    assert length == 100
    data = wire.encode_pub(topic, payload, max_frame=100)
    assert struct.unpack_from("<I", data)[0] == 100
    with pytest.raises(MessageTooLargeError, match="101 bytes"):
        wire.encode_pub(topic, payload + b"y", max_frame=100)


def test_sub_round_trip() -> None:
    f = only(wire.encode_sub(0xDEADBEEF, {"pattern": "a.*", "group": "g"}), wire.CLIENT_FRAMES)
    assert f.type == FrameType.SUB
    sid, rest = wire.split_u32(f.body)
    assert sid == 0xDEADBEEF
    assert wire.decode_json_obj(rest) == {"pattern": "a.*", "group": "g"}


@pytest.mark.parametrize(
    ("ftype", "accept"),
    [
        (FrameType.UNSUB, wire.CLIENT_FRAMES),
        (FrameType.PING, wire.CLIENT_FRAMES),
        (FrameType.PONG, wire.SERVER_FRAMES),
        (FrameType.OK, wire.SERVER_FRAMES),
    ],
)
def test_u32_frames_round_trip(ftype: FrameType, accept: frozenset[int]) -> None:
    data = wire.encode_u32(ftype, 0x01020304)
    assert len(data) == 10
    f = only(data, accept)
    assert f == Frame(ftype, 0, b"\x04\x03\x02\x01")
    assert wire.split_u32(f.body) == (0x01020304, b"")


def test_call_round_trip() -> None:
    f = only(wire.encode_call(9, "stats", {"x": 1}), wire.CLIENT_FRAMES)
    assert f.type == FrameType.CALL
    call_id, raw = wire.split_u32(f.body)
    assert call_id == 9
    assert wire.decode_json_obj(raw) == {"op": "stats", "x": 1}
    f = only(wire.encode_call(10, "whoami"), wire.CLIENT_FRAMES)
    assert wire.decode_json_obj(wire.split_u32(f.body)[1]) == {"op": "whoami"}


def test_welcome_and_result_json_round_trip() -> None:
    f = only(wire.encode_json(FrameType.WELCOME, {"protocol": 1, "inbox": "_INBOX.ab"}))
    assert f.type == FrameType.WELCOME
    assert wire.decode_json_obj(f.body) == {"protocol": 1, "inbox": "_INBOX.ab"}
    f = only(wire.encode_json(FrameType.RESULT, {"ok": True}, U32.pack(77)))
    assert f.type == FrameType.RESULT
    call_id, raw = wire.split_u32(f.body)
    assert (call_id, wire.decode_json_obj(raw)) == (77, {"ok": True})


def test_msg_round_trip() -> None:
    block = wire.message_block(b"s.t", b"data", wire.encode_headers({"h": "1"}), b"r.s")
    data = wire.msg_header(5, 2**40 + 3, len(block), wire.MSG_RETAINED) + block
    f = only(data)
    assert f.type == FrameType.MSG
    assert f.flags == wire.MSG_RETAINED
    sid, ref = struct.unpack_from("<IQ", f.body, 0)
    assert (sid, ref) == (5, 2**40 + 3)
    view = wire.split_block(f.body, 12)
    assert (view.topic, view.reply) == ("s.t", "r.s")
    assert wire.decode_headers(f.body[view.headers_start : view.headers_end]) == {"h": "1"}
    assert f.body[view.headers_end :] == b"data"


def test_sender_round_trip() -> None:
    f = only(wire.encode_sender(2**63, 1000, 100, 4242, "fifo:/run/x.fifo"))
    assert f.type == FrameType.SENDER
    assert wire.decode_sender(f.body) == (2**63, 1000, 100, 4242, "fifo:/run/x.fifo")
    f = only(wire.encode_sender(1, 0, 0, 1))
    assert wire.decode_sender(f.body) == (1, 0, 0, 1, "")


def test_sender_reset_and_noresp() -> None:
    assert only(wire.frame(FrameType.SENDER_RESET)) == Frame(FrameType.SENDER_RESET, 0, b"")
    assert only(wire.frame(FrameType.NORESP, b"_INBOX.a.1")) == Frame(FrameType.NORESP, 0, b"_INBOX.a.1")


def test_err_round_trip_and_fatal_flag() -> None:
    f = only(wire.encode_err(ErrorCode.INVALID_TOPIC, 12, "bad tøpic", fatal=True))
    assert f.type == FrameType.ERR
    assert f.flags == wire.ERR_FATAL
    assert wire.decode_err(f.body) == (ErrorCode.INVALID_TOPIC, 12, "bad tøpic")
    f = only(wire.encode_err(ErrorCode.LIMIT, 0, "", fatal=False))
    assert f.flags == 0
    assert wire.decode_err(f.body) == (ErrorCode.LIMIT, 0, "")


def test_gap_round_trip() -> None:
    f = only(wire.encode_gap(3, 2**50))
    assert f.type == FrameType.GAP
    assert wire.decode_gap(f.body) == (3, 2**50)


# ---- body decoders reject short or malformed bodies ----------------------------------------------


@pytest.mark.parametrize("body", [b"", b"\x01\x02\x03\x04\x05", b"\x00" * 13])
def test_gap_wrong_size(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="GAP"):
        wire.decode_gap(body)


def test_err_too_short() -> None:
    with pytest.raises(RemoteProtocolError, match="ERR frame too short"):
        wire.decode_err(b"\x01\x00\x00")


def test_err_message_with_bad_utf8_is_replaced_not_raised() -> None:
    code, ref, msg = wire.decode_err(struct.pack("<HI", 1, 2) + b"\xff")
    assert (code, ref) == (1, 2)
    assert msg == "\ufffd"


def test_sender_too_short() -> None:
    with pytest.raises(RemoteProtocolError, match="SENDER frame too short"):
        wire.decode_sender(b"\x00" * 19)


@pytest.mark.parametrize("body", [b"", b"\x01\x02\x03"])
def test_split_u32_too_short(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="4-byte id"):
        wire.split_u32(body)


@pytest.mark.parametrize("raw", [b"", b"{", b"{'a': 1}", b"\xff\xfe", b"{}x"])
def test_decode_json_obj_invalid(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="invalid JSON"):
        wire.decode_json_obj(raw)


@pytest.mark.parametrize("raw", [b"[]", b"1", b'"s"', b"null"])
def test_decode_json_obj_not_an_object(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="must be an object"):
        wire.decode_json_obj(raw)


def test_decode_json_obj_deeply_nested_is_a_protocol_error() -> None:
    """Anything the peer sent that is not valid protocol raises RemoteProtocolError (codec docstring).

    2000 nested arrays fit easily in a handshake frame; json.loads raises RecursionError on them,
    which must not escape the codec as a different exception.
    """
    raw = b"[" * 2000 + b"]" * 2000
    with pytest.raises(RemoteProtocolError):
        wire.decode_json_obj(raw)


# ---- Decoder: next_frame vs frames, NEED_DATA --------------------------------------------------------


def test_need_data_on_empty_and_partial_input() -> None:
    dec = Decoder(wire.SERVER_FRAMES, BIG)
    assert dec.next_frame() is NEED_DATA
    assert dec.frames() == []
    data = wire.encode_gap(1, 2)
    for i in range(len(data) - 1):
        dec.feed(data[i : i + 1])
        assert dec.next_frame() is NEED_DATA
        assert dec.buffered == i + 1
    dec.feed(data[-1:])
    assert dec.next_frame() == Frame(FrameType.GAP, 0, wire.frames.GAP.pack(1, 2))
    assert dec.next_frame() is NEED_DATA
    assert dec.buffered == 0


def test_frames_on_partial_input_returns_complete_ones_only() -> None:
    a = wire.encode_u32(FrameType.OK, 1)
    b = wire.encode_u32(FrameType.OK, 2)
    dec = Decoder(wire.SERVER_FRAMES, BIG)
    dec.feed(a + b[:7])
    assert dec.frames() == [Frame(FrameType.OK, 0, U32.pack(1))]
    assert dec.buffered == 7
    assert dec.frames() == []
    dec.feed(b[7:])
    assert dec.frames() == [Frame(FrameType.OK, 0, U32.pack(2))]
    assert dec.buffered == 0


def test_next_frame_and_frames_agree() -> None:
    data = (
        wire.encode_u32(FrameType.OK, 1)
        + wire.encode_err(1, 2, "x", fatal=False)
        + wire.frame(FrameType.SENDER_RESET)
        + wire.encode_gap(4, 5)
    )
    batch = Decoder(wire.SERVER_FRAMES, BIG)
    batch.feed(data)
    one = Decoder(wire.SERVER_FRAMES, BIG)
    one.feed(data)
    singles = []
    while (f := one.next_frame()) is not NEED_DATA:
        singles.append(f)
    assert batch.frames() == singles
    assert [f.type for f in singles] == [FrameType.OK, FrameType.ERR, FrameType.SENDER_RESET, FrameType.GAP]


def test_mixing_next_frame_and_frames() -> None:
    frames = [wire.encode_u32(FrameType.PONG, i) for i in range(5)]
    dec = Decoder(wire.SERVER_FRAMES, BIG)
    dec.feed(b"".join(frames[:3]))
    assert dec.next_frame() == Frame(FrameType.PONG, 0, U32.pack(0))
    dec.feed(b"".join(frames[3:]))
    assert [wire.split_u32(f.body)[0] for f in dec.frames()] == [1, 2, 3, 4]
    assert dec.next_frame() is NEED_DATA


def test_empty_body_frame_is_valid() -> None:
    assert decode_all(HEADER.pack(2, FrameType.SENDER_RESET, 0)) == [Frame(FrameType.SENDER_RESET, 0, b"")]


# ---- Decoder: errors from the header alone ----------------------------------------------------------


@pytest.mark.parametrize("method", ["next_frame", "frames"])
def test_oversized_frame_refused_from_the_header_alone(method: str) -> None:
    dec = Decoder(wire.CLIENT_FRAMES, 1000)
    dec.feed(HEADER.pack(1001, FrameType.PUB, 0))  # only the 6-byte header; no body yet
    with pytest.raises(RemoteProtocolError) as info:
        getattr(dec, method)()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert "1001" in str(info.value)
    assert "1000" in str(info.value)


@pytest.mark.parametrize("method", ["next_frame", "frames"])
def test_frame_at_the_limit_is_accepted(method: str) -> None:
    dec = Decoder(wire.CLIENT_FRAMES, 1000)
    dec.feed(HEADER.pack(1000, FrameType.PUB, 0))
    assert (dec.next_frame() is NEED_DATA) if method == "next_frame" else (dec.frames() == [])
    dec.feed(b"\x00" * 998)
    got = dec.next_frame() if method == "next_frame" else dec.frames()[0]
    assert got == Frame(FrameType.PUB, 0, b"\x00" * 998)


@pytest.mark.parametrize("method", ["next_frame", "frames"])
def test_incomplete_header_is_not_judged(method: str) -> None:
    dec = Decoder(wire.CLIENT_FRAMES, 1000)
    dec.feed(HEADER.pack(0xFFFFFFFF, 0xEE, 0)[:5])
    assert (dec.next_frame() is NEED_DATA) if method == "next_frame" else (dec.frames() == [])


@pytest.mark.parametrize("method", ["next_frame", "frames"])
@pytest.mark.parametrize(
    ("accept", "ftype"),
    [
        (wire.CLIENT_FRAMES, FrameType.MSG),  # a server frame sent to the server
        (wire.SERVER_FRAMES, FrameType.PUB),  # a client frame sent to the client
        (wire.CLIENT_FRAMES, 0x00),
        (wire.CLIENT_FRAMES, 0x0A),
        (wire.SERVER_FRAMES, 0x8E),
        (wire.SERVER_FRAMES, 0xFF),
    ],
)
def test_unknown_frame_type(method: str, accept: frozenset[int], ftype: int) -> None:
    dec = Decoder(accept, BIG)
    dec.feed(HEADER.pack(2, ftype, 0))
    with pytest.raises(RemoteProtocolError) as info:
        getattr(dec, method)()
    assert info.value.code == ErrorCode.UNKNOWN_FRAME
    assert f"0x{ftype:02x}" in str(info.value)


@pytest.mark.parametrize("method", ["next_frame", "frames"])
@pytest.mark.parametrize("length", [0, 1])
def test_length_below_two(method: str, length: int) -> None:
    dec = Decoder(wire.SERVER_FRAMES, BIG)
    dec.feed(HEADER.pack(length, FrameType.OK, 0))
    with pytest.raises(RemoteProtocolError) as info:
        getattr(dec, method)()
    assert info.value.code == ErrorCode.PROTOCOL
    assert "below the minimum of 2" in str(info.value)


def test_error_is_sticky() -> None:
    dec = Decoder(wire.SERVER_FRAMES, BIG)
    dec.feed(HEADER.pack(1, FrameType.OK, 0))
    for _ in range(3):
        with pytest.raises(RemoteProtocolError):
            dec.frames()
        with pytest.raises(RemoteProtocolError):
            dec.next_frame()


def test_frames_returns_good_frames_before_a_bad_header() -> None:
    good = [wire.encode_u32(FrameType.OK, 1), wire.encode_u32(FrameType.PONG, 2)]
    garbage = HEADER.pack(2, 0x01, 0)  # HELLO is not a server frame
    dec = Decoder(wire.SERVER_FRAMES, BIG)
    dec.feed(b"".join(good) + garbage)
    assert dec.frames() == [Frame(FrameType.OK, 0, U32.pack(1)), Frame(FrameType.PONG, 0, U32.pack(2))]
    with pytest.raises(RemoteProtocolError) as info:
        dec.frames()
    assert info.value.code == ErrorCode.UNKNOWN_FRAME


def test_next_frame_returns_good_frame_before_a_bad_header() -> None:
    dec = Decoder(wire.CLIENT_FRAMES, 100)
    dec.feed(wire.encode_u32(FrameType.PING, 9) + HEADER.pack(101, FrameType.PUB, 0))
    assert dec.next_frame() == Frame(FrameType.PING, 0, U32.pack(9))
    with pytest.raises(RemoteProtocolError) as info:
        dec.next_frame()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_frames_good_then_oversized_then_error() -> None:
    dec = Decoder(wire.CLIENT_FRAMES, 100)
    dec.feed(wire.encode_u32(FrameType.PING, 9) + HEADER.pack(101, FrameType.PUB, 0))
    assert dec.frames() == [Frame(FrameType.PING, 0, U32.pack(9))]
    with pytest.raises(RemoteProtocolError) as info:
        dec.frames()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_raising_max_frame_later_lets_a_bigger_frame_through() -> None:
    # The broker reads the handshake with a small limit and raises it after WELCOME.
    big = wire.encode_pub(b"t", b"x" * 500)
    dec = Decoder(wire.CLIENT_FRAMES, 100)
    dec.feed(wire.encode_u32(FrameType.PING, 1) + big)
    assert [f.type for f in dec.frames()] == [FrameType.PING]
    dec.max_frame = 1000
    assert [f.type for f in dec.frames()] == [FrameType.PUB]
    assert dec.buffered == 0


def test_buffered_counts_unreturned_bytes() -> None:
    dec = Decoder(wire.SERVER_FRAMES, BIG)
    a = wire.encode_gap(1, 1)
    dec.feed(a + a[:3])
    assert dec.buffered == len(a) + 3
    assert dec.next_frame() != NEED_DATA
    assert dec.buffered == 3


# ---- headers ---------------------------------------------------------------------------------------


def test_headers_round_trip() -> None:
    h = {"a": "", "key-2": "välue", "ключ": "значение", "x" * 300: "y" * 1000}
    assert wire.decode_headers(wire.encode_headers(h)) == h
    assert wire.decode_headers(memoryview(wire.encode_headers(h))) == h


def test_headers_layout() -> None:
    assert wire.encode_headers({"ab": "c"}) == struct.pack("<HHH", 1, 2, 1) + b"abc"


@pytest.mark.parametrize("headers", [None, {}])
def test_no_headers_is_an_empty_block(headers: dict[str, str] | None) -> None:
    assert wire.encode_headers(headers) == b""
    assert wire.decode_headers(b"") == {}


def test_zero_count_block_decodes_to_empty() -> None:
    assert wire.decode_headers(b"\x00\x00") == {}


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        ({"": "v"}, "key must be 1..65535 bytes"),
        ({"k" * 65536: "v"}, "key must be 1..65535 bytes"),
        ({"k": "v" * 65536}, "value 0..65535 bytes"),
        ({1: "v"}, "must be str"),
        ({"k": b"v"}, "must be str"),
        ({"k": None}, "must be str"),
        ({f"k{i}": "v" * 1000 for i in range(70)}, f"the limit is {MAX_HEADERS_BYTES}"),
    ],
)
def test_encode_headers_refuses(headers: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidHeadersError, match=match):
        wire.encode_headers(headers)


def test_encode_headers_at_the_size_limit() -> None:
    # 2 (count) + 4 (item header) + 1 (key) + value = 65535
    block = wire.encode_headers({"k": "v" * (MAX_HEADERS_BYTES - 7)})
    assert len(block) == MAX_HEADERS_BYTES
    with pytest.raises(InvalidHeadersError):
        wire.encode_headers({"k": "v" * (MAX_HEADERS_BYTES - 6)})


_ITEM = struct.Struct("<HH")


@pytest.mark.parametrize(
    ("block", "what"),
    [
        (b"\x01", "truncated count"),
        (struct.pack("<H", 1), "count 1 but no item"),
        (struct.pack("<H", 1) + b"\x01\x00", "truncated item header"),
        (struct.pack("<H", 1) + _ITEM.pack(3, 0) + b"ab", "key runs past the block"),
        (struct.pack("<H", 1) + _ITEM.pack(1, 5) + b"kvv", "value runs past the block"),
        (struct.pack("<H", 1) + _ITEM.pack(0, 1) + b"v", "empty key"),
        (struct.pack("<H", 1) + _ITEM.pack(1, 1) + b"kvX", "stray byte"),
        (struct.pack("<H", 0) + b"X", "stray byte after zero count"),
        (struct.pack("<H", 2) + _ITEM.pack(1, 1) + b"kv", "count says 2, one present"),
        (struct.pack("<H", 1) + _ITEM.pack(1, 1) + b"\xffv", "key not UTF-8"),
        (struct.pack("<H", 1) + _ITEM.pack(1, 2) + b"k\xc3(", "value not UTF-8"),
    ],
)
def test_decode_headers_malformed(block: bytes, what: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        wire.decode_headers(block)
    assert info.value.code == ErrorCode.INVALID_HEADERS, what
    assert "malformed headers" in str(info.value)


# ---- split_block -----------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"\x01\x00\x00\x00\x00\x00\x00"])
def test_split_block_shorter_than_its_header(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="shorter than its 8-byte header"):
        wire.split_block(body)


def test_split_block_short_after_start_offset() -> None:
    with pytest.raises(RemoteProtocolError, match="shorter than its 8-byte header"):
        wire.split_block(b"\x00" * 12 + MSG_BLOCK.pack(0, 0, 0)[:7], 12)


@pytest.mark.parametrize(
    "body",
    [
        MSG_BLOCK.pack(5, 0, 0) + b"abcd",  # topic runs past the body
        MSG_BLOCK.pack(1, 5, 0) + b"tabcd",  # reply runs past the body
        MSG_BLOCK.pack(1, 0, 4) + b"t\x00\x00\x00",  # headers run past the body
        MSG_BLOCK.pack(0xFFFF, 0xFFFF, 0xFFFFFFFF) + b"x" * 100,
    ],
)
def test_split_block_inconsistent_lengths(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="but only") as info:
        wire.split_block(body)
    assert info.value.code == ErrorCode.PROTOCOL


def test_split_block_lengths_exactly_fill_the_body() -> None:
    body = MSG_BLOCK.pack(1, 2, 3) + b"t" + b"rr" + b"hhh"
    assert wire.split_block(body) == wire.BlockView("t", "rr", 11, 14)


@pytest.mark.parametrize(
    "body",
    [
        MSG_BLOCK.pack(2, 0, 0) + b"\xff\xfe",
        MSG_BLOCK.pack(1, 1, 0) + b"t\x80",
        MSG_BLOCK.pack(3, 0, 0) + "é".encode()[:1] + b"ab",
    ],
)
def test_split_block_bad_utf8(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="not valid UTF-8") as info:
        wire.split_block(body)
    assert info.value.code == ErrorCode.INVALID_TOPIC


def test_split_block_with_offset() -> None:
    block = wire.message_block(b"a.b", b"pp", b"", b"")
    view = wire.split_block(b"\x00" * 12 + block, 12)
    assert view == wire.BlockView("a.b", "", 23, 23)


def test_encode_json_is_compact() -> None:
    data = wire.encode_json(FrameType.WELCOME, {"a": 1, "b": [1, 2]})
    assert data[6:] == b'{"a":1,"b":[1,2]}'
    assert json.loads(data[6:]) == {"a": 1, "b": [1, 2]}


# ---- runs (PUBN / MSGN) ----------------------------------------------------------------------------


def test_a_run_is_a_block_head_then_length_prefixed_payloads() -> None:
    data = wire.encode_run(b"a.b", [b"x", b"", b"yz"], headers=wire.encode_headers({"k": "v"}))
    length, ftype, flags = wire.frames.HEADER.unpack_from(data)
    assert (length, ftype, flags) == (len(data) - 4, wire.FrameType.PUBN, 0)
    body = data[6:]
    topic, reply, h0, items_at = wire.split_block(body)  # the head is a message block's
    assert (topic, reply) == ("a.b", "")
    assert wire.decode_headers(body[h0:items_at]) == {"k": "v"}
    assert wire.run_count(body, items_at) == 3
    assert wire.run_payloads(body, items_at) == [b"x", b"", b"yz"]
    head = wire.msgn_header(7, 9, 3, len(body))
    assert wire.frames.MSGN_HEAD.unpack(head) == (len(head) + len(body) - 4, wire.FrameType.MSGN, 0, 7, 9, 3)


@pytest.mark.parametrize("tail", [b"", b"\x01\x00", b"\x05\x00\x00\x00abc"])
def test_a_run_whose_items_do_not_fill_its_frame_is_refused(tail: bytes) -> None:
    body = wire.encode_run(b"t", [b"ok"])[6:]
    bad = body[:11] + tail if not tail else body + tail
    with pytest.raises(RemoteProtocolError):
        wire.run_count(bad, 9)
    with pytest.raises(RemoteProtocolError):
        wire.run_payloads(bad, 9)


def test_an_empty_run_cannot_be_encoded_and_one_past_the_frame_limit_is_refused() -> None:
    with pytest.raises(ValueError):
        wire.encode_run(b"t", [])
    with pytest.raises(MessageTooLargeError):
        wire.encode_run(b"t", [b"x" * 100], max_frame=100)


def test_run_payloads_reads_a_run_inside_a_larger_buffer_only_up_to_its_end() -> None:
    inner = b"".join(struct.pack("<I", 3) + b"abc" for _ in range(5))
    buf = b"HEAD" + inner + struct.pack("<I", 3) + b"zzz"  # a further item past the end
    assert wire.run_payloads(buf, 4, 4 + len(inner), 5) == [b"abc"] * 5
    with pytest.raises(RemoteProtocolError, match="declares 4 messages and holds 5"):
        wire.run_payloads(buf, 4, 4 + len(inner), 4)
    with pytest.raises(RemoteProtocolError, match="cut off"):
        wire.run_payloads(buf, 4, 4 + len(inner) + 2)
