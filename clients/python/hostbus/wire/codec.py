"""Sans-IO codec: bytes in, frames out; frames in, bytes out. No I/O, no callbacks, no async.

Shape (after h11): feed bytes with :meth:`Decoder.feed`, take frames with
:meth:`Decoder.next_frame` (which returns :data:`NEED_DATA` when no complete frame is buffered)
or all at once with :meth:`Decoder.frames`. Encoding is a set of pure functions returning bytes.
Anything the peer sent that is not valid protocol raises :class:`RemoteProtocolError`; anything
this side asked to encode that cannot be encoded raises a :class:`HostbusError` subclass.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

from hostbus.errors import (
    ErrorCode,
    InvalidHeadersError,
    MessageTooLargeError,
    RemoteProtocolError,
)
from hostbus.wire.frames import (
    ACK_ITEM,
    ERR,
    ERR_FATAL,
    GAP,
    HEADER,
    HEADER_ITEM,
    HEADER_SIZE,
    MAX_HEADERS_BYTES,
    MSG_BLOCK,
    MSG_HEAD,
    MSGN_HEAD,
    RUN_ITEM,
    RUN_MAX_ITEMS,
    SENDER,
    STORED_HEAD,
    STORED_ITEM,
    U16,
    U32,
    FrameType,
)


class Frame(NamedTuple):
    type: int
    flags: int
    body: bytes


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack
_pack_msg_head = MSG_HEAD.pack
_MSG = int(FrameType.MSG)
_pack_msgn_head = MSGN_HEAD.pack
_MSGN = int(FrameType.MSGN)
_item_len = RUN_ITEM.unpack_from


class Decoder:
    """Splits a byte stream into frames.

    ``accept`` is the set of frame types this side may receive; ``max_frame`` the largest value
    of the length field. Both are checked as soon as the 6-byte header is here, before the body
    is buffered, so an oversized or unknown frame costs nothing to refuse.

    Copies: bytes fed while nothing is buffered are kept as they are, and each frame's body is
    sliced out of them (one copy). Only the part of a frame cut off at the end of a read is
    moved into a bytearray that gathers the rest of it.

    Large frames (``big`` > 0, a reader that can read into a buffer): once a quarter of a frame
    of at least ``big`` bytes is here (so a peer cannot make the receiver commit more than four
    times what it sent), :meth:`reserve` returns the rest of a buffer of exactly the
    frame's size for the reader to receive into (:meth:`filled` says how much came), and the
    frame's body is returned as a read-only memoryview of that buffer (``views``; else copied out
    as bytes once): the kernel copies the bytes straight to where they are read. Frames after it
    are decoded as usual.
    """

    __slots__ = ("_big", "_buf", "_fill", "_pos", "accept", "big", "max_frame", "views")

    def __init__(self, accept: frozenset[int], max_frame: int, big: int = 0) -> None:
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._big: bytearray | None = None  # the large frame being received, whole size
        self._fill = 0  # bytes of it received
        self.accept = accept
        self.max_frame = max_frame
        self.big = big
        self.views = True

    def feed(self, data: bytes) -> None:
        if not data:
            return
        big = self._big
        if big is not None:  # the rest of a large frame first
            room = len(big) - self._fill
            take = min(room, len(data))
            big[self._fill:self._fill + take] = memoryview(data)[:take]
            self._fill += take
            if take == len(data):
                return
            data = data[take:]
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):  # nothing buffered: take the bytes as they are
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
            return
        if isinstance(buf, bytearray):
            if pos:
                del buf[:pos]
        else:  # a partial frame: gather it and what follows in a bytearray
            self._buf = buf = bytearray(memoryview(buf)[pos:])
        self._pos = 0
        buf += data

    def reserve(self) -> memoryview | None:
        """Where to receive the rest of a large frame (see the class docstring), or None."""
        big = self._big
        if big is None:
            buf = self._buf
            pos = self._pos
            if not self.big or len(buf) - pos < HEADER_SIZE:
                return None
            length, ftype, _ = _unpack_header(buf, pos)
            have = len(buf) - pos
            if length + 4 < self.big or have >= length + 4 or have * 4 < length + 4:
                return None  # small, complete, or less than a quarter here yet (gathered as usual)
            if length > self.max_frame or length < 2 or ftype not in self.accept:
                return None  # frames() reports it
            self._big = big = bytearray(length + 4)
            big[:have] = memoryview(buf)[pos:]
            self._fill = have
            self._buf = b""
            self._pos = 0
        return memoryview(big)[self._fill:]

    def filled(self, n: int) -> None:
        """``n`` bytes were received into what :meth:`reserve` returned."""
        self._fill += n

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames (non-zero means a frame is partial)."""
        return len(self._buf) - self._pos + (self._fill if self._big is not None else 0)

    def _body(self, start: int, end: int) -> bytes:
        buf = self._buf
        if type(buf) is bytes:
            return buf[start:end]
        with memoryview(buf) as view:
            return view[start:end].tobytes()

    def _take_big(self) -> Frame | None:
        big = self._big
        if big is None or self._fill < len(big):
            return None
        self._big = None
        self._fill = 0
        _, ftype, flags = _unpack_header(big, 0)
        if not self.views:
            return Frame(ftype, flags, memoryview(big)[HEADER_SIZE:].tobytes())
        return Frame(ftype, flags, memoryview(big).toreadonly()[HEADER_SIZE:])  # type: ignore[arg-type]

    def next_frame(self) -> Frame | _NeedData:
        if self._big is not None:
            f = self._take_big()
            return NEED_DATA if f is None else f
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_SIZE:
            return NEED_DATA
        length, ftype, flags = _unpack_header(buf, pos)
        self._check(length, ftype)
        end = pos + 4 + length
        if end > len(buf):
            return NEED_DATA
        self._pos = end
        return Frame(ftype, flags, self._body(pos + HEADER_SIZE, end))

    def frames(self) -> list[Frame]:
        """Every complete frame buffered, in order (the batch form of :meth:`next_frame`).

        If a bad header follows good frames, the good frames are returned first and the error is
        raised by the next call, so no valid frame is lost.
        """
        out: list[Frame] = []
        if self._big is not None:
            f = self._take_big()
            if f is None:
                return out
            out.append(f)
        buf = self._buf
        pos = self._pos
        size = len(buf)
        accept = self.accept
        max_frame = self.max_frame
        whole = type(buf) is bytes
        while size - pos >= HEADER_SIZE:
            length, ftype, flags = _unpack_header(buf, pos)
            if length > max_frame or length < 2 or ftype not in accept:
                if out:
                    break
                self._pos = pos
                self._check(length, ftype)
            end = pos + 4 + length
            if end > size:
                break
            out.append(Frame(ftype, flags, buf[pos + HEADER_SIZE : end] if whole  # type: ignore[arg-type]
                             else self._body(pos + HEADER_SIZE, end)))
            pos = end
        self._pos = pos
        if pos == size:
            self._buf = b""
            self._pos = 0
        return out

    def _check(self, length: int, ftype: int) -> None:
        if length < 2:
            raise RemoteProtocolError(f"frame length {length} is below the minimum of 2")
        if length > self.max_frame:
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds the limit of {self.max_frame}",
                code=ErrorCode.FRAME_TOO_LARGE,
            )
        if ftype not in self.accept:
            raise RemoteProtocolError(f"unknown frame type 0x{ftype:02x}", code=ErrorCode.UNKNOWN_FRAME)


# --------------------------------------------------------------------------------------------
# Encoding


def frame(ftype: int, body: bytes = b"", flags: int = 0) -> bytes:
    return _pack_header(len(body) + 2, ftype, flags) + body


def encode_json(ftype: int, obj: Mapping[str, Any], prefix: bytes = b"") -> bytes:
    return frame(ftype, prefix + json.dumps(obj, separators=(",", ":")).encode())


def encode_headers(headers: Mapping[str, str] | None) -> bytes:
    """The headers block for ``headers`` (empty bytes for no headers)."""
    if not headers:
        return b""
    if len(headers) > 0xFFFF:
        raise InvalidHeadersError(f"{len(headers)} headers; at most 65535 fit in a headers block")
    parts = [U16.pack(len(headers))]
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidHeadersError(f"header {key!r}: keys and values must be str")
        kb = key.encode()
        vb = value.encode()
        if not kb or len(kb) > 0xFFFF or len(vb) > 0xFFFF:
            raise InvalidHeadersError(f"header {key!r}: key must be 1..65535 bytes, value 0..65535 bytes")
        parts.append(HEADER_ITEM.pack(len(kb), len(vb)))
        parts.append(kb)
        parts.append(vb)
    block = b"".join(parts)
    if len(block) > MAX_HEADERS_BYTES:
        raise InvalidHeadersError(f"headers take {len(block)} bytes encoded; the limit is {MAX_HEADERS_BYTES}")
    return block


def decode_headers(block: bytes | memoryview) -> dict[str, str]:
    """Parse a headers block; raises :class:`RemoteProtocolError` (INVALID_HEADERS) if malformed."""
    if not block:
        return {}
    try:
        (count,) = U16.unpack_from(block, 0)
        pos = 2
        out: dict[str, str] = {}
        for _ in range(count):
            klen, vlen = HEADER_ITEM.unpack_from(block, pos)
            pos += 4
            kend = pos + klen
            vend = kend + vlen
            if klen == 0 or vend > len(block):
                raise ValueError("header item runs past the block")
            out[bytes(block[pos:kend]).decode()] = bytes(block[kend:vend]).decode()
            pos = vend
        if pos != len(block):
            raise ValueError(f"{len(block) - pos} stray bytes after the last header")
    except (ValueError, struct.error) as exc:  # UnicodeDecodeError is a ValueError
        raise RemoteProtocolError(f"malformed headers: {exc}", code=ErrorCode.INVALID_HEADERS) from None
    return out


def message_block(topic: bytes, data: bytes, headers: bytes = b"", reply: bytes = b"") -> bytes:
    """The message block shared by PUB and MSG."""
    return MSG_BLOCK.pack(len(topic), len(reply), len(headers)) + topic + reply + headers + data


def encode_pub(
    topic: bytes, data: bytes, headers: bytes = b"", reply: bytes = b"", flags: int = 0, max_frame: int = 0,
    pub_id: int = 0,
) -> bytes:
    """A PUB frame, or with ``pub_id`` a CPUB (a publish to be confirmed, sent without flags).
    ``topic``/``reply`` are UTF-8 bytes, ``headers`` an encoded headers block."""
    length = 10 + len(topic) + len(reply) + len(headers) + len(data)
    head = _pack_header(length, FrameType.PUB, flags)
    if pub_id:
        length += 4
        head = _pack_header(length, FrameType.CPUB, 0) + U32.pack(pub_id)
    if max_frame and length > max_frame:
        raise MessageTooLargeError(f"message of {length} bytes framed exceeds the broker's limit of {max_frame}")
    return (
        head
        + MSG_BLOCK.pack(len(topic), len(reply), len(headers))
        + topic
        + reply
        + headers
        + data
    )


def encode_run(topic: bytes, payloads: list[bytes], headers: bytes = b"", max_frame: int = 0) -> bytes:
    """A PUBN frame: every payload of ``payloads`` (at least one) published on ``topic`` with the
    same ``headers`` (an encoded headers block). Raises MessageTooLargeError past ``max_frame``."""
    if not payloads or len(payloads) > RUN_MAX_ITEMS:
        raise ValueError(f"a run holds 1 to {RUN_MAX_ITEMS} messages, not {len(payloads)}")
    parts = [b"", MSG_BLOCK.pack(len(topic), 0, len(headers)), topic, headers]
    pack = RUN_ITEM.pack
    for data in payloads:
        parts.append(pack(len(data)))
        parts.append(data)
    length = 2 + sum(len(p) for p in parts)
    if max_frame and length > max_frame:
        raise MessageTooLargeError(f"run of {len(payloads)} messages, {length} bytes framed, exceeds the broker's "
                                   f"limit of {max_frame}")
    parts[0] = _pack_header(length, FrameType.PUBN, 0)
    return b"".join(parts)


def run_count(body: bytes, pos: int) -> int:
    """The number of items of the run whose first item is at ``body[pos]``; checks that they
    fill the body exactly (RemoteProtocolError if not, or if there is none)."""
    end = len(body)
    n = 0
    try:
        while pos < end:
            pos += 4 + _item_len(body, pos)[0]
            n += 1
            if n > RUN_MAX_ITEMS:
                raise RemoteProtocolError(f"a run of more than {RUN_MAX_ITEMS} messages")
    except struct.error:
        raise RemoteProtocolError("a run's item length is cut off at the end of its frame") from None
    if pos != end:
        raise RemoteProtocolError(f"a run's last item runs {pos - end} bytes past the end of its frame")
    if n == 0:
        raise RemoteProtocolError("a run with no message")
    return n


def run_payloads(body: Any, pos: int, end: int | None = None, count: int | None = None) -> list[bytes]:
    """The payloads of the run whose first item is at ``body[pos]`` and whose items fill
    ``body[pos:end]`` exactly (``count`` of them, if given). ``body`` is bytes or a ring's
    mapping. Items of one size (the common case) are checked with four strided slices, one per
    byte of the length field, instead of an unpack per item."""
    if end is None:
        end = len(body)
    if end - pos >= 4:
        n = _item_len(body, pos)[0]
        step = n + 4
        k, rest = divmod(end - pos, step)
        if not rest and (count is None or k == count):
            head = body[pos:pos + 4]
            if all(body[pos + b:end:step] == head[b:b + 1] * k for b in range(4)):
                return [body[p:p + n] for p in range(pos + 4, pos + 4 + k * step, step)]
    out = []
    try:
        while pos < end:
            n = _item_len(body, pos)[0]
            pos += 4
            if pos > end:
                raise struct.error
            out.append(body[pos:pos + n])
            pos += n
    except struct.error:
        raise RemoteProtocolError("a run's item length is cut off at the end of its frame") from None
    if pos != end:
        raise RemoteProtocolError(f"a run's last item runs {pos - end} bytes past the end of its frame")
    if not out:
        raise RemoteProtocolError("a run with no message")
    if count is not None and len(out) != count:
        raise RemoteProtocolError(f"a run declares {count} messages and holds {len(out)}")
    return out


def msgn_header(sid: int, sender_ref: int, count: int, run_len: int) -> bytes:
    """The MSGN frame up to the run; the run (a PUBN body) follows it unchanged."""
    return _pack_msgn_head(run_len + 18, _MSGN, 0, sid, sender_ref, count)


def encode_pub_head(topic: bytes, size: int, headers: bytes = b"", reply: bytes = b"", flags: int = 0,
                    max_frame: int = 0) -> bytes:
    """A PUB frame up to its payload of ``size`` bytes: ``head + payload`` is :func:`encode_pub`'s
    frame, for a payload sent from where it is."""
    length = 10 + len(topic) + len(reply) + len(headers) + size
    if max_frame and length > max_frame:
        raise MessageTooLargeError(f"message of {length} bytes framed exceeds the broker's limit of {max_frame}")
    return b"".join((_pack_header(length, FrameType.PUB, flags), MSG_BLOCK.pack(len(topic), len(reply), len(headers)),
                     topic, reply, headers))


def encode_ack(sid: int, items: list[tuple[int, int, int]]) -> bytes:
    """An ACK frame: answers (kind, seq, delay_ms) about messages of the consumer ``sid``."""
    return frame(FrameType.ACK, U32.pack(sid) + b"".join(ACK_ITEM.pack(*item) for item in items))


def decode_stored(body: bytes) -> tuple[int, int, dict[str, int]]:
    """A STORED frame: (first pub_id, count, {queue: seq of the first}); publish ``first + k``
    got ``seq + k`` in each queue."""
    if len(body) < STORED_HEAD.size:
        raise RemoteProtocolError(f"STORED frame of {len(body)} bytes is shorter than its 8-byte head")
    first, count = STORED_HEAD.unpack_from(body, 0)
    rest = body
    out: dict[str, int] = {}
    pos = STORED_HEAD.size
    while pos < len(rest):
        if pos + STORED_ITEM.size > len(rest):
            raise RemoteProtocolError("STORED frame ends inside an item")
        seq, n = STORED_ITEM.unpack_from(rest, pos)
        pos += STORED_ITEM.size
        if pos + n > len(rest):
            raise RemoteProtocolError("STORED frame's queue name runs past its end")
        out[rest[pos:pos + n].decode(errors="replace")] = seq
        pos += n
    return first, count, out


def encode_stored(first: int, count: int, seqs: Mapping[str, int]) -> bytes:
    body = bytearray(STORED_HEAD.pack(first, count))
    for name, seq in seqs.items():
        raw = name.encode()
        body += STORED_ITEM.pack(seq, len(raw)) + raw
    return frame(FrameType.STORED, bytes(body))


def encode_hello(name: str | None, client: str, protocol: int, features: tuple[str, ...] = ()) -> bytes:
    hello: dict[str, Any] = {"protocol": protocol, "name": name, "client": client}
    if features:
        hello["features"] = list(features)
    return encode_json(FrameType.HELLO, hello)


def encode_sub(sid: int, options: Mapping[str, Any]) -> bytes:
    return encode_json(FrameType.SUB, options, U32.pack(sid))


def encode_u32(ftype: int, value: int) -> bytes:
    """UNSUB, PING, PONG and OK: a frame whose body is one u32."""
    return _pack_header(6, ftype, 0) + U32.pack(value)


def encode_call(call_id: int, op: str, args: Mapping[str, Any] | None = None) -> bytes:
    return encode_json(FrameType.CALL, {"op": op, **(args or {})}, U32.pack(call_id))


def encode_err(code: int, ref: int, message: str, fatal: bool) -> bytes:
    return frame(FrameType.ERR, ERR.pack(code, ref) + message.encode(), ERR_FATAL if fatal else 0)


def encode_sender(ref: int, uid: int, gid: int, pid: int, origin: str = "") -> bytes:
    return frame(FrameType.SENDER, SENDER.pack(ref, uid, gid, pid) + origin.encode())


def encode_gap(sid: int, missed: int) -> bytes:
    return frame(FrameType.GAP, GAP.pack(sid, missed))


def msg_header(sid: int, sender_ref: int, block_len: int, flags: int = 0) -> bytes:
    """The MSG frame up to the message block; the block follows it unchanged."""
    return _pack_msg_head(block_len + 14, _MSG, flags, sid, sender_ref)


# --------------------------------------------------------------------------------------------
# Decoding frame bodies


class BlockView(NamedTuple):
    """Offsets of the parts of a message block inside a frame body."""

    topic: str
    reply: str
    headers_start: int
    headers_end: int  # payload starts here


def split_block(body: bytes, start: int = 0) -> BlockView:
    """Locate the parts of the message block at ``body[start:]``; checks lengths and UTF-8."""
    if len(body) - start < 8:
        raise RemoteProtocolError(f"message block of {len(body) - start} bytes is shorter than its 8-byte header")
    tlen, rlen, hlen = MSG_BLOCK.unpack_from(body, start)
    t0 = start + 8
    r0 = t0 + tlen
    h0 = r0 + rlen
    h1 = h0 + hlen
    if h1 > len(body):
        raise RemoteProtocolError(
            f"message block declares {tlen}+{rlen}+{hlen} bytes of topic, reply and headers "
            f"but only {len(body) - t0} bytes follow"
        )
    try:
        topic = body[t0:r0].decode()
        reply = body[r0:h0].decode() if rlen else ""
    except UnicodeDecodeError:
        raise RemoteProtocolError("topic or reply subject is not valid UTF-8", code=ErrorCode.INVALID_TOPIC) from None
    return BlockView(topic, reply, h0, h1)


def split_u32(body: bytes) -> tuple[int, bytes]:
    """A frame body that starts with a u32 (SUB, CALL, RESULT, OK, ...): the u32 and the rest."""
    if len(body) < 4:
        raise RemoteProtocolError(f"frame body of {len(body)} bytes is shorter than its 4-byte id")
    return U32.unpack_from(body, 0)[0], body[4:]


def decode_json_obj(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested input
        raise RemoteProtocolError(f"invalid JSON body: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("JSON body must be an object")
    return obj


def decode_err(body: bytes) -> tuple[int, int, str]:
    if len(body) < ERR.size:
        raise RemoteProtocolError("ERR frame too short")
    code, ref = ERR.unpack_from(body, 0)
    return code, ref, body[ERR.size :].decode(errors="replace")


def decode_sender(body: bytes) -> tuple[int, int, int, int, str]:
    if len(body) < SENDER.size:
        raise RemoteProtocolError("SENDER frame too short")
    ref, uid, gid, pid = SENDER.unpack_from(body, 0)
    return ref, uid, gid, pid, body[SENDER.size :].decode(errors="replace")


def decode_gap(body: bytes) -> tuple[int, int]:
    if len(body) != GAP.size:
        raise RemoteProtocolError("GAP frame has the wrong size")
    sid, missed = GAP.unpack(body)
    return int(sid), int(missed)
