"""The ZeroMQ gateway's rules, sans-IO: subscription prefixes to patterns, multipart to messages.

**Prefixes.** A ZeroMQ SUB subscribes to a byte prefix of the first frame (the topic); hostbus
subscriptions are token patterns. The gateway subscribes, for each prefix, to patterns that
cover every topic the prefix can match, and lets ZeroMQ's own prefix filter (in the XPUB socket)
pick exactly the matching messages for each SUB:

=====================  ==========================================================
ZeroMQ prefix          hostbus patterns
=====================  ==========================================================
``""`` (everything)    ``>`` -- every application topic (not ``$…``, not inboxes)
``"a.b."``             ``a.b.>``
``"a.b"``, ``"a.bc"``  ``a.*`` and ``a.*.>`` (any topic whose second token could start so)
``"a"``                ``*`` and ``*.>``
``"$SYS."``            ``$SYS.>``
=====================  ==========================================================

A prefix that no topic can start with (whitespace, ``*``, ``>``, an empty token, invalid UTF-8)
subscribes to nothing. With an endpoint ``topic_prefix``, the narrower of the two prefixes is
used, and a prefix outside it subscribes to nothing.

**Messages from PUB peers.** ``[topic, payload]`` or ``[topic, payload, headers]`` where headers
is a JSON object of strings. Anything else is a fault, counted by kind.
"""

from __future__ import annotations

import codecs
import json
import struct
from collections.abc import Callable

from hostbus import topics, wire
from hostbus.errors import HostbusError

_TOKEN_OK = topics._PATTERN_TOKEN_RE  # a literal token or a wildcard


def patterns_for_prefix(prefix: bytes, topic_prefix: str = "") -> list[str]:
    """The hostbus patterns that cover every topic starting with ``prefix``."""
    # A prefix may end inside a multi-byte character (b"caf\xc3" of "café"): decode what is
    # complete; the patterns of that part cover the topics the full prefix can match.
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(prefix, final=False)
    except UnicodeDecodeError:
        return []
    if topic_prefix:
        if text.startswith(topic_prefix):
            pass
        elif topic_prefix.startswith(text):
            text = topic_prefix
        else:
            return []
    if text == "":
        return [">"]
    *whole, last = text.split(".")
    for tok in whole:
        if not tok or tok in ("*", ">") or _TOKEN_OK.fullmatch(tok) is None:
            return []
    if whole and whole[0] == "_INBOX":  # replies go only to their requester: nothing to subscribe
        return []
    head = "".join(t + "." for t in whole)
    if last == "":
        return [head + ">"]
    if last in ("*", ">") or _TOKEN_OK.fullmatch(last) is None:
        return []
    return [head + "*", head + "*.>"]


class ZmqFault(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def parse_multipart(frames: list[bytes], *, max_bytes: int, topic_prefix: str,
                    check_topic: Callable[[bytes], str]) -> tuple[str, bytes, int]:
    """(topic, message block, payload length) for a PUB peer's message; raises ZmqFault."""
    if len(frames) not in (2, 3):
        raise ZmqFault("frames", f"expected [topic, payload] or [topic, payload, headers], got {len(frames)} frames")
    size = sum(len(f) for f in frames)
    if size > max_bytes:
        raise ZmqFault("too_large", f"a message of {size} bytes exceeds zmq.max_message_bytes ({max_bytes})")
    raw_topic, payload = frames[0], frames[1]
    try:
        topic = check_topic(raw_topic)
    except HostbusError as exc:
        raise ZmqFault("invalid_topic", str(exc)) from None
    if topic_prefix and not topic.startswith(topic_prefix):
        raise ZmqFault("denied_topic", f"topic {topics.show(topic)} is outside the gateway's topic_prefix")
    hblock = b""
    if len(frames) == 3:
        try:
            headers = json.loads(frames[2])
            if not isinstance(headers, dict):
                raise ValueError("not an object")
            hblock = wire.encode_headers(headers)
        except (ValueError, RecursionError, HostbusError, struct.error) as exc:
            raise ZmqFault("invalid_headers", f"headers frame: {str(exc)[:80]}") from None
    return topic, wire.message_block(raw_topic, payload, hblock), len(payload)


def multipart_of(block: bytes) -> list[bytes]:
    """The frames a ZeroMQ SUB receives for a hostbus message: topic, payload, and headers if any."""
    topic, _, h0, h1 = wire.split_block(block)
    frames = [topic.encode(), block[h1:]]
    if h1 > h0:
        frames.append(json.dumps(wire.decode_headers(block[h0:h1]), separators=(",", ":")).encode())
    return frames
