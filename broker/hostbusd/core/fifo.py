"""Parsing what arrives through a named pipe (FIFO), sans-IO: bytes in, messages and faults out.

Formats, one message per line (``\\n``; a ``\\r`` before it is dropped):

* ``lines`` -- ``TOPIC SP PAYLOAD``: the topic, one space, then the payload to the end of the line;
* ``json`` -- one object per line, ``{"topic": ..., "data": ..., "headers": {...}}``: ``data`` that
  is a string is published as its UTF-8 text, any other JSON value as its JSON text;
* ``auto`` -- a line starting with ``{`` is ``json``, any other line is ``lines``;
* ``frames`` -- native PUB frames (``docs/protocol.md``), back to back.

A bad line is skipped and counted by kind, and parsing resumes at the next newline; a line longer
than ``max_line_bytes`` is skipped whole, however it arrives. A bad frame cannot be resynchronised
in a byte stream: the parser says so (:attr:`FifoParser.broken`) and the transport reopens the
FIFO, dropping what was buffered. A partial line that stays partial for ``partial_line_timeout``
seconds is assumed to come from a writer that died mid-line and is dropped (counted), so the
next writer's line is not glued to it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hostbus import topics, wire
from hostbus.errors import HostbusError, RemoteProtocolError
from hostbus.wire import FrameType

FORMATS = ("lines", "json", "auto", "frames")

#: What a parsed message is: (topic, message block, PUB flags, payload length).
Parsed = tuple[str, bytes, int, int]


@dataclass(slots=True)
class FifoCounters:
    """What ``hostbus stats`` shows for one FIFO."""

    messages: int = 0
    bytes: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def fault(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


@dataclass(slots=True)
class FifoEntry:
    """A FIFO as the stats see it. A sink's queue overflows are counted by its session."""

    kind: str  # "ingress" or "sink"
    format: str
    counters: FifoCounters
    session: Any = None  # the sink's LineSession

    def describe(self) -> dict[str, Any]:
        c = self.counters
        out: dict[str, Any] = {"kind": self.kind, "format": self.format, "messages": c.messages, "bytes": c.bytes}
        if self.kind == "sink":
            dropped = dict(c.errors)
            queue_full = self.session.dropped - sum(dropped.values()) if self.session is not None else 0
            if queue_full:
                dropped["queue_full"] = queue_full
            out["dropped"] = dropped
        else:
            out["errors"] = dict(c.errors)
        return out


class FifoFault(Exception):
    """One skipped input unit; ``kind`` is its counter name, the message says what was wrong."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class FifoParser:
    """Turns a FIFO's bytes into messages ready for the router.

    ``check_topic`` returns the topic for its UTF-8 bytes or raises (the router's cached check);
    ``check_block`` checks a PUB frame's block exactly as the socket does (``frames`` format);
    ``on_fault`` receives every skipped unit (kind, message) for counting and logging.
    """

    def __init__(self, fmt: str, *, max_line_bytes: int, max_frame_bytes: int, topic_prefix: str,
                 check_topic: Callable[[bytes], str], check_block: Callable[[bytes, int], tuple[str, str, int]],
                 on_fault: Callable[[FifoFault], None]) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown FIFO format {fmt!r}")
        self.format = fmt
        self.max_line_bytes = max_line_bytes
        self.topic_prefix = topic_prefix
        self._check_topic = check_topic
        self._check_block = check_block
        self._on_fault = on_fault
        self._buf = bytearray()
        self._skipping = False  # inside an over-long line: drop up to the next newline
        self.broken = False  # frames: the stream cannot be resynchronised; reopen the FIFO
        self.decoder = wire.Decoder(frozenset({FrameType.PUB}), max_frame_bytes)

    @property
    def partial(self) -> bool:
        return bool(self._buf) or self._skipping or self.decoder.buffered > 0

    def reset(self) -> None:
        """Forget everything buffered (after a reopen, or a partial line given up)."""
        self._buf.clear()
        self._skipping = False
        self.broken = False
        self.decoder = wire.Decoder(frozenset({FrameType.PUB}), self.decoder.max_frame)

    def drop_partial(self) -> None:
        """A partial line (or frame) stayed incomplete too long: its writer is presumed dead."""
        if self.partial:
            self._on_fault(FifoFault("partial", "a partial line was left incomplete (did its writer die?)"))
        self.reset()

    def feed(self, data: bytes) -> list[Parsed]:
        if self.format == "frames":
            return self._feed_frames(data)
        out: list[Parsed] = []
        buf = self._buf
        buf += data
        start = 0
        limit = self.max_line_bytes
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if self._skipping:
                self._skipping = False
            elif nl - start > limit:
                self._on_fault(FifoFault("too_long", f"a line of {nl - start} bytes exceeds "
                                                     f"fifo.max_line_bytes ({limit})"))
            else:
                end = nl - 1 if nl > start and buf[nl - 1] == 0x0D else nl
                if end > start:
                    try:
                        out.append(self._line(bytes(buf[start:end])))
                    except FifoFault as fault:
                        self._on_fault(fault)
            start = nl + 1
        del buf[:start]
        if len(buf) > limit:  # a line already too long: skip the rest of it as it arrives
            if not self._skipping:
                self._on_fault(FifoFault("too_long", f"a line exceeds fifo.max_line_bytes ({limit})"))
            self._skipping = True
            buf.clear()
        return out

    def _line(self, line: bytes) -> Parsed:
        if self.format == "json" or (self.format == "auto" and line[:1] == b"{"):
            return self._json(line)
        sp = line.find(b" ")
        if sp <= 0:
            raise FifoFault("malformed", "expected 'TOPIC PAYLOAD' (a topic, one space, the payload)")
        raw_topic = line[:sp]
        topic = self._topic(raw_topic)
        payload = line[sp + 1 :]
        return topic, wire.message_block(raw_topic, payload), 0, len(payload)

    def _json(self, line: bytes) -> Parsed:
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise FifoFault("invalid_json", f"invalid JSON: {str(exc)[:80]}") from None
        if not isinstance(obj, dict):
            raise FifoFault("invalid_json", "a JSON line must be an object with 'topic' and 'data'")
        topic_value = obj.get("topic")
        if not isinstance(topic_value, str):
            raise FifoFault("invalid_json", "the JSON object has no string 'topic'")
        data: Any = obj.get("data", "")
        headers = obj.get("headers")
        if headers is None:
            headers = {}
        try:  # JSON strings may hold lone surrogates, which have no UTF-8 form
            payload = data.encode() if isinstance(data, str) else json.dumps(data, separators=(",", ":")).encode()
            raw_topic = topic_value.encode()
            if not isinstance(headers, dict):
                raise FifoFault("invalid_json", "'headers' must be an object of strings")
            hblock = wire.encode_headers(headers)
        except (UnicodeEncodeError, HostbusError) as exc:
            raise FifoFault("invalid_json", f"bad topic or headers: {str(exc)[:80]}") from None
        topic = self._topic(raw_topic)
        return topic, wire.message_block(raw_topic, payload, hblock), 0, len(payload)

    def _topic(self, raw: bytes) -> str:
        try:
            topic = self._check_topic(raw)
        except HostbusError as exc:
            raise FifoFault("invalid_topic", str(exc)) from None
        self._prefix_check(topic)
        return topic

    def _prefix_check(self, topic: str) -> None:
        if self.topic_prefix and not topic.startswith(self.topic_prefix):
            raise FifoFault("denied_topic", f"topic {topics.show(topic)} is outside this FIFO's "
                                            f"topic_prefix {self.topic_prefix!r}")

    def _feed_frames(self, data: bytes) -> list[Parsed]:
        if self.broken:
            return []
        dec = self.decoder
        dec.feed(data)
        out: list[Parsed] = []
        try:
            while True:
                frames = dec.frames()
                if not frames:
                    return out
                for _, frame_flags, body in frames:
                    flags = frame_flags & wire.PUB_RETAIN  # nobody could be told "no responders" on a FIFO
                    try:
                        topic, _, payload_start = self._check_block(body, flags)  # the socket's own checks
                        self._prefix_check(topic)
                    except RemoteProtocolError as exc:
                        self._on_fault(FifoFault("malformed", f"bad PUB frame: {exc}"))
                        continue
                    except HostbusError as exc:
                        self._on_fault(FifoFault("invalid_topic", str(exc)))
                        continue
                    except FifoFault as fault:
                        self._on_fault(fault)
                        continue
                    out.append((topic, body, flags, len(body) - payload_start))
        except RemoteProtocolError as exc:
            self._on_fault(FifoFault("broken_stream", f"the frame stream is broken ({exc}); reopening the FIFO"))
            self.broken = True
            return out
