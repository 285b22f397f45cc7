"""Frame types, flags and fixed layouts of the hostbus wire protocol (version 1).

Every frame is ``u32 length | u8 type | u8 flags | body`` with ``length`` counting the bytes
after the length field (so ``length = 2 + len(body)``). All integers are little-endian.
``docs/protocol.md`` is the full specification; this module is its executable form.
"""

from __future__ import annotations

import enum
import struct

PROTOCOL_VERSION = 1

#: ``u32 length, u8 type, u8 flags``
HEADER = struct.Struct("<IBB")
HEADER_SIZE = HEADER.size  # 6

#: Largest frame (length field value) the broker reads before the handshake completes.
HANDSHAKE_MAX_FRAME = 64 * 1024

#: Message block: ``u16 topic_len, u16 reply_len, u32 headers_len`` then topic, reply, headers,
#: payload. It is the body of PUB and the tail of MSG, so the broker forwards it unchanged.
MSG_BLOCK = struct.Struct("<HHI")
#: MSG prefix: ``u32 sid, u64 sender_ref``.
MSG_PREFIX = struct.Struct("<IQ")
#: The whole MSG frame before its message block, packed in one call: header + MSG_PREFIX.
MSG_HEAD = struct.Struct("<IBBIQ")
#: SENDER: ``u64 ref, u32 uid, u32 gid, u32 pid`` then the UTF-8 origin (empty for socket peers).
SENDER = struct.Struct("<QIII")
#: ERR: ``u16 code, u32 ref`` then a UTF-8 message.
ERR = struct.Struct("<HI")
#: GAP: ``u32 sid, u64 missed``.
GAP = struct.Struct("<IQ")
#: QMSG prefix: ``u32 sid, u64 sender_ref, u64 seq, u32 deliveries, u64 time_ns``.
QMSG_PREFIX = struct.Struct("<IQQIQ")
#: The whole QMSG frame before its message block, packed in one call: header + QMSG_PREFIX.
QMSG_HEAD = struct.Struct("<IBBIQQIQ")
#: An ACK item: ``u8 kind, u64 seq, u32 delay_ms`` (after the ``u32 sid`` of the frame).
ACK_ITEM = struct.Struct("<BQI")
#: STORED: ``u32 first_pub_id, u32 count`` then items ``u64 first_seq, u8 name_len, name``: the
#: confirmed publishes first_pub_id .. first_pub_id + count - 1 got first_seq .. + count - 1 in
#: each named queue.
STORED_HEAD = struct.Struct("<II")
STORED_ITEM = struct.Struct("<QB")
#: PUBN (a run: many messages on one topic in one frame): ``u16 topic_len, u16 zero, u32
#: headers_len``, topic, headers, then one or more items ``u32 payload_len, payload``. The head
#: is a message block's with no reply subject, so ``head + payload`` is each message's block.
RUN_HEAD = MSG_BLOCK
RUN_ITEM = struct.Struct("<I")
#: Most messages one run may hold (a PUBN with more is a protocol error): bounds the work one
#: frame makes the broker do before it serves others, and what a subscriber decodes at once.
RUN_MAX_ITEMS = 8192
#: MSGN prefix: ``u32 sid, u64 sender_ref, u32 count``, then the PUBN body unchanged.
MSGN_PREFIX = struct.Struct("<IQI")
#: The whole MSGN frame before the run, packed in one call: header + MSGN_PREFIX.
MSGN_HEAD = struct.Struct("<IBBIQI")
#: Capability a HELLO or WELCOME lists under "features": this side takes runs (MSGN; PUBN).
FEATURE_RUNS = "runs"
#: A u32 (sid of SUB/UNSUB/OK, token of PING/PONG, id of CALL/RESULT).
U32 = struct.Struct("<I")
#: Headers block: ``u16 count`` then per header ``u16 key_len, u16 value_len, key, value``.
U16 = struct.Struct("<H")
HEADER_ITEM = struct.Struct("<HH")

#: Largest encoded headers block, in bytes.
MAX_HEADERS_BYTES = 65535


class FrameType(enum.IntEnum):
    # client -> broker
    HELLO = 0x01
    PUB = 0x02
    SUB = 0x03
    UNSUB = 0x04
    PING = 0x05
    CALL = 0x06
    CPUB = 0x07
    ACK = 0x08
    PUBN = 0x09
    # broker -> client
    WELCOME = 0x81
    MSG = 0x82
    SENDER = 0x83
    SENDER_RESET = 0x84
    OK = 0x85
    ERR = 0x86
    GAP = 0x87
    NORESP = 0x88
    PONG = 0x89
    RESULT = 0x8A
    STORED = 0x8B
    QMSG = 0x8C
    MSGN = 0x8D


CLIENT_FRAMES = frozenset(t for t in FrameType if t < 0x80)
SERVER_FRAMES = frozenset(t for t in FrameType if t >= 0x80)

# PUB flags
PUB_RETAIN = 0x01
PUB_REQUEST = 0x02  # reply_to is set and the publisher wants NORESP if nobody subscribes
# MSG flags
MSG_RETAINED = 0x01  # delivered from the retained store at subscribe time
# ERR flags
ERR_FATAL = 0x01  # the broker closes the connection after this frame

# ACK kinds
ACK_ACK = 0
ACK_NAK = 1
ACK_TERM = 2
ACK_PROGRESS = 3
ACK_KINDS = {"ack": ACK_ACK, "nak": ACK_NAK, "term": ACK_TERM, "in_progress": ACK_PROGRESS}

# Subscription overflow policies (SUB "policy").
POLICIES = ("drop-oldest", "drop-new", "disconnect")
